"""FDL in plain PyTorch: the published formula (Ni et al., CVPR 2024; eezkni/FDL, FDL_pytorch/FDL.py),
the ground truth the fused path is compared against.

For one layer's features ``x`` (pred) and ``y`` (target), (B, C, H, W), and filters ``P``
(K, C, k, k), each of unit L2 norm::

    X, Y   = FFT2(x), FFT2(y)                                   over (H, W)
    S(a,b) = (1/(K N)) sum_k sum_i |sort(P_k * a)_i - sort(P_k * b)_i|   conv2d, no padding, stride
    score[b] = S(|X|, |Y|) + phase_weight * S(angle X, angle Y)

The loss sums the layers' scores and takes the mean over the batch.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def make_projections(channels, num_proj: int, patch_size: int, seed: int = 0):
    """One (num_proj, C, k, k) float32 filter bank per entry of ``channels``, in that order: standard
    normal draws from one ``torch.Generator`` seeded with ``seed`` (layer after layer), each filter
    scaled to unit L2 norm over (C, k, k), as the published code draws them."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for c in channels:
        w = torch.randn(num_proj, int(c), patch_size, patch_size, generator=g, dtype=torch.float32).double()
        out.append((w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).float())
    return out


def sliced_w1_reference(a: Tensor, b: Tensor, filters: Tensor, stride: int = 1) -> Tensor:
    """Per sample, ``mean over (projections, positions) |sort(P * a) - sort(P * b)|``, shape (B,)."""
    pa = F.conv2d(a, filters, stride=stride).flatten(2)  # [B, K, N]
    pb = F.conv2d(b, filters, stride=stride).flatten(2)
    d = torch.sort(pa, dim=-1, stable=True).values - torch.sort(pb, dim=-1, stable=True).values
    return d.abs().mean((1, 2))


def fdl_layer_reference(x: Tensor, y: Tensor, filters: Tensor, stride: int = 1, phase_weight: float = 1.0) -> Tensor:
    """One layer's FDL score per sample, shape (B,): magnitude term + ``phase_weight`` * phase term."""
    fx, fy = torch.fft.fftn(x, dim=(-2, -1)), torch.fft.fftn(y, dim=(-2, -1))
    filters = filters.to(x.dtype)
    score = sliced_w1_reference(fx.abs(), fy.abs(), filters, stride)
    return score + phase_weight * sliced_w1_reference(torch.angle(fx), torch.angle(fy), filters, stride)


def fdl_reference(pred_features, target_features, projections, stride: int = 1, phase_weight: float = 1.0) -> Tensor:
    """The FDL loss of the published code: the layers' scores summed, the mean over the batch.
    ``pred_features`` / ``target_features``: sequences of (B, C_l, H_l, W_l), ``projections`` the
    matching (K, C_l, k, k) filters."""
    score = sum(fdl_layer_reference(x, y, p, stride, phase_weight)
                for x, y, p in zip(pred_features, target_features, projections))
    return score.mean()
