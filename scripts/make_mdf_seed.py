"""Draw the seed image the shipped MDF sets are trained on: fastloss/mdf/data/seed.png.

    python scripts/make_mdf_seed.py [--out fastloss/mdf/data/seed.png] [--size 192] [--seed 2024]

A procedural scene (smooth sky-like gradient, multi-octave value noise for "terrain", discs and
boxes with soft shading, stripes and a fine grain), drawn from a fixed random seed with torch, so
that the file is reproducible and free of any third-party rights: it is this project's own work,
dedicated to the public domain (CC0 1.0). The same function with another seed gives test images.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def value_noise(h, w, octaves, g):
    """Sum of bicubically upsampled random grids, finer octaves weaker: (h, w) in ~[0, 1]."""
    out = torch.zeros(1, 1, h, w)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = 2 ** (o + 2)
        grid = torch.rand(1, 1, cells + 1, cells + 1, generator=g)
        out += amp * F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
        total += amp
        amp *= 0.55
    out = out[0, 0] / total
    return (out - out.min()) / (out.max() - out.min())


def scene(size=192, seed=2024):
    """(3, size, size) float in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    h = w = size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    sky = torch.stack([0.35 + 0.3 * yy, 0.55 + 0.25 * yy, 0.85 - 0.2 * yy])
    terrain = value_noise(h, w, 6, g)
    horizon = 0.45 + 0.15 * (value_noise(1, w, 4, g)[0] - 0.5)
    ground = (yy > horizon[None, :]).float()
    earth = torch.stack([0.35 + 0.4 * terrain, 0.45 + 0.35 * terrain, 0.2 + 0.2 * terrain])
    img = sky * (1 - ground) + earth * ground
    for _ in range(7):  # shaded discs
        cy, cx = torch.rand(2, generator=g).tolist()
        r = 0.04 + 0.12 * float(torch.rand((), generator=g))
        col = torch.rand(3, generator=g)
        d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        mask = (1 - ((d - r) / 0.006).clamp(0, 1))  # antialiased edge
        shade = 0.6 + 0.4 * (1 - (yy - cy + r) / (2 * r)).clamp(0, 1)
        img = img * (1 - mask) + (col[:, None, None] * shade) * mask
    for _ in range(5):  # boxes, some striped
        y0, x0 = (torch.rand(2, generator=g) * 0.8).tolist()
        bh, bw = (0.05 + 0.2 * torch.rand(2, generator=g)).tolist()
        col = torch.rand(3, generator=g)
        mask = ((yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)).float()
        if float(torch.rand((), generator=g)) < 0.5:
            period = 0.01 + 0.02 * float(torch.rand((), generator=g))
            stripes = 0.75 + 0.25 * torch.sign(torch.sin(2 * math.pi * (xx + yy) / period))
            fill = col[:, None, None] * stripes
        else:
            fill = col[:, None, None].expand(3, h, w)
        img = img * (1 - mask) + fill * mask
    grain = torch.randn(3, h, w, generator=g) * 0.02
    return (img + grain).clamp(0, 1)


def save_png(img, path):
    from PIL import Image

    arr = img.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(arr).save(path, optimize=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "fastloss", "mdf", "data", "seed.png"))
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)
    save_png(scene(args.size, args.seed), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
