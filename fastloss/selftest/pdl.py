"""PDL cases: inputs (ReLU ties, +-0.0, NaNs of both signs; three layouts), the CPU float64 ground
truth of the fast ops' contract, and the case list over every dispatch regime."""
import contextlib
import math

import torch

import fastloss

from .harness import DTYPES, Case, _cpu_gen, _knob, _to, poison
from .tolerances import TOL

# PDL row lengths: both sides of every CUDA tile and Triton block, the single-program cap
# (kernels/pdl.py TRITON_MAX_SORT_N),
# the torch.sort fallback past it, and an image-sized row (224 x 224).
PDL_N_FULL = (1, 35, 129, 300, 513, 1025, 2048, 2049, 4096, 4097, 8192, 8193, 50176)
PDL_N_QUICK = (1, 35)   # under the Triton interpreter every sort stage costs seconds


def _neg_nan(dtype):
    """A NaN with the sign bit set, in ``dtype``, made from its bit pattern."""
    bits = {torch.float64: (torch.int64, -(1 << 51)),      # 0xFFF8000000000000
            torch.float32: (torch.int32, -0x400000),           # 0xFFC00000
            torch.float16: (torch.int16, -0x200),              # 0xFE00
            torch.bfloat16: (torch.int16, -0x40)}[dtype]       # 0xFFC0
    v = torch.tensor([bits[1]], dtype=bits[0]).view(dtype)
    assert torch.isnan(v).all() and v.view(bits[0])[0] < 0
    return v



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
