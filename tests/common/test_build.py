"""The build machinery of setup.py and `python -m fastloss.build` (fastloss/build.py): the CPU
extension is built first and on its own, so a failing CUDA build (a toolkit whose version differs
from torch's, a compile error) is reported and never aborts it; the build status file says what
happened; the loader finds a cache build and says which build is in use.

The extensions compiled here are tiny stand-ins (a few lines of C), so each build takes seconds."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT

_CPU_SRC = textwrap.dedent("""
    #include <Python.h>
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "stand-in", -1, NULL};
    PyMODINIT_FUNC PyInit__C(void) {
      PyObject* m = PyModule_Create(&def);
      PyModule_AddStringConstant(m, "compiler", "stand-in");
      PyModule_AddIntConstant(m, "openmp", 0);
      return m;
    }
""")

_SETUP = textwrap.dedent("""
    import os, sys
    import torch
    from setuptools import Extension, setup
    from torch.utils import cpp_extension
    sys.path.insert(0, {root!r})
    from fastloss import build as b
    mode = os.environ["MODE"]
    if mode == "mismatch":      # what torch raises for a toolkit of another major version than its own
        def mismatch(*a):
            raise RuntimeError(cpp_extension.CUDA_MISMATCH_MESSAGE % ("11.8", "12.4"))
        cpp_extension._check_cuda_version = mismatch
    elif mode == "compile_error":   # the toolkit check passes, then nvcc (or its absence) fails the build
        cpp_extension._check_cuda_version = lambda *a: None
        cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or "/nonexistent-cuda"
    exts = [Extension("fastloss._C_cuda", ["k.cu"]),   # listed first: the build must still do the CPU one first
            cpp_extension.CppExtension("fastloss._C", [os.environ.get("CPU_SRC", "cpu.c")])]
    setup(name="standin", ext_modules=exts, cmdclass={{"build_ext": b.build_ext_class(cpp_extension, torch.__version__)}},
          script_args=["build_ext", "--build-lib", "out", "--build-temp", "tmp"])
""")


def _build(tmp_path, mode, cpu_src="cpu.c", require=None):
    (tmp_path / "cpu.c").write_text(_CPU_SRC)
    (tmp_path / "broken.c").write_text("#error this CPU source is broken on purpose\n")
    (tmp_path / "k.cu").write_text("#error this CUDA source is broken on purpose\n__global__ void k() {}\n")
    (tmp_path / "setup_standin.py").write_text(_SETUP.format(root=ROOT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOSS_REQUIRE")}
    env.update(MODE=mode, CPU_SRC=cpu_src, MAX_JOBS="1")
    if require:
        env["FASTLOSS_REQUIRE_EXT"] = "1"
    return subprocess.run([sys.executable, "setup_standin.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def _status(tmp_path):
    return json.loads((tmp_path / "out" / "fastloss" / "_build_status.json").read_text())


@pytest.mark.parametrize("mode", ["mismatch", "compile_error"])
def test_failing_cuda_build_leaves_the_cpu_extension_built(tmp_path, mode):
    proc = _build(tmp_path, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = os.listdir(tmp_path / "out" / "fastloss")
    assert [f for f in built if f.startswith("_C.") and f.endswith(".so")], built
    assert not [f for f in built if f.startswith("_C_cuda")], built
    status = _status(tmp_path)
    assert status["extensions"]["_C"] == {"built": True}
    cuda = status["extensions"]["_C_cuda"]
    assert cuda["built"] is False and cuda["reason"].startswith("its build failed")
    if mode == "mismatch":
        assert "11.8" in cuda["reason"] and "12.4" in cuda["reason"]
    # the message on the terminal names the extension and says the CPU one is unaffected
    assert "building the CUDA extension fastloss._C_cuda failed" in proc.stderr
    assert "the CPU extension and the rest of fastloss are unaffected" in proc.stderr


def test_failing_cpu_build_is_recorded_or_fatal_under_require_ext(tmp_path):
    proc = _build(tmp_path, "mismatch", cpu_src="broken.c")
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = _status(tmp_path)
    assert status["extensions"]["_C"]["built"] is False
    assert status["extensions"]["_C"]["reason"].startswith("its build failed")
    assert "broken on purpose" in proc.stdout + proc.stderr  # the compiler's own words reach the terminal
    assert "python -m fastloss.build" in proc.stderr

    proc = _build(tmp_path, "mismatch", cpu_src="broken.c", require=True)
    assert proc.returncode != 0
    assert "building the C++ CPU extension fastloss._C failed" in proc.stderr


def test_loader_uses_the_cache_build_and_says_so(tmp_path, monkeypatch):
    """A package without an install-time build loads the `python -m fastloss.build` build from the
    cache of this torch and sources, and backends() names it; with an empty cache the reason names
    the command. Run in a child with the package copied, so the checkout's own build is not seen."""
    import shutil

    import torch

    pkg = tmp_path / "site" / "fastloss"
    shutil.copytree(os.path.join(ROOT, "fastloss"), pkg, ignore=shutil.ignore_patterns("*.so", "_build_status.json",
                                                                                       "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "kernels"), pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc"), pkg / "csrc")
    sys.path.insert(0, str(tmp_path / "site"))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_standin_build", pkg / "build.py")
        b = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(b)
    finally:
        sys.path.pop(0)
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTLOSS_REQUIRE", "FASTLOSS_BACKEND"))}
    env.update(FASTLOSS_CACHE_DIR=str(cache), PYTHONPATH=str(tmp_path / "site"))
    code = ("import sys\n"
            "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
            "import fastloss\n"
            "assert fastloss.__file__.startswith(%r), fastloss.__file__\n"
            "print(fastloss.backends()['cpu'])\n") % str(pkg)

    def child():
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = child()
    assert "'available': False" in out and "run `python -m fastloss.build`" in out, out

    # stand in for what `python -m fastloss.build` leaves: the stand-in module in the cache folder
    # keyed by this Python, torch and the package's sources
    monkeypatch.setenv("FASTLOSS_CACHE_DIR", str(cache))
    folder = b.cache_dir(torch.__version__, str(pkg / "csrc"))
    assert folder.startswith(str(cache))
    proc = _build(tmp_path, "mismatch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(tmp_path / "out", folder)
    out = child()
    assert "'available': True" in out and "built by `python -m fastloss.build`" in out and folder in out, out

    # a source change moves the key: the old build is not used for new sources
    with open(pkg / "csrc" / "cpu" / "module.cpp", "a") as f:
        f.write("// changed\n")
    out = child()
    assert "'available': False" in out, out
