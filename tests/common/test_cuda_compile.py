"""The CUDA sources compile without a GPU.

Every csrc/cuda/*.cu is compiled for sm_90 with nvcc; they need only the CUDA toolkit. The torch
binding (csrc/cuda/pdl_binding.cpp) is checked with the host C++ compiler against the installed
torch headers: it includes no CUDA header (streams arrive from Python as ints), so a CPU-only torch
is enough. pdl_launch.h, the interface between the two, must compile with no CUDA include path.
"""
import re
import shutil
import sysconfig

import pytest

from helpers import BINDING_SOURCES, CSRC, CUDA_SOURCES, assert_launch_header_needs_no_cuda, run_compiler

NVCC = shutil.which("nvcc")
CXX = shutil.which("c++")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def test_sources_found():
    assert "pdl_kernels.cu" in [p.name for p in CUDA_SOURCES]
    assert "pdl_binding.cpp" in [p.name for p in BINDING_SOURCES]


def test_one_module_definition():
    # setup.py links every *_binding.cpp into fastloss._C_cuda: only module_binding.cpp defines it.
    defining = [p.name for p in BINDING_SOURCES if "PYBIND11_MODULE(" in p.read_text()]
    assert defining == ["module_binding.cpp"]


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    """With setup.py's optimisation level, and no kernel of the file (CUB's included) spills registers
    on sm_90 (issue 13; benchmarks/gpu_static.py checks sm_80 as well)."""
    cmd = [NVCC, "-std=c++20", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-c", source, "-o",
           tmp_path / (source.stem + ".o"), "-I", CSRC]
    proc = run_compiler(cmd)
    assert spilling_kernels(proc.stderr + proc.stdout) == []


def spilling_kernels(ptxas_log):
    """The entry functions whose ``ptxas -v`` report shows spill stores or loads."""
    out, current = [], None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current and (int(m.group(1)) or int(m.group(2))):
            out.append(current)
    return out


def test_spill_parser_sees_spills():
    """The check above can fail: a report with a spilling kernel is caught, a clean one is not."""
    log = ("ptxas info    : Compiling entry function '_Z1av' for 'sm_90'\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Compiling entry function '_Z1bv' for 'sm_90'\n"
           "    8 bytes stack frame, 8 bytes spill stores, 24 bytes spill loads\n")
    assert spilling_kernels(log) == ["_Z1bv"]
    assert spilling_kernels(log.split("ptxas info    : Compiling entry function '_Z1bv'")[0]) == []


@pytest.mark.parametrize("source", BINDING_SOURCES, ids=lambda p: p.name)
def test_binding_compiles_with_host_compiler(source):
    from torch.utils import cpp_extension

    assert CXX is not None, "no host C++ compiler (c++) on PATH"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    run_compiler([CXX, "-std=c++20", "-fsyntax-only", "-I", CSRC, *includes, "-DTORCH_EXTENSION_NAME=_C_cuda", source])


def test_launch_header_needs_no_cuda(tmp_path):
    assert_launch_header_needs_no_cuda("pdl", "PdlStatus", tmp_path)
