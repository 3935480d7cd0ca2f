"""D2SM in plain PyTorch: the cosine-kernel KL of the package docstring, with autograd; the
ground truth of the fused op and the queue."""
import torch
from torch import Tensor

from .. import _ops


def _normalize(f: Tensor, eps: float) -> Tensor:
    """``f / (||f||_2 + eps)`` per row; entries that come out NaN become 0.

    Computed as ``u / (||u||_2 + eps / m)`` with ``u = f / m`` and ``m`` the power of two at or
    below the row's largest magnitude: the same numbers bit for bit (scaling by a power of two is
    exact), but the squares of the norm neither overflow (rows of 1e30 in float32 would otherwise
    have an infinite norm and count as zero rows) nor underflow (tiny and denormal rows, whose
    norm would come out 0 and give infinite entries when eps = 0)."""
    with torch.no_grad():
        top = f.abs().amax(1, keepdim=True)
        m = torch.ldexp(torch.ones_like(top), torch.frexp(top).exponent - 1)
        m = torch.where((top > 0) & torch.isfinite(top), m, torch.ones_like(m))  # zero, NaN, inf rows: 1
    u = f / m
    # a true division: a Python number over a tensor is a reciprocal, infinite for a denormal m
    f_hat = u / (torch.linalg.vector_norm(u, dim=1, keepdim=True) + torch.full_like(m, eps) / m)
    return torch.where(torch.isnan(f_hat), torch.zeros_like(f_hat), f_hat)


def _kl_from_sims(sp: Tensor, st: Tensor, mode: str, eps: float, reduction: str = "mean") -> Tensor:
    """The D2SM KL of the module docstring from the cosine similarities ``sp`` (pred), ``st``;
    ``reduction="sum"`` without the 1/q (paper) or 1/q^2 (pkt)."""
    q = sp.shape[0]
    kp, kt = (sp + 1) / 2, (st + 1) / 2  # [q, q] cosine kernels, in [0, 1]
    if mode == "pkt":
        s, t = kp / kp.sum(1, keepdim=True), kt / kt.sum(1, keepdim=True)
        terms = t * torch.log((t + eps) / (s + eps))
        return terms.sum() if reduction == "sum" else terms.mean()
    off = ~torch.eye(q, dtype=torch.bool, device=sp.device)
    kp, kt = kp * off, kt * off  # the paper's sums run over j != i
    p, pt = kp / kp.sum(1, keepdim=True), kt / kt.sum(1, keepdim=True)
    # the diagonal is no term at all: with eps = 0 its 0 * log(0 / 0) would be NaN (and its
    # gradient too, hence 1 in the log there rather than a where() on the product)
    one = torch.ones_like(p)
    lg = torch.log((torch.where(off, p, one) + eps) / (torch.where(off, pt, one) + eps))
    return (p * lg).sum() if reduction == "sum" else (p * lg).sum() / q


def d2sm_reference(pred: Tensor, target: Tensor, mode: str = "paper", eps: float = 1e-6,
                   reduction: str = "mean") -> Tensor:
    """The D2SM KL in plain PyTorch with autograd (module docstring); target is a constant."""
    acc = _ops.acc_dtype(pred.dtype)
    with _ops.autocast_off(pred.device):
        x = _normalize(pred.flatten(1).to(acc), eps)
        y = _normalize(target.detach().flatten(1).to(acc), eps)
        return _kl_from_sims(x @ x.T, y @ y.T, mode, eps, reduction).to(pred.dtype)

