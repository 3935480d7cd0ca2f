"""D2SM's op, d2sm_kl: parity of every backend with the plain-PyTorch reference, and its contract."""
import pytest
import torch

import fastloss
from fastloss import _backend
from fastloss.d2sm.ops import _d2sm_forward
from fastloss.d2sm.reference import _kl_from_sims, d2sm_reference

from conftest import requires_cpu_ext
from helpers import (assert_compiled_matches_eager, assert_explicit_backend_cannot_run, pair_bad_inputs,
                     spy_on_resolve)

MODES = ("paper", "pkt")
# (rtol, atol) of the loss, per dtype; atol covers the float32 noise of a loss that is exactly 0
# (q = 2 in paper mode: one off-diagonal entry per row, P = Q = 1). Gradients are compared to
# rtol of their largest magnitude.
# float16 / bfloat16 are computed in float32 on both sides: the tolerance is one rounding to the
# output dtype.
TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (2e-5, 1e-6), torch.float16: (1e-3, 1e-6),
       torch.bfloat16: (8e-3, 1e-6)}


def _features(q, shape, kind="randn", dtype=torch.float32):
    x = torch.randn((q,) + shape, dtype=torch.float64)
    y = torch.randn((q,) + shape, dtype=torch.float64).relu() + 0.2 * x
    if kind == "relu":
        x = x.relu()
    elif kind == "duplicates":  # repeated samples: cosine 1 between different rows
        x[1], x[q - 2], y[q - 1] = x[0], x[0], y[0]
    elif kind == "zero_row":  # an all-zero feature row (a dead ReLU map): f_hat = 0, K = 1/2
        x, y = x.relu(), y.relu()
        x[1] = 0
        y[0] = 0
    return x.to(dtype), y.to(dtype)


SHAPES = [
    (2, (5,), "randn"),           # q = 2, the smallest set
    (3, (4,), "duplicates"),
    (37, (50,), "randn"),         # q and D not powers of two
    (16, (3, 4, 5), "relu"),      # trailing dims are flattened
    (12, (33,), "duplicates"),
    (9, (20,), "zero_row"),
    (64, (300,), "relu"),
]
IDS = [f"q{q}-{'x'.join(map(str, s))}-{k}" for q, s, k in SHAPES]


def check_parity(backend, q, shape, kind, mode, dtype):
    x, y = _features(q, shape, kind, dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fastloss.d2sm_kl(x1, y, mode=mode, backend=backend)
    ref = d2sm_reference(x2, y, mode)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape == ()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    # An upstream gradient that is not 1 and brings the largest gradient to 0.7, so that atol is
    # small next to every gradient that is not identically 0 (paper mode with q = 2 is: P = 1).
    x64 = x.double().requires_grad_()
    gmax = torch.autograd.grad(d2sm_reference(x64, y.double(), mode), x64)[0].abs().max().item()
    if gmax <= 1e-12:  # identically 0: compare the noise to gradients of unit-scale features
        g, largest = 0.7, 1.0
    elif dtype in (torch.float16, torch.bfloat16):  # 0.7 / gmax would overflow in half precision
        g, largest = 0.7, 0.7 * gmax
    else:
        g, largest = 0.7 / gmax, 0.7
    (out * g).backward()
    (ref * g).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=rtol * largest)  # rtol of the largest gradient


@requires_cpu_ext
@pytest.mark.parametrize("q,shape,kind", SHAPES, ids=IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_parity(q, shape, kind, mode, dtype):
    check_parity("cpu", q, shape, kind, mode, dtype)


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs_compute_in_float32(dtype):
    for q, shape, kind in SHAPES[:4]:
        for mode in MODES:
            check_parity("cpu", q, shape, kind, mode, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_the_formulas_written_out(mode):
    """The reference against the issue's formulas, written with loops over anchors."""
    q, eps = 6, 1e-6
    x, y = _features(q, (7,), "relu", torch.float64)
    fx = x / (x.norm(dim=1, keepdim=True) + eps)
    fy = y / (y.norm(dim=1, keepdim=True) + eps)
    kp, kt = (fx @ fx.T + 1) / 2, (fy @ fy.T + 1) / 2
    total = 0.0
    for i in range(q):
        for j in range(q):
            if mode == "pkt":
                s, t = kp[i, j] / kp[i].sum(), kt[i, j] / kt[i].sum()
                total += t * torch.log((t + eps) / (s + eps)) / q**2
            elif j != i:
                p1 = kp[i, j] / (kp[i].sum() - kp[i, i])
                p0 = kt[i, j] / (kt[i].sum() - kt[i, i])
                total += p1 * torch.log((p1 + eps) / (p0 + eps)) / q
    torch.testing.assert_close(d2sm_reference(x, y, mode), total, rtol=1e-12, atol=0)


@requires_cpu_ext
@pytest.mark.parametrize("mode", MODES)
def test_cpu_gradcheck_float64(mode):
    x, y = _features(7, (6,), "relu", torch.float64)
    x[2] = x[1]  # duplicate rows too
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: fastloss.d2sm_kl(a, y, mode=mode, backend="cpu"), (x,), eps=1e-6,
                                    atol=1e-8, rtol=1e-5)


@requires_cpu_ext
@pytest.mark.parametrize("mode", MODES)
def test_cpu_fused_op_against_autograd_of_the_similarities(mode):
    """The C++ pass on its own: grad_rows[n] = dL/dG'[b, :] + dL/dG'[:, b] for any requested rows."""
    from fastloss import _C

    q = 23
    x, y = _features(q, (9,), "duplicates", torch.float64)
    fx, fy = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    sp, st = (fx @ fx.T).requires_grad_(), fy @ fy.T
    _kl_from_sims(sp, st, mode, 1e-6).backward()
    rows = torch.tensor([5, 0, 22, 7])
    loss, grad_rows = _C.d2sm_forward(sp.detach(), st, sp.detach().sum(1), st.sum(1), rows, mode == "paper", 1e-6)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, _kl_from_sims(sp.detach(), st, mode, 1e-6), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad_rows, sp.grad[rows] + sp.grad[:, rows].T, rtol=1e-10, atol=1e-15)
    loss0, none = _C.d2sm_forward(sp.detach(), st, sp.detach().sum(1), st.sum(1), rows[:0], mode == "paper", 1e-6)
    assert none.shape == (0, q) and loss0.item() == loss.item()


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_normalization_matches_autograd_of_the_formula(dtype):
    from fastloss.d2sm.ops import _d2sm_normalize, _normalize

    f = torch.randn(6, 300, dtype=dtype).relu()
    f[2] = 0  # a zero row: f_hat = 0, and the norm's gradient is masked
    f[4] *= 1e-3
    g = torch.randn(6, 300, dtype=dtype)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    out, norms = _d2sm_normalize(a, 1e-6)
    ref = _normalize(b, 1e-6)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(norms, b.detach().double().norm(dim=1), rtol=1e-12, atol=0)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * b.grad.abs().max().item())
    torch.library.opcheck(_d2sm_normalize, (f.clone().requires_grad_(), 1e-6))


@requires_cpu_ext
def test_target_is_a_constant():
    x, y = _features(8, (5,), "relu")
    x.requires_grad_()
    y.requires_grad_()
    for backend in ("cpu", "reference"):
        fastloss.d2sm_kl(x, y, backend=backend).backward()
        assert y.grad is None and x.grad is not None


@requires_cpu_ext
def test_nan_rows_become_zero_rows():
    """A row whose normalization comes out NaN (a NaN or inf entry) counts as a zero row."""
    x, y = _features(10, (8,), "relu")
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 2] = bad
        xz = x.clone()
        xz[3] = 0
        for backend in ("cpu", "reference"):
            for mode in MODES:
                out = fastloss.d2sm_kl(xb, y, mode=mode, backend=backend)
                assert torch.isfinite(out)
                torch.testing.assert_close(out, d2sm_reference(xz, y, mode), rtol=2e-5, atol=1e-7)


@requires_cpu_ext
def test_no_grad_and_detached_inputs():
    x, y = _features(11, (6,), "relu")
    with torch.no_grad():
        a = fastloss.d2sm_kl(x.requires_grad_(), y, backend="cpu")
    b = fastloss.d2sm_kl(x.detach(), y, backend="cpu")
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, d2sm_reference(x.detach(), y), rtol=2e-5, atol=1e-7)


@requires_cpu_ext
def test_opcheck():
    x, y = _features(9, (5,), "relu")
    fx, fy = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    for mode in MODES:
        dots_p, dots_t = (fx @ fx.T).sum(1, dtype=torch.float64), (fy @ fy.T).sum(1, dtype=torch.float64)
        args = (fx.clone().requires_grad_(), fx.clone(), fx @ fx.T, fy @ fy.T, dots_p, dots_t, torch.arange(9), mode,
                1e-6, "cpu")
        torch.library.opcheck(_d2sm_forward, args)


@requires_cpu_ext
def test_torch_compile_fullgraph_matches_eager():
    def step(a, b):
        return fastloss.d2sm_kl(a.relu(), b, mode="paper") * 3.0

    assert_compiled_matches_eager(step, torch.randn(10, 12), torch.randn(10, 12))


@requires_cpu_ext
def test_double_backward_raises_clear_error():
    x, y = _features(6, (4,), "relu")
    x.requires_grad_()
    loss = fastloss.d2sm_kl(x, y, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


# ------------------------------------------------------------------------- bad input
_x = torch.randn(4, 6)
BAD = [
    ((_x, torch.randn(4, 7)), {}, ValueError, r"pred and target shapes differ: \(4, 6\) vs \(4, 7\)"),
    ((_x, torch.randn(5, 6)), {}, ValueError, "shapes differ"),
    ((_x[:1], _x[:1]), {}, ValueError, r"needs at least 2 rows \(samples\), got pred of shape \(1, 6\)"),
    ((torch.randn(5), torch.randn(5)), {}, ValueError, "at least 2 dims"),
    ((_x, _x.long()), {}, TypeError, "target must be a floating-point tensor, got dtype torch.int64"),
    ((_x.bool(), _x.bool()), {}, TypeError, "torch.bool"),
    ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "empty"),
    ((_x, _x), {"mode": "kl"}, ValueError, r"mode must be one of \('paper', 'pkt'\), got 'kl'"),
    ((_x, _x), {"eps": -1.0}, ValueError, "eps must be a finite number >= 0, got -1.0"),
    ((_x, _x), {"eps": float("nan")}, ValueError, "eps must be"),
] + pair_bad_inputs(_x)  # and what every op refuses alike


@pytest.mark.parametrize("args,kwargs,exc,match", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_input_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastloss.d2sm_kl(*args, **kwargs)


def test_explicit_backend_that_cannot_run_says_why():
    assert_explicit_backend_cannot_run(fastloss.d2sm_kl, _x)


@requires_cpu_ext
def test_auto_picks_cpu(monkeypatch):
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    assert _backend.resolve("d2sm", "auto", torch.device("cpu"), torch.float32) == "cpu"
    calls = spy_on_resolve(monkeypatch)
    fastloss.d2sm_kl(_x, _x * 2)
    with fastloss.use_backend("reference"):
        fastloss.d2sm_kl(_x, _x * 2)
    assert calls == ["cpu", "reference"]
