"""Parity of every PDL backend with the plain-PyTorch reference, and its contract."""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import fastloss
from fastloss import _backend, _ext
from fastloss.pdl import pdl_reference
from fastloss.pdl.ops import _pdl_backward, _pdl_forward

from conftest import requires_cpu_ext
from helpers import (assert_compiled_matches_eager, assert_explicit_backend_cannot_run, pair_bad_inputs,
                     spy_on_resolve)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _inputs(shape, dtype=torch.float32, kind="randn", layout="contiguous"):
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3
    if kind == "ties":  # ReLU features: many exact zeros, and repeated values
        x, y = x.relu(), (y - 0.5).relu().round()
    x, y = x.to(dtype), y.to(dtype)
    if layout == "channels_last":
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # non-contiguous, and flatten(2) has to copy
        x, y = x.transpose(-1, -2), y.transpose(-1, -2)
    elif layout == "sliced":  # non-contiguous view with a channel stride gap
        x, y = x[:, ::2], y[:, ::2]
    return x, y


SHAPES = [
    ((2, 3, 1), "randn", "contiguous"),          # N = 1
    ((2, 4, 5, 7), "randn", "contiguous"),       # N = 35, not a power of two
    ((3, 1, 17), "randn", "contiguous"),         # C = 1
    ((2, 5, 9, 11), "ties", "contiguous"),       # ties
    ((2, 6, 6, 5), "randn", "channels_last"),
    ((3, 37, 5, 7), "ties", "channels_last"),    # channels_last across the backward's channel groups
    ((2, 3, 4, 6), "randn", "transposed"),
    ((2, 8, 3, 5), "ties", "sliced"),
    ((1, 2, 128, 128), "randn", "contiguous"),   # N = 128 x 128
    ((2, 3, 300), "randn", "contiguous"),        # long enough for the radix passes
]


def _check(backend, shape, kind, layout, dtype, p, reduction, target_grad):
    x, y = _inputs(shape, dtype, kind, layout)
    x1, y1 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_(target_grad)
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_(target_grad)
    out = fastloss.pdl(x1, y1, p=p, reduction=reduction, backend=backend)
    ref = pdl_reference(x2, y2, p=p, reduction=reduction)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.rand_like(ref) + 0.5  # an upstream gradient that is not 1
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)
    if target_grad:
        torch.testing.assert_close(y1.grad, y2.grad, rtol=tol, atol=tol)


@requires_cpu_ext
@pytest.mark.parametrize("shape,kind,layout", SHAPES, ids=[f"{s}-{k}-{l}" for s, k, l in SHAPES])
@pytest.mark.parametrize("p", [1, 2])
def test_cpu_parity_float32(shape, kind, layout, p):
    for reduction, target_grad in (("mean", False), ("none", True), ("sum", True)):
        _check("cpu", shape, kind, layout, torch.float32, p, reduction, target_grad)


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [1, 2])
def test_cpu_parity_dtypes(dtype, p):
    for shape, kind, layout in SHAPES[:8]:
        _check("cpu", shape, kind, layout, dtype, p, "none", True)


@requires_cpu_ext
def test_cpu_permutation_is_stable_argsort_with_ties():
    x = torch.tensor([[[0.0, -0.0, 2.0, 0.0, -1.0, 2.0, float("inf"), -float("inf")]]])
    y = torch.randn_like(x)
    _, perm, _, sign = _pdl_forward(x, y, 1, False, "cpu")
    assert perm.dtype == torch.int32 and sign.dtype == torch.int8
    assert torch.equal(perm.long(), torch.sort(x, dim=-1, stable=True).indices)


def _zero_heavy_rows(n, dtype):
    """Rows that exercise the CPU sort's zero split: +0 and -0 among negatives and positives,
    all-zero, all -0, no zeros, only negatives and zeros, repeated non-zero values."""
    g = torch.Generator().manual_seed(n)
    pick = torch.tensor([-2.0, -1.0, -0.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    rows = [
        pick[torch.randint(0, len(pick), (n,), generator=g)],
        torch.where(torch.rand(n, generator=g) < 0.6, 0.0, torch.randn(n, generator=g, dtype=torch.float64)),
        torch.zeros(n, dtype=torch.float64),
        torch.full((n,), -0.0, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64),
        -torch.rand(n, generator=g, dtype=torch.float64).round(),
    ]
    return torch.stack(rows)[None].to(dtype)


@requires_cpu_ext
@pytest.mark.parametrize("n", [97, 257, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_zero_split_matches_stable_sort_and_reference(n, dtype):
    x = _zero_heavy_rows(n, dtype)
    y = _zero_heavy_rows(n + 1, dtype)[:, :, :n].flip(1)
    _, perm, perm_t, _ = _pdl_forward(x, y, 1, True, "cpu")
    assert torch.equal(perm.long(), torch.sort(x, dim=-1, stable=True).indices)
    assert torch.equal(perm_t.long(), torch.sort(y, dim=-1, stable=True).indices)
    for p in (1, 2):
        for target_grad in (False, True):
            x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_(target_grad)
            x2, y2 = x.clone().requires_grad_(), y.clone().requires_grad_(target_grad)
            out = fastloss.pdl(x1, y1, p=p, reduction="none", backend="cpu")
            ref = pdl_reference(x2, y2, p=p, reduction="none")
            torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
            out.backward(torch.full_like(out, 0.7))
            ref.backward(torch.full_like(ref, 0.7))
            torch.testing.assert_close(x1.grad, x2.grad, rtol=TOL[dtype], atol=TOL[dtype])
            if target_grad:
                torch.testing.assert_close(y1.grad, y2.grad, rtol=TOL[dtype], atol=TOL[dtype])


def _range_rows(n, dtype):
    """Rows whose spans of key bits differ, for the CPU sort's range-adaptive digits: a narrow
    band (one or two short digits), one repeated value among zeros (nothing to sort), values a
    few ulps apart, a full-range row with infinities, NaNs, denormals and huge values (every bit
    of the key), ReLU'd Gaussians (the usual case), 100 and 10 non-zero values among zeros (over
    and under the comparison-sort cutoff), a narrow band with huge values (the top-bits order
    leaves one long run: the insertion finish gives up and the full passes run), quantized
    values (long runs of equal keys), and signed values with zeros (each sign sorted apart)."""
    g = torch.Generator().manual_seed(n + 7)
    f = torch.float64
    tiny = torch.finfo(dtype).tiny
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), tiny / 4, -tiny / 8, 1e30, -1e30, 0.0, -0.0],
                           dtype=f)
    full = torch.randn(n, generator=g, dtype=f) * 10.0 ** torch.randint(-30, 30, (n,), generator=g)
    full[torch.randperm(n, generator=g)[:len(special)]] = special[:min(n, len(special))]
    one = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, 3.25)
    ulps = 1.0 + torch.randint(0, 5, (n,), generator=g).to(f) * torch.finfo(dtype).eps
    sparse = torch.zeros(n, dtype=f)
    sparse[torch.randperm(n, generator=g)[:min(n, 100)]] = torch.randn(min(n, 100), generator=g, dtype=f)
    few = torch.zeros(n, dtype=f)
    few[torch.randperm(n, generator=g)[:min(n, 10)]] = torch.randn(min(n, 10), generator=g, dtype=f)
    # a narrow band and huge values: the coarse top-bits order leaves the band in one long run
    bimodal = torch.where(torch.rand(n, generator=g) < 0.5, 1e30, 1.0 + 1e-3 * torch.rand(n, generator=g, dtype=f))
    quantized = (torch.randn(n, generator=g, dtype=f) * 4).round().relu() / 4  # many equal non-zero values
    signed = torch.randn(n, generator=g, dtype=f) * (torch.rand(n, generator=g) < 0.7)  # both signs and zeros
    rows = [1.0 + 1e-3 * torch.rand(n, generator=g, dtype=f), one, ulps, full,
            torch.randn(n, generator=g, dtype=f).relu(), sparse, few, bimodal, quantized, signed]
    return torch.stack(rows)[None].to(dtype)


@requires_cpu_ext
@pytest.mark.parametrize("n", [97, 300, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_sort_digits_adapt_to_the_row_range(n, dtype):
    """The permutation is torch's stable argsort on every kind of row, and the loss and its
    gradient match the reference where they are finite (the NaN row gives NaN)."""
    x = _range_rows(n, dtype)
    y = _range_rows(n + 1, dtype)[:, :, 1:]  # row kinds paired: the NaN rows meet
    _, perm, perm_t, _ = _pdl_forward(x, y, 1, True, "cpu")
    assert torch.equal(perm.long(), torch.sort(x, dim=-1, stable=True).indices)
    assert torch.equal(perm_t.long(), torch.sort(y, dim=-1, stable=True).indices)
    out = fastloss.pdl(x, y, reduction="none", backend="cpu")
    ref = pdl_reference(x, y, reduction="none")
    assert torch.isnan(out).all() and torch.isnan(ref).all()  # the full-range row holds a NaN
    keep = [0, 1, 2, 4, 5, 6, 7, 8, 9]  # every row but the full-range one
    xs, ys = x[:, keep].clone().requires_grad_(), y[:, keep]
    xr = xs.detach().clone().requires_grad_()
    out = fastloss.pdl(xs, ys, reduction="none", backend="cpu")
    ref = pdl_reference(xr, ys, reduction="none")
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    out.backward(torch.full_like(out, -1.3))
    ref.backward(torch.full_like(ref, -1.3))
    torch.testing.assert_close(xs.grad, xr.grad, rtol=TOL[dtype], atol=TOL[dtype])


def _cpu_isa_rows(n, dtype):
    """Every kind of row the sort distinguishes, plus plain and ReLU'd Gaussians."""
    g = torch.Generator().manual_seed(1000 + n)
    plain = torch.randn(1, 2, n, generator=g, dtype=torch.float64).to(dtype)
    return torch.cat([_zero_heavy_rows(n, dtype), _range_rows(n, dtype), plain, plain.relu()], dim=1)


def _cpu_has_avx2_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return {"avx2", "bmi2", "popcnt"} <= set(flags)


@requires_cpu_ext
def test_cpu_isa_default_is_avx2_where_built_and_supported():
    """The AVX2 build runs by default on an x86-64 GCC build whose CPU has AVX2, BMI2 and POPCNT;
    FASTLOSS_CPU_ISA=baseline forces the baseline, and backends() names the one that runs."""
    C = _ext.load("_C")[0]
    has = _cpu_has_avx2_flags()
    built = sys.platform.startswith("linux") and os.uname().machine == "x86_64" and C.compiler.startswith("gcc")
    expected = "avx2" if built and has else "baseline"
    if os.environ.get("FASTLOSS_CPU_ISA") != "baseline":
        assert C.cpu_isa() == expected
    assert f"PDL sort kernels: {C.cpu_isa()}" in fastloss.backends()["cpu"]["reason"]
    code = "from fastloss import _ext; print(_ext.load('_C')[0].cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FASTLOSS_CPU_ISA": "baseline"})
    assert out.stdout.strip() == "baseline"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FASTLOSS_CPU_ISA": "avx512"})
    assert out.stdout.strip() == expected and "FASTLOSS_CPU_ISA='avx512' is neither" in out.stderr
    with pytest.raises(RuntimeError, match="isa must be 'baseline' or 'avx2'"):
        C.set_cpu_isa("sse9")


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_isa_builds_give_the_same_bits(dtype):
    """The AVX2 build (vectorised key and zero-split steps) and the baseline build return the
    same loss, permutations and per-rank factors, bit for bit, on every kind of row: lengths
    around the 8-wide steps, contiguous and strided rows, p = 1 and 2, with and without the
    target's gradient."""
    C = _ext.load("_C")[0]
    before = C.cpu_isa()
    try:
        C.set_cpu_isa("avx2")
    except RuntimeError:
        pytest.skip("this build or CPU has no AVX2 kernels")
    try:
        for n in (1, 7, 8, 9, 23, 25, 33, 97, 300, 1031):
            x = _cpu_isa_rows(n, dtype)
            y = _cpu_isa_rows(n + 3, dtype)[:, :, 2:n + 2].flip(1)
            for xs, ys in ((x, y), (x.transpose(1, 2).contiguous().transpose(1, 2), y)):  # strided pred rows
                for p in (1, 2):
                    for target_grad in (False, True):
                        got = {}
                        for isa in ("baseline", "avx2"):
                            C.set_cpu_isa(isa)
                            got[isa] = _pdl_forward(xs, ys, p, target_grad, "cpu")
                        for a, b in zip(got["baseline"], got["avx2"]):
                            assert a.dtype == b.dtype and a.shape == b.shape
                            assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                               b.view(torch.uint8) if b.is_floating_point() else b), (n, p, target_grad)
    finally:
        C.set_cpu_isa(before)


@requires_cpu_ext
def test_cpu_avx2_code_stays_in_its_own_symbols():
    """No function of the extension outside the AVX2 build's namespace (and the target_clones
    variants that an ifunc picks at load) holds AVX (ymm) instructions: the baseline path can
    never call AVX2 code that the linker merged in."""
    objdump = shutil.which("objdump")
    if objdump is None or os.uname().machine != "x86_64":
        pytest.skip("needs objdump on x86-64")
    C = _ext.load("_C")[0]
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", C.__file__], capture_output=True, text=True,
                         check=True).stdout
    offenders, name = set(), None
    for line in out.splitlines():
        if line.endswith(">:") and " <" in line:
            name = line.split(" <", 1)[1][:-2]
        elif "%ymm" in line and name is not None:
            allowed = ("fastloss::avx2::" in name or "pdl_rows_avx2" in name
                           or any(c in name for c in ("[clone .arch_x86_64", "[clone .avx2]")))
            if not allowed:
                offenders.add(name)
    assert not offenders, sorted(offenders)[:5]
    if C.cpu_isa() == "avx2":
        assert "fastloss::avx2::" in out


@requires_cpu_ext
def test_cpu_saves_int32_permutation_and_one_small_value_per_element():
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = torch.randn(2, 3, 40)
    for p, per_rank in ((1, torch.int8), (2, torch.float32)):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fastloss.pdl(x, y, p=p, backend="cpu")
        big = sorted((t.dtype for t in saved if t.numel() == x.numel()), key=str)
        assert big == sorted([torch.int32, per_rank], key=str), big
        assert not any(t.dtype == torch.int64 and t.numel() >= x.numel() for t in saved)


@requires_cpu_ext
def test_cpu_gradcheck_float64():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    for p in (1, 2):
        assert torch.autograd.gradcheck(lambda a, b: fastloss.pdl(a, b, p=p, reduction="none", backend="cpu"),
                                        (x, y), eps=1e-6, atol=1e-6)


@requires_cpu_ext
def test_opcheck():
    for p, tg in ((1, False), (2, True)):
        x = torch.randn(2, 3, 7, requires_grad=True)
        y = torch.randn(2, 3, 7, requires_grad=tg)
        torch.library.opcheck(_pdl_forward, (x, y, p, tg, "cpu"))


@requires_cpu_ext
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_has_the_layout_of_the_features(backend, dtype):
    """A channels_last feature map gets a channels_last gradient (so that it meets the backbone's
    channels_last gradients without a relayout in every op), a contiguous one a contiguous one;
    the values are the reference's either way."""
    if backend == "triton" and _backend.why_not("triton", torch.device("cpu"), dtype) is not None:
        pytest.skip(_backend.why_not("triton", torch.device("cpu"), dtype))
    for layout in ("channels_last", "contiguous"):
        x, y = _inputs((2, 19, 3, 5), dtype, "ties", layout)
        x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_()
        x2, y2 = x.clone().requires_grad_(), y.clone().requires_grad_()
        g = torch.rand(2, dtype=dtype) + 0.5
        fastloss.pdl(x1, y1, reduction="none", backend=backend).backward(g)
        pdl_reference(x2, y2, reduction="none").backward(g)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for got, want in ((x1.grad, x2.grad), (y1.grad, y2.grad)):
            assert got.is_contiguous(memory_format=fmt), (layout, got.stride())
            torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@requires_cpu_ext
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "channels_last"), (torch.bfloat16, "contiguous"),
                                          (torch.float16, "channels_last")])
def test_cpu_long_rows_copied_in_smaller_groups(dtype, layout):
    """N = 131407 > 2**17: the cpu kernel copies 7 rows a task, not 8 (a group of 7 and one of 3)."""
    _check("cpu", (1, 10, 331, 397), "ties", layout, dtype, 1, "none", True)


@requires_cpu_ext
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "transposed"])
def test_cpu_bfloat16_rows_equal_their_float32_upcast(layout):
    """bfloat16 rows run the float32 kernels on exact copies: the same loss bits as the upcast
    input, and the same gradient as the upcast's rounded to bfloat16."""
    x, y = _inputs((2, 11, 6, 7), torch.bfloat16, "ties", layout)
    xb, xf = x.clone().requires_grad_(), x.float().requires_grad_()
    lb = fastloss.pdl(xb, y, reduction="none", backend="cpu", p=1)
    lf = fastloss.pdl(xf, y.float(), reduction="none", backend="cpu", p=1)
    assert torch.equal(lb, lf.to(torch.bfloat16))
    g = (torch.rand(2) + 0.5).to(torch.bfloat16).float()  # exact in bfloat16, lb's dtype
    lb.float().backward(g)
    lf.backward(g)
    assert torch.equal(xb.grad, xf.grad.to(torch.bfloat16))


@requires_cpu_ext
def test_backward_opcheck_both_layouts():
    x, y = _inputs((2, 5, 3, 4), torch.float32, "randn", "channels_last")
    for inner in (True, False):
        a, b = (x, y) if inner else (x.contiguous(), y.contiguous())
        _, perm, perm_t, deriv = _pdl_forward(a.flatten(2), b.flatten(2), 1, True, "cpu")
        torch.library.opcheck(_pdl_backward, (torch.rand(2, 5), perm, perm_t, deriv, True, True, torch.float32,
                                              inner, "cpu"))
        gp, gt = _pdl_backward(torch.rand(2, 5), perm, perm_t, deriv, True, True, torch.float32, inner, "cpu")
        assert gp.stride() == gt.stride() == ((60, 1, 5) if inner else (60, 12, 1))  # C = 5, N = 12


@requires_cpu_ext
def test_torch_compile_fullgraph_matches_eager():
    def step(a, b):
        return fastloss.pdl(a.relu(), b, p=1) * 2.0

    x = torch.randn(2, 3, 6, 5)
    y = torch.randn(2, 3, 6, 5)
    assert_compiled_matches_eager(step, x, y)


@requires_cpu_ext
def test_double_backward_raises_clear_error():
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = torch.randn(2, 3, 8)
    loss = fastloss.pdl(x, y, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@requires_cpu_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_finite_input_gives_non_finite_loss(backend):
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 3, 10)
        y = torch.randn(2, 3, 10)
        x[1, 2, 3] = bad
        out = fastloss.pdl(x, y, reduction="none", backend=backend)
        assert torch.isfinite(out[0]) and not torch.isfinite(out[1])
        y[1, 2, 4] = bad  # the same non-finite value on both sides must not cancel to a finite number
        assert not torch.isfinite(fastloss.pdl(x, y, backend=backend))


# ------------------------------------------------------------------------- bad input
_x = torch.randn(2, 3, 4, 4)
BAD = [
    ((_x, torch.randn(2, 3, 4, 5)), {}, ValueError, r"shapes differ: \(2, 3, 4, 4\) vs \(2, 3, 4, 5\)"),
    ((torch.randn(2, 3), torch.randn(2, 3)), {}, ValueError, "at least 3 dims"),
    ((_x, _x.bool()), {}, TypeError, "target must be a floating-point"),
    ((torch.randn(0, 3, 4), torch.randn(0, 3, 4)), {}, ValueError, "empty"),
    ((_x, _x), {"p": 3}, ValueError, "p must be 1 or 2, got 3"),
    ((_x, _x), {"p": True}, ValueError, "p must be 1 or 2"),
    ((_x, _x), {"reduction": "max"}, ValueError, "reduction must be one of .* got 'max'"),
] + pair_bad_inputs(_x)  # and what every op refuses alike


@pytest.mark.parametrize("args,kwargs,exc,match", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_input_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastloss.pdl(*args, **kwargs)


def test_explicit_backend_that_cannot_run_says_why():
    assert_explicit_backend_cannot_run(fastloss.pdl, _x)


# ------------------------------------------------------------------------- dispatch
@requires_cpu_ext
def test_auto_picks_cpu_and_scopes_override(monkeypatch):
    calls = spy_on_resolve(monkeypatch)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    fastloss.pdl(_x, _x)
    with fastloss.use_backend("reference"):
        fastloss.pdl(_x, _x)
        fastloss.pdl(_x, _x, backend="cpu")  # an explicit keyword wins over the scope
    monkeypatch.setenv("FASTLOSS_BACKEND", "reference")
    fastloss.pdl(_x, _x)
    assert calls == ["cpu", "reference", "cpu", "reference"]
    monkeypatch.setenv("FASTLOSS_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTLOSS_BACKEND: unknown backend 'nope'"):
        fastloss.pdl(_x, _x)
    with pytest.raises(ValueError, match="unknown backend"):
        with fastloss.use_backend("fast"):
            pass


def test_auto_falls_back_to_reference_and_warns_once(monkeypatch):
    monkeypatch.setitem(_ext._cache, "_C", (None, "fastloss._C is not built (simulated)"))
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("FASTLOSS_REQUIRE_EXT", raising=False)
    monkeypatch.delenv("FASTLOSS_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="falling back to backend 'reference'.*simulated"):
        out = fastloss.pdl(_x, _x * 2)
    torch.testing.assert_close(out, pdl_reference(_x, _x * 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastloss.pdl(_x, _x * 2)  # warned once only
    with pytest.raises(fastloss.BackendError, match="not built"):
        fastloss.pdl(_x, _x, backend="cpu")
    monkeypatch.setenv("FASTLOSS_REQUIRE_EXT", "1")
    with pytest.raises(fastloss.BackendError, match="FASTLOSS_REQUIRE_EXT=1"):
        fastloss.pdl(_x, _x)


def test_backends_report_every_backend():
    info = fastloss.backends()
    assert set(info) == {"reference", "cpu", "triton", "cuda"}
    assert info["reference"]["available"] is True
    for v in info.values():
        assert isinstance(v["available"], bool) and v["reason"]


def test_require_ext_means_cpu_extension_is_used():
    # CI runs with FASTLOSS_REQUIRE_EXT=1: prove that auto really takes the C++ path there.
    if os.environ.get("FASTLOSS_REQUIRE_EXT", "0") != "1":
        pytest.skip("FASTLOSS_REQUIRE_EXT is not set")
    assert _backend.resolve("pdl", "auto", torch.device("cpu"), torch.float32) == "cpu"


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "fastloss.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "reference", "cpu", "cuda"):
        assert word in out.stdout
