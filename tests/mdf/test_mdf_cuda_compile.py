"""The MDF CUDA sources: compiled by tests/common/test_cuda_compile.py with every csrc/cuda/*.cu
(nvcc, sm_90) and *_binding.cpp (host compiler, torch headers). Here: they are there, registered in
the extension module, and their launch header needs no CUDA."""
from helpers import CSRC, assert_binding_is_registered, assert_launch_header_needs_no_cuda

CUDA = CSRC / "cuda"


def test_mdf_cuda_sources_are_picked_up_and_registered():
    assert (CUDA / "mdf_kernels.cu").is_file() and (CUDA / "mdf_binding.cpp").is_file()
    assert_binding_is_registered("mdf")


def test_mdf_launch_header_needs_no_cuda(tmp_path):
    assert_launch_header_needs_no_cuda("mdf", "MdfStatus", tmp_path)
