"""``D2SMQueue``: the D2SM KL over the current batch plus a FIFO of past rows (the paper's
memorized historic sampling), with a q x q similarity cache updated in place, its running row
sums, and the all-gather of every rank's rows under ``torch.distributed``."""
import warnings
from typing import Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import _backend, _ops
from .ops import IMPLS as _KL_IMPLS
from .ops import few_rows_message, user_stacklevel, zero_set
from .ops import _backward, _check_features, _check_mode_eps, _check_reduction, _fused, _normalize_rows, \
    _setup_context, _sum_scale
from .reference import _kl_from_sims

_OP = "d2sm"


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


# --------------------------------------------------------------------------- the queue's backends
# Where the fill level lives decides the rows: on triton and cuda it stays on the device (the
# kernels read the set's size q from ``filled``; no host sync, CUDA graphs capture a step); on
# the CPU it is read on the host and the q x q slices are taken.
def _insert_device(new_p, new_t, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t, filled, ptr):
    size, n = bank_p.shape[0], new_p.shape[0]
    slots = (ptr + torch.arange(n, device=bank_p.device)) % size
    q_new = torch.clamp(filled + n, max=size)
    for new, bank, sim, rowsum in ((new_p, bank_p, sim_p, rowsum_p), (new_t, bank_t, sim_t, rowsum_t)):
        _insert_side_device(new, bank, sim, rowsum, slots, q_new)
    filled.copy_(q_new)
    ptr.copy_((ptr + n) % size)
    return slots


def _host_insert(write):
    """An insertion with the fill level and pointer read on the host; ``write(..., slots, q)``
    writes both sides."""
    def insert(new_p, new_t, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t, filled, ptr):
        size, n = bank_p.shape[0], new_p.shape[0]
        start, q = int(ptr), min(int(filled) + n, size)
        slots = (start + torch.arange(n, device=bank_p.device)) % size
        write(new_p, new_t, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t, slots, q)
        filled.fill_(q)
        ptr.fill_((start + n) % size)
        return slots
    return insert


def _write_torch(new_p, new_t, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t, slots, q):
    for new, bank, sim, rowsum in ((new_p, bank_p, sim_p, rowsum_p), (new_t, bank_t, sim_t, rowsum_t)):
        _insert_side(new, bank, sim, rowsum, slots, q)


def _write_cpu(new_p, new_t, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t, slots, q):
    """Both sides at once in C++, one single-threaded mm per thread."""
    _ops.cpu("d2sm_queue_insert")(new_p, new_t, slots, q, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t)


def _loss_device(x, bank, sim_p, sim_t, rowsum_p, rowsum_t, filled, rows, mode, eps, backend):
    loss, grad_rows = _fused(backend, sim_p, sim_t, rowsum_p, rowsum_t, rows, mode == "paper", eps, filled)
    return loss, _KL_IMPLS[backend].rows_combine(grad_rows, bank)


def _loss_host(x, bank, sim_p, sim_t, rowsum_p, rowsum_t, filled, rows, mode, eps, backend):
    q = int(filled)
    if q < 2:
        return sim_p.new_zeros(()), bank.new_zeros((rows.shape[0], bank.shape[1]))
    loss, grad_rows = _fused(backend, sim_p[:q, :q], sim_t[:q, :q], rowsum_p[:q], rowsum_t[:q], rows,
                             mode == "paper", eps)
    return loss, _KL_IMPLS[backend].rows_combine(grad_rows, bank[:q])


# backend -> insert(new rows of both sides, buffers, filled, ptr) -> slots, and forward: the fused
# KL over the cached set (the reference row is the formula: D2SMQueue differentiates the plain
# KL over the cache instead, ``_reference_loss``)
QUEUE_IMPLS = {
    "reference": _ops.Impl(formula=True, extra={"insert": _host_insert(_write_torch)}),
    "cpu": _ops.Impl(_loss_host, extra={"insert": _host_insert(_write_cpu)}),
    "triton": _ops.Impl(_loss_device, extra={"insert": _insert_device}),
    "cuda": _ops.Impl(_loss_device, extra={"insert": _insert_device}),
}


@torch.library.custom_op("fastloss::d2sm_queue_insert", mutates_args=(
    "bank_p", "bank_t", "sim_p", "sim_t", "rowsum_p", "rowsum_t", "filled", "ptr"))
def _d2sm_queue_insert(new_p: Tensor, new_t: Tensor, bank_p: Tensor, bank_t: Tensor, sim_p: Tensor, sim_t: Tensor,
                       rowsum_p: Tensor, rowsum_t: Tensor, filled: Tensor, ptr: Tensor, backend: str) -> Tensor:
    """Write the new rows [N, D] of both sides into the N ring slots from ``ptr`` on, update the
    caches [S, S] and their running row sums [S] (float64) in place over the set [0, q),
    q = min(filled + N, S), then ``filled`` = q and ``ptr`` += N (mod S); returns the slots [N]
    int64. Nothing is written when the insertion raises."""
    return QUEUE_IMPLS[backend].insert(new_p, new_t, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t, filled, ptr)


@_d2sm_queue_insert.register_fake
def _(new_p, new_t, bank_p, bank_t, sim_p, sim_t, rowsum_p, rowsum_t, filled, ptr, backend):
    return torch.empty((new_p.shape[0],), dtype=torch.int64, device=bank_p.device)


@torch.library.custom_op("fastloss::d2sm_queue_forward", mutates_args=())
def _d2sm_queue_forward(x: Tensor, bank: Tensor, sim_p: Tensor, sim_t: Tensor, rowsum_p: Tensor, rowsum_t: Tensor,
                        filled: Tensor, rows: Tensor, mode: str, eps: float, backend: str) -> Tuple[Tensor, Tensor]:
    """``_d2sm_forward`` over the queue's set [0, q), q = ``filled``: (loss 0-dim, grad_x [N, D]).
    A set of fewer than 2 rows gives a zero loss and a zero gradient. On triton and cuda the
    kernels read q from ``filled`` and run over the whole buffers (no host sync)."""
    return QUEUE_IMPLS[backend].forward(x, bank, sim_p, sim_t, rowsum_p, rowsum_t, filled, rows, mode, eps, backend)


@_d2sm_queue_forward.register_fake
def _(x, bank, sim_p, sim_t, rowsum_p, rowsum_t, filled, rows, mode, eps, backend):
    return sim_p.new_empty(()), bank.new_empty((rows.shape[0], bank.shape[1]))


_d2sm_queue_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- distributed
def _dist_world():
    """(world size, rank) of the default process group, or (1, 0) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _check_batch_sizes(p: Tensor, op: str):
    """Every rank passes the same batch size, or a ValueError on every rank: one small all-gather,
    read on the host (a synchronisation), so the queue runs it only when its batch shape changes."""
    dist = torch.distributed
    size = torch.tensor([p.shape[0]], dtype=torch.int64, device=p.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"{op}: under torch.distributed every rank must pass the same batch size, got {sizes}")


def _all_gather_rows(p: Tensor, t: Tensor, op: str) -> Tuple[Tensor, Tensor]:
    """Every rank's [B, D] rows of p and t, concatenated in rank order: ([W*B, D], [W*B, D]); one
    collective, no host read (the ranks' batch sizes are checked by ``_check_batch_sizes``)."""
    dist = torch.distributed
    world = dist.get_world_size()
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
    with B = 1) returns a zero loss that still has a graph. So does a set of 2 rows in paper mode
    (each row's distribution over the other one is 1 on both sides): a set that gives exactly 0
    warns once per queue, decided from the rows this module has counted in Python (the batch
    sizes, up to 3), never by reading the fill level from the device.

    The queues hold normalized rows. ``pred_sim`` / ``target_sim`` cache the queue_size x
    queue_size similarities and ``pred_rowsum`` / ``target_rowsum`` each row's sum of them
    (float64 sums of the cached entries themselves, ``sum_k G_ik``, the row normalizers, kept as
    running sums, and each new row's summed afresh): a call
    computes only its B new rows against the set, writes them into the cache in place, updates
    the running sums by the entries that changed (O(B q)), and runs the fused op over the cached
    matrices. All of these are buffers (``state_dict`` carries them; the fill level travels as
    extra state), so training resumes exactly. ``reset()`` empties the queue.

    Under ``torch.distributed`` each call all-gathers the batch rows of every rank (in rank
    order, every rank the same B: checked, with a host read, on the first call and whenever B
    changes, which every rank must then do at the same call) so that every rank holds the same
    queue and computes the same loss, that of one process over the concatenated batch; the gradient reaches only the local
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
        # the rows in the queue as far as Python knows them, counted up to 3 (the fewest for which
        # no mode is exactly 0) and then left alone: the few-rows warning reads it, never _filled
        self._rows_known = 0
        self._few_rows_owner, self._few_rows_warned = "D2SMQueue", False  # D2SMLoss renames or silences
        self._sizes_checked = None  # (world size, batch size) whose batch sizes all ranks were seen to share

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
        self._rows_known = 0

    def get_extra_state(self):
        return {"filled": self.filled, "ptr": self.ptr, "queue_size": self.queue_size}

    def set_extra_state(self, state):
        if state["queue_size"] != self.queue_size:
            raise ValueError(f"D2SMQueue: the state has queue_size={state['queue_size']}, this queue has "
                             f"queue_size={self.queue_size}")
        self._filled.fill_(int(state["filled"]))
        self._ptr.fill_(int(state["ptr"]))
        self._rows_known = min(int(state["filled"]), 3)

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
            dtype = _ops.acc_dtype(pred_feats.dtype)
        name, _ = _ops.select(_OP, QUEUE_IMPLS, self.backend, x_in.device, dtype)
        fused = not QUEUE_IMPLS[name].formula

        if world > 1:
            # Every rank computes the same loss L over all ranks' rows and back-propagates into its
            # own rows only; DDP then averages the W ranks' gradients. Rank r's rows get W dL/dx_r,
            # as the backward of a differentiable all-gather would give (the sum over the W ranks'
            # copies of L), so that the average is dL/dtheta of one process over the whole batch.
            x_in = _ScaleGrad.apply(x_in, float(world))
        elif n == 1 and fused:
            # the first call's set of one row: a zero loss whose gradient is exactly 0, not 0 times
            # the normalization's derivative (NaN at a zero row when eps = 0); the same values
            x_in = torch.where(self._filled > 0, x_in, x_in.detach())
        with _ops.autocast_off(x_in.device):
            x = _normalize_rows(x_in.to(dtype), self.eps, name)  # [B, D], carries the gradient
            with torch.no_grad():
                y = _normalize_rows(target_feats.detach().flatten(1).to(dtype), self.eps, name)
                new_p, new_t = x.detach(), y
                if world > 1:
                    # the ranks' batch sizes, checked on the first call and when the batch shape
                    # changes (all ranks change it together: DistributedSampler pads the last
                    # batch), not every step: that check is a host read and a collective
                    if self._sizes_checked != (world, b):
                        _check_batch_sizes(new_p, op)
                        self._sizes_checked = (world, b)
                    new_p, new_t = _all_gather_rows(new_p, new_t, op)  # [W*B, D], rank order
                if self.pred_queue is None:
                    self._allocate(d, dtype, x.device)
                # [W*B] ring slots; fill level and pointer updated in place
                slots = _d2sm_queue_insert(new_p, new_t, self.pred_queue, self.target_queue, self.pred_sim,
                                           self.target_sim, self.pred_rowsum, self.target_rowsum, self._filled,
                                           self._ptr, name)
            if not torch.compiler.is_compiling() and self._rows_known < 3:
                self._count_rows(n)
            local = slots[rank * b:(rank + 1) * b]  # where this rank's rows sit
            if not fused:  # the reference: plain PyTorch over the set's q rows (a Python int)
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

    def _count_rows(self, n):
        """After an insertion of ``n`` rows: the set's size from Python's count (no device read),
        and the warning, once, when that set gives exactly 0."""
        before = self._rows_known
        q = min(before + n, self.queue_size)
        self._rows_known = min(q, 3)
        if self._few_rows_owner is None or self._few_rows_warned or not zero_set(self.mode, q):
            return
        self._few_rows_warned = True
        if zero_set(self.mode, self.queue_size):
            fix = f"queue_size={self.queue_size} keeps every set this small: use a larger queue_size."
        else:
            fix = (f"The queue fills with the next calls (queue_size={self.queue_size}) and the value stops being "
                   f"0 once it holds {3 if self.mode == 'paper' else 2} rows; a batch of that many avoids the zero "
                   "steps.")
        warnings.warn(few_rows_message(self._few_rows_owner, self.mode, q,
                                       f" on this call ({n} new, {before} from earlier calls)", fix,
                                       once=f"once per {self._few_rows_owner} module"),
                      UserWarning, stacklevel=user_stacklevel())

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

