"""PDL in plain PyTorch: the formula the fast backends are compared against, and the paper's
conventions applied to the per-channel distances (shared with the fused path).

    W[b, c] = (1/N) * sum_i |sort(pred[b, c])_i - sort(target[b, c])_i| ** p     (p = 1 or 2)
    loss[b] = sum_c W[b, c]                                  reduction: mean over b, sum, none
"""
import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("mean", "sum")


class _SafeRoot(torch.autograd.Function):
    """``w ** (1/p)`` of per-row ``w >= 0``, whose gradient at ``w = 0`` is 0, not NaN.

    At w = 0 every difference of the row is 0: ``(sum_i |d_i|^p)^(1/p)`` is a norm of d, whose
    subgradient there contains 0 (and PyTorch's norm backward gives 0 too). Elsewhere it is the
    exact derivative ``w^(1/p - 1) / p``. Elementwise on [B, C]: the fused scatter stays one pass."""

    @staticmethod
    def forward(ctx, w, p):
        out = w.clamp_min(0).sqrt() if p == 2 else w
        ctx.save_for_backward(out)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        if ctx.p != 2:
            return grad, None
        pos = out > 0
        return torch.where(pos, grad / (2 * torch.where(pos, out, torch.ones_like(out))), torch.zeros_like(grad)), None


def convention(w, n, p, root, normalization):
    """Per-row ``w[b, c] = (1/N) sum_i |d_i|^p`` (W_p^p, Eq. 2) in the convention asked for:
    ``normalization="sum"`` drops the 1/N (Eq. 3's sum), ``root=True`` takes the p-th root
    (W_p of Eq. 5; with "sum", Algorithm 1's ``||phi'_j(u) - phi'_j(v)||_p``)."""
    if normalization == "sum":
        w = w * n
    if root and p != 1:
        w = _SafeRoot.apply(w, p)
    return w


def reduce(per_sample, reduction):
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def pdl_reference(pred: Tensor, target: Tensor, p: int = 1, reduction: str = "mean", root: bool = False,
                  normalization: str = "mean") -> Tensor:
    """The ``torch.sort`` formula with autograd: ``sum_c mean_i |sort(x)_i - sort(y)_i|^p``
    (``root``, ``normalization``: see ``pdl``)."""
    x, y = pred.flatten(2), target.flatten(2)
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    d = torch.sort(x, dim=-1, stable=True).values - torch.sort(y, dim=-1, stable=True).values
    w = (d.abs() if p == 1 else d.square()).mean(-1)  # [B, C]
    w = convention(w, x.shape[-1], p, root, normalization)
    return reduce(w.sum(1), reduction).to(pred.dtype)
