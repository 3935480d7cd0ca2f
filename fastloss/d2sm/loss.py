"""``D2SMLoss``: the D2SM KL on the features of a frozen extractor, one queue per layer."""
import math
import warnings

import torch
import torch.nn as nn
from torch import Tensor

from .. import _checks
from .. import _ops
from ..features import SharedPass, extractor_module, feature_pair, float32_features
from .ops import _check_reduction, _kl, few_rows_message, user_stacklevel, zero_set
from .queue import D2SMQueue, _dist_world

PATCH_SCOPES = ("batch", "image")


class D2SMLoss(nn.Module):
    """``weight * sum_l w_l * D2SMQueue_l(Phi_l(restored), Phi_l(clean))`` on (B, 3, H, W) images in [0, 1].

    ``Phi``: a frozen VGG (ImageNet-normalized inputs) up to ``layer`` (default: VGG19 conv5_4,
    before its ReLU, as the published code; any VGG layer name), the whole map flattened to one
    row per sample, or any ``nn.Module`` mapping images to features (a tensor, or a dict holding
    the layers). ``layers=(...)`` with ``layer_weights`` sums several layers, one queue each
    (``queues``; ``queue`` is the first). The clean features are computed without autograd.
    With ``internal_patches=True`` each image is cut into ``patch_size`` windows at
    ``patch_stride`` (as ``Tensor.unfold``: windows that would cross the border are not taken)
    and the patches are the samples: ``patch_scope="batch"`` pools the patches of the batch into
    the queue; ``patch_scope="image"`` takes each image's patches as their own set (the KL of
    ``d2sm_kl`` over them, no queue) and averages over the images (paper §3.3; see docs/d2sm.md).
    ``reduction``: as ``d2sm_kl``. ``extractor_weights``: a path, ``"torchvision"`` (the torch hub
    cache, downloaded there on first use unless ``FASTLOSS_OFFLINE=1``) or ``None`` (random init).
    ``reset()`` empties the queues; ``state_dict()`` carries them. A set of fewer than 3 rows in paper
    mode (the first call with a batch of 2; 2 patches per image with ``patch_scope="image"``) gives
    exactly 0: that warns once per module.
    ``compute_dtype``: ``None`` (float32; bfloat16 inside a ``torch.autocast(dtype=torch.bfloat16)``
    region) or ``torch.bfloat16``: the dtype the frozen backbone runs in (channels_last on the CPU);
    the KL always runs in float32 on the features. D2SM's KL compares near-equal distributions and
    moves by percents in bfloat16 (README, "Fast steps"): keep ``None`` where the value matters.
    ``pixel_weight`` (default 0, the KL alone) adds ``pixel_weight * mean|restored - clean|`` on the
    [0, 1] images, the convention of every fastloss loss (README, "One pixel term").
    """

    def __init__(self, extractor="vgg19", layer: str = "conv5_4", queue_size: int = 256, mode: str = "paper",
                 internal_patches: bool = False, patch_size: int = 224, patch_stride: int = 56, weight: float = 1.0,
                 extractor_weights="torchvision", eps: float = 1e-6, backend: str = "auto", reduction: str = "mean",
                 layers=None, layer_weights=None, patch_scope: str = "batch", input_range=(0, 1),
                 compute_dtype=None, pixel_weight: float = 0.0):
        super().__init__()
        self.pixel_weight = _checks.check_pixel_weight("D2SMLoss", pixel_weight)
        self.input_range = _checks.check_input_range("D2SMLoss", input_range)
        self._range_check = _checks.RangeCheck("D2SMLoss", self.input_range)
        for name, v in (("patch_size", patch_size), ("patch_stride", patch_stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"D2SMLoss: {name} must be an int >= 1, got {v!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"D2SMLoss: weight must be a finite number, got {weight!r}")
        layers = self._check_layers(layer, layers, layer_weights)
        if layer_weights is None:
            layer_weights = (1.0,) * len(layers)
        if patch_scope not in PATCH_SCOPES:
            raise ValueError(f"D2SMLoss: patch_scope must be one of {PATCH_SCOPES}, got {patch_scope!r}")
        if patch_scope == "image" and not internal_patches:
            raise ValueError("D2SMLoss: patch_scope='image' takes the patches of each image as a set: it needs "
                             "internal_patches=True")
        _check_reduction(reduction, "D2SMLoss")
        self.layers, self.layer_weights = layers, tuple(float(w) for w in layer_weights)
        self.layer, self.internal_patches, self.patch_scope = layers[0], bool(internal_patches), patch_scope
        self.patch_size, self.patch_stride, self.weight = patch_size, patch_stride, float(weight)
        self.reduction = reduction
        self.extractor = extractor_module("D2SMLoss", extractor, layers, extractor_weights, compute_dtype)
        self.compute_dtype = compute_dtype
        # the first layer's queue keeps its name (state dicts of one-layer losses are unchanged)
        self.queue = D2SMQueue(queue_size, mode, eps, backend, reduction)
        self.more_queues = nn.ModuleList(D2SMQueue(queue_size, mode, eps, backend, reduction) for _ in layers[1:])
        # a set that gives exactly 0 warns once per loss: through its first queue (every queue sees
        # the same rows), or here for patch_scope="image"
        self.queue._few_rows_owner = "D2SMLoss"
        for q in self.more_queues:
            q._few_rows_owner = None
        self._few_rows_warned = False

    @staticmethod
    def _check_layers(layer, layers, layer_weights):
        if layers is None:
            if not isinstance(layer, str):
                raise ValueError(f"D2SMLoss: layer must be a layer name, got {layer!r}")
            layers = (layer,)
        else:
            if layer != "conv5_4":
                raise ValueError(f"D2SMLoss: pass layer={layer!r} or layers={layers!r}, not both")
            layers = (layers,) if isinstance(layers, str) else tuple(layers)
            if not layers or not all(isinstance(n, str) for n in layers):
                raise ValueError(f"D2SMLoss: layers must be a non-empty sequence of layer names, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"D2SMLoss: layers has repeats: {layers!r}")
        if layer_weights is not None:
            if len(layer_weights) != len(layers):
                raise ValueError(f"D2SMLoss: layer_weights has {len(layer_weights)} entries for {len(layers)} layers")
            for w in layer_weights:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                    raise ValueError(f"D2SMLoss: layer_weights must be finite numbers, got {w!r}")
        return layers

    @property
    def queues(self):
        """One queue per layer, in the order of ``layers``."""
        return [self.queue, *self.more_queues]

    def reset(self):
        """Empty the queues."""
        for q in self.queues:
            q.reset()

    def patches(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B * nH * nW, C, patch_size, patch_size), windows in row-major order."""
        ps, st = self.patch_size, self.patch_stride
        if x.shape[-2] < ps or x.shape[-1] < ps:
            raise ValueError(f"D2SMLoss: images of {tuple(x.shape[-2:])} are smaller than patch_size={ps}")
        p = x.unfold(2, ps, st).unfold(3, ps, st)  # [B, C, nH, nW, ps, ps]
        return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], ps, ps)

    def _rows(self, out):
        """The extractor's output as {layer: [R, D]} rows, one per sample."""
        if isinstance(out, dict):
            missing = [name for name in self.layers if name not in out]
            if missing:
                which = f"layer {missing[0]!r}" if len(missing) == 1 else f"layers {missing}"
                raise ValueError(f"D2SMLoss: the extractor did not return {which} (got {list(out)})")
            return {name: out[name].flatten(1) for name in self.layers}
        if len(self.layers) != 1:
            raise ValueError(f"D2SMLoss: the extractor returned one tensor but layers={self.layers} asks for "
                             f"{len(self.layers)}")
        return {self.layer: out.flatten(1)}

    def _check_set_size(self, b, per_image, image_hw):
        """The rows one call puts in the queue must fit: say which queue_size the setting needs."""
        world = _dist_world()[0]
        rows = b * per_image * world
        if self.patch_scope == "image" or rows <= self.queue.queue_size:
            return
        ranks = f" x {world} ranks" if world > 1 else ""
        if self.internal_patches:
            what = (f"{b} images x {per_image} patches{ranks} = {rows} rows (patch_size={self.patch_size}, "
                    f"patch_stride={self.patch_stride} on {image_hw[0]} x {image_hw[1]} images)")
            alt = ", or patch_scope='image' (sets of one image's patches)"
        else:
            what, alt = f"{b} rows{ranks}", ""
        raise ValueError(f"D2SMLoss: queue_size={self.queue.queue_size} is smaller than the batch ({what}): this "
                         f"setting needs queue_size >= {rows}{alt}")

    def prepare(self, restored: Tensor, clean: Tensor):
        """The input checks, then both images mapped to [0, 1] (``input_range``)."""
        builtin = type(self.extractor).__module__ == "fastloss.features"
        for name, t in (("restored", restored), ("clean", clean)):
            _checks.check_image("D2SMLoss", name, t, rgb=builtin)
        _ops.check_pair("D2SMLoss", restored, clean, ("restored", "clean"))
        self._range_check(clean)  # the data convention; an untrained network's output strays from it
        return _checks.to_unit_range(restored, self.input_range), _checks.to_unit_range(clean, self.input_range)

    # what fastloss.combine() shares: one extractor pass for the union of the layers (not over
    # internal patches, which are other images)
    def shared_pass(self):
        if self.internal_patches:
            return None
        return SharedPass(self.extractor, self.layers, self.input_range, self.compute_dtype)

    def terms_from_features(self, restored, clean, fu, fv):
        """The loss from ``{layer: features}`` of both images (no internal patches)."""
        b = restored.shape[0]
        self._check_set_size(b, 1, tuple(restored.shape[-2:]))
        return self.feature_terms(self._rows(fu), self._rows(fv), b)

    def forward(self, restored: Tensor, clean: Tensor) -> Tensor:
        restored, clean = self.prepare(restored, clean)
        b, hw = restored.shape[0], tuple(restored.shape[-2:])
        pixel = _checks.pixel_term(self.pixel_weight, restored, clean)
        if self.internal_patches:
            restored, clean = self.patches(restored), self.patches(clean)
        per_image = restored.shape[0] // b
        if self.patch_scope == "image" and per_image < 2:
            raise ValueError(f"D2SMLoss: patch_scope='image' needs at least 2 patches per image, got {per_image} "
                             f"(patch_size={self.patch_size}, patch_stride={self.patch_stride} on {hw[0]} x {hw[1]} "
                             f"images)")
        self._check_set_size(b, per_image, hw)
        fu, fv = feature_pair(self.extractor, restored, clean, self.compute_dtype)
        loss = self.feature_terms(self._rows(fu), self._rows(fv), b, per_image)
        return pixel + loss if self.pixel_weight else loss

    def feature_terms(self, fu, fv, b, per_image=1):
        """``weight * sum_l w_l * KL_l`` from the rows {layer: [b * per_image, D]}: each layer's queue
        (or, with ``patch_scope="image"``, each image's set); in float32 (rows computed in bfloat16
        are upcast first) with autocast off."""
        fu, fv = float32_features(fu), float32_features(fv)
        loss = 0.0
        with _ops.autocast_off(next(iter(fu.values())).device):
            for name, w, queue in zip(self.layers, self.layer_weights, self.queues):
                if self.patch_scope == "image":  # one set per image, averaged over the batch
                    self._warn_image_sets(queue.mode, per_image)
                    u, v = fu[name].unflatten(0, (b, per_image)), fv[name].unflatten(0, (b, per_image))
                    term = sum(_kl(u[i], v[i], queue.mode, queue.eps, queue.backend, self.reduction)
                               for i in range(b)) / b
                else:
                    term = queue(fu[name], fv[name])
                loss = loss + w * term
        return self.weight * loss

    def _warn_image_sets(self, mode, per_image):
        """patch_scope="image": each image's patches are a set; warn once if such a set is exactly 0."""
        if self._few_rows_warned or not zero_set(mode, per_image) or torch.compiler.is_compiling():
            return
        self._few_rows_warned = True
        warnings.warn(few_rows_message("D2SMLoss", mode, per_image, " (patch_scope='image': one image's patches, "
                                       f"patch_size={self.patch_size}, patch_stride={self.patch_stride})",
                                       "Take more patches per image (a smaller patch_stride or patch_size, or larger "
                                       "images), or patch_scope='batch' to pool them in the queue.",
                                       once="once per D2SMLoss module"),
                      UserWarning, stacklevel=user_stacklevel())
