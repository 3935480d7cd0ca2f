"""GPU resources of every kernel, compiled ahead of time without a GPU (issue 13).

    python benchmarks/gpu_static.py [--quick | --step] [--json FILE] [--markdown FILE] [--no-cuda] [--jobs N]

For sm_80 and sm_90: every Triton kernel variant the dispatch can launch (``triton.compile`` with
a ``GPUTarget``; registers, spills and shared memory from the compiled kernel's metadata) and
every CUDA kernel (``nvcc -Xptxas -v`` with the flags setup.py gives torch's extension build).
``--quick`` compiles a representative subset: each kernel, each dtype class and each block-size
class (the smallest and the largest block of every kernel); ``--step`` only the variants of a default
training step (below), a minute's check that CI runs. Every list also compiles, for sm_90, the
specialisations Triton applies at launch (``launch_specialisations``: each integer argument equal
to 1 as a constant, in turn; every integer argument divisible by 16 with that hint), since a kernel
that compiles with its integers typed ``i32`` may still fail for the arguments a launch passes
(issue 22: PDL with N == 1). Each row: kernel, variant, arch,
registers, spill_bytes, shared_bytes, compile_s. A kernel's name starts with the loss it serves
(pdl, d2sm, mdf). Also prints the compile seconds of the variants a default training step of
PDLLoss, D2SMLoss and MDFLoss (float32 and bfloat16) needs, and writes the ``gpu-static``
section of BENCHMARKS.md (``--markdown FILE`` writes it to FILE instead; ``--no-markdown`` not
at all). Nothing here runs on a GPU: these are compiler figures, not measurements of a GPU.
"""
import argparse
import concurrent.futures as cf
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # compile, do not interpret (before triton is imported); importing
    os.environ["TRITON_INTERPRET"] = "0"  # this module (a test does) must not change the caller's mode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ARCHS = (80, 90)
# Shared memory one block may use (with the opt-in): sm_80 163 KiB, sm_90 227 KiB (CUDA C
# Programming Guide, compute capabilities table). Static __shared__ in a CUDA kernel: 48 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
STATIC_SHARED_LIMIT = 48 * 1024
KEYS = ("kernel", "variant", "arch", "registers", "spill_bytes", "shared_bytes", "compile_s")

_TL = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp64": "fp64"}


def _acc(x):
    return "fp64" if x == "fp64" else "fp32"


def _pow2s(lo, hi):
    out, b = [], lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out


# ---------------------------------------------------------------------------------------- variants
def triton_variants(quick):
    """(kernel, variant, fn name in its module, module, signature, constexprs, pointer args,
    num_warps) for every launch the dispatch can make; quick: a covering subset."""
    import triton.language as tl

    from fastloss.kernels import d2sm as kd, mdf as km, pdl as kp

    tl_dtype = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "fp64": tl.float64}
    step = set(default_step_keys())
    out = []

    def skip(kernel, variant, subset):
        """In --quick, a variant outside the subset is skipped unless a default step needs it."""
        return quick and not subset and (kernel, variant) not in step
    # ---- PDL forward, one program per row, sort in registers: BLOCK_N = 2 .. TRITON_MAX_SORT_N
    blocks = _pow2s(2, kp.TRITON_MAX_SORT_N)
    for x in ("fp32", "bf16", "fp16"):  # float64 rows always take the torch.sort ordering
        acc = _acc(x)
        for block in blocks:
            for p in (1, 2):
                for tg in (False, True):
                    if skip("pdl_fwd_sort", f"{x} N<={block} p={p} target_grad={int(tg)}",
                            block in (blocks[0], blocks[-1]) and x != "fp16" and (p, tg) in ((1, False), (2, True))):
                        continue
                    sig = {"pred_ptr": "*" + x, "target_ptr": "*" + x, "w_ptr": "*" + acc, "perm_ptr": "*i32",
                           "perm_t_ptr": "*i32", "deriv_ptr": "*i8" if p == 1 else "*" + acc, "C": "i32", "N": "i32"}
                    for t in ("pred", "target"):
                        sig.update({f"{t}_stride_b": "i32", f"{t}_stride_c": "i32", f"{t}_stride_n": "i32"})
                    const = {"P": p, "TARGET_GRAD": tg, "BLOCK_N": block}
                    sig.update({k: "constexpr" for k in const})
                    out.append(("pdl_fwd_sort", f"{x} N<={block} p={p} target_grad={int(tg)}", "_pdl_fwd_sort_kernel",
                                kp, sig, const, min(16, max(1, block // 256))))
    # ---- PDL forward past the cap (torch.sort order, gathered here) and the backward: BLOCK_N 2 .. LOOP
    loop_blocks = _pow2s(2, kp.TRITON_LOOP_BLOCK_N)
    for x in ("fp32", "bf16", "fp16", "fp64"):
        acc = _acc(x)
        for p in (1, 2):
            if skip("pdl_fwd_gather", f"{x} p={p} BLOCK_N={loop_blocks[-1]}", x != "fp16" and (x == "fp32" or p == 2)):
                continue
            sig = {"pred_ptr": "*" + x, "target_ptr": "*" + x, "perm_ptr": "*i32", "order_t_ptr": "*i32",
                   "w_ptr": "*" + acc, "deriv_ptr": "*i8" if p == 1 else "*" + acc, "C": "i32", "N": "i32"}
            for t in ("pred", "target"):
                sig.update({f"{t}_stride_b": "i32", f"{t}_stride_c": "i32", f"{t}_stride_n": "i32"})
            const = {"P": p, "IS_F64": x == "fp64", "BLOCK_N": loop_blocks[-1]}
            sig.update({k: "constexpr" for k in const})
            out.append(("pdl_fwd_gather", f"{x} p={p} BLOCK_N={loop_blocks[-1]}", "_pdl_fwd_gather_kernel", kp,
                        sig, const, 4))
        for block in loop_blocks:
            for deriv in ("i8", acc):
                for need in ((True, False), (True, True), (False, True)):
                    if skip("pdl_bwd", f"{x} deriv={deriv} pred={int(need[0])} target={int(need[1])} BLOCK_N={block}",
                            block in (loop_blocks[0], loop_blocks[-1]) and x != "fp16" and need == (True, True)
                            and (x == "fp32" or deriv == "i8")):
                        continue
                    sig = {"grad_w_ptr": "*" + x if x != "fp64" else "*fp64", "perm_ptr": "*i32", "perm_t_ptr": "*i32",
                           "deriv_ptr": "*" + deriv, "grad_pred_ptr": "*" + x, "grad_target_ptr": "*" + x,
                           "C": "i32", "N": "i32", "grad_w_stride_b": "i32", "grad_w_stride_c": "i32"}
                    const = {"NEED_PRED": need[0], "NEED_TARGET": need[1], "IS_F64": x == "fp64", "BLOCK_N": block}
                    sig.update({k: "constexpr" for k in const})
                    out.append(("pdl_bwd", f"{x} deriv={deriv} pred={int(need[0])} target={int(need[1])} "
                                f"BLOCK_N={block}", "_pdl_bwd_kernel", kp, sig, const, 4))
    # ---- D2SM: rows and grad kernels, BLOCK_Q = 2 .. TRITON_BLOCK_Q
    q_blocks = _pow2s(2, kd.TRITON_BLOCK_Q)
    for x in ("fp32", "fp64"):
        for block in q_blocks:
            for paper in (True, False):
                for live in (False, True):
                    name = f"{x} {'paper' if paper else 'pkt'} live_q={int(live)} BLOCK_Q={block}"
                    if skip("d2sm_rows", name, block in (q_blocks[0], q_blocks[-1]) and live != (x == "fp64")):
                        continue
                    const = {"PAPER": paper, "LIVE_Q": live, "BLOCK_Q": block}
                    sig = {"sp_ptr": "*" + x, "st_ptr": "*" + x, "dots_p_ptr": "*fp64", "dots_t_ptr": "*fp64",
                           "eps_ptr": "*" + x, "inv_p_ptr": "*fp64", "inv_t_ptr": "*fp64", "c_ptr": "*fp64",
                           "row_loss_ptr": "*fp64", "q_ptr": "*i64" if live else "*fp64", "q": "i32",
                           "sp_stride": "i32", "st_stride": "i32"}
                    sig.update({k: "constexpr" for k in const})
                    out.append(("d2sm_rows", name, "_d2sm_rows_kernel", kd, sig, const, 4))
                    sig = {"sp_ptr": "*" + x, "st_ptr": "*" + x, "inv_p_ptr": "*fp64", "inv_t_ptr": "*fp64",
                           "c_ptr": "*fp64", "rows_ptr": "*i64", "eps_ptr": "*" + x, "out_ptr": "*" + x,
                           "q_ptr": "*i64" if live else "*fp64", "q": "i32", "sp_stride": "i32", "st_stride": "i32"}
                    sig.update({k: "constexpr" for k in const})
                    out.append(("d2sm_grad", name, "_d2sm_grad_kernel", kd, sig, const, 4))
    # ---- MDF: the fused reductions (M tensors in one launch; M = 1 + 2U) and the bias + LeakyReLU epilogue
    for x in ("fp32", "bf16", "fp16", "fp64"):
        acc = _acc(x)
        for m in (5, 17):  # grouped (CUDA's default: 2 units) and not (8 units)
            xs, ws = ("*" + x,) * m, ("*" + acc,) * m
            for save in (False, True):
                if skip("mdf_sqdiff_fwd", f"{x} M={m} save_diff={int(save)}", x == "fp32" or (x == "fp64" and m == 5)):
                    continue
                const = {"ACC_DTYPE": tl_dtype[acc], "SAVE_DIFF": save, "BLOCK": km.TRITON_BLOCK}
                sig = {"desc_ptr": "*i64", "xs": xs, "ws": ws, "outs": xs, "partial_ptr": "*" + acc, "M": "i32",
                       "K": "i32", "B": "i32"}
                sig.update({k: "constexpr" for k in const})
                out.append(("mdf_sqdiff_fwd", f"{x} M={m} save_diff={int(save)}", "_mdf_fwd_kernel", km, sig, const, 4))
            if skip("mdf_sqdiff_bwd", f"{x} M={m}", x == "fp32" or (x == "fp64" and m == 5)):
                continue
            const = {"ACC_DTYPE": tl_dtype[acc], "BLOCK": km.TRITON_BLOCK}
            sig = {"desc_ptr": "*i64", "xs": xs, "ws": ws, "outs": xs, "grad_ptr": "*" + acc, "M": "i32"}
            sig.update({k: "constexpr" for k in const})
            out.append(("mdf_sqdiff_bwd", f"{x} M={m}", "_mdf_bwd_kernel", km, sig, const, 4))
        sig = _bias_lrelu_signature(km, x)
        const = {"ACC_DTYPE": tl_dtype[acc], "BLOCK": km.TRITON_BLOCK}
        sig.update({k: "constexpr" for k in const})
        out.append(("mdf_bias_lrelu", x, "_bias_lrelu_kernel", km, sig, const, 4))
    return out


def _bias_lrelu_signature(km, x):
    """The epilogue's arguments, from the kernel itself (its slope argument may be a pointer)."""
    names = km._bias_lrelu_kernel.arg_names
    acc = _acc(x)
    sig = {}
    for n in names:
        if n in ("ACC_DTYPE", "BLOCK"):
            continue
        if n == "y_ptr" or n == "b_ptr":
            sig[n] = "*" + x
        elif n.endswith("_ptr"):
            sig[n] = "*" + acc
        elif n == "total":
            sig[n] = "i64"
        elif n == "slope":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def default_step_keys():
    """(kernel, variant) of the Triton variants a default training step compiles on a GPU, in float32
    and bfloat16: PDLLoss (VGG16 relu4_3 at 256x256: N = 32*32 = 1024 per row, p = 1, the target
    without grad), D2SMLoss (a queue of 256 rows, paper mode, computed in float32, the live set size),
    MDFLoss (8 discriminators grouped by width on CUDA, 2 units: M = 5 tensors per fused launch; the
    forward keeps the diffs; the bias + LeakyReLU epilogue)."""
    from fastloss.kernels import pdl as kp

    n = 1024
    want = []
    for x in ("fp32", "bf16"):
        if n <= kp.TRITON_MAX_SORT_N:
            want.append(("pdl_fwd_sort", f"{x} N<={max(2, 1 << (n - 1).bit_length())} p=1 target_grad=0"))
        else:
            want.append(("pdl_fwd_gather", f"{x} p=1 BLOCK_N={kp.TRITON_LOOP_BLOCK_N}"))
        want.append(("pdl_bwd", f"{x} deriv=i8 pred=1 target=0 BLOCK_N={min(n, kp.TRITON_LOOP_BLOCK_N)}"))
        want += [("d2sm_rows", "fp32 paper live_q=1 BLOCK_Q=256"), ("d2sm_grad", "fp32 paper live_q=1 BLOCK_Q=256")]
        want += [("mdf_sqdiff_fwd", f"{x} M=5 save_diff=1"), ("mdf_sqdiff_bwd", f"{x} M=5"), ("mdf_bias_lrelu", x)]
    return list(dict.fromkeys(want))


def default_step_variants(rows):
    want = default_step_keys()
    got = {(r["kernel"], r["variant"]): r for r in rows if r["arch"] == "sm_90" and not r.get("error")}
    return want, got


# ------------------------------------------------------------------------- launch specialisations
# At launch, Triton (runtime/jit.py, specialize_impl) passes an integer argument equal to 1 as the
# compile-time constant 1 and marks one divisible by 16 with ``tt.divisibility=16``; a kernel that
# compiles with every integer typed i32 (the lists above) may still fail there: ``n.to(...)`` on the
# constant 1 is a compile error (issue 22, PDL with N == 1). The interpreter never specialises.
# Integer arguments that cannot be 1 at launch, because the launcher refuses that value first:
NEVER_ONE = {"d2sm_rows": {"q"}, "d2sm_grad": {"q"}}  # d2sm_forward: q >= 2
# A constant or an alignment hint changes the front end's input, not the target: one arch suffices.
SPEC_ARCHS = (90,)
SPEC_TAG = " | "  # a specialised variant's name: its base variant, SPEC_TAG, what was specialised


def _int_args(sig):
    return [n for n, t in sig.items() if t in ("i32", "i64")]


def launch_specialisations(variants):
    """The launch specialisations of the kernels in ``variants`` (triton_variants' tuples), as
    (kernel, variant, fn name, module, signature, constexprs, num_warps, divisible-by-16 argument
    names). For each kernel and accumulation dtype in ``variants`` (a dtype test's dead branch is not
    compiled), its base: the kernel's first variant of that class in the full list (the smallest
    block: N == 1 launches the smallest, and it compiles in a fraction of a second; a kernel not in
    that list: its first variant in ``variants``). From it, one
    variant per integer argument set to the constant 1 ("<base> | N=1"; not the arguments in
    NEVER_ONE) and one with every integer argument divisible by 16 ("<base> | ints%16")."""
    def cls(v):
        return v[0], _acc(v[1].split()[0])  # every variant name starts with its dtype

    want = {cls(v) for v in variants}
    out, seen = [], set()
    for (kernel, variant, fn, mod, sig, const, nw) in triton_variants(quick=False) + list(variants):
        c = cls((kernel, variant))
        if c not in want or c in seen:
            continue
        seen.add(c)
        ints = _int_args(sig)
        for name in ints:
            if name in NEVER_ONE.get(kernel, ()):
                continue
            s = {n: ("constexpr" if n == name else t) for n, t in sig.items()}
            out.append((kernel, f"{variant}{SPEC_TAG}{name}=1", fn, mod, s, dict(const, **{name: 1}), nw, ()))
        if ints:
            out.append((kernel, f"{variant}{SPEC_TAG}ints%16", fn, mod, sig, dict(const), nw, tuple(ints)))
    return out


def is_specialisation(row):
    return SPEC_TAG in row["variant"]


# ---------------------------------------------------------------------------------------- compiles
def _compile_one(job):
    """One Triton variant for one arch, in a worker process: a row."""
    kernel, variant, fn_name, module_name, sig, const, num_warps, arch, div16 = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module_name), fn_name)
    names = fn.arg_names
    attrs = {}
    for i, n in enumerate(names):  # pointers as the launcher's tensors are: 16-byte aligned
        ty = sig.get(n)
        if isinstance(ty, str) and ty.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(ty, tuple):
            for j, t in enumerate(ty):
                if t.startswith("*"):
                    attrs[(i, j)] = [["tt.divisibility", 16]]
        if n in div16:  # an integer the launch found divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps})
    except Exception as e:  # a row that says it did not compile
        return {"kernel": kernel, "variant": variant, "arch": f"sm_{arch}", "registers": None, "spill_bytes": None,
                "shared_bytes": None, "compile_s": round(time.perf_counter() - t0, 2),
                "error": _compile_error(e)}
    dt = time.perf_counter() - t0
    regs, spills = _ptxas_resources(k.asm["ptx"], arch)
    return {"kernel": kernel, "variant": variant, "arch": f"sm_{arch}", "registers": regs,
            "spill_bytes": spills, "shared_bytes": int(k.metadata.shared), "compile_s": round(dt, 2)}


def _compile_error(e):
    """One line: the error's type and first line, and the innermost cause (a Triton CompilationError
    prints source first; what went wrong is in its innermost cause's error_message)."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    first = (str(e).strip().splitlines() or [""])[0]
    why = getattr(root, "error_message", None) or (root is not e and (str(root).strip().splitlines() or [""])[-1])
    return (f"{type(e).__name__}: {first[:120]}" + (f" ({why})" if why else ""))[:300]


def _ptxas_resources(ptx, arch):
    """(registers, spill bytes) of a kernel's PTX from ``ptxas -v`` (Triton's own ptxas, the one that
    made its cubin): the compiled kernel's n_regs / n_spills are filled in only when a GPU driver
    loads it."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    text = proc.stderr + proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-500:]}")
    m = _PTXAS_USED.search(text)
    sp = _PTXAS_SPILL.search(text)
    return int(m.group(1)), (int(sp.group(1)) + int(sp.group(2))) if sp else 0


def triton_rows(quick, jobs, step_only=False):
    variants = triton_variants(quick)
    if step_only:
        step = set(default_step_keys())
        variants = [v for v in variants if (v[0], v[1]) in step]
    work = [(k, v, fn, mod.__name__, sig, const, nw, arch, ()) for (k, v, fn, mod, sig, const, nw) in variants
            for arch in ARCHS]
    work += [(k, v, fn, mod.__name__, sig, const, nw, arch, div16)
             for (k, v, fn, mod, sig, const, nw, div16) in launch_specialisations(variants) for arch in SPEC_ARCHS]
    # constexprs holding Triton dtypes travel as their names (they pickle poorly across versions)
    work = [(k, v, fn, mod, sig, {c: _dtype_token(val) for c, val in const.items()}, nw, arch, div16)
            for (k, v, fn, mod, sig, const, nw, arch, div16) in work]
    rows = []
    with tempfile.TemporaryDirectory() as cache, cf.ProcessPoolExecutor(
            max_workers=jobs, initializer=_worker_init, initargs=(cache,)) as pool:
        for row in pool.map(_compile_in_worker, work):
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _dtype_token(v):
    import triton.language as tl

    names = {tl.float32: "float32", tl.float64: "float64", tl.float16: "float16", tl.bfloat16: "bfloat16"}
    return f"tl.{names[v]}" if isinstance(v, tl.dtype) else v


def _worker_init(cache):
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: compile seconds are real compiles
    sys.path.insert(0, str(ROOT))


def _compile_in_worker(job):
    import triton.language as tl

    k, v, fn, mod, sig, const, nw, arch, div16 = job
    const = {c: getattr(tl, val[3:]) if isinstance(val, str) and val.startswith("tl.") else val
             for c, val in const.items()}
    # every variant of every arch in its own cache directory: no variant is a cache hit
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=os.environ.get("TRITON_CACHE_DIR"))
    return _compile_one((k, v, fn, mod, sig, const, nw, arch, div16))


_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _template_args(rest):
    """The text between the matching angle brackets at the start of ``rest`` ('' if none)."""
    if not rest.startswith("<"):
        return ""
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i]
    return rest[1:]


def cuda_rows(nvcc):
    """Every kernel of every csrc/cuda/*.cu for each arch, from ``nvcc -Xptxas -v``; compile_s is
    that file's compile time for that arch, shared by its kernels."""
    rows = []
    for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        loss = src.stem.split("_")[0]
        for arch in ARCHS:
            with tempfile.TemporaryDirectory() as tmp:
                # setup.py's nvcc flags for the extension (-O3 -std=c++20), one real arch
                cmd = [nvcc, "-std=c++20", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                       "-c", str(src), "-o", str(Path(tmp) / "k.o"), "-I", str(ROOT / "csrc")]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                dt = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"nvcc failed on {src.name} for sm_{arch}:\n{proc.stderr[-3000:]}")
            entries, cur = [], None
            for line in (proc.stderr + proc.stdout).splitlines():
                m = _PTXAS_FN.search(line)
                if m:
                    cur = {"mangled": m.group(1), "registers": 0, "spill_bytes": 0, "shared_bytes": 0}
                    entries.append(cur)
                    continue
                if cur is None:
                    continue
                m = _PTXAS_SPILL.search(line)
                if m:
                    cur["spill_bytes"] = int(m.group(1)) + int(m.group(2))
                m = _PTXAS_USED.search(line)
                if m:
                    cur["registers"] = int(m.group(1))
                    cur["shared_bytes"] = int(m.group(2) or 0)
            names = _demangle([e["mangled"] for e in entries])
            for e in entries:
                full = re.sub(r"^void ", "", names[e["mangled"]])
                head = re.split(r"[<(]", full, maxsplit=1)[0]
                base = head.split("::")[-1]
                rest = full[len(head):]
                tmpl = _template_args(rest)
                tmpl = re.sub(r"cub::CUB_\w+::", "cub::", tmpl)
                kernel = base if base.startswith(loss) else f"{loss}:{base}"
                rows.append({"kernel": f"{kernel} (cuda)", "variant": tmpl if len(tmpl) <= 120 else tmpl[:117] + "...",
                             "arch": f"sm_{arch}", "registers": e["registers"], "spill_bytes": e["spill_bytes"],
                             "shared_bytes": e["shared_bytes"], "compile_s": round(dt, 2)})
            print(f"  nvcc {src.name} sm_{arch}: {len(entries)} kernels, {dt:.1f} s", flush=True)
    return rows


def _fmt(r):
    if r.get("error"):
        return f"  {r['kernel']:<16} {r['variant']:<44} {r['arch']}  FAILED: {r['error']}"
    return (f"  {r['kernel']:<16} {r['variant']:<44} {r['arch']}  regs {r['registers']:>3}  spill {r['spill_bytes']:>4}"
            f"  shared {r['shared_bytes']:>6}  {r['compile_s']:>6.2f} s")


# Spills tolerated, each with its reason: (kernel, variant, arch) -> at most that many bytes.
TOLERATED_SPILLS = {
    # A float64 batch of one (B the constant 1 at launch, issue 22): Triton 3.9's compile keeps 64
    # registers and spills 16 bytes on sm_90; Triton 3.6 (the GPU machine's) spills nothing, nor do
    # a run-time B or sm_80. float64 is the validation dtype. Left for MDF's kernel work.
    ("mdf_sqdiff_fwd", "fp64 M=5 save_diff=0 | B=1", "sm_90"): 16,
}


def tolerated(rows):
    """The rows whose spill TOLERATED_SPILLS allows (printed, not failed)."""
    return [r for r in rows if not r.get("error") and r["spill_bytes"]
            and r["spill_bytes"] <= TOLERATED_SPILLS.get((r["kernel"], r["variant"], r["arch"]), 0)]


def problems(rows):
    """The rows that spill (beyond TOLERATED_SPILLS), exceed the per-block shared memory of their
    arch, or did not compile."""
    bad = []
    ok_spills = {id(r) for r in tolerated(rows)}
    for r in rows:
        arch = int(r["arch"][3:])
        limit = STATIC_SHARED_LIMIT if r["kernel"].endswith("(cuda)") else SHARED_LIMIT[arch]
        if r.get("error"):
            bad.append(f"{r['kernel']} {r['variant']} {r['arch']}: did not compile: {r['error']}")
        elif r["spill_bytes"] and id(r) not in ok_spills:
            bad.append(f"{r['kernel']} {r['variant']} {r['arch']}: spills {r['spill_bytes']} bytes")
        elif r["shared_bytes"] > limit:
            bad.append(f"{r['kernel']} {r['variant']} {r['arch']}: {r['shared_bytes']} bytes of shared memory "
                       f"> {limit}")
    return bad


def markdown(rows, args, step_total, step_missing, wall):
    import triton
    import torch

    from common import markdown_table

    cmd = "python benchmarks/gpu_static.py" + (" --quick" if args.quick else "") + (" --step" if args.step else "") \
        + (" --no-cuda" if args.no_cuda else "") + (f" --section {args.section}" if args.section != "gpu-static" else "")
    if args.triton_from_json:
        cmd += f" --triton-from-json {args.triton_from_json}` (the CUDA rows; the Triton rows from an earlier `{cmd} --json` run)"
    nvcc = shutil.which(args.nvcc) or args.nvcc
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:] \
        if not args.no_cuda else ["(CUDA kernels not compiled)"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    title = "## GPU kernels compiled ahead of time (no GPU)" + (f", Triton {triton.__version__}"
                                                               if args.section != "gpu-static" else "")
    lines = [title, "",
             f"Command: `{cmd}{'' if args.triton_from_json else '`'} ({len(rows)} rows, {wall:.0f} s wall with {args.jobs} compile processes). Compiler "
             "figures for sm_80 and sm_90, not GPU measurements: registers per thread, spill bytes (stores + loads), "
             "shared memory per block (Triton: its dynamic shared memory; CUDA: static `__shared__`), compile seconds "
             "on this machine (Triton: the variant's front end to cubin in a fresh cache; CUDA: the whole file's nvcc "
             "for that arch, shared by its kernels).", "",
             f"- CPU: {cpu}; load before the run: {args.load}",
             f"- triton {triton.__version__}, torch {torch.__version__}, nvcc: {ver[0] if ver else '?'}",
             f"- default training-step variants (float32 and bfloat16: PDLLoss, D2SMLoss, MDFLoss; sm_90): "
             f"{step_total:.1f} s of Triton compile" + (f" (not in this run: {', '.join(step_missing)})"
                                                        if step_missing else ""), ""]
    bad = problems(rows)
    lines += [f"- spills or shared memory over the limit: {len(bad)}" + (":" if bad else "")]
    lines += [f"  - {b}" for b in bad]
    lines += [f"- spills tolerated (`TOLERATED_SPILLS`, with the reason): {r['kernel']} {r['variant']} {r['arch']}, "
              f"{r['spill_bytes']} bytes" for r in tolerated(rows)]
    lines += [""]
    table = [[r["kernel"], r["variant"], r["arch"], str(r["registers"]), str(r["spill_bytes"]), str(r["shared_bytes"]),
              f"{r['compile_s']:.2f}"] for r in rows if not r.get("error")]
    lines += markdown_table(["kernel", "variant", "arch", "registers", "spill bytes", "shared bytes", "compile s"],
                            table, left=3)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a covering subset of the Triton variants")
    ap.add_argument("--step", action="store_true",
                    help="only the Triton variants of a default training step (PDLLoss, D2SMLoss, MDFLoss; "
                         "float32 and bfloat16)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--markdown", help="write the gpu-static section to this file instead of BENCHMARKS.md")
    ap.add_argument("--no-markdown", action="store_true", help="write no Markdown")
    ap.add_argument("--section", default="gpu-static",
                    help="name of the BENCHMARKS.md section to write (default gpu-static; e.g. a second Triton "
                         "version's run: gpu-static-triton-3.6)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--triton-from-json", metavar="FILE",
                    help="take the Triton rows from an earlier run's --json (compile only the CUDA kernels)")
    args = ap.parse_args(argv)
    args.load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    t0 = time.perf_counter()
    print("Triton variants:", flush=True)
    if args.triton_from_json:
        rows = [r for r in json.loads(Path(args.triton_from_json).read_text()) if not r["kernel"].endswith("(cuda)")]
    else:
        rows = triton_rows(args.quick, args.jobs, step_only=args.step)
    if not args.no_cuda:
        print("CUDA kernels:", flush=True)
        rows += cuda_rows(args.nvcc)
    wall = time.perf_counter() - t0
    want, got = default_step_variants(rows)
    step_total = sum(got[w]["compile_s"] for w in want if w in got)
    step_missing = [f"{k} {v}" for k, v in want if (k, v) not in got]
    print(f"default training-step variants (float32 + bfloat16, sm_90): {step_total:.1f} s of Triton compile"
          + (f"; not compiled in this run: {step_missing}" if step_missing else ""))
    bad = problems(rows)
    for r in tolerated(rows):
        print(f"tolerated: {r['kernel']} {r['variant']} {r['arch']} spills {r['spill_bytes']} bytes (TOLERATED_SPILLS)")
    for b in bad:
        print("PROBLEM:", b)
    if args.json:
        Path(args.json).write_text(json.dumps([{k: r[k] for k in KEYS} for r in rows], indent=1))
    if not args.no_markdown:
        text = markdown(rows, args, step_total, step_missing, wall)
        if args.markdown:
            from fastloss.bench import write_markdown_section

            write_markdown_section(args.markdown, args.section, text)
        else:
            from common import write_section

            write_section(args.section, text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
