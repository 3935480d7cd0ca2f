"""D2SM's Triton kernels, run on CPU tensors under TRITON_INTERPRET=1 at tiny sizes (the
interpreter is slow), against autograd of the plain-PyTorch formula."""

import pytest
import torch

import fastloss
from fastloss.d2sm.reference import _kl_from_sims, d2sm_reference

from helpers import triton_kernels

triton_d2sm, DEVICE = triton_kernels("d2sm")  # CPU tensors under the interpreter, CUDA ones in GPU mode
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


@pytest.mark.parametrize("mode", MODES)
def test_queue_on_triton_fills_from_one_row_and_wraps_against_the_reference(mode):
    """The fill level and the pointer live on the device and the kernels read the set's size from
    it: a first call of one row (an empty set: zero loss, zero gradient), then the queue filling up
    and wrapping, in both modes, against the reference queue step by step."""
    g = torch.Generator().manual_seed(3)
    qt = fastloss.D2SMQueue(6, mode=mode, backend="triton").double()
    qr = fastloss.D2SMQueue(6, mode=mode, backend="reference").double()
    for step, b in enumerate((1, 1, 2, 3, 2, 4)):  # set sizes 1, 2, 4, 6, 6, 6; slots wrap twice
        x = torch.randn(b, 5, generator=g, dtype=torch.float64).relu().to(DEVICE)
        y = torch.randn(b, 5, generator=g, dtype=torch.float64).relu().to(DEVICE)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = qt(xa, y), qr(xb, y)
        la.backward()
        lb.backward()
        assert qt.filled == qr.filled and qt.ptr == qr.ptr
        if step == 0:
            assert la.item() == 0.0 and torch.equal(xa.grad, torch.zeros_like(xa))
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-15)
    for name in ("pred_sim", "target_sim", "pred_rowsum", "target_rowsum", "pred_queue"):
        torch.testing.assert_close(getattr(qt, name), getattr(qr, name), rtol=1e-12, atol=1e-14)


def test_kernels_read_the_live_set_size_from_the_device():
    """q_live: the set is the leading q_live x q_live block of larger buffers (what a filling queue
    passes); outside it the gradient is 0, and rows outside it get zero rows."""
    sp, st = _sims(7, 4, torch.float64)
    big_p = torch.full((10, 10), float("nan"), dtype=torch.float64)  # outside the set: never read
    big_t = big_p.clone()
    big_p[:7, :7], big_t[:7, :7] = sp, st
    sp, st, big_p, big_t = (t.to(DEVICE) for t in (sp, st, big_p, big_t))
    dots_p = torch.zeros(10, dtype=torch.float64, device=DEVICE)
    dots_t = dots_p.clone()
    dots_p[:7], dots_t[:7] = sp.sum(1), st.sum(1)
    for paper in (True, False):
        loss, grad = triton_d2sm.d2sm_forward(sp, st, dots_p[:7], dots_t[:7], torch.arange(7, device=DEVICE),
                                              paper, 1e-6)
        rows = torch.tensor([0, 6, 7, -1], device=DEVICE)
        q_live = torch.tensor(7, device=DEVICE)
        loss_b, grad_b = triton_d2sm.d2sm_forward(big_p, big_t, dots_p, dots_t, rows, paper, 1e-6, q_live)
        torch.testing.assert_close(loss_b, loss, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(grad_b[:2, :7], grad[[0, 6]], rtol=1e-12, atol=1e-15)
        assert torch.equal(grad_b[:2, 7:], torch.zeros_like(grad_b[:2, 7:]))
        assert torch.equal(grad_b[2:], torch.zeros_like(grad_b[2:]))  # rows outside the set
        loss_1, grad_1 = triton_d2sm.d2sm_forward(big_p, big_t, dots_p, dots_t, rows, paper, 1e-6,
                                                  torch.tensor(1, device=DEVICE))  # one row: no set
        assert loss_1.item() == 0.0 and torch.equal(grad_1, torch.zeros_like(grad_1))
