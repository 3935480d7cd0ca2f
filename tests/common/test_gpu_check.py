"""scripts/gpu-check.sh on a machine without a GPU: it says so and exits 2 before building anything;
benchmarks/gpu_ops.py likewise measures nothing."""
import os
import stat
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu-check.sh")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")


def test_gpu_check_is_executable_and_exits_2_without_a_gpu(tmp_path):
    assert os.stat(SCRIPT).st_mode & stat.S_IXUSR
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA device" in p.stdout and "nothing was built or tested" in p.stdout
    assert sorted(os.listdir(out)) == ["summary.txt"]  # no build log: nothing was built


def test_gpu_ops_measures_nothing_without_a_gpu():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_ops.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "nothing was measured" in p.stdout
