"""The README's "Guarantees" section, line by line: mixed precision, torch.compile, DDP,
determinism, and thread safety of the first call."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastloss
from fastloss.pdl import pdl_reference

from conftest import assert_bitwise_identical, free_port, requires_cpu_ext
from helpers import ROOT


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
_FIRST_CALL = textwrap.dedent("""
    import json, threading, torch, fastloss
    x = torch.arange(2 * 3 * 50, dtype=torch.float32).reshape(2, 3, 50).sin()
    y = x.flip(-1).cos()
    out, errors = [None, None], []
    barrier = threading.Barrier(2)
    def work(i):
        try:
            barrier.wait()
            a = x.clone().requires_grad_()
            loss = fastloss.pdl(a, y, backend=BACKEND)
            loss.backward()
            out[i] = (loss.item(), a.grad.sum().item())
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print(json.dumps({"out": out, "errors": errors}))
""")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_first_call_from_two_threads_at_once(backend):
    if not fastloss.backends()[backend]["available"] and backend == "cpu":
        pytest.skip("fastloss._C not built")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = _FIRST_CALL.replace("BACKEND", repr(backend))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["errors"] == []
    assert res["out"][0] == res["out"][1]
    x = torch.arange(2 * 3 * 50, dtype=torch.float32).reshape(2, 3, 50).sin()
    assert res["out"][0][0] == pytest.approx(pdl_reference(x, x.flip(-1).cos()).item(), rel=1e-5)


# ----------------------------------------------------------------------------- DDP
_DDP_WORKER = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import fastloss

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
        crit = fastloss.PDLLoss(layers=("relu1_2",), extractor_weights=None, weight=1.0, projection="rsp")
        return model, crit

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)

    def grads(model):
        return [p.grad.flatten().tolist() for p in model.parameters()]

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    x, y = data()
    if world == 1:
        model, crit = build()
        crit(model(x), y).backward()
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model, crit = build()
        ddp = DDP(model)
        n = x.shape[0] // world
        crit(ddp(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
        dist.barrier()  # both ranks done before either tears down (gloo aborts otherwise)
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(grads(model), f)
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active
    # exception", seen in loaded suite runs): the result is written, so leave without the teardown
    if world > 1:  # (the single-process run may be exec'd inside the test itself)
        sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
""")


@requires_cpu_ext
def test_ddp_gloo_two_processes_equal_single_process_over_concatenated_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(script), "0", "1", "0", str(single)], check=True, env=env, cwd=ROOT, timeout=300)
    port = str(free_port())
    multi = tmp_path / "ddp.json"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", port, str(multi)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    for ga, gb in zip(a, b):
        torch.testing.assert_close(torch.tensor(gb), torch.tensor(ga), rtol=1e-5, atol=1e-7)
