"""The README's "Guarantees" section, line by line: mixed precision, torch.compile, DDP,
determinism, and thread safety of the first call."""
import pytest
import torch

import fastloss
from fastloss.pdl import pdl_reference

from conftest import assert_bitwise_identical, requires_cpu_ext
from helpers import ddp_and_one_process, first_calls_from_two_threads


# Tolerances promised in the README, relative to the float32 result on the same inputs.
HALF_INPUT_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
AUTOCAST_RTOL = 5e-2


def _pdl_loss(**kw):
    torch.manual_seed(0)
    return fastloss.PDLLoss(layers=("relu1_2", "relu2_2"), extractor_weights=None, weight=1.0, **kw)


# ----------------------------------------------------------------------------- mixed precision
@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pdl_half_inputs_accumulate_in_float32(dtype):
    x = torch.randn(4, 16, 24, 24).relu()
    y = torch.randn(4, 16, 24, 24).relu()
    out = fastloss.pdl(x.to(dtype), y.to(dtype), reduction="none")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), fastloss.pdl(x, y, reduction="none"), rtol=HALF_INPUT_RTOL[dtype], atol=0)


@requires_cpu_ext
def test_pdl_loss_under_cpu_autocast_bfloat16():
    crit = _pdl_loss()
    u = torch.rand(2, 3, 32, 32, requires_grad=True)
    v = torch.rand(2, 3, 32, 32)
    full = crit(u, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = crit(u, v)
    assert torch.isfinite(mixed)
    torch.testing.assert_close(mixed.float(), full, rtol=AUTOCAST_RTOL, atol=0)
    mixed.float().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


# ----------------------------------------------------------------------------- torch.compile
@requires_cpu_ext
def test_compiled_training_step_with_pdl_loss_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    crit = _pdl_loss(projection="rsp")

    def step(x, y):
        return crit(model(x), y)

    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    eager = step(x, y)
    eager.backward()
    g_eager = model.weight.grad.clone()
    model.weight.grad = None
    compiled = torch.compile(step, fullgraph=True)(x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(model.weight.grad, g_eager)


# ----------------------------------------------------------------------------- determinism
@requires_cpu_ext
@pytest.mark.parametrize("p", [1, 2])
def test_cpu_runs_are_bitwise_identical_with_ties(p):
    x = (torch.randn(3, 8, 40, 40) * 2).round().relu()  # many ties
    y = (torch.randn(3, 8, 40, 40) * 2).round().relu()
    results = []
    prev = torch.get_num_threads()
    for threads in (1, 2, 1):  # and whatever the thread count
        torch.set_num_threads(threads)
        try:
            a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
            loss = fastloss.pdl(a, b, p=p)
            loss.backward()
            results.append((loss.detach(), a.grad, b.grad))
        finally:
            torch.set_num_threads(prev)
    assert results[0][1].abs().sum() > 0
    assert_bitwise_identical(results)


def test_use_deterministic_flag_and_torch_flag():
    assert fastloss.deterministic() is False
    fastloss.use_deterministic(True)
    try:
        assert fastloss.deterministic() is True
    finally:
        fastloss.use_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        assert fastloss.deterministic() is True
    finally:
        torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------------------- thread safety
_FIRST_CALL = """
    import torch, fastloss
    x = torch.arange(2 * 3 * 50, dtype=torch.float32).reshape(2, 3, 50).sin()
    y = x.flip(-1).cos()

    def work():
        a = x.clone().requires_grad_()
        loss = fastloss.pdl(a, y, backend=BACKEND)
        loss.backward()
        return (loss.item(), a.grad.sum().item())

    print(json.dumps(two_threads(work)))
"""


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_first_call_from_two_threads_at_once(backend):
    if not fastloss.backends()[backend]["available"] and backend == "cpu":
        pytest.skip("fastloss._C not built")
    res = first_calls_from_two_threads(_FIRST_CALL.replace("BACKEND", repr(backend)))
    assert res["errors"] == []
    assert res["out"][0] == res["out"][1]
    x = torch.arange(2 * 3 * 50, dtype=torch.float32).reshape(2, 3, 50).sin()
    assert res["out"][0][0] == pytest.approx(pdl_reference(x, x.flip(-1).cos()).item(), rel=1e-5)


# ----------------------------------------------------------------------------- DDP
_DDP_SETUP = """
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
        crit = fastloss.PDLLoss(layers=("relu1_2",), extractor_weights=None, weight=1.0, projection="rsp")
        return model, crit

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)

    def result(model, loss):
        return [p.grad.flatten().tolist() for p in model.parameters()]
"""


@requires_cpu_ext
def test_ddp_gloo_two_processes_equal_single_process_over_concatenated_batch(tmp_path):
    a, b = ddp_and_one_process(tmp_path, _DDP_SETUP)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(torch.tensor(gb), torch.tensor(ga), rtol=1e-5, atol=1e-7)
