"""PDL's Triton kernels, run on CPU tensors under TRITON_INTERPRET=1 at tiny sizes (the
interpreter is slow), against the plain-PyTorch formula."""
import pytest
import torch

from helpers import triton_kernels

pdl, DEVICE = triton_kernels("pdl")  # CPU tensors under the interpreter, CUDA ones in GPU mode
DEVICE_AWARE = True  # runs on CUDA tensors in GPU mode (tests/conftest.py)

ACC = {torch.float32: torch.float32, torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float64: torch.float64}
# (rtol, atol) of w and of the gradients, per input dtype
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-14),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1e-2, 1e-5),
}


def reference(x, y, p):
    """Plain PyTorch: W = mean_i |sort(x)_i - sort(y)_i|^p per row, and the stable argsorts."""
    acc = ACC[x.dtype]
    xs = x.to(acc).sort(dim=-1, stable=True)
    ys = y.to(acc).sort(dim=-1, stable=True)
    d = xs.values - ys.values  # [B, C, N] in rank order
    return d.abs().pow(p).mean(-1), xs.indices, ys.indices, d


def check(x, y, p, target_grad, g=None):
    """Runs the Triton forward + backward on (possibly strided) x, y and compares with reference()."""
    B, C, N = x.shape
    acc = ACC[x.dtype]
    rtol, atol = TOL[x.dtype]
    w, perm, perm_t, deriv = pdl.pdl_forward(x, y, p, target_grad)

    xr = x.detach().clone().requires_grad_()
    yr = y.detach().clone().requires_grad_()
    w_ref, ip, it, d = reference(xr, yr, p)

    assert w.shape == (B, C) and w.dtype == acc
    assert perm.shape == (B, C, N) and perm.dtype == torch.int32
    assert perm_t.dtype == torch.int32 and perm_t.shape == ((B, C, N) if target_grad else (0, C, N))
    assert deriv.shape == (B, C, N) and deriv.dtype == (torch.int8 if p == 1 else acc)
    torch.testing.assert_close(w, w_ref.detach(), rtol=rtol, atol=atol)
    assert torch.equal(perm.long(), ip)
    if target_grad:
        assert torch.equal(perm_t.long(), it)
    if p == 1:
        assert torch.equal(deriv, torch.sign(d.detach()).to(torch.int8))
    else:
        torch.testing.assert_close(deriv, 2 * d.detach(), rtol=rtol, atol=atol)

    if g is None:  # a random upstream gradient, not 1, and non-contiguous
        g = (torch.rand(C, B, dtype=acc, device=x.device) + 0.5).t()
    (w_ref * g).sum().backward()
    gp, gt = pdl.pdl_backward(g, perm, perm_t, deriv, True, target_grad, x.dtype)
    assert gp.dtype == x.dtype and gp.is_contiguous()
    torch.testing.assert_close(gp, xr.grad, rtol=rtol, atol=atol)
    if target_grad:
        assert gt.dtype == x.dtype and gt.is_contiguous()
        torch.testing.assert_close(gt, yr.grad, rtol=rtol, atol=atol)
    else:
        assert gt is None
    return w, perm, perm_t, deriv


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("shape", [(2, 3, 1), (2, 3, 5), (1, 2, 16), (3, 1, 5)], ids=str)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("target_grad", [False, True])
def test_matches_reference(shape, p, target_grad):
    torch.manual_seed(hash((shape, p, target_grad)) % 1000)
    check(randn(*shape), randn(*shape), p, target_grad)


@pytest.mark.parametrize("p", [1, 2])
def test_ties_and_signed_zeros(p):
    torch.manual_seed(1)
    x = randn(2, 2, 16)
    y = randn(2, 2, 16)
    x[..., ::2] = 0.0
    x[..., 1::4] = -0.0  # equal to +0.0: ties keep their original order
    x[1, 0, :] = 1.5  # a whole row of one value
    y[..., 3:11] = 0.0
    y[0, 1, ::3] = -0.0
    check(x, y, p, target_grad=True)


def test_nan_sorts_last():
    x = torch.tensor([[[1.0, float("nan"), -2.0, float("nan"), 0.5]]], device=DEVICE)
    y = torch.tensor([[[0.0, 3.0, -float("nan"), 1.0, 2.0]]], device=DEVICE)
    w, perm, perm_t, deriv = pdl.pdl_forward(x, y, 1, True)
    assert torch.equal(perm.long(), x.sort(dim=-1, stable=True).indices)
    assert torch.equal(perm_t.long(), y.sort(dim=-1, stable=True).indices)
    assert torch.isnan(w).all()
    assert deriv[0, 0, -2:].eq(0).all()  # sign(NaN) = 0


@pytest.mark.parametrize("p", [1, 2])
def test_strided_views(p):
    torch.manual_seed(2)
    # transposed: [B, N, C] storage viewed as [B, C, N], stride_n = C
    xt = randn(2, 5, 3).transpose(1, 2)
    # sliced: every other element of a longer row
    ys = randn(2, 3, 10)[..., ::2]
    assert not xt.is_contiguous() and not ys.is_contiguous()
    check(xt, ys, p, target_grad=True)

    # channels-last 4D flattened over H, W stays a view with stride_n = C
    x4 = randn(2, 3, 2, 3).contiguous(memory_format=torch.channels_last)
    y4 = randn(2, 3, 2, 3).contiguous(memory_format=torch.channels_last)
    x, y = x4.flatten(2), y4.flatten(2)
    assert x.data_ptr() == x4.data_ptr() and x.stride() == (18, 1, 3)
    check(x, y, p, target_grad=p == 2)


def test_expanded_upstream_gradient():
    torch.manual_seed(3)
    x, y = randn(3, 2, 5), randn(3, 2, 5)
    g = (torch.rand(1, 2, device=DEVICE) + 0.5).expand(3, 2)  # stride 0 along B
    check(x, y, 2, target_grad=True, g=g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [1, 2])
def test_dtypes(dtype, p):
    torch.manual_seed(4)
    x, y = randn(2, 2, 7, dtype=dtype), randn(2, 2, 7, dtype=dtype)
    x[0, 0, :4] = 0.0
    check(x, y, p, target_grad=p == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("target_grad", [False, True])
def test_torch_sort_fallback(monkeypatch, dtype, p, target_grad):
    monkeypatch.setattr(pdl, "TRITON_MAX_SORT_N", 4)
    monkeypatch.setattr(pdl, "TRITON_LOOP_BLOCK_N", 4)  # two blocks per row of 7
    torch.manual_seed(5)
    x = randn(2, 7, 2, dtype=dtype).transpose(1, 2)  # [2, 2, 7], stride_n = 2
    y = randn(2, 2, 7, dtype=dtype)
    x[0, 1, 1:5] = 0.0
    y[1, 0, ::2] = -0.0
    check(x, y, p, target_grad)


def test_backward_only_what_is_needed():
    x, y = randn(1, 2, 5), randn(1, 2, 5)
    w, perm, perm_t, deriv = pdl.pdl_forward(x, y, 1, True)
    g = torch.ones(1, 2, device=DEVICE)
    gp, gt = pdl.pdl_backward(g, perm, perm_t, deriv, False, True, torch.float32)
    assert gp is None and gt.shape == (1, 2, 5)
    gp, gt = pdl.pdl_backward(g, perm, perm_t, deriv, True, False, torch.float32)
    assert gt is None and gp.shape == (1, 2, 5)


def test_matches_cpu_op():
    torch_C = pytest.importorskip("fastloss._C")
    torch.manual_seed(6)
    x, y = randn(2, 2, 9), randn(2, 2, 9)
    x[0, 0, :5] = 0.0
    g = torch.rand(2, 2, device=DEVICE) + 0.5
    for p in (1, 2):
        ours = pdl.pdl_forward(x, y, p, True)
        cpu = torch_C.pdl_forward(x.cpu(), y.cpu(), p, True)
        torch.testing.assert_close(ours[0].cpu(), cpu[0])
        for a, b in zip(ours[1:], cpu[1:]):
            assert torch.equal(a.cpu(), b)
        ga = pdl.pdl_backward(g, *ours[1:], True, True, torch.float32)
        gb = torch_C.pdl_backward(g.cpu(), *cpu[1:], True, True, torch.float32)
        for a, b in zip(ga, gb):
            assert torch.equal(a.cpu(), b)


def test_errors():
    x = randn(1, 2, 4)
    with pytest.raises(ValueError, match="shape"):
        pdl.pdl_forward(x, randn(1, 2, 3), 1, False)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        pdl.pdl_forward(x, x, 3, False)
    with pytest.raises(TypeError, match="dtype"):
        pdl.pdl_forward(x.int(), x.int(), 1, False)
    w, perm, perm_t, deriv = pdl.pdl_forward(x, x, 1, False)
    with pytest.raises(ValueError, match="target permutation"):
        pdl.pdl_backward(torch.ones(1, 2, device=DEVICE), perm, perm_t, deriv, True, True, torch.float32)


def _neg_nan(dtype):
    """A NaN with the sign bit set, made from its bits (arithmetic may not give one)."""
    bits = {torch.float32: (torch.int32, -0x00400000), torch.float64: (torch.int64, -0x0008000000000000),
            torch.float16: (torch.int16, -0x0200), torch.bfloat16: (torch.int16, -0x0040)}[dtype]
    return torch.tensor([bits[1]], dtype=bits[0]).view(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_sort_input_canonicalises_nan_and_negative_zero(dtype):
    """What the torch.sort fallback orders: every NaN the positive one, -0.0 as +0.0 (CUDA's radix
    sort orders bit patterns, so a negative-sign NaN would come first and -0.0 before +0.0); every
    other value bit for bit."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}.get(dtype, torch.int16)
    x = torch.cat([_neg_nan(dtype), torch.tensor([-0.0, 0.0, -1.5, 2.0, float("nan"), -float("inf")], dtype=dtype)])
    assert torch.isnan(x[0]) and x[:1].view(ints).item() < 0  # the input really has a negative NaN
    out = triton_pdl_sort_input(x)
    bits, want = out.view(ints), x.view(ints).clone()
    special = torch.isnan(x) | (x == 0)
    assert torch.equal(bits[~special], want[~special])
    assert (bits[special] >= 0).all()  # sign bit clear
    assert torch.isnan(out[[0, 5]]).all() and torch.equal(out[[1, 2]], torch.zeros(2, dtype=dtype))


def triton_pdl_sort_input(x):
    return pdl.sort_input(x.to(DEVICE)).cpu()


def test_torch_sort_fallback_puts_negative_nan_last_as_the_cpu_op(monkeypatch):
    torch_C = pytest.importorskip("fastloss._C")
    monkeypatch.setattr(pdl, "TRITON_MAX_SORT_N", 4)
    torch.manual_seed(7)
    x, y = randn(1, 2, 9), randn(1, 2, 9)
    x[0, 0, 2] = _neg_nan(torch.float32)[0]
    x[0, 0, 5] = float("nan")
    x[0, 1, 1], x[0, 1, 6] = -0.0, 0.0
    ours = pdl.pdl_forward(x, y, 1, True)
    cpu = torch_C.pdl_forward(x.cpu(), y.cpu(), 1, True)
    assert torch.equal(ours[1].cpu(), cpu[1])  # NaN last, ties in index order
    assert ours[1][0, 0, -2:].tolist() == [2, 5]
