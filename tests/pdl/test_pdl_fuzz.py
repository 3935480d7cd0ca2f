"""Property-based parity of every PDL backend with the reference (issue: robustness).

Hypothesis draws shapes, strides, memory formats, dtypes, value ranges (ties, huge and tiny
magnitudes, all-equal rows, denormals), p, reduction and upstream gradients. The CI budget is
fixed and derandomized; `pytest -m slow tests/pdl/test_pdl_fuzz.py` runs a much larger one.
A failing draw becomes a plain regression test at the bottom of this file.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastloss
from fastloss import _backend
from fastloss.pdl import pdl_reference

from conftest import requires_cpu_ext

TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TINY = {torch.float64: 1e-300, torch.float32: 1e-43, torch.float16: 1e-7, torch.bfloat16: 1e-38}
CI = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def cases(draw, max_n=300):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    nsp = draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 9)) for _ in range(nsp)]
    while torch.tensor(spatial).prod().item() > max_n:
        spatial[spatial.index(max(spatial))] //= 2
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), *spatial)
    layouts = ["contiguous", "sliced"] + (["channels_last"] if nsp == 2 else []) + (["transposed"] if nsp >= 2 else [])
    values = ["normal", "ties", "huge", "tiny", "all_equal", "denormal"]
    if dtype == torch.float16:
        values.remove("huge")
    return dict(dtype=dtype, shape=shape, layout=draw(st.sampled_from(layouts)), values=draw(st.sampled_from(values)),
                p=draw(st.sampled_from([1, 2])), reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                target_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def make(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    full = (shape[0], shape[1] * 2, *shape[2:]) if case["layout"] == "sliced" else shape
    x = torch.randn(full, generator=g, dtype=torch.float64)
    y = torch.randn(full, generator=g, dtype=torch.float64) + 0.25
    kind = case["values"]
    if kind == "ties":
        x, y = (x * 2).round().relu(), (y * 2).round().relu()
    elif kind == "huge":
        x, y = x * 1e30, y * 1e30
    elif kind == "tiny":
        x, y = x * 1e-30, y * 1e-30
    elif kind == "all_equal":
        x = torch.full_like(x, 0.5)
    elif kind == "denormal":
        scale = {torch.float64: 1e-310, torch.float32: 1e-40, torch.float16: 1e-6, torch.bfloat16: 1e-40}[dtype]
        x, y = x * scale, y * scale
    x, y = x.to(dtype), y.to(dtype)
    if case["layout"] == "sliced":
        x, y = x[:, ::2], y[:, ::2]
    elif case["layout"] == "channels_last":
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    elif case["layout"] == "transposed":
        x, y = x.transpose(-1, -2), y.transpose(-1, -2)
    return x, y


def close(a, b, dtype, what):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), f"{what}: non-finite entries differ"
    assert torch.equal(a[~finite], b[~finite]), f"{what}: non-finite values differ"
    if finite.any():
        scale = b[finite].abs().max().item()
        torch.testing.assert_close(a[finite], b[finite], rtol=TOL[dtype], atol=TOL[dtype] * scale + TINY[dtype],
                                   msg=lambda m: f"{what}: {m}")


def check(case, backend):
    x, y = make(case)
    x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_(case["target_grad"])
    x2, y2 = x.clone().requires_grad_(), y.clone().requires_grad_(case["target_grad"])
    out = fastloss.pdl(x1, y1, p=case["p"], reduction=case["reduction"], backend=backend)
    ref = pdl_reference(x2, y2, p=case["p"], reduction=case["reduction"])
    assert out.dtype == ref.dtype and out.shape == ref.shape
    close(out, ref, case["dtype"], "value")
    g = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ref.dtype) + 0.5
    out.backward(g)
    ref.backward(g)
    close(x1.grad, x2.grad, case["dtype"], "pred grad")
    if case["target_grad"]:
        close(y1.grad, y2.grad, case["dtype"], "target grad")


@requires_cpu_ext
@CI
@given(cases())
def test_fuzz_cpu(case):
    check(case, "cpu")


@pytest.mark.skipif(not _backend.status("triton")[0], reason="triton unavailable (needs TRITON_INTERPRET=1 on CPU)")
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cases(max_n=12))
def test_fuzz_triton_interpreter(case):
    check(case, "triton")


@pytest.mark.slow
@requires_cpu_ext
@SLOW
@given(cases(max_n=5000))
def test_fuzz_cpu_slow(case):
    check(case, "cpu")
