"""The frozen backbone's precision and layout: one PDLLoss forward + backward on images.

    python benchmarks/bench_backbone.py [--shape 4x3x96x96] [--layers relu4_3] [--reps 7] [--no-write]

Providers, side by side in one process (median of interleaved runs): the hand-written float32
VGG16 + ``torch.sort`` PDL (torchvision-layout ``nn.Sequential``, NCHW), the same under
``torch.autocast(bfloat16)`` as a user writes it, and ``fastloss.PDLLoss`` with its backbone in
float32 or bfloat16, NCHW or channels_last (``channels_last=None`` picks NHWC on the CPU:
``fastloss.features.channels_last_default``). Writes the ``backbone`` section of BENCHMARKS.md.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastloss  # noqa: E402


def _hand(vgg, layers, autocast, dtype=torch.bfloat16):
    """The loss as written by hand: the VGG's Sequential as it is, torch.sort PDL on its features
    (under ``torch.autocast(dtype)`` if ``autocast``)."""
    index = dict(vgg._out_index)

    def run(x):
        x = (x - vgg.mean) / vgg.std
        out = {}
        for i, m in enumerate(vgg.features):
            x = m(x)
            if i in index:
                out[index[i]] = x
        return out

    def loss(u, v):
        ctx = torch.autocast(u.device.type, dtype=dtype) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            fu = run(u)
            with torch.no_grad():
                fv = run(v)
        return sum(fastloss.pdl_reference(fu[k].float(), fv[k].float()) for k in layers)
    return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4x3x96x96", help="BxCxHxW, default: %(default)s")
    ap.add_argument("--layers", default="relu4_3", help="comma-separated VGG16 layers, default: %(default)s")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per provider (median), default 7")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    shape = tuple(int(v) for v in args.shape.split("x"))
    layers = tuple(s.strip() for s in args.layers.split(","))
    torch.manual_seed(0)
    clean = torch.rand(shape)
    restored = (clean + 0.05 * torch.randn(shape)).clamp(0, 1)
    base = fastloss.PDLLoss(layers=layers, extractor_weights=None, pixel_weight=0.0, weight=1.0)
    providers = {"hand-written float32 (VGG16 + torch.sort)": _hand(base.extractor, layers, False),
                 "hand-written, autocast bfloat16": _hand(base.extractor, layers, True)}
    for dtype in (None, torch.bfloat16):
        for cl in (False, True):
            loss = fastloss.PDLLoss(layers=layers, extractor_weights=None, pixel_weight=0.0, weight=1.0,
                                    compute_dtype=dtype)
            loss.extractor.load_state_dict(base.extractor.state_dict())
            loss.extractor.channels_last = cl
            providers[f"fastloss {'bfloat16' if dtype else 'float32'}, {'channels_last' if cl else 'NCHW'}"] = loss
    # float16: what the backbone would cost computed in it (by hand, autocast), and what fastloss
    # does in a float16 autocast region (its backbone in float32; docs/fast-steps.md says why)
    providers["hand-written, autocast float16"] = _hand(base.extractor, layers, True, torch.float16)

    f16_region = fastloss.PDLLoss(layers=layers, extractor_weights=None, pixel_weight=0.0, weight=1.0)
    f16_region.extractor.load_state_dict(base.extractor.state_dict())

    def fastloss_in_float16_autocast(u, v):
        with torch.autocast(u.device.type, dtype=torch.float16):
            return f16_region(u, v)
    providers["fastloss in an autocast float16 region (backbone in float32)"] = fastloss_in_float16_autocast

    def step(fn):
        def run():
            u = restored.clone().requires_grad_()
            fn(u, clean).backward()
        return run

    med, _ = common.time_interleaved({k: step(f) for k, f in providers.items()}, args.reps)
    ref = med["hand-written float32 (VGG16 + torch.sort)"]
    hand_ac = med["hand-written, autocast bfloat16"]
    rows = [(k, f"{1000 * v:.0f}", f"{ref / v:.2f}x", f"{hand_ac / v:.2f}x") for k, v in med.items()]
    default_cl = fastloss.features.channels_last_default(torch.device("cpu"), torch.float32)
    notes = [f"Random VGG16 weights (the cost does not depend on them), layers {', '.join(layers)}, images "
             f"{shape}. fastloss's default on this device: channels_last={default_cl} "
             "(`channels_last=None`). The PDL formula runs in float32 on the features in every row."]
    common.write_report("backbone", "## The frozen backbone: precision and layout (`bench_backbone.py`)", argv, args.reps,
                        "no provider (speed only)", common.machine(),
                        ["provider", "forward+backward ms", "vs hand float32", "vs hand autocast"], rows, notes,
                        intro=[f"- measured at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
                               f"{os.getloadavg()[0]:.2f} before the run"], write=not args.no_write)
    for r in rows:
        print(" | ".join(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
