"""benchmarks/gpu_static.py: the kernels compiled ahead of time for sm_80 and sm_90 (no GPU needed),
none of which may spill registers or exceed the per-block shared memory of its target."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPT = Path(ROOT) / "benchmarks" / "gpu_static.py"
KEYS = ["kernel", "variant", "arch", "registers", "spill_bytes", "shared_bytes", "compile_s"]

sys.path.insert(0, str(SCRIPT.parent))


def _run(tmp_path, *args, timeout):
    pytest.importorskip("triton")
    out = tmp_path / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--markdown", str(tmp_path / "b.md"),
                           *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    rows = json.loads(out.read_text()) if out.exists() else None
    return proc, rows


def _check(proc, rows, cuda):
    assert rows is not None, proc.stderr[-3000:]
    assert all(list(r) == KEYS for r in rows)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    kernels = {r["kernel"] for r in rows}
    for loss in ("pdl", "d2sm", "mdf"):
        assert any(k.startswith(loss) and not k.endswith("(cuda)") for k in kernels), loss
        if cuda:
            assert any(k.startswith(loss) and k.endswith("(cuda)") for k in kernels), loss
    import gpu_static

    assert gpu_static.problems(rows) == []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "default training-step variants" in proc.stdout


def test_problems_flags_spills_and_shared_memory():
    """The check itself: a spilling row, one over its arch's shared memory, one that did not compile."""
    import gpu_static

    ok = {"kernel": "pdl_x", "variant": "v", "arch": "sm_80", "registers": 32, "spill_bytes": 0, "shared_bytes": 1024,
          "compile_s": 1.0}
    assert gpu_static.problems([ok]) == []
    assert len(gpu_static.problems([dict(ok, spill_bytes=8)])) == 1
    assert len(gpu_static.problems([dict(ok, shared_bytes=164 * 1024)])) == 1  # sm_80: 163 KiB
    assert gpu_static.problems([dict(ok, arch="sm_90", shared_bytes=164 * 1024)]) == []  # sm_90: 227 KiB
    assert len(gpu_static.problems([dict(ok, kernel="pdl_k (cuda)", shared_bytes=49 * 1024)])) == 1  # static 48 KiB
    assert len(gpu_static.problems([dict(ok, registers=None, error="x")])) == 1


def test_step_variants_compile_without_spills(tmp_path):
    """--step: the Triton variants of a default PDLLoss / D2SMLoss / MDFLoss training step, float32 and
    bfloat16, for sm_80 and sm_90 (about a minute here): all three losses, no spill, within shared memory,
    and the step's compile total printed (the figure issue 13 bounds; its size is not asserted here)."""
    import gpu_static

    proc, rows = _run(tmp_path, "--step", "--no-cuda", timeout=900)
    _check(proc, rows, cuda=False)
    want = set(gpu_static.default_step_keys())
    assert {(r["kernel"], r["variant"]) for r in rows} == want
    assert "not compiled in this run" not in proc.stdout


def test_quick_triton_variants_compile_without_spills(tmp_path):
    """--quick: each Triton kernel, dtype class and block-size class, for sm_80 and sm_90 (about 2 minutes
    on this 2-core machine when it is quiet; 40 under a load of 6), the default-step variants among them."""
    import gpu_static

    proc, rows = _run(tmp_path, "--quick", "--no-cuda", timeout=2400)
    _check(proc, rows, cuda=False)
    assert set(gpu_static.default_step_keys()) <= {(r["kernel"], r["variant"]) for r in rows}
    md = (tmp_path / "b.md").read_text()
    assert "<!-- gpu-static:begin -->" in md and "spill bytes" in md


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no nvcc")
def test_full_list_with_cuda_kernels(tmp_path):
    proc, rows = _run(tmp_path, timeout=7200)
    _check(proc, rows, cuda=True)
