"""PDL rows of one element (N == 1) on the Triton kernels, every dtype and both forward kernels
(issue 22). On a GPU, Triton passes N == 1 as the compile-time constant 1; ``_div_rn`` then took
``.to`` of a constexpr and the kernels did not compile (benchmarks/gpu_static.py now compiles that
specialisation). Here: the values of N == 1 against the C++ CPU op, bit for bit, under the
interpreter without a GPU and on the real kernels with one."""
import pytest
import torch

pytest.importorskip("triton")

from fastloss.kernels import pdl  # noqa: E402

if pdl._interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("triton kernels are compiled (TRITON_INTERPRET unset before import) and no GPU", allow_module_level=True)

DEVICE_AWARE = True  # runs on CUDA tensors in GPU mode (tests/conftest.py)


@pytest.mark.parametrize("gather", [False, True], ids=["sort", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("p", [1, 2])
def test_one_element_rows_match_the_cpu_op(monkeypatch, gather, dtype, p):
    torch_C = pytest.importorskip("fastloss._C")
    if gather:  # the torch.sort ordering and the gather kernel (float64 always takes it)
        monkeypatch.setattr(pdl, "TRITON_MAX_SORT_N", 0)
    elif dtype == torch.float64:
        pytest.skip("float64 rows always take the gather kernel")
    torch.manual_seed(7)
    x = torch.randn(3, 2, 1, device=DEVICE).to(dtype)
    y = torch.randn(3, 2, 1, device=DEVICE).to(dtype)
    y[0, 0, 0] = x[0, 0, 0]  # a zero difference: sign 0
    ours = pdl.pdl_forward(x, y, p, True)
    cpu = torch_C.pdl_forward(x.cpu(), y.cpu(), p, True)
    for a, b in zip(ours, cpu):
        assert torch.equal(a.cpu(), b)
    g = torch.rand(3, 2, device=DEVICE, dtype=ours[0].dtype) + 0.5
    ga = pdl.pdl_backward(g, *ours[1:], True, True, dtype)
    gb = torch_C.pdl_backward(g.cpu(), *cpu[1:], True, True, dtype)
    for a, b in zip(ga, gb):
        if dtype == torch.bfloat16 and DEVICE == "cpu":
            # Triton's interpreter casts float32 to bfloat16 toward zero (a GPU and the CPU op round
            # to nearest): one bfloat16 ulp apart at most
            torch.testing.assert_close(a.cpu(), b, rtol=2**-7, atol=0)
        else:
            assert torch.equal(a.cpu(), b)
