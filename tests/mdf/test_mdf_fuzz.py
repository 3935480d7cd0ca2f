"""Property-based parity of every MDF backend with the reference (issue 6: robustness).

Hypothesis draws the weight set (the three shipped sets of ``MDFLoss()`` and a small random set of
mixed widths), ``scales`` / ``ascending`` / ``grouped``, image sizes from 11 x 11 (odd ones too),
batch sizes from 1, the memory layout of pred and of target independently (contiguous,
channels_last, strided slices, transposed, a batch broadcast with stride 0), dtypes, value ranges
(images in [0, 1], large, tiny, negative, constant, pred == target, nearly equal), which inputs
require grad, and an upstream gradient that is not 1.

Every case is compared with the ``reference`` backend run in float64 on the same (rounded) input
values: the exact loss of those inputs. The value bound is relative to the loss plus a term for
the cancellation in ``F(pred) - F(target)`` (``_value_bound``); gradients are compared in norm,
relative to the reference gradient, because float32 (and lower) pre-activations within rounding of
0 can land on either side of a LeakyReLU kink (see tests/mdf/test_mdf_loss.py's docstring).

The CI budget is fixed and derandomized; ``pytest -m slow tests/mdf/test_mdf_fuzz.py`` runs a much
larger one. A failing draw becomes a plain regression test at the bottom of this file.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastloss
from fastloss import _backend
from fastloss.mdf import discriminator_features

from conftest import requires_cpu_ext
from test_mdf_weights import random_set

# value: |v - exact| <= VALUE_RTOL * (|exact| + sqrt(|exact| * E)), E the feature energy (_energy)
VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# gradients: ||g - g_exact|| <= GRAD_NORM_RTOL * ||g_exact|| (+ the same cancellation term, scaled).
# float32: one pre-activation within rounding of 0 moves the gradient of its whole receptive field, a
# large part of an image 11 to 48 pixels a side: the float32 reference itself was 3.1e-3 off the exact
# gradient on a drawn (2, 3, 22, 11) case (test_float32_reference_gradient_moves_at_the_kinks_on_small_images),
# so the bound is 1e-2 here, against 2e-3 on tests/mdf/test_mdf_loss.py's fixed cases
# float16 / bfloat16 (Triton computes the convolutions in them): see check() for the smallest images
GRAD_NORM_RTOL = {torch.float64: 1e-9, torch.float32: 1e-2, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}
HALF_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = [torch.float32, torch.float64]
TRITON_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SETS = ("denoise", "jpeg", "sisr", "random")
_LOADED = {}

CI = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed", "broadcast"]
VALUES = ["unit", "large", "tiny", "signed", "constant", "equal", "near"]


def weight_set(name):
    if name not in _LOADED:
        # "random": four discriminators of two widths, so grouped runs have two units of two
        _LOADED[name] = random_set(widths=(4, 6, 4, 6), seed=11) if name == "random" else fastloss.mdf.load(name)
    return _LOADED[name]


@st.composite
def cases(draw, dtypes, max_hw=26, max_batch=3, max_scales=8):
    name = draw(st.sampled_from(SETS))
    n = len(weight_set(name))
    return dict(
        weights=name, scales=draw(st.integers(1, min(n, max_scales))), ascending=draw(st.booleans()),
        grouped=draw(st.sampled_from([None, False, True])), dtype=draw(st.sampled_from(dtypes)),
        shape=(draw(st.integers(1, max_batch)), 3, draw(st.integers(11, max_hw)), draw(st.integers(11, max_hw))),
        pred_layout=draw(st.sampled_from(LAYOUTS)), target_layout=draw(st.sampled_from(LAYOUTS)),
        values=draw(st.sampled_from(VALUES)), grads=draw(st.sampled_from(["pred", "target", "both"])),
        upstream=draw(st.sampled_from([0.37, -2.5, 1e3])), seed=draw(st.integers(0, 2**31 - 1)))


def make_values(case):
    """pred, target float64 [B, 3, H, W] for the case's value range, already rounded to its dtype."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, kind = case["shape"], case["values"]
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    if kind == "large":
        x, y = x * 300, y * 300
    elif kind == "tiny":
        x, y = x * 1e-3, y * 1e-3
    elif kind == "signed":
        x, y = 2 * x - 1, 2 * y - 1
    elif kind == "constant":
        x = torch.full_like(x, 0.5)
    elif kind == "equal":
        y = x.clone()
    elif kind == "near":
        y = x + 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64)
    dt = case["dtype"]
    return x.to(dt).double(), y.to(dt).double()


def leaf_and_view(v, layout, dtype, requires_grad):
    """(leaf, input): the input shows ``v`` in ``layout``; it is a view of (or is) the leaf."""
    B, C, H, W = v.shape
    if layout == "contiguous":
        leaf = v.to(dtype).clone()
        make = lambda t: t  # noqa: E731
    elif layout == "channels_last":
        leaf = v.to(dtype).contiguous(memory_format=torch.channels_last)
        make = lambda t: t  # noqa: E731
    elif layout == "sliced":  # every other channel and column of a bigger tensor, at an offset
        leaf = torch.zeros(B, 2 * C, H, 2 * W + 1, dtype=dtype)
        leaf[:, 1::2, :, 1::2] = v.to(dtype)
        make = lambda t: t[:, 1::2, :, 1::2]  # noqa: E731
    elif layout == "transposed":
        leaf = v.transpose(2, 3).to(dtype).contiguous()
        make = lambda t: t.transpose(2, 3)  # noqa: E731
    elif layout == "broadcast":  # one sample seen B times (stride 0): its gradient is the sum over the batch
        leaf = v[:1].to(dtype).clone()
        make = lambda t: t.expand(B, C, H, W)  # noqa: E731
    else:
        raise AssertionError(layout)
    leaf.requires_grad_(requires_grad)
    out = make(leaf)
    assert out.shape == v.shape
    return leaf, out


def _energy(crit, x):
    """E = sum over the selected features of mean F(x)^2 (float64 reference): the scale of the
    feature values whose rounding the loss and its gradient inherit."""
    e = 0.0
    with torch.no_grad():
        for d in crit.reference_discriminators(x.device, torch.float64):
            for f in discriminator_features(d, x.double(), crit.weights.eps, crit.weights.negative_slope):
                e += f.square().mean().item()
    return e


def _value_bound(exact, energy, dtype):
    """|F(pred) - F(target)| carries ~VALUE_RTOL * |F| of rounding: it moves the loss by ~2 sqrt(loss)
    times that, and makes a loss of 0 (pred == target) up to its square."""
    r = VALUE_RTOL[dtype]
    return r * (abs(exact) + math.sqrt(abs(exact) * energy)) + r * r * energy


def check(case, backend):
    dtype = case["dtype"]
    xv, yv = make_values(case)
    equal = case["values"] == "equal"
    broadcast = (case["pred_layout"] == "broadcast", case["target_layout"] == "broadcast")
    if broadcast[0] or (equal and broadcast[1]):
        xv = xv[:1].expand_as(xv).clone()
    if broadcast[1] or (equal and broadcast[0]):
        yv = yv[:1].expand_as(yv).clone()
    pred_grad, target_grad = case["grads"] in ("pred", "both"), case["grads"] in ("target", "both")
    w = weight_set(case["weights"])
    kw = dict(scales=case["scales"], ascending=case["ascending"])
    crit = fastloss.MDFLoss(w, backend=backend, grouped=case["grouped"], **kw)
    ref = fastloss.MDFLoss(w, backend="reference", **kw)

    xl, x = leaf_and_view(xv, case["pred_layout"], dtype, pred_grad)
    yl, y = leaf_and_view(yv, case["target_layout"], dtype, target_grad)
    assert torch.equal(x.double(), xv) and torch.equal(y.double(), yv)
    out = crit(x, y)
    assert out.dtype == dtype and out.shape == ()
    rxl, rx = leaf_and_view(xv, case["pred_layout"], torch.float64, pred_grad)
    ryl, ry = leaf_and_view(yv, case["target_layout"], torch.float64, target_grad)
    exact = ref(rx, ry)

    if exact.item() > torch.finfo(dtype).max:  # the loss itself is out of the dtype's range
        assert out.item() == float("inf")
        return
    energy = _energy(ref, xv) + _energy(ref, yv)
    assert torch.isfinite(out)
    err = abs(out.double().item() - exact.item())
    assert err <= _value_bound(exact.item(), energy, dtype), (out.item(), exact.item(), err, energy)

    upstream = torch.tensor(case["upstream"], dtype=torch.float64)
    out.backward(upstream.to(dtype))
    exact.backward(upstream)
    for what, leaf, rleaf, needed in (("pred", xl, rxl, pred_grad), ("target", yl, ryl, target_grad)):
        if not needed:
            assert leaf.grad is None
            continue
        got, want = leaf.grad, rleaf.grad
        assert got is not None and got.shape == leaf.shape and got.dtype == dtype, what
        assert torch.isfinite(got).all(), what
        if equal:  # F(pred) - F(target) is rounding only; the exact gradient is 0
            assert got.double().norm().item() <= _rounding_gradient(ref, rx, ry, what, energy, upstream, dtype), what
            continue
        diff = (got.double() - want).norm().item()
        scale = want.norm().item()
        # gradient = J^T (2 w (F(pred) - F(target))): the rounding of F enters as in the value, relative
        # to the feature differences, i.e. VALUE_RTOL * sqrt(E / loss)
        rel = GRAD_NORM_RTOL[dtype] + VALUE_RTOL[dtype] * math.sqrt(energy / abs(exact.item()))
        bound = rel * scale
        if diff > bound and dtype in HALF_DTYPES:
            # float16 / bfloat16 on the smallest images: the published order of operations run in that
            # dtype can itself be off by more (bfloat16 was 1.8x the gradient's norm, on a drawn case:
            # test_half_gradients_on_the_smallest_image); the fast path may be off by 3 times as much
            own = _same_dtype_reference_grad(ref, xv, yv, case, what, upstream)
            bound = max(bound, 3 * (own - want).norm().item())
        assert diff <= bound, (what, diff / max(scale, 1e-300), rel, bound / max(scale, 1e-300))


def _same_dtype_reference_grad(ref, xv, yv, case, what, upstream):
    """The reference backend's gradient of ``what`` computed in the case's dtype (float64 result)."""
    dtype = case["dtype"]
    xl, x = leaf_and_view(xv, case["pred_layout"], dtype, what == "pred")
    yl, y = leaf_and_view(yv, case["target_layout"], dtype, what == "target")
    ref(x, y).backward(upstream.to(dtype))
    return (xl if what == "pred" else yl).grad.double()


def _rounding_gradient(ref, rx, ry, what, energy, upstream, dtype):
    """How large a gradient rounding alone makes when pred == target: the gradient is linear in the
    feature differences, so scale the exact gradient for a visible difference (target + 0.1 noise) by
    the ratio of the rounding, VALUE_RTOL * sqrt(E), to those differences, sqrt(loss)."""
    g = torch.Generator().manual_seed(2)
    x = rx.detach().clone().requires_grad_(what == "pred")
    y = (ry.detach() + 0.1 * torch.randn(ry.shape, generator=g, dtype=torch.float64)).requires_grad_(what == "target")
    loss = ref(x, y)
    loss.backward(upstream)
    grad = (x if what == "pred" else y).grad
    return VALUE_RTOL[dtype] * math.sqrt(energy / loss.item()) * grad.norm().item()


@requires_cpu_ext
@CI
@given(cases(CPU_DTYPES))
def test_fuzz_cpu(case):
    check(case, "cpu")


def _triton_block(block):
    from fastloss.kernels import mdf as triton_mdf

    old = triton_mdf.TRITON_BLOCK
    triton_mdf.TRITON_BLOCK = block
    return old


@pytest.mark.skipif(not _backend.status("triton")[0], reason="triton unavailable (needs TRITON_INTERPRET=1 on CPU)")
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cases(TRITON_DTYPES, max_hw=13, max_batch=2, max_scales=2), st.sampled_from([128, 1024]))
def test_fuzz_triton_interpreter(case, block):
    old = _triton_block(block)  # small blocks: several programs per tensor, and chunk boundaries
    try:
        check(case, "triton")
    finally:
        _triton_block(old)


@pytest.mark.slow
@requires_cpu_ext
@SLOW
@given(cases(CPU_DTYPES, max_hw=48, max_batch=4))
def test_fuzz_cpu_slow(case):
    check(case, "cpu")


@pytest.mark.slow
@pytest.mark.skipif(not _backend.status("triton")[0], reason="triton unavailable (needs TRITON_INTERPRET=1 on CPU)")
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases(TRITON_DTYPES, max_hw=18, max_batch=2, max_scales=3), st.sampled_from([32, 64, 256, 1024]))
def test_fuzz_triton_interpreter_slow(case, block):
    old = _triton_block(block)
    try:
        check(case, "triton")
    finally:
        _triton_block(old)


# ----------------------------------------------------------------------------- regressions (failing draws)
def _equal_images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@requires_cpu_ext
def test_equal_inputs_float64_give_a_loss_within_rounding_of_zero():
    # Draw: denoise, scales=1, ascending=False, float64, (1, 3, 11, 11), pred == target. The fast path
    # runs pred and target as one batch of 2 and the float64 convolution does not round both samples
    # alike, so the loss was 5.2e-31 and the gradient norm 1.1e-15, not 0: within rounding of 0.
    x = _equal_images((1, 3, 11, 11))
    crit = fastloss.MDFLoss("denoise", scales=1, ascending=False, backend="cpu")
    a = x.clone().requires_grad_()
    loss = crit(a, x.clone())
    loss.backward()
    energy = _energy(crit, x)
    assert 0 <= loss.item() <= VALUE_RTOL[torch.float64] ** 2 * energy
    assert a.grad.norm().item() <= 1e-12


def test_reference_in_two_layouts_is_within_rounding_of_zero_on_equal_inputs():
    # Draw: the same images as pred (contiguous) and target (channels_last), float64: the reference
    # itself rounds the two layouts differently (1.7e-30), so "equal" is checked within rounding.
    x = _equal_images((1, 3, 11, 11))
    crit = fastloss.MDFLoss("denoise", scales=1, ascending=False, backend="reference")
    loss = crit(x, x.contiguous(memory_format=torch.channels_last))
    assert 0 <= loss.item() <= VALUE_RTOL[torch.float64] ** 2 * _energy(crit, x)


@requires_cpu_ext
def test_float32_reference_gradient_moves_at_the_kinks_on_small_images():
    # Draw: denoise, scales=2, ascending=False, float32, (2, 3, 22, 11), gradient for the target only,
    # seed 16777216: the cpu backend's target gradient was 3.07e-3 (in norm) off the exact one, over
    # the 2e-3 this fuzz first used; the float32 reference in NCHW is off by the same amount, the float64
    # fast path agrees to 1e-12. That draw was on the former (procedural-seed) denoise set; seed 130 is
    # the first draw of the same kind on the retrained set (reference float32 5.6e-3 off).
    case = dict(shape=(2, 3, 22, 11), values="unit", dtype=torch.float32, seed=130)
    xv, yv = make_values(case)

    def target_grad(backend, dtype):
        crit = fastloss.MDFLoss("denoise", scales=2, ascending=False, backend=backend)
        y = yv.to(dtype).clone().requires_grad_()
        crit(xv.to(dtype), y).backward(torch.tensor(0.37, dtype=dtype))
        return y.grad.double()

    exact = target_grad("reference", torch.float64)
    rel = lambda g: ((g - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(target_grad("cpu", torch.float64)) <= 1e-12
    assert 2e-3 < rel(target_grad("reference", torch.float32)) <= GRAD_NORM_RTOL[torch.float32]
    assert rel(target_grad("cpu", torch.float32)) <= GRAD_NORM_RTOL[torch.float32]


def test_float16_loss_beyond_its_range_is_inf():
    # Draw: triton, denoise, scales=3, ascending=False, float16, (2, 3, 11, 13), images x 300: the exact
    # loss is 1.7e5, past float16's 65504, so the float16 result is inf (the float32 one is right),
    # on the auto path (the cpu backend in float32) and on triton alike.
    case = dict(shape=(2, 3, 11, 13), values="large", dtype=torch.float16, seed=0)
    xv, yv = make_values(case)
    exact = fastloss.MDFLoss("denoise", scales=3, ascending=False, backend="reference")(xv, yv).item()
    assert exact > torch.finfo(torch.float16).max
    backends = ["auto"] + (["triton"] if _backend.status("triton")[0] else [])
    for backend in backends:
        crit = fastloss.MDFLoss("denoise", scales=3, ascending=False, backend=backend)
        assert crit(xv.half(), yv.half()).item() == float("inf"), backend
        assert crit(xv.float(), yv.float()).item() == pytest.approx(exact, rel=1e-5), backend


@pytest.mark.skipif(not _backend.status("triton")[0], reason="triton unavailable (needs TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("dtype,seed", [(torch.float16, 3), (torch.bfloat16, 13)])
def test_half_gradients_on_the_smallest_image(dtype, seed):
    # Draws: triton, sisr, scales=1, (1, 3, 11, 11), images in [-1, 1], seed 4473, TRITON_BLOCK 32: the
    # pred gradient was 1.38e-1 (float16) and 1.95 (bfloat16) off the exact one in norm, past the fixed
    # bounds (0.137 and 0.79 with the cancellation term). At 11 x 11 (a 1-pixel tail map) these dtypes
    # move it that much in the published order of operations too: the reference run in float16 is
    # 5.4e-2 off, in bfloat16 1.785 (measured); the float32 paths agree to 1e-3. check() now allows
    # the fast path 3 times the error of the reference in the same dtype. Those draws were on the former
    # (procedural-seed) sisr set; seeds 3 (float16, reference 1.0e-1 off) and 13 (bfloat16, 2.5e-1) are
    # the first draws past the fixed bounds on the retrained set.
    case = dict(weights="sisr", scales=1, ascending=True, grouped=None, dtype=dtype, shape=(1, 3, 11, 11),
                pred_layout="contiguous", target_layout="contiguous", values="signed", grads="pred", upstream=0.37,
                seed=seed)
    old = _triton_block(32)
    try:
        check(case, "triton")
    finally:
        _triton_block(old)
    xv, yv = make_values(case)

    def pred_grad(backend, dt):
        x = xv.to(dt).clone().requires_grad_()
        fastloss.MDFLoss("sisr", scales=1, backend=backend)(x, yv.to(dt)).backward(torch.tensor(0.37, dtype=dt))
        return x.grad.double()

    exact = pred_grad("reference", torch.float64)
    rel = lambda g: ((g - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(pred_grad("triton", torch.float32)) <= 1e-3
    own = rel(pred_grad("reference", dtype))
    assert own > GRAD_NORM_RTOL[dtype]  # the dtype's own error, past the fixed bound
    assert rel(pred_grad("triton", dtype)) <= 3 * own
