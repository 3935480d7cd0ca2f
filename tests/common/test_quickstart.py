"""README.md's quick start runs as written (two steps of its loop instead of 1000), with the VGG16
file where torchvision's cache keeps it (a random VGG16 in torchvision's format: tests never reach
the internet) and FASTLOSS_OFFLINE=1, so a download attempt would fail the test. The same code in a
fresh venv after a plain `pip install .` is tests/common/test_plain_install.py (slow)."""
import os
import subprocess
import sys

from helpers import ROOT, readme_quickstart, write_vgg16_cache


def test_the_readme_quick_start_runs(tmp_path):
    write_vgg16_cache(tmp_path / "torch")
    code = readme_quickstart(steps=2) + "\nprint('loss', float(loss))\n"
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), FASTLOSS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.split()[-1]) > 0


def test_the_quick_start_fails_offline_without_the_file(tmp_path):
    """The check above can fail: with no file in the cache and offline mode, the same code stops
    with the error that names both ways out."""
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "empty"), FASTLOSS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", readme_quickstart(steps=1)], capture_output=True, text=True,
                         cwd=str(tmp_path), env=env, timeout=600)
    assert run.returncode != 0
    assert "FASTLOSS_OFFLINE" in run.stderr and "vgg16-397923af.pth" in run.stderr
