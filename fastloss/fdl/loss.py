"""``FDLLoss``: FDL on the features of a frozen VGG19 (or any extractor), plus an optional pixel L1 term."""
import math
from typing import Optional, Sequence

import torch.nn as nn
from torch import Tensor

from .. import _backend, _checks, _ops
from ..features import VGG, SharedPass, _layout, extractor_module, feature_pair, float32_features
from .ops import check_map, fdl
from .reference import make_projections

DEFAULT_LAYERS = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")  # the published stage ends


def _int_at_least(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"FDLLoss: {name} must be an int >= {low}, got {value!r}")
    return value


def _non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"FDLLoss: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


class FDLLoss(nn.Module):
    """``pixel_weight * mean|u - v| + mean_b sum_l [S_l(|F Phi_l(u)|, |F Phi_l(v)|) + phase_weight *
    S_l(angle F Phi_l(u), angle F Phi_l(v))]``: the frequency distribution loss of Ni et al. (CVPR 2024).

    ``F`` is the 2-D FFT over (H, W) of the layer's features ``Phi_l`` (a frozen VGG19 on ImageNet-
    normalised images in [0, 1] by default); ``S_l`` the sliced Wasserstein-1 distance over
    ``num_proj`` fixed random filters of ``patch_size`` x ``patch_size`` (``loss.projections``, unit
    L2 norm, drawn from ``seed``; conv2d without padding, ``stride``): the mean over filters and
    positions of |sorted pred - sorted target|, computed by ``fastloss.pdl``'s fused sort
    (``backend="reference"``: the published formula with ``torch.sort``). Target features carry no
    autograd. ``pixel_weight`` (default 0: the trainer configures its pixel loss) adds the L1 term.

    ``extractor``: ``"vgg19"`` (default), ``"vgg16"`` or any ``nn.Module`` mapping images to
    ``{layer: features}``; such a module needs ``channels``, the channel count of each layer, to
    draw the filters. ``extractor_weights``: ``"torchvision"``, a state-dict path or ``None``
    (random, for speed tests), as for ``PDLLoss``. ``compute_dtype``: the backbone's dtype
    (``None`` or ``torch.bfloat16``); FFT, projections and sorts always run in float32 (float64
    features stay float64).
    """

    def __init__(self, layers: Sequence[str] = DEFAULT_LAYERS, num_proj: int = 256, patch_size: int = 5,
                 stride: int = 1, phase_weight: float = 1.0, extractor="vgg19", extractor_weights="torchvision",
                 seed: int = 0, backend: str = "auto", compute_dtype=None, input_range=(0, 1),
                 pixel_weight: float = 0.0, channels: Optional[Sequence[int]] = None):
        super().__init__()
        self.input_range = _checks.check_input_range("FDLLoss", input_range)
        self._range_check = _checks.RangeCheck("FDLLoss", self.input_range)
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if not layers:
            raise ValueError("FDLLoss: layers must name at least one layer")
        if len(set(layers)) != len(layers):
            raise ValueError(f"FDLLoss: layers has repeats: {layers}")
        self.num_proj = _int_at_least("num_proj", num_proj, 1)
        self.patch_size = _int_at_least("patch_size", patch_size, 1)
        self.stride = _int_at_least("stride", stride, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"FDLLoss: seed must be an int, got {seed!r}")
        self.phase_weight = _non_negative("phase_weight", phase_weight)
        self.pixel_weight = _checks.check_pixel_weight("FDLLoss", pixel_weight)
        _backend.requested(backend, "FDLLoss")
        self.layers, self.seed, self.backend, self.compute_dtype = layers, seed, backend, compute_dtype
        self.extractor = extractor_module("FDLLoss", extractor, layers, extractor_weights, compute_dtype)
        if isinstance(self.extractor, VGG):
            known = {name: cout for name, _, _, cout in _layout(self.extractor.arch)}
            vgg_channels = tuple(known[name] for name in layers)
            if channels is not None and tuple(channels) != vgg_channels:
                raise ValueError(f"FDLLoss: channels={tuple(channels)!r} does not match {self.extractor.arch}'s "
                                 f"layers {layers}, {vgg_channels}; leave channels=None")
            channels = vgg_channels
        elif channels is None:
            raise ValueError("FDLLoss: a custom extractor needs channels=(C_1, ...), the channel count of each of "
                             f"its layers {layers}, to draw the projection filters")
        channels = tuple(channels)
        if len(channels) != len(layers) or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                               for c in channels):
            raise ValueError(f"FDLLoss: channels must be one int >= 1 per layer ({len(layers)}), got {channels!r}")
        self.channels = channels
        for i, w in enumerate(make_projections(channels, self.num_proj, self.patch_size, seed)):
            self.register_buffer(f"projection_{i}", w)

    @property
    def projections(self):
        """The filters, one (num_proj, C, patch_size, patch_size) buffer per layer, in layer order."""
        return tuple(getattr(self, f"projection_{i}") for i in range(len(self.layers)))

    def extra_repr(self):
        return (f"layers={self.layers}, num_proj={self.num_proj}, patch_size={self.patch_size}, stride={self.stride}, "
                f"phase_weight={self.phase_weight}, pixel_weight={self.pixel_weight}, backend={self.backend!r}")

    def _builtin(self):
        return type(self.extractor).__module__ == "fastloss.features"

    def prepare(self, restored: Tensor, clean: Tensor):
        """The input checks (every layer's map must hold a patch), then both images mapped to [0, 1]."""
        for name, t in (("restored", restored), ("clean", clean)):
            _checks.check_image("FDLLoss", name, t, rgb=self._builtin())
        if restored.shape != clean.shape:
            raise ValueError(f"FDLLoss: restored and clean shapes differ: {tuple(restored.shape)} vs {tuple(clean.shape)}")
        if isinstance(self.extractor, VGG):
            h, w = restored.shape[-2:]
            for name in self.layers:  # each pool before the layer halves the map, rounding down
                pools = int(name[4:]) if name.startswith("pool") else int(name[4:].split("_")[0]) - 1
                check_map("FDLLoss", name, (h >> pools, w >> pools), self.patch_size, image=(h, w))
        self._range_check(clean)
        return _checks.to_unit_range(restored, self.input_range), _checks.to_unit_range(clean, self.input_range)

    def _layers_of(self, out):
        if isinstance(out, Tensor):
            if len(self.layers) != 1:
                raise ValueError("FDLLoss: the extractor returned one tensor but several layers were requested")
            return {self.layers[0]: out}
        missing = [name for name in self.layers if name not in out]
        if missing:
            raise ValueError(f"FDLLoss: the extractor did not return layers {missing}")
        return out

    def forward(self, restored: Tensor, clean: Tensor) -> Tensor:
        restored, clean = self.prepare(restored, clean)
        loss = _checks.pixel_term(self.pixel_weight, restored, clean)
        fu, fv = feature_pair(self.extractor, restored, clean, self.compute_dtype)
        return self.feature_terms(self._layers_of(fu), self._layers_of(fv), loss)

    # what fastloss.combine() shares: one extractor pass for the union of the layers
    def shared_pass(self):
        return SharedPass(self.extractor, self.layers, self.input_range, self.compute_dtype)

    def terms_from_features(self, restored, clean, fu, fv):
        """The loss without its pixel term, from ``{layer: features}`` of both images."""
        return self.feature_terms(fu, fv)

    def feature_terms(self, fu, fv, loss=0.0):
        """``loss + sum_l fdl(fu_l, fv_l)``, in float32 (bfloat16 features upcast) with autocast off.
        Every layer is checked before the first FFT runs."""
        fu, fv = float32_features(fu), float32_features(fv)
        for name, c in zip(self.layers, self.channels):
            if fu[name].dim() != 4 or fu[name].shape[1] != c:
                raise ValueError(f"FDLLoss: layer {name}'s features have shape {tuple(fu[name].shape)}, expected "
                                 f"(B, {c}, H, W) for its filters")
            check_map("FDLLoss", name, fu[name].shape, self.patch_size)
        with _ops.autocast_off(next(iter(fu.values())).device):
            for name, p in zip(self.layers, self.projections):
                loss = loss + fdl(fu[name], fv[name], p, stride=self.stride, phase_weight=self.phase_weight,
                                  backend=self.backend)
        return loss
