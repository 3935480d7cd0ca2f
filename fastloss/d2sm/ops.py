"""D2SM's fused op, its autograd, the backend table and the public ``d2sm_kl``.

The fused op takes the similarity matrices ``G = f_hat f_hat^T`` and their float64 row sums, and
does the kernel, the row normalization, the log, the KL and the gradient with respect to the
similarities in one pass (``csrc/cpu/d2sm.cpp``, ``kernels/d2sm.py``,
``csrc/cuda/d2sm_kernels.cu``); the products with the features stay matrix products.
"""
import os
import sys
import warnings
from typing import Tuple

import torch
from torch import Tensor

from .. import _ops
from .reference import _normalize, d2sm_reference

_OP = "d2sm"
MODES = ("paper", "pkt")
REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------- input checks
def _check_mode_eps(mode, eps, op):
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def _check_reduction(reduction, op):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _sum_scale(loss, q, mode, reduction):
    """``reduction="sum"`` from the mean the fused op returns: times q (paper: the 1/q over the
    anchors) or q * q (pkt: the mean over the q x q entries). ``q`` may be a 0-dim tensor (the
    queue's fill level), so that no host sync is needed."""
    if reduction == "mean":
        return loss
    if isinstance(q, Tensor):
        q = q.to(loss.dtype)
    return loss * (q * q if mode == "pkt" else q)



# The paper's own setting (§4, face super-resolution): a queue of 256 feature rows, mini-batches of
# 32; its supplement's Fig. 8 found queues above 64 rows learning much faster than smaller ones.
PAPER_QUEUE_SIZE = 256


def zero_set(mode, rows):
    """Whether a set of ``rows`` rows gives exactly 0 in ``mode``: fewer than 2 rows in either mode
    (no other row); in paper mode fewer than 3 (each row's distribution over the other rows
    (j != i) then has one entry, probability 1 for the prediction and the target alike)."""
    return rows < (3 if mode == "paper" else 2)


def few_rows_message(op, mode, rows, detail, fix, once="once"):
    """The warning for a set that ``zero_set`` finds: why the value is 0, and the paper's queue."""
    need = 3 if mode == "paper" else 2
    why = ("each row's distribution over the other rows has a single entry, probability 1 for the prediction "
           "and the target alike, so the KL vanishes" if rows >= 2 else "a row has no other row to be compared with")
    return (f"{op}: the D2SM set has {rows} row{'s' if rows != 1 else ''}{detail}, and {mode} mode over fewer than "
            f"{need} rows is 0 (up to rounding), and so is its gradient: {why}. {fix} The paper estimates the distributions "
            f"over a queue of {PAPER_QUEUE_SIZE} feature rows (mini-batches of 32 and the memorized rows of earlier "
            f"ones; queues above 64 rows learned much faster, its Fig. 8). (Shown {once}.)")


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside fastloss and
    ``torch.nn`` (the user's line), for the function that calls this."""
    skip = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
            os.path.dirname(os.path.abspath(torch.nn.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _check_features(pred, target, op, pred_name="pred", target_name="target", min_rows=1):
    _ops.check_pair(op, pred, target, (pred_name, target_name), min_dim=2,
                    what="be (rows, D, ...) with at least 2 dims")
    if pred.shape[0] < min_rows:
        raise ValueError(f"{op}: needs at least {min_rows} rows (samples), got {pred_name} of shape {tuple(pred.shape)}")


# --------------------------------------------------------------------------- backends
def _rows_combine_cpu(g, bank):
    """``g @ bank`` with few rows: one single-threaded mm per thread on a slice of D (d2sm.cpp)."""
    return _ops.cpu("d2sm_rows_combine")(g, bank) if g.shape[0] < 64 else torch.mm(g, bank)


def _normalize_cpu(f, eps):
    """``_normalize`` in C++ (``_d2sm_normalize`` below): one pass per row, no thread fork."""
    return _d2sm_normalize(f, float(eps))[0]


def _cpu_forward(sp, st, dots_p, dots_t, rows, paper, eps, q_live=None):
    return _ops.cpu("d2sm_forward")(sp, st, dots_p, dots_t, rows, paper, eps)  # q: the slices' size


# backend -> the fused pass and its hooks:
#   forward(sp, st, dots_p, dots_t, rows, paper, eps, q_live) -> (loss 0-dim, grad_rows [N, q]),
#     grad_rows[n] = dL/dG'[b, :] + dL/dG'[:, b], b = rows[n]; ``q_live`` (triton, cuda): a 0-dim
#     int64 device tensor, the set's size, read by the kernels (the set is the leading
#     q_live x q_live block of the [q, q] buffers); the cpu kernel takes the set's slices
#   rows_combine(g [N, q], bank [q, D]) -> [N, D]: the gradient of the N rows from grad_rows
#   normalize(f [R, D], eps) -> f_hat: the rows' normalization, differentiable
# (the backward is computed in the forward: nothing refers to the queue's buffers afterwards)
IMPLS = {
    "reference": _ops.Impl(formula=True, extra={"rows_combine": torch.mm, "normalize": _normalize}),  # d2sm_reference
    "cpu": _ops.Impl(_cpu_forward, extra={"rows_combine": _rows_combine_cpu, "normalize": _normalize_cpu}),
    "triton": _ops.Impl(_ops.triton("d2sm", "d2sm_forward"), extra={"rows_combine": torch.mm, "normalize": _normalize}),
    "cuda": _ops.Impl(_ops.cuda("d2sm_forward", stream_at=7),
                      extra={"rows_combine": torch.mm, "normalize": _normalize}),
}


def _fused(backend, sp, st, dots_p, dots_t, rows, paper, eps, q_live=None):
    return tuple(IMPLS[backend].forward(sp, st, dots_p, dots_t, rows, paper, eps, q_live))


@torch.library.custom_op("fastloss::d2sm_forward", mutates_args=())
def _d2sm_forward(x: Tensor, bank: Tensor, sp: Tensor, st: Tensor, dots_p: Tensor, dots_t: Tensor, rows: Tensor,
                  mode: str, eps: float, backend: str) -> Tuple[Tensor, Tensor]:
    """The D2SM KL over the set whose normalized rows are ``bank`` [q, D], and dL/dx.

    ``sp``, ``st`` [q, q]: the pred and target similarities ``bank bank^T`` (symmetric);
    ``dots_p``, ``dots_t`` [q] float64: their row sums; ``rows`` [N] int64: where the rows of ``x``
    [N, D] sit in ``bank`` (their values are already there; ``x`` is the input that carries their
    gradient). Returns (loss 0-dim, grad_x [N, D]); the gradient is computed here, in the forward,
    so that nothing refers to ``bank`` afterwards (a queue overwrites it in place).
    """
    loss, grad_rows = _fused(backend, sp, st, dots_p, dots_t, rows, mode == "paper", eps)
    return loss, IMPLS[backend].rows_combine(grad_rows, bank)


@_d2sm_forward.register_fake
def _(x, bank, sp, st, dots_p, dots_t, rows, mode, eps, backend):
    return sp.new_empty(()), bank.new_empty((rows.shape[0], bank.shape[1]))


_DOUBLE_BACKWARD = ("d2sm: double backward (create_graph=True) is not supported: the fused op computes "
                    "the gradient in its forward and is not itself differentiable")


def _setup_context(ctx, inputs, output):
    x = inputs[0]
    _, grad_x = output
    ctx.save_for_backward(grad_x)
    ctx.n_inputs = len(inputs)
    ctx.x_shape = tuple(x.shape)
    ctx.dtype = x.dtype
    ctx.mark_non_differentiable(grad_x)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the non-differentiable output


def _backward(ctx, grad_loss, _):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    if grad_loss is None:  # grads are not materialized: the loss got none (gradcheck checks this)
        return (None,) * ctx.n_inputs
    (grad_x,) = ctx.saved_tensors
    if tuple(grad_x.shape) != ctx.x_shape:
        raise RuntimeError(f"d2sm: the forward computed the gradient of {grad_x.shape[0]} rows but x has "
                           f"shape {ctx.x_shape}: pass rows for every row of x when x needs gradient")
    return ((grad_loss * grad_x).to(ctx.dtype),) + (None,) * (ctx.n_inputs - 1)


_d2sm_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastloss::d2sm_normalize", mutates_args=())
def _d2sm_normalize(f: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """``_normalize`` on the CPU in C++: (f_hat [R, D], norms [R] float64). One pass per row and
    no thread fork for a queue call's few rows: a dozen small ATen ops (and their backward) each
    fork threads, which costs milliseconds apiece when another process holds a core."""
    return tuple(_ops.cpu("d2sm_normalize")(f, eps))


@_d2sm_normalize.register_fake
def _(f, eps):
    return f.new_empty(f.shape), f.new_empty((f.shape[0],), dtype=torch.float64)


@torch.library.custom_op("fastloss::d2sm_normalize_backward", mutates_args=())
def _d2sm_normalize_backward(grad: Tensor, f: Tensor, norms: Tensor, eps: float) -> Tensor:
    """The gradient of ``f`` through ``_d2sm_normalize``, as autograd differentiates ``_normalize``."""
    return _ops.cpu("d2sm_normalize_backward")(grad, f, norms, eps)


@_d2sm_normalize_backward.register_fake
def _(grad, f, norms, eps):
    return f.new_empty(f.shape)


def _normalize_setup_context(ctx, inputs, output):
    f, eps = inputs
    ctx.save_for_backward(f, output[1])
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the non-differentiable output


def _normalize_backward(ctx, grad, _):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    if grad is None:  # grads are not materialized: f_hat got none
        return None, None
    f, norms = ctx.saved_tensors
    return _d2sm_normalize_backward(grad, f, norms, ctx.eps), None


_d2sm_normalize.register_autograd(_normalize_backward, setup_context=_normalize_setup_context)


def _normalize_rows(f: Tensor, eps: float, backend: str) -> Tensor:
    """``_normalize`` of [R, D] rows on ``backend`` (the C++ op on cpu, torch ops elsewhere)."""
    return IMPLS[backend].normalize(f, eps)


# --------------------------------------------------------------------------- public op
def d2sm_kl(pred: Tensor, target: Tensor, *, mode: str = "paper", eps: float = 1e-6, backend: str = "auto",
            reduction: str = "mean") -> Tensor:
    """The D2SM KL of ``pred`` against ``target`` (module docstring): a 0-dim tensor.

    ``pred`` and ``target`` are (q, D, ...) of one shape, q >= 2 rows (trailing dims are
    flattened); only ``pred`` gets gradient. ``mode``: ``"paper"`` (diagonal excluded, mean over
    the q anchors) or ``"pkt"`` (the published code: diagonal included, mean over q*q entries).
    ``reduction="sum"`` drops that mean: in paper mode with ``eps=0`` it is Eq. 2 as written,
    ``sum_i sum_{j != i} g'_{j|i} log(g'_{j|i} / g_{j|i})``.
    float16 / bfloat16 are computed in float32 and the result has the input dtype. ``backend``:
    ``auto`` (default), ``reference``, ``cpu``, ``triton`` or ``cuda``; see ``fastloss.backends()``.

    Two rows in paper mode give exactly 0 (each row's distribution over the other one is 1 on both
    sides): that warns once per call site (a ``UserWarning`` through Python's default filter).
    """
    loss = _kl(pred, target, mode, eps, backend, reduction)
    if mode == "paper" and zero_set(mode, pred.shape[0]) and not torch.compiler.is_compiling():
        warnings.warn(few_rows_message("d2sm_kl", mode, pred.shape[0], "", (
            "Pass at least 3 rows (the more, the better the estimate), gather earlier batches' rows with "
            "fastloss.D2SMQueue, or use mode='pkt' (the published code's formula, not 0 over 2 rows)."),
            once="once per call site"),
            UserWarning, stacklevel=user_stacklevel())
    return loss


def _kl(pred, target, mode, eps, backend, reduction):
    """``d2sm_kl`` without its warning (``D2SMLoss`` warns once per instance instead)."""
    _check_features(pred, target, _OP, min_rows=2)
    _check_mode_eps(mode, eps, _OP)
    _check_reduction(reduction, _OP)
    name, _ = _ops.select(_OP, IMPLS, backend, pred.device, pred.dtype)
    if IMPLS[name].formula:  # the reference row: the formula itself, with autograd
        return d2sm_reference(pred, target, mode, eps, reduction)
    with _ops.autocast_off(pred.device):
        return _sum_scale(_d2sm_kl_fused(pred, target, mode, eps, name), pred.shape[0], mode, reduction)


def _d2sm_kl_fused(pred: Tensor, target: Tensor, mode: str, eps: float, name: str) -> Tensor:
    acc = _ops.acc_dtype(pred.dtype)
    x = _normalize_rows(pred.flatten(1).to(acc), eps, name)  # [q, D], carries the gradient
    with torch.no_grad():
        y = _normalize_rows(target.detach().flatten(1).to(acc), eps, name)
        xd = x.detach()
        sp, st = xd @ xd.T, y @ y.T  # [q, q] cosine similarities
        # [q] float64 row sums of the matrices themselves, not f_hat_i . sum_k f_hat_k: the fused op
        # divides the entries by them, and float32 entries that do not add up to their row sum put
        # that rounding on every probability of the row (paper mode subtracts the diagonal: with
        # few rows the sum of the rest can be 1e-3 and the error 1e-5 on a KL that is exactly 0)
        dots_p, dots_t = sp.sum(1, dtype=torch.float64), st.sum(1, dtype=torch.float64)
    q = x.shape[0]
    need_grad = torch.is_grad_enabled() and x.requires_grad
    rows = torch.arange(q if need_grad else 0, device=x.device)
    loss = _d2sm_forward(x, xd, sp, st, dots_p, dots_t, rows, mode, float(eps), name)[0]
    return loss.to(pred.dtype)

