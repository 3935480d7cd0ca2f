"""The README's "Guarantees" section for D2SM (d2sm_kl, D2SMQueue, D2SMLoss), line by line: bad
input, non-finite input, mixed precision and autocast, torch.compile, determinism and thread safety
of the first call. DDP is in tests/d2sm/test_d2sm_ddp.py, parity in tests/d2sm/test_d2sm_fuzz.py."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import fastloss
from fastloss import _backend
from fastloss.d2sm import d2sm_reference

from conftest import assert_bitwise_identical, requires_cpu_ext
from helpers import first_calls_from_two_threads

TRITON = _backend.status("triton")[0]
# Every backend that runs CPU tensors here; triton under the interpreter at tiny sizes only.
BACKENDS = ["cpu"] * _backend.status("cpu")[0] + ["reference"]
TINY_BACKENDS = BACKENDS + ["triton"] * TRITON

# Tolerances stated in the README, relative to the float32 result on the unrounded values.
HALF_INPUT_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
AUTOCAST_RTOL = 5e-2


def _features(q, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(q, d, generator=g, dtype=torch.float64).relu()
    y = torch.randn(q, d, generator=g, dtype=torch.float64).relu() + 0.3 * x
    return x.to(dtype), y.to(dtype)


class TinyExtractor(nn.Module):
    """A frozen random conv + ReLU: rows of 4 x (H - 2) x (W - 2) features."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3).to(dtype)

    def forward(self, x):
        return self.conv(x).relu()


# ----------------------------------------------------------------------------- bad input
_x = torch.randn(4, 6)
# (id, call, exception, message): every message names the argument (and the value).
KL_BAD = [
    ("shapes", (_x, torch.randn(4, 7)), {}, ValueError, r"pred and target shapes differ: \(4, 6\) vs \(4, 7\)"),
    ("rows", (_x, torch.randn(5, 6)), {}, ValueError, r"pred and target shapes differ: \(4, 6\) vs \(5, 6\)"),
    ("one row", (_x[:1], _x[:1]), {}, ValueError, r"needs at least 2 rows \(samples\), got pred of shape \(1, 6\)"),
    ("1-d", (torch.randn(5), torch.randn(5)), {}, ValueError, r"pred must be \(rows, D, ...\) with at least 2 dims"),
    ("0-d", (torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, "pred must be .* at least 2 dims, got shape ()"),
    ("int", (_x.int(), _x.int()), {}, TypeError, "pred must be a floating-point tensor, got dtype torch.int32"),
    ("long target", (_x, _x.long()), {}, TypeError, "target must be a floating-point tensor, got dtype torch.int64"),
    ("bool", (_x.bool(), _x.bool()), {}, TypeError, "pred must be a floating-point tensor, got dtype torch.bool"),
    ("uint8", (_x, _x.to(torch.uint8)), {}, TypeError, "target must be a floating-point tensor, got dtype torch.uint8"),
    ("complex", (_x.to(torch.complex64),) * 2, {}, TypeError, "pred must be a floating-point tensor, got dtype "
                                                              "torch.complex64"),
    ("dtypes", (_x, _x.double()), {}, TypeError, "pred and target dtypes differ: torch.float32 vs torch.float64"),
    ("devices", (_x, _x.to("meta")), {}, ValueError, "pred and target are on different devices: cpu vs meta"),
    ("empty D", (torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, r"pred is empty, shape \(4, 0\)"),
    ("empty rows", (torch.randn(0, 6), torch.randn(0, 6)), {}, ValueError, r"pred is empty, shape \(0, 6\)"),
    ("mode", (_x, _x), {"mode": "kl"}, ValueError, r"mode must be one of \('paper', 'pkt'\), got 'kl'"),
    ("mode None", (_x, _x), {"mode": None}, ValueError, "mode must be one of .*, got None"),
    ("eps<0", (_x, _x), {"eps": -1.0}, ValueError, "eps must be a finite number >= 0, got -1.0"),
    ("eps nan", (_x, _x), {"eps": math.nan}, ValueError, "eps must be a finite number >= 0, got nan"),
    ("eps inf", (_x, _x), {"eps": math.inf}, ValueError, "eps must be a finite number >= 0, got inf"),
    ("eps bool", (_x, _x), {"eps": True}, ValueError, "eps must be a finite number >= 0, got True"),
    ("eps str", (_x, _x), {"eps": "1e-6"}, ValueError, "eps must be a finite number >= 0, got '1e-6'"),
    ("backend", (_x, _x), {"backend": "gpu"}, ValueError, "backend: unknown backend 'gpu'"),
    ("backend None", (_x, _x), {"backend": None}, ValueError, "backend: unknown backend None"),
    ("numpy", (_x.numpy(), _x), {}, TypeError, "pred must be a torch.Tensor, got ndarray"),
    ("list", (_x, _x.tolist()), {}, TypeError, "target must be a torch.Tensor, got list"),
    ("cuda", (_x, _x), {"backend": "cuda"}, fastloss.BackendError, "backend 'cuda' cannot run this input"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", [b[1:] for b in KL_BAD], ids=[b[0] for b in KL_BAD])
def test_d2sm_kl_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastloss.d2sm_kl(*args, **kwargs)


QUEUE_CTOR_BAD = [
    ({"queue_size": 1}, ValueError, "queue_size must be an int >= 2, got 1"),
    ({"queue_size": 0}, ValueError, "queue_size must be an int >= 2, got 0"),
    ({"queue_size": 3.5}, ValueError, "queue_size must be an int >= 2, got 3.5"),
    ({"queue_size": True}, ValueError, "queue_size must be an int >= 2, got True"),
    ({"queue_size": "8"}, ValueError, "queue_size must be an int >= 2, got '8'"),
    ({"mode": "PKT"}, ValueError, r"D2SMQueue: mode must be one of \('paper', 'pkt'\), got 'PKT'"),
    ({"eps": -1e-6}, ValueError, "D2SMQueue: eps must be a finite number >= 0, got -1e-06"),
    ({"backend": "fast"}, ValueError, "unknown backend 'fast'"),
]


@pytest.mark.parametrize("kwargs,exc,match", QUEUE_CTOR_BAD, ids=[str(b[0]) for b in QUEUE_CTOR_BAD])
def test_queue_constructor_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastloss.D2SMQueue(**{"queue_size": 8, **kwargs})


_f = torch.randn(3, 6)
QUEUE_CALL_BAD = [
    ("shapes", (_f, torch.randn(3, 7)), ValueError, r"pred_feats and target_feats shapes differ: \(3, 6\) vs \(3, 7\)"),
    ("1-d", (torch.randn(6), torch.randn(6)), ValueError, r"pred_feats must be \(rows, D, ...\) with at least 2 dims"),
    ("long", (_f.long(), _f.long()), TypeError, "pred_feats must be a floating-point tensor, got dtype torch.int64"),
    ("bool", (_f, _f.bool()), TypeError, "target_feats must be a floating-point tensor, got dtype torch.bool"),
    ("complex", (_f.to(torch.complex64),) * 2, TypeError, "pred_feats must be a floating-point tensor, got dtype "
                                                          "torch.complex64"),
    ("dtypes", (_f.double(), _f), TypeError, "pred_feats and target_feats dtypes differ"),
    ("devices", (_f, _f.to("meta")), ValueError, "pred_feats and target_feats are on different devices: cpu vs meta"),
    ("empty", (torch.randn(0, 6), torch.randn(0, 6)), ValueError, r"pred_feats is empty, shape \(0, 6\)"),
    ("batch", (torch.randn(9, 6), torch.randn(9, 6)), ValueError, r"queue_size=8 is smaller than the batch \(9 rows\)"),
    ("width", (torch.randn(3, 7), torch.randn(3, 7)), ValueError, "the features have D=7 per row but the queue holds "
                                                                  "D=6; call reset"),
    ("queue device", (_f.to("meta"), _f.to("meta")), ValueError, "the queue is on cpu but the features are on meta"),
    ("numpy", (_f.numpy(), _f), TypeError, "pred_feats must be a torch.Tensor, got ndarray"),
]


@requires_cpu_ext
@pytest.mark.parametrize("args,exc,match", [b[1:] for b in QUEUE_CALL_BAD], ids=[b[0] for b in QUEUE_CALL_BAD])
def test_queue_call_bad_input_leaves_the_queue_untouched(args, exc, match):
    queue = fastloss.D2SMQueue(8)
    queue(torch.randn(2, 6), torch.randn(2, 6))  # holds 2 rows of D = 6
    before = {k: v.clone() for k, v in queue.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=match):
        queue(*args)
    assert queue.filled == 2 and queue.ptr == 2
    for k, v in queue.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


LOSS_CTOR_BAD = [
    ({"extractor": "resnet"}, ValueError, "extractor must be 'vgg16', 'vgg19' or an nn.Module, got 'resnet'"),
    ({"extractor": "vgg19", "layer": "conv9_9", "extractor_weights": None}, ValueError,
     r"unknown layer\(s\) \['conv9_9'\]"),
    ({"extractor": "vgg19", "extractor_weights": "/nonexistent/vgg19.pth"}, FileNotFoundError,
     "/nonexistent/vgg19.pth"),
    ({"patch_size": 0}, ValueError, "patch_size must be an int >= 1, got 0"),
    ({"patch_stride": 2.5}, ValueError, "patch_stride must be an int >= 1, got 2.5"),
    ({"queue_size": 1}, ValueError, "queue_size must be an int >= 2, got 1"),
    ({"mode": "paper2"}, ValueError, "mode must be one of .*, got 'paper2'"),
    ({"eps": -1.0}, ValueError, "eps must be a finite number >= 0, got -1.0"),
    ({"backend": "gpu"}, ValueError, "unknown backend 'gpu'"),
    ({"weight": "x"}, ValueError, "weight must be a finite number, got 'x'"),
    ({"weight": math.nan}, ValueError, "weight must be a finite number, got nan"),
]


@pytest.mark.parametrize("kwargs,exc,match", LOSS_CTOR_BAD, ids=[str(b[0])[:40] for b in LOSS_CTOR_BAD])
def test_d2sm_loss_constructor_bad_arguments(kwargs, exc, match):
    kwargs = {"extractor": TinyExtractor(), "queue_size": 8, **kwargs}
    with pytest.raises(exc, match=match):
        fastloss.D2SMLoss(**kwargs)


_u = torch.rand(2, 3, 8, 8)
LOSS_CALL_BAD = [
    ("3-d", (_u[0], _u[0]), ValueError, r"restored must be \(B, C, H, W\), got shape \(3, 8, 8\)"),
    ("uint8", (_u, _u.to(torch.uint8)), TypeError, "clean must be a floating-point tensor .*got dtype torch.uint8"),
    ("bool", (_u.bool(), _u), TypeError, "restored must be a floating-point tensor .*got dtype torch.bool"),
    ("complex", (_u.to(torch.complex64), _u), TypeError, "restored must be a floating-point tensor .*got dtype "
                                                         "torch.complex64"),
    ("list", (_u.tolist(), _u), TypeError, "restored must be a torch.Tensor, got list"),
    ("shapes", (_u, torch.rand(2, 3, 8, 9)), ValueError, r"restored and clean shapes differ: \(2, 3, 8, 8\) vs "
                                                          r"\(2, 3, 8, 9\)"),
    ("dtypes", (_u, _u.double()), TypeError, "restored and clean dtypes differ: torch.float32 vs torch.float64"),
    ("devices", (_u, _u.to("meta")), ValueError, "restored and clean are on different devices: cpu vs meta"),
    ("empty", (_u[:0], _u[:0]), ValueError, r"restored is empty, shape \(0, 3, 8, 8\)"),
    ("batch", (torch.rand(9, 3, 8, 8), torch.rand(9, 3, 8, 8)), ValueError, "queue_size=8 is smaller than the batch"),
]


@requires_cpu_ext
@pytest.mark.parametrize("args,exc,match", [b[1:] for b in LOSS_CALL_BAD], ids=[b[0] for b in LOSS_CALL_BAD])
def test_d2sm_loss_call_bad_input(args, exc, match):
    crit = fastloss.D2SMLoss(extractor=TinyExtractor(), queue_size=8)
    with pytest.raises(exc, match=match):
        crit(*args)
    assert crit.queue.filled == 0  # nothing was queued


# ----------------------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("backend,bad", [(b, v) for b in BACKENDS for v in (math.nan, math.inf, -math.inf)]
                         + [("triton", math.nan)] * TRITON)  # the interpreter is slow: NaN only
def test_non_finite_rows_count_as_zero_rows(backend, bad):
    """As documented: a row with a NaN or infinite entry normalizes to 0, so the loss is the loss
    with that row zeroed (finite, bit for bit), never another finite number; the pred row's own
    gradient is NaN, so a training step does not go on silently, and the other rows' gradients are
    those of the zeroed row's loss."""
    x, y = _features(5, 4, seed=2)
    for mode in ("paper", "pkt"):
        for side in ("pred", "target"):
            xb, yb, xz, yz = x.clone(), y.clone(), x.clone(), y.clone()
            (xb if side == "pred" else yb)[2, 1] = bad
            (xz if side == "pred" else yz)[2] = 0
            a, b = xb.requires_grad_(), xz.requires_grad_()
            la = fastloss.d2sm_kl(a, yb, mode=mode, backend=backend)
            lb = fastloss.d2sm_kl(b, yz, mode=mode, backend=backend)
            assert torch.isfinite(lb) and torch.equal(la, lb), (mode, side, la, lb)
            la.backward()
            lb.backward()
            rows = torch.arange(5) != 2 if side == "pred" else torch.ones(5, dtype=torch.bool)
            assert torch.equal(a.grad[rows], b.grad[rows])
            if side == "pred":
                assert not torch.isfinite(a.grad[2]).any()


@requires_cpu_ext
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_in_the_queue_are_zero_rows(backend):
    """A NaN row of a batch enters the queue as a zero row: every later call equals a queue that
    was given the zeroed row."""
    qa = fastloss.D2SMQueue(7, mode="pkt", backend=backend)
    qb = fastloss.D2SMQueue(7, mode="pkt", backend=backend)
    for step in range(4):
        x, y = _features(3, 5, seed=10 + step)
        xa, xb, ya, yb = x.clone(), x.clone(), y.clone(), y.clone()
        if step == 1:
            xa[0, 3], xb[0] = math.nan, 0.0
            ya[2, 0], yb[2] = math.inf, 0.0
        la, lb = qa(xa, ya), qb(xb, yb)
        assert torch.isfinite(la) and torch.equal(la, lb), step


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("backend", TINY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(backend, dtype):
    """The loss and the gradient of float16 / bfloat16 inputs are the float32 results on the same
    values, rounded once to the input dtype (bit for bit); against the float32 result on the values
    before rounding to half: within HALF_INPUT_RTOL."""
    q, d = (5, 6) if backend == "triton" else (16, 64)
    for seed in range(1 if backend == "triton" else 3):
        x, y = _features(q, d, seed=seed)
        for mode in ("pkt",) if backend == "triton" else ("paper", "pkt"):
            xh = x.to(dtype).requires_grad_()
            out = fastloss.d2sm_kl(xh, y.to(dtype), mode=mode, backend=backend)
            assert out.dtype == dtype
            out.backward()
            x32 = x.to(dtype).float().requires_grad_()
            same = fastloss.d2sm_kl(x32, y.to(dtype).float(), mode=mode, backend=backend)
            same.backward()
            assert torch.equal(out, same.to(dtype))
            assert xh.grad.dtype == dtype and torch.equal(xh.grad, x32.grad.to(dtype))
            full = fastloss.d2sm_kl(x, y, mode=mode, backend=backend)
            assert abs(out.double().item() - full.item()) <= HALF_INPUT_RTOL[dtype] * full.item(), (mode, seed)


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_queue_with_half_inputs_keeps_float32_rows(dtype):
    qh = fastloss.D2SMQueue(10, mode="paper")
    q32 = fastloss.D2SMQueue(10, mode="paper")
    for step in range(4):
        x, y = _features(4, 9, seed=step)
        x, y = x.to(dtype), y.to(dtype)
        out = qh(x, y)
        assert out.dtype == dtype and qh.pred_queue.dtype == torch.float32
        assert torch.equal(out, q32(x.float(), y.float()).to(dtype))


@requires_cpu_ext
def test_d2sm_loss_under_cpu_autocast_bfloat16():
    """Random VGG19 up to relu2_2 on 24 x 24 images: the convolutions run in bfloat16 under
    autocast, the loss itself in float32 on the upcast features (its queue stays float32, and the
    value comes back in float32, not rounded to bfloat16); within AUTOCAST_RTOL of the float32
    module, step after step (measured: at most 1.9% over 18 steps of this setup, 6 seeds)."""
    torch.manual_seed(0)
    crit = fastloss.D2SMLoss(layer="relu2_2", queue_size=7, extractor_weights=None)
    mixed_crit = copy.deepcopy(crit)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        u = torch.rand(3, 3, 24, 24, generator=g).requires_grad_()
        v = torch.rand(3, 3, 24, 24, generator=g)
        full = crit(u, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = mixed_crit(u, v)
        assert mixed.dtype == torch.float32 and mixed_crit.queue.pred_queue.dtype == torch.float32
        assert full.item() > 0
        assert abs(mixed.float().item() - full.item()) <= AUTOCAST_RTOL * full.item(), step
        mixed.float().backward()
        assert u.grad is not None and torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0


@requires_cpu_ext
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_reach_the_loss(backend):
    """Under autocast the similarity products would run in bfloat16 (and the fused op refused them):
    d2sm_kl and the queue give, bit for bit, their results without autocast."""
    x, y = _features(6, 10, seed=4)
    q1, q2 = fastloss.D2SMQueue(8, backend=backend), fastloss.D2SMQueue(8, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fastloss.d2sm_kl(x, y, backend=backend)
        qa = [q1(x[:4], y[:4]), q1(x[4:], y[4:])]
    assert torch.equal(a, fastloss.d2sm_kl(x, y, backend=backend))
    assert all(torch.equal(u, v) for u, v in zip(qa, [q2(x[:4], y[:4]), q2(x[4:], y[4:])]))


# ----------------------------------------------------------------------------- torch.compile
@requires_cpu_ext
def test_compiled_training_step_with_d2sm_kl_fullgraph_matches_eager():
    """A training step, model -> frozen extractor -> d2sm_kl, compiled with fullgraph=True:
    values and parameter gradients equal eager mode's (float64)."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1).double()
    ext = TinyExtractor(torch.float64).requires_grad_(False)

    def step(x, y):
        return fastloss.d2sm_kl(ext(model(x)), ext(y), mode="paper") * 2.0

    x, y = torch.rand(5, 3, 10, 10, dtype=torch.float64), torch.rand(5, 3, 10, 10, dtype=torch.float64)
    eager = step(x, y)
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(step, fullgraph=True)(x, y)
    compiled.backward()
    assert eager.item() > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=0)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-15)


@requires_cpu_ext
def test_compiled_training_step_with_d2sm_loss_fullgraph_matches_eager():
    """D2SMLoss's step compiled with fullgraph=True, called first (the queue's buffers are
    allocated inside the compiled step): the queue update and its loss are custom ops, its fill
    level and ring pointer 0-dim tensors. Over 6 steps that fill and wrap the queue (several
    times, every pointer position), values, parameter gradients and every queue buffer equal
    eager mode's, and the step compiles twice (the first call, which allocates the queue, and
    every later one), not once per call. (aot_eager: what is checked is the tracing and the
    custom ops' autograd and mutations; inductor's code generation is covered by the d2sm_kl
    fullgraph test above.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1).double()
    crit = fastloss.D2SMLoss(extractor=TinyExtractor(torch.float64), queue_size=5, mode="pkt")
    crit_c = copy.deepcopy(crit)

    def make_step(c):
        return lambda x, y: c(model(x), y)

    counter = CompileCounterWithBackend("aot_eager")
    compiled, eager = torch.compile(make_step(crit_c), backend=counter, fullgraph=True), make_step(crit)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.rand(3, 3, 10, 10, generator=g, dtype=torch.float64)
        y = torch.rand(3, 3, 10, 10, generator=g, dtype=torch.float64)
        outs = []
        for fn in (compiled, eager):
            loss = fn(x, y)
            loss.backward()
            outs.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            model.zero_grad()
        assert outs[1][0].item() > 0
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=0)
        for a, b in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
        assert crit_c.queue.filled == crit.queue.filled == min(3 * (step + 1), 5)
        assert crit_c.queue.ptr == crit.queue.ptr == 3 * (step + 1) % 5
        for name in crit.queue._BUFFERS:
            torch.testing.assert_close(getattr(crit_c.queue, name), getattr(crit.queue, name), rtol=1e-12,
                                       atol=1e-14)
    assert counter.frame_count == 2  # not once per call: no recompiles as the queue fills and wraps
    # a reset queue is allocated again inside the compiled step, which still matches eager mode
    crit_c.reset(), crit.reset()
    x, y = torch.rand(3, 3, 10, 10, generator=g, dtype=torch.float64), torch.rand(3, 3, 10, 10, generator=g,
                                                                                  dtype=torch.float64)
    torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-10, atol=0)
    assert crit_c.queue.filled == crit.queue.filled == 3
    torch.testing.assert_close(crit_c.queue.pred_sim, crit.queue.pred_sim, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- determinism
def _ties(q, d, seed):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(q, d, generator=g) * 2).round().relu(),  # many zeros and equal values
            (torch.randn(q, d, generator=g) * 2).round().relu())


def _runs(fn, thread_counts=(1, 2, 1)):
    prev = torch.get_num_threads()
    out = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            out.append(fn())
    finally:
        torch.set_num_threads(prev)
    return out


def _kl_run(mode):
    x, y = _ties(300, 600, 0)
    x[5] = x[4]  # duplicate rows too
    x.requires_grad_()
    loss = fastloss.d2sm_kl(x, y, mode=mode, backend="cpu")
    loss.backward()
    return [loss.detach(), x.grad]


def _queue_run(mode):
    queue = fastloss.D2SMQueue(100, mode=mode, backend="cpu")
    out = []
    for step in range(8):  # 128 rows through a queue of 100: it wraps
        x, y = _ties(16, 600, step)
        x.requires_grad_()
        loss = queue(x, y)
        loss.backward()
        out += [loss.detach(), x.grad]
    return out + [queue.pred_sim, queue.pred_rowsum]


@requires_cpu_ext
@pytest.mark.parametrize("mode", ["paper", "pkt"])
@pytest.mark.parametrize("run", [_kl_run, _queue_run], ids=["d2sm_kl", "queue"])
def test_cpu_is_bitwise_deterministic_across_runs_and_thread_counts(run, mode):
    """q = 300 rows (pass 1 splits them over threads) of D = 600 (the gradient's product with the
    rows splits D over threads), ties and duplicate rows; and the queue over 8 calls. The same
    bits run to run, with 1 or 2 threads, and with fastloss.use_deterministic(True)."""
    results = _runs(lambda: run(mode))
    fastloss.use_deterministic(True)
    try:
        results += _runs(lambda: run(mode), (2,))
    finally:
        fastloss.use_deterministic(False)
    assert results[0][1].abs().sum() > 0
    assert_bitwise_identical(results)


# ----------------------------------------------------------------------------- thread safety
_FIRST_CALL = """
    import torch, fastloss
    x = torch.arange(6 * 40, dtype=torch.float32).reshape(6, 40).sin()
    y = x.flip(-1).cos()
    report = {}
    for backend in BACKENDS:  # the first call of each backend, from two threads at once
        def work():
            a = x.clone().requires_grad_()
            loss = fastloss.d2sm_kl(a, y, mode="pkt", backend=backend)
            loss.backward()
            return (loss.item(), a.grad.sum().item())

        report[backend] = two_threads(work)
    print(json.dumps(report))
"""


def test_first_call_from_two_threads_at_once():
    """The C++ extension loads, and the Triton kernels launch (under the interpreter, where
    launches are serialized by _backend.triton_launch_guard()), safely when two threads call
    d2sm_kl for the first time together; both get the reference's value."""
    backends = [b for b in ("cpu", "triton") if b in TINY_BACKENDS]
    if not backends:
        pytest.skip("neither fastloss._C nor triton is available")
    report = first_calls_from_two_threads(_FIRST_CALL.replace("BACKENDS", repr(backends)))
    x = torch.arange(6 * 40, dtype=torch.float32).reshape(6, 40).sin()
    want = d2sm_reference(x, x.flip(-1).cos(), "pkt").item()
    for backend in backends:
        res = report[backend]
        assert res["errors"] == [], backend
        assert res["out"][0] == res["out"][1], backend
        assert res["out"][0][0] == pytest.approx(want, rel=1e-5), backend

