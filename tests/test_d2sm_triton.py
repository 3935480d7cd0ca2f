"""D2SM's Triton kernels, run on CPU tensors under TRITON_INTERPRET=1 at tiny sizes (the
interpreter is slow), against autograd of the plain-PyTorch formula."""

# tests/conftest.py sets TRITON_INTERPRET=1 before triton loads when there is no GPU (the kernels
# then run on CPU tensors); on a GPU machine it is left unset and these tests run on CUDA tensors.

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import fastloss  # noqa: E402
from fastloss.d2sm import _kl_from_sims, d2sm_reference  # noqa: E402
from fastloss.kernels import d2sm as triton_d2sm  # noqa: E402

if triton_d2sm._interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("triton kernels are compiled (TRITON_INTERPRET unset before import) and no GPU", allow_module_level=True)

DEVICE_AWARE = True  # runs on CUDA tensors in GPU mode (tests/conftest.py)

MODES = ("paper", "pkt")


def _sims(q, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(q, d, generator=g, dtype=torch.float64).relu()
    y = torch.randn(q, d, generator=g, dtype=torch.float64).relu() + 0.3 * x
    if q > 3:
        x[2] = x[0]  # a duplicate row
    fx, fy = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    return (fx @ fx.T).to(dtype), (fy @ fy.T).to(dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [2, 5, 37])
def test_kernels_against_autograd_of_the_similarities(q, dtype, mode):
    sp, st = _sims(q, 7, dtype)
    spg = sp.clone().requires_grad_()
    ref = _kl_from_sims(spg, st, mode, 1e-6)
    ref.backward()
    rows = torch.tensor([q - 1, 0] + ([3] if q > 3 else []))
    dots_p, dots_t = sp.sum(1, dtype=torch.float64), st.sum(1, dtype=torch.float64)
    loss, grad_rows = triton_d2sm.d2sm_forward(sp.to(DEVICE), st.to(DEVICE), dots_p.to(DEVICE), dots_t.to(DEVICE),
                                               rows.to(DEVICE), mode == "paper", 1e-6)
    want = spg.grad[rows] + spg.grad[:, rows].T
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert loss.dtype == dtype and grad_rows.shape == (rows.numel(), q)
    torch.testing.assert_close(loss.cpu(), ref.detach(), rtol=tol, atol=1e-6 if dtype == torch.float32 else 1e-14)
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(grad_rows.cpu(), want, rtol=tol, atol=tol * scale)


def test_strided_rows_and_no_requested_rows():
    sp, st = _sims(9, 4, torch.float32, seed=3)
    big_p, big_t = torch.zeros(12, 12), torch.zeros(12, 12)
    big_p[:9, :9], big_t[:9, :9] = sp, st  # the queue's cache prefix: row stride 12
    dots_p, dots_t = sp.sum(1, dtype=torch.float64), st.sum(1, dtype=torch.float64)
    a = triton_d2sm.d2sm_forward(big_p[:9, :9].to(DEVICE), big_t[:9, :9].to(DEVICE), dots_p.to(DEVICE),
                                 dots_t.to(DEVICE), torch.arange(0).to(DEVICE), True, 1e-6)
    b = triton_d2sm.d2sm_forward(sp.to(DEVICE), st.to(DEVICE), dots_p.to(DEVICE), dots_t.to(DEVICE),
                                 torch.arange(0).to(DEVICE), True, 1e-6)
    assert a[1].shape == (0, 9)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_d2sm_kl_on_triton_matches_reference(mode):
    g = torch.Generator().manual_seed(1)
    for q, d in ((2, 3), (6, 5)):
        x = torch.randn(q, d, generator=g).relu().to(DEVICE)
        y = torch.randn(q, d, generator=g).relu().to(DEVICE)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = fastloss.d2sm_kl(x1, y, mode=mode, backend="triton")
        ref = d2sm_reference(x2, y, mode)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-6)
        (out * 3.0).backward()
        (ref * 3.0).backward()
        scale = max(x2.grad.abs().max().item(), 1e-2)  # q = 2 in paper mode: identically 0
        torch.testing.assert_close(x1.grad, x2.grad, rtol=2e-5, atol=2e-5 * scale)


def test_queue_on_triton_matches_the_reference_queue():
    g = torch.Generator().manual_seed(2)
    qt = fastloss.D2SMQueue(7, mode="pkt", backend="triton").double()
    qr = fastloss.D2SMQueue(7, mode="pkt", backend="reference").double()
    for _ in range(4):  # 12 rows through a queue of 7: it wraps
        x = torch.randn(3, 5, generator=g, dtype=torch.float64).relu().to(DEVICE)
        y = torch.randn(3, 5, generator=g, dtype=torch.float64).relu().to(DEVICE)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = qt(xa, y), qr(xb, y)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-15)
