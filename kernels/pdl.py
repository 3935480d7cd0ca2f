"""PDL (projected distribution loss) in Triton: forward and permutation-cached backward.

For each row r = b*C + c of pred, target [B, C, N] (any strides):

    W[r] = (1/N) sum_i |sort(pred[r])_i - sort(target[r])_i|^p,      p in {1, 2}
    d    = sort(pred[r]) - sort(target[r])                           (rank order)
    dW/d(sorted pred)_i = p |d_i|^(p-1) sign(d_i) / N
    grad_pred[r, perm[r, i]]     =  g[r] * deriv[r, i] / N
    grad_target[r, perm_t[r, i]] = -g[r] * deriv[r, i] / N

with deriv = sign(d) (int8, sign(NaN) = 0) for p = 1 and 2 d (accumulation dtype) for p = 2.
The contract (shapes, dtypes, orderings) is the one of the C++ CPU op in csrc/cpu/pdl.cpp.

Ordering. A value's sort key is its bit pattern after folding -0.0 into +0.0 and every NaN into
the positive quiet NaN, with the sign bit set for positives and all bits flipped for negatives
(csrc/cpu/radix_sort.h), so that unsigned order equals float order and NaN sorts last. Rows of
at most ``TRITON_MAX_SORT_N`` (2048) elements of float32 / float16 / bfloat16 (computed in
float32) are sorted inside one program: ``key << 32 | index`` as one uint64 and a single
``tl.sort``; the index breaks ties, so the order is stable and the same sort gives both the
sorted values and the permutation. float64 rows (computed in float64), whose key needs all 64
bits, always take the torch.sort ordering below: a (key, index) pair network in registers
spilled and compiled for over a minute (issue 13), and float64 is the validation dtype.

Rows are padded to BLOCK_N (a power of two, at least 2) with key 0xFF..F and index >= N, which
sort after every real element (a real key never reaches 0xFF..F: NaN is canonical).

Longer rows take the ordering from ``torch.sort(stable=True)`` on the data with -0.0 and NaN
canonicalised as the keys are (``sort_input``; CUDA's radix sort orders bit patterns); a Triton
kernel then gathers the values in that order and fuses the difference, the reduction and deriv,
looping over the row in blocks of ``TRITON_LOOP_BLOCK_N``. Both constants are module variables
so that tests can lower them.

Inputs are never copied to contiguous memory: kernels take the three strides of each input.
The launchers run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before
triton was imported. Within a row the float32 reduction is a tree sum in float32 (the CPU op
sums in double), so w can differ from it in the last bits.
"""

import torch
import triton
import triton.language as tl

from .. import _ops

__all__ = ["pdl_forward", "pdl_backward", "TRITON_MAX_SORT_N", "TRITON_LOOP_BLOCK_N"]

# Longest row one program sorts; past it the ordering comes from torch.sort. Compiled ahead of time
# for sm_80 / sm_90 (benchmarks/gpu_static.py), the in-register bitonic network spilled at 8192 (76-196
# bytes in float32, 636-708 in float64, issue 13) and took over a minute of JIT for one float64
# variant; at 2048 float32 spills nothing (80-112 registers); float64's pair network at 2048 needed
# 150 registers and ~57 s of compile (at 512, 96 registers and over a minute under load), so float64
# always takes the torch.sort ordering. Inductor caps its Triton sort at 256 per row for the same
# reason (pytorch/pytorch#128458).
TRITON_MAX_SORT_N = 2048
# Block of the loops in the torch.sort fallback and in the backward.
TRITON_LOOP_BLOCK_N = 1024

_ACC_DTYPES = {
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float64: torch.float64,
}


# ----------------------------------------------------------------------------------------------
# order-preserving keys
# ----------------------------------------------------------------------------------------------


@triton.jit
def _key32(x):
    """float32 -> uint32 key; -0.0 -> +0.0, NaN -> 0x7FC00000, then unsigned order = float order."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(x == 0.0, tl.zeros_like(bits), bits)
    bits = tl.where(x != x, tl.full(bits.shape, 0x7FC00000, tl.uint32), bits)
    neg = (bits & 0x80000000) != 0
    return tl.where(neg, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # (xor: Triton 3.6's interpreter overflows on ~)


@triton.jit
def _value32(key):
    bits = tl.where((key & 0x80000000) != 0, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _div_rn(x, n):
    """x / n correctly rounded (IEEE): Triton's fp32 ``/`` compiles to an approximate division on
    a GPU (div.full.f32), which would break the bit-equality with the CPU op; fp64 ``/`` is IEEE.
    n is a runtime integer or, when the launcher passed 1, the compile-time constant 1 that Triton
    specialises it to: ``tl.cast`` takes both (``n.to`` does not exist on a constexpr)."""
    if x.dtype == tl.float32:
        return tl.math.div_rn(x, tl.cast(n, tl.float32))
    else:
        return x / tl.cast(n, x.dtype)


# ----------------------------------------------------------------------------------------------
# forward, one program per row, sort in registers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_row(x_ptr, row, C, stride_b, stride_c, stride_n, offs, mask, IS_F64: tl.constexpr):
    b = row // C
    c = row - b * C
    x = tl.load(x_ptr + b * stride_b + c * stride_c + offs.to(tl.int64) * stride_n, mask=mask, other=0)
    if IS_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _store_rank_outputs(d, row, N, offs, mask, w_ptr, deriv_ptr, P: tl.constexpr):
    # d [BLOCK_N] acc dtype, sorted pred - sorted target in rank order; 0 past N
    d = tl.where(mask, d, 0.0)
    if P == 1:
        total = tl.sum(tl.abs(d), axis=0)
        sign = (d > 0).to(tl.int8) - (d < 0).to(tl.int8)  # sign(NaN) = 0
        tl.store(deriv_ptr + row * N + offs, sign, mask=mask)
    else:
        total = tl.sum(d * d, axis=0)
        tl.store(deriv_ptr + row * N + offs, 2.0 * d, mask=mask)
    tl.store(w_ptr + row, _div_rn(total, N))


@triton.jit
def _pdl_fwd_sort_kernel(
    pred_ptr, target_ptr,          # [B, C, N] strided, same dtype
    w_ptr,                         # [B*C] acc dtype
    perm_ptr, perm_t_ptr,          # [B*C, N] int32 (perm_t only when TARGET_GRAD)
    deriv_ptr,                     # [B*C, N] int8 (P=1) or acc dtype (P=2)
    C, N,
    pred_stride_b, pred_stride_c, pred_stride_n,
    target_stride_b, target_stride_c, target_stride_n,
    P: tl.constexpr, TARGET_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # float32 / float16 / bfloat16 inputs, computed in float32
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = _load_row(pred_ptr, row, C, pred_stride_b, pred_stride_c, pred_stride_n, offs, mask, False)
    y = _load_row(target_ptr, row, C, target_stride_b, target_stride_c, target_stride_n, offs, mask, False)
    pad = tl.full([BLOCK_N], 0xFFFFFFFF, tl.uint32)
    idx = offs.to(tl.uint64)
    sx = tl.sort((tl.where(mask, _key32(x), pad).to(tl.uint64) << 32) | idx)  # [BLOCK_N] key<<32|index
    kx = (sx >> 32).to(tl.uint32)
    ix = (sx & 0xFFFFFFFF).to(tl.int32)
    if TARGET_GRAD:
        sy = tl.sort((tl.where(mask, _key32(y), pad).to(tl.uint64) << 32) | idx)
        ky = (sy >> 32).to(tl.uint32)
        tl.store(perm_t_ptr + row * N + offs, (sy & 0xFFFFFFFF).to(tl.int32), mask=mask)
    else:
        ky = tl.sort(tl.where(mask, _key32(y), pad))
    d = _value32(kx) - _value32(ky)
    _store_rank_outputs(d, row, N, offs, mask, w_ptr, deriv_ptr, P)
    tl.store(perm_ptr + row * N + offs, ix, mask=mask)


# ----------------------------------------------------------------------------------------------
# forward past TRITON_MAX_SORT_N: ordering from torch.sort, gather + reduce here
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pdl_fwd_gather_kernel(
    pred_ptr, target_ptr,          # [B, C, N] strided, same dtype
    perm_ptr, order_t_ptr,         # [B*C, N] int32 stable argsorts of pred / target rows
    w_ptr,                         # [B*C] acc dtype
    deriv_ptr,                     # [B*C, N] int8 (P=1) or acc dtype (P=2)
    C, N,
    pred_stride_b, pred_stride_c, pred_stride_n,
    target_stride_b, target_stride_c, target_stride_n,
    P: tl.constexpr, IS_F64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // C
    c = row - b * C
    pred_row = pred_ptr + b * pred_stride_b + c * pred_stride_c
    target_row = target_ptr + b * target_stride_b + c * target_stride_c
    if IS_F64:
        acc = tl.zeros([BLOCK_N], tl.float64)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mask = offs < N
        ip = tl.load(perm_ptr + row * N + offs, mask=mask, other=0).to(tl.int64)
        it = tl.load(order_t_ptr + row * N + offs, mask=mask, other=0).to(tl.int64)
        x = tl.load(pred_row + ip * pred_stride_n, mask=mask, other=0)
        y = tl.load(target_row + it * target_stride_n, mask=mask, other=0)
        if IS_F64:
            d = x.to(tl.float64) - y.to(tl.float64)
        else:
            d = x.to(tl.float32) - y.to(tl.float32)
        d = tl.where(mask, d, 0.0)
        if P == 1:
            acc += tl.abs(d)
            sign = (d > 0).to(tl.int8) - (d < 0).to(tl.int8)
            tl.store(deriv_ptr + row * N + offs, sign, mask=mask)
        else:
            acc += d * d
            tl.store(deriv_ptr + row * N + offs, 2.0 * d, mask=mask)
    tl.store(w_ptr + row, _div_rn(tl.sum(acc, axis=0), N))


# ----------------------------------------------------------------------------------------------
# backward: scatter g * deriv / N through the saved permutations
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pdl_bwd_kernel(
    grad_w_ptr,                    # [B, C] strided (may be expanded)
    perm_ptr, perm_t_ptr,          # [B*C, N] int32
    deriv_ptr,                     # [B*C, N] int8 or acc dtype
    grad_pred_ptr, grad_target_ptr,  # [B*C, N] out dtype, contiguous
    C, N,
    grad_w_stride_b, grad_w_stride_c,
    NEED_PRED: tl.constexpr, NEED_TARGET: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // C
    c = row - b * C
    g = tl.load(grad_w_ptr + b * grad_w_stride_b + c * grad_w_stride_c)
    if IS_F64:
        gr = g.to(tl.float64) * _div_rn(tl.full([], 1.0, tl.float64), N)
    else:
        gr = g.to(tl.float32) * _div_rn(tl.full([], 1.0, tl.float32), N)  # 1/N as the CPU op rounds it
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mask = offs < N
        dv = tl.load(deriv_ptr + row * N + offs, mask=mask, other=0).to(gr.dtype)
        val = gr * dv
        if NEED_PRED:
            ip = tl.load(perm_ptr + row * N + offs, mask=mask, other=0)
            tl.store(grad_pred_ptr + row * N + ip, val.to(grad_pred_ptr.dtype.element_ty), mask=mask)
        if NEED_TARGET:
            it = tl.load(perm_t_ptr + row * N + offs, mask=mask, other=0)
            tl.store(grad_target_ptr + row * N + it, (-val).to(grad_target_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _interpreting():
    return _ops.interpreting(_pdl_bwd_kernel)


def _check_device(name, t):
    if t.device.type == "cpu" and not _interpreting():
        raise ValueError(
            f"pdl (triton): {name} is a CPU tensor; the Triton kernels need a GPU tensor, or "
            "TRITON_INTERPRET=1 set before triton is imported (use the C++ CPU op instead)"
        )


def sort_input(x):
    """x with -0.0 folded into +0.0 and every NaN made the positive quiet NaN, as the sort keys do:
    what the torch.sort fallback orders. CUDA's radix sort orders bit patterns, so it would put a
    negative-sign NaN first and -0.0 before +0.0 (a tie the stable order must keep in index order)."""
    x = x.masked_fill(x == 0, 0.0)
    return x.masked_fill(torch.isnan(x), float("nan"))


def _next_pow2(n):
    return max(2, triton.next_power_of_2(n))


def pdl_forward(pred, target, p, target_grad):
    """W[b,c] = (1/N) sum_i |sort(pred[b,c])_i - sort(target[b,c])_i|^p, per row, no reduction.

    Returns (w [B, C] acc dtype, perm [B, C, N] int32, perm_t [B, C, N] int32 or (0, C, N),
    deriv [B, C, N] int8 sign(d) for p=1 / acc-dtype 2d for p=2), acc = float64 for float64
    input, else float32. Orders are stable argsorts (-0.0 == +0.0, NaN last).
    """
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pdl: pred and target must be [B, C, N] of one shape: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if pred.dtype != target.dtype:
        raise TypeError(f"pdl: pred and target dtypes differ: {pred.dtype} vs {target.dtype}")
    if pred.dtype not in _ACC_DTYPES:
        raise TypeError(f"pdl: unsupported dtype {pred.dtype} (float32, float64, float16, bfloat16)")
    if p not in (1, 2):
        raise ValueError(f"pdl: p must be 1 or 2, got {p}")
    if pred.device != target.device:
        raise ValueError(f"pdl: pred and target devices differ: {pred.device} vs {target.device}")
    _check_device("pred", pred)
    B, C, N = pred.shape
    if not 1 <= N < 2**31:
        raise ValueError(f"pdl: N must be in [1, 2^31), got {N}")
    acc = _ACC_DTYPES[pred.dtype]
    is_f64 = acc == torch.float64
    dev = pred.device
    w = torch.empty((B, C), dtype=acc, device=dev)                                     # [B, C]
    perm = torch.empty((B, C, N), dtype=torch.int32, device=dev)                       # [B, C, N] argsort of pred rows
    perm_t = torch.empty((B if target_grad else 0, C, N), dtype=torch.int32, device=dev)  # argsort of target rows
    deriv = torch.empty((B, C, N), dtype=torch.int8 if p == 1 else acc, device=dev)    # [B, C, N] per rank
    if B * C == 0:
        return w, perm, perm_t, deriv

    with _ops.device_guard(pred):
        if N <= TRITON_MAX_SORT_N and not is_f64:
            block_n = _next_pow2(N)
            _pdl_fwd_sort_kernel[(B * C,)](
                pred, target, w, perm, perm_t if target_grad else perm, deriv,
                C, N,
                pred.stride(0), pred.stride(1), pred.stride(2),
                target.stride(0), target.stride(1), target.stride(2),
                P=p, TARGET_GRAD=bool(target_grad), BLOCK_N=block_n,
                num_warps=min(16, max(1, block_n // 256)),
            )
        else:
            perm.copy_(torch.sort(sort_input(pred), dim=-1, stable=True).indices)
            order_t = perm_t if target_grad else torch.empty((B, C, N), dtype=torch.int32, device=dev)
            order_t.copy_(torch.sort(sort_input(target), dim=-1, stable=True).indices)  # [B, C, N] argsort of target rows
            block_n = min(_next_pow2(N), _next_pow2(TRITON_LOOP_BLOCK_N))
            _pdl_fwd_gather_kernel[(B * C,)](
                pred, target, perm, order_t, w, deriv,
                C, N,
                pred.stride(0), pred.stride(1), pred.stride(2),
                target.stride(0), target.stride(1), target.stride(2),
                P=p, IS_F64=is_f64, BLOCK_N=block_n,
                num_warps=4,
            )
    return w, perm, perm_t, deriv


def pdl_backward(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype):
    """grad_pred[r, perm[r,i]] = g[r] deriv[r,i] / N, grad_target[r, perm_t[r,i]] = -(same).

    Returns contiguous [B, C, N] tensors of out_dtype, None where not needed.
    """
    if perm.dim() != 3 or deriv.shape != perm.shape:
        raise ValueError(f"pdl_backward: bad saved tensors: perm {tuple(perm.shape)}, deriv {tuple(deriv.shape)}")
    if need_target and perm_t.shape != perm.shape:
        raise ValueError(
            f"pdl_backward: target permutation was not saved: perm_t {tuple(perm_t.shape)} vs perm {tuple(perm.shape)}"
        )
    B, C, N = perm.shape
    if grad_w.dim() != 2 or tuple(grad_w.shape) != (B, C):
        raise ValueError(f"pdl_backward: grad_w must be [B, C] = {(B, C)}, got {tuple(grad_w.shape)}")
    if out_dtype not in _ACC_DTYPES:
        raise TypeError(f"pdl_backward: unsupported out_dtype {out_dtype}")
    acc = _ACC_DTYPES[out_dtype]
    if deriv.dtype != torch.int8 and deriv.dtype != acc:
        raise TypeError(f"pdl_backward: deriv dtype {deriv.dtype} does not match out_dtype {out_dtype} (want int8 or {acc})")
    _check_device("perm", perm)
    dev = perm.device
    gp = torch.empty((B, C, N), dtype=out_dtype, device=dev) if need_pred else None    # [B, C, N]
    gt = torch.empty((B, C, N), dtype=out_dtype, device=dev) if need_target else None  # [B, C, N]
    if B * C == 0 or N == 0 or not (need_pred or need_target):
        return gp, gt
    dummy = gp if gp is not None else gt
    with _ops.device_guard(perm):
        _pdl_bwd_kernel[(B * C,)](
            grad_w, perm, perm_t if need_target else perm, deriv,
            gp if need_pred else dummy, gt if need_target else dummy,
            C, N,
            grad_w.stride(0), grad_w.stride(1),
            NEED_PRED=bool(need_pred), NEED_TARGET=bool(need_target), IS_F64=acc == torch.float64,
            BLOCK_N=min(_next_pow2(N), _next_pow2(TRITON_LOOP_BLOCK_N)),
            num_warps=4,
        )
    return gp, gt
