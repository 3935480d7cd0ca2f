"""D2SM cases: ``d2sm_kl`` over set sizes that span several Triton blocks, in both modes, and
``D2SMQueue`` filling and wrapping, each step against a from-scratch float64 recomputation."""
import contextlib

import torch

import fastloss

from .harness import Case, _cpu_gen, _knob, _to, poison
from .tolerances import D2SM_TOL

D2SM_Q_FULL = (2, 37, 1024, 1025, 3000)   # 1025 and 3000 span several Triton blocks of 1024
D2SM_Q_QUICK = (2, 37)


def d2sm_inputs(q, d, dtype, seed):
    g = _cpu_gen(seed)
    x = torch.randn(q, d, generator=g, dtype=torch.float64)
    y = torch.randn(q, d, generator=g, dtype=torch.float64) + 0.1 * x
    if q > 2:
        x[1] = x[0]  # a duplicate row
    return x.to(dtype), y.to(dtype)


def d2sm_truth(x, y, mode, eps, gup):
    """CPU float64 ``d2sm_reference`` with autograd: (loss, grad of gup * loss wrt x)."""
    xr = x.detach().to("cpu", torch.float64).requires_grad_()
    loss = fastloss.d2sm_reference(xr, y.detach().to("cpu", torch.float64), mode=mode, eps=eps)
    loss.backward(torch.tensor(gup, dtype=torch.float64))
    return loss.detach(), xr.grad


def _d2sm_case(q, d, mode, dtype, knobs=(), seed=0):
    tol = D2SM_TOL[dtype]
    gup = 0.7e3  # not 1; the loss is O(1e-3)

    def run(backend, device, chk):
        x0, y0 = d2sm_inputs(q, d, dtype, seed + q)
        loss_t, gx_t = d2sm_truth(x0, y0, mode, 1e-6, gup)
        x, y = _to(x0, device).requires_grad_(), _to(y0, device)
        with contextlib.ExitStack() as stack:
            if backend == "triton":
                for knob in knobs:
                    stack.enter_context(_knob(*knob))
            poison(device)
            out = fastloss.d2sm_kl(x, y, mode=mode, backend=backend)
            out.backward(torch.tensor(gup, device=device, dtype=out.dtype))
        chk.close("loss", out, loss_t, tol)
        chk.close("grad pred", x.grad, gx_t, tol)

    return Case(f"d2sm_kl {mode} q={q} D={d}{' (triton: blocks of 16)' if knobs else ''}", "d2sm", dtype, run)


def _queue_case(queue_size, batch, d, mode, dtype, steps=None):
    tol = D2SM_TOL[dtype]
    steps = steps or (2 * queue_size) // batch + 2  # fill, then wrap twice

    def run(backend, device, chk):
        queue = fastloss.D2SMQueue(queue_size=queue_size, mode=mode, backend=backend).to(device)
        history_p, history_t = [], []
        g = _cpu_gen(queue_size + batch)
        for step in range(steps):
            xp = (torch.randn(batch, d, generator=g, dtype=torch.float64)).to(dtype)
            xt = (torch.randn(batch, d, generator=g, dtype=torch.float64) + 0.1 * xp.double()).to(dtype)
            keep = queue_size - batch
            earlier_p = torch.cat(history_p)[-keep:] if history_p and keep else xp[:0]
            earlier_t = torch.cat(history_t)[-keep:] if history_t and keep else xt[:0]
            setp, sett = torch.cat([xp, earlier_p]), torch.cat([xt, earlier_t])
            x = _to(xp, device).requires_grad_()
            poison(device)
            out = queue(x, _to(xt, device))
            out.backward(torch.tensor(0.7e3, device=device, dtype=out.dtype))
            if setp.shape[0] >= 2:
                loss_t, g_t = d2sm_truth(setp, sett, mode, 1e-6, 0.7e3)
                chk.close(f"step {step} loss", out, loss_t, tol)
                chk.close(f"step {step} grad", x.grad, g_t[:batch], tol)
            else:
                chk.true(f"step {step} loss of one row is 0", float(out.detach()) == 0.0)
            history_p.append(xp)
            history_t.append(xt)

    return Case(f"D2SMQueue {mode} size={queue_size} batch={batch} D={d} {steps} steps", "d2sm", dtype, run)


def _d2sm_cases(full):
    cases = []
    if full:
        for q in D2SM_Q_FULL:
            for mode in ("paper", "pkt"):
                for dtype in (torch.float32, torch.float64):
                    cases.append(_d2sm_case(q, 96, mode, dtype))
        for q in (37, 1025):
            for dtype in (torch.float16, torch.bfloat16):
                cases.append(_d2sm_case(q, 96, "paper", dtype))
        for mode in ("paper", "pkt"):
            for dtype in (torch.float32, torch.float64):
                cases.append(_queue_case(256, 24, 128, mode, dtype))
            cases.append(_queue_case(1100, 100, 64, mode, torch.float32, steps=14))  # a set over two blocks
        return cases
    for q in D2SM_Q_QUICK:
        for mode in ("paper", "pkt"):
            cases.append(_d2sm_case(q, 16, mode, torch.float32))
    cases += [_d2sm_case(37, 16, "paper", torch.float64), _d2sm_case(37, 16, "pkt", torch.bfloat16)]
    cases += [_d2sm_case(37, 16, mode, torch.float32, knobs=(("fastloss.kernels.d2sm", "TRITON_BLOCK_Q", 16),))
              for mode in ("paper", "pkt")]
    cases += [_queue_case(8, 3, 16, mode, torch.float32) for mode in ("paper", "pkt")]
    cases += [_queue_case(8, 3, 16, "paper", torch.float64)]
    return cases
