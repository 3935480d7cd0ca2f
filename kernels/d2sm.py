"""D2SM's fused pass in Triton: cosine kernel, row normalization, log, KL and the gradient with
respect to the similarities, over the similarity matrices of the pred and target rows.

Inputs: sp, st [q, q] (G' and G, symmetric, unit stride along a row), dots_p, dots_t [q] float64
(their row sums, sum_k G_ik), rows [N] int64 (the rows whose gradient is wanted; a row outside
the set gets a zero gradient row: the indices are not checked on the host, which would
synchronise), and optionally the set's size as a device tensor (a queue's fill level: the set
is then the leading q_live x q_live block of the buffers, read by the kernels). With
K = (G + 1) / 2:

    pkt:   R_i = (q + dots_i) / 2,                    j over all q,   scale = 1 / q^2
           P = K'_ij / R'_i, Q = K_ij / R_i,  term = -Q lg,  a = -Q / (P + eps)
    paper: R_i = (q + dots_i) / 2 - (G_ii + 1) / 2,   j != i,         scale = 1 / q
           P = K'_ij / R'_i, Q = K_ij / R_i,  term =  P lg,  a = lg + P / (P + eps)
    lg = log((P + eps) / (Q + eps)),  loss = scale sum_ij term,  c_i = scale sum_j a_ij P_ij
    W_ij = dL/dG'_ij = (scale a_ij - c_i) / (2 R'_i)             (0 on the diagonal in paper mode)
    grad_rows[n, j] = W_bj + W_jb,  b = rows[n]

Two kernels, the contract of the C++ CPU op (csrc/cpu/d2sm.cpp):

- ``_d2sm_rows_kernel``, one program per row i, loops over the row in blocks of BLOCK_Q:
  1/R'_i, 1/R_i, c_i and the row's loss.
- ``_d2sm_grad_kernel``, one program per (requested row, block of BLOCK_Q columns): W_bj from
  row b's values and W_jb from the same entries (G is symmetric) with row j's 1/R and c.

Precision, as on the CPU: 1/R and the log argument are formed in float64 and the row sums
accumulate in float64 (a row's KL is a small sum of terms of both signs: a float32 1/R would shift
every log of the row by the same rounding error). No atomics: the loss is the float64 sum of the
per-row losses, so results are deterministic.
float32 and float64 only (the caller casts half inputs to float32 first). eps travels as a
one-element tensor of the compute dtype (Triton would make a Python float an fp32 scalar).
The launchers run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before
triton was imported.
"""

import torch
import triton
import triton.language as tl

from .. import _ops

__all__ = ["d2sm_forward", "TRITON_BLOCK_Q"]

# Columns per block of both kernels' loops.
TRITON_BLOCK_Q = 1024
_EPS = _ops.DeviceCache(max_entries=64)  # eps as a one-element tensor per (eps, dtype, device)


@triton.jit
def _entry(kp, kt, ip, it, eps, PAPER: tl.constexpr):
    """(P, loss term, a = dL/dP / scale) of one entry from its kernels kp, kt and its row's 1/R
    (float64); the log argument (P + eps) / (Q + eps) is formed in float64."""
    P = kp * ip.to(kp.dtype)
    Q = kt * it.to(kt.dtype)
    eps64 = eps.to(tl.float64)
    x = (kp.to(tl.float64) * ip + eps64) / (kt.to(tl.float64) * it + eps64)
    lg = tl.log(x.to(kp.dtype))
    if PAPER:
        term = P * lg
        a = lg + P / (P + eps)
    else:
        term = -Q * lg
        a = -Q / (P + eps)
    return P, term, a


@triton.jit
def _d2sm_rows_kernel(
    sp_ptr, st_ptr,                # [q, q] strided rows, compute dtype
    dots_p_ptr, dots_t_ptr,        # [q] float64
    eps_ptr,                       # [1]
    inv_p_ptr, inv_t_ptr, c_ptr,   # [q] float64 out: 1/R'_i, 1/R_i, c_i
    row_loss_ptr,                  # [q] float64 out: scale * sum_j term_ij
    q_ptr,                         # [] int64: the live set size (LIVE_Q), else unused
    q, sp_stride, st_stride,
    PAPER: tl.constexpr, LIVE_Q: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    eps = tl.load(eps_ptr)
    q_set = q
    if LIVE_Q:  # rows [0, q_live) of the [q, q] buffers form the set; none below 2 rows
        q_live = tl.minimum(tl.maximum(tl.load(q_ptr), 0), q)
        q_set = tl.where(q_live >= 2, q_live, 0)
        q_set = tl.where(i < q_set, q_set, 0)  # 0 for a row outside the set: no loop, zero outputs
        q = tl.maximum(q_set, 2)  # what the normalizers and the scale see there (unused)
    qf = q.to(eps.dtype)
    if PAPER:
        scale = 1.0 / qf
    else:
        scale = 1.0 / (qf * qf)
    sp_row = sp_ptr + i * sp_stride
    st_row = st_ptr + i * st_stride
    q64 = q.to(tl.float64)
    rp = (q64 + tl.load(dots_p_ptr + i)) * 0.5
    rt = (q64 + tl.load(dots_t_ptr + i)) * 0.5
    if PAPER:
        rp -= (tl.load(sp_row + i).to(tl.float64) + 1.0) * 0.5
        rt -= (tl.load(st_row + i).to(tl.float64) + 1.0) * 0.5
    ip = 1.0 / rp
    it = 1.0 / rt
    if LIVE_Q:
        ip = tl.where(q_set > 0, ip, 1.0)
        it = tl.where(q_set > 0, it, 1.0)
    acc_loss = tl.zeros([BLOCK_Q], tl.float64)
    acc_c = tl.zeros([BLOCK_Q], tl.float64)
    for start in range(0, q_set, BLOCK_Q):
        offs = start + tl.arange(0, BLOCK_Q)
        mask = offs < q_set
        if PAPER:
            mask = mask & (offs != i)
        kp = (tl.load(sp_row + offs, mask=mask, other=0.0) + 1.0) * 0.5
        kt = (tl.load(st_row + offs, mask=mask, other=0.0) + 1.0) * 0.5
        P, term, a = _entry(kp, kt, ip, it, eps, PAPER)
        acc_loss += tl.where(mask, term, 0.0).to(tl.float64)
        acc_c += tl.where(mask, a * P, 0.0).to(tl.float64)
    tl.store(row_loss_ptr + i, tl.sum(acc_loss, axis=0) * scale.to(tl.float64))
    tl.store(c_ptr + i, tl.sum(acc_c, axis=0) * scale.to(tl.float64))
    tl.store(inv_p_ptr + i, ip)
    tl.store(inv_t_ptr + i, it)


@triton.jit
def _d2sm_grad_kernel(
    sp_ptr, st_ptr,                # [q, q] strided rows
    inv_p_ptr, inv_t_ptr, c_ptr,   # [q] float64, from _d2sm_rows_kernel
    rows_ptr,                      # [N] int64
    eps_ptr,                       # [1]
    out_ptr,                       # [N, q] out: grad_rows, contiguous
    q_ptr,                         # [] int64: the live set size (LIVE_Q), else unused
    q, sp_stride, st_stride,
    PAPER: tl.constexpr, LIVE_Q: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    out_mask = offs < q
    q_set = q
    if LIVE_Q:  # rows and columns [0, q_live) of the [q, q] buffers form the set; none below 2 rows
        q_live = tl.minimum(tl.maximum(tl.load(q_ptr), 0), q)
        q_set = tl.where(q_live >= 2, q_live, 0)
    eps = tl.load(eps_ptr)
    qf = tl.maximum(q_set, 1).to(eps.dtype)
    if PAPER:
        scale = 1.0 / qf
    else:
        scale = 1.0 / (qf * qf)
    # a row outside [0, q) (or any row of an empty set) gets a zero gradient row, as on CUDA:
    # checking the indices on the host would synchronise
    b = tl.load(rows_ptr + n)
    valid = (b >= 0) & (b < q_set)
    b = tl.where(valid, b, 0)
    mask = offs < tl.where(valid, q_set, 0)  # (a scalar & a block mask trips the interpreter)
    kp = (tl.load(sp_ptr + b * sp_stride + offs, mask=mask, other=0.0) + 1.0) * 0.5
    kt = (tl.load(st_ptr + b * st_stride + offs, mask=mask, other=0.0) + 1.0) * 0.5
    ipb = tl.load(inv_p_ptr + b)  # b is in [0, q): row 0 stands in for an invalid row
    itb = tl.load(inv_t_ptr + b)
    cb = tl.load(c_ptr + b)
    ipj = tl.load(inv_p_ptr + offs, mask=mask, other=1.0)
    itj = tl.load(inv_t_ptr + offs, mask=mask, other=1.0)
    cj = tl.load(c_ptr + offs, mask=mask, other=0.0)
    _, _, a1 = _entry(kp, kt, ipb, itb, eps, PAPER)  # row b: P_bj, Q_bj
    _, _, a2 = _entry(kp, kt, ipj, itj, eps, PAPER)  # row j: P_jb, Q_jb (G is symmetric)
    # a - c in float64: c_i is a row constant, and a rounding of it would shift a whole row of W
    s64 = scale.to(tl.float64)
    w = ((s64 * a1.to(tl.float64) - cb) * ipb + (s64 * a2.to(tl.float64) - cj) * ipj) * 0.5
    w = tl.where(mask, w, 0.0)
    if PAPER:
        w = tl.where(offs == b, 0.0, w)
    tl.store(out_ptr + n * q + offs, w.to(kp.dtype), mask=out_mask)


def _interpreting():
    return _ops.interpreting(_d2sm_rows_kernel)


def _unit_row_stride(x):
    return x if x.stride(1) == 1 else x.contiguous()


def d2sm_forward(sp, st, dots_p, dots_t, rows, paper, eps, q_live=None):
    """(loss 0-dim, grad_rows [N, q]) of the D2SM fused pass; see the module docstring.

    ``q_live``: None (the set is all q rows), or a 0-dim int64 tensor on the device holding the
    set's size: then rows and columns [0, q_live) of the [q, q] buffers form the set, read by the
    kernels (no host synchronisation), and the rest of grad_rows is 0; a set of fewer than 2 rows
    gives a zero loss and zero gradients. Rows outside the set get a zero gradient row.
    """
    if sp.dim() != 2 or sp.shape[0] != sp.shape[1] or st.shape != sp.shape:
        raise ValueError(f"d2sm (triton): sp and st must be [q, q] of one shape: {tuple(sp.shape)} vs {tuple(st.shape)}")
    if sp.dtype not in (torch.float32, torch.float64) or st.dtype != sp.dtype:
        raise TypeError(f"d2sm (triton): sp and st must be float32 or float64 of one dtype, got {sp.dtype}, {st.dtype}")
    if dots_p.dtype != torch.float64 or dots_t.dtype != torch.float64:
        raise TypeError(f"d2sm (triton): dots_p and dots_t must be float64, got {dots_p.dtype}, {dots_t.dtype}")
    q = sp.shape[0]
    if q < 2:
        raise ValueError(f"d2sm (triton): needs at least 2 rows, got q={q}")
    if dots_p.numel() != q or dots_t.numel() != q:
        raise ValueError(f"d2sm (triton): dots_p and dots_t must have q={q} entries")
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"d2sm (triton): rows must be 1-D int64, got {rows.dtype} of shape {tuple(rows.shape)}")
    if q_live is not None and (q_live.dtype != torch.int64 or q_live.numel() != 1 or q_live.device != sp.device):
        raise TypeError(f"d2sm (triton): q_live must be a one-element int64 tensor on {sp.device}, got "
                        f"{q_live.dtype} of shape {tuple(q_live.shape)} on {q_live.device}")
    if sp.device.type == "cpu" and not _interpreting():
        raise ValueError("d2sm (triton): CPU tensors need TRITON_INTERPRET=1 set before triton is imported "
                         "(use the C++ CPU op instead)")
    n = rows.numel()
    dtype, dev = sp.dtype, sp.device
    sp, st = _unit_row_stride(sp), _unit_row_stride(st)
    dots_p, dots_t, rows = dots_p.contiguous(), dots_t.contiguous(), rows.contiguous()
    eps_t = _EPS.get((float(eps), dtype, dev), lambda: torch.full((1,), eps, dtype=dtype, device=dev),
                     _ops.capturing(dev))  # a fill (one more launch) the first time only
    inv_p = torch.empty(q, dtype=torch.float64, device=dev)     # [q] 1 / R'_i
    inv_t = torch.empty(q, dtype=torch.float64, device=dev)     # [q] 1 / R_i
    c = torch.empty(q, dtype=torch.float64, device=dev)         # [q] scale * sum_j a_ij P_ij
    row_loss = torch.empty(q, dtype=torch.float64, device=dev)  # [q]
    grad_rows = torch.empty((n, q), dtype=dtype, device=dev)  # [N, q]
    block = min(triton.next_power_of_2(q), TRITON_BLOCK_Q)
    live = q_live is not None
    q_arg = q_live.reshape(()) if live else row_loss  # any pointer when the set is all q rows
    with _ops.device_guard(sp):
        _d2sm_rows_kernel[(q,)](
            sp, st, dots_p, dots_t, eps_t, inv_p, inv_t, c, row_loss, q_arg,
            q, sp.stride(0), st.stride(0),
            PAPER=bool(paper), LIVE_Q=live, BLOCK_Q=block, num_warps=4,
        )
        if n:
            _d2sm_grad_kernel[(n, triton.cdiv(q, block))](
                sp, st, inv_p, inv_t, c, rows, eps_t, grad_rows, q_arg,
                q, sp.stride(0), st.stride(0),
                PAPER=bool(paper), LIVE_Q=live, BLOCK_Q=block, num_warps=4,
            )
    loss = row_loss.sum().to(dtype)
    return loss, grad_rows
