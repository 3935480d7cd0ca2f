"""The paper's Table 1 row pair on this CPU: MDF (8 discriminators) against VGG16 features, forward
and backward milliseconds and parameter size.

    python benchmarks/bench_mdf_table1.py [--reps 5] [--shape 4x3x128x128] [--no-write]

The paper (Mustafa et al., WACV 2022, Table 1, on a GPU) reports MDF 11 ms inference, 4.0 ms
backpropagation, 4.2 MB, against VGG 27 / 21.8 ms and 58.9 MB. Here, per provider, one call is
``loss = crit(pred, target)`` (timed: forward, building what the backward needs) then
``loss.backward()`` (timed: backward to pred). MDF: the 8 published JPEG discriminators (else the
shipped ``jpeg`` set), the published-order reference and the fast path (float32 and bfloat16).
VGG16: the whole convolutional stack (the 58.9 MB of Table 1 is VGG16's 14.7 M convolution
parameters in float32), the loss the sum of MSEs at relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3, random weights (the time does not depend on their values). Medians of ``--reps``
interleaved runs. Writes the ``mdf-table1`` section of BENCHMARKS.md unless --no-write.
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_mdf import _inputs, default_weights  # noqa: E402

import fastloss  # noqa: E402
from fastloss.features import vgg16  # noqa: E402

VGG_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


class VGGLoss(torch.nn.Module):
    """sum over VGG_LAYERS of MSE(phi(pred), phi(target)), the target's features without a graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = vgg16(layers=VGG_LAYERS, weights=None)

    def forward(self, pred, target):
        fp = self.net(pred)
        with torch.no_grad():
            ft = self.net(target)
        return sum(F.mse_loss(fp[k], ft[k]) for k in VGG_LAYERS)


def mdf_megabytes(weights):
    """float32 MB of one set's tensors (convolutions, biases, BatchNorm parameters and statistics)."""
    w = fastloss.mdf.load(weights)
    return sum(t.numel() for d in w.discriminators for t in d.values()) * 4 / 1e6


def vgg_megabytes(loss):
    return sum(p.numel() for p in loss.net.parameters()) * 4 / 1e6


def main(argv=None):
    load_before = os.getloadavg()[0]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4x3x128x128", help="BxCxHxW, default: %(default)s")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per provider (median), default 5")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    warnings.simplefilter("ignore")
    weights = default_weights()
    info = common.machine()
    vgg = VGGLoss()
    provs = {"MDF, 8 discriminators (reference)": fastloss.MDFLoss(weights, backend="reference")}
    if fastloss.backends()["cpu"]["available"]:
        provs["MDF, 8 discriminators (fast, float32)"] = fastloss.MDFLoss(weights, backend="cpu")
        provs["MDF, 8 discriminators (fast, bfloat16)"] = fastloss.MDFLoss(weights, backend="cpu",
                                                                           compute_dtype=torch.bfloat16)
    provs["VGG16 features (5 layers)"] = vgg
    x, y = _inputs(shape)
    fwd = {k: [] for k in provs}
    bwd = {k: [] for k in provs}
    for rep in range(args.reps + 1):  # the first round warms up
        for k, crit in provs.items():
            x.grad = None
            t0 = time.perf_counter()
            loss = crit(x, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if rep:
                fwd[k].append(t1 - t0)
                bwd[k].append(t2 - t1)
    mdf_mb, vgg_mb = mdf_megabytes(weights), vgg_megabytes(vgg)
    rows = []
    for k in provs:
        f, b = statistics.median(fwd[k]) * 1e3, statistics.median(bwd[k]) * 1e3
        mb = vgg_mb if k.startswith("VGG") else mdf_mb
        rows.append((k, f"{f:.0f}", f"{b:.0f}", f"{mb:.1f}"))
        print(f"{k:<42} forward {f:8.0f} ms  backward {b:8.0f} ms  {mb:6.1f} MB", flush=True)
    rows += [("paper, Table 1 (GPU): MDF", "11", "4.0", "4.2"), ("paper, Table 1 (GPU): VGG", "27", "21.8", "58.9")]
    w = fastloss.mdf.load(weights)
    cmd = "python benchmarks/bench_mdf_table1.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## MDF vs VGG16: the paper's Table 1 on this CPU", "",
             f"Command: `{cmd.strip()}` (median of {args.reps} interleaved runs in one process, after one warm-up "
             "round). Forward is `loss = crit(pred, target)`, backward `loss.backward()` to pred.", "",
             f"Input {shape} float32; MDF weights `{os.path.basename(str(weights))}` ({len(w)} discriminators, "
             f"widths {list(w.widths)}, formula `published`); VGG16: the whole convolutional stack, MSE at "
             f"{', '.join(VGG_LAYERS)}, random weights.", ""]
    load_after = os.getloadavg()[0]
    lines += common.machine_lines(info) + [f"- load average (1 min) before / after the run: {load_before:.2f} / "
                                           f"{load_after:.2f} (2 cores; above ~2, other work shared them)", ""]
    lines += common.markdown_table(["provider", "forward ms", "backward ms", "parameters MB (float32)"], rows)
    lines += ["", "MDF's discriminators keep the full resolution through all five convolutions (no pooling), "
              "so per pixel they cost more than VGG16's early layers at this input size, while VGG16 halves "
              "the resolution four times; the paper's 4.2 MB is a set with a 128-wide ninth discriminator "
              "like `Ds_Denoising.pth`, `Ds_JPEG.pth` is smaller."]
    if not args.no_write:
        common.write_section("mdf-table1", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
