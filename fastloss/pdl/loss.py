"""``PDLLoss``: PDL on the features of a frozen extractor (and a pixel L1 term if asked)."""
from typing import Optional, Sequence

import torch.nn as nn
from torch import Tensor

from .. import _backend, _checks
from .. import _ops
from ..features import SharedPass, extractor_module, feature_pair, upcast
from .ops import check_convention, pdl_float32
from .projections import PROJECTIONS, check_rpp, project, projection_matrix


class PDLLoss(nn.Module):
    """``pixel_weight * mean|u - v| + weight * sum_l w_l * pdl(P_l Phi_l(u), P_l Phi_l(v))``.

    ``root`` and ``normalization`` are passed to ``pdl`` (the paper's conventions; see docs/pdl.md).
    ``pixel_weight`` (default 0: the PDL term alone, the pixel loss configured beside it as trainers
    do) adds the pixel L1 of the paper's Eq. 5 inside the loss; every fastloss loss has it (README,
    "One pixel term").

    ``u`` (restored) and ``v`` (clean) are (B, 3, H, W) images in [0, 1]; ``Phi_l`` are layers of
    a frozen VGG (ImageNet-normalised inputs), ``P_l`` the fixed projections. Target features are
    computed without autograd. ``extractor_weights``: a path to a torchvision-format state dict,
    ``"torchvision"`` (torchvision's ImageNet weights from the torch hub cache, downloaded there on
    first use unless ``FASTLOSS_OFFLINE=1``; see ``fastloss.features.torchvision_weights``), or ``None``
    (random init, for speed tests only). ``extractor`` may also be any ``nn.Module`` mapping
    images to a dict ``{layer: features}`` (or a single tensor, for one layer).
    ``compute_dtype``: ``None`` (float32; bfloat16 inside a ``torch.autocast(dtype=torch.bfloat16)``
    region) or ``torch.bfloat16``: the dtype the frozen backbone runs in (channels_last on the CPU);
    the formula always runs in float32 on the features (README, "Fast steps").
    """

    def __init__(self, layers: Sequence[str] = ("relu4_3",), layer_weights: Optional[Sequence[float]] = None,
                 weight: float = 0.01, pixel_weight: float = 0.0, projection: str = "id", p: int = 1,
                 extractor="vgg16", extractor_weights="torchvision", num_projections: Optional[int] = None,
                 seed: int = 0, backend: str = "auto", root: bool = False, normalization: str = "mean",
                 input_range=(0, 1), compute_dtype=None):
        super().__init__()
        self.input_range = _checks.check_input_range("PDLLoss", input_range)
        self._range_check = _checks.RangeCheck("PDLLoss", self.input_range)
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if not layers:
            raise ValueError("PDLLoss: layers must name at least one layer")
        if layer_weights is None:
            layer_weights = (1.0,) * len(layers)
        if len(layer_weights) != len(layers):
            raise ValueError(f"PDLLoss: layer_weights has {len(layer_weights)} entries for {len(layers)} layers")
        if projection not in PROJECTIONS:
            raise ValueError(f"PDLLoss: projection must be one of {PROJECTIONS}, got {projection!r}")
        if isinstance(p, bool) or p not in (1, 2):
            raise ValueError(f"PDLLoss: p must be 1 or 2, got {p!r}")
        _backend.requested(backend, "PDLLoss")
        check_convention(root, normalization, "PDLLoss")
        if num_projections is not None and (isinstance(num_projections, bool) or not isinstance(num_projections, int)
                                            or num_projections < 1):
            raise ValueError(f"PDLLoss: num_projections must be None or an int >= 1, got {num_projections!r}")
        if projection == "rpp" and num_projections is not None and extractor in ("vgg16", "vgg19"):
            from ..features import _layout

            channels = {name: cout for name, _, _, cout in _layout(extractor)}
            for name in layers:
                if name in channels:  # an unknown name is the extractor's error, below
                    check_rpp(num_projections, channels[name], f"PDLLoss: projection 'rpp' on {name}")
        self.root, self.normalization = root, normalization
        self.layers = layers
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.weight, self.pixel_weight = float(weight), _checks.check_pixel_weight("PDLLoss", pixel_weight)
        self.projection, self.num_projections, self.seed, self.p = projection, num_projections, seed, p
        self.backend = backend
        self.extractor = extractor_module("PDLLoss", extractor, layers, extractor_weights, compute_dtype)
        self.compute_dtype = compute_dtype
        self._matrices = {}

    def _layers_of(self, out):
        """The extractor's output as {layer: features}, every requested layer present."""
        if isinstance(out, Tensor):
            if len(self.layers) != 1:
                raise ValueError("PDLLoss: the extractor returned one tensor but several layers were requested")
            return {self.layers[0]: out}
        missing = [name for name in self.layers if name not in out]
        if missing:
            raise ValueError(f"PDLLoss: the extractor did not return layers {missing}")
        return out

    def _matrix(self, index, channels, device):
        key = (index, channels, device)
        if key not in self._matrices:
            m = projection_matrix(self.projection, channels, self.num_projections, self.seed + index)
            self._matrices[key] = None if m is None else m.to(device)
        return self._matrices[key]

    def prepare(self, restored: Tensor, clean: Tensor):
        """The input checks, then both images mapped to [0, 1] (``input_range``)."""
        builtin = type(self.extractor).__module__ == "fastloss.features"
        for name, t in (("restored", restored), ("clean", clean)):
            _checks.check_image("PDLLoss", name, t, rgb=builtin)
        if restored.shape != clean.shape:
            raise ValueError(f"PDLLoss: restored and clean shapes differ: {tuple(restored.shape)} vs {tuple(clean.shape)}")
        self._range_check(clean)  # the data convention; an untrained network's output strays from it
        return _checks.to_unit_range(restored, self.input_range), _checks.to_unit_range(clean, self.input_range)

    def forward(self, restored: Tensor, clean: Tensor) -> Tensor:
        restored, clean = self.prepare(restored, clean)
        loss = _checks.pixel_term(self.pixel_weight, restored, clean)
        if self.weight == 0:
            return loss if self.pixel_weight else restored.sum() * 0.0  # keeps the graph
        fu, fv = feature_pair(self.extractor, restored, clean, self.compute_dtype)
        return self.feature_terms(self._layers_of(fu), self._layers_of(fv), loss)

    # what fastloss.combine() shares: one extractor pass for the union of the layers
    def shared_pass(self):
        return SharedPass(self.extractor, self.layers, self.input_range, self.compute_dtype)

    def terms_from_features(self, restored, clean, fu, fv):
        """The loss without its pixel term, from ``{layer: features}`` of both images."""
        return self.feature_terms(fu, fv) if self.weight != 0 else restored.new_zeros(())

    def feature_terms(self, fu, fv, loss=0.0):
        """``loss + weight * sum_l w_l * pdl(P_l fu_l, P_l fv_l)``: the formula on the features, in
        float32 with autocast off. Features computed in bfloat16 are upcast before a projection;
        without one, ``pdl_float32`` gives the fused op the bfloat16 features, which it copies to
        float32 itself (the same bits, without the upcast copies)."""
        with _ops.autocast_off(next(iter(fu.values())).device):
            for i, (name, w) in enumerate(zip(self.layers, self.layer_weights)):
                a, b = fu[name], fv[name]
                m = self._matrix(i, a.shape[1], a.device)
                if m is not None:
                    a, b = project(upcast(a), m), project(upcast(b), m)
                loss = loss + self.weight * w * pdl_float32(a, b, p=self.p, backend=self.backend, root=self.root,
                                                            normalization=self.normalization)
        return loss
