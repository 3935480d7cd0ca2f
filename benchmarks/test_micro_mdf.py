"""Microbenchmarks of MDF: the multi-scale feature extraction and the loss, on every available
backend and against the published per-discriminator loop, forward and forward+backward, with the
peak extra memory of one call in ``extra_info``.

    pytest benchmarks/test_micro_mdf.py --benchmark-json=mdf.json   # everything
    pytest benchmarks/ -k smoke --benchmark-disable                  # what CI runs: they run, nothing timed

Two ops, both giving the per-sample loss of pred against target (images: a clean batch in [0, 1]
and a noisy copy), all 8 discriminators of the set, coarsest first:

- ``test_mdf_features``: the feature extraction alone, without the ``MDFLoss`` module around it.
  ``fastloss-<backend>`` is the fast path's fused op ``torch.ops.fastloss.mdf_forward`` (its
  backward ``mdf_backward``) on the BatchNorm-folded, merged convolutions, with that backend's
  fused reduction (``reference``: the same structure in plain torch ops); the peer
  ``published-loop`` is the published order of operations, ``fastloss.mdf.discriminator_features``
  discriminator by discriminator on pred then target, conv -> BatchNorm -> LeakyReLU, and the
  squared differences added per sample.
- ``test_mdf_loss``: ``fastloss.MDFLoss(weights, backend=...)``, what training calls. Its
  ``reference`` backend is the published per-discriminator loop, the peer.

Backends: ``reference`` and ``cpu`` on the CPU; ``reference``, ``triton`` and ``cuda`` on a CUDA
device when there is one (those available). Weights: the published ``Ds_JPEG.pth`` (widths 32 and
64) when ``../shared/mdf-official`` has it, else the shipped ``jpeg`` set (16 and 32); which one
is in ``extra_info["weights"]``.
"""
import functools
import os

import pytest
import torch

import common
import fastloss
from bench_mdf import default_weights

# (B, 3, H, W): a batch of training crops; the three full sizes have the same number of pixels
SIZES = {"smoke": (1, 3, 16, 16), "16x3x64x64": (16, 3, 64, 64), "4x3x128x128": (4, 3, 128, 128),
         "1x3x256x256": (1, 3, 256, 256)}


@functools.lru_cache(maxsize=None)
def _weights():
    return fastloss.mdf.load(default_weights())


@functools.lru_cache(maxsize=None)
def _criterion(backend):
    """The loss module of ``backend`` (the weights read once, folded once per backend)."""
    return fastloss.MDFLoss(_weights(), backend=backend)


def _published_loop(pred, target):
    """Per-sample loss [B] in the published order of operations, discriminator by discriminator."""
    crit = _criterion("reference")
    w = crit.weights
    loss = torch.zeros(pred.shape[0], device=pred.device, dtype=pred.dtype)
    for d in crit.reference_discriminators(pred.device, pred.dtype):
        fp = fastloss.mdf.discriminator_features(d, pred, w.eps, w.negative_slope)
        ft = fastloss.mdf.discriminator_features(d, target, w.eps, w.negative_slope)
        for a, b in zip(fp, ft):
            loss = loss + ((a - b) ** 2).mean(dim=(1, 2, 3))
    return loss


def _fused_features(backend):
    """Per-sample loss [B] from the fast path's fused feature-extraction op, as ``MDFLoss`` calls it."""
    crit = _criterion(backend)

    def fn(pred, target):
        grouped = crit.grouped if crit.grouped is not None else pred.device.type == "cuda"
        params, unit_sizes = crit.params(pred.device, pred.dtype, grouped)
        need_grad = torch.is_grad_enabled() and pred.requires_grad
        return torch.ops.fastloss.mdf_forward(pred, target, params, unit_sizes, crit.weights.negative_slope,
                                              need_grad, False, backend, False)[0]
    return fn


def _params(with_peer):
    provs = [(common.micro_label(f"fastloss-{b}", dev), b, dev) for b, dev in common.micro_backends()]
    if with_peer:
        provs += [(common.micro_label("published-loop", dev), None, dev) for dev in common.micro_devices()]
    return [pytest.param(name, backend, dev, size, id=f"{name}-{size}") for name, backend, dev in provs
            for size in SIZES]


def _time(benchmark, fn, device, size, passes, group, backend):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(SIZES[size], generator=g)                                  # clean images in [0, 1]
    pred = (target + 0.1 * torch.randn(SIZES[size], generator=g)).clamp(0, 1)     # restored images
    pred, target = pred.to(device).requires_grad_(passes != "forward"), target.to(device)
    run = common.micro_run(fn, lambda: (pred, target), passes, device)
    common.micro_measure(benchmark, run, f"{group} {passes} {size}", device, backend=backend or "peer",
                         shape=list(SIZES[size]), weights=os.path.basename(_weights().source))


@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider,backend,device,size", _params(with_peer=True))
def test_mdf_features(benchmark, provider, backend, device, size, passes):
    fn = _published_loop if backend is None else _fused_features(backend)
    _time(benchmark, fn, device, size, passes, "mdf features", backend)


@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider,backend,device,size", _params(with_peer=False))
def test_mdf_loss(benchmark, provider, backend, device, size, passes):
    _time(benchmark, _criterion(backend), device, size, passes, "MDFLoss", backend)
