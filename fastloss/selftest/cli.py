"""``python -m fastloss.selftest``'s command line: flags, ``--list``, ``--json``."""
import argparse
import json
import math
import sys

from .harness import DTYPES, EXIT_PASS, FAST_BACKENDS, cases, run, select


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
    ap.add_argument("--backends", nargs="+", choices=FAST_BACKENDS, help="default: every fast backend usable here")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: all four")
    ap.add_argument("--losses", nargs="+", choices=["pdl", "d2sm", "mdf"], help="default: all three")
    ap.add_argument("--shard", type=_shard, default=(1, 1), metavar="K/N", help="run every N-th case from the K-th")
    ap.add_argument("--json", metavar="FILE", help="write every case's result here")
    ap.add_argument("--list", action="store_true", help="print the case list and exit")
    args = ap.parse_args(argv)
    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else None
    if args.list:
        for c in select(cases(args.full), args.shard, dtypes, args.losses):
            print(c.label)
        return EXIT_PASS
    code, results = run(args.device, args.full, args.backends, dtypes, args.losses, args.shard)
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
