"""What fastloss-bench writes: the table, the steps/sec chart, and the sections of BENCHMARKS.md
(``steps``: the run as it is; ``pdl-paper``: beside the PDL paper's Table I)."""
import os

from .model import CONFIGS


def flags_text(f):
    """``run.cpu_flags()`` for a header: "; flags: avx512f avx512_bf16, no AMX, torch CPU capability
    AVX512" (AMX's absence said outright: it decides what bfloat16 gives); "" without them."""
    if not f:
        return ""
    present = list(f.get("flags") or [])
    words = " ".join(present or ["no avx512"]) + ("" if any(w.startswith("amx") for w in present) else ", no AMX")
    return f"; flags: {words}, torch CPU capability {f.get('torch_cpu_capability')}"


def _flags(m):
    """The CPU's bfloat16-relevant flags, for the header (``run.cpu_flags``)."""
    return flags_text(m.get("cpu_flags"))


def format_table(rows, skipped):
    w = max([28] + [len(r["label"]) for r in rows])
    head = (f"{'configuration':<{w}} {'backend':<10} {'steps/s':>8} {'vs L1':>7} {'vs VGG':>7} {'vs VGG ac':>9} "
            f"{'fast/ref':>9} {'vs added':>9}")
    lines = [head, "-" * len(head)]
    fmt = lambda v, suffix="": "-" if v is None else f"{v:.2f}{suffix}"  # noqa: E731
    for r in rows:
        lines.append(f"{r['label']:<{w}} {r['backend']:<10} {r['steps_per_sec']:>8.2f} {fmt(r['relative_to_pixel']):>7} "
                     f"{fmt(r['relative_to_vgg']):>7} {fmt(r.get('relative_to_vgg_autocast')):>9} "
                     f"{fmt(r['speedup_vs_reference'], 'x'):>9} {fmt(r.get('speedup_vs_added'), 'x'):>9}")
    for name, why in skipped.items():
        lines.append(f"{CONFIGS[name][0]:<{w}} skipped: {why}")
    return "\n".join(lines)


NO_MATPLOTLIB = "matplotlib is not installed; `pip install 'fastloss[bench]'` (or `pip install matplotlib`) adds the chart"


# What a bar's colour says: no fastloss loss (the pixel and hand-written VGG baselines), a fastloss
# loss on its reference backend (plain PyTorch), or on its fast backend (fused kernels).
BAR_KINDS = {
    "baseline": ("#8c8c8c", "baseline (no fastloss loss)"),
    "reference": ("#4c72b0", "fastloss, reference backend"),
    "fast": ("#dd8452", "fastloss, fast backend"),
}


def bar_kind(backend):
    """The BAR_KINDS key of a result row's ``backend`` ("-", "reference", or a fast backend's name)."""
    return "baseline" if backend in ("-", None) else "reference" if backend == "reference" else "fast"


def bar_chart(rows, path, title):
    """The steps/sec chart of ``rows`` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = chart_figure(rows, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chart_figure(rows, title):
    """The chart: one bar per row, relative to pixel-only, coloured by BAR_KINDS, with a legend
    naming the kinds drawn (the fast backend's name beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 2.0))
    labels = [r["label"] for r in rows][::-1]
    vals = [r["relative_to_pixel"] or 0 for r in rows][::-1]
    kinds = [bar_kind(r["backend"]) for r in rows][::-1]
    ax.barh(labels, vals, color=[BAR_KINDS[k][0] for k in kinds])
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.2f}", va="center")
    ax.set_xlabel("training steps/sec relative to pixel L1 only (higher is faster)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(vals + [1.0]) * 1.15)
    fast = sorted({r["backend"] for r in rows if bar_kind(r["backend"]) == "fast"})
    shown = [k for k in BAR_KINDS if k in kinds]  # the legend lists the kinds of bar drawn
    handles = [Patch(color=BAR_KINDS[k][0], label=BAR_KINDS[k][1] + (f" ({', '.join(fast)})" if k == "fast" else ""))
               for k in shown]
    fig.legend(handles=handles, loc="lower center", ncol=len(shown), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))  # room for the legend below
    return fig


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
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}{_flags(m)})"
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
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}{_flags(m)})"
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

