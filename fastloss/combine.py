"""``fastloss.combine(*losses)``: several criteria on one backbone pass.

Training frameworks run one frozen-backbone pass per loss: an L1-perceptual loss and PDL on the
same VGG16 pay for two forward passes of the prediction, two of the target and two backward
passes. ``combine`` runs each distinct extractor once on the prediction (with autograd) and once
on the target (without), for the union of the layers its losses need, and hands every loss its
layers. The value and the gradient are those of the sum of the separate losses (float32 rounding),
with the pixel term counted once: every fastloss loss has ``pixel_weight`` (default 0, README "One
pixel term"); losses that carry one must carry the same weight (else ``ValueError``), and the
combination adds ``pixel_weight * mean|u - v|`` once, however many carry it.

Extractors are the same when they compute the same features: two ``VGG`` of one architecture,
normalization, compute dtype and layout whose weights are equal (compared once, here), or one
module object shared by several losses; the images must also be mapped from the same
``input_range``. Losses that cannot share (``MDFLoss``, ``D2SMLoss`` over internal patches, any
module without the hooks below) run as they are, each on its own.

A loss shares by defining ``prepare(restored, clean) -> (restored, clean)`` (its input checks and
the map to [0, 1]), ``shared_pass() -> SharedPass or None``, ``terms_from_features(restored,
clean, fu, fv)`` (the loss without its pixel term) and ``pixel_weight`` (its L1 weight, 0 if none).
"""
from typing import List

import torch
import torch.nn as nn

from .features import VGG, feature_pair, same_vgg, union_vgg

_HOOKS = ("prepare", "shared_pass", "terms_from_features")


class CombinedLoss(nn.Module):
    """The sum of ``losses`` with one pass per distinct extractor; see the module docstring."""

    def __init__(self, *losses: nn.Module):
        super().__init__()
        if not losses:
            raise TypeError("fastloss.combine: needs at least one loss module, got none")
        for i, loss in enumerate(losses):
            if not isinstance(loss, nn.Module):
                raise TypeError(f"fastloss.combine: argument {i} must be a loss module (an nn.Module such as "
                                f"fastloss.PDLLoss), got {type(loss).__name__}")
        self.losses = nn.ModuleList(losses)
        # one pixel term (README, "One pixel term"): every loss carrying one carries the same weight,
        # and one of them adds it: a loss that runs on its own (its forward adds its own), else the
        # first that shares a pass (from the images its pass prepared)
        carriers = [i for i, loss in enumerate(losses) if getattr(loss, "pixel_weight", 0.0)]
        weights = sorted({float(losses[i].pixel_weight) for i in carriers})
        if len(weights) > 1:
            raise ValueError(f"fastloss.combine: the losses carry pixel terms of different weights {weights}; "
                             "a combination counts one pixel term: give it to one loss (pixel_weight=...) and "
                             "set pixel_weight=0 on the others")
        self.pixel_weight = weights[0] if weights else 0.0
        self._groups: List[dict] = []   # one per distinct extractor: members, union extractor
        self._alone: List[int] = []     # losses that run on their own
        for i, loss in enumerate(losses):
            sp = loss.shared_pass() if all(hasattr(loss, h) for h in _HOOKS) else None
            if sp is None:
                self._alone.append(i)
                continue
            group = next((g for g in self._groups if self._same(g, sp)), None)
            if group is None:
                group = {"pass": sp, "members": [], "extractors": [], "layers": []}
                self._groups.append(group)
            group["members"].append(i)
            group["extractors"].append(sp.extractor)
            group["layers"] += sp.layers
        alone_carriers = [i for i in carriers if i in self._alone]
        if len(alone_carriers) > 1:
            names = [type(losses[i]).__name__ for i in alone_carriers]
            raise ValueError(f"fastloss.combine: {names} each run on their own pass and add their own pixel term, "
                             "which would count it twice: set pixel_weight=0 on all but one")
        self._pixel_from = None  # the sharing loss whose pass adds the pixel term
        if carriers and not alone_carriers:
            self._pixel_from = carriers[0]
        self.extractors = nn.ModuleList()  # the union extractors (their modules are the losses' own)
        for g in self._groups:
            first, layers = g["pass"], g["layers"]
            if isinstance(first.extractor, VGG):
                g["extractor"] = union_vgg(g["extractors"], layers)
                self.extractors.append(g["extractor"])
            else:
                g["extractor"] = first.extractor

    @staticmethod
    def _same(group, sp):
        other = group["pass"]
        if (other.input_range, other.compute_dtype) != (sp.input_range, sp.compute_dtype):
            return False
        if other.extractor is sp.extractor:
            return True
        return isinstance(other.extractor, VGG) and isinstance(sp.extractor, VGG) and \
            all(same_vgg(e, sp.extractor) for e in group["extractors"])

    def extra_repr(self):
        shared = [[type(self.losses[i]).__name__ for i in g["members"]] for g in self._groups]
        alone = [type(self.losses[i]).__name__ for i in self._alone]
        return f"shared passes={shared}, alone={alone}, pixel_weight={self.pixel_weight}"

    def forward(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for g in self._groups:
            members = [self.losses[i] for i in g["members"]]
            prepared = [m.prepare(restored, clean) for m in members]  # every member's input checks
            u, v = prepared[0]
            fu, fv = feature_pair(g["extractor"], u, v, g["pass"].compute_dtype)
            if isinstance(fu, torch.Tensor):  # a module returning one tensor: one layer
                fu, fv = {g["pass"].layers[0]: fu}, {g["pass"].layers[0]: fv}
            for i, m in zip(g["members"], members):
                if i == self._pixel_from:
                    total = total + self.pixel_weight * (u - v).abs().mean()
                total = total + m.terms_from_features(u, v, fu, fv)
        for i in self._alone:
            total = total + self.losses[i](restored, clean)
        return total


def combine(*losses: nn.Module) -> CombinedLoss:
    """One module whose forward is the sum of ``losses``, each distinct frozen extractor run once on
    the prediction and once on the target, a pixel term counted once; see ``fastloss.combine``'s
    module docstring."""
    return CombinedLoss(*losses)


__all__ = ["combine", "CombinedLoss"]
