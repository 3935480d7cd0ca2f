"""FDL cases: one layer's ``fastloss.fdl`` (the spectrum op, the projections, the fused sort and the
one-byte backward) against the published formula (``fdl_layer_reference``) run on the CPU in float64.

FDL runs on PDL's backend table (its sorts are the PDL op's forward) in float32 and float64 only:
``fdl`` computes float16 / bfloat16 features in float32, so there are no half cases.

The float32 cases leave the phase term out (``phase_weight=0``): a phase within float32 rounding of
-pi comes out as +pi in one FFT and not in another, which moves the published formula itself by
~1e-3 between float32 and float64 (docs/fdl.md), a difference of FFT libraries, not of fastloss.
The phase term runs in the float64 cases, where no phase lies that close to the cut."""
import torch

from .harness import Case, _cpu_gen, _to, poison
from .tolerances import FDL_TOL


def _fdl_case(shape, filters, patch, stride, phase_weight, dtype, channels_last=False):
    tol = FDL_TOL[dtype]

    def run(backend, device, chk):
        from fastloss.fdl import fdl
        from fastloss.fdl.reference import fdl_layer_reference

        g = _cpu_gen(sum(shape) + filters)
        x0 = torch.randn(shape, generator=g, dtype=torch.float64).relu()  # ReLU features: zeros, ties
        y0 = torch.randn(shape, generator=g, dtype=torch.float64).relu()
        w = torch.randn(filters, shape[1], patch, patch, generator=g, dtype=torch.float64)
        w = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # unit-norm filters, as FDLLoss draws them
        x0, y0, w = x0.to(dtype), y0.to(dtype), w.to(dtype)
        if channels_last:
            x0, y0 = (t.contiguous(memory_format=torch.channels_last) for t in (x0, y0))
        xt = x0.detach().clone().double().requires_grad_()
        truth = fdl_layer_reference(xt, y0.double(), w.double(), stride, phase_weight).mean()
        truth.backward(torch.tensor(0.7, dtype=torch.float64))
        x, y = _to(x0, device).requires_grad_(), _to(y0, device)
        poison(device)
        out = fdl(x, y, _to(w, device), stride=stride, phase_weight=phase_weight, backend=backend)
        out.backward(torch.tensor(0.7, device=device, dtype=out.dtype))
        chk.close("loss", out, truth.detach(), tol)
        # in norm: a projected difference within rounding of 0 may take the other sign
        chk.close("grad pred", x.grad, xt.grad, tol, "norm")

    extra = f" {filters} filters {patch}x{patch}" + (f" stride {stride}" if stride != 1 else "") + (
        f" phase_weight {phase_weight}" if phase_weight != 1.0 else "") + (" channels_last" if channels_last else "")
    return Case(f"fdl {tuple(shape)}{extra}", "fdl", dtype, run)


def _fdl_cases(full):
    quick = [_fdl_case((2, 3, 9, 8), 6, 3, 1, 1.0, torch.float64),
             _fdl_case((2, 4, 11, 10), 8, 5, 2, 0.0, torch.float32, channels_last=True)]
    if not full:
        return quick
    cases = list(quick)
    for dtype in (torch.float32, torch.float64):
        phase = 1.0 if dtype == torch.float64 else 0.0
        cases += [_fdl_case((1, 1, 5, 5), 3, 5, 1, phase, dtype),          # one position per filter
                  _fdl_case((2, 64, 24, 24), 256, 5, 1, phase, dtype),    # relu1_2-like, 256 filters (4 chunks of 64)
                  _fdl_case((3, 16, 33, 17), 70, 5, 1, 0.0, dtype),       # a partial chunk
                  _fdl_case((2, 8, 20, 21), 16, 3, 3, 2 * phase, dtype, channels_last=True)]
    return cases
