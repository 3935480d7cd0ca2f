"""The D2SM CUDA sources: compiled by tests/common/test_cuda_compile.py with every csrc/cuda/*.cu
(nvcc, sm_90) and *_binding.cpp (host compiler, torch headers). Here: they are there, picked up by
that test, registered in the extension module, and their launch header needs no CUDA."""
from helpers import (BINDING_SOURCES, CSRC, CUDA_SOURCES, assert_binding_is_registered,
                     assert_launch_header_needs_no_cuda)

CUDA = CSRC / "cuda"


def test_d2sm_cuda_sources_are_picked_up_and_registered():
    assert CUDA / "d2sm_kernels.cu" in CUDA_SOURCES and CUDA / "d2sm_binding.cpp" in BINDING_SOURCES
    assert_binding_is_registered("d2sm")
    kernels = (CUDA / "d2sm_kernels.cu").read_text()
    assert "#include <torch" not in kernels and "#include <ATen" not in kernels and "#include <c10" not in kernels


def test_d2sm_launch_header_needs_no_cuda(tmp_path):
    assert_launch_header_needs_no_cuda("d2sm", "D2smStatus", tmp_path)
