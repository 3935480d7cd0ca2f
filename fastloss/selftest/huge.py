"""The ``--huge`` cases: one PDL tensor of more than 2^31 elements (B, C, N) = (1, 2, 2^30 + 7) in
float16, on CUDA, so that the kernels' element offsets must be 64-bit (the segmented sort's second
row starts past 2^30, and its last element sits past 2^31).

Ground truth on the CPU in float64 would cost minutes at this size, so the inputs are built with
their sorted rows known by construction: row k of x holds the integers s_k(i) = base_k +
floor(i * 2047 / N) (exact in float16; nondecreasing in i), at positions given by the permutation
j -> (a j + shift) mod N with gcd(a, N) = 1; y holds s_k - 1 in another such order. Whatever the
ties, sorted x minus sorted y is exactly 1 at every rank, so W = 1 for p = 1 and 2, ``deriv`` is
sign(1) = 1 (p = 1) or 2 (p = 2) at every rank, and the backward with an upstream gradient of N
gives every element of pred the gradient deriv and of the target -deriv: every element written
once, through the saved permutations. The rows of x use disjoint value ranges (base_0 = 1, base_1 =
-2047), so an offset that wraps to another row's data changes W. The construction is exact
integer arithmetic; its checks compare with those constants, on the device (moving 2^31 elements
to the host would cost more than the case)."""
import math

import torch

from .harness import Case, poison
from .tolerances import TOL

HUGE_N = 2**30 + 7
HUGE_ROWS = (1, 2)
_CHUNK = 1 << 24
_BASES = (1, -2047)  # row k's smallest value in x; x and y span [base - 1, base + 2047], exact in float16


def _multiplier(n, start):
    """The first a >= start with gcd(a, n) = 1 (then j -> a j mod n is a permutation of [0, n))."""
    a = start
    while math.gcd(a, n) != 1:
        a += 1
    return a


def constructed(b, c, n, dtype, device):
    """(x, y) [B, C, N] with sort(x) - sort(y) = 1 at every rank of every row (module docstring)."""
    x = torch.empty((b, c, n), dtype=dtype, device=device)
    y = torch.empty((b, c, n), dtype=dtype, device=device)
    rows = b * c
    for r in range(rows):
        base = _BASES[r % len(_BASES)]
        for out, a, shift, minus in ((x, _multiplier(n, 1_000_003), 17 * r, 0), (y, _multiplier(n, 2_000_029), 5, 1)):
            row = out.view(rows, n)[r]
            for start in range(0, n, _CHUNK):
                j = torch.arange(start, min(start + _CHUNK, n), dtype=torch.int64, device=device)
                rank = (a * j + shift) % n
                row[start:start + j.numel()] = (base - minus + (rank * 2047) // n).to(dtype)
    return x, y


def _pdl_huge_case(p, n=HUGE_N, rows=HUGE_ROWS, dtype=torch.float16, backends_device_types=("cuda",)):
    b, c = rows
    acc_tol = TOL[torch.float32]

    def applies(backend, device):
        if device.type not in backends_device_types:
            return f"a case of {b * c * n} elements in one tensor runs on {'/'.join(backends_device_types)} only"
        return None

    def run(backend, device, chk):
        x, y = constructed(b, c, n, dtype, device)
        poison(device)
        w, perm, perm_t, deriv = torch.ops.fastloss.pdl_forward(x, y, p, True, backend)
        del x, y
        chk.close("w (1 by construction)", w, torch.ones(b, c, dtype=torch.float64), acc_tol)
        expect = 1 if p == 1 else 2  # sign(1), or 2 d
        chk.true(f"deriv = {expect} at every rank", bool((deriv == expect).all()))
        poison(device)
        g = torch.full((b, c), float(n), dtype=w.dtype, device=device)  # g / N = 1
        gp, gt = torch.ops.fastloss.pdl_backward(g, perm, perm_t, deriv, True, True, dtype, backend)
        del perm, perm_t, deriv
        tol = TOL[dtype]
        chk.true(f"grad pred = {expect} everywhere (within {tol})", bool(((gp.float() - expect).abs() <= tol * expect).all()))
        chk.true(f"grad target = -{expect} everywhere (within {tol})",
                 bool(((gt.float() + expect).abs() <= tol * expect).all()))

    return Case(f"pdl huge N={n} p={p} B={b} C={c} ({b * c * n} elements in one tensor)", "pdl", dtype, run, applies)


def _huge_cases():
    return [_pdl_huge_case(1), _pdl_huge_case(2)]
