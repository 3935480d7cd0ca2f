"""One pixel-term convention (README, "One pixel term"): every image loss takes ``pixel_weight``,
default 0 (the perceptual term alone, the pixel loss configured beside it as trainers do), which
adds ``pixel_weight * mean|u - v|`` on the images mapped to [0, 1]; ``combine`` counts it once."""
import inspect

import pytest
import torch

import fastloss

LOSSES = {
    "PDLLoss": dict(layers=("relu2_2",), extractor_weights=None),
    "PerceptualLoss": dict(layers=("relu2_2",), extractor_weights=None),
    "D2SMLoss": dict(extractor="vgg16", layer="relu2_2", extractor_weights=None, queue_size=16),
    "MDFLoss": dict(scales=2),
    "FDLLoss": dict(layers=("relu1_2", "relu2_2"), num_proj=8, extractor_weights=None),
}


def _pair(name, input_range=(0, 1), **kw):
    """Two copies of one loss (same weights), pixel_weight 0 and the given keywords."""
    torch.manual_seed(0)
    a = getattr(fastloss, name)(input_range=input_range, **LOSSES[name])
    torch.manual_seed(0)
    b = getattr(fastloss, name)(input_range=input_range, **LOSSES[name], **kw)
    if hasattr(a, "extractor") or hasattr(a, "vgg"):
        b.load_state_dict(a.state_dict())
    return a, b


def _images(input_range=(0, 1), n=4, size=32):
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(n, 3, size, size, generator=g)
    restored = (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    if input_range == (-1, 1):
        return restored * 2 - 1, clean * 2 - 1
    return restored, clean


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_defaults_to_no_pixel_term(name):
    assert inspect.signature(getattr(fastloss, name)).parameters["pixel_weight"].default == 0.0
    assert getattr(fastloss, name)(**LOSSES[name]).pixel_weight == 0.0


@pytest.mark.parametrize("input_range", [(0, 1), (-1, 1)])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_pixel_weight_adds_the_l1_of_the_unit_range_images(name, input_range):
    without, with_pixel = _pair(name, input_range, pixel_weight=0.7)
    restored, clean = _images(input_range)
    u = restored.clone().requires_grad_()
    w = restored.clone().requires_grad_()
    base = without(u, clean)  # each module's first call (D2SM's queues advance per call)
    value = with_pixel(w, clean)
    (2.5 * base).backward()
    (2.5 * value).backward()
    # the L1 on [0, 1] images, by hand: a [-1, 1] difference is twice the [0, 1] one
    scale = 0.5 if input_range == (-1, 1) else 1.0
    l1 = (restored.double() - clean.double()).abs().mean() * scale
    # the two modules compute the same perceptual term bit for bit; what differs is the float32
    # rounding of adding the pixel term to it: half an ulp of the value, given 8 ulps of margin
    torch.testing.assert_close((value - base).double(), 0.7 * l1, rtol=1e-5,
                               atol=1e-7 + 8 * 2.0 ** -24 * abs(value.item()))
    grad_l1 = torch.sign(restored - clean) * scale / restored.numel()
    # float32 rounding of the loss's own gradient, which both sides carry
    torch.testing.assert_close(w.grad - u.grad, 2.5 * 0.7 * grad_l1, rtol=1e-4,
                               atol=1e-6 * u.grad.abs().max().item() + 1e-12)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_bad_pixel_weight_is_refused_naming_the_loss(name, bad):
    with pytest.raises(ValueError, match=f"{name}: pixel_weight must be a finite number >= 0"):
        getattr(fastloss, name)(**LOSSES[name], pixel_weight=bad)


def test_combine_counts_the_pixel_term_once_when_a_loss_runs_alone():
    """MDFLoss runs on its own pass and adds its own pixel term; PDLLoss, carrying the same weight,
    must not add it again."""
    restored, clean = _images()
    pdl0, pdl1 = _pair("PDLLoss", pixel_weight=1.0)
    mdf0, mdf1 = _pair("MDFLoss", pixel_weight=1.0)
    combined = fastloss.combine(pdl1, mdf1)
    l1 = (restored - clean).abs().mean()
    want = pdl0(restored, clean) + mdf0(restored, clean) + l1
    got = combined(restored, clean)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    # and the check can fail: the separate sum counts the L1 twice
    assert abs((pdl1(restored, clean) + mdf1(restored, clean) - got).item()) == pytest.approx(l1.item(), rel=1e-4)


def test_combine_refuses_two_losses_that_each_add_their_own_pixel_term():
    with pytest.raises(ValueError, match=r"\['MDFLoss', 'MDFLoss'\] each run on their own pass"):
        fastloss.combine(fastloss.MDFLoss(scales=2, pixel_weight=1.0), fastloss.MDFLoss(scales=1, pixel_weight=1.0))
