"""Helpers shared by the benchmark scripts: side-by-side timing, peak memory, machine details,
and writing one section of BENCHMARKS.md (``write_report``)."""
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def machine():
    """CPU model, threads and library versions, for the record."""
    import fastloss
    from fastloss._backend import cpu_kernels
    from fastloss.bench.run import cpu_flags, cpu_model, triton_version

    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version() or "not installed",
        "python": platform.python_version(),
        "fastloss": fastloss.__version__,
        "backends": {k: v["available"] for k, v in fastloss.backends().items()},
        "cpu_kernels": cpu_kernels(),
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


def peak_extra_memory(fn, device="cpu"):
    """``(key, bytes)``: the peak memory that one call of ``fn`` adds, for a microbenchmark's
    ``extra_info[key]``. On the CPU, ``peak_extra_bytes`` (resident memory of this process, key
    ``peak_extra_bytes_in_process``); on a GPU, allocated device memory over what is allocated
    before the call (``torch.cuda`` peak statistics, key ``peak_extra_cuda_bytes``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "peak_extra_bytes_in_process", peak_extra_bytes(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return "peak_extra_cuda_bytes", torch.cuda.max_memory_allocated(device) - before


def micro_backends():
    """``[(backend, device)]`` the microbenchmarks run: ``reference`` and ``cpu`` (if built) on the
    CPU; with a CUDA device, ``reference``, ``triton`` and ``cuda`` (those available) on it. Triton
    is taken only on a real GPU, never under ``TRITON_INTERPRET`` (far too slow to time)."""
    import fastloss

    avail = {k: v["available"] for k, v in fastloss.backends().items()}
    out = [(b, "cpu") for b in ("reference", "cpu") if avail[b]]
    if torch.cuda.is_available():
        out += [(b, "cuda") for b in ("reference", "triton", "cuda") if b == "reference" or avail[b]]
    return out


def micro_devices():
    """The devices of ``micro_backends()``, the CPU first: where the peers run too."""
    return sorted({dev for _, dev in micro_backends()}, key=lambda d: d != "cpu")


def micro_label(what, device):
    """A provider's name in test ids and reports: ``what`` on the CPU, ``what[cuda]`` on a GPU."""
    return what if device == "cpu" else f"{what}[{device}]"


def micro_run(fn, inputs, passes, device="cpu"):
    """The callable a microbenchmark times: ``x, y = inputs()``, then ``fn(x, y)``, and with
    ``passes="forward+backward"`` the backward of its sum (x's gradient cleared first); waits for
    the GPU when ``device`` is one."""
    def run():
        x, y = inputs()
        x.grad = None
        out = fn(x, y)
        if passes != "forward":
            out.sum().backward()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run


def micro_measure(benchmark, run, group, device="cpu", **info):
    """One warm-up call of ``run`` (extensions, code paths, caches), then the peak extra memory
    of one call (``peak_extra_memory``) into ``benchmark.extra_info`` with ``device`` and ``info``,
    then the timed runs, in benchmark group ``group``."""
    run()
    key, peak = peak_extra_memory(run, device)
    benchmark.group = group
    benchmark.extra_info.update(device=str(device), **info)
    benchmark.extra_info[key] = peak
    benchmark(run)


def measure_in_subprocess(module, func, *args):
    """Call ``module.func(*args)`` in a fresh interpreter and return its JSON result."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import {module} as m; print(json.dumps(m.{func}(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_section(name, text):
    """Replace (or append) the section ``name`` of BENCHMARKS.md, delimited by HTML comments, and
    say so."""
    from fastloss.bench import write_markdown_section

    write_markdown_section(BENCHMARKS_MD, name, text)
    print(f"wrote the {name} section of {BENCHMARKS_MD}")


def machine_lines(info):
    from fastloss.bench.report import flags_text

    flag_text = flags_text(info.get("cpu_flags"))
    return [f"- CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}"
            f"{flag_text})",
            f"- torch {info['torch']}, triton {info['triton']}, python {info['python']}, fastloss {info['fastloss']}",
            f"- backends available: {', '.join(k for k, v in info['backends'].items() if v)}"
            + (f"; cpu PDL sort kernels: {info['cpu_kernels']}" if info.get("cpu_kernels") else "")]


def markdown_table(columns, rows, left=1):
    """The lines of a Markdown table: ``columns`` (headers), ``rows`` (cells, already formatted);
    the first ``left`` columns left-aligned, the others (numbers) right-aligned."""
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * left + "---:|" * (len(columns) - left)]
            + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def write_report(section, title, argv, reps, peak_of, info, columns, rows, notes, intro=(), left=1, write=True):
    """The ``section`` of BENCHMARKS.md written by ``benchmarks/bench_<section>.py``: ``title``; the
    command (that script with ``argv``, or with this process's arguments when ``argv`` is None) and
    how it measured (median of ``reps`` interleaved runs, the peak extra resident memory of
    ``peak_of``, each provider in a fresh process); the ``intro`` lines; the machine (``info``, from
    ``machine()``); the table (``markdown_table(columns, rows, left)``); the ``notes`` lines.
    Writes it when ``write`` and says so; returns the text."""
    cmd = f"python benchmarks/bench_{section}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [title, "",
             f"Command: `{cmd.strip()}` (median of {reps} interleaved runs in one process; peak extra "
             f"resident memory of {peak_of}, each provider in a fresh process).", ""]
    lines += list(intro) + machine_lines(info) + [""] + markdown_table(columns, rows, left) + [""] + list(notes)
    text = "\n".join(lines)
    if write:
        write_section(section, text)
    return text
