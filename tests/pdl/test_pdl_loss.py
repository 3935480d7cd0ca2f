"""PDLLoss on images, against a hand-written composition of the reference pieces."""
import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss.features import VGG
from fastloss.pdl import PROJECTIONS, pdl_reference, project, projection_matrix

from conftest import requires_cpu_ext


def _by_hand(vgg, u, v, layers, layer_weights, weight, pixel_weight, matrices, p):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def feats(x):
        h, out = (x - mean) / std, {}
        names = fastloss.features.layer_names("vgg16")
        for i, name in enumerate(names[: max(names.index(n) for n in layers) + 1]):
            m = vgg.features[i]
            if name.startswith("conv"):
                h = F.conv2d(h, m.weight, m.bias, padding=1)
            elif name.startswith("relu"):
                h = F.relu(h)
            else:
                h = F.max_pool2d(h, 2, 2)
            out[name] = h
        return out

    fu, fv = feats(u), feats(v)
    loss = pixel_weight * (u - v).abs().mean()
    for name, w, m in zip(layers, layer_weights, matrices):
        pu, pv = fu[name], fv[name]
        if m is not None:
            pu, pv = torch.einsum("kc,bchw->bkhw", m, pu), torch.einsum("kc,bchw->bkhw", m, pv)
        loss = loss + weight * w * pdl_reference(pu, pv.detach(), p=p)
    return loss


@requires_cpu_ext
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_pdl_loss_matches_hand_composition(projection):
    torch.manual_seed(1)
    layers, lw = ("relu1_2", "relu2_1"), (0.7, 1.3)
    crit = fastloss.PDLLoss(layers=layers, layer_weights=lw, weight=0.5, pixel_weight=0.8, projection=projection,
                            extractor_weights=None, seed=3)
    u = torch.rand(2, 3, 20, 18, requires_grad=True)
    v = torch.rand(2, 3, 20, 18)
    matrices = [projection_matrix(projection, c, None, 3 + i) for i, c in enumerate((64, 128))]
    u2 = u.detach().clone().requires_grad_()
    out = crit(u, v)
    ref = _by_hand(crit.extractor, u2, v, layers, lw, 0.5, 0.8, matrices, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.backward()
    ref.backward()
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad for p in crit.extractor.parameters())


def test_projections_are_fixed_by_seed_and_unit_norm():
    for kind in ("rsp", "r2p", "rpp"):
        a, b = projection_matrix(kind, 16, seed=5), projection_matrix(kind, 16, seed=5)
        assert torch.equal(a, b) and not torch.equal(a, projection_matrix(kind, 16, seed=6))
        torch.testing.assert_close(a.norm(dim=1), torch.ones(16))
    assert ((projection_matrix("r2p", 10, num=7) != 0).sum(1) == 2).all()
    assert projection_matrix("rsp", 10, num=4).shape == (4, 10)
    rpp = projection_matrix("rpp", 32)
    assert (rpp.diagonal() > 0.5).all()  # close to the identity
    assert projection_matrix("id", 8) is None
    x = torch.randn(2, 8, 3, 3)
    assert project(x, None) is x


def test_pdl_loss_bad_arguments():
    with pytest.raises(ValueError, match="projection must be one of"):
        fastloss.PDLLoss(projection="pca", extractor_weights=None)
    with pytest.raises(ValueError, match="layer_weights has 1 entries for 2 layers"):
        fastloss.PDLLoss(layers=("relu1_1", "relu2_1"), layer_weights=(1.0,), extractor_weights=None)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        fastloss.PDLLoss(p=3, extractor_weights=None)
    with pytest.raises(ValueError, match="extractor must be"):
        fastloss.PDLLoss(extractor="resnet", extractor_weights=None)
    with pytest.raises(FileNotFoundError, match="weights"):
        fastloss.PDLLoss(extractor_weights="/nonexistent/vgg16.pth")
    crit = fastloss.PDLLoss(layers=("relu1_1",), extractor_weights=None)
    with pytest.raises(ValueError, match="shapes differ"):
        crit(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"restored must be \(B, 3, H, W\)"):
        crit(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="restored must be a floating-point"):
        crit(torch.ones(1, 3, 8, 8, dtype=torch.uint8), torch.rand(1, 3, 8, 8))


def test_pdl_loss_accepts_any_module_extractor():
    conv = torch.nn.Conv2d(3, 4, 3)
    crit = fastloss.PDLLoss(layers=("feat",), extractor=conv, weight=1.0, pixel_weight=0.0)
    u, v = torch.rand(2, 3, 9, 9), torch.rand(2, 3, 9, 9)
    torch.testing.assert_close(crit(u, v), pdl_reference(conv(u), conv(v)))


@requires_cpu_ext
@pytest.mark.parametrize("projection", ["id", "rsp"])
def test_bfloat16_features_go_to_the_op_as_they_are_with_the_upcast_bits(monkeypatch, projection):
    """compute_dtype=bfloat16 on the cpu backend: the fused op takes the bfloat16 feature maps
    (no float32 copies; with a projection they are upcast first), and the loss and the input
    gradient are bit for bit those of upcasting the features and running pdl in float32."""
    import importlib

    ops, loss_mod = importlib.import_module("fastloss.pdl.ops"), importlib.import_module("fastloss.pdl.loss")
    torch.manual_seed(0)
    loss = fastloss.PDLLoss(layers=("relu1_2", "relu2_2"), extractor_weights=None, compute_dtype=torch.bfloat16,
                            backend="cpu", projection=projection)
    u = torch.rand(2, 3, 20, 24, requires_grad=True)
    v = torch.rand(2, 3, 20, 24)
    seen = []
    real = ops._pdl_forward
    monkeypatch.setattr(ops, "_pdl_forward", lambda a, b, *rest: seen.append(a.dtype) or real(a, b, *rest))
    got = loss(u, v)
    (g_got,) = torch.autograd.grad(got, u)
    assert seen == [torch.bfloat16 if projection == "id" else torch.float32] * 2
    monkeypatch.setattr(loss_mod, "pdl_float32", lambda a, b, **kw: fastloss.pdl(a.float(), b.float(), **kw))
    want = loss(u, v)
    (g_want,) = torch.autograd.grad(want, u)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(g_got, g_want)
