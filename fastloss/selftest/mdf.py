"""MDF cases: random discriminator sets, four dtypes, grouped or not, channels_last, gradients for
pred and target, against the reference backend run on the CPU in float64."""
import torch

import fastloss

from .harness import DTYPES, Case, _cpu_gen, _to, poison
from .tolerances import MDF_TOL


def mdf_weights(widths=(8, 8, 16), seed=0):
    """A random MDF set of len(widths) discriminators (BatchNorm statistics kept positive)."""
    from fastloss.mdf import MDFWeights, tensor_names

    g = _cpu_gen(seed)
    discs = []
    for n in widths:
        d = {}
        for k in tensor_names():
            if k.endswith("conv.weight"):
                shape = (n, 3 if k.startswith("head.") else n, 3, 3)
            else:
                shape = {"tail.weight": (1, n, 3, 3), "tail.bias": (1,)}.get(k, (n,))
            d[k] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
            if k.endswith("running_var") or k.endswith("norm.weight"):
                d[k] = d[k].abs() + 0.5
        discs.append({k: v.float() for k, v in d.items()})
    return MDFWeights(discs, tuple(widths))


def _mdf_case(shape, grouped, dtype, channels_last=False, target_grad=False):
    tol = MDF_TOL[dtype]

    def run(backend, device, chk):
        w = mdf_weights()
        g = _cpu_gen(sum(shape))
        x0 = torch.rand(shape, generator=g, dtype=torch.float64)
        y0 = (x0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        x0, y0 = x0.to(dtype), y0.to(dtype)
        if channels_last:
            x0, y0 = (t.contiguous(memory_format=torch.channels_last) for t in (x0, y0))
        truth = fastloss.MDFLoss(w, scales=3, backend="reference")
        xt = x0.detach().clone().double().requires_grad_()
        yt = y0.detach().clone().double().requires_grad_(target_grad)
        loss_t = truth(xt, yt)
        loss_t.backward(torch.tensor(0.7, dtype=torch.float64))
        crit = fastloss.MDFLoss(w, scales=3, backend=backend, grouped=grouped).to(device)
        x, y = _to(x0, device).requires_grad_(), _to(y0, device).requires_grad_(target_grad)
        poison(device)
        out = crit(x, y)
        out.backward(torch.tensor(0.7, device=device, dtype=out.dtype))
        chk.close("loss", out, loss_t.detach(), tol)
        # in norm: a pre-activation within rounding of 0 may take the other LeakyReLU branch
        chk.close("grad pred", x.grad, xt.grad, tol, "norm")
        if target_grad:
            chk.close("grad target", y.grad, yt.grad, tol, "norm")

    extra = (" grouped" if grouped else "") + (" channels_last" if channels_last else "") + (
        " target_grad" if target_grad else "")
    return Case(f"mdf {tuple(shape)}{extra}", "mdf", dtype, run)


def _mdf_cases(full):
    if full:
        cases = []
        for shape in ((1, 3, 11, 11), (2, 3, 33, 57), (4, 3, 128, 128)):
            for grouped in (False, True):
                for dtype in DTYPES.values():
                    cases.append(_mdf_case(shape, grouped, dtype))
        for dtype in DTYPES.values():
            cases.append(_mdf_case((2, 3, 40, 37), True, dtype, channels_last=True, target_grad=True))
            cases.append(_mdf_case((2, 3, 40, 37), False, dtype, target_grad=True))
        return cases
    return [_mdf_case((1, 3, 11, 11), False, torch.float32), _mdf_case((2, 3, 17, 23), True, torch.float32),
            _mdf_case((1, 3, 11, 11), True, torch.float64, target_grad=True),
            _mdf_case((2, 3, 13, 12), False, torch.float32, channels_last=True, target_grad=True),
            _mdf_case((1, 3, 11, 11), False, torch.bfloat16)]
