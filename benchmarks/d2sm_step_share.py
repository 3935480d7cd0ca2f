"""How much of fastloss-bench's D2SM training step is the D2SM loss, per backend.

    python benchmarks/d2sm_step_share.py [--reps 9]

At fastloss-bench's settings (batch 4, 96 x 96 crops, D2SMLoss defaults: VGG19 up to conv5_4, a
queue of 256, random VGG weights), with the queue full: the forward+backward of D2SMLoss on a
batch (features and loss), and of its queue loss alone on fixed features. Median of ``--reps``
interleaved runs in one process. Prints; writes nothing.
"""
import argparse
import statistics
import sys
import time
import warnings

import torch

import fastloss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="timed runs per backend (median), default 9")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    warnings.simplefilter("ignore")  # random VGG weights
    torch.manual_seed(0)
    losses = {b: fastloss.D2SMLoss(extractor_weights=None, backend=b) for b in ("reference", "cpu")}
    u0, v = torch.rand(4, 3, 96, 96), torch.rand(4, 3, 96, 96)
    for m in losses.values():  # fill the queue (256 rows, 4 a call)
        for _ in range(m.queue.queue_size // 4 + 2):
            m(u0.clone().requires_grad_(), v).backward()
    step = {b: [] for b in losses}
    loss = {b: [] for b in losses}
    for _ in range(args.reps):
        for b, m in losses.items():
            u = u0.clone().requires_grad_()
            t = time.perf_counter()
            m(u, v).backward()
            step[b].append(time.perf_counter() - t)
            with torch.no_grad():
                fu, fv = (m._rows(m.extractor(x))[m.layer] for x in (u0, v))
            fu.requires_grad_()
            t = time.perf_counter()
            m.queue(fu, fv).backward()
            loss[b].append(time.perf_counter() - t)
    for b in losses:
        s, q = statistics.median(step[b]) * 1e3, statistics.median(loss[b]) * 1e3
        print(f"{b:<10} D2SMLoss forward+backward {s:7.1f} ms   queue loss alone {q:6.1f} ms ({q / s:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
