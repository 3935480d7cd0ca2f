"""``python -m fastloss.selftest``: the acceptance run of fastloss's fast backends on this machine.

Every case runs a fast backend (``cpu``, ``triton``, ``cuda``) on the device and compares its
values and gradients with ground truth computed **on the CPU in float64 from the same data**,
never with another GPU result; errors are computed and reported in float64. On a GPU machine this
is how the Triton and CUDA paths are validated (``scripts/gpu-check.sh`` runs it with ``--full``).

- TF32 is off (cuDNN and matmul) for the run, and restored afterwards.
- The caching allocator is poisoned (freed blocks filled with 0xFF: NaN, -1) before every fast
  call, so an output a kernel does not write cannot hold a correct value.
- PDL's saved permutations are checked to be permutations, equal to the stable order (-0.0 ==
  +0.0, NaN of either sign last) of the ground truth.
- The cases cover every regime the dispatch can take (``--list`` prints them): PDL row lengths
  across every CUDA tile, the segmented path, every Triton block and the ``torch.sort`` fallback,
  p = 1 and 2, the target with and without grad, four dtypes, three layouts, +-0 ties and NaNs of
  both signs; D2SM set sizes over several Triton blocks in both modes and ``D2SMQueue`` filling and
  wrapping; MDF in four dtypes, grouped or not, channels_last, gradients for pred and target; and,
  with ``--full``, run-to-run determinism where the README promises it, ``torch.compile``
  (fullgraph) steps, and on CUDA inputs made on a side stream, ``cuda:1`` while ``cuda:0`` is
  current, a step under ``torch.cuda.set_sync_debug_mode("error")`` and a CUDA-graph capture and
  replay of a training step with each loss.

Exit status: 0 only when every requested backend ran every case and all passed; 1 on any
mismatch (or a case that raised); 2 when a requested backend cannot run, or when no fast backend
ran at all ("nothing was tested"). A case that did not run is never reported as passed.
"""
import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import fastloss
from fastloss import _backend

EXIT_PASS, EXIT_MISMATCH, EXIT_NOT_RUN = 0, 1, 2
FAST_BACKENDS = tuple(b for b in _backend.BACKENDS if b != "reference")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Relative error allowed against float64 ground truth from the same (rounded) inputs.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# D2SM's KL values are small sums of terms of both signs: float32's own rounding reaches ~1e-4.
D2SM_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# MDF in half runs its convolutions in half on the GPU: 5 layers of half rounding.
MDF_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}

# PDL row lengths: both sides of every CUDA tile and Triton block, the single-program cap
# (kernels/pdl.py TRITON_MAX_SORT_N),
# the torch.sort fallback past it, and an image-sized row (224 x 224).
PDL_N_FULL = (1, 35, 129, 300, 513, 1025, 2048, 2049, 4096, 4097, 8192, 8193, 50176)
PDL_N_QUICK = (1, 35)   # under the Triton interpreter every sort stage costs seconds
D2SM_Q_FULL = (2, 37, 1024, 1025, 3000)   # 1025 and 3000 span several Triton blocks of 1024
D2SM_Q_QUICK = (2, 37)


class NotRunnable(Exception):
    """The backend cannot run this case here (not built, wrong device, unsupported dtype)."""


class NotApplicable(Exception):
    """The case does not apply to this backend or machine (a CUDA-only case on the CPU, cuda:1 with
    one GPU, determinism the README does not promise): reported as n/a, never as passed."""


# --------------------------------------------------------------------------- error arithmetic
def rel_error(got, truth, metric="max"):
    """float64 relative error of ``got`` against ``truth`` (both taken to the CPU in float64).

    Non-finite entries must match exactly (NaN where truth is NaN, the same infinities), else the
    error is inf. On the finite entries, ``max``: max|a - b| / max|b|; ``norm``: ||a - b|| / ||b||.
    Where truth is all zero the error is absolute (max|a| or ||a||)."""
    a = got.detach().to("cpu", torch.float64)
    b = truth.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return math.inf
    fin_a, fin_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fin_a, fin_b) or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    inf_b = torch.isinf(b)
    if not torch.equal(a[inf_b], b[inf_b]):
        return math.inf
    a, b = a[fin_b], b[fin_b]
    if b.numel() == 0:
        return 0.0
    diff = a - b
    err, scale = (diff.abs().max(), b.abs().max()) if metric == "max" else (diff.norm(), b.norm())
    err, scale = float(err), float(scale)
    return err / scale if scale > 0.0 else err


class Checker:
    """Collects a case's comparisons: label -> float64 error, and whether each is within tolerance."""

    def __init__(self):
        self.errors = {}
        self.tolerances = {}

    def close(self, label, got, truth, tol, metric="max"):
        self.errors[label] = rel_error(got, truth, metric)
        self.tolerances[label] = tol

    def equal(self, label, got, truth):
        """Exact equality (integer outputs such as permutations): error 0 or inf."""
        ok = got.shape == truth.shape and torch.equal(got.detach().cpu(), truth.detach().cpu())
        self.errors[label] = 0.0 if ok else math.inf
        self.tolerances[label] = 0.0

    def true(self, label, ok):
        self.errors[label] = 0.0 if ok else math.inf
        self.tolerances[label] = 0.0

    def passed(self):
        return bool(self.errors) and all(self.errors[k] <= self.tolerances[k] for k in self.errors)


# --------------------------------------------------------------------------- hygiene
@contextlib.contextmanager
def no_tf32():
    """TF32 off for cuDNN and matmul inside; the caller's settings restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def poison(device):
    """Fill freed allocator blocks with 0xFF bytes (NaN for floats, -1 for ints) so that the next
    allocations of a fast call start from garbage, not from an earlier result's bytes."""
    device = torch.device(device)
    if device.type == "cuda":  # the caching allocator hands these blocks out next
        sizes = [1 << k for k in range(9, 27)]
    else:  # best effort: the heap's small-block lists, a few of each size
        sizes = [n for k in range(4, 17) for n in (1 << k, 3 << (k - 1)) for _ in range(4)]
    blocks = [torch.empty(n, dtype=torch.uint8, device=device).fill_(0xFF) for n in sizes]
    del blocks


@contextlib.contextmanager
def _knob(module_name, attr, value):
    """Temporarily set a kernel module's block-size constant (to reach a regime at small sizes)."""
    import importlib

    mod = importlib.import_module(module_name)
    if not hasattr(mod, attr):
        raise RuntimeError(f"selftest: {module_name}.{attr} does not exist; the case list is out of date")
    old = getattr(mod, attr)
    setattr(mod, attr, value)
    try:
        yield
    finally:
        setattr(mod, attr, old)


def _cpu_gen(seed):
    return torch.Generator().manual_seed(seed)


def _neg_nan(dtype):
    """A NaN with the sign bit set, in ``dtype``, made from its bit pattern."""
    bits = {torch.float64: (torch.int64, -(1 << 51)),      # 0xFFF8000000000000
            torch.float32: (torch.int32, -0x400000),           # 0xFFC00000
            torch.float16: (torch.int16, -0x200),              # 0xFE00
            torch.bfloat16: (torch.int16, -0x40)}[dtype]       # 0xFFC0
    v = torch.tensor([bits[1]], dtype=bits[0]).view(dtype)
    assert torch.isnan(v).all() and v.view(bits[0])[0] < 0
    return v


# --------------------------------------------------------------------------- PDL
def pdl_truth(x, y, p, g):
    """CPU float64 ground truth of ``pdl(x, y, p=p, reduction="none")`` with upstream ``g`` [B].

    The contract of the fast ops: rows ordered by a stable sort in which -0.0 == +0.0 and NaN of
    either sign sorts last; d = sorted x - sorted y; W = mean_i |d_i|^p per row; gradient
    g p |d|^(p-1) sign(d) / N scattered through the orders, sign(NaN) = 0.
    Returns (loss [B], w [B, C], order_x, order_y [B, C, N] int64, grad_x, grad_y [B, C, N])."""
    x = x.detach().to("cpu", torch.float64).flatten(2)
    y = y.detach().to("cpu", torch.float64).flatten(2)

    def order(v):
        key = torch.where(torch.isnan(v), torch.full_like(v, math.inf), v + 0.0)  # -0.0 + 0.0 = +0.0
        o = torch.sort(key, dim=-1, stable=True).indices
        nan_last = torch.sort(torch.isnan(v).gather(-1, o).to(torch.uint8), dim=-1, stable=True).indices
        return o.gather(-1, nan_last)

    ox, oy = order(x), order(y)
    d = x.gather(-1, ox) - y.gather(-1, oy)
    n = x.shape[-1]
    w = (d.abs() if p == 1 else d * d).mean(-1)
    deriv = torch.nan_to_num(torch.sign(d), nan=0.0) if p == 1 else 2 * d
    val = g.detach().to("cpu", torch.float64)[:, None, None] * deriv / n
    gx = torch.zeros_like(x).scatter_(-1, ox, val)
    gy = torch.zeros_like(y).scatter_(-1, oy, -val)
    return w.sum(1), w, ox, oy, gx, gy


def _factor(n):
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def pdl_inputs(b, c, n, dtype, layout, kind, seed):
    """(x, y) on the CPU in ``dtype``: signed values with one ReLU'd channel (ties at 0), or
    ``zeros`` (half the entries +-0.0 at random signs), or ``nan`` (NaNs of both signs in some rows);
    ``layout``: contiguous [B, C, N], channels_last [B, C, H, W], transposed ([C, B, N] storage)."""
    g = _cpu_gen(seed)
    h, w_ = _factor(n)

    def make(scale, shift):
        v = torch.randn(b, c, n, generator=g, dtype=torch.float64) * scale + shift
        v[:, :1] = v[:, :1].clamp_min(0)  # ties, as after a ReLU
        if kind == "zeros":
            z = torch.rand(b, c, n, generator=g) < 0.5
            sign = torch.where(torch.rand(b, c, n, generator=g) < 0.5, -1.0, 1.0).double()
            v = torch.where(z, sign * 0.0, v)
        v = v.to(dtype)
        if kind == "nan":
            v[0, 0, n // 2] = float("nan")
            if b * c > 1:
                v.view(-1, n)[1, 0] = _neg_nan(dtype)[0]
            if n > 2:
                v.view(-1, n)[-1, 1] = _neg_nan(dtype)[0]
                v.view(-1, n)[-1, 2] = float("nan")
        return v

    x, y = make(1.0, 0.0), make(1.3, 0.2)
    if layout == "channels_last":
        x, y = (t.view(b, c, h, w_).contiguous(memory_format=torch.channels_last) for t in (x, y))
    elif layout == "transposed":
        x, y = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (x, y))
    return x, y


def _to(t, device):
    """``t`` on ``device`` with its strides kept (channels_last and transposed layouts too)."""
    t = t.detach()
    if t.device == torch.device(device):
        return t.clone()
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def _pdl_case(n, p, target_grad, dtype, layout="contiguous", kind="plain", seed=0, knobs=(), rows=None):
    b, c = rows or ((2, 5) if n <= 1025 else (2, 3))
    tol = TOL[dtype]
    acc_tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]

    def run(backend, device, chk):
        x0, y0 = pdl_inputs(b, c, n, dtype, layout, kind, seed)
        gup = torch.linspace(0.5, 1.5, b, dtype=torch.float64)  # an upstream gradient that is not 1
        loss_t, w_t, ox, oy, gx_t, gy_t = pdl_truth(x0, y0, p, gup)
        x, y = _to(x0, device), _to(y0, device)
        with contextlib.ExitStack() as stack:
            if backend == "triton":
                for knob in knobs:
                    stack.enter_context(_knob(*knob))
            poison(device)
            w, perm, perm_t, _ = torch.ops.fastloss.pdl_forward(x.flatten(2), y.flatten(2), p, target_grad, backend)
            chk.close("w", w, w_t, acc_tol)
            srt = torch.arange(n, device=perm.device, dtype=perm.dtype).expand(b, c, n)
            valid = torch.equal(perm.sort(-1).values, srt)
            chk.true("perm is a permutation", valid)
            chk.equal("perm", perm.long(), ox)
            if target_grad:
                valid_t = torch.equal(perm_t.sort(-1).values, srt)
                chk.true("perm_t is a permutation", valid_t)
                chk.equal("perm_t", perm_t.long(), oy)
                valid = valid and valid_t
            if not valid:  # the backward would scatter through it out of bounds
                return
            poison(device)
            xr = x.detach().requires_grad_()
            yr = y.detach().requires_grad_(target_grad)
            out = fastloss.pdl(xr, yr, p=p, reduction="none", backend=backend)
            out.backward(gup.to(device=device, dtype=out.dtype))
        chk.close("loss", out, loss_t, tol)
        chk.close("grad pred", xr.grad.reshape(b, c, n), gx_t, tol)
        if target_grad:
            chk.close("grad target", yr.grad.reshape(b, c, n), gy_t, tol)

    extra = "".join(f" {k}" for k in (layout, kind) if k not in ("contiguous", "plain"))
    name = f"pdl N={n} p={p} target_grad={int(target_grad)}{extra}" + (f" B={b} C={c}" if rows else "")
    return Case(name, "pdl", dtype, run)


def _pdl_cases(full):
    cases = []
    if full:
        for n in PDL_N_FULL:
            for p in (1, 2):
                for tg in (False, True):
                    for dtype in DTYPES.values():
                        cases.append(_pdl_case(n, p, tg, dtype, seed=n + p))
        for n in (35, 1025, 8193):
            for layout in ("channels_last", "transposed"):
                for p in (1, 2):
                    for dtype in (torch.float32, torch.bfloat16):
                        cases.append(_pdl_case(n, p, True, dtype, layout, seed=n))
        for n in (129, 4096, 8193, 50176):
            for p in (1, 2):
                for dtype in (torch.float32, torch.float64):
                    cases.append(_pdl_case(n, p, p == 2, dtype, kind="zeros", seed=n))
        for n in (129, 8193, 50176):
            for dtype in (torch.float32, torch.float64):
                cases.append(_pdl_case(n, 1, True, dtype, kind="nan", seed=n))
        # the CUDA segmented sort takes rows in chunks of <= 2^25 elements: 35M elements, two chunks
        cases.append(_pdl_case(50176, 1, True, torch.float32, kind="zeros", rows=(2, 350)))
        # and sorts 256 rows per cub::DeviceSegmentedSort call: 300 rows, two calls, for each way the
        # target is sorted (pairs into perm_t; float32 keys only; float64 pairs into scratch)
        for p, tg, dtype in ((1, True, torch.float32), (1, False, torch.float32), (2, False, torch.float64)):
            cases.append(_pdl_case(8193, p, tg, dtype, kind="nan", rows=(3, 100), seed=p))
        return cases
    for n in PDL_N_QUICK:
        for p in (1, 2):
            for tg in (False, True):
                cases.append(_pdl_case(n, p, tg, torch.float32, seed=n + p))
    cases += [_pdl_case(35, 1, True, torch.float64), _pdl_case(35, 2, False, torch.float64)]
    cases += [_pdl_case(35, 1, True, torch.float16), _pdl_case(35, 2, False, torch.bfloat16)]
    cases += [_pdl_case(35, 2, True, torch.float32, layout) for layout in ("channels_last", "transposed")]
    cases += [_pdl_case(35, 1, False, torch.float32, kind="zeros"), _pdl_case(35, 1, True, torch.float32, kind="nan")]
    # on triton, the torch.sort fallback and its loops at a small size (the others run them as usual)
    fallback = (("fastloss.kernels.pdl", "TRITON_MAX_SORT_N", 16), ("fastloss.kernels.pdl", "TRITON_LOOP_BLOCK_N", 32))
    cases += [Case(c.name + " (triton: sort fallback)", c.loss, c.dtype, c.run) for c in (
        _pdl_case(300, 1, True, torch.float32, kind="nan", knobs=fallback),
        _pdl_case(300, 2, False, torch.float64, kind="zeros", knobs=fallback))]
    return cases


# --------------------------------------------------------------------------- D2SM
def d2sm_inputs(q, d, dtype, seed):
    g = _cpu_gen(seed)
    x = torch.randn(q, d, generator=g, dtype=torch.float64)
    y = torch.randn(q, d, generator=g, dtype=torch.float64) + 0.1 * x
    if q > 2:
        x[1] = x[0]  # a duplicate row
    return x.to(dtype), y.to(dtype)


def d2sm_truth(x, y, mode, eps, gup):
    """CPU float64 ``d2sm_reference`` with autograd: (loss, grad of gup * loss wrt x)."""
    xr = x.detach().to("cpu", torch.float64).requires_grad_()
    loss = fastloss.d2sm_reference(xr, y.detach().to("cpu", torch.float64), mode=mode, eps=eps)
    loss.backward(torch.tensor(gup, dtype=torch.float64))
    return loss.detach(), xr.grad


def _d2sm_case(q, d, mode, dtype, knobs=(), seed=0):
    tol = D2SM_TOL[dtype]
    gup = 0.7e3  # not 1; the loss is O(1e-3)

    def run(backend, device, chk):
        x0, y0 = d2sm_inputs(q, d, dtype, seed + q)
        loss_t, gx_t = d2sm_truth(x0, y0, mode, 1e-6, gup)
        x, y = _to(x0, device).requires_grad_(), _to(y0, device)
        with contextlib.ExitStack() as stack:
            if backend == "triton":
                for knob in knobs:
                    stack.enter_context(_knob(*knob))
            poison(device)
            out = fastloss.d2sm_kl(x, y, mode=mode, backend=backend)
            out.backward(torch.tensor(gup, device=device, dtype=out.dtype))
        chk.close("loss", out, loss_t, tol)
        chk.close("grad pred", x.grad, gx_t, tol)

    return Case(f"d2sm_kl {mode} q={q} D={d}{' (triton: blocks of 16)' if knobs else ''}", "d2sm", dtype, run)


def _queue_case(queue_size, batch, d, mode, dtype, steps=None):
    tol = D2SM_TOL[dtype]
    steps = steps or (2 * queue_size) // batch + 2  # fill, then wrap twice

    def run(backend, device, chk):
        queue = fastloss.D2SMQueue(queue_size=queue_size, mode=mode, backend=backend).to(device)
        history_p, history_t = [], []
        g = _cpu_gen(queue_size + batch)
        for step in range(steps):
            xp = (torch.randn(batch, d, generator=g, dtype=torch.float64)).to(dtype)
            xt = (torch.randn(batch, d, generator=g, dtype=torch.float64) + 0.1 * xp.double()).to(dtype)
            keep = queue_size - batch
            earlier_p = torch.cat(history_p)[-keep:] if history_p and keep else xp[:0]
            earlier_t = torch.cat(history_t)[-keep:] if history_t and keep else xt[:0]
            setp, sett = torch.cat([xp, earlier_p]), torch.cat([xt, earlier_t])
            x = _to(xp, device).requires_grad_()
            poison(device)
            out = queue(x, _to(xt, device))
            out.backward(torch.tensor(0.7e3, device=device, dtype=out.dtype))
            if setp.shape[0] >= 2:
                loss_t, g_t = d2sm_truth(setp, sett, mode, 1e-6, 0.7e3)
                chk.close(f"step {step} loss", out, loss_t, tol)
                chk.close(f"step {step} grad", x.grad, g_t[:batch], tol)
            else:
                chk.true(f"step {step} loss of one row is 0", float(out.detach()) == 0.0)
            history_p.append(xp)
            history_t.append(xt)

    return Case(f"D2SMQueue {mode} size={queue_size} batch={batch} D={d} {steps} steps", "d2sm", dtype, run)


def _d2sm_cases(full):
    cases = []
    if full:
        for q in D2SM_Q_FULL:
            for mode in ("paper", "pkt"):
                for dtype in (torch.float32, torch.float64):
                    cases.append(_d2sm_case(q, 96, mode, dtype))
        for q in (37, 1025):
            for dtype in (torch.float16, torch.bfloat16):
                cases.append(_d2sm_case(q, 96, "paper", dtype))
        for mode in ("paper", "pkt"):
            for dtype in (torch.float32, torch.float64):
                cases.append(_queue_case(256, 24, 128, mode, dtype))
            cases.append(_queue_case(1100, 100, 64, mode, torch.float32, steps=14))  # a set over two blocks
        return cases
    for q in D2SM_Q_QUICK:
        for mode in ("paper", "pkt"):
            cases.append(_d2sm_case(q, 16, mode, torch.float32))
    cases += [_d2sm_case(37, 16, "paper", torch.float64), _d2sm_case(37, 16, "pkt", torch.bfloat16)]
    cases += [_d2sm_case(37, 16, mode, torch.float32, knobs=(("fastloss.kernels.d2sm", "TRITON_BLOCK_Q", 16),))
              for mode in ("paper", "pkt")]
    cases += [_queue_case(8, 3, 16, mode, torch.float32) for mode in ("paper", "pkt")]
    cases += [_queue_case(8, 3, 16, "paper", torch.float64)]
    return cases


# --------------------------------------------------------------------------- MDF
def mdf_weights(widths=(8, 8, 16), seed=0):
    """A random MDF set of len(widths) discriminators (BatchNorm statistics kept positive)."""
    from fastloss.mdf import MDFWeights, tensor_names

    g = _cpu_gen(seed)
    discs = []
    for n in widths:
        d = {}
        for k in tensor_names():
            if k.endswith("conv.weight"):
                shape = (n, 3 if k.startswith("head.") else n, 3, 3)
            else:
                shape = {"tail.weight": (1, n, 3, 3), "tail.bias": (1,)}.get(k, (n,))
            d[k] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
            if k.endswith("running_var") or k.endswith("norm.weight"):
                d[k] = d[k].abs() + 0.5
        discs.append({k: v.float() for k, v in d.items()})
    return MDFWeights(discs, tuple(widths))


def _mdf_case(shape, grouped, dtype, channels_last=False, target_grad=False):
    tol = MDF_TOL[dtype]

    def run(backend, device, chk):
        w = mdf_weights()
        g = _cpu_gen(sum(shape))
        x0 = torch.rand(shape, generator=g, dtype=torch.float64)
        y0 = (x0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        x0, y0 = x0.to(dtype), y0.to(dtype)
        if channels_last:
            x0, y0 = (t.contiguous(memory_format=torch.channels_last) for t in (x0, y0))
        truth = fastloss.MDFLoss(w, scales=3, backend="reference")
        xt = x0.detach().clone().double().requires_grad_()
        yt = y0.detach().clone().double().requires_grad_(target_grad)
        loss_t = truth(xt, yt)
        loss_t.backward(torch.tensor(0.7, dtype=torch.float64))
        crit = fastloss.MDFLoss(w, scales=3, backend=backend, grouped=grouped).to(device)
        x, y = _to(x0, device).requires_grad_(), _to(y0, device).requires_grad_(target_grad)
        poison(device)
        out = crit(x, y)
        out.backward(torch.tensor(0.7, device=device, dtype=out.dtype))
        chk.close("loss", out, loss_t.detach(), tol)
        # in norm: a pre-activation within rounding of 0 may take the other LeakyReLU branch
        chk.close("grad pred", x.grad, xt.grad, tol, "norm")
        if target_grad:
            chk.close("grad target", y.grad, yt.grad, tol, "norm")

    extra = (" grouped" if grouped else "") + (" channels_last" if channels_last else "") + (
        " target_grad" if target_grad else "")
    return Case(f"mdf {tuple(shape)}{extra}", "mdf", dtype, run)


def _mdf_cases(full):
    if full:
        cases = []
        for shape in ((1, 3, 11, 11), (2, 3, 33, 57), (4, 3, 128, 128)):
            for grouped in (False, True):
                for dtype in DTYPES.values():
                    cases.append(_mdf_case(shape, grouped, dtype))
        for dtype in DTYPES.values():
            cases.append(_mdf_case((2, 3, 40, 37), True, dtype, channels_last=True, target_grad=True))
            cases.append(_mdf_case((2, 3, 40, 37), False, dtype, target_grad=True))
        return cases
    return [_mdf_case((1, 3, 11, 11), False, torch.float32), _mdf_case((2, 3, 17, 23), True, torch.float32),
            _mdf_case((1, 3, 11, 11), True, torch.float64, target_grad=True),
            _mdf_case((2, 3, 13, 12), False, torch.float32, channels_last=True, target_grad=True),
            _mdf_case((1, 3, 11, 11), False, torch.bfloat16)]


# --------------------------------------------------------------------------- whole-step cases
def _step_fns(loss):
    """(make inputs on the CPU, the loss's forward ``fwd(backend, x, y) -> loss``) of a small
    training step of ``loss``; ``_step`` runs it with the backward."""
    if loss == "pdl":
        def make():
            return pdl_inputs(2, 3, 4096, torch.float32, "contiguous", "zeros", 7)

        def fwd(backend, x, y):
            return fastloss.pdl(x, y, backend=backend)
    elif loss == "d2sm":
        def make():
            return d2sm_inputs(300, 64, torch.float32, 7)

        def fwd(backend, x, y):
            return fastloss.d2sm_kl(x, y, backend=backend)
    else:
        crits = {}

        def make():
            g = _cpu_gen(7)
            x = torch.rand(2, 3, 40, 37, generator=g)
            return x, (x + 0.1 * torch.randn(2, 3, 40, 37, generator=g)).clamp(0, 1)

        def fwd(backend, x, y):
            key = (backend, x.device, x.dtype)
            if key not in crits:  # built outside any compiled region by a first eager call
                crits[key] = fastloss.MDFLoss(mdf_weights(), scales=3, backend=backend).to(x.device)
            return crits[key](x, y)
    return make, fwd


def _step(fwd, backend, x, y):
    """(loss, gradient of pred) of one forward+backward."""
    x = x.detach().requires_grad_()
    out = fwd(backend, x, y)
    (gx,) = torch.autograd.grad(out, x)
    return out.detach(), gx


def _determinism_case(loss):
    def run(backend, device, chk):
        if loss != "pdl" and backend != "cpu":
            raise NotApplicable(f"the README promises bitwise determinism for {loss} on the cpu backend only")
        make, fwd = _step_fns(loss)
        x0, y0 = make()
        x, y = _to(x0, device), _to(y0, device)
        runs = []
        with _deterministic():
            for _ in range(3):
                poison(device)
                runs.append(_step(fwd, backend, x, y))
        same = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))
        chk.true("3 runs bitwise identical", same)

    return Case(f"{loss} determinism (3 runs, use_deterministic)", loss, torch.float32, run)


@contextlib.contextmanager
def _deterministic():
    was = _backend._deterministic[0]
    fastloss.use_deterministic(True)
    try:
        yield
    finally:
        fastloss.use_deterministic(was)


def _truth_step(loss, x, y):
    """The same step on the CPU in float64 on the reference backend."""
    _, fwd = _step_fns(loss)
    return _step(fwd, "reference", x.double(), y.double())


def _compare_step(chk, label, got, truth, tol):
    chk.close(f"{label} loss", got[0], truth[0], tol)
    chk.close(f"{label} grad", got[1], truth[1], tol, "norm")


def _compile_case(loss):
    tol = {"pdl": TOL, "d2sm": D2SM_TOL, "mdf": MDF_TOL}[loss][torch.float32]

    def run(backend, device, chk):
        make, fwd = _step_fns(loss)
        x0, y0 = make()
        truth = _truth_step(loss, x0, y0)
        x, y = _to(x0, device), _to(y0, device)
        _step(fwd, backend, x, y)  # eager first: loads, builds the loss's caches
        torch._dynamo.reset()
        compiled = torch.compile(lambda u, v: fwd(backend, u, v), fullgraph=True)
        poison(device)
        _compare_step(chk, "compiled", _step(lambda _b, u, v: compiled(u, v), backend, x, y), truth, tol)

    return Case(f"{loss} torch.compile(fullgraph=True) step", loss, torch.float32, run)


def _cuda_only(device):
    if torch.device(device).type != "cuda":
        raise NotApplicable("a CUDA-only case")


def _side_stream_case(loss):
    tol = {"pdl": TOL, "d2sm": D2SM_TOL, "mdf": MDF_TOL}[loss][torch.float32]

    def run(backend, device, chk):
        _cuda_only(device)
        make, fwd = _step_fns(loss)
        x0, y0 = make()
        truth = _truth_step(loss, x0, y0)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # inputs produced on the side stream by a long kernel chain, consumed there
            xs = _to(x0, device)
            for _ in range(20):
                xs = xs * 1.0 + 0.0
            got = _step(fwd, backend, xs, _to(y0, device))
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        _compare_step(chk, "side stream", got, truth, tol)

    return Case(f"{loss} step on a side stream", loss, torch.float32, run)


def _second_device_case(loss):
    tol = {"pdl": TOL, "d2sm": D2SM_TOL, "mdf": MDF_TOL}[loss][torch.float32]

    def run(backend, device, chk):
        _cuda_only(device)
        if torch.cuda.device_count() < 2:
            raise NotApplicable("needs two CUDA devices")
        make, fwd = _step_fns(loss)
        x0, y0 = make()
        truth = _truth_step(loss, x0, y0)
        with torch.cuda.device(0):
            got = _step(fwd, backend, _to(x0, "cuda:1"), _to(y0, "cuda:1"))
        chk.true("outputs on cuda:1", got[0].device == torch.device("cuda:1"))
        _compare_step(chk, "cuda:1", got, truth, tol)

    return Case(f"{loss} on cuda:1 while cuda:0 is current", loss, torch.float32, run)


def _training_step(loss, backend, device):
    """A module, its loss object and a step function ``step(x, y) -> loss`` that also runs the
    backward into the module's parameters (the step a training loop runs)."""
    net = torch.nn.Conv2d(3, 3, 3, padding=1).to(device)
    if loss == "pdl":
        crit = lambda u, v: fastloss.pdl(net(u), v, backend=backend)  # noqa: E731
        shape = (2, 3, 32, 48)
    elif loss == "d2sm":
        queue = fastloss.D2SMQueue(queue_size=16, backend=backend).to(device)
        crit = lambda u, v: queue(net(u).flatten(1), v.flatten(1))  # noqa: E731
        shape = (4, 3, 8, 8)
    else:
        mdf = fastloss.MDFLoss(mdf_weights(), scales=3, backend=backend).to(device)
        crit = lambda u, v: mdf(net(u).clamp(0, 1), v)  # noqa: E731
        shape = (2, 3, 24, 24)

    def step(x, y):
        out = crit(x, y)
        out.backward()
        return out.detach()

    return net, step, shape


def _sync_debug_case(loss):
    def run(backend, device, chk):
        _cuda_only(device)
        net, step, shape = _training_step(loss, backend, device)
        g = _cpu_gen(3)
        x, y = torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device)
        for _ in range(3):  # warm-up: first-call loads, JIT compiles, queue allocation
            step(x, y)
        torch.cuda.synchronize(device)
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                step(x, y)
            ok, why = True, ""
        except RuntimeError as e:
            ok, why = False, str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(old)
        chk.true(f"no host sync in a training step{(': ' + why) if why else ''}", ok)

    return Case(f"{loss} training step under set_sync_debug_mode('error')", loss, torch.float32, run)


def _cuda_graph_case(loss):
    tol = {"pdl": TOL, "d2sm": D2SM_TOL, "mdf": MDF_TOL}[loss][torch.float32]

    def run(backend, device, chk):
        _cuda_only(device)
        net, step, shape = _training_step(loss, backend, device)
        g = _cpu_gen(5)
        batches = [(torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device))
                   for _ in range(6)]
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        # warm-up on a side stream (as torch.cuda.graphs asks), then the eager twin is a copy of
        # this state: module, queue, gradients
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for x, y in batches[:2]:
                step(x, y)
        torch.cuda.current_stream(device).wait_stream(side)
        static_x, static_y = batches[2][0].clone(), batches[2][1].clone()
        eager_net, eager_step, _ = _training_step(loss, backend, device)
        eager_net.load_state_dict(net.state_dict())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_x, static_y)
        # the eager twin replays the same history: the two warm-up steps, then the batches
        for x, y in batches[:2]:
            eager_step(x, y)
        for i, (x, y) in enumerate(batches[2:]):
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            ref = eager_step(x, y)
            chk.close(f"replay {i} loss", static_out, ref, tol)

    return Case(f"{loss} CUDA-graph capture and replay of a training step", loss, torch.float32, run)


def _whole_step_cases():
    cases = []
    for loss in ("pdl", "d2sm", "mdf"):
        cases += [_determinism_case(loss), _compile_case(loss), _side_stream_case(loss),
                  _second_device_case(loss), _sync_debug_case(loss), _cuda_graph_case(loss)]
    return cases


# --------------------------------------------------------------------------- the run
@dataclass
class Case:
    name: str
    loss: str
    dtype: torch.dtype
    run: Callable = field(repr=False)

    @property
    def label(self):
        return f"{self.name} [{_DTYPE_NAMES[self.dtype]}]"


def cases(full=False):
    """The case list: ``full`` for the GPU acceptance run, else the quick one the CPU suite runs."""
    out = _pdl_cases(full) + _d2sm_cases(full) + _mdf_cases(full)
    if full:
        out += _whole_step_cases()
    return out


def select(all_cases, shard=(1, 1), dtypes=None, losses=None):
    """The cases of shard K of N (every N-th, so that shards mix cheap and costly cases)."""
    k, n = shard
    picked = [c for c in all_cases if (dtypes is None or c.dtype in dtypes) and (losses is None or c.loss in losses)]
    return picked[k - 1::n]


@dataclass
class Result:
    case: str
    loss: str
    backend: str
    device: str
    dtype: str
    status: str                      # "pass", "fail", "error", "not run", "n/a"
    errors: dict
    tolerance: dict
    max_error: Optional[float]
    seconds: float
    detail: str = ""


def _run_one(case, backend, device):
    why = _backend.why_not(backend, torch.device(device), case.dtype)
    if why is not None:
        return Result(case.label, case.loss, backend, str(device), _DTYPE_NAMES[case.dtype], "not run", {}, {},
                      None, 0.0, why)
    chk = Checker()
    t0 = time.perf_counter()
    status, detail = "pass", ""
    try:
        case.run(backend, device, chk)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        if not chk.errors:
            status, detail = "error", "the case compared nothing"
        elif not chk.passed():
            status = "fail"
    except NotApplicable as e:
        status, detail = "n/a", str(e)
    except NotRunnable as e:
        status, detail = "not run", str(e)
    except _backend.BackendError as e:  # the backend runs (checked above) but not this op's dtype
        status, detail = "n/a", str(e)
    except Exception as e:  # a crash of a fast path is a failure, reported with its message
        status, detail = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    seconds = time.perf_counter() - t0
    errs = list(chk.errors.values())
    return Result(case.label, case.loss, backend, str(device), _DTYPE_NAMES[case.dtype], status, dict(chk.errors),
                  dict(chk.tolerances), max(errs) if errs else None, seconds, detail)


def exit_code(results, requested_unusable):
    """0 all ran and passed; 1 any mismatch or error; 2 something requested did not run, or nothing ran."""
    if any(r.status in ("fail", "error") for r in results):
        return EXIT_MISMATCH
    ran = [r for r in results if r.status == "pass"]
    if requested_unusable or not ran:
        return EXIT_NOT_RUN
    if any(r.status == "not run" for r in results):
        return EXIT_NOT_RUN
    return EXIT_PASS


def _worst(r):
    """The check closest to (or furthest past) its tolerance, among those with a tolerance."""
    def ratio(k):
        e, t = r.errors[k], r.tolerance[k]
        return (0.0 if e == 0 else math.inf) if t == 0 else e / t
    keys = [k for k in r.errors if r.tolerance[k] > 0 or r.errors[k] > 0]
    return max(keys, key=ratio, default=None)


def _fmt(v):
    return "-" if v is None else ("inf" if v == math.inf else f"{v:.2e}")


def run(device=None, full=False, backends=None, dtypes=None, losses=None, shard=(1, 1), out=sys.stdout,
        case_list=None):
    """Run the acceptance cases; return ``(exit code, [Result])``. ``backends=None``: every fast
    backend that can run on ``device``; named backends that cannot run make the exit code 2."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    explicit = backends is not None
    names = [b for b in (backends or FAST_BACKENDS) if b != "reference"]
    reasons = {b: _backend.why_not(b, device, torch.float32) for b in names}
    usable = [b for b in names if reasons[b] is None]
    unusable = {b: why for b, why in reasons.items() if why is not None}
    todo = select(case_list if case_list is not None else cases(full), shard, dtypes, losses)
    print(f"fastloss selftest ({'full' if full else 'quick'}, shard {shard[0]}/{shard[1]}: {len(todo)} cases) "
          f"on {device}; backends: {', '.join(usable) or 'none'}", file=out)
    for b, why in unusable.items():
        print(f"  {'CANNOT RUN' if explicit else 'skipped'} {b}: {why}", file=out)
    print(f"{'case':<64} {'backend':<7} {'max err':>9} {'tol':>8} {'s':>6} result", file=out, flush=True)
    results = []
    with no_tf32():
        for case in todo:
            for b in usable:
                r = _run_one(case, b, device)
                results.append(r)
                worst = _worst(r)
                line = (f"{r.case:<64} {b:<7} {_fmt(r.errors.get(worst)):>9} {_fmt(r.tolerance.get(worst)):>8} "
                        f"{r.seconds:>6.2f} "
                        f"{r.status.upper()}")
                if r.status == "fail":
                    bad = [k for k in r.errors if r.errors[k] > r.tolerance[k]]
                    line += "  (" + "; ".join(f"{k}: {_fmt(r.errors[k])} > {_fmt(r.tolerance[k])}" for k in bad) + ")"
                elif r.detail:
                    line += f"  ({r.detail})"
                print(line, file=out, flush=True)
    code = exit_code(results, explicit and bool(unusable))
    n = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "not run", "n/a")}
    counts = (f"{n['pass']} passed, {n['fail']} failed, {n['error']} errors, {n['not run']} not run, "
              f"{n['n/a']} not applicable")
    if not any(r.status in ("pass", "fail", "error") for r in results):
        print(f"nothing was tested: no fast backend ran ({counts})", file=out)
    elif code == EXIT_PASS:
        print(f"all passed: {counts} on {', '.join(usable)}", file=out)
    elif code == EXIT_MISMATCH:
        print(f"MISMATCHES: {counts}", file=out)
    else:
        print(f"INCOMPLETE: {counts}; a requested backend or case could not run", file=out)
    return code, results


def _shard(text):
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastloss.selftest", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default; what the CPU test suite runs)")
    size.add_argument("--full", action="store_true", help="every regime at full size, and the whole-step cases")
    ap.add_argument("--backends", nargs="+", choices=FAST_BACKENDS, help="default: every fast backend usable here")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: all four")
    ap.add_argument("--losses", nargs="+", choices=["pdl", "d2sm", "mdf"], help="default: all three")
    ap.add_argument("--shard", type=_shard, default=(1, 1), metavar="K/N", help="run every N-th case from the K-th")
    ap.add_argument("--json", metavar="FILE", help="write every case's result here")
    ap.add_argument("--list", action="store_true", help="print the case list and exit")
    args = ap.parse_args(argv)
    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else None
    if args.list:
        for c in select(cases(args.full), args.shard, dtypes, args.losses):
            print(c.label)
        return EXIT_PASS
    code, results = run(args.device, args.full, args.backends, dtypes, args.losses, args.shard)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"exit_code": code, "results": [
                {"name": r.case, "loss": r.loss, "backend": r.backend, "device": r.device, "dtype": r.dtype,
                 "status": r.status, "pass": r.status == "pass",
                 "errors": {k: (None if v == math.inf else v) for k, v in r.errors.items()},
                 "max_error": None if r.max_error in (None, math.inf) else r.max_error,
                 "tolerance": r.tolerance, "seconds": round(r.seconds, 4), "detail": r.detail}
                for r in results]}, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
