"""What the test files of several folders share (tests/pdl, tests/d2sm, tests/mdf, tests/common).

Imported as ``helpers``, like ``conftest``: tests/ is on sys.path because the root conftest.py
lives there (pytest's default ``prepend`` import mode). The test folders have no ``__init__.py``,
so every test file's basename is unique across them."""
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastloss
from fastloss import _backend

from conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# The published MDF weights (never copied into the repository): ../shared/mdf-official beside the
# checkout, as CI lays it; FASTLOSS_MDF_OFFICIAL points elsewhere (a worktree whose ../shared is
# not the project's). Tests skip only when the folder is absent; a missing file in it fails.
MDF_OFFICIAL = os.environ.get("FASTLOSS_MDF_OFFICIAL") or os.path.normpath(os.path.join(ROOT, "..", "shared",
                                                                                        "mdf-official"))


# ----------------------------------------------------------------------------- dispatch
def pair_bad_inputs(x):
    """The bad (pred, target) pairs that the ops refuse alike (their shared input check), as the
    rows (args, kwargs, exception, match) of an op's bad-input table; ``x`` a good input."""
    return [
        ((x.int(), x.int()), {}, TypeError, "pred must be a floating-point tensor, got dtype torch.int32"),
        ((x.to(torch.complex64), x.to(torch.complex64)), {}, TypeError, "complex64"),
        ((x, x.double()), {}, TypeError, "dtypes differ"),
        ((x, x.to("meta")), {}, ValueError, "different devices"),
        ((x, x), {"backend": "gpu"}, ValueError, "unknown backend 'gpu'"),
        ((x.numpy(), x), {}, TypeError, "pred must be a torch.Tensor, got ndarray"),
    ]


def assert_explicit_backend_cannot_run(op, x):
    """``op(x, x, backend=...)`` with a backend that cannot run the input raises BackendError saying
    why: cuda (not built, or no CUDA device) and, when it is built, cpu given meta tensors."""
    with pytest.raises(fastloss.BackendError, match="backend 'cuda' cannot run this input: .*not built|no CUDA"):
        op(x, x, backend="cuda")
    if _backend.status("cpu")[0]:
        with pytest.raises(fastloss.BackendError, match="takes CPU tensors, got a tensor on meta"):
            op(x.to("meta"), x.to("meta"), backend="cpu")


def spy_on_resolve(monkeypatch):
    """The list, filled as calls go, of the backends that ``_backend.resolve`` picks from now on."""
    calls = []
    real = _backend.resolve

    def spy(*a, **k):
        calls.append(real(*a, **k))
        return calls[-1]

    monkeypatch.setattr(_backend, "resolve", spy)
    return calls


def assert_compiled_matches_eager(step, x, y):
    """``torch.compile(step, fullgraph=True)(x, y)`` gives eager mode's value and gradient of ``x``
    (x's gradient from the compiled step is returned)."""
    compiled = torch.compile(step, fullgraph=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(xa, y), step(xb, y)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    return xa.grad


# ----------------------------------------------------------------------------- Triton kernels
def triton_kernels(name):
    """(the Triton kernel module ``fastloss.kernels.<name>``, the device its tests run on), for a
    test module to call at import. tests/conftest.py sets TRITON_INTERPRET=1 before triton loads
    when there is no GPU: the kernels then run on CPU tensors; on a GPU machine it is left unset
    and they run on CUDA tensors. Skips the whole module without triton, or with compiled kernels
    and no GPU."""
    pytest.importorskip("triton")
    kernels = importlib.import_module(f"fastloss.kernels.{name}")
    if kernels._interpreting():
        return kernels, "cpu"
    if torch.cuda.is_available():
        return kernels, "cuda"
    pytest.skip("triton kernels are compiled (TRITON_INTERPRET unset before import) and no GPU", allow_module_level=True)


# ----------------------------------------------------------------------------- CUDA sources
CSRC = Path(ROOT) / "csrc"
# what tests/common/test_cuda_compile.py compiles: every CUDA source (nvcc) and torch binding (host compiler)
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
BINDING_SOURCES = sorted((CSRC / "cuda").glob("*_binding.cpp"))


def run_compiler(cmd):
    """Runs a compiler from the repository root; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\nexit {proc.returncode}\n{proc.stderr}{proc.stdout}"
    return proc


def assert_binding_is_registered(loss):
    """csrc/cuda/<loss>_binding.cpp is registered in the one extension module (module_binding.cpp),
    defines no module itself and includes no CUDA header (streams arrive from Python as ints)."""
    module = (CSRC / "cuda" / "module_binding.cpp").read_text()
    assert f"void register_{loss}_cuda(pybind11::module& m);" in module and f"fastloss::register_{loss}_cuda(m);" in module
    binding = (CSRC / "cuda" / f"{loss}_binding.cpp").read_text()
    assert "PYBIND11_MODULE(" not in binding and "#include <cuda" not in binding and "#include <c10/cuda" not in binding


def assert_launch_header_needs_no_cuda(loss, status, tmp_path):
    """csrc/cuda/<loss>_launch.h, the interface between the binding and the kernels, compiles with
    the host compiler and no CUDA include path (``status``: the status type it declares)."""
    cxx = shutil.which("c++")
    assert cxx is not None, "no host C++ compiler (c++) on PATH"
    header = CSRC / "cuda" / f"{loss}_launch.h"
    assert "#include <cuda" not in header.read_text()
    unit = tmp_path / f"{loss}_launch_only.cpp"
    unit.write_text(f'#include "cuda/{loss}_launch.h"\nint main() {{ return fastloss::{status}{{}}.ok() ? 0 : 1; }}\n')
    run_compiler([cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", CSRC, unit])


# ----------------------------------------------------------------------------- subprocesses
def run_python(code, *args, env=None, timeout=300):
    """``python -c code *args`` from the repository root; what its last line of output says, as JSON."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Thread safety of the first call: the script's ``two_threads(work)`` runs ``work()`` in two threads
# that a barrier releases together, and returns {"out": [each thread's result], "errors": [repr]}.
_TWO_THREADS = textwrap.dedent("""
    import json, threading

    def two_threads(work):
        out, errors = [None, None], []
        barrier = threading.Barrier(2)

        def run(i):
            try:
                barrier.wait()
                out[i] = work()
            except Exception as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        [t.start() for t in threads]; [t.join() for t in threads]
        return {"out": out, "errors": errors}
""")


def first_calls_from_two_threads(script, *args):
    """Runs ``script`` (which calls ``two_threads`` and prints JSON last) in a fresh interpreter, so
    that its calls are the process's first: the extension loads, the Triton kernels compile, or run
    under the interpreter (TRITON_INTERPRET=1, CPU tensors), and the caches fill while two threads
    race; what it printed."""
    return run_python(_TWO_THREADS + textwrap.dedent(script), *args, env=dict(os.environ, TRITON_INTERPRET="1"))


# DDP: a worker script that trains one step of ``build()``'s (model, loss) on ``data()``'s (x, y), as
# one process over the whole batch (world 1) or as rank r of a gloo group, each rank on its slice of
# the batch, model wrapped in DistributedDataParallel; rank 0 writes ``result(model, loss)`` as JSON.
_DDP_HEAD = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import fastloss
""")
_DDP_STEP = textwrap.dedent("""
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    x, y = data()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, crit = build()
    net = DDP(model) if world > 1 else model  # kept alive until the backward: its reducer averages the gradients
    n = x.shape[0] // world
    loss = crit(net(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])
    loss.backward()
    if world > 1:
        dist.barrier()  # both ranks done before either tears down (gloo aborts otherwise)
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result(model, loss), f)
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active
    # exception", seen in loaded suite runs): the result is written, so leave without the teardown
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
""")


def ddp_and_one_process(tmp_path, setup, world=2):
    """Runs the DDP worker whose ``build``, ``data`` and ``result`` ``setup`` defines as ``world``
    ranks on gloo (one thread each) and, at the same time, as one process over the whole batch:
    (the single process's result, rank 0's)."""
    script = tmp_path / "worker.py"
    script.write_text(_DDP_HEAD + textwrap.dedent(setup) + _DDP_STEP)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single, multi = tmp_path / "single.json", tmp_path / "ddp.json"
    port = str(free_port())
    runs = [["0", "1", "0", str(single)]] + [[str(r), str(world), port, str(multi)] for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(script), *run], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for run in runs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return json.loads(single.read_text()), json.loads(multi.read_text())


def readme_quickstart(steps=2):
    """The Python block of README.md's "Quick start", its training loop cut to ``steps`` steps."""
    import re

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert "range(1000)" in code, "the quick start's loop changed: update this helper"
    return code.replace("range(1000)", f"range({steps})")


def write_vgg16_cache(torch_home, seed=0):
    """A random VGG16 in torchvision's format where torchvision's cache keeps the ImageNet file
    (``<TORCH_HOME>/hub/checkpoints/vgg16-397923af.pth``): the losses load it as they would the real
    one, and nothing is downloaded."""
    import torch

    from fastloss.features import VGG

    torch.manual_seed(seed)
    sd = {f"features.{k}": v for k, v in VGG("vgg16", layers="relu5_3", weights=None).features.state_dict().items()}
    folder = os.path.join(str(torch_home), "hub", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    torch.save(sd, os.path.join(folder, "vgg16-397923af.pth"))
