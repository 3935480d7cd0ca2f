"""FDL forward + backward: the published formula (``torch.sort``) vs fastloss's fused sort, with the
backbone-and-FFT baseline, time and peak extra memory side by side.

    python benchmarks/bench_fdl.py [--reps 5] [--shapes 2x3x256x256 4x3x128x128] [--no-write]
    python benchmarks/bench_fdl.py --quick --no-write        # a tiny smoke run (seconds)

Every measurement (one forward + backward of ``FDLLoss`` on images of the shape, VGG19 with random
weights, the published defaults: five layers, 256 projections of 5 x 5, phase weight 1) runs in a
fresh process, after one untimed call at the same shape: the time in ``--reps`` processes per provider,
the providers taking turns rep after rep (a row is the median), the peak extra memory in one more
(glibc's mmap threshold fixed at 64 KiB there, so that the resident high-water mark shows the call's
peak: see ``MEMORY_ENV``). Providers: ``baseline`` (VGG19 on both images and
the FFT, magnitude and phase of every layer, the projections and sorts left out: what any FDL pays),
``reference`` (``backend="reference"``: the published formula), ``fast`` (the fused sort, float32)
and ``fast-bf16`` (the same, ``compute_dtype=torch.bfloat16``: the backbone in bfloat16). "added" is
a provider's peak minus the baseline's: the memory the loss itself adds. Writes the ``fdl`` section
of BENCHMARKS.md unless --no-write. ``--device cuda`` measures on a GPU (allocated memory).
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastloss  # noqa: E402

DEFAULT_SHAPES = ["2x3x256x256", "4x3x128x128"]
QUICK_SHAPES = ["1x3x80x80"]
PROVIDERS = ("baseline", "reference", "fast", "fast-bf16")


def _shape(text):
    shape = tuple(int(v) for v in text.split("x"))
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(text)
    return shape


def _criterion(provider, num_proj, device):
    torch.manual_seed(0)  # the same random VGG19 in every process
    if provider == "baseline":
        return Baseline().to(device)
    backend = "reference" if provider == "reference" else "auto"
    dtype = torch.bfloat16 if provider == "fast-bf16" else None
    return fastloss.FDLLoss(num_proj=num_proj, extractor_weights=None, backend=backend, compute_dtype=dtype).to(device)


class Baseline(torch.nn.Module):
    """What FDL computes before its projections: VGG19 at the five layers on both images (the
    target without autograd), the FFT of every layer, its magnitude and phase; their means stand
    in for the loss so that the backward runs through all of it."""

    def __init__(self):
        super().__init__()
        self.loss = fastloss.FDLLoss(num_proj=1, patch_size=1, extractor_weights=None)

    def forward(self, u, v):
        fu, fv = self.loss.extractor.pair(u, v)
        total = 0.0
        for name in self.loss.layers:
            fx = torch.fft.fftn(fu[name].float(), dim=(-2, -1))
            with torch.no_grad():
                fy = torch.fft.fftn(fv[name].float(), dim=(-2, -1))
                keep = (fy.abs(), torch.angle(fy))  # the target's maps exist in the loss too
            total = total + fx.abs().mean() + torch.angle(fx).mean() + 0 * keep[0].sum()
        return total


def measure(provider, shape, num_proj, device, what="time"):
    """One forward + backward of ``provider`` at ``shape`` in this process (a fresh one per
    measurement), after an untimed one at the same shape: its seconds (``what="time"``) or its peak
    extra memory in bytes (``"memory"``). The untimed call loads the extension and builds what a
    training step builds once (oneDNN's primitives for each convolution shape, the cast weights):
    the measured call is a step of a running training."""
    warnings.simplefilter("ignore")
    crit = _criterion(provider, num_proj, device)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(shape, generator=g).to(device).requires_grad_()
    v = torch.rand(shape, generator=g).to(device)

    def step():
        u.grad = None
        crit(u, v).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()

    if what == "memory":
        return common.peak_extra_memory(step, device)[1]
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


# The memory processes run with glibc's mmap threshold fixed at 64 KiB: glibc otherwise raises it
# as large blocks are freed (up to 32 MiB), so the warm-up's freed blocks would be reused from the
# heap and the call's peak would not show in the resident high-water mark. The timing processes
# run without it: mapping every block costs page faults that a training process does not pay.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _in_fresh_process(*args, env=None):
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return common.measure_in_subprocess("bench_fdl", "measure", *args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=None, help=f"BxCxHxW, default: {' '.join(DEFAULT_SHAPES)}")
    ap.add_argument("--reps", type=int, default=5, help="measurements per provider and shape (median), default 5")
    ap.add_argument("--num-proj", type=int, default=256, help="projections per layer, default 256 (the published)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke run: {' '.join(QUICK_SHAPES)}, 8 projections, 1 rep (unless given)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    argv_given = sys.argv[1:] if argv is None else argv
    if args.quick:
        args.shapes = args.shapes or QUICK_SHAPES
        if "--num-proj" not in argv_given:
            args.num_proj = 8
        if "--reps" not in argv_given:
            args.reps = 1
    args.shapes = args.shapes or DEFAULT_SHAPES
    if args.reps < 1 or args.num_proj < 1:
        ap.error("--reps and --num-proj must be >= 1")
    try:
        shapes = [_shape(s) for s in args.shapes]
    except ValueError:
        ap.error(f"--shapes takes Bx3xHxW like 2x3x256x256, got {args.shapes}")
    provs = [p.strip() for p in args.providers.split(",") if p.strip()]
    if not provs or any(p not in PROVIDERS for p in provs):
        ap.error(f"--providers: choose from {','.join(PROVIDERS)}, got {args.providers!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    info = common.machine()
    for line in common.machine_lines(info):
        print(line)
    memory_kind = "allocated CUDA memory" if args.device.startswith("cuda") else "resident memory"
    rows = []
    for shape in shapes:
        times = {p: [] for p in provs}
        for _ in range(args.reps):  # the providers take turns: machine noise hits them alike
            for p in provs:
                times[p].append(_in_fresh_process(p, list(shape), args.num_proj, args.device, "time"))
        mem = {p: _in_fresh_process(p, list(shape), args.num_proj, args.device, "memory", env=MEMORY_ENV)
               for p in provs}
        med = {p: statistics.median(times[p]) for p in provs}
        base = mem.get("baseline")
        for p in provs:
            added = None if base is None or p == "baseline" else mem[p] - base
            rows.append({"shape": list(shape), "provider": p, "ms": med[p] * 1e3, "peak_extra_bytes": mem[p],
                         "added_bytes": added, "times_s": times[p]})
        ref = next((r for r in rows[-len(provs):] if r["provider"] == "reference"), None)
        for r in rows[-len(provs):]:
            r["speedup_vs_reference"] = ref["ms"] / r["ms"] if ref else None
            r["added_vs_reference"] = (r["added_bytes"] / ref["added_bytes"]
                                       if ref and r["added_bytes"] is not None and ref["added_bytes"] else None)
            fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
            print(f"{'x'.join(map(str, shape)):<13} {r['provider']:<10} {r['ms']:10.1f} ms "
                  f"{fmt(r['speedup_vs_reference'], '{:6.2f}x'):>8} vs reference  peak extra "
                  f"{r['peak_extra_bytes'] / 2**20:8.1f} MiB  added {fmt(r['added_bytes'] and r['added_bytes'] / 2**20, '{:8.1f}')} MiB "
                  f"({fmt(r['added_vs_reference'], '{:.0%}')} of the reference's)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/bench_fdl.py " + " ".join(argv_given), "machine": info,
                       "num_proj": args.num_proj, "reps": args.reps, "device": args.device, "rows": rows}, f, indent=1)
    table = [(tuple(r["shape"]), r["provider"], f"{r['ms']:.0f}",
              "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}x",
              f"{r['peak_extra_bytes'] / 2**20:.1f}",
              "-" if r["added_bytes"] is None else f"{r['added_bytes'] / 2**20:.1f}",
              "-" if r["added_vs_reference"] is None else f"{r['added_vs_reference']:.0%}") for r in rows]
    cmd = "python benchmarks/bench_fdl.py " + " ".join(argv_given)
    lines = [f"## FDL: forward + backward, VGG19, {args.num_proj} projections, {args.device}", "",
             f"Command: `{cmd.strip()}` (each measurement one forward + backward in a fresh process, after an "
             f"untimed one at the same shape: the time "
             f"the median of {args.reps} processes per provider, the providers taking turns; the peak extra "
             f"{memory_kind} in one more process per provider).", ""]
    lines += common.machine_lines(info) + [""] + common.markdown_table(
        ["shape (B, C, H, W)", "provider", "ms", "speed-up vs reference", "peak extra MiB",
         "added over baseline MiB", "added vs reference"], table, left=2)
    lines += ["", "`baseline` is VGG19 on both images plus the FFT, magnitude and phase of every layer, without "
              "the projections and sorts; \"added\" is a row's peak minus the baseline's. `reference` is the "
              "published formula (`torch.sort`, autograd); `fast` the same loss with its sorts on fastloss's fused "
              "op; `fast-bf16` with the backbone in bfloat16. Targets (issue 23): fast >= 1.6x the reference on a "
              "CPU, and fast's added memory <= 20% of the reference's."]
    if not args.no_write:
        common.write_section("fdl", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
