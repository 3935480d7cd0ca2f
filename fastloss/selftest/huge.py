"""The ``--huge`` cases: one tensor of more than 2^31 elements, on CUDA, so that the kernels' element
offsets must be 64-bit: PDL (B, C, N) = (1, 2, 2^30 + 7) in float16 (the segmented sort's second row
starts past 2^30, and its last element sits past 2^31), and D2SM over q = 46341 rows (its [q, q]
similarity matrices and gradient rows hold q^2 > 2^31 entries).

D2SM: every pred row is e_1 and the target's rows are e_1 (the first a) or e_2 (the rest), so every
similarity is 1/(1 + eps)^2 or 0 and the KL has a closed form (``d2sm_two_clusters``: four kinds of
terms per mode), computed on the CPU in float64; the pred rows' gradient is, by symmetry, the same
for every row of one target cluster (checked on the device), and finite.

PDL: ground truth on the CPU in float64 would cost minutes at this size, so the inputs are built with
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

import fastloss

from .harness import Case, poison
from .tolerances import D2SM_TOL, TOL

HUGE_N = 2**30 + 7
HUGE_Q = 46341  # q^2 = 2^31 + 4633
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
        gp, gt = torch.ops.fastloss.pdl_backward(g, perm, perm_t, deriv, True, True, dtype, False, backend)
        del perm, perm_t, deriv
        tol = TOL[dtype]
        chk.true(f"grad pred = {expect} everywhere (within {tol})", bool(((gp.float() - expect).abs() <= tol * expect).all()))
        chk.true(f"grad target = -{expect} everywhere (within {tol})",
                 bool(((gt.float() + expect).abs() <= tol * expect).all()))

    return Case(f"pdl huge N={n} p={p} B={b} C={c} ({b * c * n} elements in one tensor)", "pdl", dtype, run, applies)


def _huge_cases():
    return [_pdl_huge_case(1), _pdl_huge_case(2), _d2sm_huge_case("paper"), _d2sm_huge_case("pkt")]


def d2sm_two_clusters(q, a, mode, eps):
    """The D2SM KL (``d2sm_kl``, reduction "mean") of pred = q rows of e_1 against a target of a rows
    e_1 and q - a rows e_2, in float64 from the module docstring's formulas."""
    same = (1.0 / (1.0 + eps)) ** 2             # cosine of two normalized equal rows
    k_same, k_cross = (same + 1) / 2, 0.5       # kernel values
    total = 0.0
    for c, count in ((a, a), (q - a, q - a)):   # a row of a cluster of c rows; count such rows
        if mode == "pkt":
            r = c * k_same + (q - c) * k_cross  # target row sum over all j
            p = 1.0 / q                         # pred: every kernel value equal
            qs, qc = k_same / r, k_cross / r
            row = c * qs * math.log((qs + eps) / (p + eps)) + (q - c) * qc * math.log((qc + eps) / (p + eps))
        else:
            r = (c - 1) * k_same + (q - c) * k_cross  # j != i
            p = 1.0 / (q - 1)
            qs, qc = k_same / r, k_cross / r
            row = (c - 1) * p * math.log((p + eps) / (qs + eps)) + (q - c) * p * math.log((p + eps) / (qc + eps))
        total += count * row
    return total / (q * q if mode == "pkt" else q)


def _d2sm_huge_case(mode, q=HUGE_Q, dtype=torch.float32, backends_device_types=("cuda",)):
    a = q // 2
    eps = 1e-6
    tol = D2SM_TOL[dtype]

    def applies(backend, device):
        if device.type not in backends_device_types:
            return f"a case of {q * q} elements in one tensor runs on {'/'.join(backends_device_types)} only"
        return None

    def run(backend, device, chk):
        x = torch.zeros(q, 2, dtype=dtype, device=device)
        x[:, 0] = 1
        y = torch.zeros(q, 2, dtype=dtype, device=device)
        y[:a, 0] = 1
        y[a:, 1] = 1
        x.requires_grad_()
        poison(device)
        out = fastloss.d2sm_kl(x, y, mode=mode, eps=eps, backend=backend)
        out.backward()
        truth = torch.tensor(d2sm_two_clusters(q, a, mode, eps), dtype=torch.float64)
        chk.close("loss (closed form)", out, truth, tol)
        g = x.grad.double()
        chk.true("grad finite", bool(torch.isfinite(g).all()))
        scale = float(g.abs().max())
        for name, rows in (("first", g[:a]), ("second", g[a:])):
            spread = float((rows - rows.mean(0)).abs().max())
            chk.true(f"grad equal within the {name} target cluster (spread {spread:.2e} of {scale:.2e})",
                     spread <= tol * scale)

    return Case(f"d2sm_kl huge {mode} q={q} D=2 two target clusters ({q * q} similarities)", "d2sm", dtype, run,
                applies)
