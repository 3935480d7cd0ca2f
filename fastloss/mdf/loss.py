"""MDF, the Multi-Scale Discriminative Feature loss (Mustafa et al., WACV 2022).

For the selected discriminators D_s (the first ``scales`` of the set, coarsest first; finest first
with ``ascending=False``, as the published code picks them) and their three features

    F_{s,1} = head output (after its LeakyReLU),  F_{s,2} = body output (after block3's LeakyReLU),
    F_{s,3} = the raw tail map,

    loss = mean_b  sum_s sum_f  mean_{c,h,w} (F_{s,f}(pred)_b - F_{s,f}(target)_b)^2

on unnormalized (B, 3, H, W) images, H, W >= 11 (every 3x3 conv is unpadded). BatchNorm uses its
running statistics; the discriminators are frozen.

Two ways to compute it:

- ``reference`` (``mdf_reference``): the published order of operations, the ground truth. Per
  discriminator, pred then target run conv -> BatchNorm -> LeakyReLU, and the three squared
  differences are added to a per-sample vector.
- the fast path (backends ``cpu``, ``triton``, ``cuda``): BatchNorm folded into the convolutions
  once, when the loss is built; pred and target stacked into one batch and run without autograd
  (``fastloss::mdf_forward``); every head in one convolution with 3 input channels and the sum of
  the widths as outputs; equal-width discriminators merged into grouped convolutions (or run one
  by one on their slice of the merged head, see ``MDFLoss``); bias and LeakyReLU fused into the
  convolution; and the squared-difference reductions of all 3 x ``scales`` feature pairs in one
  kernel per backend (``csrc/cpu/mdf.cpp``, ``kernels/mdf.py``, ``csrc/cuda/mdf_kernels.cu``),
  whose backward writes the gradient of each feature directly. The backward
  (``fastloss::mdf_backward``) runs the transposed convolutions on the pred half only (and on the
  target half when the target requires grad), with the inner LeakyReLU derivatives kept as bool
  masks, or on CPU float32 as 1-or-slope factors that oneDNN multiplies into the convolution.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks, _ext
from .weights import LAYERS, load

_OP = "mdf"
MIN_SIZE = 11  # head -2, three blocks -6, tail -2: the tail map is (H - 10) x (W - 10)
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPES = {"cpu": (torch.float32, torch.float64), "triton": _FLOATS, "cuda": _FLOATS}


# --------------------------------------------------------------------------- input checks
def _check_images(pred, target, op="MDFLoss"):
    for name, t in (("pred", pred), ("target", target)):
        _checks.check_image(op, name, t)
        if t.shape[2] < MIN_SIZE or t.shape[3] < MIN_SIZE:
            raise ValueError(f"{op}: {name} is {t.shape[2]} x {t.shape[3]}, smaller than the {MIN_SIZE} x {MIN_SIZE} "
                             "the discriminators need (five unpadded 3x3 convolutions)")
        if t.shape[0] == 0:
            raise ValueError(f"{op}: {name} is an empty batch, shape {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{op}: pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise TypeError(f"{op}: pred and target dtypes differ: {pred.dtype} vs {target.dtype}")
    if pred.device != target.device:
        raise ValueError(f"{op}: pred and target are on different devices: {pred.device} vs {target.device}")


def select(num_discriminators: int, scales: int, ascending: bool) -> List[int]:
    """Indices of the discriminators used, in the published order: ``range(scales)`` when
    ascending, else ``n-1, n-2, ...`` (the finest first)."""
    if isinstance(scales, bool) or not isinstance(scales, int) or not 1 <= scales <= num_discriminators:
        raise ValueError(f"MDF: scales must be an int in [1, {num_discriminators}] for this set of "
                         f"{num_discriminators} discriminators, got {scales!r}")
    return [i if ascending else num_discriminators - 1 - i for i in range(scales)]


# --------------------------------------------------------------------------- reference
def discriminator_features(d: Dict[str, Tensor], x: Tensor, eps: float = 1e-5, slope: float = 0.2) -> List[Tensor]:
    """[head, body, tail] features of one discriminator, in the published order of operations."""
    feats = []
    for layer in LAYERS:
        x = F.conv2d(x, d[f"{layer}.conv.weight"], d[f"{layer}.conv.bias"])
        x = F.batch_norm(x, d[f"{layer}.norm.running_mean"], d[f"{layer}.norm.running_var"],
                         d[f"{layer}.norm.weight"], d[f"{layer}.norm.bias"], training=False, eps=eps)
        x = F.leaky_relu(x, slope)
        if layer in ("head", "body.block3"):
            feats.append(x)
    feats.append(F.conv2d(x, d["tail.weight"], d["tail.bias"]))
    return feats


def _cast(d, device, dtype):
    return {k: v.to(device=device, dtype=dtype) for k, v in d.items()}


def mdf_reference(pred: Tensor, target: Tensor, weights, scales: int = 8, ascending: bool = True) -> Tensor:
    """The published loss: ``mean_b sum_s sum_f mean_chw (F_sf(pred) - F_sf(target))^2``, autograd
    through plain torch ops; ``weights`` is an ``MDFWeights`` or anything ``fastloss.mdf.load`` takes."""
    _check_images(pred, target, "mdf_reference")
    ascending = _check_ascending(ascending, "mdf_reference")
    w = load(weights)
    discs = [_cast(w.discriminators[i], pred.device, pred.dtype) for i in select(len(w), scales, ascending)]
    return _reference_loss(pred, target, discs, w.eps, w.negative_slope)


def _reference_loss(pred, target, discs, eps, slope):
    loss = torch.zeros(pred.shape[0], device=pred.device, dtype=pred.dtype)
    for d in discs:
        pxs = discriminator_features(d, pred, eps, slope)
        pys = discriminator_features(d, target, eps, slope)
        for px, py in zip(pxs, pys):
            loss = loss + ((px - py) ** 2).mean(dim=(1, 2, 3))
    return loss.mean()


# --------------------------------------------------------------------------- BatchNorm folding
def fold(d: Dict[str, Tensor], eps: float) -> List[Tensor]:
    """[W_head, b_head, W_1, b_1, W_2, b_2, W_3, b_3, W_tail, b_tail] of one discriminator with
    BatchNorm folded in (float64): ``W' = W * s``, ``b' = (b - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)`` per output channel."""
    out = []
    for layer in LAYERS:
        g = d[f"{layer}.norm.weight"].double()
        s = g / torch.sqrt(d[f"{layer}.norm.running_var"].double() + eps)
        out.append(d[f"{layer}.conv.weight"].double() * s[:, None, None, None])
        out.append((d[f"{layer}.conv.bias"].double() - d[f"{layer}.norm.running_mean"].double()) * s
                   + d[f"{layer}.norm.bias"].double())
    out += [d["tail.weight"].double(), d["tail.bias"].double()]
    return out


def _units(widths: Sequence[int], grouped: bool) -> List[List[int]]:
    """Positions (in the selection) run together: one unit per width when grouped (first
    appearance order), else one unit per discriminator."""
    if not grouped:
        return [[i] for i in range(len(widths))]
    order: Dict[int, List[int]] = {}
    for i, n in enumerate(widths):
        order.setdefault(n, []).append(i)
    return list(order.values())


def build_params(folded: Sequence[List[Tensor]], widths: Sequence[int], grouped: bool, device, dtype
                 ) -> Tuple[List[Tensor], List[int], List[int]]:
    """The merged convolutions: ``params = [W_head [S,3,3,3], b_head [S]] + per unit [W_1 [kN,N,3,3],
    b_1, W_2, b_2, W_3, b_3, W_tail [k,N,3,3], b_tail [k]]``, ``unit_sizes`` (k per unit) and the
    order of the discriminators along the head's S = sum-of-widths channels."""
    units = _units(widths, grouped)
    order = [i for u in units for i in u]
    cat = lambda j, ids: torch.cat([folded[i][j] for i in ids])  # noqa: E731
    params = [cat(0, order), cat(1, order)]
    for u in units:
        params += [cat(j, u) for j in range(2, 10)]
    # channels_last kernels: every convolution (and transposed one) then works and answers in NHWC,
    # even where its input has one channel and so no telling layout (the tail's gradient)
    params = [p.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) if p.dim() == 4
              else p.to(device=device, dtype=dtype).contiguous() for p in params]
    return params, [len(u) for u in units], order


# --------------------------------------------------------------------------- the fused reduction
def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def _sample_layout(x):
    """The layout the kernels give a tensor shaped like a sample of ``x``: NHWC if ``x`` is."""
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
    return torch.channels_last if nhwc else torch.contiguous_format


def sqdiff_reference(feats: Sequence[Tensor], chan_w: Sequence[Tensor], batch: int) -> Tensor:
    """``loss[b] = sum_m sum_c w_m[c] sum_hw (X_m[b] - X_m[B+b])^2`` in plain torch (for tests)."""
    acc = _acc_dtype(feats[0].dtype)
    out = torch.zeros(batch, dtype=torch.float64, device=feats[0].device)
    for x, w in zip(feats, chan_w):
        d = (x[:batch].to(torch.float64) - x[batch:].to(torch.float64)) ** 2
        out = out + (d.sum(dim=(2, 3)) * w.to(torch.float64)).sum(1)
    return out.to(acc)


def _sqdiff_forward_impl(backend, feats, chan_w, batch, save_diff):
    if backend == "cpu":
        loss, diffs = _ext.load("_C")[0].mdf_sqdiff_forward(feats, chan_w, batch, save_diff)
    elif backend == "cuda":
        loss, diffs = _ext.load("_C_cuda")[0].mdf_sqdiff_forward(feats, chan_w, batch, save_diff, _stream(feats[0]))
    elif backend == "triton":
        from ..kernels import mdf as triton_mdf

        with _backend.triton_launch_guard():
            loss, diffs = triton_mdf.mdf_sqdiff_forward(feats, chan_w, batch, save_diff)
    elif backend == "reference":
        loss = sqdiff_reference(feats, chan_w, batch)
        diffs = [(x[:batch] - x[batch:]).contiguous(memory_format=_sample_layout(x)) for x in feats] if save_diff else []
    else:
        raise ValueError(f"{_OP}: backend {backend!r} has no fused reduction")
    return loss, list(diffs)


def _sqdiff_backward_impl(backend, grad, diffs, chan_w):
    if backend == "cpu":
        return _ext.load("_C")[0].mdf_sqdiff_backward(grad, diffs, chan_w)
    if backend == "cuda":
        return _ext.load("_C_cuda")[0].mdf_sqdiff_backward(grad, diffs, chan_w, _stream(diffs[0]))
    if backend == "triton":
        from ..kernels import mdf as triton_mdf

        with _backend.triton_launch_guard():
            return triton_mdf.mdf_sqdiff_backward(grad, diffs, chan_w)
    if backend == "reference":
        g = grad.to(_acc_dtype(diffs[0].dtype)).view(-1, 1, 1, 1)
        return [(2 * g * w.view(1, -1, 1, 1) * d).to(d.dtype) for d, w in zip(diffs, chan_w)]
    raise ValueError(f"{_OP}: backend {backend!r} has no fused reduction")


@torch.library.custom_op("fastloss::mdf_sqdiff_forward", mutates_args=())
def mdf_sqdiff_forward(feats: List[Tensor], chan_w: List[Tensor], batch: int, save_diff: bool, backend: str
                       ) -> Tuple[Tensor, List[Tensor]]:
    """feats [2B, C_m, H_m, W_m] (pred then target), chan_w [C_m] -> (loss [B], the diffs pred - target
    [B, C_m, H_m, W_m] when ``save_diff``); see csrc/cpu/mdf.cpp."""
    return _sqdiff_forward_impl(backend, list(feats), list(chan_w), batch, save_diff)


@mdf_sqdiff_forward.register_fake
def _(feats, chan_w, batch, save_diff, backend):
    loss = feats[0].new_empty((batch,), dtype=_acc_dtype(feats[0].dtype))
    diffs = [torch.empty((batch,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device,
                         memory_format=_sample_layout(x)) for x in feats] if save_diff else []
    return loss, diffs


@torch.library.custom_op("fastloss::mdf_sqdiff_backward", mutates_args=())
def mdf_sqdiff_backward(grad: Tensor, diffs: List[Tensor], chan_w: List[Tensor], backend: str) -> List[Tensor]:
    """grad [B], diffs [B, C_m, H_m, W_m] -> per tensor ``grad[b] * 2 w[c] diff[b]``, the gradient of
    the pred half (the target half's is its negation)."""
    return list(_sqdiff_backward_impl(backend, grad, list(diffs), list(chan_w)))


@mdf_sqdiff_backward.register_fake
def _(grad, diffs, chan_w, backend):
    return [torch.empty(tuple(d.shape), dtype=d.dtype, device=d.device, memory_format=_sample_layout(d))
            for d in diffs]


def _sqdiff_setup(ctx, inputs, output):
    feats, chan_w, batch, save_diff, backend = inputs
    ctx.save_for_backward(*output[1], *chan_w)
    ctx.mark_non_differentiable(*output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved tensors
    ctx.m, ctx.save_diff, ctx.backend = len(feats), save_diff, backend


def _sqdiff_backward(ctx, grad, _diff_grads):
    if not ctx.save_diff:
        raise RuntimeError("mdf_sqdiff_forward: called with save_diff=False, so it has no backward")
    saved = ctx.saved_tensors
    diffs, chan_w = list(saved[:ctx.m]), list(saved[ctx.m:])
    gp = mdf_sqdiff_backward(grad, diffs, chan_w, ctx.backend)
    # target = the second half of each tensor: its gradient is the negation
    return [torch.cat([g, -g]) for g in gp], [None] * len(chan_w), None, None, None


mdf_sqdiff_forward.register_autograd(_sqdiff_backward, setup_context=_sqdiff_setup)


# --------------------------------------------------------------------------- the fused feature extraction
_MKLDNN_POINTWISE = [None]  # whether torch.ops.mkldnn._convolution_pointwise works here (checked once)


def _mkldnn_pointwise_ok():
    if _MKLDNN_POINTWISE[0] is None:
        ok = False
        try:
            op = torch.ops.mkldnn._convolution_pointwise
            x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
            y = op(x, w, b, [0, 0], [1, 1], [1, 1], 1, "leaky_relu", [0.2], "")
            ok = bool(torch.allclose(y, F.leaky_relu(F.conv2d(x, w, b), 0.2), atol=1e-5))
        except Exception:  # noqa: BLE001 - an optional fusion; the fallback is exact
            ok = False
        _MKLDNN_POINTWISE[0] = ok
    return _MKLDNN_POINTWISE[0]


def _fused(t: Tensor, backend: str) -> bool:
    """Whether oneDNN's fused convolutions run this tensor (CPU float32, backend ``cpu``)."""
    return backend == "cpu" and t.device.type == "cpu" and t.dtype == torch.float32 and _mkldnn_pointwise_ok()


def _conv_lrelu(x: Tensor, w: Tensor, b: Tensor, groups: int, slope: float, backend: str) -> Tensor:
    """LeakyReLU(conv(x, w) + b) with the bias and the activation fused: into oneDNN's convolution
    on CPU float32; on the ``triton`` and ``cuda`` backends the convolution runs without its bias
    and one kernel adds the bias and applies LeakyReLU in place. Otherwise (CPU float64) the
    convolution with its bias, then an in-place LeakyReLU."""
    if _fused(x, backend):
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 0], [1, 1], [1, 1], groups, "leaky_relu",
                                                       [slope], "")
    if backend == "triton":
        from ..kernels import mdf as triton_mdf

        y = F.conv2d(x, w, None, groups=groups)
        with _backend.triton_launch_guard():  # the interpreter runs one kernel at a time
            return triton_mdf.bias_leaky_relu_(y, b, slope)
    if backend == "cuda":
        y = F.conv2d(x, w, None, groups=groups)
        _ext.load("_C_cuda")[0].mdf_bias_leaky_relu_(y, b, slope, _stream(y))
        return y
    return F.leaky_relu_(F.conv2d(x, w, b, groups=groups), slope)


def _lrelu_backward_(g: Tensor, mask: Tensor, slope: float, backend: str) -> Tensor:
    """``g * LeakyReLU'`` from the saved bool mask (input > 0): in place, one pass, with the C++ op
    on the ``cpu`` backend; ``torch.where`` elsewhere."""
    if backend == "cpu" and g.device.type == "cpu":
        _ext.load("_C")[0].mdf_leaky_relu_backward_(g, mask, slope)
        return g
    return torch.where(mask, g, g * slope)


def _chan_weights(units, widths_by_head_channel, shapes, device, dtype):
    """Per-channel weights 1 / (C_f H W) of the head tensor and of each unit's body / tail tensors."""
    acc = _acc_dtype(dtype)
    (hh, hw), (bh, bw), (th, tw) = shapes
    head = torch.tensor([1.0 / (n * hh * hw) for n in widths_by_head_channel], dtype=acc, device=device)
    body = [torch.full((k * n,), 1.0 / (n * bh * bw), dtype=acc, device=device) for k, n in units]
    tail = [torch.full((k,), 1.0 / (th * tw), dtype=acc, device=device) for k, n in units]
    return [head] + body + tail


def _unit_layout(params, unit_sizes):
    """[(k, N)] per unit, and the width of every head channel, from the merged weights."""
    units = [(k, int(params[2 + 8 * u].shape[1])) for u, k in enumerate(unit_sizes)]
    per_channel = [n for k, n in units for _ in range(k * n)]
    return units, per_channel


def _check_params(params, unit_sizes):
    if len(params) != 2 + 8 * len(unit_sizes):
        raise ValueError(f"{_OP}: {len(params)} parameter tensors for {len(unit_sizes)} units")


def _no_autocast(device):
    """The fast path runs in the input's dtype whatever autocast asks: under autocast some of its
    convolutions (the fused oneDNN ones) would stay in float32 and others not, and its kernels take
    one dtype; a loss computed in float32 is what autocast asks of losses anyway."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


def _spatial(H, W):
    """(head, body, tail) feature sizes of an H x W input."""
    return (H - 2, W - 2), (H - 8, W - 8), (H - 10, W - 10)


# What mdf_forward keeps for the backward, in this order (U units, rows = B, or 2B with target_grad):
#   d_head [B, S, H-2, W-2], mask_head [rows, S, H-2, W-2] (bool, head output > 0),
#   d_body x U [B, kN, H-8, W-8], d_tail x U [B, k, H-10, W-10]       (pred - target, the fused diffs)
#   per unit: mask_1 [rows, kN, H-4, W-4], mask_2 [rows, kN, H-6, W-6], mask_3 [rows, kN, H-8, W-8]
@torch.library.custom_op("fastloss::mdf_forward", mutates_args=())
def mdf_forward(pred: Tensor, target: Tensor, params: List[Tensor], unit_sizes: List[int], slope: float,
                need_grad: bool, target_grad: bool, backend: str) -> Tuple[Tensor, List[Tensor]]:
    """Per-sample MDF loss [B] of pred vs target through the merged, BatchNorm-folded convolutions
    (``build_params``), and, when ``need_grad``, what the backward needs (see above)."""
    _check_params(params, unit_sizes)
    B, _, H, W = pred.shape
    rows = 2 * B if target_grad else B
    with torch.no_grad(), _no_autocast(pred.device):
        z = torch.cat([pred, target]).contiguous(memory_format=torch.channels_last)  # [2B, 3, H, W]
        h = _conv_lrelu(z, params[0], params[1], 1, slope, backend)  # [2B, S, H-2, W-2], every head
        del z
        units, per_channel = _unit_layout(params, unit_sizes)
        bodies, tails, masks = [], [], []
        start = 0
        for u, (k, n) in enumerate(units):
            w1, b1, w2, b2, w3, b3, wt, bt = params[2 + 8 * u: 10 + 8 * u]
            a = _conv_lrelu(h[:, start:start + k * n], w1, b1, k, slope, backend)  # [2B, kN, H-4, W-4]
            start += k * n
            m1 = a[:rows] > 0 if need_grad else None
            a = _conv_lrelu(a, w2, b2, k, slope, backend)             # [2B, kN, H-6, W-6]
            m2 = a[:rows] > 0 if need_grad else None
            a = _conv_lrelu(a, w3, b3, k, slope, backend)             # [2B, kN, H-8, W-8], body output
            masks += [m1, m2, a[:rows] > 0] if need_grad else []
            bodies.append(a)
            tails.append(F.conv2d(a, wt, bt, groups=k))              # [2B, k, H-10, W-10], tail maps
            del a
        mask_head = h[:rows] > 0 if need_grad else None
        chan_w = _chan_weights(units, per_channel, _spatial(H, W), pred.device, pred.dtype)
        loss, diffs = mdf_sqdiff_forward([h] + bodies + tails, chan_w, B, need_grad, backend)
    if not need_grad:
        return loss, []
    return loss, [diffs[0], mask_head] + diffs[1:] + masks


@mdf_forward.register_fake
def _(pred, target, params, unit_sizes, slope, need_grad, target_grad, backend):
    B, _, H, W = pred.shape
    loss = pred.new_empty((B,), dtype=_acc_dtype(pred.dtype))
    if not need_grad:
        return loss, []
    rows = 2 * B if target_grad else B

    def t(shape, dtype=pred.dtype):  # the fast path's tensors are channels_last (contiguous if C == 1)
        fmt = torch.channels_last if shape[1] > 1 else torch.contiguous_format
        return torch.empty(shape, dtype=dtype, device=pred.device, memory_format=fmt)

    S = params[0].shape[0]
    kns = [params[2 + 8 * u].shape[0] for u in range(len(unit_sizes))]
    saved = [t((B, S, H - 2, W - 2)), t((rows, S, H - 2, W - 2), torch.bool)]
    saved += [t((B, kn, H - 8, W - 8)) for kn in kns] + [t((B, k, H - 10, W - 10)) for k in unit_sizes]
    for kn in kns:
        saved += [t((rows, kn, H - 4, W - 4), torch.bool), t((rows, kn, H - 6, W - 6), torch.bool),
                  t((rows, kn, H - 8, W - 8), torch.bool)]
    return loss, saved


@torch.library.custom_op("fastloss::mdf_backward", mutates_args=())
def mdf_backward(grad: Tensor, saved: List[Tensor], params: List[Tensor], unit_sizes: List[int], slope: float,
                 need_pred: bool, need_target: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Gradients of ``sum_b grad[b] loss[b]`` for pred and target (an empty tensor where not needed):
    the fused reduction writes every feature's gradient from the saved diffs, then transposed
    convolutions and the saved LeakyReLU masks carry them back through the merged discriminators."""
    _check_params(params, unit_sizes)
    U = len(unit_sizes)
    d_head, mask_head = saved[0], saved[1]
    diffs = [d_head] + list(saved[2:2 + 2 * U])
    masks = saved[2 + 2 * U:]
    B = d_head.shape[0]
    rows = 2 * B if need_target else B
    units, per_channel = _unit_layout(params, unit_sizes)
    with torch.no_grad(), _no_autocast(grad.device):
        g_feats = mdf_sqdiff_backward(grad, diffs, _chan_weights(units, per_channel, _spatial(
            d_head.shape[2] + 2, d_head.shape[3] + 2), d_head.device, d_head.dtype), backend)  # [B, ...] each
        if need_target:
            g_feats = [torch.cat([g, -g]) for g in g_feats]
        gh = g_feats[0]                                                    # [rows, S, H-2, W-2]
        start = 0
        for u, (k, n) in enumerate(units):
            w1, _, w2, _, w3, _, wt, _ = params[2 + 8 * u: 10 + 8 * u]
            m1, m2, m3 = masks[3 * u: 3 * u + 3]
            g = F.conv_transpose2d(g_feats[1 + U + u], wt, groups=k)       # [rows, kN, H-8, W-8]
            g += g_feats[1 + u]
            g = _lrelu_backward_(g, m3, slope, backend)
            g = _lrelu_backward_(F.conv_transpose2d(g, w3, groups=k), m2, slope, backend)
            g = _lrelu_backward_(F.conv_transpose2d(g, w2, groups=k), m1, slope, backend)
            gh[:, start:start + k * n] += F.conv_transpose2d(g, w1, groups=k)
            start += k * n
        gh = _lrelu_backward_(gh, mask_head, slope, backend)
        gz = F.conv_transpose2d(gh, params[0])                              # [rows, 3, H, W]
    empty = gz.new_empty((0,))
    gp = gz[:B].clone() if need_pred and need_target else (gz if need_pred else empty)
    gt = gz[B:] if need_target else empty
    return gp, gt


@mdf_backward.register_fake
def _(grad, saved, params, unit_sizes, slope, need_pred, need_target, backend):
    d = saved[0]
    shape = (d.shape[0], 3, d.shape[2] + 2, d.shape[3] + 2)

    def out(needed):
        if not needed:
            return d.new_empty((0,))
        return torch.empty(shape, dtype=d.dtype, device=d.device, memory_format=torch.channels_last)

    return out(need_pred), out(need_target)


_DOUBLE_BACKWARD = ("MDFLoss: double backward (create_graph=True) is not supported by the fast path; "
                    "use backend='reference'")


def _mdf_setup(ctx, inputs, output):
    pred, target, params, unit_sizes, slope, need_grad, target_grad, backend = inputs
    ctx.save_for_backward(*output[1])
    ctx.mark_non_differentiable(*output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved tensors
    ctx.params, ctx.unit_sizes, ctx.slope, ctx.backend = params, unit_sizes, slope, backend
    ctx.target_grad = target_grad


def _mdf_backward(ctx, grad, _saved_grads):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.target_grad
    saved = list(ctx.saved_tensors)
    if not saved:
        raise RuntimeError("MDFLoss: the forward ran without need_grad; nothing was saved for the backward")
    gp, gt = mdf_backward(grad, saved, ctx.params, ctx.unit_sizes, ctx.slope, need_pred, need_target, ctx.backend)
    return ((gp if need_pred else None), (gt if need_target else None), [None] * len(ctx.params), None, None, None,
            None, None)


mdf_forward.register_autograd(_mdf_backward, setup_context=_mdf_setup)


# --------------------------------------------------------------------------- the module
@torch.compiler.assume_constant_result  # like _backend.resolve: decided once at trace time
def _half_on_cpu_backend(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend="auto"`` (or the scope / FASTLOSS_BACKEND) would run a float16 / bfloat16
    CPU input on the cpu backend in float32; a backend named explicitly keeps its own dtype rules."""
    return (device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
            and _backend.requested(backend, "MDFLoss") == "auto" and _backend.status("cpu")[0])


def _check_ascending(ascending, op):
    if isinstance(ascending, str) or ascending not in (True, False):
        raise ValueError(f"{op}: ascending must be True or False, got {ascending!r}")
    return bool(ascending)


class MDFLoss(nn.Module):
    """``mean_b sum_s sum_f mean_chw (F_sf(pred) - F_sf(target))^2`` over the first ``scales``
    discriminators of a set (see the module docstring).

    ``weights``: ``"denoise"``, ``"jpeg"`` or ``"sisr"`` (the sets this project trained and ships),
    a path to a file in the project's format, a path to a published ``.pth`` (loaded safely), or an
    ``MDFWeights``. ``ascending=False`` takes the finest discriminators first, as the published code.
    ``backend``: ``auto`` (default), ``reference`` (the published order of operations), ``cpu``,
    ``triton`` or ``cuda`` (the fast path with that backend's fused reduction).

    ``grouped``: run equal-width discriminators as one grouped convolution (``True``) or one by
    one on their slice of the merged head (``False``). ``None`` (default) groups on CUDA and not on
    the CPU, where oneDNN's grouped convolutions measured slower than separate ones (BENCHMARKS.md).
    The discriminators are frozen; gradients flow to ``pred`` (and to ``target`` if it requires
    grad). Inputs follow the input's device and dtype: the folded weights are cached per device.
    """

    def __init__(self, weights="denoise", scales: int = 8, ascending: bool = True, backend: str = "auto",
                 grouped: Optional[bool] = None):
        super().__init__()
        _backend.requested(backend, "MDFLoss")
        self.weights = load(weights)
        ascending = _check_ascending(ascending, "MDFLoss")
        self.indices = select(len(self.weights), scales, ascending)
        self.scales, self.ascending, self.backend = scales, ascending, backend
        if grouped not in (None, True, False):
            raise ValueError(f"MDFLoss: grouped must be None, True or False, got {grouped!r}")
        self.grouped = grouped
        self.widths = [self.weights.widths[i] for i in self.indices]
        self._folded = [fold(self.weights.discriminators[i], self.weights.eps) for i in self.indices]  # load time
        self._cache: Dict[tuple, object] = {}
        self._range_check = _checks.RangeCheck("MDFLoss")

    def extra_repr(self):
        return (f"scales={self.scales}, ascending={self.ascending}, widths={self.widths}, backend={self.backend!r}, "
                f"source={self.weights.source!r}")

    def _cached(self, key, make):
        # no lock: two threads racing here both build the same tensors and one result is kept
        value = self._cache.get(key)
        if value is None:
            value = self._cache.setdefault(key, make())
        return value

    def reference_discriminators(self, device, dtype) -> List[Dict[str, Tensor]]:
        """The selected discriminators' raw tensors on ``device`` / ``dtype`` (cached)."""
        return self._cached(("ref", device, dtype), lambda: [
            _cast(self.weights.discriminators[i], device, dtype) for i in self.indices])

    def params(self, device, dtype, grouped: bool):
        """``(params, unit_sizes)`` of the merged, folded convolutions on ``device`` / ``dtype`` (cached)."""
        def make():
            p, sizes, _ = build_params(self._folded, self.widths, grouped, device, dtype)
            return p, sizes
        return self._cached(("fast", device, dtype, grouped), make)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_images(pred, target)
        self._range_check(pred, target)
        if _half_on_cpu_backend(self.backend, pred.device, pred.dtype):
            # auto on the CPU: the cpu backend's kernels take float32 / float64, so float16 / bfloat16
            # images run there in float32 (not in the reference in their own dtype); the loss comes
            # back in their dtype, and so do the gradients (through the casts)
            return self.forward(pred.float(), target.float()).to(pred.dtype)
        name = _backend.resolve(_OP, self.backend, pred.device, pred.dtype, dtypes=_DTYPES)
        if name == "reference":
            return _reference_loss(pred, target, self.reference_discriminators(pred.device, pred.dtype),
                                   self.weights.eps, self.weights.negative_slope)
        grouped = self.grouped if self.grouped is not None else pred.device.type == "cuda"
        params, unit_sizes = self.params(pred.device, pred.dtype, grouped)
        grad_on = torch.is_grad_enabled()
        target_grad = grad_on and target.requires_grad
        need_grad = grad_on and (pred.requires_grad or target_grad)
        loss, _ = mdf_forward(pred, target, params, unit_sizes, self.weights.negative_slope, need_grad,
                              target_grad, name)
        return loss.mean().to(pred.dtype)
