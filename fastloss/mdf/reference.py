"""MDF in plain PyTorch: the published order of operations (conv -> BatchNorm -> LeakyReLU per
discriminator, pred then target), the ground truth of the fast path; the input checks and the
choice of discriminators that every path shares."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _ops
from .weights import LAYERS, load

MIN_SIZE = 11  # head -2, three blocks -6, tail -2: the tail map is (H - 10) x (W - 10)


# --------------------------------------------------------------------------- input checks
def _check_images(pred, target, op="MDFLoss"):
    for name, t in (("pred", pred), ("target", target)):
        _checks.check_image(op, name, t)
        if t.shape[2] < MIN_SIZE or t.shape[3] < MIN_SIZE:
            raise ValueError(f"{op}: {name} is {t.shape[2]} x {t.shape[3]}, smaller than the {MIN_SIZE} x {MIN_SIZE} "
                             "the discriminators need (five unpadded 3x3 convolutions)")
        if t.shape[0] == 0:
            raise ValueError(f"{op}: {name} is an empty batch, shape {tuple(t.shape)}")
    _ops.check_pair(op, pred, target)



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


def _check_ascending(ascending, op):
    if isinstance(ascending, str) or ascending not in (True, False):
        raise ValueError(f"{op}: ascending must be True or False, got {ascending!r}")
    return bool(ascending)
