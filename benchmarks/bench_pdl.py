"""PDL forward+backward: fastloss's backends side by side with the torch.sort reference and POT.

    python benchmarks/bench_pdl.py [--reps 7] [--shapes 8x256x64x64 8x512x32x32] [--no-write]

Times are medians of ``--reps`` interleaved runs in one process; peak extra memory is measured
in a fresh process per provider. Writes the ``pdl`` section of BENCHMARKS.md unless --no-write.
"""
import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastloss  # noqa: E402
from fastloss import _ext  # noqa: E402

try:
    import ot
except ImportError:  # POT is an optional peer
    ot = None

DEFAULT_SHAPES = ["8x256x64x64", "8x512x32x32"]


def _shape(text):
    return tuple(int(v) for v in text.split("x"))


def providers(backends=None):
    """name -> callable(x, y) that runs forward+backward of the PDL loss (p=1, mean over B)."""
    out = {}
    for b in backends or ["reference", "cpu"]:
        if fastloss.backends()[b]["available"] and b in ("reference", "cpu"):
            out[f"fastloss[{b}]"] = lambda x, y, b=b: fastloss.pdl(x, y, backend=b).backward()
    ext = _ext.load("_C")[0]
    if "fastloss[cpu]" in out and ext.cpu_isa() == "avx2":
        def cpu_baseline(x, y):  # the cpu backend as a CPU without AVX2 runs it
            ext.set_cpu_isa("baseline")
            try:
                fastloss.pdl(x, y, backend="cpu").backward()
            finally:
                ext.set_cpu_isa("avx2")

        out["fastloss[cpu, baseline build]"] = cpu_baseline
    def by_hand(x, y):  # what a user would write: torch.sort's default (unstable) sort
        d = torch.sort(x.flatten(2), dim=-1).values - torch.sort(y.flatten(2), dim=-1).values
        d.abs().mean(-1).sum(1).mean().backward()

    out["torch.sort by hand"] = by_hand
    if ot is not None:
        def pot(x, y):
            B, C = x.shape[:2]
            xs, ys = x.reshape(B * C, -1).T, y.reshape(B * C, -1).T  # POT wants (N, batch)
            ot.wasserstein_1d(xs, ys, p=1).view(B, C).sum(1).mean().backward()

        out["POT wasserstein_1d"] = pot
    return out


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).relu_().requires_grad_()  # ReLU features: ties at 0
    y = torch.randn(shape, generator=g).relu_()
    return x, y


def peak_memory(name, shape):
    """Peak extra bytes of one forward+backward of provider ``name`` (run in a fresh process)."""
    warnings.simplefilter("ignore")
    x, y = _inputs(tuple(shape))
    fn = providers(None)[name]
    fn(*_inputs((2, 3, 8, 8)))  # load extensions and code paths first
    x.grad = None
    return common.peak_extra_bytes(lambda: fn(x, y))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxCxHxW, default: %(default)s")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per provider (median), default 7")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    try:
        shapes = [_shape(s) for s in args.shapes]
    except ValueError:
        ap.error(f"--shapes takes BxCxHxW like 8x256x64x64, got {args.shapes}")
    warnings.simplefilter("ignore")
    info = common.machine()
    provs = providers()
    rows = []
    for shape in shapes:
        x, y = _inputs(shape)

        def call(fn):
            x.grad = None
            fn(x, y)

        med, _ = common.time_interleaved({k: (lambda fn=fn: call(fn)) for k, fn in provs.items()}, args.reps)
        mem = {k: common.measure_in_subprocess("bench_pdl", "peak_memory", k, list(shape)) for k in provs}
        ref_t, ref_m = med["fastloss[reference]"], mem["fastloss[reference]"]
        for k in provs:
            rows.append((shape, k, med[k] * 1e3, ref_t / med[k], mem[k] / 2**20, mem[k] / ref_m))
            print(f"{'x'.join(map(str, shape)):<14} {k:<30} {med[k]*1e3:9.1f} ms  {ref_t/med[k]:6.2f}x vs reference"
                  f"  peak extra {mem[k]/2**20:8.1f} MiB ({mem[k]/ref_m:5.1%} of reference)", flush=True)

    cmd = "python benchmarks/bench_pdl.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## PDL: forward + backward, float32, p=1", "",
             f"Command: `{cmd.strip()}` (median of {args.reps} interleaved runs in one process; peak extra "
             "resident memory of one forward+backward, each provider in a fresh process).", ""]
    lines += common.machine_lines(info) + ["", "| shape (B, C, H, W) | provider | ms | speed-up vs reference | "
                                           "peak extra MiB | memory vs reference |", "|---|---|---:|---:|---:|---:|"]
    for shape, k, ms, sp, mib, mr in rows:
        lines.append(f"| {tuple(shape)} | {k} | {ms:.1f} | {sp:.2f}x | {mib:.1f} | {mr:.0%} |")
    lines += ["", "The reference is `fastloss.pdl(..., backend=\"reference\")`: `torch.sort(stable=True)` of both "
              "sides with autograd. `torch.sort by hand` is the same formula with torch.sort's default (unstable) "
              "sort, as a user would write it: the same loss, but on ties its gradient depends on the sort's "
              "order; the fast path's speed-up over it is the ratio of the two rows' speed-ups. "
              "`fastloss[cpu]` runs the sort build this CPU takes (see `cpu PDL sort kernels` above); "
              "`baseline build` is the same backend with `FASTLOSS_CPU_ISA=baseline`, as on a CPU without AVX2. "
              "Inputs are ReLU'd Gaussians (many ties at 0)."]
    if not args.no_write:
        common.write_section("pdl", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
