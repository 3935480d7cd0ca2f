"""MDF's fast path: BatchNorm folding, the merged convolutions, the ``torch.library`` custom ops
(the fused feature extraction, its backward, the fused squared-difference reduction), their
autograd, and the backend table.

The fast path (backends ``cpu``, ``triton``, ``cuda``): BatchNorm folded into the convolutions
  once, when the loss is built; pred and target stacked into one batch and run without autograd
  (``fastloss::mdf_forward``); every head in one convolution with 3 input channels and the sum of
  the widths as outputs; equal-width discriminators merged into grouped convolutions (or run one
  by one on their slice of the merged head, see ``MDFLoss``); bias and LeakyReLU fused into the
  convolution; and the squared-difference reductions of all 3 x ``scales`` feature pairs in one
  kernel per backend (``csrc/cpu/mdf.cpp``, ``kernels/mdf.py``, ``csrc/cuda/mdf_kernels.cu``),
  whose backward writes the gradient of each feature directly. The backward
  (``fastloss::mdf_backward``) runs the transposed convolutions on the pred half only (and on the
  target half when the target requires grad), through the LeakyReLU derivatives rebuilt from
  saved bool masks (``lrelu_backward_``: one in-place C++ pass on CPU tensors with the ``cpu``
  backend, ``torch.where`` otherwise).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ops
from .weights import LAYERS

_OP = "mdf"
_acc_dtype = _ops.acc_dtype


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


def _sqdiff_forward_ref(feats, chan_w, batch, save_diff):
    diffs = [(x[:batch] - x[batch:]).contiguous(memory_format=_sample_layout(x)) for x in feats] if save_diff else []
    return sqdiff_reference(feats, chan_w, batch), diffs


def _sqdiff_backward_ref(grad, diffs, chan_w):
    g = grad.to(_acc_dtype(diffs[0].dtype)).view(-1, 1, 1, 1)
    return [(2 * g * w.view(1, -1, 1, 1) * d).to(d.dtype) for d, w in zip(diffs, chan_w)]


@torch.library.custom_op("fastloss::mdf_sqdiff_forward", mutates_args=())
def mdf_sqdiff_forward(feats: List[Tensor], chan_w: List[Tensor], batch: int, save_diff: bool, backend: str
                       ) -> Tuple[Tensor, List[Tensor]]:
    """feats [2B, C_m, H_m, W_m] (pred then target), chan_w [C_m] -> (loss [B], the diffs pred - target
    [B, C_m, H_m, W_m] when ``save_diff``); see csrc/cpu/mdf.cpp."""
    loss, diffs = IMPLS[backend].forward(list(feats), list(chan_w), batch, save_diff)
    return loss, list(diffs)


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
    return list(IMPLS[backend].backward(grad, list(diffs), list(chan_w)))


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
            g = torch.Generator().manual_seed(0)  # its own: the user's seeded global stream stays as it is
            x = torch.randn(2, 3, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
            y = op(x, w, b, [0, 0], [1, 1], [1, 1], 1, "leaky_relu", [0.2], "")
            ok = bool(torch.allclose(y, F.leaky_relu(F.conv2d(x, w, b), 0.2), atol=1e-5))
        except Exception:  # noqa: BLE001 - an optional fusion; the fallback is exact
            ok = False
        _MKLDNN_POINTWISE[0] = ok
    return _MKLDNN_POINTWISE[0]


def _conv_lrelu_torch(x: Tensor, w: Tensor, b: Tensor, groups: int, slope: float) -> Tensor:
    """LeakyReLU(conv(x, w) + b): the convolution with its bias, then an in-place LeakyReLU."""
    return F.leaky_relu_(F.conv2d(x, w, b, groups=groups), slope)


def _conv_lrelu_onednn(x: Tensor, w: Tensor, b: Tensor, groups: int, slope: float) -> Tensor:
    """Bias and LeakyReLU fused into oneDNN's convolution on CPU float32 (else ``_conv_lrelu_torch``)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and _mkldnn_pointwise_ok():
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 0], [1, 1], [1, 1], groups, "leaky_relu",
                                                       [slope], "")
    return _conv_lrelu_torch(x, w, b, groups, slope)


def _conv_lrelu_then(bias_lrelu_):
    """The convolution without its bias, then one kernel that adds the bias and applies
    LeakyReLU in place, ``bias_lrelu_(y, b, slope)`` (triton, cuda)."""
    def conv_lrelu(x, w, b, groups, slope):
        y = F.conv2d(x, w, None, groups=groups)
        bias_lrelu_(y, b, slope)
        return y
    return conv_lrelu


def _lrelu_backward_torch(g: Tensor, mask: Tensor, slope: float) -> Tensor:
    """``g * LeakyReLU'`` from the saved bool mask (input > 0)."""
    return torch.where(mask, g, g * slope)


def _lrelu_backward_cpu(g: Tensor, mask: Tensor, slope: float) -> Tensor:
    """``_lrelu_backward_torch`` in place, one pass, with the C++ op."""
    if g.device.type != "cpu":
        return _lrelu_backward_torch(g, mask, slope)
    _ops.cpu("mdf_leaky_relu_backward_")(g, mask, slope)
    return g


def _chan_weights(units, widths_by_head_channel, shapes, device, dtype):
    """Per-channel weights 1 / (C_f H W) of the head tensor and of each unit's body / tail tensors,
    built once per device, dtype and shapes (a tensor built from a host list on every call would be
    a host-to-device copy that waits for the host and cannot be captured in a CUDA graph)."""
    key = (tuple(tuple(u) for u in units), tuple(widths_by_head_channel), tuple(tuple(s) for s in shapes),
           device, dtype)
    # a DeviceCache, not an LRU: a CUDA graph captured with these weights reads them on every replay
    return list(_CHAN_WEIGHTS.get(key, lambda: _chan_weights_build(*key), _ops.capturing(torch.device(device))))


_CHAN_WEIGHTS = _ops.DeviceCache(max_entries=64)


def _chan_weights_build(units, widths_by_head_channel, shapes, device, dtype):
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


def _spatial(H, W):
    """(head, body, tail) feature sizes of an H x W input."""
    return (H - 2, W - 2), (H - 8, W - 8), (H - 10, W - 10)


def _sum_weights(units, heads, device, dtype):
    """Per-channel weights 1 of the head tensor and of each unit's three block tensors (Eq. 2 sums),
    built once per shape (not a fill per tensor per call), kept like ``_chan_weights``'s."""
    key = ("sum", tuple(tuple(u) for u in units), heads, device, dtype)
    return list(_CHAN_WEIGHTS.get(key, lambda: _sum_weights_build(*key[1:]), _ops.capturing(torch.device(device))))


def _sum_weights_build(units, heads, device, dtype):
    acc = _acc_dtype(dtype)
    out = [torch.ones((heads,), dtype=acc, device=device)]
    for k, n in units:
        out += [torch.ones((k * n,), dtype=acc, device=device)] * 3
    return tuple(out)


# _AUTOCAST: inside the fast path autocast is off: under it some of its convolutions (the fused
# oneDNN ones) would stay in float32 and others not, and its kernels take one dtype. ``MDFLoss``
# reads autocast instead: a bfloat16 autocast region picks the bfloat16 compute dtype.

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
    impl = IMPLS[backend]
    B, _, H, W = pred.shape
    rows = 2 * B if target_grad else B
    cdt = params[0].dtype
    if cdt == torch.bfloat16 and pred.dtype != torch.bfloat16:
        if backend == "cpu" and _bf16_fused_ok(pred.device):
            return _delta_forward_fused(pred, target, params, unit_sizes, slope, need_grad, target_grad, paper)
        return _delta_forward(pred, target, params, unit_sizes, slope, need_grad, target_grad, paper)
    with torch.no_grad(), _ops.autocast_off(pred.device):  # see _AUTOCAST
        z = torch.cat([pred, target]).to(cdt).contiguous(memory_format=torch.channels_last)  # [2B, 3, H, W]
        h = impl.conv_lrelu(z, params[0], params[1], 1, slope)  # [2B, S, H-2, W-2], every head
        del z
        units, per_channel = _unit_layout(params, unit_sizes)
        bodies, tails, blocks, masks = [], [], [], []
        start = 0
        for u, (k, n) in enumerate(units):
            w1, b1, w2, b2, w3, b3, wt, bt = params[2 + 8 * u: 10 + 8 * u]
            a = impl.conv_lrelu(h[:, start:start + k * n], w1, b1, k, slope)  # [2B, kN, H-4, W-4]
            start += k * n
            m1 = a[:rows] > 0 if need_grad else None
            blocks += [a] if paper else []  # Eq. 2 keeps every block output; published, only the last
            a = impl.conv_lrelu(a, w2, b2, k, slope)             # [2B, kN, H-6, W-6]
            m2 = a[:rows] > 0 if need_grad else None
            blocks += [a] if paper else []
            a = impl.conv_lrelu(a, w3, b3, k, slope)             # [2B, kN, H-8, W-8], body output
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
    with torch.no_grad(), _ops.autocast_off(pred.device):
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


_BF16_FUSED = [None]  # whether the C++ bfloat16 steps are in the built extension (checked once)


def _bf16_fused_ok(device) -> bool:
    """Whether ``_delta_forward_fused`` / ``_backward_bf16_fused`` can run: a CPU tensor and an
    extension that has their C++ passes (an older build lacks them: the torch-op path runs)."""
    if device.type != "cpu":
        return False
    if _BF16_FUSED[0] is None:
        from .. import _ext
        mod, _ = _ext.load("_C")
        _BF16_FUSED[0] = mod is not None and all(hasattr(mod, f) for f in ("mdf_bf16_delta_step", "mdf_bf16_grad_step_"))
    return _BF16_FUSED[0]


_EMPTY = torch.empty(0)

_MKLDNN_PACKED = [None]  # whether oneDNN's convolutions on prepacked bfloat16 weights work here (checked once)
_PACKED = None  # weight -> {(transposed, groups): the weight reordered once for oneDNN}, weakly keyed


def _mkldnn_packed_ok() -> bool:
    if _MKLDNN_PACKED[0] is None:
        ok = False
        try:
            m, gen = torch.ops.mkldnn, torch.Generator().manual_seed(0)  # not the global generator: users seed it
            x = torch.randn(2, 4, 7, 6, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
            w = torch.randn(4, 2, 3, 3, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
            p = m._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 2, list(x.shape))
            y = m._convolution_pointwise(x, p, None, [0, 0], [1, 1], [1, 1], 2, "none", [], "")
            pt = m._reorder_convolution_transpose_weight(w, [0, 0], [0, 0], [1, 1], [1, 1], 2, list(x.shape))
            z = m._convolution_transpose_pointwise(x, pt, None, [0, 0], [0, 0], [1, 1], [1, 1], 2, "none", [], "")
            ok = bool(torch.allclose(y.float(), F.conv2d(x, w, groups=2).float(), rtol=1e-2, atol=1e-2)
                      and torch.allclose(z.float(), F.conv_transpose2d(x, w, groups=2).float(), rtol=1e-2, atol=1e-2))
        except Exception:  # noqa: BLE001 - an optional speed-up; the fallback is the same convolution
            ok = False
        _MKLDNN_PACKED[0] = ok
    return _MKLDNN_PACKED[0]


def _conv_bf16(x: Tensor, w: Tensor, groups: int, transposed: bool = False) -> Tensor:
    """``F.conv2d(x, w, groups=groups)`` (or ``F.conv_transpose2d``), bias-free, unpadded, on the CPU
    through oneDNN with ``w`` reordered into its blocked layout once and kept (per weight tensor, which
    MDFLoss caches), instead of once per call; the plain call where that is unavailable."""
    global _PACKED
    if not _mkldnn_packed_ok():
        return F.conv_transpose2d(x, w, groups=groups) if transposed else F.conv2d(x, w, None, groups=groups)
    if _PACKED is None:
        from torch.utils.weak import WeakIdKeyDictionary
        _PACKED = WeakIdKeyDictionary()
    per = _PACKED.get(w)
    if per is None:
        per = _PACKED.setdefault(w, {})
    m, z = torch.ops.mkldnn, [0, 0]
    packed = per.get((transposed, groups))
    if packed is None:
        packed = (m._reorder_convolution_transpose_weight(w, z, z, [1, 1], [1, 1], groups, list(x.shape)) if transposed
                  else m._reorder_convolution_weight(w, z, [1, 1], [1, 1], groups, list(x.shape)))
        per[(transposed, groups)] = packed
    if transposed:
        return m._convolution_transpose_pointwise(x, packed, None, z, z, [1, 1], [1, 1], groups, "none", [], "")
    return m._convolution_pointwise(x, packed, None, z, [1, 1], [1, 1], groups, "none", [], "")


def _delta_forward_fused(pred, target, params, unit_sizes, slope, need_grad, target_grad, paper):
    """``_delta_forward`` with the float32 work after each bias-free bfloat16 convolution in one C++
    pass (``mdf_bf16_delta_step``, csrc/cpu/mdf.cpp): bias, both LeakyReLUs, the difference, the next
    layer's bfloat16 input [da; a_t], the saved diff and masks, and the float32 reduction of da^2. It
    gives the same tensors as ``_delta_forward`` bit for bit; only the order of the loss's sums differs."""
    B, _, H, W = pred.shape
    cdt, cl = params[0].dtype, torch.channels_last
    step_op = _ops.cpu("mdf_bf16_delta_step")
    mask_rows = (2 * B if target_grad else B) if need_grad else 0
    with torch.no_grad(), _ops.autocast_off(pred.device):
        p32, t32 = pred.float(), target.float()
        a = torch.cat([p32 - t32, t32]).to(cdt).contiguous(memory_format=cl)  # [2B, 3, H, W]: [dz; z_t]
        del p32, t32
        units, per_channel = _unit_layout(params, unit_sizes)
        if paper:
            chan_w = _sum_weights(units, params[0].shape[0], pred.device, cdt)
        else:
            chan_w = _chan_weights(units, per_channel, _spatial(H, W), pred.device, cdt)
        losses, masks, diffs_body, diffs_tail = [], [], [], []

        def step(a, i, groups, w, save, splits=()):
            u = _conv_bf16(a, params[i], groups)                                # [du; u_t - b], bfloat16
            nxt, da, mask, loss = step_op(u, params[i + 1], slope, B, _EMPTY if w is None else w,
                                          need_grad and save, mask_rows, list(splits))
            if w is not None:
                losses.append(loss)
            return (nxt if splits else nxt[0]), (da if need_grad and save else None), (mask if need_grad else None)

        # the head's next input comes split per unit: [2B, kN, H-2, W-2] each, dense
        heads, diffs_head, mask_head = step(a, 0, 1, chan_w[0], True, [k * n for k, n in units])
        del a
        wi = 1
        for u, (k, n) in enumerate(units):
            a = heads[u]
            heads[u] = None
            for j in range(3):
                i = 2 + 8 * u + 2 * j
                if paper:
                    a, da, m = step(a, i, k, chan_w[wi], True)
                    wi += 1
                    diffs_body.append(da)
                elif j == 2:
                    a, da, m = step(a, i, k, chan_w[1 + u], True)
                    diffs_body.append(da)
                else:
                    a, _, m = step(a, i, k, None, False)
                masks.append(m)
            if not paper:
                dt = _conv_bf16(a[:B], params[8 + 8 * u], k)                     # tail difference (linear)
                diffs_tail.append(dt.contiguous(memory_format=_sample_layout(dt)))
            del a
        if diffs_tail:  # the published tail term: mean over the tail map, every tail in one call
            losses.append(_ops.cpu("mdf_bf16_sqsum")(diffs_tail, [1.0 / ((H - 10) * (W - 10))] * len(diffs_tail)))
        loss = torch.stack(losses).sum(0)
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
    impl = IMPLS[backend]
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
    if d_head.dtype == torch.bfloat16 and backend == "cpu" and _bf16_fused_ok(d_head.device):
        gz = _backward_bf16_fused(grad, diffs, masks, mask_head, params, units, chan_w, slope, need_target, paper)
        return _split_input_grads(gz, B, need_pred, need_target)
    with torch.no_grad(), _ops.autocast_off(grad.device):
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
                g = impl.lrelu_backward_(g, m3, slope)
                g = F.conv_transpose2d(g, w3, groups=k)
                g += g2
                g = impl.lrelu_backward_(g, m2, slope)
                g = F.conv_transpose2d(g, w2, groups=k)
                g += g1
                g = impl.lrelu_backward_(g, m1, slope)
            else:
                g = F.conv_transpose2d(g_feats[1 + U + u], wt, groups=k)   # [rows, kN, H-8, W-8]
                g += g_feats[1 + u]
                g = impl.lrelu_backward_(g, m3, slope)
                g = impl.lrelu_backward_(F.conv_transpose2d(g, w3, groups=k), m2, slope)
                g = impl.lrelu_backward_(F.conv_transpose2d(g, w2, groups=k), m1, slope)
            gh[:, start:start + k * n] += F.conv_transpose2d(g, w1, groups=k)
            start += k * n
        gh = impl.lrelu_backward_(gh, mask_head, slope)
        gz = F.conv_transpose2d(gh, params[0])                              # [rows, 3, H, W]
    return _split_input_grads(gz, B, need_pred, need_target)


def _split_input_grads(gz, B, need_pred, need_target):
    empty = gz.new_empty((0,))
    gp = gz[:B].clone() if need_pred and need_target else (gz if need_pred else empty)
    gt = gz[B:] if need_target else empty
    return gp, gt


def _backward_bf16_fused(grad, diffs, masks, mask_head, params, units, chan_w, slope, need_target, paper):
    """``mdf_backward``'s body in bfloat16 on the CPU with each LeakyReLU's backward, the addition of
    a feature's own term ``2 grad[b] w[c] diff`` and the target rows' negation in one C++ pass
    (``mdf_bf16_grad_step_``, float32 inside, rounded once), written straight into its slice of the
    head's gradient; the transposed convolutions as before. Returns the gradient of [pred; target]
    (rows B or 2B)."""
    step_ = _ops.cpu("mdf_bf16_grad_step_")
    U = len(units)
    d_head = diffs[0]
    B = d_head.shape[0]
    rows = mask_head.shape[0]
    with torch.no_grad(), _ops.autocast_off(grad.device):
        grad32 = grad.reshape(-1).float()
        gh = torch.empty((rows,) + tuple(d_head.shape[1:]), dtype=d_head.dtype, device=d_head.device,
                         memory_format=torch.channels_last)
        if not paper:  # the tail maps' gradients 2 grad[b] w d, in one call ([g; -g] for the target rows)
            g_tails = mdf_sqdiff_backward(grad, list(diffs[1 + U:]), list(chan_w[1 + U:]), "cpu")
            g_tails = [torch.cat([g, -g]) for g in g_tails] if need_target else g_tails
        start = 0
        for u, (k, n) in enumerate(units):
            w1, _, w2, _, w3, _, wt, _ = params[2 + 8 * u: 10 + 8 * u]
            m1, m2, m3 = masks[3 * u: 3 * u + 3]
            if paper:
                d1, d2, d3 = diffs[1 + 3 * u: 4 + 3 * u]
                w_1, w_2, w_3 = chan_w[1 + 3 * u: 4 + 3 * u]
                g = torch.empty_like(m3, dtype=d3.dtype)
                step_(g, _EMPTY, d3, m3, grad32, w_3, slope)
                g = _conv_bf16(g, w3, k, True)
                step_(g, g, d2, m2, grad32, w_2, slope)
                g = _conv_bf16(g, w2, k, True)
                step_(g, g, d1, m1, grad32, w_1, slope)
            else:
                gt_ = g_tails[u]
                g = _conv_bf16(gt_, wt, k, True)                   # [rows, kN, H-8, W-8]
                step_(g, g, diffs[1 + u], m3, grad32, chan_w[1 + u], slope)
                g = _conv_bf16(g, w3, k, True)
                step_(g, g, _EMPTY, m2, grad32, _EMPTY, slope)
                g = _conv_bf16(g, w2, k, True)
                step_(g, g, _EMPTY, m1, grad32, _EMPTY, slope)
            sl = slice(start, start + k * n)
            step_(gh[:, sl], _conv_bf16(g, w1, k, True), d_head[:, sl], mask_head[:, sl], grad32,
                  chan_w[0][sl], slope)
            start += k * n
        return _conv_bf16(gh, params[0], 1, True)                            # [rows, 3, H, W]


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




# --------------------------------------------------------------------------- backends
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# backend -> the fused reduction and the hooks of the fused extraction:
#   forward(feats, chan_w, batch, save_diff) -> (loss [B], diffs): ``mdf_sqdiff_forward``
#   backward(grad, diffs, chan_w) -> the gradient of each pred half: ``mdf_sqdiff_backward``
#   conv_lrelu(x, w, b, groups, slope): LeakyReLU(conv(x, w) + b), bias and activation fused
#   lrelu_backward_(g, mask, slope): g * LeakyReLU' from the saved mask, in place where it can
# The cpu kernels take float32 / float64: auto runs float16 / bfloat16 CPU images there in float32.
IMPLS = {
    "reference": _ops.Impl(_sqdiff_forward_ref, _sqdiff_backward_ref, formula=True,  # MDFLoss: the published order
                           extra={"conv_lrelu": _conv_lrelu_torch, "lrelu_backward_": _lrelu_backward_torch}),
    "cpu": _ops.Impl(_ops.cpu("mdf_sqdiff_forward"), _ops.cpu("mdf_sqdiff_backward"),
                     dtypes=(torch.float32, torch.float64),
                     promote={torch.float16: torch.float32, torch.bfloat16: torch.float32},
                     extra={"conv_lrelu": _conv_lrelu_onednn, "lrelu_backward_": _lrelu_backward_cpu}),
    "triton": _ops.Impl(_ops.triton("mdf", "mdf_sqdiff_forward"), _ops.triton("mdf", "mdf_sqdiff_backward"),
                        dtypes=_FLOATS, extra={"conv_lrelu": _conv_lrelu_then(_ops.triton("mdf", "bias_leaky_relu_")),
                                               "lrelu_backward_": _lrelu_backward_torch}),
    "cuda": _ops.Impl(_ops.cuda("mdf_sqdiff_forward"), _ops.cuda("mdf_sqdiff_backward"), dtypes=_FLOATS,
                      extra={"conv_lrelu": _conv_lrelu_then(_ops.cuda("mdf_bias_leaky_relu_")),
                             "lrelu_backward_": _lrelu_backward_torch}),
}
