"""The timed run of fastloss-bench: training steps of one configuration, rounds that interleave the
configurations, a configuration's result row, the ratios between rows, and the machine it ran on."""
import os
import platform
import statistics
import sys
import time

import torch

import fastloss
from fastloss import _backend

from .model import CONFIGS, DnCNN, _fast, random_batch


def _progress(total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a bench dependency
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def train_steps(model, criterion, opt, image, args, steps, generator, bar=None):
    """Run ``steps`` training steps; return (seconds per step of each step, last loss)."""
    times, last = [], float("nan")
    for _ in range(steps):
        noisy, clean = random_batch(image, args.batch_size, args.crop, args.sigma / 255, generator)
        noisy, clean = noisy.to(args.device), clean.to(args.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = criterion(model(noisy), clean)
        loss.backward()
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        last = loss.item()
        if bar is not None:
            bar.update(1)
    return times, last


def setup_config(name, args, image):
    """A fresh model, optimizer and loss for configuration ``name``, ready to train."""
    label, family, kind, factory = CONFIGS[name]
    backend = None
    if kind == "fast":
        backend = _fast(args.device)
        if backend is None:
            raise RuntimeError(f"no fast backend can run on {args.device}: {fastloss.backends()}")
    elif kind == "reference":
        backend = "reference"
    torch.manual_seed(args.seed)
    criterion = factory(backend, args).to(args.device)
    model = DnCNN(width=args.width).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    return {"name": name, "label": label, "family": family, "backend": backend, "criterion": criterion,
            "model": model, "opt": opt, "gen": gen, "times": [], "round_medians": [], "last": float("nan")}


def run_round(state, args, image, round_index):
    """One round of ``config``: the warm-up steps (first round only), then ``args.steps`` timed."""
    warm = args.warmup if round_index == 0 else 0
    desc = f"{state['name']:<9}" + (f" {round_index + 1}/{args.rounds}" if args.rounds > 1 else "")
    bar = _progress(warm + args.steps, desc, not args.no_progress)
    train_steps(state["model"], state["criterion"], state["opt"], image, args, warm, state["gen"], bar)
    times, state["last"] = train_steps(state["model"], state["criterion"], state["opt"], image, args, args.steps,
                                       state["gen"], bar)
    bar.close()
    state["times"] += times
    state["round_medians"].append(statistics.median(times))


def result_row(state, args):
    sec = statistics.median(state["times"])
    return {"config": state["name"], "label": state["label"], "loss": state["family"],
            "backend": state["backend"] or "-", "steps": args.steps, "rounds": args.rounds,
            "warmup_steps": args.warmup, "median_step_seconds": sec, "steps_per_sec": 1.0 / sec,
            "round_median_step_seconds": state["round_medians"], "total_seconds": sum(state["times"]),
            "final_loss": state["last"]}


def run_config(name, args, image):
    """Set up and run one configuration on its own (all its rounds); its result row."""
    state = setup_config(name, args, image)
    for r in range(args.rounds):
        run_round(state, args, image, r)
    return result_row(state, args)


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``), for the record of every benchmark."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def triton_version():
    """The installed triton's version, or None."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def cpu_flags():
    """The CPU's bfloat16 / AMX / AVX-512 flags (``/proc/cpuinfo``) and torch's CPU capability:
    what decides how fast a bfloat16 backbone runs here."""
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return {"flags": [w for w in wanted if w in flags], "torch_cpu_capability": capability}


def machine_details(args):
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version(), "python": platform.python_version(),
            "fastloss": fastloss.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "backends": {k: v["available"] for k, v in fastloss.backends().items()},
            "fast_backend": _fast(args.device), "cpu_kernels": _backend.cpu_kernels()}


def add_ratios(rows):
    """steps/sec relative to pixel-only, and each fast row's speed-up over its reference row."""
    base = next((r["steps_per_sec"] for r in rows if r["config"] == "l1"), None)
    vgg = next((r["steps_per_sec"] for r in rows if r["config"] == "vgg"), None)
    by_name = {r["config"]: r for r in rows}
    for r in rows:
        r["relative_to_pixel"] = r["steps_per_sec"] / base if base else None
        r["relative_to_vgg"] = r["steps_per_sec"] / vgg if vgg else None
        ref = by_name.get(r["config"].replace("-fast", "-ref")) if r["config"].endswith("-fast") else None
        r["speedup_vs_reference"] = r["steps_per_sec"] / ref["steps_per_sec"] if ref else None
        hand = by_name.get("vgg-autocast")
        r["relative_to_vgg_autocast"] = r["steps_per_sec"] / hand["steps_per_sec"] if hand else None
        added = by_name.get(COMBINED_VS_ADDED.get(r["config"], ""))
        r["speedup_vs_added"] = r["steps_per_sec"] / added["steps_per_sec"] if added else None
    return rows


# a combine() row -> the row of the same losses added as separate modules, at the same precision
COMBINED_VS_ADDED = {"combined": "perc+pdl", "combined-bf16": "perc+pdl-bf16"}



def _load_average():
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them), or None."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None
