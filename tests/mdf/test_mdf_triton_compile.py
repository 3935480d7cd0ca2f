"""The MDF Triton kernels compile for a GPU (sm_90, down to cubin) on this GPU-less machine:
a check beyond the interpreter, which does not type-check the way the compiler does."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastloss.kernels import mdf as K

target = GPUTarget("cuda", 90, 32)
TL = {"fp32": tl.float32, "fp64": tl.float64, "fp16": tl.float16, "bf16": tl.bfloat16}
for x in ("fp32", "fp64", "fp16", "bf16"):
    acc = "fp64" if x == "fp64" else "fp32"
    xs, ws = ("*" + x,) * 3, ("*" + acc,) * 3  # three tensors: tuples of addresses
    for save in (False, True):
        const = {"ACC_DTYPE": TL[acc], "SAVE_DIFF": save, "BLOCK": 1024}
        sig = {"desc_ptr": "*i64", "xs": xs, "ws": ws, "outs": xs, "partial_ptr": "*" + acc, "M": "i32",
               "K": "i32", "B": "i32", "ACC_DTYPE": "constexpr", "SAVE_DIFF": "constexpr", "BLOCK": "constexpr"}
        assert "cubin" in triton.compile(ASTSource(K._mdf_fwd_kernel, sig, const), target=target).asm
    const = {"ACC_DTYPE": TL[acc], "BLOCK": 1024}
    sig = {"desc_ptr": "*i64", "xs": xs, "ws": ws, "outs": xs, "grad_ptr": "*" + acc, "M": "i32",
           "ACC_DTYPE": "constexpr", "BLOCK": "constexpr"}
    assert "cubin" in triton.compile(ASTSource(K._mdf_bwd_kernel, sig, const), target=target).asm
    sig = {"y_ptr": "*" + x, "b_ptr": "*" + x, "slope_ptr": "*" + acc, "total": "i64", "C": "i32", "cdiv": "i32",
           "ACC_DTYPE": "constexpr", "BLOCK": "constexpr"}
    const = {"ACC_DTYPE": TL[acc], "BLOCK": 1024}
    assert "cubin" in triton.compile(ASTSource(K._bias_lrelu_kernel, sig, const), target=target).asm
print("ok")
"""


def test_mdf_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
