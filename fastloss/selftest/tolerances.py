"""The selftest's tolerance table: the relative error (``harness.rel_error``, computed in float64) a
fast backend may show against float64 ground truth computed on the CPU from the same (rounded)
inputs, per dtype. The acceptance run reads it from here, and so do the tests that compare a fast
backend with float64 truth by the same measure (``from fastloss.selftest.tolerances import TOL``).

Because the truth starts from the inputs already rounded to the dtype, only what a backend rounds
on the way counts. TF32 is off for the run, so no TF32 matmul or convolution error is allowed for.
"worst on cpu" is the largest error the ``cpu`` backend showed in ``--full`` when the table was
written down (the CPU backend does not run MDF in half); the GPU backends are held to the same
numbers.
"""
import torch

# Relative error allowed against float64 ground truth from the same (rounded) inputs.
# PDL: row sorts, differences of the sorted rows, means over rows of up to 50176 entries.
TOL = {
    # float64 unit roundoff is 1.1e-16; sums over up to 50176 entries in another order than the
    # truth's stay near 1e-15 (worst on cpu 8e-16). 1e-9 is far above that and far below float32's
    # roundoff (6e-8), so a float64 path that does any step in float32 fails (tests/common/test_selftest.py
    # puts a 1e-7 error into D2SM's float64 result and expects the run to fail).
    torch.float64: 1e-9,
    # float32 unit roundoff is 6e-8; row means of up to 50176 terms accumulate it in an order the
    # truth does not share (a GPU's block and atomic reductions); 1e-4 leaves that room and stays
    # below one float16 rounding (4.9e-4). Worst on cpu 8e-8.
    torch.float32: 1e-4,
    # float16 unit roundoff is 4.9e-4. The ops accumulate in float32 and round the result to
    # float16; the gradient also starts from an upstream gradient rounded to float16. 1e-2 is ~20
    # roundings, room for a backend's intermediate roundings. Worst on cpu 9e-4.
    torch.float16: 1e-2,
    # bfloat16 unit roundoff is 3.9e-3 (8-bit mantissa), the same steps as float16: 3e-2 is ~8
    # roundings. Worst on cpu 3.4e-3.
    torch.bfloat16: 3e-2,
}
# D2SM's KL values are small sums of terms of both signs: float32's own rounding reaches ~1e-4.
D2SM_TOL = {
    # as for PDL (worst on cpu 2e-14): a float32 step in a float64 path fails.
    torch.float64: 1e-9,
    # the KLs are O(1e-3) and smaller, sums of O(1) log terms of both signs: the cancellation
    # magnifies float32 rounding to ~1e-4 relative when they are computed in float32 (as the
    # float32 reference does; tests/d2sm/test_d2sm_fuzz.py). 1e-3 is ten times that; the fast backends
    # form their sums and log arguments in float64 (worst on cpu 1.6e-6).
    torch.float32: 1e-3,
    # half inputs are computed in float32 and only the result is rounded to the input dtype: as
    # for PDL, ~20 float16 roundings (worst on cpu 3.8e-4) ...
    torch.float16: 1e-2,
    # ... and ~8 bfloat16 roundings (worst on cpu 3e-3).
    torch.bfloat16: 3e-2,
}
# MDF in half runs its convolutions in half on the GPU: 5 layers of half rounding.
MDF_TOL = {
    # as for PDL (worst on cpu 7e-15): a float32 step in a float64 path fails.
    torch.float64: 1e-9,
    # five float32 convolution layers per discriminator, TF32 off, and the loss a sum of squared
    # feature differences; the gradients are compared in norm (a pre-activation within rounding of
    # 0 may take the other LeakyReLU branch). Worst on cpu 6e-6.
    torch.float32: 1e-4,
    # the convolutions run in float16 on the GPU, each of the 5 layers rounding its output: twice
    # PDL's float16 allowance.
    torch.float16: 2e-2,
    # likewise twice PDL's bfloat16 allowance.
    torch.bfloat16: 6e-2,
}
# FDL (float32 and float64 only: half features are computed in float32): an FFT, 5 x 5 projection
# convolutions (TF32 off) and PDL's sorts and means; the gradient in norm (a projected difference
# within rounding of 0 may take the other sign).
FDL_TOL = {
    # as for PDL: a float32 step in a float64 path fails.
    torch.float64: 1e-9,
    # the FFT and a convolution of up to 64 x 25 terms per projected value before PDL's sums; a
    # phase within rounding of -pi may come out as +pi (docs/fdl.md): 1e-4, as for PDL.
    torch.float32: 1e-4,
}
# Each loss's table, for the cases that are not tied to one loss's module (the whole-step cases).
BY_LOSS = {"pdl": TOL, "d2sm": D2SM_TOL, "mdf": MDF_TOL, "fdl": FDL_TOL}
