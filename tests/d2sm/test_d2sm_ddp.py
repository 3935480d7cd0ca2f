"""D2SMQueue under torch.distributed: 2 processes on gloo (CPU). Every rank all-gathers the batch
rows, holds the same queue and computes the loss of one process over the concatenated batch; the
gradient reaches only its own rows, scaled by the world size so that DistributedDataParallel's
average over the ranks is the single process's gradient (as a differentiable all-gather's
backward would give). And a training step: D2SMLoss on a model wrapped in
DistributedDataParallel gives, step after step, the loss and the parameter gradients of one
process over the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastloss
from fastloss import _backend

WORLD, B, D, QUEUE, STEPS = 2, 3, 11, 10, 5  # 6 rows a call through a queue of 10: it wraps
IMG_B, IMG_QUEUE, IMG_STEPS = 2, 6, 4  # D2SMLoss: 4 images a step through a queue of 6


def _backend_name():
    return "cpu" if _backend.status("cpu")[0] else "reference"


def _batches():
    """Every step's full batch (both ranks' rows), float64, the same in every process."""
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64).relu(),
             torch.randn(WORLD * B, D, generator=g, dtype=torch.float64).relu()) for _ in range(STEPS)]


def _images():
    """Every step's (restored-to-be, clean) images of both ranks, float64."""
    g = torch.Generator().manual_seed(11)
    return [(torch.rand(WORLD * IMG_B, 3, 10, 10, generator=g, dtype=torch.float64),
             torch.rand(WORLD * IMG_B, 3, 10, 10, generator=g, dtype=torch.float64)) for _ in range(IMG_STEPS)]


def _training_setup():
    """The same model and loss in every process: a 3 -> 3 conv to train, and D2SMLoss on a frozen
    random conv extractor (rows of 4 x 8 x 8 = 256 features)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).double()
    extractor = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double()
    crit = fastloss.D2SMLoss(extractor=extractor, queue_size=IMG_QUEUE, mode="paper", weight=3.0,
                             backend=_backend_name())
    return model, crit


def _train(model, crit, slice_of):
    """IMG_STEPS steps; each step's loss and parameter gradients (zeroed after each step)."""
    out = []
    for u, v in _images():
        loss = crit(model(slice_of(u)), slice_of(v))
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    return out


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        queue = fastloss.D2SMQueue(QUEUE, mode="pkt", backend=_backend_name())
        results = []
        for x_all, y_all in _batches():
            x = x_all[rank * B:(rank + 1) * B].clone().requires_grad_()
            loss = queue(x, y_all[rank * B:(rank + 1) * B])
            loss.backward()
            results.append((loss.detach(), x.grad))
        model, crit = _training_setup()
        training = _train(DDP(model), crit, lambda t: t[rank * IMG_B:(rank + 1) * IMG_B])
        torch.save({"results": results, "queue": queue.state_dict(), "training": training},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()  # both ranks done before either tears down (gloo aborts otherwise)
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_on_gloo_equal_one_process_over_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = fastloss.D2SMQueue(QUEUE, mode="pkt", backend=_backend_name())
    expected = []
    for x_all, y_all in _batches():
        x = x_all.clone().requires_grad_()
        loss = single(x, y_all)
        loss.backward()
        expected.append((loss.detach(), x.grad))
    model, crit = _training_setup()
    training = _train(model, crit, lambda t: t)
    assert all(loss > 1e-6 for loss, _ in training[1:])  # a loss with something to compare
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for (loss, grad), (loss1, grad1) in zip(saved["results"], expected):
            torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=0)
            # the rank's rows get W times their gradient: DDP averages W such contributions
            torch.testing.assert_close(grad, WORLD * grad1[rank * B:(rank + 1) * B], rtol=1e-10, atol=1e-18)
        for name, value in single.state_dict().items():  # every rank holds the single process's queue
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(saved["queue"][name], value, rtol=1e-12, atol=1e-15)
        assert len(saved["training"]) == IMG_STEPS
        for step, ((loss, grads), (loss1, grads1)) in enumerate(zip(saved["training"], training)):
            torch.testing.assert_close(loss, loss1, rtol=1e-10, atol=0, msg=lambda m: f"step {step} loss: {m}")
            for g, g1 in zip(grads, grads1):  # DDP's average over the ranks = the single process
                torch.testing.assert_close(g, g1, rtol=1e-8, atol=1e-14, msg=lambda m: f"step {step} grad: {m}")


def test_without_a_process_group_it_is_one_process():
    assert not dist.is_initialized()
    x, y = _batches()[0]
    out = fastloss.D2SMQueue(QUEUE, mode="pkt")(x, y)
    torch.testing.assert_close(out, fastloss.d2sm_reference(x, y, "pkt"), rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- no per-step host read
SYNC_STEPS = 4


def _host_read_worker(rank, port, out_dir, backend, per_step_check):
    """Steps after a warm-up: every dist.all_gather call and every host read (item, int, float,
    bool, tolist) made by fastloss's own code, recorded per step. ``per_step_check``: the mutant
    that checks the batch sizes on every call, as the queue used to."""
    import sys
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        queue = fastloss.D2SMQueue(QUEUE, mode="pkt", backend=backend)
        batches = _batches()
        own = str(Path(fastloss.__file__).resolve().parent)
        log = []

        def x_y(i):
            x_all, y_all = batches[i % len(batches)]
            return x_all[rank * B:(rank + 1) * B].clone().requires_grad_(), y_all[rank * B:(rank + 1) * B]

        x, y = x_y(0)
        queue(x, y).backward()  # warm-up: allocation, the first batch-size check
        real_gather = dist.all_gather

        def gather(*args, **kwargs):
            log[-1].append("dist.all_gather")
            return real_gather(*args, **kwargs)

        def guard(name, original):
            def wrapped(*args, **kwargs):
                caller = sys._getframe(1)
                if str(Path(caller.f_code.co_filename).resolve()).startswith(own):
                    log[-1].append(f"Tensor.{name} in {caller.f_code.co_name}")
                return original(*args, **kwargs)
            return wrapped

        methods = ("item", "__int__", "__float__", "__bool__", "tolist")
        saved = {m: getattr(torch.Tensor, m) for m in methods}
        dist.all_gather = gather
        for m in methods:
            setattr(torch.Tensor, m, guard(m, saved[m]))
        try:
            for i in range(1, SYNC_STEPS + 1):
                log.append([])
                if per_step_check:
                    queue._sizes_checked = None
                x, y = x_y(i)
                queue(x, y).backward()
        finally:
            dist.all_gather = real_gather
            for m in methods:
                setattr(torch.Tensor, m, saved[m])
        torch.save(log, os.path.join(out_dir, f"log{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _host_reads(tmp_path, per_step_check):
    backend = "triton" if _backend.why_not("triton", torch.device("cpu"), torch.float64) is None else None
    if backend is None:
        pytest.skip("needs a backend whose queue keeps no host state: triton on CPU tensors (TRITON_INTERPRET=1)")
    mp.spawn(_host_read_worker, args=(_free_port(), str(tmp_path), backend, per_step_check), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"log{rank}.pt") for rank in range(WORLD)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_gloo_steps_make_one_collective_and_no_host_read(tmp_path):
    """After the first call, a step under gloo all-gathers the rows once and reads nothing back
    on the host (the batch sizes were checked on the first call)."""
    for log in _host_reads(tmp_path, per_step_check=False):
        assert log == [["dist.all_gather"]] * SYNC_STEPS, log


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_mutation_a_per_step_size_check_is_caught(tmp_path):
    """The queue as it was (the batch sizes gathered and read every call) fails that check."""
    for log in _host_reads(tmp_path, per_step_check=True):
        assert log != [["dist.all_gather"]] * SYNC_STEPS
        assert all(any("item" in e for e in step) and step.count("dist.all_gather") == 2 for step in log), log


def test_batch_sizes_are_checked_again_when_the_batch_changes(monkeypatch):
    """Without a process group: the check runs on the first call of a world size and batch size
    and again when the batch size changes (a stub world of 2 ranks that agree)."""
    from fastloss.d2sm import queue as qmod

    checks = []
    monkeypatch.setattr(qmod, "_dist_world", lambda: (2, 0))
    monkeypatch.setattr(qmod, "_check_batch_sizes", lambda p, op: checks.append(p.shape[0]))
    monkeypatch.setattr(qmod, "_all_gather_rows", lambda p, t, op: (torch.cat([p, p]), torch.cat([t, t])))
    queue = fastloss.D2SMQueue(QUEUE, mode="pkt", backend="reference")
    for b in (3, 3, 3, 2, 2, 3):
        queue(torch.rand(b, D, dtype=torch.float64), torch.rand(b, D, dtype=torch.float64))
    assert checks == [3, 2, 3]
