"""Train an MDF discriminator set on a seed image, or several (the paper's phase 1, SinGAN-style).

    python -m fastloss.mdf.train --seed-image PATH [PATH ...] --task denoise|jpeg|sisr --out FILE [options]
    python -m fastloss.mdf.train --preset paper --seed-image BIG.png --task jpeg --out FILE

A pyramid of the seed image, ``--scales`` levels from coarse to fine (each ``--scale-factor`` times
the next, i.e. 1 / rho; the finest with its longer side ``--max-size``, 0 for the image's own size;
resampled with ``--resample`` bicubic or Lanczos), trains one generator / discriminator pair per
level, coarsest first, as SinGAN does. With several seed images each has its own pyramid and the
iterations take them in turn (the supplement's section 4 ablation).

``--preset paper`` sets the paper's section 3.1 recipe (see ``PRESETS``): rho = 2 (factor 0.5),
Lanczos, alpha = 100, 3000 iterations per scale, the distortion as the generators' only noise, the
first scale fed the downsampled seed plus the distortion, the seed at its own size, K = 8. With
rho = 2 the finest level is 2^(K-1) times the coarsest, which must stay >= 11 x 11: a seed whose
shorter side is below 11 * 2^(K-1) (1408 for K = 8) is refused with a clear error, or, with
``--fit-scales``, K is reduced to the most scales that fit and the reduction printed.

- the discriminator has the architecture of the published files (head, block1..3: 3x3 conv,
  BatchNorm, LeakyReLU(0.2); tail: 3x3 conv to one channel; nothing padded); the generator is
  SinGAN's (the same five convolutions, the last one to 3 channels with tanh, input zero-padded
  by 5, output added to its image input);
- width ``--width`` at the coarsest scale, doubling every 4 scales (capped at ``--max-width``);
  a new pair starts from the previous scale's weights when the width did not change;
- WGAN-GP: ``D(fake) - D(real) + gp_weight * (|grad D(interp)|_2 - 1)^2`` (norm over channels),
  ``--d-steps`` discriminator and ``--g-steps`` generator updates per iteration, Adam
  (lr ``--lr``, betas 0.5, 0.999), learning rate x0.1 at 80% of ``--iters``;
- the generator loss is ``-D(fake) + alpha * MSE(G(z_rec), real)``, the reconstruction of the
  real image from a fixed noise map at the coarsest scale and no noise above it;
- what the generator of scale s sees is the upsampled output of scale s-1 **with the task
  distortion added**: ``denoise``: Gaussian noise, sigma ~ U[0, 55] / 255; ``jpeg``: JPEG
  compression at a quality drawn from 7..10 (Pillow); ``sisr``: none. On top comes SinGAN's noise,
  amplitude ``0.1 * RMSE(upsampled reconstruction, real)``, unless ``--distortion-as-noise``: then
  the distortion is the paper's z^k and the only noise (none for ``sisr``);
- the first scale sees zeros plus noise (``--first-input zeros``, SinGAN) or, as the paper, the
  downsampled seed plus the distortion (``--first-input seed``; its reconstruction input is one
  fixed draw of that distortion).

Images are RGB in [0, 1], unnormalized, as the loss sees them. The discriminators (BatchNorm with
the running statistics gathered while training) are saved coarsest first in the project's
format, with the training metadata (command, options, seed image hash, sizes, final losses,
time). After every scale a checkpoint (``--checkpoint``, default ``FILE.ckpt``) is written;
``--resume`` continues from the last completed scale, with the options it was started with; the
checkpoint is removed once the set is saved (``--keep-checkpoint`` keeps it).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import weights as W

TASKS = ("denoise", "jpeg", "sisr")
DENOISE_MAX_SIGMA = 55.0 / 255.0
JPEG_QUALITIES = (7, 10)  # inclusive


# ---------------------------------------------------------------------------- networks
class ConvBlock(nn.Sequential):
    """3x3 conv (no padding) -> BatchNorm -> LeakyReLU(0.2): the published block."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, 3, 1, 0))
        self.add_module("norm", nn.BatchNorm2d(cout))
        self.add_module("LeakyRelu", nn.LeakyReLU(0.2))


class Discriminator(nn.Module):
    """The published WDiscriminator: head, body.block1..3, tail (to one channel, no activation)."""

    def __init__(self, width: int):
        super().__init__()
        self.head = ConvBlock(3, width)
        self.body = nn.Sequential()
        for i in range(3):
            self.body.add_module(f"block{i + 1}", ConvBlock(width, width))
        self.tail = nn.Conv2d(width, 1, 3, 1, 0)

    def forward(self, x):
        return self.tail(self.body(self.head(x)))


class Generator(nn.Module):
    """SinGAN's generator: the same five unpadded convolutions, 3 output channels with tanh,
    input zero-padded by 5; the output is added to the image input ``prev``."""

    def __init__(self, width: int):
        super().__init__()
        self.head = ConvBlock(3, width)
        self.body = nn.Sequential(*[ConvBlock(width, width) for _ in range(3)])
        self.tail = nn.Sequential(nn.Conv2d(width, 3, 3, 1, 0), nn.Tanh())

    def forward(self, noise, prev):
        x = F.pad(noise + prev, (5, 5, 5, 5))
        return self.tail(self.body(self.head(x))) + prev


def _init_weights(m):
    # SinGAN's initialization
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def width_at(scale: int, base: int, max_width: int) -> int:
    """Channel width of scale ``scale`` (0 = coarsest): doubles every 4 scales."""
    return min(base * 2 ** (scale // 4), max_width)


# ---------------------------------------------------------------------------- the task distortions
def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress (B, 3, H, W) images in [0, 1] at ``quality`` with Pillow; back to [0, 1]."""
    from PIL import Image

    out = []
    for img in x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu():
        buf = io.BytesIO()
        Image.fromarray(img.numpy()).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        arr = torch.frombuffer(bytearray(Image.open(buf).convert("RGB").tobytes()), dtype=torch.uint8)
        out.append(arr.view(img.shape))
    return torch.stack(out).permute(0, 3, 1, 2).to(x.dtype).div(255).to(x.device)


def distort(x: torch.Tensor, task: str, gen: torch.Generator) -> torch.Tensor:
    """The task distortion added to the upsampled output of the previous scale."""
    if task == "denoise":
        sigma = float(torch.rand((), generator=gen)) * DENOISE_MAX_SIGMA
        return x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    if task == "jpeg":
        q = int(torch.randint(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1, (), generator=gen))
        return jpeg(x, q)
    return x


# ---------------------------------------------------------------------------- images
def load_image(path: str) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1] from any image Pillow reads."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return data.permute(2, 0, 1).unsqueeze(0).float().div(255)


RESAMPLE = ("bicubic", "lanczos")
MIN_LEVEL = 11  # the discriminators' five unpadded 3x3 convolutions


def pyramid_sizes(h: int, w: int, scales: int, factor: float, max_size: int) -> List[tuple]:
    """Sizes coarsest first; the finest has its longer side ``max_size`` (0: the image's own size;
    never upsampled)."""
    s = 1.0 if max_size == 0 else min(1.0, max_size / max(h, w))
    fh, fw = max(1, round(h * s)), max(1, round(w * s))
    return [(max(1, round(fh * factor ** (scales - 1 - i))), max(1, round(fw * factor ** (scales - 1 - i))))
            for i in range(scales)]


def scales_that_fit(h: int, w: int, factor: float, max_size: int, limit: int) -> int:
    """The most levels (at most ``limit``) whose coarsest is at least MIN_LEVEL x MIN_LEVEL (0 if none)."""
    k = 0
    while k < limit and min(pyramid_sizes(h, w, k + 1, factor, max_size)[0]) >= MIN_LEVEL:
        k += 1
    return k


def _lanczos(x, size):
    """Pillow's Lanczos (a = 3, antialiased when downsampling) on each channel as a float image."""
    from PIL import Image

    out = torch.empty(x.shape[:2] + tuple(size), dtype=torch.float32)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            plane = x[b, c].detach().float().cpu().contiguous()
            im = Image.frombytes("F", (plane.shape[1], plane.shape[0]), plane.numpy().tobytes())
            im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
            out[b, c] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.float32).view(size[0], size[1])
    return out.to(dtype=x.dtype, device=x.device)


def _resize(x, size, method="bicubic"):
    if method == "lanczos":
        return _lanczos(x, size)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


# ---------------------------------------------------------------------------- training
def gradient_penalty(d: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float,
                     gen: torch.Generator) -> torch.Tensor:
    a = torch.rand((), generator=gen)
    interp = (a * real + (1 - a) * fake).requires_grad_(True)
    out = d(interp)
    (grad,) = torch.autograd.grad(out, interp, torch.ones_like(out), create_graph=True)
    return weight * ((grad.norm(2, dim=1) - 1) ** 2).mean()


class _Trainer:
    def __init__(self, opts, sizes, reals_finest):
        """``sizes[i]``: the pyramid of seed image i (coarsest first); ``reals_finest[i]``: its finest level."""
        self.opts, self.sizes = opts, sizes
        self.method = opts.get("resample", "bicubic")
        self.as_noise = bool(opts.get("distortion_as_noise", False))
        self.first = opts.get("first_input", "zeros")
        self.reals = [[_resize(r, sz, self.method) if sz != tuple(r.shape[2:]) else r for sz in szs]
                      for r, szs in zip(reals_finest, sizes)]  # [image][scale]
        self.gens: List[Generator] = []
        self.discs: List[Discriminator] = []
        self.noise_amps: List[float] = []
        self.z_rec: List[torch.Tensor] = []   # per image, the coarsest scale's fixed reconstruction noise
        self.x0_rec: List[torch.Tensor] = []  # per image, the first scale's fixed reconstruction input
        self.history: List[Dict[str, float]] = []
        self.rng = torch.Generator().manual_seed(opts["seed"])

    def _first_input(self, i: int, rec: bool) -> torch.Tensor:
        real0 = self.reals[i][0]
        if self.first != "seed":
            return torch.zeros_like(real0)
        return self.x0_rec[i] if rec else distort(real0, self.opts["task"], self.rng)

    # the image the generator of scale s gets: previous scales' output, upsampled and distorted
    def _prev(self, s: int, rec: bool, i: int = 0) -> torch.Tensor:
        x = self._first_input(i, rec)
        with torch.no_grad():
            for j in range(s):
                if j == 0:
                    z = self.z_rec[i] if rec else torch.randn(x.shape, generator=self.rng)
                else:
                    z = torch.zeros_like(x) if rec else torch.randn(x.shape, generator=self.rng)
                x = self.gens[j](z * self.noise_amps[j], x)
                x = distort(_resize(x, self.sizes[i][j + 1], self.method), self.opts["task"], self.rng)
        return x

    def train_scale(self, s: int, progress=None):
        o = self.opts
        n_img = len(self.reals)
        width = width_at(s, o["width"], o["max_width"])
        g, d = Generator(width), Discriminator(width)
        if s > 0 and width_at(s - 1, o["width"], o["max_width"]) == width:
            g.load_state_dict(self.gens[-1].state_dict())
            d.load_state_dict(self.discs[-1].state_dict())
        else:
            g.apply(_init_weights)
            d.apply(_init_weights)
        reals = [r[s] for r in self.reals]
        if s == 0:
            self.z_rec = [torch.randn(r.shape, generator=self.rng) for r in reals]
            if self.first == "seed":
                self.x0_rec = [distort(r, o["task"], self.rng) for r in reals]
        prev_recs = [self._prev(s, rec=True, i=i) for i in range(n_img)]
        if self.as_noise:
            amp = 0.0  # the distortion is z^k, the only noise
        elif s == 0 and self.first != "seed":
            amp = 1.0
        else:
            amp = o["noise_amp"] * sum(float(torch.sqrt(F.mse_loss(p, r))) for p, r in zip(prev_recs, reals)) / n_img
        self.noise_amps.append(amp)
        self.gens.append(g)  # so that _prev(s + 1) can use it later
        opt_d = torch.optim.Adam(d.parameters(), lr=o["lr"], betas=(0.5, 0.999))
        opt_g = torch.optim.Adam(g.parameters(), lr=o["lr"], betas=(0.5, 0.999))
        milestones = [int(0.8 * o["iters"])]
        sch_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, milestones, gamma=0.1)
        sch_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, milestones, gamma=0.1)
        last = {}
        for it in range(o["iters"]):
            i = it % n_img  # several seed images: taken in turn
            real = reals[i]
            z_rec = self.z_rec[i] if s == 0 else torch.zeros_like(real)
            prev = self._prev(s, rec=False, i=i)
            prev_rec = prev_recs[i] if s == 0 else self._prev(s, rec=True, i=i)  # scale 0's is fixed
            noise = torch.randn(real.shape, generator=self.rng) * amp
            for _ in range(o["d_steps"]):
                opt_d.zero_grad(set_to_none=True)
                err_real = -d(real).mean()
                with torch.no_grad():
                    fake = g(noise, prev)
                err_fake = d(fake).mean()
                gp = gradient_penalty(d, real, fake, o["gp_weight"], self.rng)
                (err_real + err_fake + gp).backward()
                opt_d.step()
            for _ in range(o["g_steps"]):
                opt_g.zero_grad(set_to_none=True)
                fake = g(noise, prev)
                err_g = -d(fake).mean()
                rec = o["alpha"] * F.mse_loss(g(z_rec * amp, prev_rec), real)
                (err_g + rec).backward()
                opt_g.step()
            sch_d.step()
            sch_g.step()
            last = {"d_loss": (err_real + err_fake + gp).item(), "wasserstein": -(err_real + err_fake).item(),
                    "g_adv": err_g.item(), "rec": rec.item()}
            if progress is not None:
                progress.update(1)
                progress.set_postfix(scale=f"{s + 1}/{len(self.sizes[0])}", **{k: f"{v:.3g}" for k, v in last.items()})
        for p in list(g.parameters()) + list(d.parameters()):
            p.requires_grad_(False)
        g.eval()
        d.eval()
        self.discs.append(d)
        self.history.append({"scale": s, "size": list(self.sizes[0][s]), "width": width, "noise_amp": amp, **last})

    # ------------------------------------------------------------------ checkpoints
    def state(self):
        return {"format": "fastloss-mdf-train-checkpoint", "options": self.opts, "completed": len(self.discs),
                "generators": [g.state_dict() for g in self.gens], "discriminators": [d.state_dict() for d in self.discs],
                "noise_amps": list(self.noise_amps), "z_rec": list(self.z_rec), "x0_rec": list(self.x0_rec),
                "history": self.history, "rng": self.rng.get_state()}

    def restore(self, ck):
        o = self.opts
        for s in range(ck["completed"]):
            width = width_at(s, o["width"], o["max_width"])
            g, d = Generator(width), Discriminator(width)
            g.load_state_dict(ck["generators"][s])
            d.load_state_dict(ck["discriminators"][s])
            for m in (g, d):
                m.eval()
                m.requires_grad_(False)
            self.gens.append(g)
            self.discs.append(d)
        self.noise_amps = list(ck["noise_amps"])
        z = ck["z_rec"]
        self.z_rec = [z] if isinstance(z, torch.Tensor) else list(z)  # one tensor in older checkpoints
        self.x0_rec = list(ck.get("x0_rec", []))
        self.history = list(ck["history"])
        self.rng.set_state(ck["rng"])


def to_weights(discs: List[Discriminator], metadata: dict) -> W.MDFWeights:
    sets = []
    for d in discs:
        sd = d.state_dict()
        sets.append({k: sd[k].detach().float().clone() for k in W.tensor_names()})
    return W.MDFWeights(sets, tuple(int(d.head.conv.out_channels) for d in discs), 1e-5, 0.2, metadata)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# The paper's section 3.1 recipe. Each entry sets that option's default; an option given on the
# command line still wins.
PRESETS = {
    "paper": {"scales": 8, "scale_factor": 0.5, "resample": "lanczos", "alpha": 100.0, "iters": 3000,
              "distortion_as_noise": True, "first_input": "seed", "max_size": 0},
}


def _preset_help():
    lines = []
    for name, values in PRESETS.items():
        sets = ", ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                         (f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}") for k, v in values.items())
        lines.append(f"'{name}' sets {sets}")
    return ("set the defaults of a recipe: " + "; ".join(lines) +
            " (K = 8 levels with rho = 2 need a seed whose shorter side is >= 1408 px, else see --fit-scales)")


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m fastloss.mdf.train", description=__doc__.splitlines()[0])
    ap.add_argument("--seed-image", required=True, nargs="+", metavar="PATH",
                    help="the training image(s), anything Pillow reads; several are taken in turn")
    ap.add_argument("--seed-source", default=None, metavar="TEXT",
                    help="where the seed image(s) came from and their license, recorded in the set's metadata "
                         "(seed_source) beside their file names and SHA-256")
    ap.add_argument("--task", required=True, choices=TASKS, help="the distortion the generators learn to undo")
    ap.add_argument("--out", required=True, help="output file (the project's safetensors format)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help=_preset_help())
    ap.add_argument("--scales", type=int, default=8, help="pyramid levels = discriminators, K (default 8)")
    ap.add_argument("--scale-factor", type=float, default=0.75,
                    help="size ratio between levels, 1 / rho (default 0.75; the paper's rho = 2 is 0.5)")
    ap.add_argument("--rho", type=float, default=None, help="the paper's pyramid factor: sets --scale-factor 1 / RHO")
    ap.add_argument("--resample", choices=RESAMPLE, default="bicubic",
                    help="filter of the pyramid and of the upsampling between scales: bicubic (antialiased, "
                         "default) or lanczos (Pillow's Lanczos-3, the paper's)")
    ap.add_argument("--max-size", type=int, default=128,
                    help="longer side of the finest level, 0 for the seed's own size (default 128)")
    ap.add_argument("--fit-scales", action="store_true",
                    help="when the seed is too small for --scales levels of >= 11 x 11, train the most that fit "
                         "(printed) instead of stopping with an error")
    ap.add_argument("--iters", type=int, default=400,
                    help="iterations per scale (default 400; SinGAN used 2000, the paper 3000)")
    ap.add_argument("--d-steps", type=int, default=3, help="discriminator updates per iteration (default 3)")
    ap.add_argument("--g-steps", type=int, default=3, help="generator updates per iteration (default 3)")
    ap.add_argument("--width", type=int, default=32, help="channels at the coarsest scale (default 32)")
    ap.add_argument("--max-width", type=int, default=128, help="cap of the doubling width (default 128)")
    ap.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default 5e-4)")
    ap.add_argument("--alpha", type=float, default=10.0, help="reconstruction weight (default 10; the paper's 100)")
    ap.add_argument("--gp-weight", type=float, default=0.1, help="gradient-penalty weight (default 0.1)")
    ap.add_argument("--noise-amp", type=float, default=0.1, help="SinGAN noise amplitude factor (default 0.1)")
    ap.add_argument("--distortion-as-noise", action=argparse.BooleanOptionalAction, default=False,
                    help="the task distortion is the paper's z^k and replaces SinGAN's noise (sisr then gets "
                         "none); default off: SinGAN's noise on top of the distortion")
    ap.add_argument("--first-input", choices=("zeros", "seed"), default="zeros",
                    help="what the first scale sees: zeros plus noise (SinGAN, default) or the downsampled "
                         "seed plus the distortion (the paper)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint path (default: OUT.ckpt)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint's last completed scale")
    ap.add_argument("--until-scale", type=int, default=None,
                    help="stop after this many scales, keeping the checkpoint (resume later with --resume)")
    ap.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint after the last scale")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


_OPTION_KEYS = ("task", "scales", "scale_factor", "max_size", "iters", "d_steps", "g_steps", "width", "max_width",
                "lr", "alpha", "gp_weight", "noise_amp", "seed", "resample", "distortion_as_noise", "first_input",
                "preset")


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only


def _parse(argv):
    ap = build_parser()
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--preset", choices=sorted(PRESETS), default=None)
    pre, _ = probe.parse_known_args(argv)
    if pre.preset is not None:
        ap.set_defaults(**PRESETS[pre.preset])
    return ap, ap.parse_args(argv)


def _main(argv) -> int:
    ap, args = _parse(argv)
    if args.rho is not None:
        if not args.rho > 1:
            ap.error(f"--rho must be > 1, got {args.rho}")
        args.scale_factor = 1.0 / args.rho
    for name in ("scales", "iters", "d_steps", "g_steps", "width"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_size < 0:
        ap.error(f"--max-size must be >= 0 (0: the seed's own size), got {args.max_size}")
    if not 0 < args.scale_factor < 1:
        ap.error(f"--scale-factor must be in (0, 1), got {args.scale_factor}")
    for path in args.seed_image:
        if not os.path.isfile(path):
            ap.error(f"--seed-image: no such file {path!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt_path = args.checkpoint or args.out + ".ckpt"
    opts = {k: getattr(args, k) for k in _OPTION_KEYS}
    seed_shas = [_sha256(p) for p in args.seed_image]
    start, ck = 0, None
    command = "python -m fastloss.mdf.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    if args.resume:
        if not os.path.isfile(ckpt_path):
            ap.error(f"--resume: no checkpoint at {ckpt_path!r}")
        ck = torch.load(ckpt_path, weights_only=True)
        if ck.get("format") != "fastloss-mdf-train-checkpoint":
            ap.error(f"--resume: {ckpt_path!r} is not a fastloss MDF training checkpoint")
        if ck.get("seed_images_sha256", [ck.get("seed_image_sha256")]) != seed_shas:
            ap.error("--resume: the checkpoint was trained on other seed images")
        opts = dict(ck["options"])  # the run continues with the options it started with
        start = ck["completed"]
        command = ck.get("command", "")
    reals = [load_image(p) for p in args.seed_image]
    scales = opts["scales"]
    if ck is None:
        fit = min(scales_that_fit(r.shape[2], r.shape[3], opts["scale_factor"], opts["max_size"], scales)
                  for r in reals)
        if fit < scales:
            small = min(reals, key=lambda r: min(r.shape[2:]))
            finest = pyramid_sizes(small.shape[2], small.shape[3], scales, opts["scale_factor"], opts["max_size"])
            why = (f"the seed image of {small.shape[2]} x {small.shape[3]} px, finest level {finest[-1][0]} x "
                   f"{finest[-1][1]}, factor {opts['scale_factor']:g} per level, gives a coarsest level of "
                   f"{finest[0][0]} x {finest[0][1]} for {scales} scales, below the 11 x 11 the discriminators need")
            if not args.fit_scales or fit == 0:
                ap.error(why + ": use a larger seed image, raise --max-size (0 = the seed's own size) or "
                         "--scale-factor, lower --scales" + ("" if fit == 0 else f", or pass --fit-scales (trains {fit})"))
            print(f"--fit-scales: {why}; training K = {fit} scales instead of {scales}")
            opts["scales_requested"], opts["scales"] = scales, fit
            scales = fit
    sizes = [pyramid_sizes(r.shape[2], r.shape[3], scales, opts["scale_factor"], opts["max_size"]) for r in reals]
    method = opts.get("resample", "bicubic")
    reals = [_resize(r, szs[-1], method) if tuple(r.shape[2:]) != szs[-1] else r for r, szs in zip(reals, sizes)]
    trainer = _Trainer(opts, sizes, reals)
    if ck is not None:
        trainer.restore(ck)
    stop = scales if args.until_scale is None else min(scales, args.until_scale)
    elapsed0 = float(ck.get("elapsed_s", 0.0)) if ck is not None else 0.0
    t0 = time.time()
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=(stop - start) * opts["iters"], desc=f"MDF {opts['task']}", unit="it")
    try:
        for s in range(start, stop):
            trainer.train_scale(s, progress)
            state = trainer.state()
            state["seed_image_sha256"] = seed_shas[0]
            state["seed_images_sha256"] = seed_shas
            state["command"] = command
            state["elapsed_s"] = elapsed0 + time.time() - t0
            tmp = ckpt_path + ".tmp"
            torch.save(state, tmp)
            os.replace(tmp, ckpt_path)
    finally:
        if progress is not None:
            progress.close()
    if stop < scales:
        print(f"stopped after {stop} of {scales} scales; checkpoint {ckpt_path} (continue with --resume)")
        return 0
    import fastloss

    meta = {"origin": "trained by fastloss.mdf.train", "command": command, "resumed": ck is not None, "options": opts,
            "seed_image": os.path.basename(args.seed_image[0]), "seed_image_sha256": seed_shas[0],
            "seed_images": [{"file": os.path.basename(p), "sha256": h} for p, h in zip(args.seed_image, seed_shas)],
            "seed_source": args.seed_source, "sizes": [list(s) for s in sizes[0]], "per_scale": trainer.history,
            "elapsed_s": round(elapsed0 + time.time() - t0, 1), "torch": torch.__version__,
            "fastloss": fastloss.__version__, "threads": torch.get_num_threads()}
    W.save(to_weights(trainer.discs, meta), args.out)
    if not args.keep_checkpoint and os.path.isfile(ckpt_path):
        os.remove(ckpt_path)
    print(f"wrote {args.out}: {scales} discriminators, widths "
          f"{[width_at(s, opts['width'], opts['max_width']) for s in range(scales)]}, "
          f"{meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
