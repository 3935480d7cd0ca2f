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
import os
import sys

import torch

from .demo import run_demo, run_precision_check
from .model import CONFIGS, OPT_IN, PERCEPTUAL_LAYERS, make_image
from .report import MARKDOWN_SECTIONS, NO_MATPLOTLIB, bar_chart, format_table, markdown_report, \
    pdl_paper_report, write_markdown_section
from .run import _load_average, add_ratios, machine_details, result_row, run_round, setup_config


def _int_at_least(low, what):
    """An argparse type: an int >= ``low``, else the error names ``what`` it expected."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _parse_layers(ap, text):
    from ..features import layer_names

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
                                 epilog="configurations: " + ", ".join(CONFIGS) + "; 'all' leaves out "
                                        + ", ".join(OPT_IN) + " (slow on a CPU: name them, e.g. --configs "
                                        "l1,fdl-ref,fdl-fast)")
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
    ap.add_argument("--configs", default="all", help="comma-separated subset of: " + ", ".join(CONFIGS)
                    + f"; default all, which leaves out {', '.join(OPT_IN)}")
    ap.add_argument("--layers", default=",".join(PERCEPTUAL_LAYERS),
                    help="comma-separated VGG16 layers of the L1-perceptual and PDL configurations (default "
                         f"{','.join(PERCEPTUAL_LAYERS)}; the PDL paper's setting is relu4_3, its conv4 features)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="fastloss-bench-out", help="output folder (default ./fastloss-bench-out)")
    ap.add_argument("--vgg-weights", default=None,
                    help="torchvision-format VGG16/19 state dict, or 'torchvision' (the torch hub cache, downloaded on first use); default random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo", action="store_true", help="train with L1 and L1 + PDL and save side-by-side PNGs")
    ap.add_argument("--demo-steps", type=_positive_int, default=300,
                    help="training steps per model in --demo and --precision-check (default 300)")
    ap.add_argument("--precision-check", action="store_true",
                    help="train the denoiser with PDL on a float32 and on a bfloat16 backbone from one seed and "
                         "print the PSNR each reaches on held-out crops")
    ap.add_argument("--precision-seeds", type=_positive_int, default=2,
                    help="--precision-check: seeds to train from (default 2; the float32 runs' spread across "
                         "seeds is the control the bfloat16 difference is read against)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--markdown", default=None, metavar="FILE",
                    help="also write the table, the command, the machine and the chart into FILE "
                         "(the 'steps' section between its markers, e.g. BENCHMARKS.md)")
    ap.add_argument("--markdown-section", default="steps", choices=MARKDOWN_SECTIONS,
                    help="the section --markdown writes: 'steps' (default), or 'pdl-paper', the table beside "
                         "the PDL paper's Table I (pixel-only 1.00, L1-perceptual 0.57, PDL 0.57)")
    args = ap.parse_args(argv)
    if args.configs == "all":
        args.configs = [c for c in CONFIGS if c not in OPT_IN]
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
    if args.precision_check:
        result = run_precision_check(args, image)
        if args.markdown:
            info = machine_details(args)
            text = "\n".join([
                "## bfloat16 backbone in training: `fastloss-bench --precision-check`", "",
                f"Command: `fastloss-bench {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
                f"- CPU: {info['cpu']}; torch {info['torch']}; {weights_note}",
                f"- the bench's DnCNN denoiser (width {args.width}), L1 + PDL ({', '.join(args.layers or PERCEPTUAL_LAYERS)}), "
                f"{result['steps']} steps from seeds {result['seeds']}, batch {args.batch_size}, crop {args.crop}, "
                f"sigma {args.sigma}; PSNR on {result['crops']} held-out crops", "",
                "| seed | float32 backbone (`pdl-fast`), dB | bfloat16 backbone (`pdl-bf16`), dB | difference |",
                "|---:|---:|---:|---:|",
                *[f"| {s} | {f:.3f} | {b:.3f} | {b - f:+.3f} |"
                  for s, f, b in zip(result["seeds"], result["pdl-fast"], result["pdl-bf16"])], "",
                f"Mean difference {result['mean_difference_db']:+.3f} dB; the float32 runs from different seeds "
                f"span {result['float32_spread_db']:.3f} dB (the control)."])
            write_markdown_section(args.markdown, "precision", text)
            print(f"wrote the 'precision' section of {args.markdown}")
        with open(os.path.join(args.out, "precision.json"), "w") as f:
            json.dump(result, f, indent=1)
        return 0
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
