"""D2SM, Deep Semantic Statistics Matching (Mei, Patel and Huang): a cosine-kernel KL over a
set of feature rows, and a queue of past features (memorized historic sampling).

For the (q, D) features of the prediction and of the target (one row per sample), each row is
normalized, ``f_hat = f / (||f||_2 + eps)`` (entries that come out NaN become 0), and the
cosine kernel is ``K = (f_hat f_hat^T + 1) / 2``, in [0, 1]; ``K'`` comes from ``pred``, ``K``
from ``target``, which is a constant. Two modes::

    pkt    S = K' / K'.sum(1),  T = K / K.sum(1)  (diagonal included)
           loss = mean over the q*q entries of T log((T + eps) / (S + eps))
    paper  p'_i(j) = K'_ij / sum_{k != i} K'_ik,  p_i(j) likewise from K  (i != j)
           loss = (1/q) sum_i sum_{j != i} p'_i(j) log((p'_i(j) + eps) / (p_i(j) + eps))

``pkt`` is the Probabilistic Knowledge Transfer formula of the published D2SM code; ``paper`` is
equations (2) to (5) of the paper. ``reduction="sum"`` drops the 1/q (paper) or the mean over the
q*q entries (pkt): with eps = 0, paper mode's sum is Eq. 2 as written. The row sums ``sum_k K_ik = (q + sum_k G_ik) / 2`` (less the
diagonal term in paper mode) are the float64 sums of the similarity entries themselves: a KL
moves by about d when a row's probabilities sum to 1 + d, so float32 row sums, or row sums that
the rounded entries do not add up to (such as ``f_hat_i . sum_k f_hat_k``), would put errors of
1e-4 relative on losses of 1e-3 (and 1e-5 on a KL that is exactly 0). ``d2sm_kl`` sums the
matrices it has just formed; ``D2SMQueue`` keeps running sums of its cache, with no q x q pass.

The fused op (``csrc/cpu/d2sm.cpp``, ``kernels/d2sm.py``, ``csrc/cuda/d2sm_kernels.cu``) takes
the similarity matrices ``G = f_hat f_hat^T`` and those row sums, and does the kernel, the row
normalization, the log, the KL and the gradient with respect to the similarities in one pass; the
products with the features stay matrix products. ``D2SMQueue`` keeps the past rows, a q x q
similarity cache updated in place and the running row sums of the cache, so that a call costs
N x q x D multiply-adds for its N new rows instead of q x q x D.

Everything D2SM is lives here: the input checks, the plain-PyTorch ``reference``, the
``torch.library`` custom op and its autograd, ``d2sm_kl``, ``D2SMQueue`` and ``D2SMLoss``.
"""
import contextlib
import math
from typing import Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import _backend, _checks, _ext

_OP = "d2sm"
MODES = ("paper", "pkt")
REDUCTIONS = ("mean", "sum")
PATCH_SCOPES = ("batch", "image")


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


def _check_features(pred, target, op, pred_name="pred", target_name="target", min_rows=1):
    for name, t in ((pred_name, pred), (target_name, target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if pred.dtype != target.dtype:
        raise TypeError(f"{op}: {pred_name} and {target_name} dtypes differ: {pred.dtype} vs {target.dtype}")
    if pred.device != target.device:
        raise ValueError(f"{op}: {pred_name} and {target_name} are on different devices: {pred.device} vs {target.device}")
    if pred.dim() < 2:
        raise ValueError(f"{op}: {pred_name} must be (rows, D, ...) with at least 2 dims, got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{op}: {pred_name} and {target_name} shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"{op}: {pred_name} is empty, shape {tuple(pred.shape)}")
    if pred.shape[0] < min_rows:
        raise ValueError(f"{op}: needs at least {min_rows} rows (samples), got {pred_name} of shape {tuple(pred.shape)}")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(device):
    """Autocast off for the loss itself: under ``torch.autocast`` the similarity products would run
    in bfloat16 / float16 (and the fused op, which takes float32 or float64, would refuse them)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- reference
def _normalize(f: Tensor, eps: float) -> Tensor:
    """``f / (||f||_2 + eps)`` per row; entries that come out NaN become 0.

    Computed as ``u / (||u||_2 + eps / m)`` with ``u = f / m`` and ``m`` the power of two at or
    below the row's largest magnitude: the same numbers bit for bit (scaling by a power of two is
    exact), but the squares of the norm neither overflow (rows of 1e30 in float32 would otherwise
    have an infinite norm and count as zero rows) nor underflow (tiny and denormal rows, whose
    norm would come out 0 and give infinite entries when eps = 0)."""
    with torch.no_grad():
        top = f.abs().amax(1, keepdim=True)
        m = torch.ldexp(torch.ones_like(top), torch.frexp(top).exponent - 1)
        m = torch.where((top > 0) & torch.isfinite(top), m, torch.ones_like(m))  # zero, NaN, inf rows: 1
    u = f / m
    # a true division: a Python number over a tensor is a reciprocal, infinite for a denormal m
    f_hat = u / (torch.linalg.vector_norm(u, dim=1, keepdim=True) + torch.full_like(m, eps) / m)
    return torch.where(torch.isnan(f_hat), torch.zeros_like(f_hat), f_hat)


def _kl_from_sims(sp: Tensor, st: Tensor, mode: str, eps: float, reduction: str = "mean") -> Tensor:
    """The D2SM KL of the module docstring from the cosine similarities ``sp`` (pred), ``st``;
    ``reduction="sum"`` without the 1/q (paper) or 1/q^2 (pkt)."""
    q = sp.shape[0]
    kp, kt = (sp + 1) / 2, (st + 1) / 2  # [q, q] cosine kernels, in [0, 1]
    if mode == "pkt":
        s, t = kp / kp.sum(1, keepdim=True), kt / kt.sum(1, keepdim=True)
        terms = t * torch.log((t + eps) / (s + eps))
        return terms.sum() if reduction == "sum" else terms.mean()
    off = ~torch.eye(q, dtype=torch.bool, device=sp.device)
    kp, kt = kp * off, kt * off  # the paper's sums run over j != i
    p, pt = kp / kp.sum(1, keepdim=True), kt / kt.sum(1, keepdim=True)
    # the diagonal is no term at all: with eps = 0 its 0 * log(0 / 0) would be NaN (and its
    # gradient too, hence 1 in the log there rather than a where() on the product)
    one = torch.ones_like(p)
    lg = torch.log((torch.where(off, p, one) + eps) / (torch.where(off, pt, one) + eps))
    return (p * lg).sum() if reduction == "sum" else (p * lg).sum() / q


def d2sm_reference(pred: Tensor, target: Tensor, mode: str = "paper", eps: float = 1e-6,
                   reduction: str = "mean") -> Tensor:
    """The D2SM KL in plain PyTorch with autograd (module docstring); target is a constant."""
    acc = _acc_dtype(pred.dtype)
    with _autocast_off(pred.device):
        x = _normalize(pred.flatten(1).to(acc), eps)
        y = _normalize(target.detach().flatten(1).to(acc), eps)
        return _kl_from_sims(x @ x.T, y @ y.T, mode, eps, reduction).to(pred.dtype)


# --------------------------------------------------------------------------- backends
def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def _fused_impl(backend, sp, st, dots_p, dots_t, rows, paper, eps, q_live=None):
    """(loss 0-dim, grad_rows [N, q]): the fused pass; grad_rows[n] = dL/dG'[b, :] + dL/dG'[:, b], b = rows[n].

    ``q_live`` (triton and cuda): a 0-dim int64 device tensor, the set's size, read by the kernels
    (the set is the leading q_live x q_live block of the [q, q] buffers)."""
    if backend == "cpu":
        return tuple(_ext.load("_C")[0].d2sm_forward(sp, st, dots_p, dots_t, rows, paper, eps))
    if backend == "cuda":
        return tuple(_ext.load("_C_cuda")[0].d2sm_forward(sp, st, dots_p, dots_t, rows, paper, eps, _stream(sp),
                                                          q_live))
    if backend == "triton":
        from .kernels import d2sm as triton_d2sm

        with _backend.triton_launch_guard():
            return tuple(triton_d2sm.d2sm_forward(sp, st, dots_p, dots_t, rows, paper, eps, q_live))
    raise ValueError(f"{_OP}: backend {backend!r} has no fused op")


def _rows_combine(backend, g, bank):
    """``g @ bank``: [N, q] x [q, D] -> [N, D], the gradient of the N rows from grad_rows.

    On the CPU with few rows, one single-threaded mm per thread on a slice of D (see d2sm.cpp)."""
    if backend == "cpu" and g.shape[0] < 64:
        return _ext.load("_C")[0].d2sm_rows_combine(g, bank)
    return torch.mm(g, bank)


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
    loss, grad_rows = _fused_impl(backend, sp, st, dots_p, dots_t, rows, mode == "paper", eps)
    return loss, _rows_combine(backend, grad_rows, bank)


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


# --------------------------------------------------------------------------- queue ops
# D2SMQueue's update and its loss as custom ops, so that torch.compile(fullgraph=True) traces a
# queue call: the fill level and the ring pointer are 0-dim int64 tensors that the ops read and
# update (no Python state changes per call, hence no recompiles), and the set's size q, which
# the q x q slices depend on, is read inside the ops: every shape the graph sees is static.
def _insert_side(new, bank, sim, rowsum, slots, q):
    bank.index_copy_(0, slots, new)
    m = new @ bank[:q].T  # [N, q] the new rows against the set
    old = sim[:q].index_select(1, slots)  # [q, N] the entries they replace
    sim[:q].index_copy_(1, slots, m.T.contiguous())
    sim[:, :q].index_copy_(0, slots, m)
    block = m.index_select(1, slots).triu()  # [N, N]: one product for both entries of a pair
    sim[slots[:, None], slots[None, :]] = block + block.triu(1).T
    rowsum[:q] += (m.T.to(torch.float64) - old.to(torch.float64)).sum(1)
    rowsum.index_copy_(0, slots, sim[:, :q].index_select(0, slots).sum(1, dtype=torch.float64))


def _insert_side_device(new, bank, sim, rowsum, slots, q):
    """``_insert_side`` with the set's size q a 0-dim device tensor: the whole [S, S] buffers are
    updated, entries outside the set masked to 0 (they are 0 already: a slot's row and column
    are first written when it joins the set), so no shape depends on q and nothing syncs."""
    inset = torch.arange(bank.shape[0], device=bank.device) < q  # [S] the set after this insertion
    bank.index_copy_(0, slots, new)
    m = torch.where(inset, new @ bank.T, 0)  # [N, S] the new rows against the set
    old = sim.index_select(1, slots)  # [S, N] the entries they replace
    sim.index_copy_(1, slots, m.T.contiguous())
    sim.index_copy_(0, slots, m)
    block = m.index_select(1, slots).triu()  # [N, N]: one product for both entries of a pair
    sim[slots[:, None], slots[None, :]] = block + block.triu(1).T
    rowsum += torch.where(inset, (m.T.to(torch.float64) - old.to(torch.float64)).sum(1), 0)
    rowsum.index_copy_(0, slots, sim.index_select(0, slots).sum(1, dtype=torch.float64))


@torch.library.custom_op("fastloss::d2sm_queue_insert", mutates_args=(
    "bank_p", "bank_t", "sim_p", "sim_t", "rowsum_p", "rowsum_t", "filled", "ptr"))
def _d2sm_queue_insert(new_p: Tensor, new_t: Tensor, bank_p: Tensor, bank_t: Tensor, sim_p: Tensor, sim_t: Tensor,
                       rowsum_p: Tensor, rowsum_t: Tensor, filled: Tensor, ptr: Tensor, backend: str) -> Tensor:
    """Write the new rows [N, D] of both sides into the N ring slots from ``ptr`` on, update the
    caches [S, S] and their running row sums [S] (float64) in place over the set [0, q),
    q = min(filled + N, S), then ``filled`` = q and ``ptr`` += N (mod S); returns the slots [N]
    int64. Nothing is written when the insertion raises."""
    size, n = bank_p.shape[0], new_p.shape[0]
    if backend in ("triton", "cuda"):  # fill level and pointer stay on the device: no host sync
        slots = (ptr + torch.arange(n, device=bank_p.device)) % size
        q_new = torch.clamp(filled + n, max=size)
        for new, bank, sim, rowsum in ((new_p, bank_p, sim_p, rowsum_p), (new_t, bank_t, sim_t, rowsum_t)):
            _insert_side_device(new, bank, sim, rowsum, slots, q_new)
        filled.copy_(q_new)
        ptr.copy_((ptr + n) % size)
        return slots
    start, q = int(ptr), min(int(filled) + n, size)
    slots = (start + torch.arange(n, device=bank_p.device)) % size
    if backend == "cpu":  # both sides at once, one single-threaded mm per thread
        _ext.load("_C")[0].d2sm_queue_insert(new_p, new_t, slots, q, bank_p, bank_t, sim_p, sim_t, rowsum_p,
                                             rowsum_t)
    else:
        for new, bank, sim, rowsum in ((new_p, bank_p, sim_p, rowsum_p), (new_t, bank_t, sim_t, rowsum_t)):
            _insert_side(new, bank, sim, rowsum, slots, q)
    filled.fill_(q)
    ptr.fill_((start + n) % size)
    return slots


@_d2sm_queue_insert.register_fake
def _(new_p, new_t, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t, filled, ptr, backend):
    return torch.empty((new_p.shape[0],), dtype=torch.int64, device=bank_p.device)


@torch.library.custom_op("fastloss::d2sm_queue_forward", mutates_args=())
def _d2sm_queue_forward(x: Tensor, bank: Tensor, sim_p: Tensor, sim_t: Tensor, rowsum_p: Tensor, rowsum_t: Tensor,
                        filled: Tensor, rows: Tensor, mode: str, eps: float, backend: str) -> Tuple[Tensor, Tensor]:
    """``_d2sm_forward`` over the queue's set [0, q), q = ``filled``: (loss 0-dim, grad_x [N, D]).
    A set of fewer than 2 rows gives a zero loss and a zero gradient. On triton and cuda the
    kernels read q from ``filled`` and run over the whole buffers (no host sync)."""
    if backend in ("triton", "cuda"):
        loss, grad_rows = _fused_impl(backend, sim_p, sim_t, rowsum_p, rowsum_t, rows, mode == "paper", eps,
                                      filled)
        return loss, _rows_combine(backend, grad_rows, bank)
    q = int(filled)
    if q < 2:
        return sim_p.new_zeros(()), bank.new_zeros((rows.shape[0], bank.shape[1]))
    loss, grad_rows = _fused_impl(backend, sim_p[:q, :q], sim_t[:q, :q], rowsum_p[:q], rowsum_t[:q], rows,
                                  mode == "paper", eps)
    return loss, _rows_combine(backend, grad_rows, bank[:q])


@_d2sm_queue_forward.register_fake
def _(x, bank, sim_p, sim_t, rowsum_p, rowsum_t, filled, rows, mode, eps, backend):
    return sim_p.new_empty(()), bank.new_empty((rows.shape[0], bank.shape[1]))


_d2sm_queue_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastloss::d2sm_normalize", mutates_args=())
def _d2sm_normalize(f: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """``_normalize`` on the CPU in C++: (f_hat [R, D], norms [R] float64). One pass per row and
    no thread fork for a queue call's few rows: a dozen small ATen ops (and their backward) each
    fork threads, which costs milliseconds apiece when another process holds a core."""
    return tuple(_ext.load("_C")[0].d2sm_normalize(f, eps))


@_d2sm_normalize.register_fake
def _(f, eps):
    return f.new_empty(f.shape), f.new_empty((f.shape[0],), dtype=torch.float64)


@torch.library.custom_op("fastloss::d2sm_normalize_backward", mutates_args=())
def _d2sm_normalize_backward(grad: Tensor, f: Tensor, norms: Tensor, eps: float) -> Tensor:
    """The gradient of ``f`` through ``_d2sm_normalize``, as autograd differentiates ``_normalize``."""
    return _ext.load("_C")[0].d2sm_normalize_backward(grad, f, norms, eps)


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
    """``_normalize`` of [R, D] rows: the C++ op on the cpu backend, torch ops elsewhere."""
    if backend == "cpu":
        return _d2sm_normalize(f, float(eps))[0]
    return _normalize(f, eps)


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
    """
    _check_features(pred, target, _OP, min_rows=2)
    _check_mode_eps(mode, eps, _OP)
    _check_reduction(reduction, _OP)
    name = _backend.resolve(_OP, backend, pred.device, pred.dtype)
    if name == "reference":
        return d2sm_reference(pred, target, mode, eps, reduction)
    with _autocast_off(pred.device):
        return _sum_scale(_d2sm_kl_fused(pred, target, mode, eps, name), pred.shape[0], mode, reduction)


def _d2sm_kl_fused(pred: Tensor, target: Tensor, mode: str, eps: float, name: str) -> Tensor:
    acc = _acc_dtype(pred.dtype)
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


# --------------------------------------------------------------------------- distributed
def _dist_world():
    """(world size, rank) of the default process group, or (1, 0) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_gather_rows(p: Tensor, t: Tensor, op: str) -> Tuple[Tensor, Tensor]:
    """Every rank's [B, D] rows of p and t, concatenated in rank order: ([W*B, D], [W*B, D])."""
    dist = torch.distributed
    world = dist.get_world_size()
    size = torch.tensor([p.shape[0]], dtype=torch.int64, device=p.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"{op}: under torch.distributed every rank must pass the same batch size, got {sizes}")
    both = torch.cat([p, t], 1).contiguous()  # [B, 2D]: one collective for both sides
    out = [torch.empty_like(both) for _ in range(world)]
    dist.all_gather(out, both)
    rows = torch.cat(out)  # [W*B, 2D]
    d = p.shape[1]
    return rows[:, :d], rows[:, d:]


class _ScaleGrad(torch.autograd.Function):
    """The identity, whose gradient is multiplied by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


# --------------------------------------------------------------------------- the queue
class D2SMQueue(nn.Module):
    """The D2SM KL over the current batch plus a FIFO of past rows, with an incremental cache.

    ``queue(pred_feats, target_feats)``, both (B, D, ...) of one shape, returns the D2SM KL
    (``mode``, ``eps``, ``reduction`` as in ``d2sm_kl``; ``"sum"`` scales by the fill level q,
    read on the device) over a set of q rows: the batch's rows, which carry the
    gradient of ``pred_feats``, and the ``queue_size - B`` most recent earlier rows, detached
    (fewer while the queue fills up, so q = min(rows seen, queue_size)). Then the batch enters
    the queue and the oldest rows leave. A call with a set of fewer than 2 rows (the first call,
    with B = 1) returns a zero loss that still has a graph.

    The queues hold normalized rows. ``pred_sim`` / ``target_sim`` cache the queue_size x
    queue_size similarities and ``pred_rowsum`` / ``target_rowsum`` each row's sum of them
    (float64; ``f_hat_i . sum_k f_hat_k``, the row normalizers, kept as running sums): a call
    computes only its B new rows against the set, writes them into the cache in place, updates
    the running sums by the entries that changed (O(B q)), and runs the fused op over the cached
    matrices. All of these are buffers (``state_dict`` carries them; the fill level travels as
    extra state), so training resumes exactly. ``reset()`` empties the queue.

    Under ``torch.distributed`` each call all-gathers the batch rows of every rank (in rank
    order, every rank the same B) so that every rank holds the same queue and computes the same
    loss, that of one process over the concatenated batch; the gradient reaches only the local
    rows, times the world size W (the backward of a differentiable all-gather), so that
    DistributedDataParallel's average over the ranks is the gradient of one process over the
    concatenated batch. ``queue_size`` must be at least the rows of one call (B, times W).
    """

    _BUFFERS = ("pred_queue", "target_queue", "pred_sim", "target_sim", "pred_rowsum", "target_rowsum")

    def __init__(self, queue_size: int = 256, mode: str = "paper", eps: float = 1e-6, backend: str = "auto",
                 reduction: str = "mean"):
        super().__init__()
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 2:
            raise ValueError(f"D2SMQueue: queue_size must be an int >= 2, got {queue_size!r}")
        _check_mode_eps(mode, eps, "D2SMQueue")
        _check_reduction(reduction, "D2SMQueue")
        self.reduction = reduction
        _backend.requested(backend, "D2SMQueue")
        self.queue_size, self.mode, self.eps, self.backend = queue_size, mode, float(eps), backend
        for name in self._BUFFERS:
            self.register_buffer(name, None)
        # rows in the queue; slot the next row goes to: 0-dim tensors that the queue ops update
        # in place, so that a compiled step neither changes Python state nor recompiles per call
        # (not persistent: the state dict carries them as ints in the extra state)
        self.register_buffer("_filled", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("_ptr", torch.zeros((), dtype=torch.int64), persistent=False)
        # follows .to(device): where a queue loaded from a state dict before any call is placed
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def filled(self) -> int:
        """Rows in the queue."""
        return int(self._filled)

    @property
    def ptr(self) -> int:
        """The ring slot the next row goes to."""
        return int(self._ptr)

    def extra_repr(self):
        return (f"queue_size={self.queue_size}, mode={self.mode!r}, eps={self.eps}, reduction={self.reduction!r}, "
                f"filled={self.filled}")

    def reset(self):
        """Empty the queues (the next call starts a new warm-up)."""
        for name in self._BUFFERS:
            setattr(self, name, None)
        self._filled.zero_()
        self._ptr.zero_()

    def get_extra_state(self):
        return {"filled": self.filled, "ptr": self.ptr, "queue_size": self.queue_size}

    def set_extra_state(self, state):
        if state["queue_size"] != self.queue_size:
            raise ValueError(f"D2SMQueue: the state has queue_size={state['queue_size']}, this queue has "
                             f"queue_size={self.queue_size}")
        self._filled.fill_(int(state["filled"]))
        self._ptr.fill_(int(state["ptr"]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        present = [prefix + name in state_dict for name in self._BUFFERS]
        if all(present):  # allocate what the state holds, then the base class copies it in
            for name in self._BUFFERS:
                src, cur = state_dict[prefix + name], getattr(self, name)
                if cur is None or cur.shape != src.shape or cur.dtype != src.dtype:
                    device = cur.device if cur is not None else self._device_anchor.device
                    setattr(self, name, torch.empty(src.shape, dtype=src.dtype, device=device))
        elif not any(present):  # saved empty
            for name in self._BUFFERS:
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _allocate(self, d, dtype, device):
        n = self.queue_size
        self.pred_queue = torch.zeros(n, d, dtype=dtype, device=device)    # [n, D] normalized rows, ring
        self.target_queue = torch.zeros(n, d, dtype=dtype, device=device)
        self.pred_sim = torch.zeros(n, n, dtype=dtype, device=device)      # [n, n] similarities by slot
        self.target_sim = torch.zeros(n, n, dtype=dtype, device=device)
        self.pred_rowsum = torch.zeros(n, dtype=torch.float64, device=device)  # [n] row sums of the cache
        self.target_rowsum = torch.zeros(n, dtype=torch.float64, device=device)

    def _restore_dtypes(self):
        """After ``module.half()`` (or ``.to(dtype)``): rows and caches in float32 at least, row
        sums in float64, recomputed from the cache (a float16 copy of them no longer matches it)."""
        for name in ("pred_queue", "target_queue", "pred_sim", "target_sim"):
            t = getattr(self, name)
            if t.dtype not in (torch.float32, torch.float64):
                setattr(self, name, t.float())
        for name, sim in (("pred_rowsum", self.pred_sim), ("target_rowsum", self.target_sim)):
            if getattr(self, name).dtype != torch.float64:
                rowsum = torch.zeros(self.queue_size, dtype=torch.float64, device=sim.device)
                filled = self.filled
                rowsum[:filled] = sim[:filled, :filled].sum(1, dtype=torch.float64)
                setattr(self, name, rowsum)

    def forward(self, pred_feats: Tensor, target_feats: Tensor) -> Tensor:
        op = "D2SMQueue"
        _check_features(pred_feats, target_feats, op, "pred_feats", "target_feats")
        x_in = pred_feats.flatten(1)
        b, d = x_in.shape
        world, rank = _dist_world()
        n = world * b
        if n > self.queue_size:
            where = f"{b} rows x {world} ranks" if world > 1 else f"{b} rows"
            raise ValueError(f"D2SMQueue: queue_size={self.queue_size} is smaller than the batch ({where})")
        if self.pred_queue is not None:
            self._restore_dtypes()
            if self.pred_queue.shape[1] != d:
                raise ValueError(f"D2SMQueue: the features have D={d} per row but the queue holds D="
                                 f"{self.pred_queue.shape[1]}; call reset() to start a new queue")
            if self.pred_queue.device != x_in.device:
                raise ValueError(f"D2SMQueue: the queue is on {self.pred_queue.device} but the features are on "
                                 f"{x_in.device}; move the module with .to(device)")
            dtype = self.pred_queue.dtype
        else:
            dtype = _acc_dtype(pred_feats.dtype)
        name = _backend.resolve(_OP, self.backend, x_in.device, dtype)

        if world > 1:
            # Every rank computes the same loss L over all ranks' rows and back-propagates into its
            # own rows only; DDP then averages the W ranks' gradients. Rank r's rows get W dL/dx_r,
            # as the backward of a differentiable all-gather would give (the sum over the W ranks'
            # copies of L), so that the average is dL/dtheta of one process over the whole batch.
            x_in = _ScaleGrad.apply(x_in, float(world))
        elif n == 1 and name != "reference":
            # the first call's set of one row: a zero loss whose gradient is exactly 0, not 0 times
            # the normalization's derivative (NaN at a zero row when eps = 0); the same values
            x_in = torch.where(self._filled > 0, x_in, x_in.detach())
        with _autocast_off(x_in.device):
            x = _normalize_rows(x_in.to(dtype), self.eps, name)  # [B, D], carries the gradient
            with torch.no_grad():
                y = _normalize_rows(target_feats.detach().flatten(1).to(dtype), self.eps, name)
                new_p, new_t = x.detach(), y
                if world > 1:
                    new_p, new_t = _all_gather_rows(new_p, new_t, op)  # [W*B, D], rank order
                if self.pred_queue is None:
                    self._allocate(d, dtype, x.device)
                # [W*B] ring slots; fill level and pointer updated in place
                slots = _d2sm_queue_insert(new_p, new_t, self.pred_queue, self.target_queue, self.pred_sim,
                                           self.target_sim, self.pred_rowsum, self.target_rowsum, self._filled,
                                           self._ptr, name)
            local = slots[rank * b:(rank + 1) * b]  # where this rank's rows sit
            if name == "reference":  # plain PyTorch over the set's q rows (a Python int)
                q = self.filled
                if q < 2:  # exactly 0, with a graph whose gradient is exactly 0 (not 0 times the
                    return x_in[:0].sum()  # normalization's derivative, NaN at a zero row when eps = 0)
                loss = self._reference_loss(x, new_p, slots, local, q, rank, b)
            else:  # the set's size is read inside the op: static shapes, no recompiles
                need_grad = torch.is_grad_enabled() and x.requires_grad
                loss = _d2sm_queue_forward(x, self.pred_queue, self.pred_sim, self.target_sim, self.pred_rowsum,
                                           self.target_rowsum, self._filled, local if need_grad else local[:0],
                                           self.mode, self.eps, name)[0]
                loss = _sum_scale(loss, self._filled, self.mode, self.reduction)  # q: no host sync
            return loss.to(pred_feats.dtype)

    def _reference_loss(self, x, new_p, slots, local, q, rank, b):
        """Plain PyTorch with autograd over the cached similarities: the new rows' entries are
        recomputed from ``x`` so that the gradient flows through them."""
        rows = torch.cat([new_p[:rank * b], x, new_p[(rank + 1) * b:]])  # [N, D], local rows carry grad
        sp_new = rows @ self.pred_queue[:q].T  # [N, q]
        block = rows @ rows.T  # [N, N]: both factors of a new-new entry carry the gradient
        sp = self.pred_sim[:q, :q].clone()
        sp = sp.index_put((slots,), sp_new)
        sp = sp.T.index_put((slots,), sp_new).T
        sp = sp.index_put((slots[:, None], slots[None, :]), block)
        return _kl_from_sims(sp, self.target_sim[:q, :q], self.mode, self.eps, self.reduction)


# --------------------------------------------------------------------------- the module
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
    ``d2sm_kl`` over them, no queue) and averages over the images (paper §3.3; see README).
    ``reduction``: as ``d2sm_kl``. ``extractor_weights``: a path, ``"torchvision"`` (the local
    torch hub cache, never downloaded) or ``None`` (random init). ``reset()`` empties the queues;
    ``state_dict()`` carries them.
    """

    def __init__(self, extractor="vgg19", layer: str = "conv5_4", queue_size: int = 256, mode: str = "paper",
                 internal_patches: bool = False, patch_size: int = 224, patch_stride: int = 56, weight: float = 1.0,
                 extractor_weights="torchvision", eps: float = 1e-6, backend: str = "auto", reduction: str = "mean",
                 layers=None, layer_weights=None, patch_scope: str = "batch", input_range=(0, 1)):
        super().__init__()
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
        if isinstance(extractor, nn.Module):
            self.extractor = extractor
        elif extractor in ("vgg16", "vgg19"):
            from .features import VGG

            self.extractor = VGG(extractor, layers=layers, weights=extractor_weights)
        else:
            raise ValueError(f"D2SMLoss: extractor must be 'vgg16', 'vgg19' or an nn.Module, got {extractor!r}")
        # the first layer's queue keeps its name (state dicts of one-layer losses are unchanged)
        self.queue = D2SMQueue(queue_size, mode, eps, backend, reduction)
        self.more_queues = nn.ModuleList(D2SMQueue(queue_size, mode, eps, backend, reduction) for _ in layers[1:])

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

    def _features(self, x):
        """[R, D] rows of the first layer, one per sample."""
        return self._layer_features(x)[self.layer]

    def _layer_features(self, x):
        """{layer: [R, D]} rows, one per sample."""
        out = self.extractor(x)
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

    def forward(self, restored: Tensor, clean: Tensor) -> Tensor:
        builtin = type(self.extractor).__module__ == "fastloss.features"
        for name, t in (("restored", restored), ("clean", clean)):
            _checks.check_image("D2SMLoss", name, t, rgb=builtin)
        if restored.shape != clean.shape:
            raise ValueError(f"D2SMLoss: restored and clean shapes differ: {tuple(restored.shape)} vs "
                             f"{tuple(clean.shape)}")
        if restored.dtype != clean.dtype:
            raise TypeError(f"D2SMLoss: restored and clean dtypes differ: {restored.dtype} vs {clean.dtype}")
        if restored.device != clean.device:
            raise ValueError(f"D2SMLoss: restored and clean are on different devices: {restored.device} vs "
                             f"{clean.device}")
        if restored.numel() == 0:
            raise ValueError(f"D2SMLoss: restored is empty, shape {tuple(restored.shape)}")
        self._range_check(clean)  # the data convention; an untrained network's output strays from it
        restored, clean = _checks.to_unit_range(restored, self.input_range), _checks.to_unit_range(clean, self.input_range)
        b, hw = restored.shape[0], tuple(restored.shape[-2:])
        if self.internal_patches:
            restored, clean = self.patches(restored), self.patches(clean)
        per_image = restored.shape[0] // b
        if self.patch_scope == "image" and per_image < 2:
            raise ValueError(f"D2SMLoss: patch_scope='image' needs at least 2 patches per image, got {per_image} "
                             f"(patch_size={self.patch_size}, patch_stride={self.patch_stride} on {hw[0]} x {hw[1]} "
                             f"images)")
        self._check_set_size(b, per_image, hw)
        fu = self._layer_features(restored)
        with torch.no_grad():
            fv = self._layer_features(clean)
        loss = 0.0
        for name, w, queue in zip(self.layers, self.layer_weights, self.queues):
            if self.patch_scope == "image":  # one set per image, averaged over the batch
                u, v = fu[name].unflatten(0, (b, per_image)), fv[name].unflatten(0, (b, per_image))
                term = sum(d2sm_kl(u[i], v[i], mode=queue.mode, eps=queue.eps, backend=queue.backend,
                                   reduction=self.reduction) for i in range(b)) / b
            else:
                term = queue(fu[name], fv[name])
            loss = loss + w * term
        return self.weight * loss
