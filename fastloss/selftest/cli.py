"""``python -m fastloss.selftest``'s command line: flags, ``--list``, ``--json``."""
import argparse
import json
import math
import sys

import torch

from fastloss import _backend

from .harness import DTYPES, EXIT_PASS, FAST_BACKENDS, cases, outside, run, select


def _summary():
    """The first line of the package docstring (the one that documents the run)."""
    return sys.modules[__package__].__doc__.splitlines()[0]


def _shard(text):
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastloss.selftest", description=_summary())
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default; what the CPU test suite runs)")
    size.add_argument("--full", action="store_true", help="every regime at full size, and the whole-step cases")
    ap.add_argument("--huge", action="store_true",
                    help="add PDL and D2SM cases of more than 2^31 elements in one tensor (64-bit offsets; CUDA, ~50 GB of "
                         "GPU memory; run them alone, not beside other shards)")
    ap.add_argument("--backends", nargs="+", choices=FAST_BACKENDS, help="default: every fast backend usable here")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: all four")
    ap.add_argument("--losses", nargs="+", choices=["pdl", "d2sm", "mdf", "fdl"], help="default: all four")
    ap.add_argument("--shard", type=_shard, default=(1, 1), metavar="K/N", help="run every N-th case from the K-th")
    ap.add_argument("--json", metavar="FILE", help="write every case's result here")
    ap.add_argument("--list", action="store_true",
                    help="print each case (dtype in brackets) with the backends that must run it and those it is "
                         "n/a on, as on --device (default for --list: cuda), and exit without running anything")
    args = ap.parse_args(argv)
    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else None
    if args.list:
        device = torch.device(args.device or "cuda")
        print(f"# {'full' if args.full else 'quick'} case list; backends as on {device}: 'runs' must pass there, "
              f"'n/a' is outside what the backend declares")
        # the backends that take tensors of this device type (triton on the CPU: under the interpreter)
        names = [b for b in FAST_BACKENDS if _backend._REGISTRY[b][1].get(device.type)]
        for c in select(cases(args.full, args.huge), args.shard, dtypes, args.losses):
            why = {b: outside(c, b, device) for b in names}
            runs = [b for b in names if why[b] is None]
            na = "; ".join(f"{b}: {w}" for b, w in why.items() if w is not None)
            print(f"{c.label:<64} runs: {','.join(runs) or '-'}" + (f"  n/a: {na}" if na else ""))
        return EXIT_PASS
    code, results = run(args.device, args.full, args.backends, dtypes, args.losses, args.shard, huge=args.huge)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"exit_code": code, "results": [
                {"name": r.case, "loss": r.loss, "backend": r.backend, "device": r.device, "dtype": r.dtype,
                 "status": r.status, "pass": r.status == "pass",
                 "errors": {k: (None if v == math.inf else v) for k, v in r.errors.items()},
                 "max_error": None if r.max_error in (None, math.inf) else r.max_error,
                 "tolerance": r.tolerance, "seconds": round(r.seconds, 4), "detail": r.detail}
                for r in results]}, f, indent=1)
    return code
