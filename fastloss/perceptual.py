"""``PerceptualLoss``: the L1- or L2-perceptual loss the PDL and MDF papers compare against, on
fastloss's frozen VGG."""
import torch.nn as nn

from . import _checks, _ops
from .features import VGG, SharedPass, check_compute_dtype, float32_features


class PerceptualLoss(nn.Module):
    """The L1- or L2-perceptual loss the PDL and MDF papers compare against, on fastloss's frozen VGG:
    ``pixel_weight * mean|u - v| + weight * sum_l w_l * mean(|Phi_l(u) - Phi_l(v)|^p)`` (p = 1 or 2)
    on images in ``input_range`` ((0, 1), default, or (-1, 1), mapped to [0, 1] first); target features
    without autograd. ``pixel_weight`` defaults to 0 (the perceptual term alone; README, "One pixel term"). With ``PDLLoss`` (or any loss on the same
    VGG), ``fastloss.combine(perceptual, pdl)`` runs the backbone once for both.
    ``compute_dtype``: ``None`` (float32; bfloat16 inside a ``torch.autocast(dtype=torch.bfloat16)``
    region) or ``torch.bfloat16``: the dtype the frozen backbone runs in (channels_last on the CPU);
    the formula always runs in float32 on the features (README, "Fast steps")."""

    def __init__(self, layers=("relu4_3",), layer_weights=None, weight=0.01, pixel_weight=0.0, p=1,
                 extractor="vgg16", extractor_weights="torchvision", compute_dtype=None, input_range=(0, 1)):
        super().__init__()
        self.input_range = _checks.check_input_range("PerceptualLoss", input_range)
        self._range_check = _checks.RangeCheck("PerceptualLoss", self.input_range)
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if isinstance(p, bool) or p not in (1, 2):
            raise ValueError(f"PerceptualLoss: p must be 1 or 2, got {p!r}")
        if layer_weights is None:
            layer_weights = (1.0,) * len(layers)
        if len(layer_weights) != len(layers):
            raise ValueError(f"PerceptualLoss: layer_weights has {len(layer_weights)} entries for {len(layers)} layers")
        if extractor not in ("vgg16", "vgg19"):
            raise ValueError(f"PerceptualLoss: extractor must be 'vgg16' or 'vgg19', got {extractor!r}")
        self.vgg = VGG(extractor, layers=layers, weights=extractor_weights,
                       compute_dtype=check_compute_dtype("PerceptualLoss", compute_dtype),
                       _caller=("PerceptualLoss", "extractor_weights"))
        self.compute_dtype = compute_dtype
        self.layers, self.layer_weights = layers, tuple(float(w) for w in layer_weights)
        self.weight, self.pixel_weight, self.p = float(weight), _checks.check_pixel_weight("PerceptualLoss", pixel_weight), p

    def prepare(self, restored, clean):
        """The input checks, then both images mapped to [0, 1] (``input_range``)."""
        for name, t in (("restored", restored), ("clean", clean)):
            _checks.check_image("PerceptualLoss", name, t)
        if restored.shape != clean.shape:
            raise ValueError(f"PerceptualLoss: restored and clean shapes differ: {tuple(restored.shape)} vs "
                             f"{tuple(clean.shape)}")
        self._range_check(clean)  # the data convention; an untrained network's output strays from it
        return _checks.to_unit_range(restored, self.input_range), _checks.to_unit_range(clean, self.input_range)

    # what fastloss.combine() shares: one extractor pass for the union of the layers
    def shared_pass(self):
        return SharedPass(self.vgg, self.layers, self.input_range, self.compute_dtype)

    def terms_from_features(self, restored, clean, fu, fv):
        """The loss without its pixel term, from ``{layer: features}`` of both images."""
        return self.feature_terms(fu, fv)

    def forward(self, restored, clean):
        restored, clean = self.prepare(restored, clean)
        fu, fv = self.vgg.pair(restored, clean)
        return self.feature_terms(fu, fv, _checks.pixel_term(self.pixel_weight, restored, clean))

    def feature_terms(self, fu, fv, loss=0.0):
        """``loss + weight * sum_l w_l * mean(|fu_l - fv_l|^p)``, in float32 (features computed in
        bfloat16 are upcast first) with autocast off."""
        fu, fv = float32_features(fu), float32_features(fv)
        d = lambda a, b: (a - b).abs().mean() if self.p == 1 else (a - b).square().mean()  # noqa: E731
        with _ops.autocast_off(next(iter(fu.values())).device):
            return loss + self.weight * sum(w * d(fu[k], fv[k]) for k, w in zip(self.layers, self.layer_weights))
