"""MDF in Triton: the squared-difference reductions of all feature pairs, one launch each way.

Every feature tensor X_m [2B, C_m, H_m, W_m] holds pred (samples [0, B)) and target ([B, 2B)), each
sample dense in NCHW or NHWC; w_m [C_m] is the weight 1 / (C_f H W) of the feature owning channel c:

    loss[b]         = sum_m sum_c w_m[c] sum_{h,w} (X_m[b,c,h,w] - X_m[B+b,c,h,w])^2
    diff_m[b,c,h,w] = X_m[b,c,h,w] - X_m[B+b,c,h,w]           (written by the forward when asked)
    grad_m[b,c,h,w] = g[b] * 2 w_m[c] * diff_m[b,c,h,w]        (the backward, pred half)

The contract is the one of the C++ CPU op in csrc/cpu/mdf.cpp. All tensors go into one launch:
a shape table (int64 [M, 4] on the device: elements per sample, C, channel divisor (H*W for
NCHW, 1 for NHWC), first chunk), built once per device and shapes and cached, and the addresses
of the data, the weights and the outputs (diff or gradient) as tuples of kernel arguments, so
that a call copies nothing from the host. Program (k, b) finds the tensor that owns chunk k,
reduces or writes BLOCK elements of sample b, and the forward's partial sums [B, K] are added in
a fixed order afterwards (deterministic, no atomics). float16 / bfloat16 are computed in
float32, float64 in float64.

``bias_leaky_relu_(y, b, slope)`` is the fused epilogue of the fast path's convolutions on this
backend: ``y = LeakyReLU(y + b[c])`` in place, one pass over a convolution output computed
without its bias. The slope travels as a one-element tensor of the accumulation dtype: Triton
would type a Python float as an fp32 scalar (0.2 -> 0.20000000298), off by ~1e-8 relative in float64.
"""

import torch
import triton
import triton.language as tl

from .. import _ops

__all__ = ["mdf_sqdiff_forward", "mdf_sqdiff_backward", "bias_leaky_relu_", "TRITON_BLOCK"]

TRITON_BLOCK = 1024  # elements per program; a module variable so that tests can lower it

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


@triton.jit
def _find_tensor(desc_ptr, M, k):
    """The index m of the tensor whose chunks [desc[m, 3], desc[m+1, 3]) hold chunk k."""
    m_sel = 0
    for m in range(1, M):
        start = tl.load(desc_ptr + m * 4 + 3)
        m_sel = tl.where(k >= start, m, m_sel)
    return m_sel


@triton.jit
def _select(ptrs, m):
    """ptrs[m] of a tuple of pointers, m a run-time index."""
    p = ptrs[0]
    for i in tl.static_range(1, len(ptrs)):
        if m == i:
            p = ptrs[i]
    return p


@triton.jit
def _chunk(desc_ptr, xs, ws, M, k, BLOCK: tl.constexpr):
    """Chunk k of the table: its tensor m, that tensor's data pointer, elements per sample n, the
    chunk's offsets and mask, and the channel weight of each offset."""
    m = _find_tensor(desc_ptr, M, k)
    row = desc_ptr + m * 4
    n = tl.load(row + 0)
    C = tl.load(row + 1)
    cdiv = tl.load(row + 2)
    first = tl.load(row + 3)
    offs = (k - first).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    wc = tl.load(_select(ws, m) + (offs // cdiv) % C, mask=mask, other=0)
    return m, _select(xs, m), n, offs, mask, wc


@triton.jit
def _mdf_fwd_kernel(
    desc_ptr,                      # [M, 4] int64 shape table: elements per sample, C, cdiv, first chunk
    xs, ws, outs,                  # M-tuples of pointers: features, weights [C_m], diffs (SAVE_DIFF)
    partial_ptr,                   # [B, K] acc dtype
    M, K, B,
    ACC_DTYPE: tl.constexpr, SAVE_DIFF: tl.constexpr, BLOCK: tl.constexpr,
):
    k = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m, x, n, offs, mask, wc = _chunk(desc_ptr, xs, ws, M, k, BLOCK)
    p = tl.load(x + b * n + offs, mask=mask, other=0).to(ACC_DTYPE)
    t = tl.load(x + (B + b) * n + offs, mask=mask, other=0).to(ACC_DTYPE)
    d = p - t
    if SAVE_DIFF:
        out = _select(outs, m)
        tl.store(out + b * n + offs, d.to(out.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + b * K + k, tl.sum(wc * d * d, axis=0))


@triton.jit
def _mdf_bwd_kernel(
    desc_ptr,                      # [M, 4] int64 shape table of the diffs [B, C, H, W]
    xs, ws, outs,                  # M-tuples of pointers: diffs, weights [C_m], gradients
    grad_ptr,                      # [B] acc dtype
    M,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    k = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m, x, n, offs, mask, wc = _chunk(desc_ptr, xs, ws, M, k, BLOCK)
    out = _select(outs, m)
    d = tl.load(x + b * n + offs, mask=mask, other=0).to(ACC_DTYPE)
    g2 = 2.0 * tl.load(grad_ptr + b)
    tl.store(out + b * n + offs, (g2 * wc * d).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _bias_lrelu_kernel(
    y_ptr,                         # [N, C, H, W] dense (NCHW or NHWC), updated in place
    b_ptr,                         # [C]
    slope_ptr,                     # [1] acc dtype
    total, C, cdiv,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = (offs // cdiv) % C
    slope = tl.load(slope_ptr).to(ACC_DTYPE)
    v = tl.load(y_ptr + offs, mask=mask, other=0).to(ACC_DTYPE) + tl.load(b_ptr + c, mask=mask, other=0).to(ACC_DTYPE)
    v = tl.where(v > 0, v, v * slope)
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def bias_leaky_relu_(y, b, slope):
    """``y = LeakyReLU(y + b[c], slope)`` in place on a dense NCHW or NHWC tensor; returns y."""
    if y.dim() != 4 or b.numel() != y.shape[1]:
        raise ValueError(f"bias_leaky_relu_ (triton): y must be [N, C, H, W] and b [C], got {tuple(y.shape)}, "
                         f"{tuple(b.shape)}")
    if y.dtype not in _TL_DTYPES:
        raise TypeError(f"bias_leaky_relu_ (triton): unsupported dtype {y.dtype}")
    if y.device.type == "cpu" and not _interpreting():
        raise ValueError("bias_leaky_relu_ (triton): CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    C, hw = y.shape[1], y.shape[2] * y.shape[3]
    if y.is_contiguous():
        cdiv = hw
    elif y.is_contiguous(memory_format=torch.channels_last):
        cdiv = 1
    else:
        raise ValueError("bias_leaky_relu_ (triton): y must be dense in NCHW or NHWC")
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    total = y.numel()
    if total == 0:
        return y
    block = TRITON_BLOCK
    slope_t = _SLOPES.get((float(slope), acc, y.device),  # a fill (no host copy) the first time only
                          lambda: torch.full((1,), float(slope), dtype=acc, device=y.device), _ops.capturing(y.device))
    with _ops.device_guard(y):
        _bias_lrelu_kernel[(triton.cdiv(total, block),)](y, b.contiguous(), slope_t, total, C, cdiv,
                                                          ACC_DTYPE=_TL_DTYPES[acc], BLOCK=block)
    return y


def _interpreting():
    return _ops.interpreting(_mdf_fwd_kernel)


def _prepare(feats, chan_w, samples, op):
    if len(feats) == 0 or len(feats) != len(chan_w):
        raise ValueError(f"{op}: {len(feats)} tensors and {len(chan_w)} channel-weight vectors")
    dtype, device = feats[0].dtype, feats[0].device
    if dtype not in _TL_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {dtype} (float32, float64, float16, bfloat16)")
    if device.type == "cpu" and not _interpreting():
        raise ValueError(f"{op}: CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xs, ws, layout = [], [], []
    for i, (x, w) in enumerate(zip(feats, chan_w)):
        if x.dim() != 4 or x.shape[0] != samples or x.dtype != dtype or x.device != device:
            raise ValueError(f"{op}: tensor {i} must be [{samples}, C, H, W] of {dtype} on {device}, got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
        if w.numel() != x.shape[1]:
            raise ValueError(f"{op}: chan_w[{i}] has {w.numel()} entries for {x.shape[1]} channels")
        C, hw = x.shape[1], x.shape[2] * x.shape[3]
        if x.is_contiguous():
            nhwc = False
        elif x.is_contiguous(memory_format=torch.channels_last):
            nhwc = C > 1
        else:
            x, nhwc = x.contiguous(), False
        xs.append(x)
        ws.append(w.to(device=device, dtype=acc).contiguous())
        layout.append((C * hw, C, 1 if nhwc else hw, nhwc))
    return xs, ws, layout, acc


# [M, 4] shape tables on the device, built once per (device, shapes, layouts): a table built from
# a host list on every call would be a host-to-device copy that waits for the host (and cannot be
# captured in a CUDA graph). The addresses, which change every call, travel as kernel arguments.
_TABLES = _ops.DeviceCache(max_entries=64)  # a captured graph's tables are kept (see DeviceCache)
# the LeakyReLU slope as a one-element tensor per (slope, dtype, device): a fill per call would be
# one more launch per convolution
_SLOPES = _ops.DeviceCache(max_entries=64)


def _table(xs, layout, block):
    """(the [M, 4] int64 table on the device, K chunks) of these shapes; see _ops.DeviceCache."""
    device = xs[0].device

    def build():
        rows, first = [], 0
        for n, C, cdiv, _ in layout:
            rows.append([n, C, cdiv, first])
            first += triton.cdiv(n, block)
        return torch.tensor(rows, dtype=torch.int64, device=device), first  # [M, 4], K

    return _TABLES.get((device, block) + tuple(layout), build, _ops.capturing(device))


# Programs (k, b): the samples go on the grid's second dimension, which CUDA caps at 65535 (the CUDA
# backend refuses more too); a launch past it would fail with an unhelpful launch error.
MAX_GRID_SAMPLES = 65535


def _check_grid(batch, op):
    if batch > MAX_GRID_SAMPLES:
        raise ValueError(f"{op}: {batch} samples in one call, over the {MAX_GRID_SAMPLES} the kernel's grid takes; "
                         f"split the batch")


def _like_samples(xs, layout, batch):
    fmt = [torch.channels_last if nhwc else torch.contiguous_format for (_, _, _, nhwc) in layout]
    return [torch.empty((batch,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=f)
            for x, f in zip(xs, fmt)]


def mdf_sqdiff_forward(feats, chan_w, batch, save_diff):
    """(loss [B] (float64 for float64 features, else float32), diffs [B, C_m, H_m, W_m] per tensor
    when ``save_diff``, else []); see the module docstring."""
    _check_grid(batch, "mdf_sqdiff_forward (triton)")
    xs, ws, layout, acc = _prepare(feats, chan_w, 2 * batch, "mdf_sqdiff_forward (triton)")
    block = TRITON_BLOCK
    diffs = _like_samples(xs, layout, batch) if save_diff else []
    desc, K = _table(xs, layout, block)
    partial = torch.empty((batch, K), dtype=acc, device=xs[0].device)  # [B, K] per-chunk sums
    with _ops.device_guard(xs[0]):
        _mdf_fwd_kernel[(K, batch)](desc, tuple(xs), tuple(ws), tuple(diffs or xs), partial, len(xs), K, batch,
                                    ACC_DTYPE=_TL_DTYPES[acc], SAVE_DIFF=bool(save_diff), BLOCK=block)
    return partial.sum(dim=1), diffs


def mdf_sqdiff_backward(grad, diffs, chan_w):
    """Per tensor, ``grad[b] * 2 w[c] diff[b]`` as [B, C_m, H_m, W_m] in the diffs' dtype and layout."""
    batch = diffs[0].shape[0] if diffs else 0
    _check_grid(batch, "mdf_sqdiff_backward (triton)")
    xs, ws, layout, acc = _prepare(diffs, chan_w, batch, "mdf_sqdiff_backward (triton)")
    if grad.numel() != batch:
        raise ValueError(f"mdf_sqdiff_backward (triton): grad must have {batch} entries, got {tuple(grad.shape)}")
    outs = _like_samples(xs, layout, batch)
    block = TRITON_BLOCK
    desc, K = _table(xs, layout, block)
    g = grad.reshape(batch).to(acc).contiguous()
    with _ops.device_guard(xs[0]):
        _mdf_bwd_kernel[(K, batch)](desc, tuple(xs), tuple(ws), tuple(outs), g, len(xs), ACC_DTYPE=_TL_DTYPES[acc],
                                    BLOCK=block)
    return outs
