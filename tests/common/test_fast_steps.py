"""The perceptual term at the hardware's speed, kept right: the backbone's compute dtype and layout
(fastloss.features.VGG, PDLLoss / D2SMLoss / PerceptualLoss ``compute_dtype``), and
fastloss.combine() (one backbone pass for several criteria)."""
import math

import pytest
import torch
import torch.nn as nn

import fastloss
from fastloss.features import VGG

LOSSES = {
    "PDLLoss": lambda **kw: fastloss.PDLLoss(layers=("relu2_2", "relu3_3"), extractor_weights=None, **kw),
    "PerceptualLoss": lambda **kw: fastloss.PerceptualLoss(layers=("relu2_2", "relu3_3"), extractor_weights=None, **kw),
    "D2SMLoss": lambda **kw: fastloss.D2SMLoss(extractor="vgg16", layer="relu3_3", extractor_weights=None,
                                               queue_size=16, **kw),
    "FDLLoss": lambda **kw: fastloss.FDLLoss(layers=("relu2_2", "relu3_4"), num_proj=8, extractor_weights=None, **kw),
}


def photos(size=64, n=3):
    """n crops of scikit-image's photographs in [0, 1], (n, 3, size, size) float32."""
    data = pytest.importorskip("skimage.data")
    imgs = [data.astronaut(), data.coffee(), data.chelsea()][:n]
    out = [torch.from_numpy(a[:size * 2:2, :size * 2:2].copy()).permute(2, 0, 1).float() / 255 for a in imgs]
    return torch.stack(out)


def _built(name, seed=0, **kw):
    torch.manual_seed(seed)  # the same random VGG weights for every build of one loss
    return LOSSES[name](**kw)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("bad", [torch.float16, torch.float64, "bfloat16", 16])
def test_compute_dtype_other_than_none_or_bfloat16_is_refused(name, bad):
    with pytest.raises(ValueError, match=rf"{name}: compute_dtype must be None or torch.bfloat16, got "):
        LOSSES[name](compute_dtype=bad)


def test_vgg_refuses_a_bad_compute_dtype_and_layout():
    with pytest.raises(ValueError, match="VGG: compute_dtype"):
        VGG("vgg16", layers="relu1_2", compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="VGG: channels_last must be None, True or False, got 'yes'"):
        VGG("vgg16", layers="relu1_2", channels_last="yes")


# --------------------------------------------------------------------------- the backbone's dtype and layout
def test_backbone_dtype_follows_compute_dtype_and_bfloat16_autocast_only():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    vgg = VGG("vgg16", layers="relu2_2")
    assert vgg(x)["relu2_2"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vgg(x)["relu2_2"].dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):  # float16 autocast: float32 (the documented choice)
        assert vgg(x)["relu2_2"].dtype == torch.float32
    vgg_bf16 = VGG("vgg16", layers="relu2_2", compute_dtype=torch.bfloat16)
    vgg_bf16.load_state_dict(vgg.state_dict())
    assert vgg_bf16(x)["relu2_2"].dtype == torch.bfloat16


def test_channels_last_gives_the_same_features_as_nchw():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 20, 20)
    a = VGG("vgg16", layers=("relu1_2", "relu3_3"), channels_last=False)
    b = VGG("vgg16", layers=("relu1_2", "relu3_3"), channels_last=True)
    b.load_state_dict(a.state_dict())
    fa, fb = a(x), b(x)
    assert fb["relu3_3"].is_contiguous(memory_format=torch.channels_last)
    assert fa["relu3_3"].is_contiguous()
    for k in fa:  # another convolution algorithm: float32 rounding relative to the layer's magnitude
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-4, atol=1e-5 * fa[k].abs().max().item())
    assert VGG("vgg16", layers="relu1_2")(x)["relu1_2"].is_contiguous(memory_format=torch.channels_last)  # CPU default


def test_cast_weights_follow_new_parameters():
    """The bfloat16 weights are cached: loading other weights must not leave the old cast in use."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    vgg = VGG("vgg16", layers="relu1_2", compute_dtype=torch.bfloat16)
    before = vgg(x)["relu1_2"]
    other = VGG("vgg16", layers="relu1_2")  # other random weights
    vgg.load_state_dict(other.state_dict())
    after = vgg(x)["relu1_2"]
    fresh = VGG("vgg16", layers="relu1_2", compute_dtype=torch.bfloat16)
    fresh.load_state_dict(other.state_dict())
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(x)["relu1_2"])


# --------------------------------------------------------------------------- the losses stay right in bfloat16
def _hand_autocast_pdl(vgg, u, v, layers):
    """PDL as a user writes it under autocast: the VGG's torchvision-layout Sequential run module by
    module (NCHW, autocast casting each convolution to bfloat16), features upcast, torch.sort."""
    index = dict(vgg._out_index)

    def run(x):
        x = (x - vgg.mean) / vgg.std
        out = {}
        for i, module in enumerate(vgg.features):
            x = module(x)
            if i in index:
                out[index[i]] = x
        return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        fu = run(u)
        with torch.no_grad():
            fv = run(v)
    return sum(fastloss.pdl_reference(fu[k].float(), fv[k].float()) for k in layers)


@pytest.mark.parametrize("name", ["PDLLoss", "PerceptualLoss"])
@pytest.mark.parametrize("noise", [0.08, 0.02])
def test_bfloat16_loss_within_one_percent_and_gradient_as_close_as_autocast(name, noise):
    """On photographs (random VGG weights: no ImageNet file here), restored = clean + noise: the
    bfloat16 loss within 1% of float32, and the input gradient at least as close to float32's
    (cosine) as hand-written autocast gets on the same loss."""
    clean = photos()
    restored = (clean + noise * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    kw = dict(pixel_weight=0.0, weight=1.0)
    ref, fast = _built(name, **kw), _built(name, compute_dtype=torch.bfloat16, **kw)

    def run(loss):
        u = restored.clone().requires_grad_()
        value = loss(u, clean)
        value.backward()
        return value.detach(), u.grad

    v32, g32 = run(ref)
    v16, g16 = run(fast)
    assert v16.dtype == torch.float32  # the formula ran in float32
    assert abs(v16.item() - v32.item()) <= 0.01 * abs(v32.item())
    cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0).item()
    if name == "PDLLoss":  # the same loss written by hand under autocast
        vgg = ref.extractor
        u = restored.clone().requires_grad_()
        _hand_autocast_pdl(vgg, u, clean, ref.layers).backward()
        hand = torch.nn.functional.cosine_similarity(u.grad.flatten(), g32.flatten(), dim=0).item()
        assert cos >= hand - 1e-3, (cos, hand)
    assert cos > 0.9, cos


def test_d2sm_bfloat16_is_within_a_few_percent_not_one():
    """D2SM's KL compares two near-equal distributions of cosine similarities (values of 1e-5 to
    1e-8 here): bfloat16's rounding of the weights and activations moves it by percents, not by
    less than 1% (measured on these photographs: 1.3% at noise 0.08 on relu3_3; at noise 0.02
    up to 50%, on every layer tried; hand-written autocast gives the same). The README says so and
    recommends compute_dtype=None for D2SM; this bound keeps the noise-0.08 figure from growing."""
    clean = photos(n=3)
    restored = (clean + 0.08 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ref, fast = _built("D2SMLoss"), _built("D2SMLoss", compute_dtype=torch.bfloat16)
    v32, v16 = ref(restored, clean), fast(restored, clean)
    assert v16.dtype == torch.float32 and v32.item() > 0
    assert abs(v16.item() - v32.item()) <= 0.05 * abs(v32.item())


def test_float16_autocast_with_grad_scaler_gives_no_inf_or_nan():
    """Images in [0, 1] under float16 autocast and a GradScaler's scale (2**16): the loss and the
    gradient that fastloss returns are finite (the backbone runs in float32 there)."""
    clean = photos(n=2)
    restored = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    for name in sorted(LOSSES):
        loss = _built(name)
        u = restored.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            value = loss(u, clean)
        (value * 2.0 ** 16).backward()  # what GradScaler does with its initial scale
        assert math.isfinite(value.item()) and torch.isfinite(u.grad).all(), name


# --------------------------------------------------------------------------- combine
class _CountCalls:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


def _same_weights(*losses):
    base = losses[0].shared_pass().extractor
    for loss in losses[1:]:
        loss.shared_pass().extractor.load_state_dict(base.state_dict(), strict=False)


def test_combine_equals_the_sum_with_the_pixel_term_once_and_one_pass_per_extractor():
    torch.manual_seed(0)
    clean = photos(size=32, n=2)
    restored = (clean + 0.05 * torch.randn(clean.shape)).clamp(0, 1)
    perc = fastloss.PerceptualLoss(layers=("relu2_2", "relu4_3"), extractor_weights=None, pixel_weight=1.0)
    pdl = fastloss.PDLLoss(layers=("relu3_3",), extractor_weights=None, pixel_weight=1.0)
    d2sm = fastloss.D2SMLoss(extractor="vgg19", layer="relu2_2", extractor_weights=None, queue_size=8)
    _same_weights(perc, pdl)
    twin = fastloss.D2SMLoss(extractor="vgg19", layer="relu2_2", extractor_weights=None, queue_size=8)
    twin.load_state_dict(d2sm.state_dict())
    combined = fastloss.combine(perc, pdl, d2sm)
    assert len(combined.extractors) == 2  # VGG16 for PerceptualLoss + PDLLoss, VGG19 for D2SM
    counters = [_CountCalls(e) for e in combined.extractors]
    for step in range(3):  # the queue fills: D2SM's value is not 0 after the first step
        u = restored.clone().requires_grad_()
        sep = perc(u, clean) + pdl(u, clean) - pdl.pixel_weight * (u - clean).abs().mean() + twin(u, clean)
        (1.5 * sep).backward()
        g_sep, u.grad = u.grad, None
        value = combined(u, clean)
        (1.5 * value).backward()
        torch.testing.assert_close(value, sep, rtol=1e-6, atol=1e-8)
        # float32 rounding: the sums of the three losses' gradients are taken in another order
        torch.testing.assert_close(u.grad, g_sep, rtol=1e-5, atol=1e-5 * g_sep.abs().max().item())
    assert value.item() != 0
    assert [c.calls for c in counters] == [6, 6]  # once on the prediction, once on the target, per step


def test_combine_mutation_a_second_pixel_term_is_seen():
    """The equality above can fail: counting the pixel term twice breaks it."""
    torch.manual_seed(0)
    clean = photos(size=32, n=2)
    restored = (clean + 0.05 * torch.randn(clean.shape)).clamp(0, 1)
    perc = fastloss.PerceptualLoss(layers=("relu2_2",), extractor_weights=None, pixel_weight=1.0)
    pdl = fastloss.PDLLoss(layers=("relu2_2",), extractor_weights=None, pixel_weight=1.0)
    _same_weights(perc, pdl)
    combined = fastloss.combine(perc, pdl)
    assert combined(restored, clean).item() != pytest.approx((perc(restored, clean) + pdl(restored, clean)).item(),
                                                             rel=1e-6)


def test_combine_shares_only_equal_extractors_and_runs_others_alone():
    torch.manual_seed(0)
    a = fastloss.PDLLoss(layers=("relu2_2",), extractor_weights=None, pixel_weight=0.0)
    b = fastloss.PDLLoss(layers=("relu2_2",), extractor_weights=None, pixel_weight=0.0)  # other random weights
    c = fastloss.PerceptualLoss(layers=("relu2_2",), extractor_weights=None, compute_dtype=torch.bfloat16,
                                pixel_weight=0.0)
    mdf = fastloss.MDFLoss(scales=2)
    combined = fastloss.combine(a, b, c, mdf)
    assert len(combined._groups) == 3 and combined._alone == [3]
    clean = photos(size=32, n=2)
    restored = (clean + 0.05 * torch.randn(clean.shape)).clamp(0, 1)
    want = a(restored, clean) + b(restored, clean) + c(restored, clean) + mdf(restored, clean)
    torch.testing.assert_close(combined(restored, clean), want, rtol=1e-6, atol=1e-8)


def test_combine_bad_input():
    with pytest.raises(TypeError, match="needs at least one loss module, got none"):
        fastloss.combine()
    with pytest.raises(TypeError, match="argument 1 must be a loss module .* got str"):
        fastloss.combine(fastloss.PDLLoss(extractor_weights=None), "PDLLoss")
    with pytest.raises(ValueError, match="pixel terms of different weights"):
        fastloss.combine(fastloss.PDLLoss(extractor_weights=None, pixel_weight=1.0),
                         fastloss.PerceptualLoss(extractor_weights=None, pixel_weight=0.5))


def test_build_loss_takes_a_list_and_basicsr_a_combined_type():
    cfg = [{"type": "PerceptualLoss", "layers": ["relu2_2"], "extractor_weights": None},
           {"type": "PDLLoss", "layers": ["relu2_2"], "extractor_weights": None}]
    combined = fastloss.build_loss(cfg)
    assert isinstance(combined, fastloss.CombinedLoss) and len(combined.losses) == 2
    again = fastloss.build_loss({"type": "CombinedLoss", "losses": cfg})
    assert [type(m) for m in again.losses] == [fastloss.PerceptualLoss, fastloss.PDLLoss]
    with pytest.raises(ValueError, match="empty list"):
        fastloss.build_loss([])
    with pytest.raises(ValueError, match="CombinedLoss takes one key"):
        fastloss.build_loss({"type": "CombinedLoss", "losses": cfg, "weight": 2})
    from fastloss.integrations import basicsr

    adapter = basicsr.ADAPTERS["FastlossCombinedLoss"](loss_weight=2.0, losses=cfg)
    clean = photos(size=32, n=1)
    assert isinstance(adapter.loss, fastloss.CombinedLoss)
    torch.testing.assert_close(adapter(clean * 0.9, clean), 2.0 * adapter.loss(clean * 0.9, clean))


def test_combine_runs_a_shared_custom_extractor_once():
    class Tiny(nn.Module):
        def forward(self, x):
            return {"a": torch.relu(x), "b": x.mean(1, keepdim=True)}

    ext = Tiny()
    counter = _CountCalls(ext)
    p = fastloss.PDLLoss(layers=("a",), extractor=ext, pixel_weight=0.0)
    q = fastloss.PDLLoss(layers=("b",), extractor=ext, pixel_weight=0.0, p=2)
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    want = p(x, y) + q(x, y)
    counter.calls = 0
    torch.testing.assert_close(fastloss.combine(p, q)(x, y), want)
    assert counter.calls == 2


def test_bfloat16_backbone_and_combine_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the bfloat16 backbone (its weight casts inside the
    graph) and a combined loss, with the eager values."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    pdl = fastloss.PDLLoss(layers=("relu2_2",), extractor_weights=None, compute_dtype=torch.bfloat16)
    perc = fastloss.PerceptualLoss(layers=("relu2_2",), extractor_weights=None, compute_dtype=torch.bfloat16)
    pdl0 = fastloss.PDLLoss(layers=("relu1_2",), extractor_weights=None, compute_dtype=torch.bfloat16,
                            pixel_weight=0.0)
    _same_weights(perc, pdl0)
    for loss in (pdl, fastloss.combine(perc, pdl0)):
        want = loss(x, y)
        got = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, y)
        torch.testing.assert_close(got, want)
