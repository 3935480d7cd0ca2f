"""PDL's custom ops, their fake kernels and autograd, the backend table and the public ``pdl``.

The backward keeps the sort permutation fixed: the forward saves the int32 permutation of every
pred row and one int8 sign (p=1) or one float (p=2) per element, and the backward is one O(N)
scatter of ``p |d|^(p-1) sign(d) / N`` (``d`` = sorted pred - sorted target) to the original
positions. The kernels: ``csrc/cpu/pdl.cpp`` (cpu), ``kernels/pdl.py`` (triton),
``csrc/cuda/pdl_kernels.cu`` (cuda).
"""
from typing import Tuple

import torch
from torch import Tensor

from .. import _ops
from ..features import upcast
from .reference import NORMALIZATIONS, REDUCTIONS, convention, pdl_reference, reduce

_OP = "pdl"


def _relayout_after(backward):
    """A backward whose kernel writes contiguous [B, C, N] rows, returning them channels-inner
    (one copy) when asked: see ``channels_inner``."""
    def call(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype, inner):
        grads = backward(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype)
        return tuple(g.transpose(1, 2).contiguous().transpose(1, 2) if inner and g is not None else g for g in grads)
    call.__name__ = call.__qualname__ = getattr(backward, "__name__", "backward")
    return call


# backend -> (forward, backward): the fused sort + distance, and the permutation scatter
#   forward(pred [B,C,N], target, p, target_grad) -> (w [B,C], perm [B,C,N] int32, perm_t, deriv)
#   backward(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype, channels_inner)
#       -> (grad_pred, grad_target), laid out as channels_inner says
# The cpu kernel writes the channels-inner layout itself; triton and cuda relayout after.
IMPLS = {
    "reference": _ops.Impl(formula=True),  # pdl_reference: torch.sort and autograd
    "cpu": _ops.Impl(_ops.cpu("pdl_forward"), _ops.cpu("pdl_backward")),
    "triton": _ops.Impl(_ops.triton("pdl", "pdl_forward"), _relayout_after(_ops.triton("pdl", "pdl_backward"))),
    "cuda": _ops.Impl(_ops.cuda("pdl_forward"), _relayout_after(_ops.cuda("pdl_backward"))),
}


def channels_inner(x: Tensor) -> bool:
    """Whether [B, C, N] ``x`` is a channels_last feature map's ``flatten(2)`` (strides C*N, 1, C,
    C > 1 and N > 1): its gradient is then written in that layout, so that it meets the
    backbone's channels_last gradients (their sum, the ReLU mask, the convolution's backward)
    without a relayout in every op (measured: 7% of a bfloat16 PDL training step on the CPU)."""
    B, C, N = x.shape
    return C > 1 and N > 1 and x.stride(1) == 1 and x.stride(2) == C and x.stride(0) == C * N


# --------------------------------------------------------------------------- input checks
def check_inputs(pred, target, p, reduction, op=_OP):
    _ops.check_pair(op, pred, target, min_dim=3, what="have at least 3 dims (B, C, *spatial)")
    n = pred[0, 0].numel()
    if n >= 2**31:
        raise ValueError(f"{op}: the spatial size N={n} must be below 2**31 (int32 permutations)")
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"{op}: p must be 1 or 2, got {p!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_convention(root, normalization, op=_OP):
    if not isinstance(root, bool):
        raise TypeError(f"{op}: root must be True or False, got {root!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{op}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastloss::pdl_forward", mutates_args=())
def _pdl_forward(pred: Tensor, target: Tensor, p: int, target_grad: bool, backend: str
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """pred, target [B, C, N] -> w [B, C], perm [B, C, N] int32, perm_t, deriv (see pdl.cpp)."""
    return tuple(IMPLS[backend].forward(pred, target, p, target_grad))


@_pdl_forward.register_fake
def _(pred, target, p, target_grad, backend):
    B, C, N = pred.shape
    acc = _ops.acc_dtype(pred.dtype)
    return (pred.new_empty((B, C), dtype=acc),
            pred.new_empty((B, C, N), dtype=torch.int32),
            pred.new_empty((B if target_grad else 0, C, N), dtype=torch.int32),
            pred.new_empty((B, C, N), dtype=torch.int8 if p == 1 else acc))


@torch.library.custom_op("fastloss::pdl_backward", mutates_args=())
def _pdl_backward(grad_w: Tensor, perm: Tensor, perm_t: Tensor, deriv: Tensor, need_pred: bool,
                  need_target: bool, out_dtype: torch.dtype, channels_inner: bool, backend: str
                  ) -> Tuple[Tensor, Tensor]:
    """Scatter g * deriv / N through the saved permutations; an empty tensor where not needed.
    ``channels_inner``: the gradients have strides (C*N, 1, C), else they are contiguous."""
    gp, gt = IMPLS[backend].backward(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype,
                                     channels_inner)
    empty = perm.new_empty((0,), dtype=out_dtype)
    return (gp if need_pred else empty), (gt if need_target else empty)


@_pdl_backward.register_fake
def _(grad_w, perm, perm_t, deriv, need_pred, need_target, out_dtype, channels_inner, backend):
    B, C, N = perm.shape
    strides = (C * N, 1, C) if channels_inner else (C * N, N, 1)
    return (perm.new_empty_strided((B, C, N), strides, dtype=out_dtype) if need_pred else perm.new_empty((0,), dtype=out_dtype),
            perm.new_empty_strided((B, C, N), strides, dtype=out_dtype) if need_target else perm.new_empty((0,), dtype=out_dtype))


_DOUBLE_BACKWARD = ("pdl: double backward (create_graph=True) is not supported: the "
                    "permutation-cached backward treats the sort as fixed and is not itself differentiable")


def _setup_context(ctx, inputs, output):
    pred, target, p, target_grad, backend = inputs
    _, perm, perm_t, deriv = output
    ctx.save_for_backward(perm, perm_t, deriv)
    ctx.backend = backend
    ctx.dtype = pred.dtype
    ctx.channels_inner = channels_inner(pred)
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
    gp, gt = _pdl_backward(grad_w, perm, perm_t, deriv, need_pred, need_target, ctx.dtype, ctx.channels_inner,
                           ctx.backend)
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
    return _pdl(pred, target, p, reduction, backend, root, normalization, float32_out=False)


def pdl_float32(pred: Tensor, target: Tensor, *, p: int = 1, reduction: str = "mean", backend: str = "auto",
                root: bool = False, normalization: str = "mean") -> Tensor:
    """``pdl(pred.float(), target.float(), ...)`` for float16 / bfloat16 features (a loss formula
    in float32 on a bfloat16 backbone's features), without the upcast copies where a fused op
    runs: its kernels copy the rows to float32 themselves (exactly), accumulate in float32, and
    write the gradient in the features' dtype, rounded as the upcast's backward rounds it. The
    same bits as the upcast (tests/pdl/test_pdl_op.py). Other dtypes: ``pdl`` as it is."""
    return _pdl(pred, target, p, reduction, backend, root, normalization, float32_out=True)


def _pdl(pred, target, p, reduction, backend, root, normalization, float32_out):
    check_inputs(pred, target, p, reduction)
    check_convention(root, normalization)
    name, _ = _ops.select(_OP, IMPLS, backend, pred.device, pred.dtype)
    if IMPLS[name].formula:  # the reference row: the formula itself, with autograd
        if float32_out:
            pred, target = upcast(pred), upcast(target)
        return pdl_reference(pred, target, p, reduction, root, normalization)
    target_grad = target.requires_grad and torch.is_grad_enabled()
    # flatten(2) is a view for contiguous and channels_last inputs; the kernels take any strides.
    w = _pdl_forward(pred.flatten(2), target.flatten(2), p, target_grad, name)[0]
    w = convention(w, pred[0, 0].numel(), p, root, normalization)  # [B, C], elementwise
    out = reduce(w.sum(1), reduction)  # float32 (float64 for float64 input)
    return out if float32_out else out.to(pred.dtype)
