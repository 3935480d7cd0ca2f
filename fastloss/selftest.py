"""``python -m fastloss.selftest``: every available backend against ``reference`` on this machine.

For a user on a GPU machine this is how the CUDA and Triton paths get validated on real hardware:
fresh random inputs of several sizes, values and gradients compared with the plain-PyTorch
reference, then a median timing of forward+backward. Prints a pass/fail table and exits
non-zero on any mismatch. ``--device cpu --quick`` is the part the test suite runs.
"""
import argparse
import statistics
import sys
import time

import torch

import fastloss
from fastloss import _backend


def _pdl_case(shape, p):
    def make(device, dtype):
        x = torch.randn(shape, device=device, dtype=dtype)
        y = torch.randn(shape, device=device, dtype=dtype) * 1.3 + 0.2
        x[:, :1] = x[:, :1].relu()  # ties, as after a ReLU
        return x, y

    def run(inputs, backend):
        x, y = (t.detach().clone().requires_grad_() for t in inputs)
        out = fastloss.pdl(x, y, p=p, reduction="none", backend=backend)
        g = torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=out.dtype)
        out.backward(g)
        return out.detach(), (x.grad, y.grad)

    return f"pdl p={p} {tuple(shape)}", make, run


def _d2sm_case(q, d, mode):
    # Signed features: with post-ReLU ones every cosine is positive, the KL is tiny and the
    # float32 reference's own rounding (up to 1e-4 relative at q = 256) would be what is compared.
    scale = float(q * q if mode == "pkt" else q)  # the sum over entries (pkt) or anchors (paper): O(0.1)

    def make(device, dtype):
        x = torch.randn(q, d, device=device, dtype=dtype)
        y = torch.randn(q, d, device=device, dtype=dtype) + 0.1 * x
        x[1] = x[0]  # a duplicate row
        return x, y

    def run(inputs, backend):
        x, y = inputs[0].detach().clone().requires_grad_(), inputs[1]
        out = fastloss.d2sm_kl(x, y, mode=mode, backend=backend) * scale
        out.backward(torch.tensor(1e3, device=out.device, dtype=out.dtype))  # gradients of order 1e-4..1e2
        return out.detach(), (x.grad,)

    return f"d2sm {mode} ({q}, {d})", make, run


def _mdf_case(shape, grouped):
    """MDF on a random 3-discriminator set (widths 8, 8, 16). The value is compared in the dtype
    asked for; the input gradient in float64, because in float32 a pre-activation within rounding
    of 0 may take the other LeakyReLU branch in any reordering, and move the gradient of that pixel."""
    from fastloss.mdf import MDFWeights, tensor_names

    def make(device, dtype):
        g = torch.Generator().manual_seed(0)
        discs = []
        for n in (8, 8, 16):
            d = {}
            for k in tensor_names():
                if k.endswith("conv.weight"):
                    shape_k = (n, 3 if k.startswith("head.") else n, 3, 3)
                else:
                    shape_k = {"tail.weight": (1, n, 3, 3), "tail.bias": (1,)}.get(k, (n,))
                d[k] = torch.randn(shape_k, generator=g) * 0.3
                if k.endswith("running_var") or k.endswith("norm.weight"):
                    d[k] = d[k].abs() + 0.5
            discs.append(d)
        w = MDFWeights(discs, (8, 8, 16))
        x = torch.rand(shape, device=device, dtype=dtype)
        y = (x + 0.1 * torch.randn(shape, device=device, dtype=dtype)).clamp(0, 1)
        return w, x, y

    def run(inputs, backend):
        w, x, y = inputs
        crit = fastloss.MDFLoss(w, scales=3, backend=backend, grouped=grouped)
        out = crit(x, y)
        x64 = x.detach().double().requires_grad_()
        crit(x64, y.double()).backward(torch.tensor(0.7, dtype=torch.float64, device=x.device))
        return out.detach(), (x64.grad,)

    return f"mdf {tuple(shape)}{' grouped' if grouped else ''}", make, run


def cases(quick):
    shapes = [(2, 3, 1), (2, 4, 5, 7), (3, 8, 33, 17)]
    if not quick:
        shapes += [(4, 64, 64, 64), (8, 256, 32, 32), (2, 16, 128, 128)]
    d2sm_shapes = [(8, 16), (37, 50)] + ([] if quick else [(256, 4096), (1024, 8192)])
    return [_pdl_case(s, p) for s in shapes for p in (1, 2)] + [
        _d2sm_case(q, d, mode) for q, d in d2sm_shapes for mode in ("paper", "pkt")] + [
        _mdf_case(s, grouped) for s in [(1, 3, 11, 11), (2, 3, 33, 57)] + ([] if quick else [(4, 3, 128, 128)])
        for grouped in (False, True)]


TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _max_rel(a, b):
    scale = b.abs().max().clamp_min(1e-6)
    return ((a.float() - b.float()).abs().max() / scale).item()


def _time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(device, quick=False, backends=None, dtype=torch.float32, reps=5, out=sys.stdout):
    """Run the checks; return the number of mismatches."""
    device = torch.device(device)
    names = [b for b in (backends or _backend.BACKENDS) if b != "reference"]
    usable = [b for b in names if _backend.why_not(b, device, dtype) is None]
    skipped = {b: _backend.why_not(b, device, dtype) for b in names if b not in usable}
    print(f"fastloss selftest on {device}, {dtype}; backends: {', '.join(usable) or 'none'}", file=out)
    for b, why in skipped.items():
        print(f"  skipped {b}: {why}", file=out)
    print(f"{'case':<36} {'backend':<8} {'value err':>10} {'grad err':>10} {'ms':>9} {'ref ms':>9} result", file=out)
    failures = 0
    for label, make, fn in cases(quick):
        inputs = make(device, dtype)
        ref_val, ref_grads = fn(inputs, "reference")
        ref_ms = _time(lambda: fn(inputs, "reference"), reps) * 1e3
        for b in usable:
            val, grads = fn(inputs, b)
            verr = _max_rel(val, ref_val)
            gerr = max(_max_rel(g, r) for g, r in zip(grads, ref_grads))
            ok = verr <= TOL[dtype] and gerr <= TOL[dtype]
            failures += not ok
            ms = _time(lambda: fn(inputs, b), reps) * 1e3
            print(f"{label:<36} {b:<8} {verr:>10.2e} {gerr:>10.2e} {ms:>9.2f} {ref_ms:>9.2f} "
                  f"{'PASS' if ok else 'FAIL'}", file=out)
    print(f"{'all passed' if failures == 0 else f'{failures} mismatches'}", file=out)
    return failures


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastloss.selftest", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--backends", nargs="*", choices=_backend.BACKENDS, help="default: all")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (median)")
    args = ap.parse_args(argv)
    failures = run(args.device, args.quick, args.backends, getattr(torch, args.dtype), max(1, args.reps))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
