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


def cases(quick):
    shapes = [(2, 3, 1), (2, 4, 5, 7), (3, 8, 33, 17)]
    if not quick:
        shapes += [(4, 64, 64, 64), (8, 256, 32, 32), (2, 16, 128, 128)]
    return [_pdl_case(s, p) for s in shapes for p in (1, 2)]


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
