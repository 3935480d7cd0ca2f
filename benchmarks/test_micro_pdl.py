"""Microbenchmarks of the PDL op: every available backend and its peers, forward and
forward+backward, with peak extra memory in ``extra_info``.

    pytest benchmarks/ --benchmark-json=bench.json          # everything
    pytest benchmarks/ -k smoke --benchmark-disable          # what CI runs: they run, nothing timed
"""
import pytest
import torch

import common
import fastloss

try:
    import ot
except ImportError:
    ot = None

SIZES = {"smoke": (2, 8, 16, 16), "relu4_3-96px": (8, 512, 12, 12), "relu2_2-96px": (8, 128, 48, 48),
         "8x256x64x64": (8, 256, 64, 64), "8x512x32x32": (8, 512, 32, 32)}


def _providers():
    out = {}
    for b in ("reference", "cpu"):
        if fastloss.backends()[b]["available"]:
            out[f"fastloss-{b}"] = lambda x, y, b=b: fastloss.pdl(x, y, backend=b)
    out["torch.sort-formula"] = lambda x, y: (torch.sort(x.flatten(2), dim=-1).values
                                              - torch.sort(y.flatten(2), dim=-1).values).abs().mean(-1).sum(1).mean()
    if ot is not None:
        out["POT-wasserstein_1d"] = lambda x, y: ot.wasserstein_1d(
            x.reshape(x.shape[0] * x.shape[1], -1).T, y.reshape(y.shape[0] * y.shape[1], -1).T, p=1
        ).view(x.shape[:2]).sum(1).mean()
    return out


PROVIDERS = _providers()


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_pdl(benchmark, provider, mode, size):
    if provider.startswith("POT") and size != "smoke" and SIZES[size][1] * SIZES[size][2] * SIZES[size][3] > 2**20:
        pytest.skip("POT takes seconds per call at this size; see BENCHMARKS.md for one measured run")
    fn = PROVIDERS[provider]
    x = torch.randn(SIZES[size]).relu_().requires_grad_(mode != "forward")
    y = torch.randn(SIZES[size]).relu_()

    def run():
        x.grad = None
        out = fn(x, y)
        if mode != "forward":
            out.backward()
        return out

    benchmark.group = f"pdl {mode} {size}"
    benchmark.extra_info["peak_extra_bytes_in_process"] = common.peak_extra_bytes(run)
    benchmark(run)
