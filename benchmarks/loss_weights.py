"""What weight to give each fastloss loss beside an L1 pixel loss, measured on fastloss-bench's
denoiser: the ratio of the gradient norms (over the denoiser's parameters) of the L1 and of the
loss at its defaults, ``lambda = ||grad L1|| / ||grad loss||``, so ``L1 + lambda * loss`` gives
both terms the same pull. Median over several batches, after ``--warmup`` steps of L1 training
(an untrained network's output is noise, which no trainer keeps for long).

    python benchmarks/loss_weights.py                       # VGG losses on the ImageNet file
    python benchmarks/loss_weights.py --vgg-weights none    # random VGG weights (no ImageNet file)

Prints the CPU and one row per loss; ``--json`` writes them. Not a test: the README's table quotes
its figures with the command and the machine.
"""
import argparse
import json
import platform
import statistics

import torch

import fastloss
from fastloss.bench.model import DnCNN, make_image, random_batch


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def losses(vgg_weights, queue_size):
    return {
        "PDLLoss()": lambda: fastloss.PDLLoss(extractor_weights=vgg_weights),
        "PerceptualLoss()": lambda: fastloss.PerceptualLoss(extractor_weights=vgg_weights),
        f"D2SMLoss(queue_size={queue_size})": lambda: fastloss.D2SMLoss(extractor_weights=vgg_weights,
                                                                       queue_size=queue_size),
        "MDFLoss()": lambda: fastloss.MDFLoss(),
    }


def grad_norm(model, value):
    model.zero_grad(set_to_none=True)
    value.backward()
    return torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vgg-weights", default="torchvision",
                    help="'torchvision' (the ImageNet file, default), a path, or 'none' (random weights)")
    ap.add_argument("--warmup", type=int, default=200, help="L1 training steps before measuring")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    vgg_weights = None if args.vgg_weights == "none" else args.vgg_weights
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    image = make_image(256)
    model = DnCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.warmup):
        noisy, clean = random_batch(image, args.batch, args.crop, args.sigma, g)
        loss = (model(noisy) - clean).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()  # BatchNorm's running statistics: each batch's gradient alone
    batches = [random_batch(image, args.batch, args.crop, args.sigma, g) for _ in range(args.batches)]
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; VGG weights: {args.vgg_weights}; "
          f"DnCNN after {args.warmup} L1 steps, batch {args.batch}, {args.crop} x {args.crop}, sigma {args.sigma}")
    rows = []
    for name, make in losses(vgg_weights, args.queue_size).items():
        torch.manual_seed(0)
        criterion = make()
        if name.startswith("D2SM"):  # fill the queue first, as training does
            with torch.no_grad():
                for _ in range(args.queue_size // args.batch):
                    noisy, clean = random_batch(image, args.batch, args.crop, args.sigma, g)
                    criterion(model(noisy).clamp(0, 1), clean)
        ratios, values = [], []
        for noisy, clean in batches:
            l1 = grad_norm(model, (model(noisy) - clean).abs().mean())
            value = criterion(model(noisy), clean)
            values.append(value.item())
            ratios.append(l1 / max(grad_norm(model, value), 1e-300))
        row = {"loss": name, "value": statistics.median(values), "lambda": statistics.median(ratios),
               "lambda_min": min(ratios), "lambda_max": max(ratios)}
        rows.append(row)
        print(f"{name:28s} value {row['value']:.4g}   lambda = ||grad L1|| / ||grad loss|| = {row['lambda']:.3g} "
              f"(range {row['lambda_min']:.3g} to {row['lambda_max']:.3g} over {len(ratios)} batches)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
