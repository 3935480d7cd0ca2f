"""What setup.py promises: FASTLOSS_SKIP_BUILD=1 gives a pure-Python package that still works
(on the reference backend), and the Triton kernels are installed as fastloss.kernels."""
import glob
import os
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT


@pytest.fixture(scope="module")
def pure_wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, FASTLOSS_SKIP_BUILD="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = glob.glob(str(out / "fastloss-*.whl"))
    return wheel


def test_skip_build_wheel_is_pure_python_with_kernels(pure_wheel):
    names = zipfile.ZipFile(pure_wheel).namelist()
    assert not [n for n in names if n.endswith(".so")]
    assert "fastloss/kernels/pdl.py" in names
    for loss in ("pdl", "d2sm", "mdf", "fdl"):  # every loss folder, found by setup.py without a list
        assert {f"fastloss/{loss}/{m}.py" for m in ("__init__", "reference", "ops", "loss")} <= set(names), loss
    assert any(n.endswith("entry_points.txt") for n in names)


def test_pure_python_install_falls_back_to_reference(pure_wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), pure_wheel],
                   check=True, timeout=600)
    # The development checkout is installed editable; its import hook would resolve fastloss._C
    # from the checkout, so the child drops that hook to see the installed wheel alone.
    code = ("import sys\n"
            "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
            "import warnings, torch, fastloss\n"
            "assert fastloss.__file__.startswith(%r), fastloss.__file__\n"
            "print(fastloss.backends()['cpu']['available'])\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    x = torch.randn(2, 3, 9)\n"
            "    out = fastloss.pdl(x, x.flip(-1))\n"
            "    torch.testing.assert_close(out, fastloss.pdl_reference(x, x.flip(-1)))\n"
            "print(len([m for m in w if 'falling back' in str(m.message)]))\n") % str(target)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTLOSS_REQUIRE_EXT", "FASTLOSS_BACKEND")}
    env["PYTHONPATH"] = str(target)
    env["FASTLOSS_CACHE_DIR"] = str(tmp_path / "no-cache")  # no `python -m fastloss.build` build either
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "1"]
