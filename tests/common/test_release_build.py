"""Install noise and size (issue 24): a build prints no setuptools BuildBackendWarning (the data
folders csrc/cpu, csrc/cuda and fastloss/mdf/data are packages) and still ships the C++/CUDA
sources and the MDF data; the extension is built without debug information (-g0 after Python's
own -g) unless FASTLOSS_DEBUG=1."""
import glob
import os
import subprocess
import sys
import zipfile

import pytest

from fastloss import build

from helpers import ROOT  # noqa: E402  (the repository)


class _FakeCppExtension:
    """Records the extension definitions instead of building them."""

    @staticmethod
    def CppExtension(name, sources, **kw):
        return {"name": name, **kw}

    @staticmethod
    def CUDAExtension(name, sources, **kw):
        return {"name": name, **kw}


def _flags(monkeypatch, debug):
    if debug is None:
        monkeypatch.delenv("FASTLOSS_DEBUG", raising=False)
    else:
        monkeypatch.setenv("FASTLOSS_DEBUG", debug)
    cpu, cuda = build.extensions(_FakeCppExtension, os.path.join(ROOT, "csrc"), ROOT, with_cuda=True)
    return cpu["extra_compile_args"], cuda["extra_compile_args"]


@pytest.mark.parametrize("debug", [None, "0"])
def test_release_build_has_no_debug_information(monkeypatch, debug):
    cpu, cuda = _flags(monkeypatch, debug)
    # extra_compile_args come after sysconfig's CFLAGS (which carry -g): the last -g option wins
    assert cpu["cxx"][-1] == "-g0" and "-O3" in cpu["cxx"] and "-g" not in cpu["cxx"]
    assert cuda["cxx"][-1] == "-g0" and "-g" not in cuda["nvcc"]
    assert not build.cache_dir("2.0", os.path.join(ROOT, "csrc")).endswith("-debug")


def test_debug_build_keeps_it(monkeypatch):
    cpu, cuda = _flags(monkeypatch, "1")
    assert cpu["cxx"][-1] == "-g" and "-g0" not in cpu["cxx"]
    assert cuda["cxx"][-1] == "-g" and {"-g", "-lineinfo"} <= set(cuda["nvcc"])
    assert build.cache_dir("2.0", os.path.join(ROOT, "csrc")).endswith("-debug")  # not the release build's folder


def test_setup_sh_rebuilds_when_the_debug_switch_changes():
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        text = f.read()
    line = next(ln for ln in text.splitlines() if ln.startswith("src_hash="))
    assert "fastloss/build.py" in line and "FASTLOSS_DEBUG" in line


def test_wheel_build_prints_no_setuptools_warning_and_ships_sources_and_data(tmp_path):
    """A pure-Python wheel (FASTLOSS_SKIP_BUILD=1: seconds, same packaging as a full build), built
    from a copy of the tracked files so nothing is written into the checkout."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for rel in files.stdout.decode().split("\0"):
        if rel and os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            with open(os.path.join(ROOT, rel), "rb") as a, open(src / rel, "wb") as b:
                b.write(a.read())
    env = dict(os.environ, FASTLOSS_SKIP_BUILD="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation", "--no-deps", "-v",
                           "-w", str(tmp_path / "wh")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "BuildBackendWarning" not in out and "absent from the `packages`" not in out, out[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "wh" / "fastloss-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in subprocess.run(["git", "ls-files", "csrc", "fastloss/mdf/data"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.split():
        installed = "fastloss/" + rel if rel.startswith("csrc/") else rel
        assert installed in names, installed
    assert {"fastloss/csrc/cpu/module.cpp", "fastloss/csrc/cuda/pdl_kernels.cu",
            "fastloss/mdf/data/denoise.safetensors", "fastloss/mdf/data/seed.png"} <= names
