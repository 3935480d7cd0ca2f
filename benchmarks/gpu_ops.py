"""The ops on a GPU, side by side: forward+backward of PDL, D2SM and MDF on every backend that
runs CUDA tensors (reference, triton, cuda) and the peers that are installed, at the benchmark
shapes. Medians of interleaved runs, each run synchronised; ratios against ``reference`` on the
same device, in the same run. Run by scripts/gpu-check.sh; needs a CUDA device (exits 2 without).

    python benchmarks/gpu_ops.py [--reps 7] [--json FILE]

It writes no BENCHMARKS.md section: GPU figures go there only from a reviewed gpu-check run.
"""
import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastloss  # noqa: E402
from fastloss import _backend, selftest  # noqa: E402


def _synced(fn, device):
    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


def providers(device):
    """{op: {provider: fn}} on ``device``, and notes on what was left out."""
    notes = []
    backends = [b for b in ("reference", "triton", "cuda") if _backend.why_not(b, device, torch.float32) is None]
    for b in ("triton", "cuda"):
        if b not in backends:
            notes.append(f"{b}: {_backend.why_not(b, device, torch.float32)}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, 64, 64, generator=g).relu_().to(device).requires_grad_()
    y = torch.randn(8, 256, 64, 64, generator=g).relu_().to(device)
    ops = {"pdl (8,256,64,64) p=1": {f"fastloss[{b}]": (lambda b=b: fastloss.pdl(x, y, backend=b).backward())
                                      for b in backends}}

    def by_hand():
        d = torch.sort(x.flatten(2), dim=-1).values - torch.sort(y.flatten(2), dim=-1).values
        d.abs().mean(-1).sum(1).mean().backward()
    ops["pdl (8,256,64,64) p=1"]["torch.sort by hand"] = by_hand
    try:
        import ot

        def pot():
            xs, ys = x.reshape(8 * 256, -1).T, y.reshape(8 * 256, -1).T
            ot.wasserstein_1d(xs, ys, p=1).sum().backward()
        ops["pdl (8,256,64,64) p=1"]["POT wasserstein_1d"] = pot
    except ImportError:
        notes.append("POT is not installed: its PDL peer is skipped")

    p = torch.randn(1024, 8192, generator=g).to(device).requires_grad_()
    t = torch.randn(1024, 8192, generator=g).to(device)
    ops["d2sm_kl paper (1024, 8192)"] = {f"fastloss[{b}]": (lambda b=b: fastloss.d2sm_kl(p, t, backend=b).backward())
                                        for b in backends}
    w = selftest.mdf_weights((64,) * 8)
    u = torch.rand(4, 3, 128, 128, generator=g).to(device).requires_grad_()
    v = torch.rand(4, 3, 128, 128, generator=g).to(device)
    crits = {b: fastloss.MDFLoss(w, scales=8, backend=b).to(device) for b in backends}
    ops["mdf 8 discriminators (4,3,128,128)"] = {f"fastloss[{b}]": (lambda b=b: crits[b](u, v).backward())
                                                for b in backends}
    return ops, notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_ops: no CUDA device; nothing was measured")
        return 2
    warnings.simplefilter("ignore")
    device = torch.device("cuda")
    ops, notes = providers(device)
    rows = []
    print(f"GPU op timings on {torch.cuda.get_device_name()} (torch {torch.__version__}); median of "
          f"{args.reps} interleaved runs")
    for note in notes:
        print(f"  note: {note}")
    for op, fns in ops.items():
        med, _ = common.time_interleaved({k: _synced(f, device) for k, f in fns.items()}, args.reps, warmup=2)
        ref = med.get("fastloss[reference]")
        for k, s in med.items():
            ratio = ref / s if ref else None
            rows.append({"op": op, "provider": k, "ms": s * 1e3, "speedup_vs_reference": ratio})
            print(f"{op:<38} {k:<24} {s * 1e3:10.3f} ms  {'' if ratio is None else f'{ratio:6.2f}x reference'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": common.machine(), "device": torch.cuda.get_device_name(), "notes": notes,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
