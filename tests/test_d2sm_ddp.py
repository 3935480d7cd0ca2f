"""D2SMQueue under torch.distributed: 2 processes on gloo (CPU). Every rank all-gathers the batch
rows, holds the same queue and computes the loss of one process over the concatenated batch; the
gradient reaches only its own rows."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastloss
from fastloss import _backend

WORLD, B, D, QUEUE, STEPS = 2, 3, 11, 10, 5  # 6 rows a call through a queue of 10: it wraps


def _backend_name():
    return "cpu" if _backend.status("cpu")[0] else "reference"


def _batches():
    """Every step's full batch (both ranks' rows), float64, the same in every process."""
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64).relu(),
             torch.randn(WORLD * B, D, generator=g, dtype=torch.float64).relu()) for _ in range(STEPS)]


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
        torch.save({"results": results, "queue": queue.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
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
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for (loss, grad), (loss1, grad1) in zip(saved["results"], expected):
            torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=0)
            torch.testing.assert_close(grad, grad1[rank * B:(rank + 1) * B], rtol=1e-10, atol=1e-18)
        for name, value in single.state_dict().items():  # every rank holds the single process's queue
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(saved["queue"][name], value, rtol=1e-12, atol=1e-15)


def test_without_a_process_group_it_is_one_process():
    assert not dist.is_initialized()
    x, y = _batches()[0]
    out = fastloss.D2SMQueue(QUEUE, mode="pkt")(x, y)
    torch.testing.assert_close(out, fastloss.d2sm_reference(x, y, "pkt"), rtol=1e-10, atol=0)
