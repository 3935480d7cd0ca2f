"""One small call of every CUDA kernel of fastloss._C_cuda, forward and backward, for
``compute-sanitizer`` (memcheck; racecheck for the kernels with shared memory: PDL's block sort,
D2SM's and MDF's block reductions). scripts/gpu-check.sh runs it under each tool with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 (so that every tensor is its own allocation and an access past
one is seen). It calls the ops directly (no cuDNN convolution, whose kernels would dominate the
instrumented time), checks nothing numerically (the selftest does) and exits 0 when every call
returned; the sanitizer's exit code reports what it saw.

    python scripts/gpu-sanitize-cases.py
"""
import sys

import torch

import fastloss
from fastloss import _backend, _ops

bias_lrelu_ = _ops.cuda("mdf_bias_leaky_relu_")  # what the cuda row's conv_lrelu calls after each convolution

# PDL row lengths: one per CUDA block-sort tile (csrc/cuda/pdl_kernels.cu: N <= 128, 256, 512, 1024,
# 2048, 4096) and the segmented sort past it; 301 rows there: two CUB calls of <= 256 rows
PDL_CASES = [(2, 3, n) for n in (1, 100, 200, 500, 1000, 2000, 4000)] + [(2, 3, 4097), (1, 301, 4097)]


def main():
    if not torch.cuda.is_available():
        print("gpu-sanitize-cases: no CUDA device", file=sys.stderr)
        return 2
    why = _backend.why_not("cuda", torch.device("cuda"), torch.float32)
    if why is not None:
        print(f"gpu-sanitize-cases: the cuda backend cannot run: {why}", file=sys.stderr)
        return 2
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    calls = 0
    for b, c, n in PDL_CASES:
        for dtype, p, tg in ((torch.float32, 1, True), (torch.float16, 2, False), (torch.float64, 2, False)):
            if dtype == torch.float64 and n <= 4096 and n != 1000:
                continue  # float64 through every tile would double the run; one tile and the segmented path
            x = torch.randn(b, c, n, generator=g, device=dev).to(dtype)
            y = torch.randn(b, c, n, generator=g, device=dev).to(dtype)
            w, perm, perm_t, deriv = torch.ops.fastloss.pdl_forward(x, y, p, tg, "cuda")
            gw = torch.ones_like(w)
            torch.ops.fastloss.pdl_backward(gw, perm, perm_t, deriv, True, tg, dtype, False, "cuda")
            calls += 2
    for q in (2, 37, 300):
        for mode in ("paper", "pkt"):
            for dtype in (torch.float32, torch.float64):
                x = torch.randn(q, 24, generator=g, device=dev, dtype=dtype).requires_grad_()
                y = torch.randn(q, 24, generator=g, device=dev, dtype=dtype)
                fastloss.d2sm_kl(x, y, mode=mode, backend="cuda").backward()
                calls += 1
    queue = fastloss.D2SMQueue(queue_size=16, backend="cuda").to(dev)
    for _ in range(5):  # fills, then wraps: the set's size read on the device
        x = torch.randn(6, 24, generator=g, device=dev).requires_grad_()
        queue(x, torch.randn(6, 24, generator=g, device=dev)).backward()
        calls += 1
    for dtype in (torch.float32, torch.float16, torch.float64):
        for fmt in (torch.contiguous_format, torch.channels_last):
            feats = [torch.randn(4, ch, h, w, generator=g, device=dev).to(dtype).contiguous(memory_format=fmt)
                     for ch, h, w in ((8, 9, 7), (16, 5, 6), (1, 3, 3))]
            chan_w = [torch.rand(f.shape[1], generator=g, device=dev).to(dtype) for f in feats]
            loss, diffs = torch.ops.fastloss.mdf_sqdiff_forward(feats, chan_w, 2, True, "cuda")
            torch.ops.fastloss.mdf_sqdiff_backward(torch.ones_like(loss), diffs, chan_w, "cuda")
            y = torch.randn(2, 8, 5, 7, generator=g, device=dev).to(dtype).contiguous(memory_format=fmt)
            bias_lrelu_(y, torch.randn(8, generator=g, device=dev).to(dtype), 0.2)  # the conv epilogue
            calls += 3
    torch.cuda.synchronize()
    print(f"gpu-sanitize-cases: {calls} calls returned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
