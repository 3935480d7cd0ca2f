"""The README's plain install, as a new user runs it: a fresh venv that already has this torch,
then `pip install <checkout>` with pip's build isolation. It must not change torch, and the user
must end up with the C++ kernels (built at install time against that torch), a working MDFLoss and a
README quick start that runs.
Slow (it compiles the extension): `pytest -m slow tests/common/test_plain_install.py`."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT, readme_quickstart, write_vgg16_cache


@pytest.mark.slow
def test_plain_pip_install_in_a_fresh_venv_keeps_torch_and_builds_the_kernels(tmp_path):
    import torch

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True,
                   timeout=1800)
    before = subprocess.run([py, "-c", "import torch; print(torch.__version__, torch.__file__)"], check=True,
                            capture_output=True, text=True).stdout
    proc = subprocess.run([py, "-m", "pip", "install", ROOT], capture_output=True, text=True, timeout=3000,
                          cwd=str(tmp_path), env=dict(os.environ, MAX_JOBS="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = subprocess.run([py, "-c", "import torch; print(torch.__version__, torch.__file__)"], check=True,
                           capture_output=True, text=True).stdout
    assert before == after  # pip fetched no second torch
    code = ("import torch, fastloss\n"
            "assert 'site-packages' in fastloss.__file__, fastloss.__file__\n"
            "cpu = fastloss.backends()['cpu']\n"
            "assert cpu['available'] and 'built at install time' in cpu['reason'], cpu\n"
            "x = torch.rand(1, 3, 24, 24)\n"
            "print(float(fastloss.MDFLoss()(x, x.flip(-1))))\n")
    run = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
                         env={k: v for k, v in os.environ.items() if not k.startswith("FASTLOSS_")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.split()[-1]) > 0
    # README's quick start, as a new user copies it (two steps; the VGG16 file in the cache, offline)
    write_vgg16_cache(tmp_path / "torch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOSS_")}
    run = subprocess.run([py, "-c", readme_quickstart(steps=2) + "\nprint(float(loss))\n"], capture_output=True,
                         text=True, cwd=str(tmp_path), timeout=600,
                         env=dict(env, TORCH_HOME=str(tmp_path / "torch"), FASTLOSS_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.split()[-1]) > 0
