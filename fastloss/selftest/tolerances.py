"""The selftest's tolerance table: the relative error (``harness.rel_error``, float64) a fast
backend may show against float64 ground truth computed on the CPU from the same (rounded) inputs,
per dtype. The acceptance run reads it from here, and so do the tests that compare a fast backend
with float64 truth by the same measure (``from fastloss.selftest.tolerances import TOL``)."""
import torch

# Relative error allowed against float64 ground truth from the same (rounded) inputs.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# D2SM's KL values are small sums of terms of both signs: float32's own rounding reaches ~1e-4.
D2SM_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# MDF in half runs its convolutions in half on the GPU: 5 layers of half rounding.
MDF_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
