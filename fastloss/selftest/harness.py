"""The runner of the acceptance run: float64 error arithmetic (``rel_error``, ``Checker``), the run's
hygiene (TF32 off, a poisoned allocator), the knobs that reach a regime at small sizes, ``Case`` and
``Result``, the case list and its shards, and ``run`` with its report and exit code."""
import contextlib
import importlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastloss import _backend

EXIT_PASS, EXIT_MISMATCH, EXIT_NOT_RUN = 0, 1, 2
FAST_BACKENDS = tuple(b for b in _backend.BACKENDS if b != "reference")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class NotRunnable(Exception):
    """The backend cannot run this case here (not built, wrong device, unsupported dtype)."""


class NotApplicable(Exception):
    """Kept for callers; no case raises it. A case that does not apply to a backend or machine (a
    CUDA-only case on the CPU, cuda:1 with one GPU, determinism docs/guarantees.md does not promise) says
    so through its ``applies`` hook, and the harness decides n/a before it runs (``outside``);
    raised from a case's ``run`` it is an error like any other exception."""


# --------------------------------------------------------------------------- error arithmetic
def rel_error(got, truth, metric="max"):
    """float64 relative error of ``got`` against ``truth`` (both taken to the CPU in float64).

    Non-finite entries must match exactly (NaN where truth is NaN, the same infinities), else the
    error is inf. On the finite entries, ``max``: max|a - b| / max|b|; ``norm``: ||a - b|| / ||b||.
    Where truth is all zero the error is absolute (max|a| or ||a||)."""
    a = got.detach().to("cpu", torch.float64)
    b = truth.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return math.inf
    fin_a, fin_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fin_a, fin_b) or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    inf_b = torch.isinf(b)
    if not torch.equal(a[inf_b], b[inf_b]):
        return math.inf
    a, b = a[fin_b], b[fin_b]
    if b.numel() == 0:
        return 0.0
    diff = a - b
    err, scale = (diff.abs().max(), b.abs().max()) if metric == "max" else (diff.norm(), b.norm())
    err, scale = float(err), float(scale)
    return err / scale if scale > 0.0 else err


class Checker:
    """Collects a case's comparisons: label -> float64 error, and whether each is within tolerance."""

    def __init__(self):
        self.errors = {}
        self.tolerances = {}

    def close(self, label, got, truth, tol, metric="max"):
        self.errors[label] = rel_error(got, truth, metric)
        self.tolerances[label] = tol

    def equal(self, label, got, truth):
        """Exact equality (integer outputs such as permutations): error 0 or inf."""
        ok = got.shape == truth.shape and torch.equal(got.detach().cpu(), truth.detach().cpu())
        self.errors[label] = 0.0 if ok else math.inf
        self.tolerances[label] = 0.0

    def true(self, label, ok):
        self.errors[label] = 0.0 if ok else math.inf
        self.tolerances[label] = 0.0

    def passed(self):
        return bool(self.errors) and all(self.errors[k] <= self.tolerances[k] for k in self.errors)


# --------------------------------------------------------------------------- hygiene
@contextlib.contextmanager
def no_tf32():
    """TF32 off for cuDNN and matmul inside; the caller's settings restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def poison(device):
    """Fill freed allocator blocks with 0xFF bytes (NaN for floats, -1 for ints) so that the next
    allocations of a fast call start from garbage, not from an earlier result's bytes."""
    device = torch.device(device)
    if device.type == "cuda":  # the caching allocator hands these blocks out next
        sizes = [1 << k for k in range(9, 27)]
    else:  # best effort: the heap's small-block lists, a few of each size
        sizes = [n for k in range(4, 17) for n in (1 << k, 3 << (k - 1)) for _ in range(4)]
    blocks = [torch.empty(n, dtype=torch.uint8, device=device).fill_(0xFF) for n in sizes]
    del blocks


@contextlib.contextmanager
def _knob(module_name, attr, value):
    """Temporarily set a kernel module's block-size constant (to reach a regime at small sizes)."""
    import importlib

    mod = importlib.import_module(module_name)
    if not hasattr(mod, attr):
        raise RuntimeError(f"selftest: {module_name}.{attr} does not exist; the case list is out of date")
    old = getattr(mod, attr)
    setattr(mod, attr, value)
    try:
        yield
    finally:
        setattr(mod, attr, old)


def _cpu_gen(seed):
    return torch.Generator().manual_seed(seed)



def _to(t, device):
    """``t`` on ``device`` with its strides kept (channels_last and transposed layouts too)."""
    t = t.detach()
    if t.device == torch.device(device):
        return t.clone()
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


# --------------------------------------------------------------------------- the run
@dataclass
class Case:
    """``run(backend, device, chk)`` compares; ``applies(backend, device)``, if given, returns why
    the case does not apply there (a str), or None. Whether a backend takes the case's dtype is
    not the case's to say: ``outside`` reads it from the loss's backend table."""
    name: str
    loss: str
    dtype: torch.dtype
    run: Callable = field(repr=False)
    applies: Optional[Callable] = field(default=None, repr=False)

    @property
    def label(self):
        return f"{self.name} [{_DTYPE_NAMES[self.dtype]}]"


def cases(full=False, huge=False):
    """The case list: ``full`` for the GPU acceptance run, else the quick one the CPU suite runs;
    ``huge`` adds the cases of more than 2^31 elements in one tensor (CUDA, ~50 GB)."""
    # imported here, not at the top: the case files build their cases from this module
    from . import d2sm, fdl, huge as huge_cases, mdf, pdl, steps

    out = pdl._pdl_cases(full) + d2sm._d2sm_cases(full) + mdf._mdf_cases(full) + fdl._fdl_cases(full)
    if full:
        out += steps._whole_step_cases()
    if huge:
        out += huge_cases._huge_cases()
    return out


def select(all_cases, shard=(1, 1), dtypes=None, losses=None):
    """The cases of shard K of N (every N-th, so that shards mix cheap and costly cases)."""
    k, n = shard
    picked = [c for c in all_cases if (dtypes is None or c.dtype in dtypes) and (losses is None or c.loss in losses)]
    return picked[k - 1::n]


@dataclass
class Result:
    case: str
    loss: str
    backend: str
    device: str
    dtype: str
    status: str                      # "pass", "fail", "error", "not run", "n/a"
    errors: dict
    tolerance: dict
    max_error: Optional[float]
    seconds: float
    detail: str = ""


def impls(loss):
    """The backend table (``IMPLS``) of ``loss``'s ops (FDL's sorts run on PDL's)."""
    return importlib.import_module(f"fastloss.{'pdl' if loss == 'fdl' else loss}.ops").IMPLS


def outside(case, backend, device):
    """Why ``case`` lies outside what ``backend`` declares for it, decided before anything runs:
    the dtypes of the backend's row in the loss's table (``fastloss/<loss>/ops.py`` ``IMPLS``), then
    the case's own ``applies`` (a CUDA-only case on the CPU, two GPUs). None: the backend documents
    this case, so it must run and pass; an error it raises is a failure, never n/a."""
    row = impls(case.loss).get(backend)
    if row is None:
        return f"{case.loss} has no {backend!r} row in its backend table"
    if case.dtype not in row.dtypes:
        takes = ", ".join(_DTYPE_NAMES[d] for d in row.dtypes)
        return f"{backend} {case.loss} takes {takes} (fastloss/{case.loss}/ops.py IMPLS), not {_DTYPE_NAMES[case.dtype]}"
    return case.applies(backend, torch.device(device)) if case.applies is not None else None


def acceptance_problem(case, result, device):
    """What is wrong with ``result`` as an acceptance verdict (None if nothing): a case the backend
    documents must pass; only a case ``outside`` it may be n/a (and then must be)."""
    why_outside = outside(case, result.backend, device)
    if why_outside is not None:
        return None if result.status == "n/a" else f"{result.status}: expected n/a ({why_outside})"
    if result.status == "pass":
        return None
    return f"{result.status}: {result.detail} {result.errors} (tolerances {result.tolerance})"


def _run_one(case, backend, device):
    why_out = outside(case, backend, device)
    if why_out is not None:
        return Result(case.label, case.loss, backend, str(device), _DTYPE_NAMES[case.dtype], "n/a", {}, {},
                      None, 0.0, why_out)
    why = _backend.why_not(backend, torch.device(device), case.dtype)
    if why is not None:
        return Result(case.label, case.loss, backend, str(device), _DTYPE_NAMES[case.dtype], "not run", {}, {},
                      None, 0.0, why)
    chk = Checker()
    t0 = time.perf_counter()
    status, detail = "pass", ""
    try:
        case.run(backend, device, chk)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        if not chk.errors:
            status, detail = "error", "the case compared nothing"
        elif not chk.passed():
            status = "fail"
    except NotRunnable as e:
        status, detail = "not run", str(e)
    except Exception as e:  # a crash of a fast path is a failure, reported with its message; so is a
        # BackendError or NotApplicable from a case the backend's table covers (decided above)
        status, detail = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    seconds = time.perf_counter() - t0
    errs = list(chk.errors.values())
    return Result(case.label, case.loss, backend, str(device), _DTYPE_NAMES[case.dtype], status, dict(chk.errors),
                  dict(chk.tolerances), max(errs) if errs else None, seconds, detail)


def exit_code(results, requested_unusable):
    """0 all ran and passed; 1 any mismatch or error; 2 something requested did not run, or nothing ran."""
    if any(r.status in ("fail", "error") for r in results):
        return EXIT_MISMATCH
    ran = [r for r in results if r.status == "pass"]
    if requested_unusable or not ran:
        return EXIT_NOT_RUN
    if any(r.status == "not run" for r in results):
        return EXIT_NOT_RUN
    return EXIT_PASS


def _worst(r):
    """The check closest to (or furthest past) its tolerance, among those with a tolerance."""
    def ratio(k):
        e, t = r.errors[k], r.tolerance[k]
        return (0.0 if e == 0 else math.inf) if t == 0 else e / t
    keys = [k for k in r.errors if r.tolerance[k] > 0 or r.errors[k] > 0]
    return max(keys, key=ratio, default=None)


def _fmt(v):
    return "-" if v is None else ("inf" if v == math.inf else f"{v:.2e}")


def run(device=None, full=False, backends=None, dtypes=None, losses=None, shard=(1, 1), out=sys.stdout,
        case_list=None, huge=False):
    """Run the acceptance cases; return ``(exit code, [Result])``. ``backends=None``: every fast
    backend that can run on ``device``; named backends that cannot run make the exit code 2."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    explicit = backends is not None
    names = [b for b in (backends or FAST_BACKENDS) if b != "reference"]
    reasons = {b: _backend.why_not(b, device, torch.float32) for b in names}
    usable = [b for b in names if reasons[b] is None]
    unusable = {b: why for b, why in reasons.items() if why is not None}
    todo = select(case_list if case_list is not None else cases(full, huge), shard, dtypes, losses)
    print(f"fastloss selftest ({'full' if full else 'quick'}, shard {shard[0]}/{shard[1]}: {len(todo)} cases) "
          f"on {device}; backends: {', '.join(usable) or 'none'}", file=out)
    for b, why in unusable.items():
        print(f"  {'CANNOT RUN' if explicit else 'skipped'} {b}: {why}", file=out)
    print(f"{'case':<64} {'backend':<7} {'max err':>9} {'tol':>8} {'s':>6} result", file=out, flush=True)
    results = []
    with no_tf32():
        for case in todo:
            for b in usable:
                r = _run_one(case, b, device)
                results.append(r)
                worst = _worst(r)
                line = (f"{r.case:<64} {b:<7} {_fmt(r.errors.get(worst)):>9} {_fmt(r.tolerance.get(worst)):>8} "
                        f"{r.seconds:>6.2f} "
                        f"{r.status.upper()}")
                if r.status == "fail":
                    bad = [k for k in r.errors if r.errors[k] > r.tolerance[k]]
                    line += "  (" + "; ".join(f"{k}: {_fmt(r.errors[k])} > {_fmt(r.tolerance[k])}" for k in bad) + ")"
                elif r.detail:
                    line += f"  ({r.detail})"
                print(line, file=out, flush=True)
    code = exit_code(results, explicit and bool(unusable))
    na = [r for r in results if r.status == "n/a"]
    if na:
        print(f"not applicable, outside what the backend declares ({len(na)}):", file=out)
        for r in na:
            print(f"  {r.backend:<7} {r.case}: {r.detail}", file=out)
    n = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "not run", "n/a")}
    counts = (f"{n['pass']} passed, {n['fail']} failed, {n['error']} errors, {n['not run']} not run, "
              f"{n['n/a']} not applicable")
    if not any(r.status in ("pass", "fail", "error") for r in results):
        print(f"nothing was tested: no fast backend ran ({counts})", file=out)
    elif code == EXIT_PASS:
        print(f"all passed: {counts} on {', '.join(usable)}", file=out)
    elif code == EXIT_MISMATCH:
        print(f"MISMATCHES: {counts}", file=out)
    else:
        print(f"INCOMPLETE: {counts}; a requested backend or case could not run", file=out)
    return code, results

