"""``fastloss-bench --demo``: trains the denoiser with L1 and with L1 + PDL and saves side-by-side
PNGs (noisy | L1 | L1 + PDL | clean) with each image's PSNR. ``--precision-check``: the same
fixed-seed training with PDL on a float32 backbone and on a bfloat16 one, and the PSNR each model
reaches on held-out crops."""
import math
import os

import torch
import torch.nn.functional as F

from .model import CONFIGS, DnCNN, _fast, random_batch
from .report import NO_MATPLOTLIB
from .run import _progress, train_steps


def _train(name, args, image, seed=None):
    seed = args.seed if seed is None else seed
    torch.manual_seed(seed)
    kind = CONFIGS[name][2]
    backend = _fast(args.device) if kind == "fast" else "reference"
    criterion = CONFIGS[name][3](backend, args).to(args.device)
    model = DnCNN(width=args.width).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    bar = _progress(args.demo_steps, f"train {name}", not args.no_progress)
    train_steps(model, criterion, opt, image, args, args.demo_steps, gen, bar)
    bar.close()
    return model.eval()


def psnr(out, clean):
    """Mean PSNR (dB) over the batch of images in [0, 1]."""
    mse = ((out.clamp(0, 1) - clean) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((-10 * torch.log10(mse)).mean())


def run_precision_check(args, image, crops=16):
    """Train the denoiser with L1 + PDL on a float32 backbone (``pdl-fast``) and on a bfloat16 one
    (``pdl-bf16``) from each of ``args.precision_seeds`` seeds; return the PSNR of every model on
    ``crops`` held-out crops. The control: how far float32 runs from different seeds land apart
    (the run-to-run spread a bfloat16 difference is to be read against)."""
    gen = torch.Generator().manual_seed(args.seed + 1)  # crops the training never drew
    noisy, clean = random_batch(image, crops, max(args.crop, 64), args.sigma / 255, gen)
    seeds = list(range(args.seed, args.seed + args.precision_seeds))
    result = {"steps": args.demo_steps, "crops": crops, "seeds": seeds, "pdl-fast": [], "pdl-bf16": []}
    for seed in seeds:
        for name in ("pdl-fast", "pdl-bf16"):
            model = _train(name, args, image, seed)
            with torch.no_grad():
                result[name].append(psnr(model(noisy.to(args.device)).cpu(), clean))
    result["difference_db"] = [b - f for f, b in zip(result["pdl-fast"], result["pdl-bf16"])]
    result["mean_difference_db"] = sum(result["difference_db"]) / len(seeds)
    result["float32_spread_db"] = max(result["pdl-fast"]) - min(result["pdl-fast"])
    per_seed = "; ".join(f"seed {s}: float32 {f:.3f} dB, bfloat16 {b:.3f} dB ({b - f:+.3f})"
                         for s, f, b in zip(seeds, result["pdl-fast"], result["pdl-bf16"]))
    control = (f"; float32 across seeds spans {result['float32_spread_db']:.3f} dB" if len(seeds) > 1 else "")
    print(f"precision check: {args.demo_steps} training steps, PSNR on {crops} held-out crops: {per_seed}; "
          f"mean difference {result['mean_difference_db']:+.3f} dB{control}")
    return result


def run_demo(args, image):
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(f"fastloss-bench --demo draws its figure with matplotlib: {NO_MATPLOTLIB}") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {name: _train(name, args, image) for name in ("l1", "pdl-fast")}
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
