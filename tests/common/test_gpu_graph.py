"""CUDA-graph capture past the sizes the acceptance run's graph cases use (issue 22), GPU only.

The selftest's capture cases run PDL at N = 1536 and 4096: neither reaches the CUDA segmented
sort (N > PDL_BLOCK_SORT_MAX_N, CUB's DeviceSegmentedSort, which copies to the host above its
partitioning threshold of about 300 segments unless fastloss splits the rows) nor Triton's
``torch.sort`` fallback (N > TRITON_MAX_SORT_N). ``set_sync_debug_mode`` sees only PyTorch's own
syncs; a capture fails on any. Here a PDL forward + backward at N = 8193 over 303 rows is captured
on ``cuda`` and ``triton`` and replayed on new data against float64 CPU truth; and a captured
MDF step is replayed after more shapes than the device caches' bound went through them (MDF's
channel weights, Triton's shape tables: a dropped entry would be read freed). Skipped without CUDA (``gpu`` marker)."""
import pytest
import torch

import fastloss
from fastloss import selftest
from fastloss.selftest.tolerances import MDF_TOL, TOL

pytestmark = pytest.mark.gpu
DEVICE_AWARE = True

B, C, N = 3, 101, 8193  # 303 rows past the block sort and past Triton's single-program cap


def _capture(fn, warmup=2):
    """Warm ``fn`` up on a side stream (as torch.cuda.graphs asks), capture it; (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_pdl_segmented_sort_step_is_captured_and_replays_right(backend, p):
    x0, y0 = selftest.pdl_inputs(B, C, N, torch.float32, "contiguous", "zeros", seed=1)
    static_x = x0.cuda().requires_grad_()
    static_y = y0.cuda().requires_grad_(p == 1)
    g = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    g_dev = g.float().cuda()

    def step():
        out = fastloss.pdl(static_x, static_y, p=p, reduction="none", backend=backend)
        grads = torch.autograd.grad(out, [static_x, static_y] if p == 1 else [static_x], g_dev)
        return (out,) + tuple(grads)

    graph, outs = _capture(step)
    for seed in (2, 3):
        x1, y1 = selftest.pdl_inputs(B, C, N, torch.float32, "contiguous", "nan" if seed == 3 else "zeros", seed)
        with torch.no_grad():
            static_x.copy_(x1)
            static_y.copy_(y1)
        graph.replay()
        torch.cuda.synchronize()
        loss_t, _, _, _, gx_t, gy_t = selftest.pdl_truth(x1, y1, p, g)
        errs = {"loss": selftest.rel_error(outs[0], loss_t), "grad pred": selftest.rel_error(outs[1], gx_t.view(x1.shape))}
        if p == 1:
            errs["grad target"] = selftest.rel_error(outs[2], gy_t.view(y1.shape))
        assert all(e <= TOL[torch.float32] for e in errs.values()), (seed, errs)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_mdf_replay_after_the_device_caches_churned(backend):
    from fastloss.mdf import ops as mdf_ops

    bound = mdf_ops._CHAN_WEIGHTS.max_entries
    if backend == "triton":
        from fastloss.kernels import mdf as kmdf
        bound = max(bound, kmdf._TABLES.max_entries)
    w = selftest.mdf_weights()
    crit = fastloss.MDFLoss(w, scales=3, backend=backend).cuda()
    gen = torch.Generator().manual_seed(0)
    static_x = torch.rand(2, 3, 24, 20, generator=gen).cuda().requires_grad_()
    static_y = torch.rand(2, 3, 24, 20, generator=gen).cuda()

    def step():
        out = crit(static_x, static_y)
        (gx,) = torch.autograd.grad(out, static_x)
        return out, gx

    graph, (out, gx) = _capture(step)
    # more distinct shapes than the cache holds, outside the graph
    for k in range(bound + 8):
        crit(torch.rand(1, 3, 11 + k, 13, device="cuda"), torch.rand(1, 3, 11 + k, 13, device="cuda"))
    # allocations that would take a freed table's memory
    junk = [torch.full((64,), -1, dtype=torch.int64, device="cuda") for _ in range(256)]
    x1 = torch.rand(2, 3, 24, 20, generator=gen)
    y1 = torch.rand(2, 3, 24, 20, generator=gen)
    with torch.no_grad():
        static_x.copy_(x1)
        static_y.copy_(y1)
    graph.replay()
    torch.cuda.synchronize()
    xt = x1.double().requires_grad_()
    truth = fastloss.MDFLoss(w, scales=3, backend="reference")(xt, y1.double())
    (gx_t,) = torch.autograd.grad(truth, xt)
    del junk
    tol = MDF_TOL[torch.float32]
    assert selftest.rel_error(out, truth) <= tol and selftest.rel_error(gx, gx_t, "norm") <= tol
