"""D2SM forward+backward: one call of D2SMQueue (full queue, warm cache) against recomputing the
reference PKT formula over the whole q-row set with autograd.

    python benchmarks/bench_d2sm.py [--q 1024] [--dim 8192] [--batch 16] [--reps 7] [--no-write]

Each call has the current batch (B rows, with gradient) and the q - B most recent earlier rows
(detached), float32. Providers:

- ``reference``: ``fastloss.d2sm_reference`` (mode pkt) on ``cat(batch, history)``: the
  normalization, the two q x q x D products and the KL with autograd;
- ``D2SMQueue[<backend>]`` (mode pkt, and paper for comparison): the queue of q rows, full,
  cache warm; a call computes the batch's rows against the set and the fused pass;
- ``d2sm_kl[<backend>]``: the fused op from scratch over the same q rows (no cache), to show what
  the cache brings.

Times are medians of ``--reps`` interleaved runs in one process (the batches cycle through a few
fixed ones, so that the queue keeps rotating real rows); peak extra memory is measured in a fresh
process per provider. Writes the ``d2sm`` section of BENCHMARKS.md unless --no-write.
"""
import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastloss  # noqa: E402

N_BATCHES = 4  # distinct batches the calls cycle through


def _rows(n, d, g):
    return torch.randn(n, d, generator=g).relu_()  # post-ReLU features


def make_state(q, d, b, seed=0):
    """The history (q - b rows a side) and N_BATCHES batches, the same for every provider."""
    g = torch.Generator().manual_seed(seed)
    hist = (_rows(q - b, d, g), _rows(q - b, d, g))
    batches = [(_rows(b, d, g).requires_grad_(), _rows(b, d, g)) for _ in range(N_BATCHES)]
    return hist, batches


def providers(q, d, b, hist, backends=None):
    """name -> callable(x, y) that runs one forward+backward call with batch x, y."""
    backend = "cpu" if fastloss.backends()["cpu"]["available"] else "reference"
    hp, ht = hist
    out = {"reference (PKT, autograd)": lambda x, y: fastloss.d2sm_reference(torch.cat([x, hp]), torch.cat([y, ht]),
                                                                             "pkt").backward()}
    for mode in ("pkt", "paper"):
        queue = fastloss.D2SMQueue(q, mode=mode, backend=backend)
        with torch.no_grad():  # fill the queue: the set is then always the batch + q - b earlier rows
            for i in range(0, q - b, b):
                queue(hp[i:i + b], ht[i:i + b])
        out[f"D2SMQueue[{backend}] {mode}"] = lambda x, y, queue=queue: queue(x, y).backward()
    out[f"d2sm_kl[{backend}] pkt, no cache"] = lambda x, y: fastloss.d2sm_kl(
        torch.cat([x, hp]), torch.cat([y, ht]), mode="pkt", backend=backend).backward()
    return out


def peak_memory(name, q, d, b):
    """Peak extra bytes of one forward+backward call of provider ``name`` (run in a fresh process)."""
    warnings.simplefilter("ignore")
    hist, batches = make_state(q, d, b)
    fn = providers(q, d, b, hist)[name]
    fn(*batches[0])  # load extensions and code paths first
    x, y = batches[1]
    return common.peak_extra_bytes(lambda: fn(x, y))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--q", type=int, default=1024, help="rows in the set (the queue size), default 1024")
    ap.add_argument("--dim", type=int, default=8192, help="feature dimension D, default 8192")
    ap.add_argument("--batch", type=int, default=16, help="rows of the current batch B, default 16")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per provider (median), default 7")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.batch < 1 or args.dim < 1 or args.q < 2 or args.batch >= args.q:
        ap.error("need --reps >= 1, --dim >= 1, and 1 <= --batch < --q")
    warnings.simplefilter("ignore")
    q, d, b = args.q, args.dim, args.batch
    info = common.machine()
    hist, batches = make_state(q, d, b)
    provs = providers(q, d, b, hist)
    step = {k: 0 for k in provs}

    def call(name):
        x, y = batches[step[name] % N_BATCHES]
        step[name] += 1
        x.grad = None
        provs[name](x, y)

    med, _ = common.time_interleaved({k: (lambda k=k: call(k)) for k in provs}, args.reps)
    mem = {k: common.measure_in_subprocess("bench_d2sm", "peak_memory", k, q, d, b) for k in provs}
    ref = "reference (PKT, autograd)"
    rows = []
    for k in provs:
        rows.append((k, f"{med[k]*1e3:.1f}", f"{med[ref]/med[k]:.1f}x", f"{mem[k]/2**20:.1f}",
                     f"{mem[k]/mem[ref]:.0%}"))
        print(f"{k:<34} {med[k]*1e3:9.1f} ms  {med[ref]/med[k]:7.1f}x vs reference  peak extra "
              f"{mem[k]/2**20:8.1f} MiB ({mem[k]/mem[ref]:6.1%} of reference)", flush=True)

    notes = ["Each call has the current batch (with gradient) and the q - B most recent earlier rows "
             "(detached); features are post-ReLU Gaussians. The reference is `fastloss.d2sm_reference(..., "
             "\"pkt\")` on `cat(batch, history)` with autograd. `D2SMQueue` runs with its queue full and its "
             "similarity cache warm: per call it multiplies the B new rows with the set (both sides), runs the "
             "fused pass over the cached q x q similarities, and multiplies the B gradient rows back. "
             "`d2sm_kl ... no cache` is the fused op recomputing the q x q similarities from scratch."]
    common.write_report("d2sm", f"## D2SM: one forward + backward call, q={q}, D={d}, batch {b}, float32", argv,
                        args.reps, "one call", info, ["provider", "ms", "speed-up vs reference", "peak extra MiB",
                                                      "memory vs reference"], rows, notes, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
