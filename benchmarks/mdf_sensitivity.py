"""Did the MDF sets learn their distortion? The loss between clean images and distorted copies,
for the shipped sets and the published ones side by side.

    python benchmarks/mdf_sensitivity.py [--no-write]

- denoise: ``MDFLoss(set)(x + sigma * n, x)`` for sigma in 0..55 / 255, one fixed noise map n;
- jpeg: ``MDFLoss(set)(jpeg(x, q), x)`` for JPEG quality q from 95 down to 7 (Pillow).

The images are two procedural scenes drawn by scripts/make_mdf_seed.py with seeds other than the
training seed image's (64 x 64). Writes the ``mdf-sensitivity`` section of BENCHMARKS.md.
tests/test_mdf_sensitivity.py checks that every curve grows monotonically.
"""
import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastloss  # noqa: E402
from fastloss.mdf.train import jpeg  # noqa: E402

SIGMAS = (0, 5, 10, 15, 25, 35, 45, 55)          # / 255
QUALITIES = (95, 75, 50, 30, 20, 15, 10, 7)
OFFICIAL = os.path.normpath(os.path.join(common.ROOT, "..", "shared", "mdf-official"))
SETS = {  # task -> [(label, weights)]
    "denoise": [("shipped denoise", "denoise"), ("published Ds_Denoising.pth", os.path.join(OFFICIAL, "Ds_Denoising.pth"))],
    "jpeg": [("shipped jpeg", "jpeg"), ("published Ds_JPEG.pth", os.path.join(OFFICIAL, "Ds_JPEG.pth"))],
}


def _scene_module():
    path = os.path.join(common.ROOT, "scripts", "make_mdf_seed.py")
    spec = importlib.util.spec_from_file_location("make_mdf_seed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def images(size=64, seeds=(7, 8)):
    """(len(seeds), 3, size, size) clean test images in [0, 1], quantized to 8 bits."""
    scene = _scene_module().scene
    return torch.stack([scene(size, s) for s in seeds]).mul(255).round().div(255)


def denoise_curve(weights, x, sigmas=SIGMAS):
    crit = fastloss.MDFLoss(weights)
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return [crit(x + s / 255.0 * n, x).item() for s in sigmas]


def jpeg_curve(weights, x, qualities=QUALITIES):
    crit = fastloss.MDFLoss(weights)
    with torch.no_grad():
        return [crit(jpeg(x, q), x).item() for q in qualities]


def available(weights):
    return weights in fastloss.mdf.SHIPPED and os.path.isfile(fastloss.mdf.shipped_path(weights)) or \
        os.path.isfile(str(weights))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    x = images()
    lines = ["## MDF: do the sets see their distortion?", "",
             "Command: `python benchmarks/mdf_sensitivity.py`. MDF loss (8 discriminators, coarsest first) between two "
             "64 x 64 procedural test images (not the training image) and their distorted copies. Each row must "
             "grow left to right (tests/test_mdf_sensitivity.py).", ""]
    for task, head, grid, curve in (("denoise", "sigma x 255", SIGMAS, denoise_curve),
                                    ("jpeg", "JPEG quality", QUALITIES, jpeg_curve)):
        lines += [f"| set \\ {head} | " + " | ".join(str(v) for v in grid) + " |",
                  "|---|" + "---:|" * len(grid)]
        for label, w in SETS[task]:
            if not available(w):
                lines.append(f"| {label} | " + " | ".join("n/a" for _ in grid) + " |")
                continue
            vals = curve(w, x)
            mono = all(b > a for a, b in zip(vals, vals[1:]))
            lines.append(f"| {label} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")
            print(f"{task:<8} {label:<28} {'monotonic' if mono else 'NOT monotonic'}: "
                  + " ".join(f"{v:.4g}" for v in vals))
        lines.append("")
    if not args.no_write:
        common.write_section("mdf-sensitivity", "\n".join(lines))
        print(f"wrote the mdf-sensitivity section of {common.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
