"""FDL on one layer's features through fastloss's fused sort: ``fdl`` (the public op) and the sliced
1-D Wasserstein distance it is made of.

The FFT, magnitude / phase and the projection convolutions are PyTorch's (MKL / cuFFT, oneDNN /
cuDNN); the sort and the L1 of every projected channel are the forward of ``fastloss.pdl``'s fused
op (p = 1, mean over positions; its backend table and dispatch), on every backend.

What the backward keeps (issue 23): for p = 1 the gradient of ``mean_i |sort(a)_i - sort(b)_i|``
w.r.t. an element of ``a`` is ``sign(d)/N`` of the difference at that element's rank. PDL's op
keeps the int32 permutation and the int8 sign in rank order (5 bytes per element) and scatters in
the backward; here the sign is scattered back to each element's own position once, right after
the forward, and only that int8 map is kept (1 byte per element, and a backward with no gather):
``_ProjectedSortedL1``. torch.sort keeps int64 indices and the float difference (12 bytes). The
projections run in chunks of filters, so that only one chunk's projected maps and permutation
exist at a time, and keep the filters, not their input (see ``_ProjectedSortedL1``).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.autograd.function import once_differentiable

from .. import _ops
from ..pdl import ops as pdl_ops
from .reference import fdl_layer_reference, sliced_w1_reference

_OP = "fdl"
# Projected elements (B * filters * positions) per chunk and side: at most CHUNK_ELEMENTS (16 MiB of
# float32), but never fewer than MIN_CHUNK_FILTERS filters, below which oneDNN's convolutions measured
# up to 1.7x slower per filter (2 threads, 64 channels: 16 filters per call vs 64 or more).
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_FILTERS = 64
# filters per int64 index while scattering the signs to their positions (8 bytes per element)
SCATTER_FILTERS = 16


class _ProjectedSortedL1(torch.autograd.Function):
    """Per sample, ``sum_k (1/N) sum_i |sort(P_k * a)_i - sort(P_k * b)_i|``, shape (B,): the
    projections (conv2d, no padding, ``stride``) run ``per`` filters at a time, each chunk's sorts
    by the fused op's forward (``backend``); ``b`` without gradient.

    The backward keeps the filters and one int8 per projected element of ``a``: the sign of the
    difference at the element's rank, scattered to its own position. Not ``a`` itself, which
    ``F.conv2d`` would keep for a weight gradient that fixed filters never need: the input gradient
    of a convolution is the transposed convolution of the output gradient with the filters."""

    @staticmethod
    def forward(ctx, a, b, filters, stride, backend, per):
        total = a.new_zeros(a.shape[0])
        owns = []
        for start in range(0, filters.shape[0], per):
            p = filters[start:start + per]
            pa = F.conv2d(a, p, stride=stride)  # [B, k, h, w]
            pb = F.conv2d(b, p, stride=stride)
            ctx.hw = tuple(pa.shape[-2:])
            pa, pb = pa.flatten(2), pb.flatten(2)  # [B, k, N]
            pdl_ops.check_inputs(pa, pb, 1, "mean", _OP)
            w, perm, _, sign = pdl_ops._pdl_forward(pa, pb, 1, False, backend)  # perm int32, sign int8 [B,k,N]
            total += w.sum(1).to(total.dtype)
            if ctx.needs_input_grad[0]:
                own = torch.empty_like(sign)  # [B, k, N] int8: each element's sign at its own position
                for j in range(0, own.shape[1], SCATTER_FILTERS):  # the int64 index of a few rows at a time
                    own[:, j:j + SCATTER_FILTERS].scatter_(-1, perm[:, j:j + SCATTER_FILTERS].long(),
                                                           sign[:, j:j + SCATTER_FILTERS])
                owns.append(own)
            del pa, pb, perm, sign
        ctx.save_for_backward(filters, *owns)
        ctx.stride, ctx.per, ctx.shape, ctx.dtype = stride, per, a.shape, a.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        filters, *owns = ctx.saved_tensors
        if not owns:
            return None, None, None, None, None, None
        g = grad.to(ctx.dtype).view(-1, 1, 1)
        grad_a = None
        for i, own in enumerate(owns):
            p = filters[i * ctx.per:(i + 1) * ctx.per]
            go = (own.to(ctx.dtype) * (g / own.shape[-1])).view(*own.shape[:2], *ctx.hw)  # d loss / d (P * a)
            ga = torch.nn.grad.conv2d_input(ctx.shape, p, go, stride=ctx.stride)
            grad_a = ga if grad_a is None else grad_a.add_(ga)
        return grad_a, None, None, None, None, None


def check_map(op, layer, shape, patch_size, image=None):
    """A ``patch_size`` x ``patch_size`` filter must fit the (H, W) feature map of ``layer`` (a
    layer name, or None for the features an op was given)."""
    h, w = int(shape[-2]), int(shape[-1])
    if h < patch_size or w < patch_size:
        at = f" (images {image[0]} x {image[1]})" if image else ""
        where = f"layer {layer}'s feature map" if layer is not None else "the feature map"
        raise ValueError(f"{op}: patch_size={patch_size} is larger than {where}, {h} x {w}{at}; "
                         "use larger images, a smaller patch_size or fewer layers")


def sliced_w1(a: Tensor, b: Tensor, filters: Tensor, stride: int = 1, backend: str = "auto") -> Tensor:
    """``mean over b of (1/K) sum_k (1/N) sum_i |sort(P_k * a)_i - sort(P_k * b)_i|``: the sliced
    Wasserstein-1 distance of the published code, the sorts on ``fastloss.pdl``'s fused op (the
    reference backend: ``torch.sort`` and autograd); ``b`` (target) without autograd."""
    num = filters.shape[0]
    h = (a.shape[-2] - filters.shape[-2]) // stride + 1
    w = (a.shape[-1] - filters.shape[-1]) // stride + 1
    per = max(MIN_CHUNK_FILTERS, CHUNK_ELEMENTS // max(1, a.shape[0] * h * w))  # filters per chunk
    name, _ = _ops.select("pdl", pdl_ops.IMPLS, backend, a.device, a.dtype)
    if pdl_ops.IMPLS[name].formula:
        return sliced_w1_reference(a, b.detach(), filters, stride).mean()
    return _ProjectedSortedL1.apply(a, b.detach(), filters, stride, name, per).mean() / num


def fdl(pred: Tensor, target: Tensor, filters: Tensor, *, stride: int = 1, phase_weight: float = 1.0,
        backend: str = "auto") -> Tensor:
    """One layer's FDL, mean over the batch: ``S(|F pred|, |F target|) + phase_weight * S(angle F pred,
    angle F target)``, ``F`` the 2-D FFT over (H, W), ``S`` the sliced W1 of ``sliced_w1`` with
    ``filters`` (K, C, k, k). ``pred``, ``target``: (B, C, H, W) features; target without autograd.
    ``backend="reference"`` is the published formula (``torch.sort`` and autograd). float16 /
    bfloat16 features are computed in float32; the result is float32 then."""
    _ops.check_pair(_OP, pred, target, min_dim=4, what="be (B, C, H, W)")
    if pred.dim() != 4:
        raise ValueError(f"{_OP}: pred must be (B, C, H, W), got shape {tuple(pred.shape)}")
    if filters.dim() != 4 or filters.shape[1] != pred.shape[1] or filters.shape[-1] != filters.shape[-2]:
        raise ValueError(f"{_OP}: filters must be (K, {pred.shape[1]}, k, k) for features of {pred.shape[1]} "
                         f"channels, got shape {tuple(filters.shape)}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{_OP}: stride must be an int >= 1, got {stride!r}")
    if not phase_weight >= 0:
        raise ValueError(f"{_OP}: phase_weight must be >= 0, got {phase_weight!r}")
    check_map(_OP, None, pred.shape, filters.shape[-1])
    if pred.dtype in (torch.float16, torch.bfloat16):  # the formula runs in float32 (FFTs have no half CPU kernels)
        pred, target = pred.float(), target.float()
    name, _ = _ops.select("pdl", pdl_ops.IMPLS, backend, pred.device, pred.dtype)
    filters = filters.to(pred.dtype)
    if pdl_ops.IMPLS[name].formula:
        return fdl_layer_reference(pred, target, filters, stride, phase_weight).mean()
    mag, phase = _spectrum(pred)
    with torch.no_grad():
        mag_t, phase_t = _spectrum(target)
    loss = sliced_w1(mag, mag_t, filters, stride, name)
    if phase_weight != 0:  # the published code computes the phase term and multiplies it by 0
        loss = loss + phase_weight * sliced_w1(phase, phase_t, filters, stride, name)
    return loss


# --------------------------------------------------------------------------- the spectrum op
# |F x| and angle(F x) as one custom op with its own backward: opaque to torch.compile, whose
# CPU layout optimisation hands the complex gradient of torch.fft's autograd a layout it cannot
# view as real pairs (``self.stride(-1) must be 1 to view ComplexFloat as Float``: PyTorch 2.13,
# the FFT + abs / angle + convolution pattern alone, without fastloss). The op keeps x, not the
# complex spectrum, and recomputes the FFT in the backward.
@torch.library.custom_op("fastloss::fdl_spectrum", mutates_args=())
def _spectrum(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(|F x|, angle(F x)), contiguous: F the 2-D FFT over the last two dims of real x."""
    fx = torch.fft.fftn(x, dim=(-2, -1))
    return fx.abs().contiguous(), torch.angle(fx).contiguous()


@_spectrum.register_fake
def _(x):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("fastloss::fdl_spectrum_backward", mutates_args=())
def _spectrum_backward(x: Tensor, grad_mag: Tensor, grad_phase: Tensor) -> Tensor:
    """The gradient w.r.t. real x of ``<grad_mag, |F x|> + <grad_phase, angle(F x)>``: with
    z = F x = a + ib, d|z| = (a da + b db) / |z| and d angle(z) = (a db - b da) / |z|^2 (both 0
    where z = 0, as torch.abs and torch.angle give), and for dL = <g_a, da> + <g_b, db> the
    gradient of x is Re(F^H (g_a + i g_b)) = H W Re(ifft2(g_a + i g_b))."""
    fx = torch.fft.fftn(x, dim=(-2, -1))
    a, b = fx.real, fx.imag
    m2 = a * a + b * b
    nonzero = m2 > 0
    inv_m = torch.where(nonzero, m2.rsqrt(), 0.0)
    inv_m2 = torch.where(nonzero, 1.0 / torch.where(nonzero, m2, 1.0), 0.0)
    g_a = grad_mag * a * inv_m - grad_phase * b * inv_m2
    g_b = grad_mag * b * inv_m + grad_phase * a * inv_m2
    n = x.shape[-1] * x.shape[-2]
    g = torch.fft.ifftn(torch.complex(g_a, g_b), dim=(-2, -1)).real * n
    return g.contiguous(memory_format=_layout(x))


@_spectrum_backward.register_fake
def _(x, grad_mag, grad_phase):
    return torch.empty_like(x, memory_format=_layout(x))


def _layout(x):
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def _spectrum_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _spectrum_grad(ctx, grad_mag, grad_phase):
    if torch.is_grad_enabled():
        raise RuntimeError("fdl: double backward (create_graph=True) is not supported")
    (x,) = ctx.saved_tensors
    return _spectrum_backward(x, grad_mag, grad_phase)


_spectrum.register_autograd(_spectrum_grad, setup_context=_spectrum_setup)
