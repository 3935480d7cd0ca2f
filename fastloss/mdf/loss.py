"""MDF, the Multi-Scale Discriminative Feature loss (Mustafa et al., WACV 2022).

For the selected discriminators D_s (the first ``scales`` of the set, coarsest first; finest first
with ``ascending=False``, as the published code picks them) and their three features

    F_{s,1} = head output (after its LeakyReLU),  F_{s,2} = body output (after block3's LeakyReLU),
    F_{s,3} = the raw tail map,

    loss = mean_b  sum_s sum_f  mean_{c,h,w} (F_{s,f}(pred)_b - F_{s,f}(target)_b)^2

on unnormalized (B, 3, H, W) images, H, W >= 11 (every 3x3 conv is unpadded). BatchNorm uses its
running statistics; the discriminators are frozen. That is ``formula="published"``, the published
code's loss and the default. ``formula="paper"`` is the paper's Eq. 2, the squared L2 distances of
"the latent embeddings after every ReLU layer", i.e. the four LeakyReLU outputs of each discriminator
(head, body.block1, block2, block3; no tail), summed rather than averaged:

    loss = mean_b  sum_s sum_{l=1..4}  sum_{c,h,w} (phi_{s,l}(pred)_b - phi_{s,l}(target)_b)^2

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
import functools
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
FORMULAS = ("published", "paper")


def _check_formula(formula, op):
    if formula not in FORMULAS:
        raise ValueError(f"{op}: formula must be 'published' or 'paper', got {formula!r}")
    return formula


def discriminator_features(d: Dict[str, Tensor], x: Tensor, eps: float = 1e-5, slope: float = 0.2,
                           formula: str = "published") -> List[Tensor]:
    """The features of one discriminator, in the published order of operations: [head, body, tail]
    (``formula="published"``) or the four LeakyReLU outputs [head, block1, block2, block3] (``"paper"``)."""
    feats = []
    keep = LAYERS if formula == "paper" else ("head", "body.block3")
    for layer in LAYERS:
        x = F.conv2d(x, d[f"{layer}.conv.weight"], d[f"{layer}.conv.bias"])
        x = F.batch_norm(x, d[f"{layer}.norm.running_mean"], d[f"{layer}.norm.running_var"],
                         d[f"{layer}.norm.weight"], d[f"{layer}.norm.bias"], training=False, eps=eps)
        x = F.leaky_relu(x, slope)
        if layer in keep:
            feats.append(x)
    if formula != "paper":
        feats.append(F.conv2d(x, d["tail.weight"], d["tail.bias"]))
    return feats


def _cast(d, device, dtype):
    return {k: v.to(device=device, dtype=dtype) for k, v in d.items()}


def mdf_reference(pred: Tensor, target: Tensor, weights, scales: int = 8, ascending: bool = True,
                  formula: str = "published") -> Tensor:
    """The published loss ``mean_b sum_s sum_f mean_chw (F_sf(pred) - F_sf(target))^2`` (or, with
    ``formula="paper"``, Eq. 2: ``mean_b sum_s sum_l sum_chw (phi_sl(pred) - phi_sl(target))^2``), autograd
    through plain torch ops; ``weights`` is an ``MDFWeights`` or anything ``fastloss.mdf.load`` takes."""
    _check_images(pred, target, "mdf_reference")
    ascending = _check_ascending(ascending, "mdf_reference")
    formula = _check_formula(formula, "mdf_reference")
    w = load(weights)
    discs = [_cast(w.discriminators[i], pred.device, pred.dtype) for i in select(len(w), scales, ascending)]
    return _reference_loss(pred, target, discs, w.eps, w.negative_slope, formula)


def _reference_loss(pred, target, discs, eps, slope, formula="published"):
    reduce = torch.sum if formula == "paper" else torch.mean
    loss = torch.zeros(pred.shape[0], device=pred.device, dtype=pred.dtype)
    for d in discs:
        pxs = discriminator_features(d, pred, eps, slope, formula)
        pys = discriminator_features(d, target, eps, slope, formula)
        for px, py in zip(pxs, pys):
            loss = loss + reduce((px - py) ** 2, dim=(1, 2, 3))
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
    """Per-channel weights 1 / (C_f H W) of the head tensor and of each unit's body / tail tensors,
    built once per device, dtype and shapes (a tensor built from a host list on every call would be
    a host-to-device copy that waits for the host and cannot be captured in a CUDA graph)."""
    return list(_chan_weights_cached(tuple(tuple(u) for u in units), tuple(widths_by_head_channel),
                                     tuple(tuple(s) for s in shapes), device, dtype))


@functools.lru_cache(maxsize=64)
def _chan_weights_cached(units, widths_by_head_channel, shapes, device, dtype):
    acc = _acc_dtype(dtype)
    (hh, hw), (bh, bw), (th, tw) = shapes
    head = torch.tensor([1.0 / (n * hh * hw) for n in widths_by_head_channel], dtype=acc, device=device)
    body = [torch.full((k * n,), 1.0 / (n * bh * bw), dtype=acc, device=device) for k, n in units]
    tail = [torch.full((k,), 1.0 / (th * tw), dtype=acc, device=device) for k, n in units]
    return tuple([head] + body + tail)


def _unit_layout(params, unit_sizes):
    """[(k, N)] per unit, and the width of every head channel, from the merged weights."""
    units = [(k, int(params[2 + 8 * u].shape[1])) for u, k in enumerate(unit_sizes)]
    per_channel = [n for k, n in units for _ in range(k * n)]
    return units, per_channel


def _check_params(params, unit_sizes):
    if len(params) != 2 + 8 * len(unit_sizes):
        raise ValueError(f"{_OP}: {len(params)} parameter tensors for {len(unit_sizes)} units")


def _no_autocast(device):
    """Inside the fast path autocast is off: under it some of its convolutions (the fused oneDNN
    ones) would stay in float32 and others not, and its kernels take one dtype. ``MDFLoss`` reads
    autocast instead: a bfloat16 autocast region picks the bfloat16 compute dtype (``_compute_dtype``)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


def _spatial(H, W):
    """(head, body, tail) feature sizes of an H x W input."""
    return (H - 2, W - 2), (H - 8, W - 8), (H - 10, W - 10)


def _sum_weights(units, heads, device, dtype):
    """Per-channel weights 1 of the head tensor and of each unit's three block tensors (Eq. 2 sums)."""
    acc = _acc_dtype(dtype)
    out = [torch.ones((heads,), dtype=acc, device=device)]
    for k, n in units:
        out += [torch.ones((k * n,), dtype=acc, device=device)] * 3
    return out


# What mdf_forward keeps for the backward, in this order (U units, rows = B, or 2B with target_grad):
#   d_head [B, S, H-2, W-2], mask_head [rows, S, H-2, W-2] (bool, head output > 0),
#   published: d_body x U [B, kN, H-8, W-8], d_tail x U [B, k, H-10, W-10]  (pred - target, the fused diffs)
#   paper:     per unit d_1 [B, kN, H-4, W-4], d_2 [B, kN, H-6, W-6], d_3 [B, kN, H-8, W-8]
#   per unit: mask_1 [rows, kN, H-4, W-4], mask_2 [rows, kN, H-6, W-6], mask_3 [rows, kN, H-8, W-8]
# Everything runs in the dtype of ``params`` (the compute dtype: the input's, or bfloat16), the
# reductions in its accumulation dtype (float32 for bfloat16).
@torch.library.custom_op("fastloss::mdf_forward", mutates_args=())
def mdf_forward(pred: Tensor, target: Tensor, params: List[Tensor], unit_sizes: List[int], slope: float,
                need_grad: bool, target_grad: bool, backend: str, paper: bool) -> Tuple[Tensor, List[Tensor]]:
    """Per-sample MDF loss [B] of pred vs target through the merged, BatchNorm-folded convolutions
    (``build_params``), the published formula or (``paper``) Eq. 2, and, when ``need_grad``, what the
    backward needs (see above)."""
    _check_params(params, unit_sizes)
    B, _, H, W = pred.shape
    rows = 2 * B if target_grad else B
    cdt = params[0].dtype
    if cdt == torch.bfloat16 and pred.dtype != torch.bfloat16:
        return _delta_forward(pred, target, params, unit_sizes, slope, need_grad, target_grad, paper)
    with torch.no_grad(), _no_autocast(pred.device):
        z = torch.cat([pred, target]).to(cdt).contiguous(memory_format=torch.channels_last)  # [2B, 3, H, W]
        h = _conv_lrelu(z, params[0], params[1], 1, slope, backend)  # [2B, S, H-2, W-2], every head
        del z
        units, per_channel = _unit_layout(params, unit_sizes)
        bodies, tails, blocks, masks = [], [], [], []
        start = 0
        for u, (k, n) in enumerate(units):
            w1, b1, w2, b2, w3, b3, wt, bt = params[2 + 8 * u: 10 + 8 * u]
            a = _conv_lrelu(h[:, start:start + k * n], w1, b1, k, slope, backend)  # [2B, kN, H-4, W-4]
            start += k * n
            m1 = a[:rows] > 0 if need_grad else None
            blocks += [a] if paper else []  # Eq. 2 keeps every block output; published, only the last
            a = _conv_lrelu(a, w2, b2, k, slope, backend)             # [2B, kN, H-6, W-6]
            m2 = a[:rows] > 0 if need_grad else None
            blocks += [a] if paper else []
            a = _conv_lrelu(a, w3, b3, k, slope, backend)             # [2B, kN, H-8, W-8], body output
            masks += [m1, m2, a[:rows] > 0] if need_grad else []
            if paper:
                blocks.append(a)
            else:
                bodies.append(a)
                tails.append(F.conv2d(a, wt, bt, groups=k))          # [2B, k, H-10, W-10], tail maps
            del a
        mask_head = h[:rows] > 0 if need_grad else None
        if paper:
            feats, chan_w = [h] + blocks, _sum_weights(units, h.shape[1], pred.device, cdt)
        else:
            feats = [h] + bodies + tails
            chan_w = _chan_weights(units, per_channel, _spatial(H, W), pred.device, cdt)
        loss, diffs = mdf_sqdiff_forward(feats, chan_w, B, need_grad, backend)
    if not need_grad:
        return loss, []
    return loss, [diffs[0], mask_head] + diffs[1:] + masks


def _delta_forward(pred, target, params, unit_sizes, slope, need_grad, target_grad, paper):
    """``mdf_forward`` in a low compute dtype (bfloat16) for higher-precision inputs. The batch is
    [pred - target; target], not [pred; target]: each bias-free convolution maps it to
    [du; u_t - b] (a convolution is linear), and the LeakyReLU step, in float32, forms
    u_t = . + b, u_p = u_t + du, a_t = LReLU(u_t) and da = LReLU(u_p) - a_t. So the rounding to
    bfloat16 is relative to each feature difference da itself, not to the features: computing
    pred's and target's features separately in bfloat16 and subtracting them puts errors of
    2^-9 |F| into differences that can be 100 times smaller than |F|. The masks are u_p > 0 (and
    u_t > 0 for the target rows), the saved diffs da rounded once, so ``mdf_backward`` is unchanged.
    The reductions are float32 sums of da^2."""
    B, _, H, W = pred.shape
    cdt, cl = params[0].dtype, torch.channels_last
    with torch.no_grad(), _no_autocast(pred.device):
        p32, t32 = pred.float(), target.float()
        a = torch.cat([p32 - t32, t32]).to(cdt).contiguous(memory_format=cl)  # [2B, 3, H, W]: [dz; z_t]
        del p32, t32

        def step(a, w, b, groups, keep):
            u = F.conv2d(a, w, None, groups=groups)                             # [du; u_t - b], compute dtype
            ut = u[B:].float() + b.float().view(1, -1, 1, 1)
            up = ut + u[:B].float()
            mask = (torch.cat([up > 0, ut > 0]) if target_grad else up > 0) if need_grad else None
            at = F.leaky_relu(ut, slope)
            da = F.leaky_relu_(up, slope).sub_(at)                              # float32
            nxt = torch.cat([da.to(cdt), at.to(cdt)]).contiguous(memory_format=cl) if keep else None
            return da, nxt, mask

        units, per_channel = _unit_layout(params, unit_sizes)
        if paper:
            chan_w = _sum_weights(units, params[0].shape[0], pred.device, cdt)
        else:
            chan_w = _chan_weights(units, per_channel, _spatial(H, W), pred.device, cdt)
        loss = torch.zeros(B, dtype=torch.float32, device=pred.device)
        diffs_head, diffs_body, diffs_tail, masks = None, [], [], []

        def add(da, w):  # loss[b] += sum_c w[c] sum_hw da^2, in float32
            nonlocal loss
            loss = loss + (da.square() * w.float().view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
            return da.to(cdt).contiguous(memory_format=_sample_layout(da)) if need_grad else None

        dh, h, mask_head = step(a, params[0], params[1], 1, True)               # [B, S, H-2, W-2]
        del a
        diffs_head = add(dh, chan_w[0])
        del dh
        start, wi = 0, 1
        for u, (k, n) in enumerate(units):
            w1, b1, w2, b2, w3, b3, wt, bt = params[2 + 8 * u: 10 + 8 * u]
            a = h[:, start:start + k * n]
            start += k * n
            for j, (w_, b_) in enumerate(((w1, b1), (w2, b2), (w3, b3))):
                da, a, m = step(a, w_, b_, k, True)
                masks += [m] if need_grad else []
                if paper:
                    diffs_body.append(add(da, chan_w[wi]))
                    wi += 1
                elif j == 2:
                    diffs_body.append(add(da, chan_w[1 + u]))
                del da
            if not paper:
                dt = F.conv2d(a[:B], wt, None, groups=k).float()                # tail difference (linear)
                diffs_tail.append(add(dt, chan_w[1 + len(units) + u]))
            del a
        del h
    if not need_grad:
        return loss, []
    return loss, [diffs_head, mask_head] + diffs_body + diffs_tail + masks


@mdf_forward.register_fake
def _(pred, target, params, unit_sizes, slope, need_grad, target_grad, backend, paper):
    B, _, H, W = pred.shape
    cdt = params[0].dtype
    loss = pred.new_empty((B,), dtype=_acc_dtype(cdt))
    if not need_grad:
        return loss, []
    rows = 2 * B if target_grad else B

    def t(shape, dtype=cdt):  # the fast path's tensors are channels_last (contiguous if C == 1)
        fmt = torch.channels_last if shape[1] > 1 else torch.contiguous_format
        return torch.empty(shape, dtype=dtype, device=pred.device, memory_format=fmt)

    S = params[0].shape[0]
    kns = [params[2 + 8 * u].shape[0] for u in range(len(unit_sizes))]
    saved = [t((B, S, H - 2, W - 2)), t((rows, S, H - 2, W - 2), torch.bool)]
    if paper:
        saved += [t((B, kn, H - e, W - e)) for kn in kns for e in (4, 6, 8)]
    else:
        saved += [t((B, kn, H - 8, W - 8)) for kn in kns] + [t((B, k, H - 10, W - 10)) for k in unit_sizes]
    for kn in kns:
        saved += [t((rows, kn, H - 4, W - 4), torch.bool), t((rows, kn, H - 6, W - 6), torch.bool),
                  t((rows, kn, H - 8, W - 8), torch.bool)]
    return loss, saved


@torch.library.custom_op("fastloss::mdf_backward", mutates_args=())
def mdf_backward(grad: Tensor, saved: List[Tensor], params: List[Tensor], unit_sizes: List[int], slope: float,
                 need_pred: bool, need_target: bool, backend: str, paper: bool) -> Tuple[Tensor, Tensor]:
    """Gradients of ``sum_b grad[b] loss[b]`` for pred and target (an empty tensor where not needed),
    in the compute dtype: the fused reduction writes every feature's gradient from the saved diffs,
    then transposed convolutions and the saved LeakyReLU masks carry them back through the merged
    discriminators."""
    _check_params(params, unit_sizes)
    U = len(unit_sizes)
    n_diffs = 3 * U if paper else 2 * U
    d_head, mask_head = saved[0], saved[1]
    diffs = [d_head] + list(saved[2:2 + n_diffs])
    masks = saved[2 + n_diffs:]
    B = d_head.shape[0]
    units, per_channel = _unit_layout(params, unit_sizes)
    if paper:
        chan_w = _sum_weights(units, d_head.shape[1], d_head.device, d_head.dtype)
    else:
        chan_w = _chan_weights(units, per_channel, _spatial(d_head.shape[2] + 2, d_head.shape[3] + 2),
                               d_head.device, d_head.dtype)
    with torch.no_grad(), _no_autocast(grad.device):
        g_feats = mdf_sqdiff_backward(grad, diffs, chan_w, backend)        # [B, ...] each
        if need_target:
            g_feats = [torch.cat([g, -g]) for g in g_feats]
        gh = g_feats[0]                                                    # [rows, S, H-2, W-2]
        start = 0
        for u, (k, n) in enumerate(units):
            w1, _, w2, _, w3, _, wt, _ = params[2 + 8 * u: 10 + 8 * u]
            m1, m2, m3 = masks[3 * u: 3 * u + 3]
            if paper:  # each block output's own term joins the gradient flowing back through it
                g1, g2, g = g_feats[1 + 3 * u: 4 + 3 * u]                  # [rows, kN, H-4 / H-6 / H-8, ...]
                g = _lrelu_backward_(g, m3, slope, backend)
                g = F.conv_transpose2d(g, w3, groups=k)
                g += g2
                g = _lrelu_backward_(g, m2, slope, backend)
                g = F.conv_transpose2d(g, w2, groups=k)
                g += g1
                g = _lrelu_backward_(g, m1, slope, backend)
            else:
                g = F.conv_transpose2d(g_feats[1 + U + u], wt, groups=k)   # [rows, kN, H-8, W-8]
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
def _(grad, saved, params, unit_sizes, slope, need_pred, need_target, backend, paper):
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
    pred, target, params, unit_sizes, slope, need_grad, target_grad, backend, paper = inputs
    ctx.save_for_backward(*output[1])
    ctx.mark_non_differentiable(*output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved tensors
    ctx.params, ctx.unit_sizes, ctx.slope, ctx.backend, ctx.paper = params, unit_sizes, slope, backend, paper
    ctx.target_grad = target_grad
    ctx.dtypes = pred.dtype, target.dtype  # the gradients leave the compute dtype in these


def _mdf_backward(ctx, grad, _saved_grads):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.target_grad
    saved = list(ctx.saved_tensors)
    if not saved:
        raise RuntimeError("MDFLoss: the forward ran without need_grad; nothing was saved for the backward")
    gp, gt = mdf_backward(grad, saved, ctx.params, ctx.unit_sizes, ctx.slope, need_pred, need_target, ctx.backend,
                          ctx.paper)
    return ((gp.to(ctx.dtypes[0]) if need_pred else None), (gt.to(ctx.dtypes[1]) if need_target else None),
            [None] * len(ctx.params), None, None, None, None, None, None)


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
    discriminators of a set (``formula="published"``, the default), or the paper's Eq. 2,
    ``mean_b sum_s sum_l sum_chw (phi_sl(pred) - phi_sl(target))^2`` over the four LeakyReLU outputs
    of each (``formula="paper"``); see the module docstring.

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

    ``compute_dtype``: ``None`` (default) computes in the input's dtype, or in bfloat16 inside a
    ``torch.autocast(dtype=torch.bfloat16)`` region of the input's device type (float32 / float16
    inputs); ``torch.bfloat16`` always. In bfloat16 the folded convolutions (forward and transposed)
    run in bfloat16, channels_last, BatchNorm folded in float64 and rounded once, on the batch
    [pred - target; target] (``_delta_forward``): the feature differences are formed and the
    reductions accumulated in float32, and the rounding is relative to each difference, not to the
    features. The loss and the gradients come back in the input's dtype. Tested against float32:
    the loss within 2e-2, input gradients in norm within 2e-2 (paper) / 6e-2 (published: LeakyReLU
    kink noise, see tests/test_mdf_bf16.py). The ``reference`` backend given a compute dtype runs
    under ``torch.autocast`` in it.
    """

    def __init__(self, weights="denoise", scales: int = 8, ascending: bool = True, backend: str = "auto",
                 grouped: Optional[bool] = None, formula: str = "published",
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        _backend.requested(backend, "MDFLoss")
        self.formula = _check_formula(formula, "MDFLoss")
        if compute_dtype not in (None, torch.bfloat16):
            raise ValueError(f"MDFLoss: compute_dtype must be None or torch.bfloat16, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
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
                f"formula={self.formula!r}, compute_dtype={self.compute_dtype}, source={self.weights.source!r}")

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

    def _compute_dtype(self, pred: Tensor) -> torch.dtype:
        """The fast path's dtype: ``compute_dtype``, else bfloat16 in a bfloat16 autocast region
        (float64 inputs excepted, as autocast leaves them), else the input's."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        dev = pred.device.type
        if (pred.dtype != torch.float64 and dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)
                and torch.get_autocast_dtype(dev) == torch.bfloat16):
            return torch.bfloat16
        return pred.dtype

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_images(pred, target)
        self._range_check(target)  # the data convention; an untrained network's output strays from it
        if _half_on_cpu_backend(self.backend, pred.device, pred.dtype):
            # auto on the CPU: the cpu backend's kernels take float32 / float64, so float16 / bfloat16
            # images run there in float32 (not in the reference in their own dtype); the loss comes
            # back in their dtype, and so do the gradients (through the casts)
            return self.forward(pred.float(), target.float()).to(pred.dtype)
        name = _backend.resolve(_OP, self.backend, pred.device, pred.dtype, dtypes=_DTYPES)
        if name == "reference":
            with (torch.autocast(pred.device.type, dtype=self.compute_dtype) if self.compute_dtype is not None
                  else contextlib.nullcontext()):
                return _reference_loss(pred, target, self.reference_discriminators(pred.device, pred.dtype),
                                       self.weights.eps, self.weights.negative_slope, self.formula)
        grouped = self.grouped if self.grouped is not None else pred.device.type == "cuda"
        params, unit_sizes = self.params(pred.device, self._compute_dtype(pred), grouped)
        grad_on = torch.is_grad_enabled()
        target_grad = grad_on and target.requires_grad
        need_grad = grad_on and (pred.requires_grad or target_grad)
        loss, _ = mdf_forward(pred, target, params, unit_sizes, self.weights.negative_slope, need_grad,
                              target_grad, name, self.formula == "paper")
        return loss.mean().to(pred.dtype)
