"""The random projections of the PDL paper's Table 7, applied to the channels of the features."""
from typing import Optional

import torch
from torch import Tensor

PROJECTIONS = ("id", "rsp", "r2p", "rpp")


def projection_matrix(kind: str, channels: int, num: Optional[int] = None, seed: int = 0,
                      perturbation: float = 0.1) -> Optional[Tensor]:
    """The (num, channels) projection of the paper's Table 7, fixed by ``seed``; None for ``id``.

    ``rsp``: random unit directions on the sphere. ``r2p``: each row mixes two distinct random
    channels with random unit-norm weights. ``rpp``: identity plus ``perturbation`` * Gaussian
    noise, rows renormalised; ``num = m * channels`` stacks m such perturbed identities (the
    paper's RPP-2x is m = 2). ``num`` defaults to ``channels``.
    """
    if kind not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")
    if kind == "id":
        return None
    num = channels if num is None else int(num)
    if num < 1:
        raise ValueError(f"num_projections must be >= 1, got {num}")
    g = torch.Generator().manual_seed(seed)
    if kind == "rsp":
        m = torch.randn(num, channels, generator=g, dtype=torch.float64)
    elif kind == "r2p":
        if channels < 2:
            raise ValueError(f"projection 'r2p' needs at least 2 channels, got {channels}")
        m = torch.zeros(num, channels, dtype=torch.float64)
        for k in range(num):
            i, j = torch.randperm(channels, generator=g)[:2].tolist()
            m[k, i], m[k, j] = torch.randn(2, generator=g, dtype=torch.float64).unbind()
    else:  # rpp: m perturbed identities stacked, the first one drawn as a square rpp always was
        check_rpp(num, channels)
        m = torch.cat([torch.eye(channels, dtype=torch.float64) + perturbation * torch.randn(
            channels, channels, generator=g, dtype=torch.float64) for _ in range(num // channels)])
    return (m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()


def check_rpp(num, channels, op="projection 'rpp'"):
    if num % channels != 0:
        raise ValueError(f"{op}: num_projections must be a multiple m * C of the channels C={channels} (m perturbed "
                         f"identities stacked: {channels}, {2 * channels}, {3 * channels}, ...), got {num}")


def project(features: Tensor, matrix: Optional[Tensor]) -> Tensor:
    """Apply a (K, C) projection to the channels of (B, C, *spatial) features."""
    if matrix is None:
        return features
    return torch.einsum("kc,bc...->bk...", matrix.to(features.dtype), features)
