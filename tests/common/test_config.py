"""fastloss.build_loss from plain dicts, fastloss.LOSSES, fastloss.PerceptualLoss."""
import pytest
import torch

import fastloss


def test_losses_lists_every_loss():
    assert fastloss.LOSSES == {"PDLLoss": fastloss.PDLLoss, "D2SMLoss": fastloss.D2SMLoss,
                               "MDFLoss": fastloss.MDFLoss, "FDLLoss": fastloss.FDLLoss,
                               "PerceptualLoss": fastloss.PerceptualLoss}


def test_build_loss_equals_the_class():
    u, v = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    torch.manual_seed(0)
    built = fastloss.build_loss({"type": "PDLLoss", "extractor_weights": None, "layers": ["relu2_2"]})
    torch.manual_seed(0)
    direct = fastloss.PDLLoss(extractor_weights=None, layers=("relu2_2",))
    assert type(built) is fastloss.PDLLoss and built.layers == ("relu2_2",)
    torch.testing.assert_close(built(u, v), direct(u, v))
    m = fastloss.build_loss({"type": "MDFLoss", "scales": 2})
    torch.testing.assert_close(m(u, v), fastloss.MDFLoss(scales=2)(u, v))


def test_build_loss_unknown_type_or_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown type 'PDL'; valid types: D2SMLoss, FDLLoss, MDFLoss, PDLLoss, PerceptualLoss"):
        fastloss.build_loss({"type": "PDL"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['loss_weight'\] for PDLLoss; valid keys: layers, "):
        fastloss.build_loss({"type": "PDLLoss", "loss_weight": 1.0})
    with pytest.raises(ValueError, match="'type' key"):
        fastloss.build_loss({"layers": ["relu2_2"]})


@pytest.mark.parametrize("p", [1, 2])
def test_perceptual_loss_is_the_l1_l2_formula(p):
    torch.manual_seed(0)
    loss = fastloss.PerceptualLoss(layers=("relu1_2", "relu2_2"), layer_weights=(1.0, 0.5), weight=0.1, p=p,
                                   extractor_weights=None, pixel_weight=0.3)
    u, v = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    fu, fv = loss.vgg(u), loss.vgg(v)
    d = (lambda a, b: (a - b).abs().mean()) if p == 1 else (lambda a, b: ((a - b) ** 2).mean())
    want = 0.3 * (u - v).abs().mean() + 0.1 * (d(fu["relu1_2"], fv["relu1_2"]) + 0.5 * d(fu["relu2_2"], fv["relu2_2"]))
    torch.testing.assert_close(loss(u, v), want)
    with pytest.raises(ValueError, match="PerceptualLoss: restored must have 3 channels"):
        loss(torch.rand(2, 1, 16, 16), v)
