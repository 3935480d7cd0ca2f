"""PDL, the Projected Distribution Loss (Delbracio, Talebi and Milanfar).

Per feature channel, the 1D Wasserstein distance between the spatial value distributions of
prediction and target::

    W[b, c] = (1/N) * sum_i |sort(pred[b, c])_i - sort(target[b, c])_i| ** p     (p = 1 or 2)
    loss[b] = sum_c W[b, c]                                  reduction: mean over b, sum, none

``p=2`` gives W_2 squared by default; the paper's other conventions are options applied to the
per-row W: ``root=True`` (``sum_c W[b, c]^(1/p)``, Eq. 5) and ``normalization="sum"`` (no 1/N,
Eq. 3 and Algorithm 1). The backward keeps the sort permutation fixed: the
forward saves the int32 permutation of every pred row and one int8 sign (p=1) or one float
(p=2) per element, and the backward is one O(N) scatter of ``p |d|^(p-1) sign(d) / N``
(``d`` = sorted pred - sorted target) to the original positions.

Everything PDL is lives here: the input checks, the plain-PyTorch ``reference``, the
``torch.library`` custom ops that dispatch to the ``cpu`` / ``triton`` / ``cuda`` kernels
(``csrc/cpu/pdl.cpp``, ``kernels/pdl.py``, ``csrc/cuda/pdl_kernels.cu``), their autograd,
the random projections of the paper's Table 7, and the ``PDLLoss`` module.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import _backend, _checks, _ext

_OP = "pdl"
_REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("mean", "sum")


# --------------------------------------------------------------------------- input checks
def _check_inputs(pred, target, p, reduction, op=_OP):
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if pred.dtype != target.dtype:
        raise TypeError(f"{op}: pred and target dtypes differ: {pred.dtype} vs {target.dtype}")
    if pred.device != target.device:
        raise ValueError(f"{op}: pred and target are on different devices: {pred.device} vs {target.device}")
    if pred.dim() < 3:
        raise ValueError(f"{op}: pred must have at least 3 dims (B, C, *spatial), got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{op}: pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"{op}: pred is empty, shape {tuple(pred.shape)}")
    n = pred[0, 0].numel()
    if n >= 2**31:
        raise ValueError(f"{op}: the spatial size N={n} must be below 2**31 (int32 permutations)")
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"{op}: p must be 1 or 2, got {p!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_convention(root, normalization, op=_OP):
    if not isinstance(root, bool):
        raise TypeError(f"{op}: root must be True or False, got {root!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{op}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


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


def _convention(w, n, p, root, normalization):
    """Per-row ``w[b, c] = (1/N) sum_i |d_i|^p`` (W_p^p, Eq. 2) in the convention asked for:
    ``normalization="sum"`` drops the 1/N (Eq. 3's sum), ``root=True`` takes the p-th root
    (W_p of Eq. 5; with "sum", Algorithm 1's ``||phi'_j(u) - phi'_j(v)||_p``)."""
    if normalization == "sum":
        w = w * n
    if root and p != 1:
        w = _SafeRoot.apply(w, p)
    return w


def _reduce(per_sample, reduction):
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


# --------------------------------------------------------------------------- reference
def pdl_reference(pred: Tensor, target: Tensor, p: int = 1, reduction: str = "mean", root: bool = False,
                  normalization: str = "mean") -> Tensor:
    """The ``torch.sort`` formula with autograd: ``sum_c mean_i |sort(x)_i - sort(y)_i|^p``
    (``root``, ``normalization``: see ``pdl``)."""
    x, y = pred.flatten(2), target.flatten(2)
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    d = torch.sort(x, dim=-1, stable=True).values - torch.sort(y, dim=-1, stable=True).values
    w = (d.abs() if p == 1 else d.square()).mean(-1)  # [B, C]
    w = _convention(w, x.shape[-1], p, root, normalization)
    return _reduce(w.sum(1), reduction).to(pred.dtype)


# --------------------------------------------------------------------------- backends
def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def _forward_impl(backend, pred, target, p, target_grad):
    if backend == "cpu":
        return tuple(_ext.load("_C")[0].pdl_forward(pred, target, p, target_grad))
    if backend == "cuda":
        return tuple(_ext.load("_C_cuda")[0].pdl_forward(pred, target, p, target_grad, _stream(pred)))
    if backend == "triton":
        from .kernels import pdl as triton_pdl

        with _backend.triton_launch_guard():
            return tuple(triton_pdl.pdl_forward(pred, target, p, target_grad))
    raise ValueError(f"{_OP}: backend {backend!r} has no fused forward")


def _backward_impl(backend, grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype):
    if backend == "cpu":
        return _ext.load("_C")[0].pdl_backward(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype)
    if backend == "cuda":
        return _ext.load("_C_cuda")[0].pdl_backward(
            grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype, _stream(perm))
    if backend == "triton":
        from .kernels import pdl as triton_pdl

        with _backend.triton_launch_guard():
            return triton_pdl.pdl_backward(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype)
    raise ValueError(f"{_OP}: backend {backend!r} has no fused backward")


@torch.library.custom_op("fastloss::pdl_forward", mutates_args=())
def _pdl_forward(pred: Tensor, target: Tensor, p: int, target_grad: bool, backend: str
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """pred, target [B, C, N] -> w [B, C], perm [B, C, N] int32, perm_t, deriv (see pdl.cpp)."""
    return _forward_impl(backend, pred, target, p, target_grad)


@_pdl_forward.register_fake
def _(pred, target, p, target_grad, backend):
    B, C, N = pred.shape
    acc = _acc_dtype(pred.dtype)
    return (pred.new_empty((B, C), dtype=acc),
            pred.new_empty((B, C, N), dtype=torch.int32),
            pred.new_empty((B if target_grad else 0, C, N), dtype=torch.int32),
            pred.new_empty((B, C, N), dtype=torch.int8 if p == 1 else acc))


@torch.library.custom_op("fastloss::pdl_backward", mutates_args=())
def _pdl_backward(grad_w: Tensor, perm: Tensor, perm_t: Tensor, deriv: Tensor, need_pred: bool,
                  need_target: bool, out_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor]:
    """Scatter g * deriv / N through the saved permutations; an empty tensor where not needed."""
    gp, gt = _backward_impl(backend, grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype)
    empty = perm.new_empty((0,), dtype=out_dtype)
    return (gp if need_pred else empty), (gt if need_target else empty)


@_pdl_backward.register_fake
def _(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype, backend):
    shape = tuple(perm.shape)
    return (perm.new_empty(shape if need_pred else (0,), dtype=out_dtype),
            perm.new_empty(shape if need_target else (0,), dtype=out_dtype))


_DOUBLE_BACKWARD = ("pdl: double backward (create_graph=True) is not supported: the "
                    "permutation-cached backward treats the sort as fixed and is not itself differentiable")


def _setup_context(ctx, inputs, output):
    pred, target, p, target_grad, backend = inputs
    _, perm, perm_t, deriv = output
    ctx.save_for_backward(perm, perm_t, deriv)
    ctx.backend = backend
    ctx.dtype = pred.dtype
    ctx.mark_non_differentiable(perm, perm_t, deriv)
    # Without this, autograd hands the backward a zero-filled gradient for each of perm, perm_t
    # and deriv (5 bytes per element): more than the gradient of pred itself.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_w, *_):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    if grad_w is None:  # the loss did not reach the output that was differentiated
        return None, None, None, None, None
    perm, perm_t, deriv = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gp, gt = _pdl_backward(grad_w, perm, perm_t, deriv, need_pred, need_target, ctx.dtype, ctx.backend)
    return (gp if need_pred else None), (gt if need_target else None), None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD)


_pdl_forward.register_autograd(_backward, setup_context=_setup_context)
_pdl_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------- public op
def pdl(pred: Tensor, target: Tensor, *, p: int = 1, reduction: str = "mean", backend: str = "auto",
        root: bool = False, normalization: str = "mean") -> Tensor:
    """Projected distribution loss: ``sum_c (1/N) sum_i |sort(pred[b,c])_i - sort(target[b,c])_i|^p``.

    ``pred`` and ``target`` are (B, C, *spatial) of one shape; ``reduction`` is ``mean`` over B
    (default), ``sum`` or ``none`` (shape (B,)). ``normalization="sum"`` drops the 1/N (the
    paper's Eq. 3); ``root=True`` takes the p-th root per channel, ``sum_c W_p`` (Eq. 5; with
    "sum", Algorithm 1's ``sum_c ||sort(pred) - sort(target)||_p``); the default is W_p^p of
    Eq. 2. float16 / bfloat16 accumulate in float32 and the result has the input dtype.
    ``backend``: ``auto`` (default), ``reference``, ``cpu``, ``triton`` or ``cuda``; see
    ``fastloss.backends()``.
    """
    _check_inputs(pred, target, p, reduction)
    _check_convention(root, normalization)
    name = _backend.resolve(_OP, backend, pred.device, pred.dtype)
    if name == "reference":
        return pdl_reference(pred, target, p, reduction, root, normalization)
    target_grad = target.requires_grad and torch.is_grad_enabled()
    # flatten(2) is a view for contiguous and channels_last inputs; the kernels take any strides.
    w = _pdl_forward(pred.flatten(2), target.flatten(2), p, target_grad, name)[0]
    w = _convention(w, pred[0, 0].numel(), p, root, normalization)  # [B, C], elementwise
    return _reduce(w.sum(1), reduction).to(pred.dtype)


# --------------------------------------------------------------------------- projections
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
        _check_rpp(num, channels)
        m = torch.cat([torch.eye(channels, dtype=torch.float64) + perturbation * torch.randn(
            channels, channels, generator=g, dtype=torch.float64) for _ in range(num // channels)])
    return (m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()


def _check_rpp(num, channels, op="projection 'rpp'"):
    if num % channels != 0:
        raise ValueError(f"{op}: num_projections must be a multiple m * C of the channels C={channels} (m perturbed "
                         f"identities stacked: {channels}, {2 * channels}, {3 * channels}, ...), got {num}")


def project(features: Tensor, matrix: Optional[Tensor]) -> Tensor:
    """Apply a (K, C) projection to the channels of (B, C, *spatial) features."""
    if matrix is None:
        return features
    return torch.einsum("kc,bc...->bk...", matrix.to(features.dtype), features)


# --------------------------------------------------------------------------- the module
class PDLLoss(nn.Module):
    """``pixel_weight * mean|u - v| + weight * sum_l w_l * pdl(P_l Phi_l(u), P_l Phi_l(v))``.

    ``root`` and ``normalization`` are passed to ``pdl`` (the paper's conventions; see README).

    ``u`` (restored) and ``v`` (clean) are (B, 3, H, W) images in [0, 1]; ``Phi_l`` are layers of
    a frozen VGG (ImageNet-normalised inputs), ``P_l`` the fixed projections. Target features are
    computed without autograd. ``extractor_weights``: a path to a torchvision-format state dict,
    ``"torchvision"`` (torchvision's cached ImageNet weights, never downloaded), or ``None``
    (random init, for speed tests only). ``extractor`` may also be any ``nn.Module`` mapping
    images to a dict ``{layer: features}`` (or a single tensor, for one layer).
    """

    def __init__(self, layers: Sequence[str] = ("relu4_3",), layer_weights: Optional[Sequence[float]] = None,
                 weight: float = 0.01, pixel_weight: float = 1.0, projection: str = "id", p: int = 1,
                 extractor="vgg16", extractor_weights="torchvision", num_projections: Optional[int] = None,
                 seed: int = 0, backend: str = "auto", root: bool = False, normalization: str = "mean",
                 input_range=(0, 1)):
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
        _check_convention(root, normalization, "PDLLoss")
        if num_projections is not None and (isinstance(num_projections, bool) or not isinstance(num_projections, int)
                                            or num_projections < 1):
            raise ValueError(f"PDLLoss: num_projections must be None or an int >= 1, got {num_projections!r}")
        if projection == "rpp" and num_projections is not None and extractor in ("vgg16", "vgg19"):
            from .features import _layout

            channels = {name: cout for name, _, _, cout in _layout(extractor)}
            for name in layers:
                if name in channels:  # an unknown name is the extractor's error, below
                    _check_rpp(num_projections, channels[name], f"PDLLoss: projection 'rpp' on {name}")
        self.root, self.normalization = root, normalization
        self.layers = layers
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.weight, self.pixel_weight = float(weight), float(pixel_weight)
        self.projection, self.num_projections, self.seed, self.p = projection, num_projections, seed, p
        self.backend = backend
        if isinstance(extractor, nn.Module):
            self.extractor = extractor
        elif extractor in ("vgg16", "vgg19"):
            from .features import VGG

            self.extractor = VGG(extractor, layers=layers, weights=extractor_weights)
        else:
            raise ValueError(f"PDLLoss: extractor must be 'vgg16', 'vgg19' or an nn.Module, got {extractor!r}")
        self._matrices = {}

    def _features(self, x):
        out = self.extractor(x)
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

    def forward(self, restored: Tensor, clean: Tensor) -> Tensor:
        builtin = type(self.extractor).__module__ == "fastloss.features"
        for name, t in (("restored", restored), ("clean", clean)):
            _checks.check_image("PDLLoss", name, t, rgb=builtin)
        if restored.shape != clean.shape:
            raise ValueError(f"PDLLoss: restored and clean shapes differ: {tuple(restored.shape)} vs {tuple(clean.shape)}")
        self._range_check(clean)  # the data convention; an untrained network's output strays from it
        restored, clean = _checks.to_unit_range(restored, self.input_range), _checks.to_unit_range(clean, self.input_range)
        loss = self.pixel_weight * (restored - clean).abs().mean()
        if self.weight == 0:
            return loss
        fu = self._features(restored)
        with torch.no_grad():
            fv = self._features(clean)
        for i, (name, w) in enumerate(zip(self.layers, self.layer_weights)):
            m = self._matrix(i, fu[name].shape[1], fu[name].device)
            loss = loss + self.weight * w * pdl(project(fu[name], m), project(fv[name], m), p=self.p,
                                                 backend=self.backend, root=self.root,
                                                 normalization=self.normalization)
        return loss
