"""FDL's sorts on the triton backend: under TRITON_INTERPRET=1 on CPU tensors at a tiny size (the
interpreter is slow), against the reference backend in float64."""
import pytest
import torch

import fastloss
from fastloss.fdl import fdl

from helpers import triton_kernels

_, DEVICE = triton_kernels("pdl")
DEVICE_AWARE = True  # runs on CUDA tensors in GPU mode (tests/conftest.py)


def test_fdl_op_triton_matches_reference_float64():
    if not fastloss.backends()["triton"]["available"]:
        pytest.skip(fastloss.backends()["triton"]["reason"])
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=DEVICE)
    filters = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    x2 = x.detach().clone().requires_grad_()
    out = fdl(x, y, filters, phase_weight=2.0, backend="triton")
    (out * 0.7).backward()
    ref = fdl(x2, y, filters, phase_weight=2.0, backend="reference")
    (ref * 0.7).backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
