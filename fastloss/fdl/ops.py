"""FDL on one layer's features through fastloss's fused sort: ``fdl`` (the public op) and the sliced
1-D Wasserstein distance it is made of.

The FFT, magnitude / phase and the projection convolutions are PyTorch's (MKL / cuFFT, oneDNN /
cuDNN); the sort and the L1 of every projected channel are ``fastloss.pdl`` (p = 1, mean over
positions): the fused sort whose backward keeps an int32 permutation and an int8 sign per element
instead of torch.sort's int64 indices and a float difference. The projections run in chunks of
filters, so that only one chunk's projected maps (pred and target) exist at a time.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ops
from ..pdl import ops as pdl_ops
from ..pdl.ops import pdl
from .reference import fdl_layer_reference

_OP = "fdl"
# at most this many projected elements (B * filters * positions) per chunk and side: 16 MiB float32
CHUNK_ELEMENTS = 1 << 22


def check_map(op, layer, shape, patch_size, stride=1, image=None):
    """A ``patch_size`` x ``patch_size`` filter must fit layer ``layer``'s (H, W) feature map."""
    h, w = int(shape[-2]), int(shape[-1])
    if h < patch_size or w < patch_size:
        at = f" (images {image[0]} x {image[1]})" if image else ""
        raise ValueError(f"{op}: patch_size={patch_size} is larger than layer {layer}'s feature map, {h} x {w}{at}; "
                         "use larger images, a smaller patch_size or fewer layers")


def sliced_w1(a: Tensor, b: Tensor, filters: Tensor, stride: int = 1, backend: str = "auto") -> Tensor:
    """``mean over b of (1/K) sum_k (1/N) sum_i |sort(P_k * a)_i - sort(P_k * b)_i|``: the sliced
    Wasserstein-1 distance of the published code through ``pdl``; ``b`` (target) without autograd."""
    num = filters.shape[0]
    h = (a.shape[-2] - filters.shape[-2]) // stride + 1
    w = (a.shape[-1] - filters.shape[-1]) // stride + 1
    per = max(1, CHUNK_ELEMENTS // max(1, a.shape[0] * h * w))  # filters per chunk
    total = a.new_zeros(())
    for start in range(0, num, per):
        p = filters[start:start + per]
        pa = F.conv2d(a, p, stride=stride)  # [B, k, h, w]
        with torch.no_grad():
            pb = F.conv2d(b, p, stride=stride)
        total = total + pdl(pa, pb, p=1, backend=backend)  # mean_b sum_k mean_i |.|
    return total / num


def fdl(pred: Tensor, target: Tensor, filters: Tensor, *, stride: int = 1, phase_weight: float = 1.0,
        backend: str = "auto") -> Tensor:
    """One layer's FDL, mean over the batch: ``S(|F pred|, |F target|) + phase_weight * S(angle F pred,
    angle F target)``, ``F`` the 2-D FFT over (H, W), ``S`` the sliced W1 of ``sliced_w1`` with
    ``filters`` (K, C, k, k). ``pred``, ``target``: (B, C, H, W) features; target without autograd.
    ``backend="reference"`` is the published formula (``torch.sort`` and autograd)."""
    _ops.check_pair(_OP, pred, target, min_dim=4, what="be (B, C, H, W)")
    if pred.dim() != 4:
        raise ValueError(f"{_OP}: pred must be (B, C, H, W), got shape {tuple(pred.shape)}")
    if filters.dim() != 4 or filters.shape[1] != pred.shape[1] or filters.shape[-1] != filters.shape[-2]:
        raise ValueError(f"{_OP}: filters must be (K, {pred.shape[1]}, k, k) for features of {pred.shape[1]} "
                         f"channels, got shape {tuple(filters.shape)}")
    check_map(_OP, "of the features", pred.shape, filters.shape[-1], stride)
    name, _ = _ops.select("pdl", pdl_ops.IMPLS, backend, pred.device, pred.dtype)
    filters = filters.to(pred.dtype)
    if pdl_ops.IMPLS[name].formula:
        return fdl_layer_reference(pred, target, filters, stride, phase_weight).mean()
    fx = torch.fft.fftn(pred, dim=(-2, -1))
    with torch.no_grad():
        fy = torch.fft.fftn(target, dim=(-2, -1))
    loss = sliced_w1(fx.abs(), fy.abs(), filters, stride, name)
    if phase_weight != 0:  # the published code computes the phase term and multiplies it by 0
        loss = loss + phase_weight * sliced_w1(torch.angle(fx), torch.angle(fy), filters, stride, name)
    return loss
