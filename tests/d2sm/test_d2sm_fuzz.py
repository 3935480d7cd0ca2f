"""Property-based parity of every D2SM backend with the reference (issue 6: robustness).

Hypothesis draws the rows q (2 and up), the trailing feature dims (D = 1, odd and
non-power-of-two sizes, 1 to 3 trailing dims), strides (row and column slices, transposes,
channels_last), dtypes, value ranges (ReLU zeros, integer ties, identical and parallel rows,
constant rows, all-zero rows, huge, tiny and denormal magnitudes, rows of very different norms),
both modes, eps (the default, 0 and 1e-3) and upstream gradients that are not 1. The truth is
``d2sm_reference`` in float64 on the same input values: the fast backends form their row sums,
normalizers and log arguments in float64, so the float32 reference (whose own error reaches
1e-4 relative on small KLs) is not a useful yardstick. ``D2SMQueue`` is fuzzed the same way:
its cached step against a from-scratch float64 recomputation over the same set of rows.

Tolerances (LOSS_TOL, GRAD_TOL) are relative to the float64 value, plus the draw's own
conditioning: how much the float64 loss and gradient move when the similarities move by a few
roundoffs of the compute dtype (noise_floor). That term is negligible except where rows are
nearly anti-parallel (K ~ 0, where the logs amplify a change of K by 1 / eps): float32 inputs
cannot do better there, whatever the implementation. Draws that are singular at the compute
precision (a row anti-parallel to every other row in paper mode, whose normalizer is 0 once the
normalized entries round to +-1; or similarities so close to -1 that a few roundoffs make the
float64 loss NaN) are only checked to run: any float32 result there is rounding noise (see
singular). They are rare outside D = 1 and constant rows of mixed signs. With eps = 0 the draws
use nonnegative features: anti-parallel rows would make K exactly 0 and a log infinite, and
rounding would decide between inf and a large finite number.

The CI budget is fixed and derandomized; ``pytest -m slow tests/d2sm/test_d2sm_fuzz.py`` runs a much
larger one. A failing draw becomes a plain regression test at the bottom of this file.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastloss
from fastloss import _backend
from fastloss.d2sm.reference import _kl_from_sims, _normalize, d2sm_reference

from conftest import requires_cpu_ext

# (rtol, atol) of the loss against the float64 reference on the same values. The atol is the
# float32 noise of a loss that is 0 (P = Q everywhere); float16 / bfloat16 are computed in float32
# and the rtol is one rounding to the output dtype.
LOSS_TOL = {torch.float64: (1e-9, 1e-13), torch.float32: (2e-5, 1e-6), torch.float16: (1e-3, 1e-6),
            torch.bfloat16: (8e-3, 1e-6)}
# Gradients: relative to the largest magnitude of the float64 gradient (or, when that is ~0, of the
# gradient scale |g| / (||f_i|| + eps) times 1e-2, see grad_scale).
GRAD_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
HUGE = {torch.float64: 1e200, torch.float32: 1e30, torch.float16: 3e3, torch.bfloat16: 1e30}
TINY = {torch.float64: 1e-200, torch.float32: 1e-30, torch.float16: 1e-4, torch.bfloat16: 1e-30}
DENORMAL = {torch.float64: 1e-310, torch.float32: 1e-40, torch.float16: 1e-6, torch.bfloat16: 1e-40}
VALUES = ("normal", "relu", "ties", "identical_rows", "parallel_rows", "constant_rows", "zero_rows", "huge",
          "tiny", "denormal", "row_scales")
CI = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))

triton_ok = pytest.mark.skipif(not _backend.status("triton")[0],
                               reason="triton unavailable (needs TRITON_INTERPRET=1 on CPU)")


@st.composite
def cases(draw, max_q=12, max_d=64):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    q = draw(st.integers(2, max_q))
    ndim = draw(st.integers(1, 3))
    trailing = [draw(st.sampled_from([1, 2, 3, 5, 7, 12, 33, 50])) for _ in range(ndim)]
    while math.prod(trailing) > max_d:
        trailing[trailing.index(max(trailing))] //= 2
    layouts = ["contiguous", "sliced", "rows_sliced", "transposed"] + (["channels_last"] if ndim == 3 else [])
    return dict(dtype=dtype, shape=(q, *trailing), layout=draw(st.sampled_from(layouts)),
                values=draw(st.sampled_from(VALUES)), mode=draw(st.sampled_from(["paper", "pkt"])),
                eps=draw(st.sampled_from([1e-6, 1e-6, 0.0, 1e-3])),
                upstream=draw(st.sampled_from([0.7, -1.3, 2.5, 1e-3])),
                target_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def values(kind, shape, dtype, g):
    """(x, y) float64 of `shape` with the value pattern `kind` (then rounded to dtype by the caller)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64).relu() + 0.3 * x
    q = shape[0]
    if kind == "relu":
        x = x.relu()
    elif kind == "ties":  # small integers: equal entries, equal and opposite rows
        x, y = (x * 1.5).round(), (y * 1.5).round()
    elif kind == "identical_rows":  # every pred row the same: K' is all ones
        x = x[:1].expand_as(x).clone()
    elif kind == "parallel_rows":  # positive multiples of one row, and one row shared by both sides
        x = x[:1] * torch.rand((q,) + (1,) * (len(shape) - 1), generator=g, dtype=torch.float64).add(0.1)
        y[0] = x[0]
    elif kind == "constant_rows":  # every entry of a row equal (all rows parallel or anti-parallel)
        x = torch.randn((q,) + (1,) * (len(shape) - 1), generator=g, dtype=torch.float64).expand(shape).clone()
    elif kind == "zero_rows":  # dead feature maps: f_hat = 0, K = 1/2 against every other row
        x, y = x.relu(), y.relu()
        x[torch.rand(q, generator=g) < 0.4] = 0
        y[torch.rand(q, generator=g) < 0.3] = 0
        x[0] = 0
    elif kind == "huge":
        x, y = x * HUGE[dtype], y * HUGE[dtype]
    elif kind == "tiny":
        x, y = x * TINY[dtype], y * TINY[dtype]
    elif kind == "denormal":
        x, y = x * DENORMAL[dtype], y * DENORMAL[dtype]
    elif kind == "row_scales":  # rows of norms 1e-3 to 1e3
        s = 10.0 ** torch.randint(-3, 4, (q,) + (1,) * (len(shape) - 1), generator=g).double()
        x = x * s
    return x, y


def make(case):
    """(x, y) of case["shape"] and dtype, laid out as case["layout"] says."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype, layout = case["shape"], case["dtype"], case["layout"]
    if layout == "sliced":
        full = (shape[0], shape[1] * 2, *shape[2:])
    elif layout == "rows_sliced":
        full = (shape[0] * 2, *shape[1:])
    elif layout == "transposed" and len(shape) > 2:
        full = (*shape[:-2], shape[-1], shape[-2])
    else:
        full = shape
    x, y = values(case["values"], full, dtype, g)
    if case["eps"] == 0:  # no eps: nonnegative features only (cosines >= 0; module docstring)
        x, y = x.abs(), y.abs()
    x, y = x.to(dtype), y.to(dtype)
    if layout == "sliced":
        x, y = x[:, ::2], y[:, ::2]
    elif layout == "rows_sliced":
        x, y = x[::2], y[::2]
    elif layout == "transposed" and len(shape) > 2:
        x, y = x.transpose(-1, -2), y.transpose(-1, -2)
    elif layout == "transposed":  # (q, D) rows read from a (D, q) tensor: column-major
        x, y = x.T.contiguous().T, y.T.contiguous().T
    elif layout == "channels_last":
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    assert tuple(x.shape) == tuple(shape)
    return x, y


# Unit roundoff of the arithmetic a backend computes in: float16 / bfloat16 run in float32.
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24}


def truth(x, y, mode, eps, upstream, perturb=0.0, seed=0):
    """The float64 reference's loss and dL/dx on the values of x, y, scaled by `upstream`.

    With perturb > 0 the two similarity matrices are moved by a symmetric random amount of up to
    perturb (absolute) before the KL: how much that moves the loss and the gradient is the
    conditioning of this draw, the change that a rounding of the similarities in the backend's
    own dtype can cause (see noise_floor)."""
    x64 = x.detach().double().requires_grad_()
    y64 = y.detach().double()
    if not perturb:
        loss = d2sm_reference(x64, y64, mode, eps)
    else:
        fx, fy = _normalize(x64.flatten(1), eps), _normalize(y64.flatten(1), eps)
        q = fx.shape[0]
        if seed < 0:  # every entry moved the same way (-1: down, -2: up): identical rows round alike
            d = [torch.full((q, q), perturb * (-1) ** seed, dtype=torch.float64)] * 2
        else:
            g = torch.Generator().manual_seed(seed)
            d = [(torch.rand(q, q, generator=g, dtype=torch.float64) * 2 - 1) * perturb for _ in range(2)]
        loss = _kl_from_sims(fx @ fx.T + (d[0] + d[0].T) / 2, fy @ fy.T + (d[1] + d[1].T) / 2, mode, eps)
    (grad,) = torch.autograd.grad(loss * upstream, x64)
    return loss.detach(), grad


def noise_floor(x, y, mode, eps, upstream, dtype, ref):
    """(loss, gradient) changes of the float64 reference when the similarities move by a few units
    of roundoff of the compute dtype (sqrt(D) / 2 of them: a dot product's rounding grows with D),
    the largest change over two random perturbations and two that move every entry alike (rows
    that are equal or opposite, such as constant rows, round alike and their errors add up);
    finite parts only; and whether one of these perturbations made a finite loss or gradient
    non-finite (see singular).
    Where entries of K are near 0 (anti-parallel rows) the KL's logs amplify such a change by
    1 / eps: that is the input's conditioning, not an error of the backend."""
    worst_l, worst_g, unstable = 0.0, torch.zeros_like(ref[1]), False
    d = math.prod(x.shape[1:])
    for seed in (1, 2, -1, -2):
        loss, grad = truth(x, y, mode, eps, upstream, perturb=4 * UNIT[dtype] * max(1.0, d**0.5 / 2), seed=seed)
        dl = (loss - ref[0]).abs()
        if torch.isfinite(dl):
            worst_l = max(worst_l, dl.item())
        dg = (grad - ref[1]).abs()
        worst_g = torch.maximum(worst_g, torch.where(torch.isfinite(dg), dg, torch.zeros_like(dg)))
        unstable |= bool(torch.isfinite(ref[0]) and not torch.isfinite(loss))
        unstable |= bool((torch.isfinite(ref[1]) & ~torch.isfinite(grad)).any())
    # The row normalizers R_i = (q + sum_k G_ik) / 2 (- K_ii in paper mode) are formed in float64
    # from the row sums: an absolute error of ~q float64 roundoffs, which moves row i's KL by
    # q u / R_i. And the probabilities P = K / R carry one roundoff of the compute dtype, which
    # the gradient with respect to the similarities, (scale a_ij - c_i) / (2 R_i), divides by R_i
    # again: through the row normalization, row i's gradient moves by up to
    # u |upstream| (1 / R_i + max_j 1 / R_j) / (||f_i|| + eps). Both negligible unless a row is
    # nearly anti-parallel to every other (R_i << 1; q = 2 in paper mode, where the loss and its
    # gradient are identically 0, shows nothing but this noise).
    for f in (x, y):
        f64 = f.detach().double().flatten(1)
        f_hat = _normalize(f64, eps)
        k = (f_hat @ f_hat.T + 1) / 2
        r = k.sum(1) - (k.diagonal() if mode == "paper" else 0)
        worst_l += UNIT[torch.float64] * (1 / r[r > 0]).sum().item()
        if f is x and (r > 0).all():
            top = f64.abs().amax(1, keepdim=True)
            norms = torch.linalg.vector_norm(f64 / torch.where(top > 0, top, torch.ones_like(top)), dim=1) * top[:, 0]
            row = 4 * UNIT[dtype] * abs(upstream) * (1 / r + (1 / r).max()) / (norms + eps)
            # The normalization's backward, g / (n + eps) - (g . f_hat) f_hat n / (n + eps)^2 for
            # g = dL/df_hat, cancels where f_hat is (nearly) the only direction of g, leaving one
            # roundoff of ||g|| / (n + eps): large where g is (P ~ 0 gives dL/df_hat ~ 1 / eps on
            # anti-parallel rows) though the true gradient is ~0 (D = 1: f_hat = sign(f)).
            fh = f_hat.detach().requires_grad_()
            y_hat = _normalize(y.detach().double().flatten(1), eps)
            (g_hat,) = torch.autograd.grad(_kl_from_sims(fh @ fh.T, y_hat @ y_hat.T, mode, eps) * upstream, fh)
            row = row + 4 * UNIT[dtype] * torch.linalg.vector_norm(g_hat, dim=1) / (norms + eps)
            row = torch.where(torch.isfinite(row), row, torch.zeros_like(row))
            worst_g = worst_g + row.view((-1,) + (1,) * (worst_g.dim() - 1))
    return worst_l, worst_g, unstable


def grad_scale(x, eps, upstream):
    """|upstream| / (||f_i|| + eps) of the row with the smallest norm: the gradient magnitude that
    float noise is measured against when the gradient itself is ~0 (q = 2 in paper mode is
    identically 0). Zero rows are left out when eps = 0 (their gradient is not defined)."""
    f = x.detach().double().flatten(1)
    m = f.abs().amax(1, keepdim=True)
    norms = torch.linalg.vector_norm(f / torch.where(m > 0, m, torch.ones_like(m)), dim=1) * m[:, 0]
    den = norms + eps
    den = den[den > 0]
    return abs(upstream) / den.min().item() if den.numel() else 0.0


def singular(x, y, mode, eps, dtype):
    """Whether a row normalizer of paper mode, sum_{k != i} K_ik, is within rounding of 0 in the
    compute dtype: a row anti-parallel to every other row (D = 1, or rows that are constant),
    where p_i(j) is 0 / 0 once the normalized rows round to exactly +-1. The float64 reference
    still sees eps's tiny departure from unit norm there (1e-7 for rows of norm 10, below
    float32's resolution): no float32 computation can follow it, and such draws (like those that
    noise_floor finds unstable: a few roundoffs of the similarities make the float64 loss or
    gradient NaN) are only checked to run and to return the right dtype and shape."""
    if mode != "paper":
        return False  # pkt's normalizers include the diagonal, K_ii ~ 1
    for f in (x, y):
        f_hat = _normalize(f.detach().double().flatten(1), eps)
        k = (f_hat @ f_hat.T + 1) / 2
        r = k.sum(1) - k.diagonal()
        if (r < 16 * f.shape[0] * UNIT[dtype]).any():
            return True
    return False


def close_loss(out, ref, dtype, floor, what):
    rtol, atol = LOSS_TOL[dtype]
    a, b = out.double().item(), ref.item()
    if not math.isfinite(b):
        assert a == b or (math.isnan(a) and math.isnan(b)), f"{what}: {a} where the reference is {b}"
        return
    assert math.isfinite(a), f"{what}: non-finite {a} where the reference is {b}"
    tol = rtol * abs(b) + atol + 8 * floor
    assert abs(a - b) <= tol, f"{what}: {a!r} vs {b!r} (error {abs(a - b):.3g} > {tol:.3g})"


def close_grad(a, b, dtype, floor, small, what):
    """a vs b entry by entry: GRAD_TOL of the largest magnitude of b (or of `small` when b is ~0)
    plus 8 times the draw's conditioning (the largest entry of `floor`, from noise_floor: the
    perturbations there show the size of rounding's effect, not which entries it hits) plus half
    the spacing of the dtype's subnormals (a gradient of 1e-6 is a float16 subnormal). A gradient
    too large for the dtype must come out infinite with its sign (1 / eps on a zero row overflows
    float16)."""
    a, b = a.double(), b.double()
    info = torch.finfo(dtype)
    over = torch.isfinite(b) & (b.abs() > info.max)
    assert torch.equal(a[over], b[over].sign() * math.inf) or torch.all(a[over].abs() >= info.max), \
        f"{what}: entries beyond the {dtype} range should be infinite"
    finite = torch.isfinite(b) & ~over
    assert torch.equal(torch.isfinite(a)[~over], finite[~over]), f"{what}: non-finite entries differ"
    if finite.any():
        scale = max(b[finite].abs().max().item(), 1e-2 * small)
        tol = GRAD_TOL[dtype] * scale + 8 * floor.max().item() + info.smallest_normal * info.eps / 2
        err = (a[finite] - b[finite]).abs()
        assert (err <= tol).all(), (f"{what}: error {err.max().item():.3g} > {tol:.3g} "
                                    f"(largest {b[finite].abs().max().item():.3g})")


def compare(out, grad, xs, ys, rows, mode, eps, dtype, upstream, what=""):
    """The loss `out` and the gradient `grad` of the first `rows` rows of the set (xs, ys) against
    the float64 reference: first to the plain tolerances, and only if that fails (the floors
    cost five more float64 evaluations) with the draw's conditioning, or not at all when the draw
    is singular at the compute precision."""
    ref = truth(xs, ys, mode, eps, upstream)
    small = grad_scale(xs[:rows], eps, upstream)
    try:
        close_loss(out, ref[0], dtype, 0.0, f"{what}value")
        close_grad(grad, ref[1][:rows], dtype, torch.zeros(()), small, f"{what}pred grad")
    except AssertionError:
        floor_l, floor_g, unstable = noise_floor(xs, ys, mode, eps, upstream, dtype, ref)
        if unstable or singular(xs, ys, mode, eps, dtype):
            return
        close_loss(out, ref[0], dtype, floor_l, f"{what}value")
        close_grad(grad, ref[1][:rows], dtype, floor_g[:rows], small, f"{what}pred grad")


def check(case, backend):
    x, y = make(case)
    mode, eps, dtype, upstream = case["mode"], case["eps"], case["dtype"], case["upstream"]
    x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_(case["target_grad"])
    out = fastloss.d2sm_kl(x1, y1, mode=mode, eps=eps, backend=backend)
    assert out.dtype == dtype and out.shape == ()
    out.backward(torch.tensor(upstream, dtype=dtype))
    assert y1.grad is None  # the target is a constant
    assert x1.grad.dtype == dtype and x1.grad.shape == x.shape
    compare(out, x1.grad, x, y, x.shape[0], mode, eps, dtype, upstream)


@requires_cpu_ext
@CI
@given(cases())
def test_fuzz_cpu(case):
    check(case, "cpu")


@triton_ok
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cases(max_q=5, max_d=8))
def test_fuzz_triton_interpreter(case):
    check(case, "triton")


@pytest.mark.slow
@requires_cpu_ext
@SLOW
@given(cases(max_q=80, max_d=600))
def test_fuzz_cpu_slow(case):
    check(case, "cpu")


# ----------------------------------------------------------------------------- D2SMQueue
@st.composite
def queue_cases(draw, max_size=12, max_d=40, max_calls=5, dtypes=None):
    case = draw(cases(max_q=2, max_d=max_d))  # dtype, trailing dims, layout, values, mode, eps
    if dtypes:
        case["dtype"] = draw(st.sampled_from(dtypes))
    size = draw(st.integers(2, max_size))
    case["queue_size"] = size
    case["batches"] = draw(st.lists(st.integers(1, min(size, 5)), min_size=1, max_size=max_calls))
    return case


def check_queue(case, backend):
    """Each call of a D2SMQueue against the float64 reference over the set the README defines (the
    batch and the queue_size - B most recent earlier rows), recomputed from scratch."""
    dtype, mode, eps, size = case["dtype"], case["mode"], case["eps"], case["queue_size"]
    queue = fastloss.D2SMQueue(size, mode=mode, eps=eps, backend=backend)
    past_x, past_y = [], []  # every row seen, in order, as given
    for call, b in enumerate(case["batches"]):
        x, y = make(dict(case, shape=(b, *case["shape"][1:]), seed=case["seed"] + call))
        upstream = case["upstream"] * (1 + call)
        x1 = x.clone().requires_grad_()
        out = queue(x1, y)
        assert out.dtype == dtype and out.shape == ()
        out.backward(torch.tensor(upstream, dtype=dtype))
        keep = min(size - b, len(past_x))
        hx, hy = past_x[len(past_x) - keep:], past_y[len(past_y) - keep:]
        past_x += list(x.detach().flatten(1).split(1))
        past_y += list(y.detach().flatten(1).split(1))
        assert queue.filled == min(len(past_x), size)
        q = b + len(hx)
        if q < 2:  # a set of one row: 0, with a graph
            assert out.item() == 0 and torch.equal(x1.grad, torch.zeros_like(x1.grad))
            continue
        xs = torch.cat([x.flatten(1)] + hx)  # the set: this batch first (the KL does not depend on order)
        ys = torch.cat([y.flatten(1)] + hy)
        compare(out, x1.grad.flatten(1), xs, ys, b, mode, eps, dtype, upstream, f"call {call} ")


@requires_cpu_ext
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(queue_cases())
def test_fuzz_queue_cpu(case):
    check_queue(case, "cpu")


# The reference backend's queue in float64 only: what is checked is its cache; its float32
# arithmetic is plain PyTorch's (float32 row sums), not one of the fast paths' promises.
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(queue_cases(dtypes=[torch.float64]))
def test_fuzz_queue_reference(case):
    check_queue(case, "reference")


@triton_ok
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(queue_cases(max_size=5, max_d=6, max_calls=3))
def test_fuzz_queue_triton_interpreter(case):
    check_queue(case, "triton")


@pytest.mark.slow
@requires_cpu_ext
@SLOW
@given(queue_cases(max_size=40, max_d=300, max_calls=10))
def test_fuzz_queue_cpu_slow(case):
    check_queue(case, "cpu")


# ----------------------------------------------------------------------------- regressions
# Every draw that failed, as found (before the fix, or before the tolerance learned why).
def _case(dtype, shape, values, mode, eps=1e-6, seed=0, layout="contiguous", upstream=0.7, **queue):
    return dict(dtype=dtype, shape=shape, layout=layout, values=values, mode=mode, eps=eps, upstream=upstream,
                target_grad=False, seed=seed, **queue)


REGRESSIONS = [
    # d2sm_kl took its row sums as f_hat_i . sum_k f_hat_k, which float32 similarity entries do
    # not add up to: with q = 2 in paper mode (the one other row nearly anti-parallel) the row's
    # probability P = K / R came out 1 +- 6e-5 and the loss, identically 0, 1.4e-5.
    _case(torch.float32, (2, 2), "normal", "paper"),
    # The reference's paper mode gave NaN for every input with eps = 0: the masked diagonal's
    # 0 * log(0 / 0).
    _case(torch.float32, (2, 1), "normal", "paper", eps=0.0),
    # The C++ normalization's backward formed (g . f) / n^3 in float32: 0 for a row of 1e30, so the
    # gradient lost its projection term (4e-25 where the float64 gradient is 1e-66).
    _case(torch.float32, (2, 1), "huge", "pkt"),
    # Tolerances: a float16 gradient of 1e-6 is a subnormal (resolution 6e-8) ...
    _case(torch.float16, (3, 3), "huge", "paper"),
    # ... a zero row's gradient (~1 / eps) overflows float16 to inf ...
    _case(torch.float16, (3, 1), "relu", "paper"),
    # ... rows of +-1 in float32 (D = 1, |x| >> eps): paper mode's 0 / 0 (singular) ...
    _case(torch.float16, (2, 1), "huge", "paper"),
    # ... constant rows, anti-parallel within float32's resolution (singular: the float64 gradient
    # is 0, float32 gave 1.7e-3) ...
    _case(torch.float32, (2, 33), "constant_rows", "paper"),
    # ... float64 normalizer cancellation for a row nearly anti-parallel to the other ...
    _case(torch.float64, (2, 7), "constant_rows", "paper", seed=1),
    # ... float32 similarities of constant rows, which round alike ...
    _case(torch.float32, (49, 33), "constant_rows", "pkt", seed=1),
    # ... the noise of P = K / R divided by R again in the gradient, for a row nearly
    # anti-parallel to the other (q = 2, paper mode: the float64 gradient is 0) ...
    _case(torch.float32, (2, 33), "constant_rows", "paper", seed=1, layout="sliced"),
    # ... and (triton) rounding that hits other gradient entries than the perturbations do.
    _case(torch.float32, (3, 3), "constant_rows", "pkt", seed=17),
]


@requires_cpu_ext
@pytest.mark.parametrize("case", REGRESSIONS, ids=lambda c: f"{c['dtype']}-{c['shape']}-{c['values']}-{c['mode']}")
def test_regressions_cpu(case):
    check(case, "cpu")


@triton_ok
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the singular draw's 0 / 0
@pytest.mark.parametrize("case", [c for c in REGRESSIONS if math.prod(c["shape"]) <= 12],
                         ids=lambda c: f"{c['dtype']}-{c['shape']}-{c['values']}-{c['mode']}")
def test_regressions_triton_interpreter(case):
    check(case, "triton")


QUEUE_REGRESSIONS = [
    # the test's own slicing of the history (kept: it checks a queue that is filling up)
    _case(torch.float32, (2, 1), "normal", "paper", queue_size=6, batches=[2, 3]),
    # a first call with one row gives 0 and a graph; with a zero row and eps = 0 its gradient
    # was 0 times the normalization's derivative, NaN
    _case(torch.float32, (2, 4), "zero_rows", "pkt", eps=0.0, queue_size=4, batches=[1, 2]),
    # float32 similarities of constant rows round alike (tolerance) ...
    _case(torch.float32, (2, 5), "constant_rows", "pkt", queue_size=7, batches=[1, 4, 2]),
    # ... or are anti-parallel within float32's resolution (unstable: 0.597 for 0.338)
    _case(torch.float32, (2, 12, 12), "constant_rows", "paper", queue_size=4, batches=[2, 2]),
    _case(torch.float32, (2, 12, 12), "constant_rows", "paper", queue_size=4, batches=[2, 2], layout="rows_sliced"),
    # the noise of P = K / R divided by R again in the gradient (float64, q = 2, paper mode)
    _case(torch.float64, (2, 1), "row_scales", "paper", queue_size=2, batches=[2]),
    # (triton: the normalization's backward in float32) one roundoff of dL/df_hat ~ 1 / eps
    _case(torch.float16, (2, 1), "huge", "pkt", seed=2, layout="sliced", upstream=2.5, queue_size=2, batches=[2]),
]


@requires_cpu_ext
@pytest.mark.parametrize("case", QUEUE_REGRESSIONS, ids=lambda c: f"{c['values']}-{c['batches']}")
@pytest.mark.parametrize("backend", ["cpu", "reference"] + ["triton"] * _backend.status("triton")[0])
def test_queue_regressions(case, backend):
    if backend == "reference":
        case = dict(case, dtype=torch.float64)
    check_queue(case, backend)


@requires_cpu_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"] + (["triton"] if _backend.status("triton")[0] else []))
def test_two_rows_in_paper_mode_are_exactly_zero(backend):
    """q = 2 in paper mode: each row has one other row, p = p' = 1, the KL is 0 for any input."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.066]])  # cosine -0.9978: K'_01 = 1.1e-3
    y = torch.tensor([[0.3, 1.0], [1.0, 0.2]])
    xg = x.clone().requires_grad_()
    loss = fastloss.d2sm_kl(xg, y, mode="paper", backend=backend)
    assert abs(loss.item()) <= 1e-7  # was 1.4e-5 on cpu
    loss.backward()
    assert xg.grad.abs().max().item() <= 1e-5


@requires_cpu_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_eps_zero_paper_mode_is_the_formula(backend):
    """eps = 0 in paper mode, against the paper's sums written out over j != i."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 4, generator=g, dtype=torch.float64)
    y = torch.rand(5, 4, generator=g, dtype=torch.float64)
    fx, fy = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    kp, kt = (fx @ fx.T + 1) / 2, (fy @ fy.T + 1) / 2
    want = 0.0
    for i in range(5):
        for j in range(5):
            if j != i:
                p1, p0 = kp[i, j] / (kp[i].sum() - kp[i, i]), kt[i, j] / (kt[i].sum() - kt[i, i])
                want += (p1 * torch.log(p1 / p0)).item() / 5
    xg = x.clone().requires_grad_()
    loss = fastloss.d2sm_kl(xg, y, mode="paper", eps=0.0, backend=backend)
    assert math.isclose(loss.item(), want, rel_tol=1e-12)  # the reference gave NaN
    loss.backward()
    assert torch.isfinite(xg.grad).all()


@requires_cpu_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float32, 1e-40), (torch.float64, 1e200),
                                         (torch.float64, 1e-300)])
def test_huge_tiny_and_denormal_rows_are_scale_invariant(backend, dtype, scale):
    """With eps = 0 the loss does not depend on the rows' scale: rows of 1e30 (whose squares overflow
    float32) and of 1e-40 (denormal; their squares underflow) give the loss of the same rows at
    scale 1, and the gradient scaled by 1 / scale. The reference counted rows of 1e30 as zero rows
    (an infinite norm) and gave NaN for denormal rows; the C++ normalization lost the gradient's
    projection term at 1e30 (see REGRESSIONS)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    y = torch.randn(6, 9, generator=g, dtype=torch.float64).relu() + 0.3 * x
    for mode in ("paper", "pkt"):
        x1 = x.to(dtype).clone().requires_grad_()
        x2 = (x * scale).to(dtype).requires_grad_()
        want = fastloss.d2sm_kl(x1, y.to(dtype), mode=mode, eps=0.0, backend=backend)
        got = fastloss.d2sm_kl(x2, (y * scale).to(dtype), mode=mode, eps=0.0, backend=backend)
        (want * 1e-3).backward()  # 1e-3: the gradient of rows of 1e-40 is ~1e40, beyond float32
        (got * 1e-3).backward()
        tol = 1e-12 if dtype == torch.float64 else 2e-4  # denormal float32 rows keep few digits
        assert math.isclose(got.item(), want.item(), rel_tol=tol), (mode, got.item(), want.item())
        torch.testing.assert_close(x2.grad.double() * scale, x1.grad.double(), rtol=tol,
                                   atol=tol * x1.grad.abs().max().item())
