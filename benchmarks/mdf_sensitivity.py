"""Did the MDF sets learn their distortion? The loss between clean images and distorted copies,
for the shipped sets and the published ones side by side.

    python benchmarks/mdf_sensitivity.py [--no-write]

- denoise: ``MDFLoss(set)(x + sigma * n, x)`` for sigma in 0..55 / 255, one fixed noise map n;
- jpeg: ``MDFLoss(set)(jpeg(x, q), x)`` for JPEG quality q from 95 down to 7 (Pillow).

The images are two procedural scenes drawn by scripts/make_mdf_seed.py with seeds other than the
training seed image's (64 x 64). Writes the ``mdf-sensitivity`` section of BENCHMARKS.md.
tests/mdf/test_mdf_sensitivity.py checks that every curve grows monotonically.

Then two comparisons of the shipped sets with the published ones (issue 15), on natural
photographs that no set was trained on (96 x 96 crops of scikit-image's CC0 / public-domain
``astronaut``, ``coffee``, ``chelsea`` and ``rocket`` when scikit-image is installed, less any
that a shipped set was trained on, found by the seed hashes in the sets' metadata; else three
procedural scenes):

- rank agreement: per image, the loss of each set on a grid of 16 distortions (Gaussian noise at 5
  sigmas, JPEG at 6 qualities, Gaussian blur at 5 radii), and the Spearman rank correlation between
  the shipped set's 16 values and the published set's (the issue's target: >= 0.97);
- the supplement's section 6: distortions tuned to equal PSNR (20, 30 and 40 dB: noise, blur,
  JPEG at the nearest quality, contrast, brightness), the loss of each set for each, per image
  averaged over the images.
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
OFFICIAL = os.environ.get("FASTLOSS_MDF_OFFICIAL") or os.path.normpath(os.path.join(common.ROOT, "..", "shared",
                                                                                    "mdf-official"))
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


# ---------------------------------------------------------------------------- natural images, rank agreement
NATURAL = ("astronaut", "coffee", "chelsea", "rocket")   # scikit-image data: public domain / CC0
NOISE_GRID = (5, 15, 25, 35, 50)                          # / 255
JPEG_GRID = (90, 50, 30, 15, 10, 7)
BLUR_GRID = (0.5, 1.0, 1.5, 2.0, 3.0)                     # Gaussian sigma, pixels
PSNR_LEVELS = (20.0, 30.0, 40.0)
EQUAL_PSNR = ("noise", "blur", "jpeg", "contrast", "brightness")


def seed_hashes(tasks=("denoise", "jpeg")):
    """sha256 of every seed image the shipped sets of ``tasks`` were trained on (their metadata)."""
    from fastloss.mdf.weights import load

    out = set()
    for task in tasks:
        rec = load(task).metadata  # the training record, parsed
        out |= {s["sha256"] for s in rec.get("seed_images", [])}
        if rec.get("seed_image_sha256"):
            out.add(rec["seed_image_sha256"])
    return out


def natural_images(size=96, exclude_sha256=None):
    """(names, (N, 3, size, size)) in [0, 1], 8-bit: central crops of scikit-image's photographs
    (downscaled by 2 first) other than the shipped sets' seed images (``exclude_sha256``, default
    ``seed_hashes()``: compared with the hash of scikit-image's file), or procedural scenes where
    scikit-image is not installed."""
    import hashlib

    try:
        import skimage.data as data
    except ImportError:
        return ["scene 11", "scene 12", "scene 13"], images(size, seeds=(11, 12, 13))
    exclude = seed_hashes() if exclude_sha256 is None else set(exclude_sha256)
    folder = os.path.dirname(data.__file__)
    names, out = [], []
    for name in NATURAL:
        files = [f for f in os.listdir(folder) if os.path.splitext(f)[0] == name]
        if files and hashlib.sha256(open(os.path.join(folder, files[0]), "rb").read()).hexdigest() in exclude:
            continue  # a training image
        x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float().div(255)[None]
        x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        h, w = x.shape[2:]
        t, l = (h - size) // 2, (w - size) // 2
        out.append(x[:, :, t:t + size, l:l + size])
        names.append(name)
    return names, torch.cat(out).clamp(0, 1).mul(255).round().div(255)


def gaussian_blur(x, sigma):
    r = min(max(1, int(3 * sigma + 0.5)), min(x.shape[2:]) - 1)  # reflect padding needs r < the size
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def distortion_grid(x, seed=0):
    """[(label, distorted x)] for the 16 grid points."""
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    out = [(f"noise {s}", (x + s / 255.0 * n).clamp(0, 1)) for s in NOISE_GRID]
    out += [(f"jpeg q{q}", jpeg(x, q)) for q in JPEG_GRID]
    out += [(f"blur {b}", gaussian_blur(x, b)) for b in BLUR_GRID]
    return out


def spearman(a, b):
    """Spearman's rank correlation of two equal-length sequences (average ranks on ties)."""
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for u in torch.unique(v):  # ties share their mean rank
            m = v == u
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def losses(weights, x, distorted):
    crit = fastloss.MDFLoss(weights)
    with torch.no_grad():
        return [crit(d, x).item() for d in distorted]


# ---------------------------------------------------------------------------- equal PSNR (supplement section 6)
def psnr(a, b):
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def _bisect(make, x, target, lo, hi, falling, iters=40):
    """The parameter in [lo, hi] where psnr(make(p), x) == target; ``falling``: PSNR falls as p grows."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if (psnr(make(mid), x) > target) == falling:
            lo = mid
        else:
            hi = mid
    return make(0.5 * (lo + hi))


def equal_psnr(x, kind, target, seed=0):
    """``x`` (1, 3, H, W) distorted by ``kind`` to ``target`` dB PSNR (JPEG: the nearest quality)."""
    if kind == "noise":
        n = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        return _bisect(lambda s: (x + s * n).clamp(0, 1), x, target, 0.0, 1.0, True)
    if kind == "blur":
        return _bisect(lambda s: gaussian_blur(x, max(s, 1e-3)), x, target, 0.05, 12.0, True)
    if kind == "contrast":
        m = x.mean()
        return _bisect(lambda c: m + (1 - c) * (x - m), x, target, 0.0, 1.0, True)
    if kind == "brightness":
        return _bisect(lambda b: (x + b).clamp(0, 1), x, target, 0.0, 1.0, True)
    if kind == "jpeg":
        return min((jpeg(x, q) for q in range(1, 101)), key=lambda y: abs(psnr(y, x) - target))
    raise ValueError(kind)


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
             "grow left to right (tests/mdf/test_mdf_sensitivity.py).", ""]
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
    lines += compare_on_natural_images()
    if not args.no_write:
        common.write_section("mdf-sensitivity", "\n".join(lines))
    return 0


def compare_on_natural_images():
    """The rank-agreement and equal-PSNR tables (Markdown lines), printed as they are made."""
    names, xs = natural_images()
    pairs = [(task, SETS[task][0], SETS[task][1]) for task in ("denoise", "jpeg")]
    lines = ["### Shipped vs published: rank agreement on natural images", "",
             "Spearman rank correlation, per image, between the shipped set's and the published set's losses on "
             f"16 distortions (Gaussian noise sigma {', '.join(map(str, NOISE_GRID))} / 255; JPEG quality "
             f"{', '.join(map(str, JPEG_GRID))}; Gaussian blur sigma {', '.join(map(str, BLUR_GRID))} px) of "
             f"96 x 96 crops of {', '.join(names)} (not training images). The issue's target is >= 0.97.", "",
             "| image | " + " | ".join(f"{s[0]} vs {p[0]}" for _, s, p in pairs) + " |",
             "|---|" + "---:|" * len(pairs)]
    if not all(available(w) for _, s, p in pairs for _, w in (s, p)):
        return lines + ["| (the published files are absent) |" + " n/a |" * len(pairs), ""]
    for i, name in enumerate(names):
        x = xs[i:i + 1]
        grid = distortion_grid(x, seed=i)
        cells = []
        for _, (sl, sw), (pl, pw) in pairs:
            rho = spearman(losses(sw, x, [d for _, d in grid]), losses(pw, x, [d for _, d in grid]))
            cells.append(f"{rho:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(f"rank agreement {name:<10} " + "  ".join(cells), flush=True)
    lines += ["", "### Equal-PSNR distortions (supplement section 6)", "",
              "MDF loss (published formula, 8 discriminators) of distortions tuned to the same PSNR, mean over the "
              f"{len(names)} images; JPEG takes the quality nearest the target (its mean PSNR in brackets). Columns: "
              + ", ".join(EQUAL_PSNR) + ".", "",
              "| set | PSNR dB | " + " | ".join(EQUAL_PSNR) + " |", "|---|---:|" + "---:|" * len(EQUAL_PSNR)]
    dist = {}
    for level in PSNR_LEVELS:
        for kind in EQUAL_PSNR:
            dist[level, kind] = [equal_psnr(xs[i:i + 1], kind, level, seed=i) for i in range(len(names))]
    for _, s, p in pairs:
        for label, w in (s, p):
            crit = fastloss.MDFLoss(w)
            for level in PSNR_LEVELS:
                cells = []
                for kind in EQUAL_PSNR:
                    with torch.no_grad():
                        v = sum(crit(d, xs[i:i + 1]).item() for i, d in enumerate(dist[level, kind])) / len(names)
                    extra = ""
                    if kind == "jpeg":
                        extra = f" ({sum(psnr(d, xs[i:i + 1]) for i, d in enumerate(dist[level, kind])) / len(names):.1f})"
                    cells.append(f"{v:.4g}{extra}")
                lines.append(f"| {label} | {level:.0f} | " + " | ".join(cells) + " |")
                print(f"equal PSNR {label:<28} {level:.0f} dB  " + "  ".join(cells), flush=True)
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
