"""MDFLoss(compute_dtype=torch.bfloat16) and MDFLoss under torch.autocast(bfloat16): the fast path's
convolutions in bfloat16 on [pred - target; target] (see ``loss._delta_forward``), against the
float32 result.

Tolerances (relative to float32, measured on the published files with both formulas, noise,
JPEG and blur distortions of the shipped seed image: loss <= 4.3e-3, gradients in norm <= 1e-2
with ``formula="paper"`` and <= 5.1e-2 with ``"published"``): the loss within 2e-2, the input
gradient in norm within 2e-2 (paper) and 6e-2 (published). The published gradient is dominated
by the tail map, which reaches the input through all five LeakyReLUs: bfloat16 moves about
2^16 times more pre-activations across a kink than float32 does, and float32's own kink noise
(2e-3 in norm, see test_mdf_loss.py) times 2^8 is that 5e-2.
"""
import os

import pytest
import torch

import fastloss
from fastloss import _backend
from fastloss.mdf import ops as L
from fastloss.mdf import train

from helpers import ROOT
from test_mdf_weights import OFFICIAL, random_set

LOSS_RTOL = 2e-2
GRAD_RTOL = {"paper": 2e-2, "published": 6e-2}
# Where ../shared/mdf-official is absent the tests run the shipped sets instead, whose Denoising set
# with the published formula measured 8.0e-2 in norm on these crops (paper formula within 2e-2): the
# same kink effect, on other weights. 1.2e-1 leaves room for another CPU family's bfloat16
# rounding; a gradient from features computed apart in bfloat16 is 3e-1 off and still fails.
GRAD_RTOL_SHIPPED = {"paper": 2e-2, "published": 1.2e-1}


def grad_rtol(weights, formula):
    """The gradient tolerance of ``weights`` (a published file's path, or a shipped set's name)."""
    return (GRAD_RTOL if str(weights).endswith(".pth") else GRAD_RTOL_SHIPPED)[formula]
requires_cpu = pytest.mark.skipif(not _backend.status("cpu")[0], reason="the cpu extension is not built")


def _sets():
    names = ["Ds_JPEG.pth", "Ds_Denoising.pth"]
    if os.path.isdir(OFFICIAL):
        return [os.path.join(OFFICIAL, n) for n in names]
    return ["jpeg", "denoise"]


def _natural(seed=0):
    img = train.load_image(os.path.join(ROOT, "fastloss", "mdf", "data", "seed.png"))
    x = torch.cat([img[:, :, :40, :36], img[:, :, 100:140, 50:86]])  # [2, 3, 40, 36]
    g = torch.Generator().manual_seed(seed)
    return x, (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _vg(crit, x, y, upstream=0.8):
    x = x.clone().requires_grad_()
    v = crit(x, y)
    v.backward(torch.tensor(upstream))
    return v.detach(), x.grad


def _norm_rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@requires_cpu
@pytest.mark.parametrize("formula", ["published", "paper"])
@pytest.mark.parametrize("weights", _sets(), ids=os.path.basename)
def test_bfloat16_within_tolerance_of_float32(weights, formula):
    # mild noise on a natural-looking image: where computing pred's and target's features apart
    # in bfloat16 and subtracting them is off by 8.6e-2 on the loss and 3e-1 on the gradient
    x, y = _natural()
    f32 = fastloss.MDFLoss(weights, backend="cpu", formula=formula)
    b16 = fastloss.MDFLoss(weights, backend="cpu", formula=formula, compute_dtype=torch.bfloat16)
    fv, fg = _vg(f32, y, x)
    v, g = _vg(b16, y, x)
    assert v.dtype == g.dtype == torch.float32
    assert not torch.equal(v, fv)  # it did run in another precision
    assert abs(v.item() / fv.item() - 1) <= LOSS_RTOL
    assert _norm_rel(g, fg) <= grad_rtol(weights, formula)


@requires_cpu
def test_bfloat16_convolutions_really_run_in_bfloat16():
    crit = fastloss.MDFLoss(random_set(), scales=3, backend="cpu", compute_dtype=torch.bfloat16)
    params, sizes = crit.params(torch.device("cpu"), torch.bfloat16, False)
    assert all(p.dtype == torch.bfloat16 for p in params)
    x, y = _natural()
    for paper in (False, True):
        loss, saved = L.mdf_forward(x, y, params, sizes, 0.2, True, True, "cpu", paper)
        torch.library.opcheck(L.mdf_forward, (x, y, params, sizes, 0.2, True, True, "cpu", paper),
                              test_utils=("test_schema", "test_faketensor"))
        assert loss.dtype == torch.float32
        assert [t.dtype for t in saved if t.dtype != torch.bool] == [torch.bfloat16] * (2 + (9 if paper else 6) - 1)
        assert all(m.shape[0] == 4 for m in saved if m.dtype == torch.bool)  # target_grad: masks of both halves


@requires_cpu
@pytest.mark.parametrize("formula", ["published", "paper"])
def test_autocast_bfloat16_is_compute_dtype_bfloat16(formula):
    w = random_set(widths=(4, 6, 4), seed=2)
    crit = fastloss.MDFLoss(w, scales=3, backend="cpu", formula=formula)
    b16 = fastloss.MDFLoss(w, scales=3, backend="cpu", formula=formula, compute_dtype=torch.bfloat16)
    x, y = _natural(1)
    yt = y.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = crit(xs, yt)
    v.backward()
    xb, ytb = x.clone().requires_grad_(), y.clone().requires_grad_()
    vb = b16(xb, ytb)
    vb.backward()
    assert v.dtype == torch.float32 and xs.grad.dtype == yt.grad.dtype == torch.float32
    assert torch.equal(v, vb) and torch.equal(xs.grad, xb.grad) and torch.equal(yt.grad, ytb.grad)
    fv, _ = _vg(crit, x, y, upstream=1.0)
    assert not torch.equal(v, fv) and abs(v.item() / fv.item() - 1) <= LOSS_RTOL
    # float64 inputs: autocast leaves them alone, and so does MDFLoss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v64 = crit(x.double(), y.double())
    assert v64.dtype == torch.float64 and torch.equal(v64, crit(x.double(), y.double()))


@pytest.mark.skipif(not _backend.status("triton")[0], reason="triton cannot run here")
def test_bfloat16_on_triton(monkeypatch):
    from fastloss.kernels import mdf as triton_mdf

    monkeypatch.setattr(triton_mdf, "TRITON_BLOCK", 4096)
    w = random_set(widths=(4, 6), seed=4)
    x, y = _natural(2)
    x, y = x[:1, :, :14, :15], y[:1, :, :14, :15]
    for formula in ("published", "paper"):
        f32 = fastloss.MDFLoss(w, scales=2, backend="triton", formula=formula)
        b16 = fastloss.MDFLoss(w, scales=2, backend="triton", formula=formula, compute_dtype=torch.bfloat16)
        fv, fg = _vg(f32, y, x)
        v, g = _vg(b16, y, x)
        assert v.dtype == torch.float32 and not torch.equal(v, fv)
        assert abs(v.item() / fv.item() - 1) <= LOSS_RTOL and _norm_rel(g, fg) <= GRAD_RTOL[formula]


def test_bfloat16_reference_runs_under_autocast():
    w = random_set(widths=(4, 6), seed=4)
    x, y = _natural(3)
    ref = fastloss.MDFLoss(w, scales=2, backend="reference")
    v = fastloss.MDFLoss(w, scales=2, backend="reference", compute_dtype=torch.bfloat16)(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        va = ref(x, y)
    assert torch.equal(v, va) and not torch.equal(v, ref(x, y))


def test_bad_compute_dtype():
    with pytest.raises(ValueError, match="MDFLoss: compute_dtype must be None or torch.bfloat16, got torch.float16"):
        fastloss.MDFLoss(random_set(), scales=2, compute_dtype=torch.float16)


@requires_cpu
def test_cpu_leaky_relu_backward_bfloat16_keeps_the_slope_in_float32():
    from fastloss import _ext

    g = torch.randn(2, 5, 7, 9).bfloat16().contiguous(memory_format=torch.channels_last)
    m = (torch.randn(2, 5, 7, 9) > 0).contiguous(memory_format=torch.channels_last)
    slope = 0.2  # bf16(0.2) = 0.2001953125: a factor rounded to bfloat16 would be 0.1% off
    out = g.clone()
    _ext.load("_C")[0].mdf_leaky_relu_backward_(out, m, slope)
    assert torch.equal(out, torch.where(m, g.float(), g.float() * slope).bfloat16())
