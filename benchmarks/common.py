"""Helpers shared by the benchmark scripts: side-by-side timing, peak memory, machine details,
and writing one section of BENCHMARKS.md."""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def machine():
    """CPU model, threads and library versions, for the record."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import fastloss

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "fastloss": fastloss.__version__,
        "backends": {k: v["available"] for k, v in fastloss.backends().items()},
    }


def time_interleaved(fns, reps, warmup=1):
    """Median seconds of each callable in ``fns`` (a dict), runs interleaved round-robin so that
    machine noise hits every provider alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, times


def _vm_hwm_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found")


def _vm_rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found")


def peak_extra_bytes(fn):
    """Peak resident memory that one call of ``fn`` adds over what is resident before it (Linux):
    the high-water mark is reset through /proc/self/clear_refs, then read after the call.
    Run it in a fresh process per provider (see ``measure_in_subprocess``) so that one
    provider's freed memory cannot hide the next one's."""
    before = _vm_rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (_vm_hwm_kib() - before) * 1024


def measure_in_subprocess(module, func, *args):
    """Call ``module.func(*args)`` in a fresh interpreter and return its JSON result."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import {module} as m; print(json.dumps(m.{func}(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_section(name, text):
    """Replace (or append) the section ``name`` of BENCHMARKS.md, delimited by HTML comments."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = open(BENCHMARKS_MD).read() if os.path.exists(BENCHMARKS_MD) else "# fastloss benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    with open(BENCHMARKS_MD, "w") as f:
        f.write(new)


def machine_lines(info):
    return [f"- CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']})",
            f"- torch {info['torch']}, triton {info['triton']}, python {info['python']}, fastloss {info['fastloss']}",
            f"- backends available: {', '.join(k for k, v in info['backends'].items() if v)}"]
