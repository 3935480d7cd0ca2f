"""``MDFLoss``: the MDF loss on images, through the reference formula or the fast path."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import _backend, _checks, _ops
from .ops import IMPLS, build_params, fold, mdf_forward
from .reference import _cast, _check_ascending, _check_formula, _check_images, _reference_loss, select
from .weights import load

_OP = "mdf"


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
    kink noise, see tests/mdf/test_mdf_bf16.py). On the ``cpu`` backend the float32 work between the
    bfloat16 convolutions is one C++ pass per layer, and per LeakyReLU in the backward
    (csrc/cpu/mdf.cpp), and the convolutions run on weights reordered for oneDNN once. The
    ``reference`` backend given a compute dtype runs under ``torch.autocast`` in it.

    ``input_range``: ``(0, 1)`` (default; the discriminators were trained on images in [0, 1]) or
    ``(-1, 1)``, for images in [-1, 1], which are mapped to [0, 1] by ``(x + 1) / 2`` first (the
    gradient flows through the map).

    ``pixel_weight`` (default 0, the MDF term alone) adds ``pixel_weight * mean|pred - target|`` on the
    [0, 1] images, the convention of every fastloss loss (README, "One pixel term").
    """

    def __init__(self, weights="denoise", scales: int = 8, ascending: bool = True, backend: str = "auto",
                 grouped: Optional[bool] = None, formula: str = "published",
                 compute_dtype: Optional[torch.dtype] = None, input_range=(0, 1), pixel_weight: float = 0.0):
        super().__init__()
        self.pixel_weight = _checks.check_pixel_weight("MDFLoss", pixel_weight)
        self.input_range = _checks.check_input_range("MDFLoss", input_range)
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
        self._range_check = _checks.RangeCheck("MDFLoss", self.input_range)

    def extra_repr(self):
        return (f"scales={self.scales}, ascending={self.ascending}, widths={self.widths}, backend={self.backend!r}, "
                f"formula={self.formula!r}, compute_dtype={self.compute_dtype}, input_range={self.input_range}, "
                f"pixel_weight={self.pixel_weight}, "
                f"source={self.weights.source!r}")

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
        pred, target = _checks.to_unit_range(pred, self.input_range), _checks.to_unit_range(target, self.input_range)
        loss = self._loss(pred, target)
        return _checks.pixel_term(self.pixel_weight, pred, target) + loss if self.pixel_weight else loss

    def _loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The loss on checked images in [0, 1]."""
        name, dtype = _ops.select(_OP, IMPLS, self.backend, pred.device, pred.dtype)
        if dtype != pred.dtype:
            # auto on the CPU: the cpu backend's kernels take float32 / float64, so float16 / bfloat16
            # images run there in float32 (not in the reference in their own dtype); the loss comes
            # back in their dtype, and so do the gradients (through the casts)
            return self._loss(pred.to(dtype), target.to(dtype)).to(pred.dtype)
        if IMPLS[name].formula:
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
