"""``fastloss-bench`` (also ``python -m fastloss.bench``): steps/sec of real training steps.

Trains a small DnCNN-style denoiser (8 conv layers, residual) for a fixed number of steps on
random crops of a generated image with Gaussian noise, under each loss configuration in turn:
pixel L1 only; L1 + VGG16 L1-perceptual (the PDL paper's baseline); and L1 + each fastloss loss
on its ``reference`` backend and on its fast backend. Reports steps/sec relative to pixel-only
and the speed-up of each fast backend over its reference, as a table; writes ``results.json``
and ``steps_per_sec.png`` to the output folder. ``--demo`` instead trains the denoiser with L1
and with L1 + PDL and saves side-by-side PNGs (noisy | L1 | L1 + PDL | clean).

VGG weights are random unless ``--vgg-weights`` names a file (the output says which): the cost
of a step does not depend on the weights' values.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastloss
from fastloss import _backend

PERCEPTUAL_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


# ----------------------------------------------------------------------------- data and model
def make_image(size=256, seed=0):
    """A deterministic synthetic RGB image in [0, 1] (3, size, size): smooth gradients, waves of
    several frequencies, hard-edged shapes and fine texture, so denoising has edges to keep."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    channels = []
    for c in range(3):
        f = torch.rand(4, generator=g) * 12 + 2
        ph = torch.rand(4, generator=g) * 6.28
        img = 0.35 + 0.25 * (xx * (c + 1) / 3 + yy * (3 - c) / 3) / 2
        img = img + 0.08 * torch.sin(f[0] * xx * 6.28 + ph[0]) * torch.cos(f[1] * yy * 6.28 + ph[1])
        img = img + 0.04 * torch.sin((f[2] * xx + f[3] * yy) * 6.28 + ph[2])
        channels.append(img)
    img = torch.stack(channels)
    for _ in range(24):  # rectangles and discs with random colours
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.18]) + torch.tensor([0, 0, 0.03])).tolist()
        colour = torch.rand(3, 1, 1, generator=g)
        if torch.rand(1, generator=g).item() < 0.5:
            mask = ((xx - cx).abs() < r) & ((yy - cy).abs() < r * 0.6)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img = torch.where(mask, 0.7 * colour + 0.3 * img, img)
    img = img + 0.03 * torch.randn(3, size, size, generator=g)  # texture
    return img.clamp(0, 1)


def random_batch(image, batch, crop, sigma, generator):
    """(noisy, clean) crops of ``image`` with Gaussian noise of std ``sigma``."""
    _, h, w = image.shape
    ys = torch.randint(0, h - crop + 1, (batch,), generator=generator)
    xs = torch.randint(0, w - crop + 1, (batch,), generator=generator)
    clean = torch.stack([image[:, y:y + crop, x:x + crop] for y, x in zip(ys.tolist(), xs.tolist())])
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
    return noisy, clean


class DnCNN(nn.Module):
    """A DnCNN-style denoiser: conv+ReLU, (depth-2) x conv+BN+ReLU, conv; predicts the noise."""

    def __init__(self, depth=8, width=32):
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x - self.body(x)


# ----------------------------------------------------------------------------- loss configurations
class VGGPerceptual(nn.Module):
    """The PDL paper's baseline: L1 + weight * sum_l mean|Phi_l(u) - Phi_l(v)| on VGG16 features."""

    def __init__(self, layers, weight, vgg_weights):
        super().__init__()
        from .features import VGG

        self.vgg = VGG("vgg16", layers=layers, weights=vgg_weights)
        self.layers, self.weight = layers, weight

    def forward(self, u, v):
        fu = self.vgg(u)
        with torch.no_grad():
            fv = self.vgg(v)
        return (u - v).abs().mean() + self.weight * sum((fu[k] - fv[k]).abs().mean() for k in self.layers)


class _L1Plus(nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, u, v):
        return (u - v).abs().mean() + self.loss(u, v)


def _fast(device):
    """The backend auto picks for float32 tensors on ``device`` (without warning)."""
    for name in _backend.AUTO_ORDER.get(torch.device(device).type, ()):
        if name != "reference" and _backend.why_not(name, torch.device(device), torch.float32) is None:
            return name
    return None


def _layers(args):
    """The perceptual layers of the vgg and pdl configurations (``--layers``)."""
    return tuple(getattr(args, "layers", None) or PERCEPTUAL_LAYERS)


def _pdl(backend, args):
    return fastloss.PDLLoss(layers=_layers(args), weight=0.01, pixel_weight=1.0,
                            extractor_weights=args.vgg_weights, backend=backend)


def _d2sm(backend, args):
    if not hasattr(fastloss, "D2SMLoss"):
        raise RuntimeError("fastloss.D2SMLoss is not available in this version")
    # the module's defaults (VGG19 conv5_4, a queue of 256): what a user gets; the loss itself is
    # a small part of such a step, whose cost is VGG19's forward and backward
    return _L1Plus(fastloss.D2SMLoss(extractor_weights=args.vgg_weights, backend=backend))


def _mdf(backend, args):
    if not hasattr(fastloss, "MDFLoss"):
        raise RuntimeError("fastloss.MDFLoss is not available in this version")
    return _L1Plus(fastloss.MDFLoss(backend=backend))


# name -> (label, loss family, backend kind, factory(backend, args))
CONFIGS = {
    "l1": ("L1 (pixel only)", "l1", None, lambda b, a: _L1Plus(lambda u, v: u.new_zeros(()))),
    "vgg": ("L1 + VGG16 L1-perceptual", "vgg", None,
            lambda b, a: VGGPerceptual(_layers(a), 0.01, a.vgg_weights)),
    "pdl-ref": ("L1 + PDL (reference)", "pdl", "reference", _pdl),
    "pdl-fast": ("L1 + PDL (fast)", "pdl", "fast", _pdl),
    "d2sm-ref": ("L1 + D2SM (reference)", "d2sm", "reference", _d2sm),
    "d2sm-fast": ("L1 + D2SM (fast)", "d2sm", "fast", _d2sm),
    "mdf-ref": ("L1 + MDF (reference)", "mdf", "reference", _mdf),
    "mdf-fast": ("L1 + MDF (fast)", "mdf", "fast", _mdf),
}


# ----------------------------------------------------------------------------- running
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


def machine_details(args):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
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
    return rows


def format_table(rows, skipped):
    head = f"{'configuration':<28} {'backend':<10} {'steps/s':>8} {'vs L1':>7} {'vs VGG':>7} {'fast/ref':>9}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, suffix="": "-" if v is None else f"{v:.2f}{suffix}"  # noqa: E731
    for r in rows:
        lines.append(f"{r['label']:<28} {r['backend']:<10} {r['steps_per_sec']:>8.2f} {fmt(r['relative_to_pixel']):>7} "
                     f"{fmt(r['relative_to_vgg']):>7} {fmt(r['speedup_vs_reference'], 'x'):>9}")
    for name, why in skipped.items():
        lines.append(f"{CONFIGS[name][0]:<28} skipped: {why}")
    return "\n".join(lines)


NO_MATPLOTLIB = "matplotlib is not installed; `pip install 'fastloss[bench]'` (or `pip install matplotlib`) adds the chart"


def bar_chart(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    labels = [r["label"] for r in rows][::-1]
    vals = [r["relative_to_pixel"] or 0 for r in rows][::-1]
    colours = ["#4c72b0" if r["backend"] in ("-", "reference") else "#dd8452" for r in rows][::-1]
    ax.barh(labels, vals, color=colours)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.2f}", va="center")
    ax.set_xlabel("training steps/sec relative to pixel L1 only (higher is faster)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(vals + [1.0]) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- markdown
def write_markdown_section(path, name, text):
    """Replace (or append) the section ``name`` of the markdown file ``path``, delimited by
    ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    import re

    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = open(path).read() if os.path.exists(path) else "# fastloss benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    with open(path, "w") as f:
        f.write(new)


def markdown_report(result, table, png_path, md_path):
    """The ``steps`` section of BENCHMARKS.md for one run: command, machine, table and chart."""
    st, m = result["settings"], result["machine"]
    rel_png = png_path and os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path)))
    lines = [
        "## Training steps/sec: `fastloss-bench`",
        "",
        f"Command (from the repository root): `{result['command']}`",
        "",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']})"
        + (f", GPU: {m['gpu']}" if m.get("gpu") else ""),
        f"- torch {m['torch']}, triton {m['triton']}, python {m['python']}, fastloss {m['fastloss']}",
        f"- device {m['device']}, fast backend `{m['fast_backend']}`; backends available: "
        + ", ".join(k for k, v in m["backends"].items() if v)
        + (f"; cpu PDL sort kernels: {m['cpu_kernels']}" if m.get("cpu_kernels") else ""),
        f"- DnCNN width {st['width']}, batch {st['batch_size']}, crop {st['crop']}, sigma {st['sigma']}; "
        f"{st['rounds']} rounds x {st['steps']} timed steps per configuration (+{st['warmup']} warm-up), "
        "configurations interleaved round by round; a row is the median step time over all its steps",
        f"- {result['vgg_weights_note']}",
        "",
        "```text",
        table,
        "```",
        "",
        f"![steps/sec relative to pixel-only L1]({rel_png})" if rel_png else f"(no chart: {NO_MATPLOTLIB})",
    ]
    return "\n".join(lines)



MARKDOWN_SECTIONS = ("steps", "pdl-paper")

# Table I of the PDL paper (v2, §5.3): training steps/sec relative to the pixel-only loss
PDL_PAPER_TABLE_I = {"l1": 1.00, "vgg": 0.57, "pdl-ref": 0.57, "pdl-fast": 0.57}


def _load_average():
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them), or None."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def pdl_paper_report(result, table):
    """The ``pdl-paper`` section of BENCHMARKS.md: this run's steps/sec relative to pixel-only
    beside the PDL paper's Table I, and what differs between the two settings."""
    st, m = result["settings"], result["machine"]
    load = result.get("load_average") or {}
    fmt_load = lambda v: "unknown" if not v else " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
    head = f"{'configuration':<28} {'backend':<10} {'steps/s':>8} {'vs pixel':>9} {'paper':>6}"
    lines = [head, "-" * len(head)]
    for r in result["results"]:
        paper = PDL_PAPER_TABLE_I.get(r["config"])
        rel = r["relative_to_pixel"]
        lines.append(f"{r['label']:<28} {r['backend']:<10} {r['steps_per_sec']:>8.3f} "
                     f"{'-' if rel is None else f'{rel:.2f}':>9} {'-' if paper is None else f'{paper:.2f}':>6}")
    return "\n".join([
        "## The PDL paper's Table I setting: `fastloss-bench --layers relu4_3`",
        "",
        f"Command (from the repository root): `{result['command']}`",
        "",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']})"
        + (f", GPU: {m['gpu']}" if m.get("gpu") else ""),
        f"- load average (1 / 5 / 15 min, as `uptime` prints it) before the run {fmt_load(load.get('before'))}, "
        f"after {fmt_load(load.get('after'))}",
        f"- torch {m['torch']}, fastloss {m['fastloss']}, device {m['device']}, fast backend `{m['fast_backend']}`",
        f"- perceptual layers {', '.join(st['layers'])} of VGG16; DnCNN width {st['width']}, batch "
        f"{st['batch_size']}, crop {st['crop']}; {st['rounds']} rounds x {st['steps']} timed steps per "
        f"configuration (+{st['warmup']} warm-up), interleaved round by round; a row is the median step time",
        f"- {result['vgg_weights_note']}",
        "",
        "```text",
        "\n".join(lines),
        "```",
        "",
        "The paper's column is Table I of the PDL paper (v2, §5.3): steps/sec relative to the pixel-only loss, "
        "all perceptual losses on VGG16 conv4 features.",
        "",
        "What differs from the paper's setting:",
        "",
        f"- network: here a DnCNN-style denoiser of 8 conv layers, width {st['width']}; the paper trains SRN "
        "(denoising), EDSR (super-resolution) or DsDeblur, much larger networks, so VGG is a smaller share of "
        "its step than of this one's",
        f"- images: here crops of {st['crop']} x {st['crop']} in batches of {st['batch_size']} from one generated "
        "image; the paper uses 256 x 256 DIV2K crops in batches of 8",
        f"- hardware and framework: here {m['cpu']} ({m['device']}, PyTorch, a machine shared with other jobs); "
        "the paper's implementation is TensorFlow and it does not state its hardware",
        "- VGG weights: random here (the cost of a step does not depend on them); ImageNet in the paper",
        "- the pixel-only row includes fastloss-bench's data preparation and the optimizer step, as every row does",
    ])


# ----------------------------------------------------------------------------- demo
def run_demo(args, image):
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(f"fastloss-bench --demo draws its figure with matplotlib: {NO_MATPLOTLIB}") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    for name in ("l1", "pdl-fast"):
        torch.manual_seed(args.seed)
        backend = _fast(args.device) if name == "pdl-fast" else None
        criterion = CONFIGS[name][3](backend or "reference", args).to(args.device)
        model = DnCNN(width=args.width).to(args.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(args.seed)
        bar = _progress(args.demo_steps, f"demo {name}", not args.no_progress)
        train_steps(model, criterion, opt, image, args, args.demo_steps, gen, bar)
        bar.close()
        results[name] = model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    noisy, clean = random_batch(image, 3, max(args.crop, 64), args.sigma / 255, gen)
    with torch.no_grad():
        l1_out = results["l1"](noisy.to(args.device)).cpu().clamp(0, 1)
        pdl_out = results["pdl-fast"](noisy.to(args.device)).cpu().clamp(0, 1)
    paths = []
    for i in range(noisy.shape[0]):
        fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
        for ax, img, title in zip(axes, (noisy[i].clamp(0, 1), l1_out[i], pdl_out[i], clean[i]),
                                  ("noisy", "restored: L1", "restored: L1 + PDL", "clean")):
            psnr = -10 * math.log10(max(F.mse_loss(img, clean[i]).item(), 1e-12))
            ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_title(f"{title}\nPSNR {psnr:.2f} dB" if title != "clean" else title, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(args.out, f"demo_{i}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    print(f"demo: trained {args.demo_steps} steps with L1 and with L1 + PDL "
          f"({'random' if args.vgg_weights is None else args.vgg_weights} VGG weights); wrote {', '.join(paths)}")
    return paths


# ----------------------------------------------------------------------------- CLI
def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _parse_layers(ap, text):
    from .features import layer_names

    names = [n.strip() for n in text.split(",") if n.strip()]
    valid = layer_names("vgg16")
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        ap.error(f"--layers: unknown VGG16 layer(s) {unknown or text!r}; choose from {', '.join(valid)}")
    if len(set(names)) != len(names):
        ap.error(f"--layers: repeated layer(s) in {text!r}")
    return tuple(names)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="fastloss-bench", description=__doc__.split("\n\n")[0],
                                 epilog="configurations: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=_positive_int, default=3,
                    help="timed training steps per configuration and round (default 3)")
    ap.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--rounds", type=_positive_int, default=10,
                    help="rounds that run every configuration in turn, --steps timed steps each; "
                         "a row is the median over all its steps (default 10)")
    ap.add_argument("--batch-size", type=_positive_int, default=4, help="default 4")
    ap.add_argument("--crop", type=_positive_int, default=96, help="crop size in pixels (default 96)")
    ap.add_argument("--width", type=_positive_int, default=32, help="denoiser channels (default 32)")
    ap.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0-255 scale (default 25)")
    ap.add_argument("--configs", default="all", help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--layers", default=",".join(PERCEPTUAL_LAYERS),
                    help="comma-separated VGG16 layers of the L1-perceptual and PDL configurations (default "
                         f"{','.join(PERCEPTUAL_LAYERS)}; the PDL paper's setting is relu4_3, its conv4 features)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="fastloss-bench-out", help="output folder (default ./fastloss-bench-out)")
    ap.add_argument("--vgg-weights", default=None,
                    help="torchvision-format VGG16/19 state dict, or 'torchvision' (local cache); default random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo", action="store_true", help="train with L1 and L1 + PDL and save side-by-side PNGs")
    ap.add_argument("--demo-steps", type=_positive_int, default=300, help="training steps per model in --demo (default 300)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--markdown", default=None, metavar="FILE",
                    help="also write the table, the command, the machine and the chart into FILE "
                         "(the 'steps' section between its markers, e.g. BENCHMARKS.md)")
    ap.add_argument("--markdown-section", default="steps", choices=MARKDOWN_SECTIONS,
                    help="the section --markdown writes: 'steps' (default), or 'pdl-paper', the table beside "
                         "the PDL paper's Table I (pixel-only 1.00, L1-perceptual 0.57, PDL 0.57)")
    args = ap.parse_args(argv)
    if args.configs == "all":
        args.configs = list(CONFIGS)
    else:
        args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in args.configs if c not in CONFIGS]
        if unknown or not args.configs:
            ap.error(f"--configs: unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    args.layers = _parse_layers(ap, args.layers)
    if args.crop < 16:
        ap.error(f"--crop must be at least 16 pixels (VGG pools 3 times before relu4_3), got {args.crop}")
    if args.crop > 256:
        ap.error(f"--crop must be at most 256, the size of the generated image, got {args.crop}")
    if not (0 <= args.sigma <= 255):
        ap.error(f"--sigma must be in [0, 255], got {args.sigma}")
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device: not a device: {args.device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    image = make_image()
    weights_note = ("VGG weights: random (speed runs only; the cost of a step does not depend on them)"
                    if args.vgg_weights is None else f"VGG weights: {args.vgg_weights}")
    if args.demo:
        run_demo(args, image)
        return 0
    info = machine_details(args)
    print(f"fastloss-bench: {args.steps} steps (+{args.warmup} warm-up) per configuration, batch {args.batch_size}, "
          f"crop {args.crop}, DnCNN width {args.width}, device {args.device}, fast backend {info['fast_backend']}")
    print(weights_note)
    # Every configuration is set up first, then the rounds run them in turn (l1, vgg, ..., l1,
    # vgg, ...): a machine that slows down for a while slows every configuration alike, and each
    # row is the median over all its timed steps.
    load_before = _load_average()
    states, skipped = [], {}
    for name in args.configs:
        try:
            states.append(setup_config(name, args, image))
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            skipped[name] = str(e).splitlines()[0]
    for r in range(args.rounds):
        for state in list(states):
            try:
                run_round(state, args, image, r)
            except (RuntimeError, ValueError) as e:
                skipped[state["name"]] = str(e).splitlines()[0]
                states.remove(state)
    rows = [result_row(state, args) for state in states]
    add_ratios(rows)
    table = format_table(rows, skipped)
    print(table)
    result = {"command": "fastloss-bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(args).items() if k != "demo"}, "vgg_weights_note": weights_note,
              "machine": info, "results": rows, "skipped": skipped,
              "load_average": {"before": load_before, "after": _load_average()}}
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    png_path = os.path.join(args.out, "steps_per_sec.png")
    if rows:
        try:
            bar_chart(rows, png_path, f"fastloss-bench on {info['cpu']} ({args.device}), batch {args.batch_size}, "
                                      f"crop {args.crop}")
        except ImportError as e:  # matplotlib is in the bench extra only
            print(f"no chart: {NO_MATPLOTLIB} ({e})")
            png_path = None
    print(f"wrote {json_path}" + (f" and {png_path}" if rows and png_path else ""))
    if args.markdown and rows:
        section = args.markdown_section
        text = (pdl_paper_report(result, table) if section == "pdl-paper"
                else markdown_report(result, table, png_path, args.markdown))
        write_markdown_section(args.markdown, section, text)
        print(f"wrote the '{section}' section of {args.markdown}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
