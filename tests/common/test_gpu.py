"""GPU mode: the real Triton and CUDA kernels on a CUDA device, against CPU float64 ground truth.

Skipped without a CUDA device (tests/conftest.py). On a GPU machine run with TRITON_INTERPRET
unset, e.g. through scripts/gpu-check.sh, which also runs `python -m fastloss.selftest --full`.
Each quick acceptance case runs on each GPU backend by name (auto takes triton first, so the
cuda backend's numerics are only reached by naming it), and the auto dispatch itself."""
import pytest
import torch

import fastloss
from fastloss import _backend, selftest

pytestmark = pytest.mark.gpu

QUICK = selftest.cases(full=False)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", QUICK, ids=[c.label for c in QUICK])
def test_acceptance_case(backend, case):
    why = _backend.why_not(backend, torch.device("cuda"), case.dtype)
    if why is not None:
        pytest.fail(f"{backend} cannot run on this GPU machine: {why}")
    with selftest.no_tf32():
        r = selftest._run_one(case, backend, "cuda")
    # a case the backend's table covers must pass; only one outside it may be (and must be) n/a
    problem = selftest.acceptance_problem(case, r, "cuda")
    assert problem is None, problem


def test_auto_picks_a_fast_backend_and_is_right():
    dev = torch.device("cuda")
    for op in ("pdl", "d2sm", "mdf"):
        assert _backend.resolve(op, "auto", dev, torch.float32) in ("triton", "cuda")
    x, y = selftest.pdl_inputs(2, 3, 1025, torch.float32, "contiguous", "zeros", 1)
    g = torch.tensor([0.5, 1.5], dtype=torch.float64)
    loss_t, _, _, _, gx_t, _ = selftest.pdl_truth(x, y, 1, g)
    xr = x.cuda().requires_grad_()
    out = fastloss.pdl(xr, y.cuda(), reduction="none")
    out.backward(g.float().cuda())
    assert selftest.rel_error(out, loss_t) < 1e-5
    assert selftest.rel_error(xr.grad.flatten(2), gx_t) < 1e-5


@pytest.mark.parametrize("loss", ["pdl", "d2sm", "mdf"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_training_step_makes_no_host_sync(loss, backend):
    case = selftest._sync_debug_case(loss)
    r = selftest._run_one(case, backend, "cuda")
    assert r.status == "pass", f"{r.status}: {r.detail} {r.errors}"
