"""The D2SM CUDA sources: compiled by tests/common/test_cuda_compile.py with every csrc/cuda/*.cu (nvcc,
sm_90) and *_binding.cpp (host compiler, torch headers). Here: they are there, picked up by that
test, registered in the extension module, and their launch header needs no CUDA."""
import shutil
import subprocess

from helpers import BINDING_SOURCES, CSRC, CUDA_SOURCES

CUDA = CSRC / "cuda"


def test_d2sm_cuda_sources_are_picked_up_and_registered():
    assert CUDA / "d2sm_kernels.cu" in CUDA_SOURCES and CUDA / "d2sm_binding.cpp" in BINDING_SOURCES
    module = (CUDA / "module_binding.cpp").read_text()
    assert "void register_d2sm_cuda(pybind11::module& m);" in module and "fastloss::register_d2sm_cuda(m);" in module
    binding = (CUDA / "d2sm_binding.cpp").read_text()
    assert "PYBIND11_MODULE(" not in binding and "#include <cuda" not in binding and "#include <c10/cuda" not in binding
    kernels = (CUDA / "d2sm_kernels.cu").read_text()
    assert "#include <torch" not in kernels and "#include <ATen" not in kernels and "#include <c10" not in kernels


def test_d2sm_launch_header_needs_no_cuda(tmp_path):
    cxx = shutil.which("c++")
    assert cxx is not None, "no host C++ compiler (c++) on PATH"
    header = CUDA / "d2sm_launch.h"
    assert "#include <cuda" not in header.read_text()
    unit = tmp_path / "d2sm_launch_only.cpp"
    unit.write_text('#include "cuda/d2sm_launch.h"\nint main() { return fastloss::D2smStatus{}.ok() ? 0 : 1; }\n')
    proc = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC),
                           str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
