"""Train an MDF discriminator set on one seed image (the paper's phase 1, SinGAN-style).

    python -m fastloss.mdf.train --seed-image PATH --task denoise|jpeg|sisr --out FILE [options]

A pyramid of the seed image, ``--scales`` levels from coarse to fine (each ``--scale-factor`` times
the next, the finest with its longer side ``--max-size``), trains one generator / discriminator
pair per level, coarsest first, as SinGAN does:

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
  compression at a quality drawn from 7..10 (Pillow); ``sisr``: none. Its noise amplitude is
  ``0.1 * RMSE(upsampled reconstruction, real)``, as in SinGAN.

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


def pyramid_sizes(h: int, w: int, scales: int, factor: float, max_size: int) -> List[tuple]:
    """Sizes coarsest first; the finest has its longer side ``max_size`` (never upsampled)."""
    s = min(1.0, max_size / max(h, w))
    fh, fw = max(1, round(h * s)), max(1, round(w * s))
    return [(max(1, round(fh * factor ** (scales - 1 - i))), max(1, round(fw * factor ** (scales - 1 - i))))
            for i in range(scales)]


def _resize(x, size):
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
    def __init__(self, opts, sizes, real_finest):
        self.opts, self.sizes = opts, sizes
        self.reals = [_resize(real_finest, s) if s != tuple(real_finest.shape[2:]) else real_finest for s in sizes]
        self.gens: List[Generator] = []
        self.discs: List[Discriminator] = []
        self.noise_amps: List[float] = []
        self.z_rec: Optional[torch.Tensor] = None
        self.history: List[Dict[str, float]] = []
        self.rng = torch.Generator().manual_seed(opts["seed"])

    # the image the generator of scale s gets: previous scales' output, upsampled and distorted
    def _prev(self, s: int, rec: bool) -> torch.Tensor:
        if s == 0:
            return torch.zeros_like(self.reals[0])
        x = torch.zeros_like(self.reals[0])
        with torch.no_grad():
            for j in range(s):
                if j == 0:
                    z = self.z_rec if rec else torch.randn(self.reals[0].shape, generator=self.rng)
                else:
                    z = torch.zeros_like(x) if rec else torch.randn(x.shape, generator=self.rng)
                x = self.gens[j](z * self.noise_amps[j], x)
                x = distort(_resize(x, self.sizes[j + 1]), self.opts["task"], self.rng)
        return x

    def train_scale(self, s: int, progress=None):
        o = self.opts
        width = width_at(s, o["width"], o["max_width"])
        g, d = Generator(width), Discriminator(width)
        if s > 0 and width_at(s - 1, o["width"], o["max_width"]) == width:
            g.load_state_dict(self.gens[-1].state_dict())
            d.load_state_dict(self.discs[-1].state_dict())
        else:
            g.apply(_init_weights)
            d.apply(_init_weights)
        real = self.reals[s]
        if s == 0:
            self.z_rec = torch.randn(real.shape, generator=self.rng)
            amp = 1.0
        else:
            prev_rec = self._prev(s, rec=True)
            amp = o["noise_amp"] * float(torch.sqrt(F.mse_loss(prev_rec, real)))
        self.noise_amps.append(amp)
        self.gens.append(g)  # so that _prev(s + 1) can use it later
        opt_d = torch.optim.Adam(d.parameters(), lr=o["lr"], betas=(0.5, 0.999))
        opt_g = torch.optim.Adam(g.parameters(), lr=o["lr"], betas=(0.5, 0.999))
        milestones = [int(0.8 * o["iters"])]
        sch_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, milestones, gamma=0.1)
        sch_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, milestones, gamma=0.1)
        z_rec = self.z_rec if s == 0 else torch.zeros_like(real)
        last = {}
        for _ in range(o["iters"]):
            prev = self._prev(s, rec=False)
            prev_rec = torch.zeros_like(real) if s == 0 else self._prev(s, rec=True)
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
                progress.set_postfix(scale=f"{s + 1}/{len(self.sizes)}", **{k: f"{v:.3g}" for k, v in last.items()})
        for p in list(g.parameters()) + list(d.parameters()):
            p.requires_grad_(False)
        g.eval()
        d.eval()
        self.discs.append(d)
        self.history.append({"scale": s, "size": list(self.sizes[s]), "width": width, "noise_amp": amp, **last})

    # ------------------------------------------------------------------ checkpoints
    def state(self):
        return {"format": "fastloss-mdf-train-checkpoint", "options": self.opts, "completed": len(self.discs),
                "generators": [g.state_dict() for g in self.gens], "discriminators": [d.state_dict() for d in self.discs],
                "noise_amps": list(self.noise_amps), "z_rec": self.z_rec, "history": self.history,
                "rng": self.rng.get_state()}

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
        self.z_rec = ck["z_rec"]
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


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m fastloss.mdf.train", description=__doc__.splitlines()[0])
    ap.add_argument("--seed-image", required=True, help="the one training image (anything Pillow reads)")
    ap.add_argument("--task", required=True, choices=TASKS, help="the distortion the generators learn to undo")
    ap.add_argument("--out", required=True, help="output file (the project's safetensors format)")
    ap.add_argument("--scales", type=int, default=8, help="pyramid levels = discriminators (default 8)")
    ap.add_argument("--scale-factor", type=float, default=0.75, help="size ratio between levels (default 0.75)")
    ap.add_argument("--max-size", type=int, default=128, help="longer side of the finest level (default 128)")
    ap.add_argument("--iters", type=int, default=400, help="iterations per scale (default 400; SinGAN used 2000)")
    ap.add_argument("--d-steps", type=int, default=3, help="discriminator updates per iteration (default 3)")
    ap.add_argument("--g-steps", type=int, default=3, help="generator updates per iteration (default 3)")
    ap.add_argument("--width", type=int, default=32, help="channels at the coarsest scale (default 32)")
    ap.add_argument("--max-width", type=int, default=128, help="cap of the doubling width (default 128)")
    ap.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default 5e-4)")
    ap.add_argument("--alpha", type=float, default=10.0, help="reconstruction weight (default 10)")
    ap.add_argument("--gp-weight", type=float, default=0.1, help="gradient-penalty weight (default 0.1)")
    ap.add_argument("--noise-amp", type=float, default=0.1, help="noise amplitude factor (default 0.1)")
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
                "lr", "alpha", "gp_weight", "noise_amp", "seed")


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only


def _main(argv) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("scales", "iters", "d_steps", "g_steps", "width", "max_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.scale_factor < 1:
        ap.error(f"--scale-factor must be in (0, 1), got {args.scale_factor}")
    if not os.path.isfile(args.seed_image):
        ap.error(f"--seed-image: no such file {args.seed_image!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt_path = args.checkpoint or args.out + ".ckpt"
    opts = {k: getattr(args, k) for k in _OPTION_KEYS}
    seed_sha = _sha256(args.seed_image)
    start, ck = 0, None
    command = "python -m fastloss.mdf.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    if args.resume:
        if not os.path.isfile(ckpt_path):
            ap.error(f"--resume: no checkpoint at {ckpt_path!r}")
        ck = torch.load(ckpt_path, weights_only=True)
        if ck.get("format") != "fastloss-mdf-train-checkpoint":
            ap.error(f"--resume: {ckpt_path!r} is not a fastloss MDF training checkpoint")
        if ck.get("seed_image_sha256") != seed_sha:
            ap.error("--resume: the checkpoint was trained on another seed image")
        opts = dict(ck["options"])  # the run continues with the options it started with
        start = ck["completed"]
        command = ck.get("command", "")
    real = load_image(args.seed_image)
    sizes = pyramid_sizes(real.shape[2], real.shape[3], opts["scales"], opts["scale_factor"], opts["max_size"])
    if min(sizes[0]) < 11:
        ap.error(f"the coarsest level would be {sizes[0][0]} x {sizes[0][1]}, below the 11 x 11 the discriminators "
                 "need: raise --max-size or --scale-factor, or lower --scales")
    real = _resize(real, sizes[-1]) if tuple(real.shape[2:]) != sizes[-1] else real
    trainer = _Trainer(opts, sizes, real)
    if ck is not None:
        trainer.restore(ck)
    stop = opts["scales"] if args.until_scale is None else min(opts["scales"], args.until_scale)
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
            state["seed_image_sha256"] = seed_sha
            state["command"] = command
            state["elapsed_s"] = elapsed0 + time.time() - t0
            tmp = ckpt_path + ".tmp"
            torch.save(state, tmp)
            os.replace(tmp, ckpt_path)
    finally:
        if progress is not None:
            progress.close()
    if stop < opts["scales"]:
        print(f"stopped after {stop} of {opts['scales']} scales; checkpoint {ckpt_path} (continue with --resume)")
        return 0
    import fastloss

    meta = {"origin": "trained by fastloss.mdf.train", "command": command, "resumed": ck is not None, "options": opts,
            "seed_image": os.path.basename(args.seed_image), "seed_image_sha256": seed_sha,
            "sizes": [list(s) for s in sizes], "per_scale": trainer.history,
            "elapsed_s": round(elapsed0 + time.time() - t0, 1), "torch": torch.__version__,
            "fastloss": fastloss.__version__, "threads": torch.get_num_threads()}
    W.save(to_weights(trainer.discs, meta), args.out)
    if not args.keep_checkpoint and os.path.isfile(ckpt_path):
        os.remove(ckpt_path)
    print(f"wrote {args.out}: {opts['scales']} discriminators, widths "
          f"{[width_at(s, opts['width'], opts['max_width']) for s in range(opts['scales'])]}, "
          f"{meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
