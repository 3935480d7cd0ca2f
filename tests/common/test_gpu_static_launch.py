"""benchmarks/gpu_static.py compiles the specialisations Triton applies at launch (issue 22): an
integer argument equal to 1 becomes the compile-time constant 1, one divisible by 16 gets
``tt.divisibility=16``. The PDL kernels did not compile with N == 1 (``n.to`` on a constexpr), and
neither the interpreter nor i32-typed compiles saw it. No GPU needed."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("triton")


def _gpu_static():
    import gpu_static

    return gpu_static


def test_every_integer_argument_is_set_to_one_in_turn():
    """For each kernel and accumulation dtype of the --quick list: one variant per integer argument
    given as the constant 1 (all but the ones the launcher refuses), one with every integer divisible
    by 16; pointers and constexprs untouched."""
    g = _gpu_static()
    base = {(k, g._acc(v.split()[0])): (sig, const) for (k, v, fn, mod, sig, const, nw) in
            reversed(g.triton_variants(quick=False))}  # reversed: the first variant of a class wins
    spec = g.launch_specialisations(g.triton_variants(quick=True))
    classes = {(k, g._acc(v.split()[0])) for (k, v, *_rest) in g.triton_variants(quick=True)}
    assert {(k, g._acc(v.split()[0])) for (k, v, *_rest) in spec} == classes
    for cls in classes:
        sig, _ = base[cls]
        ints = [n for n, t in sig.items() if t in ("i32", "i64")]
        assert ints, cls
        rows = [s for s in spec if (s[0], g._acc(s[1].split()[0])) == cls]
        ones = {s[1].rsplit(g.SPEC_TAG, 1)[1]: s for s in rows if not s[1].endswith("ints%16")}
        assert set(ones) == {f"{n}=1" for n in ints if n not in g.NEVER_ONE.get(cls[0], ())}, cls
        for name, (k, v, fn, mod, s, c, nw, div16) in ones.items():
            arg = name[:-2]
            assert s[arg] == "constexpr" and c[arg] == 1 and div16 == ()
            assert {n: t for n, t in s.items() if n != arg} == {n: t for n, t in sig.items() if n != arg}
        (div,) = [s for s in rows if s[1].endswith("ints%16")]
        assert div[4] == sig and div[7] == tuple(ints)
    # the PDL kernels' row length is among them, in both accumulation dtypes where the kernel has them
    for cls in (("pdl_fwd_sort", "fp32"), ("pdl_fwd_gather", "fp32"), ("pdl_fwd_gather", "fp64"),
                ("pdl_bwd", "fp32"), ("pdl_bwd", "fp64")):
        assert any((s[0], g._acc(s[1].split()[0])) == cls and s[1].endswith("| N=1") for s in spec), cls


CHILD = textwrap.dedent('''
    import json, os, sys, tempfile
    os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "benchmarks"), sys.argv[2]]
    import gpu_static as g
    import n_to_kernel
    rows = []
    pdl = [s for s in g.launch_specialisations(g.triton_variants(quick=True))
           if s[0].startswith("pdl") and s[1].endswith("| N=1")]
    # the check itself: a kernel that takes .to of an integer argument, as _div_rn did
    probe = [("probe", "fp32", "n_to_kernel_fn", n_to_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
              {"BLOCK": 16}, 1)]
    for (k, v, fn, mod, sig, const, nw, div16) in pdl + g.launch_specialisations(probe):
        rows.append(g._compile_one((k, v, fn, mod.__name__, sig, const, nw, 90, div16)))
    print(json.dumps(rows))
''')

PROBE = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def n_to_kernel_fn(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.full([BLOCK], 1.0, tl.float32) / n.to(tl.float32))
''')


def test_pdl_kernels_compile_with_n_one_and_the_check_catches_a_constexpr_to(tmp_path):
    """sm_90, each PDL kernel (float32 and float64 accumulation) with N the constant 1, as a launch with
    one-element rows compiles it; and a probe kernel with ``n.to(...)``, the defect's shape, is flagged
    for n == 1 (not for n divisible by 16), so the check is not vacuous."""
    (tmp_path / "n_to_kernel.py").write_text(PROBE)
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    pdl = [r for r in rows if r["kernel"].startswith("pdl")]
    assert {r["kernel"] for r in pdl} == {"pdl_fwd_sort", "pdl_fwd_gather", "pdl_bwd"}
    assert _gpu_static().problems(pdl) == []
    probe = {r["variant"]: r for r in rows if r["kernel"] == "probe"}
    assert set(probe) == {"fp32 | n=1", "fp32 | ints%16"}
    assert "has no attribute 'to'" in probe["fp32 | n=1"]["error"]
    assert len(_gpu_static().problems([probe["fp32 | n=1"]])) == 1
    assert not probe["fp32 | ints%16"].get("error")


def test_a_tolerated_spill_is_exactly_the_listed_one():
    g = _gpu_static()
    ((kernel, variant, arch), limit), = g.TOLERATED_SPILLS.items()
    row = {"kernel": kernel, "variant": variant, "arch": arch, "registers": 64, "spill_bytes": limit,
           "shared_bytes": 0, "compile_s": 0.5}
    assert g.problems([row]) == [] and g.tolerated([row]) == [row]
    assert len(g.problems([dict(row, spill_bytes=limit + 8)])) == 1  # more than listed
    assert len(g.problems([dict(row, arch="sm_80")])) == 1  # another arch
    assert len(g.problems([dict(row, variant=variant.replace("B=1", "K=1"))])) == 1  # another variant
