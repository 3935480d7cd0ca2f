"""The MDF CUDA sources: compiled by tests/common/test_cuda_compile.py with every csrc/cuda/*.cu (nvcc,
sm_90) and *_binding.cpp (host compiler, torch headers). Here: they are there, registered in the
extension module, and their launch header needs no CUDA."""
import shutil
import subprocess

from helpers import CSRC

CUDA = CSRC / "cuda"


def test_mdf_cuda_sources_are_picked_up_and_registered():
    assert (CUDA / "mdf_kernels.cu").is_file() and (CUDA / "mdf_binding.cpp").is_file()
    module = (CUDA / "module_binding.cpp").read_text()
    assert "void register_mdf_cuda(pybind11::module& m);" in module and "fastloss::register_mdf_cuda(m);" in module
    binding = (CUDA / "mdf_binding.cpp").read_text()
    assert "PYBIND11_MODULE(" not in binding and "#include <cuda" not in binding and "#include <c10/cuda" not in binding


def test_mdf_launch_header_needs_no_cuda(tmp_path):
    cxx = shutil.which("c++")
    assert cxx is not None, "no host C++ compiler (c++) on PATH"
    header = CUDA / "mdf_launch.h"
    assert "#include <cuda" not in header.read_text()
    unit = tmp_path / "mdf_launch_only.cpp"
    unit.write_text('#include "cuda/mdf_launch.h"\nint main() { return fastloss::MdfStatus{}.ok() ? 0 : 1; }\n')
    proc = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC),
                           str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
