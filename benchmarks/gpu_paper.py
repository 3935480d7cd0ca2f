"""The GPU design on paper (issue 13): bytes, FLOPs and H100 time floors of each op at the benchmark
shapes, next to the published sort anchors. Arithmetic only: nothing here runs, on a GPU or off it.

    python benchmarks/gpu_paper.py [--no-write]

Writes the ``gpu-paper`` section of BENCHMARKS.md. Every input is a constant below with its source,
or a shape from the benchmarks (bench_pdl.py, bench_d2sm.py, bench_mdf.py); the byte counts are the
minimum each op must move as the kernels are written (each input read once, each output written
once), the FLOPs those of the op's arithmetic.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# ---- assumptions: H100 SXM5 datasheet peaks (NVIDIA H100 Tensor Core GPU datasheet), which real
# kernels do not reach; dense (no sparsity) tensor-core figures
HBM_BYTES_PER_S = 3.35e12        # HBM3
FP32_FLOPS = 67e12               # FP32 on the CUDA cores
TF32_FLOPS = 494.7e12            # TF32 tensor cores, dense (989.4 with sparsity)
BF16_FLOPS = 989.4e12            # BF16 tensor cores, dense (1979 with sparsity)
# ---- published sort anchors (not measured here)
TORCH_SORT_KEYS_PER_S = (15e9, 20e9)  # torch.sort, CUDA, (4096, 4096) float32: FlagGems PR #694
CUB_SEGMENTED = (2 ** 26, 2 ** 12, 3.43e-3)  # keys, segments, seconds: DeviceSegmentedRadixSort, H200, cccl#9039
# ---- shapes of the benchmarks
PDL_SHAPES = ((8, 256, 64, 64), (8, 512, 32, 32))    # bench_pdl.py
D2SM_STEP = dict(q=1024, D=8192, B=16)               # bench_d2sm.py's queue step
MDF_SHAPE = (4, 3, 128, 128)                         # bench_mdf.py
MDF_JPEG_WIDTHS = (32, 32, 32, 32, 64, 64, 64, 64)   # the published Ds_JPEG.pth (../shared/mdf-official)
F32, I32, I8 = 4, 4, 1


def us(seconds):
    return f"{seconds * 1e6:.1f} µs"


def ms(seconds):
    return f"{seconds * 1e3:.2f} ms"


def mb(nbytes):
    return f"{nbytes / 1e6:.1f} MB"


def pdl_row(shape):
    """p = 1, target without grad: the forward reads pred and target and writes perm (int32), the
    sign (int8) and W; the backward reads perm, the sign and grad W and writes grad pred."""
    b, c, h, w = shape
    n = b * c * h * w
    rows = b * c
    fwd = n * (F32 + F32 + I32 + I8) + rows * F32
    bwd = n * (I32 + I8 + F32) + rows * F32
    keys = 2 * n
    lo, hi = TORCH_SORT_KEYS_PER_S
    return [f"PDL p=1 {shape} ({n:,} elements per tensor)", f"{mb(fwd)} / {mb(bwd)}",
            f"~{3 * n / 1e6:.0f} M (difference, abs, sum)", f"{us(fwd / HBM_BYTES_PER_S)} / {us(bwd / HBM_BYTES_PER_S)}",
            f"{keys / 1e6:.1f} M", f"{ms(keys / hi)}-{ms(keys / lo)}"]


def d2sm_row(q, D, B):
    """A D2SMQueue step: the B new rows against both banks (q x D each), the backward's product with
    the pred bank, and the two cached q x q similarity matrices read by the fused op."""
    banks = 2 * q * D * F32
    bwd_bank = q * D * F32
    caches = 2 * q * q * F32
    total = banks + bwd_bank + caches
    flops = 3 * 2 * B * q * D
    return [f"D2SMQueue step, q={q}, D={D}, B={B}", f"{mb(total)} (banks {mb(banks)[:-3]} + {mb(bwd_bank)[:-3]}, "
            f"caches {mb(caches)[:-3]})", f"{flops / 1e6:.0f} M (three B x q x D products)",
            f"{us(total / HBM_BYTES_PER_S)}; compute floor {us(flops / FP32_FLOPS)}", "none", "-"]


def mdf_cost(shape, widths):
    """(forward FLOPs, backward FLOPs, feature bytes) of the fast path's MDF step: every discriminator
    (head 3 -> w, three w -> w blocks, tail w -> 1; 3x3, unpadded) on the 2B stacked images in the
    forward; in the backward the transposed convolutions on the pred half only (B images; frozen
    weights: no weight gradients). Feature bytes: each layer's float32 output written once and read
    once in the forward, and its gradient written and read once in the backward (B images)."""
    b, cin, h, w = shape
    fwd = bwd = feat = 0
    for width in widths:
        layers = [(cin, width)] + [(width, width)] * 3 + [(width, 1)]
        for k, (ci, co) in enumerate(layers):
            ho, wo = h - 2 * (k + 1), w - 2 * (k + 1)
            flops = 2 * ci * co * 9 * ho * wo
            fwd += 2 * b * flops
            bwd += b * flops
            feat += (2 * b + b) * co * ho * wo * F32 * 2
    return fwd, bwd, feat


def mdf_row(shape, widths):
    fwd, bwd, feat = mdf_cost(shape, widths)
    total = fwd + bwd
    inputs = 2 * shape[0] * shape[1] * shape[2] * shape[3] * F32
    nbytes = feat + inputs
    return [f"MDF {shape}, the 8 published JPEG discriminators (widths {'/'.join(map(str, widths))})",
            f"{mb(nbytes)} (features in and out of HBM between layers)",
            f"{fwd / 1e9:.0f} G forward + {bwd / 1e9:.0f} G backward (3x3 convolutions)",
            f"HBM {ms(nbytes / HBM_BYTES_PER_S)}; compute {ms(total / FP32_FLOPS)} FP32, {ms(total / TF32_FLOPS)} "
            f"TF32, {ms(total / BF16_FLOPS)} BF16", "none", "-"]


def section():
    from common import markdown_table

    keys, segs, secs = CUB_SEGMENTED
    rows = [pdl_row(s) for s in PDL_SHAPES] + [d2sm_row(**D2SM_STEP), mdf_row(MDF_SHAPE, MDF_JPEG_WIDTHS)]
    fwd, bwd, feat = mdf_cost(MDF_SHAPE, MDF_JPEG_WIDTHS)
    b, c, h, w = PDL_SHAPES[0]
    n = b * c * h * w
    floor = n * (F32 + F32 + I32 + I8) / HBM_BYTES_PER_S
    sort_lo, sort_hi = (2 * n / TORCH_SORT_KEYS_PER_S[1]) / floor, (2 * n / TORCH_SORT_KEYS_PER_S[0]) / floor
    mdf_ratio = ((fwd + bwd) / FP32_FLOPS) / (feat / HBM_BYTES_PER_S)
    lines = ["## The GPU design on paper (arithmetic, not measurements)", "",
             "Command: `python benchmarks/gpu_paper.py` (the arithmetic; every input is a constant in that script "
             "with its source). No GPU has run this code; nothing below is measured.", "",
             f"Assumptions: H100 SXM HBM3 at {HBM_BYTES_PER_S / 1e12:.2f} TB/s; {FP32_FLOPS / 1e12:.0f} TFLOP/s FP32, "
             f"{TF32_FLOPS / 1e12:.0f} TFLOP/s TF32 and {BF16_FLOPS / 1e12:.0f} TFLOP/s BF16 dense tensor-core "
             "(NVIDIA H100 datasheet peaks, which real kernels do not reach); float32 data, int32 permutations, "
             "int8 signs (p = 1), target without grad; bytes are the minimum each op must move as written (each "
             "input read once, each output written once), MB = 10^6 bytes.", "",
             f"Sort anchors (published, not measured here): `torch.sort` on CUDA about "
             f"{TORCH_SORT_KEYS_PER_S[0] / 1e9:.0f}-{TORCH_SORT_KEYS_PER_S[1] / 1e9:.0f} G keys/s on (4096, 4096) "
             f"float32 (FlagGems PR #694); CUB `DeviceSegmentedRadixSort` on an H200, 2^26 int32 keys in 2^12 "
             f"segments in {secs * 1e3:.2f} ms, i.e. {keys / secs / 1e9:.1f} G keys/s (NVIDIA/cccl#9039). Rows past "
             "4096 on the CUDA backend now go through `cub::DeviceSegmentedSort` (its kernel does not spill, see "
             "gpu-static), also one block per segment; no published throughput for it was found, so the anchor "
             "range stands in for it.", ""]
    lines += markdown_table(["op (benchmark shape)", "bytes, forward / backward", "FLOPs", "floor on an H100",
                             "sort keys", "sort time at the anchors"], rows)
    lines += ["", f"Reading: for PDL the sort dominates by a factor of about "
              f"{sort_lo:.0f}-{sort_hi:.0f} over the memory floor, so the "
              "design's speed rests on the sort throughput (the single-program `tl.sort` up to N = 2048 and "
              "cub::BlockRadixSort up to 4096, torch.sort / CUB beyond), not on the fused difference, reduction "
              "and scatter. D2SM is memory-bound (its products have B = 16 rows). MDF is the convolutions: in FP32 "
              "on the CUDA cores it is compute-bound, "
              f"about {mdf_ratio:.1f}x its HBM floor; with TF32 or BF16 tensor cores "
              "the floor becomes the feature traffic between layers, which is why the fast path fuses bias and "
              "LeakyReLU into the convolution epilogue and reduces all feature pairs in one kernel rather than "
              "adding passes over the features."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    text = section()
    print(text)
    if not args.no_write:
        from common import write_section

        write_section("gpu-paper", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
