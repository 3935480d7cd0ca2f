"""Values and gradients of the fast backends at every size regime of their kernels, against float64
ground truth computed on the CPU from the same (rounded) inputs, per-dtype tolerances from
``fastloss.selftest.tolerances``.

The size regimes are read from the kernel sources, not copied by hand: the CUDA PDL block-sort
tiles (``if (N <= T) return launch_block_forward`` in csrc/cuda/pdl_kernels.cu) and the segmented
sort past ``PDL_BLOCK_SORT_MAX_N`` in chunks of ``SEGMENTED_CHUNK_ELEMENTS``, ``SORT_SEGMENTS_PER_CALL``
rows per CUB call; the Triton single-program cap ``TRITON_MAX_SORT_N`` and loop block
``TRITON_LOOP_BLOCK_N`` (kernels/pdl.py); D2SM's ``TRITON_BLOCK_Q`` (kernels/d2sm.py) and CUDA block
sizes (``*_THREADS`` in csrc/cuda/d2sm_kernels.cu). The dtypes are each backend's row of the loss's
``IMPLS`` table.

``triton`` and ``cuda`` run only where CUDA is present (``gpu`` marker; scripts/gpu-check.sh runs
this file). Here, without a GPU, the same test bodies run the ``cpu`` backend on CPU tensors (all
but the cases of many PDL rows and D2SM's largest q, for time), and ``test_case_lists_cover_*``
check, on any machine, that the case lists reach every boundary the sources declare."""
import functools
import pathlib
import re

import pytest
import torch

import fastloss
from fastloss import _backend, selftest
from fastloss.d2sm import ops as d2sm_ops
from fastloss.mdf import ops as mdf_ops
from fastloss.pdl import ops as pdl_ops
from fastloss.selftest.tolerances import D2SM_TOL, MDF_TOL, TOL

DEVICE_AWARE = True  # the triton cases run on CUDA tensors: conftest must not skip them in GPU mode
ROOT = pathlib.Path(__file__).resolve().parents[2]
GPU_BACKENDS = ("triton", "cuda")


# --------------------------------------------------------------------------- constants from the sources
def _int_expr(text):
    """An integer C++/Python constant expression such as ``int64_t(1) << 25`` or ``1024``."""
    expr = re.sub(r"\bint64_t\((\d+)\)", r"\1", text.strip())
    if not re.fullmatch(r"[\d\s<>*+()-]+", expr):
        raise ValueError(f"not a plain integer expression: {text!r}")
    return int(eval(expr, {"__builtins__": {}}))  # digits and operators only (checked above)


def _constant(path, name):
    src = (ROOT / path).read_text()
    m = (re.search(rf"constexpr\s+[\w:]+\s+{name}\s*=\s*([^;]+);", src)
         or re.search(rf"^{name}\s*=\s*(.+)$", src, re.M))
    if not m:
        raise AssertionError(f"{name} not found in {path}: the case list is out of date")
    return _int_expr(m.group(1))


def cuda_pdl_tiles():
    """The largest N of each CUDA block-sort tile, in order, the last being PDL_BLOCK_SORT_MAX_N."""
    src = (ROOT / "csrc/cuda/pdl_kernels.cu").read_text()
    body = src[src.index("PdlStatus block_forward("):]
    body = body[:body.index("\n}\n")]
    tiles = [int(t) for t in re.findall(r"if \(N <= (\d+)\) return launch_block_forward", body)]
    return tiles + [_constant("csrc/cuda/pdl_launch.h", "PDL_BLOCK_SORT_MAX_N")]


def pdl_boundaries():
    """Every row length at which a PDL kernel changes its tile, block or path (both backends)."""
    return sorted(set(cuda_pdl_tiles()) | {_constant("kernels/pdl.py", "TRITON_MAX_SORT_N"),
                                             _constant("kernels/pdl.py", "TRITON_LOOP_BLOCK_N")})


def segmented():
    """(chunk elements, rows per CUB call) of the CUDA segmented sort."""
    return (_constant("csrc/cuda/pdl_kernels.cu", "SEGMENTED_CHUNK_ELEMENTS"),
            _constant("csrc/cuda/pdl_kernels.cu", "SORT_SEGMENTS_PER_CALL"))


def d2sm_blocks():
    """The block sizes of D2SM's kernels: Triton's TRITON_BLOCK_Q and CUDA's thread blocks."""
    return sorted({_constant("kernels/d2sm.py", "TRITON_BLOCK_Q")} |
                  {_constant("csrc/cuda/d2sm_kernels.cu", k) for k in ("ROWS_THREADS", "GRAD_THREADS", "LOSS_THREADS")})


# --------------------------------------------------------------------------- the case lists
# CUB's DeviceSegmentedSort partitions (and copies sizes to the host) above ~300 segments
# (pdl_kernels.cu): the issue asks for at least 300 rows past the block sort.
MANY_ROWS = 300


def pdl_value_cases(backend):
    """(N, B, C, p, target_grad, dtype): both sides of every boundary, 1, the segmented sort with
    two CUB calls (>= 300 rows), and a two-chunk case, in every dtype the backend's row takes."""
    bounds = pdl_boundaries()
    ns = sorted({1} | set(bounds) | {t + 1 for t in bounds} | {2 * bounds[-1] + 1})
    out = []
    for i, n in enumerate(ns):  # p = 1 with the target's gradient, or p = 2 without, in turn (time)
        for k, dtype in enumerate(pdl_ops.IMPLS[backend].dtypes):
            out.append((n, 2, 3, 1, True, dtype) if (i + k) % 2 == 0 else (n, 2, 3, 2, False, dtype))
    n_seg = 2 * bounds[-1] + 1
    out.append((n_seg, 3, MANY_ROWS // 3 + 1, 1, True, torch.float32))
    out.append((n_seg, 3, MANY_ROWS // 3 + 1, 2, False, torch.float64))
    chunk, _ = segmented()
    rows = chunk // n_seg + 1  # one row past a full chunk: two chunks
    out.append((n_seg, 2, (rows + 1) // 2, 1, True, torch.float32))
    return out


def d2sm_value_cases(backend):
    """(q, D, mode, dtype): q at 3 and 37, each block size and one past it, two Triton blocks plus one."""
    qs = sorted({3, 37} | {b for b in d2sm_blocks()} | {b + 1 for b in d2sm_blocks()}
                | {2 * _constant("kernels/d2sm.py", "TRITON_BLOCK_Q") + 1})
    out = []
    for q in qs:
        for dtype in d2sm_ops.IMPLS[backend].dtypes:
            # half: pkt only at small q. pkt's gradient carries 1/q^2: at q = 1025 its entries are
            # ~2e-6, float16 subnormals, where the exact gradient rounded to float16 is already
            # 1.6e-2 off (8e-2 at 2049), past the tolerance whatever the backend does.
            half_modes = ("paper", "pkt") if q <= 37 else ("paper",)
            modes = ("paper", "pkt") if dtype in (torch.float32, torch.float64) else half_modes
            out += [(q, 32, mode, dtype) for mode in modes]
    return out


def mdf_value_cases(backend):
    """(shape, grouped, target_grad, dtype): B > 1 in every dtype the backend's row takes."""
    out = []
    for dtype in mdf_ops.IMPLS[backend].dtypes:
        out += [((2, 3, 33, 57), False, True, dtype), ((3, 3, 24, 20), True, False, dtype)]
    return out


def _is_big(n, b, c):
    return b * c * n > segmented()[0]


def _params(cases_of, ids, cpu_filter=lambda case: True):
    """Each case, then each backend that takes it (so that consecutive tests share one truth)."""
    per_backend = {b: cases_of(b) for b in GPU_BACKENDS + ("cpu",)}
    out = []
    for case in dict.fromkeys(c for cs in per_backend.values() for c in cs):
        for backend, cs in per_backend.items():
            gpu = backend in GPU_BACKENDS
            if case not in cs or (not gpu and not cpu_filter(case)):
                continue
            marks = (pytest.mark.gpu,) if gpu else (
                pytest.mark.skipif(not _backend.status("cpu")[0], reason="fastloss._C not built"),
                # the cpu stand-in for machines without a GPU: in gpu-check's time budget, skipped
                pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the triton and cuda params"))
            out.append(pytest.param(backend, case, marks=marks, id=f"{backend}-{ids(case)}"))
    return out


@functools.lru_cache(maxsize=1)  # the backends of one case run one after another (_params)
def _pdl_truth(case):
    """(x, y, upstream gradient, loss, grad x, grad y): inputs on the CPU and their float64 truth."""
    n, b, c, p, _, dtype = case
    x0, y0 = selftest.pdl_inputs(b, c, n, dtype, "contiguous", "zeros" if n % 2 else "plain", seed=n + p)
    g = torch.linspace(0.5, 1.5, b, dtype=torch.float64)  # an upstream gradient that is not 1
    loss_t, _, _, _, gx_t, gy_t = selftest.pdl_truth(x0, y0, p, g)
    return x0, y0, g, loss_t, gx_t, gy_t


@functools.lru_cache(maxsize=1)
def _d2sm_truth(case, gup):
    q, d, mode, dtype = case
    x0, y0 = selftest.d2sm_inputs(q, d, dtype, seed=q)
    return (x0, y0) + tuple(selftest.d2sm_truth(x0, y0, mode, 1e-6, gup))


def _device(backend):
    return "cpu" if backend == "cpu" else "cuda"


def _dt(dtype):
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("backend, case", _params(
    pdl_value_cases, lambda c: f"N={c[0]}-B={c[1]}-C={c[2]}-p={c[3]}-tg={int(c[4])}-{_dt(c[5])}",
    cpu_filter=lambda c: c[1] * c[2] <= 6))
def test_pdl_values(backend, case):
    n, b, c, p, tg, dtype = case
    dev = _device(backend)
    x0, y0, g, loss_t, gx_t, gy_t = _pdl_truth(case)
    x, y = x0.to(dev).requires_grad_(), y0.to(dev).requires_grad_(tg)
    out = fastloss.pdl(x, y, p=p, reduction="none", backend=backend)
    out.backward(g.to(device=dev, dtype=out.dtype))
    got = {"loss": selftest.rel_error(out, loss_t), "grad pred": selftest.rel_error(x.grad, gx_t.view(x0.shape))}
    if tg:
        got["grad target"] = selftest.rel_error(y.grad, gy_t.view(y0.shape))
    assert out.dtype == dtype and all(e <= TOL[dtype] for e in got.values()), (got, TOL[dtype])


@pytest.mark.parametrize("backend, case", _params(d2sm_value_cases, lambda c: f"q={c[0]}-D={c[1]}-{c[2]}-{_dt(c[3])}",
                                                   cpu_filter=lambda c: c[0] <= 2 * max(d2sm_blocks())))
def test_d2sm_values(backend, case):
    q, d, mode, dtype = case
    dev = _device(backend)
    gup = 0.7e3  # not 1; the loss is O(1e-3)
    x0, y0, loss_t, gx_t = _d2sm_truth(case, gup)
    x = x0.to(dev).requires_grad_()
    out = fastloss.d2sm_kl(x, y0.to(dev), mode=mode, backend=backend)
    out.backward(torch.tensor(gup, device=dev, dtype=out.dtype))
    got = {"loss": selftest.rel_error(out, loss_t), "grad pred": selftest.rel_error(x.grad, gx_t)}
    assert out.dtype == dtype and all(e <= D2SM_TOL[dtype] for e in got.values()), (got, D2SM_TOL[dtype])


@pytest.mark.parametrize("backend, case", _params(
    mdf_value_cases, lambda c: f"{'x'.join(map(str, c[0]))}-{'grouped' if c[1] else 'plain'}-tg={int(c[2])}-{_dt(c[3])}"))
def test_mdf_values(backend, case):
    shape, grouped, tg, dtype = case
    dev = _device(backend)
    w = selftest.mdf_weights()
    g = torch.Generator().manual_seed(sum(shape))
    x0 = torch.rand(shape, generator=g, dtype=torch.float64)
    y0 = (x0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    x0, y0 = x0.to(dtype), y0.to(dtype)
    xt, yt = x0.double().requires_grad_(), y0.double().requires_grad_(tg)
    truth = fastloss.MDFLoss(w, scales=3, backend="reference")(xt, yt)
    truth.backward(torch.tensor(0.7, dtype=torch.float64))
    crit = fastloss.MDFLoss(w, scales=3, backend=backend, grouped=grouped).to(dev)
    x, y = x0.to(dev).requires_grad_(), y0.to(dev).requires_grad_(tg)
    out = crit(x, y)
    out.backward(torch.tensor(0.7, device=dev, dtype=out.dtype))
    # gradients in norm: a pre-activation within rounding of 0 may take the other LeakyReLU branch
    got = {"loss": selftest.rel_error(out, truth), "grad pred": selftest.rel_error(x.grad, xt.grad, "norm")}
    if tg:
        got["grad target"] = selftest.rel_error(y.grad, yt.grad, "norm")
    assert out.dtype == dtype and all(e <= MDF_TOL[dtype] for e in got.values()), (got, MDF_TOL[dtype])


# --------------------------------------------------------------------------- the lists reach every regime
def pdl_gaps(cases, tiles, max_sort, loop_block, chunk, per_call):
    """What a PDL case list misses (empty: nothing): each tile's last N and the next, Triton's cap
    and loop block and the next, the segmented sort with more rows than one CUB call and >= 300
    rows, and a case spanning two chunks."""
    ns = {c[0] for c in cases}
    gaps = [f"N={t}" for t in tiles + [max_sort, loop_block] for t in (t, t + 1) if t not in ns]
    seg = [c for c in cases if c[0] > tiles[-1]]
    if not any(c[1] * c[2] > max(per_call, MANY_ROWS - 1) for c in seg):
        gaps.append(f"segmented sort with > {per_call} and >= {MANY_ROWS} rows")
    if not any(c[1] * c[2] > max(1, chunk // c[0]) for c in seg):
        gaps.append("segmented sort over two chunks")
    return gaps


def _pdl_gaps_of(cases):
    return pdl_gaps(cases, cuda_pdl_tiles(), _constant("kernels/pdl.py", "TRITON_MAX_SORT_N"),
                    _constant("kernels/pdl.py", "TRITON_LOOP_BLOCK_N"), *segmented())


def test_constants_are_read_from_the_sources():
    """The parse finds the tiles the CUDA launcher documents (128 to 4096 in powers of two)."""
    tiles = cuda_pdl_tiles()
    assert len(tiles) >= 5 and tiles == sorted(tiles) and len(set(tiles)) == len(tiles)
    assert all(t & (t - 1) == 0 for t in tiles)  # block tiles are threads x items: powers of two
    chunk, per_call = segmented()
    assert chunk > tiles[-1] and per_call >= 1
    assert len(d2sm_blocks()) >= 2
    with pytest.raises(ValueError):
        _int_expr("__import__('os')")


@pytest.mark.parametrize("backend", GPU_BACKENDS + ("cpu",))
def test_case_lists_cover_every_boundary_and_dtype(backend):
    cases = pdl_value_cases(backend)
    assert _pdl_gaps_of(cases) == []
    for dtype in pdl_ops.IMPLS[backend].dtypes:
        assert {c[0] for c in cases if c[5] == dtype} >= set(pdl_boundaries()), dtype
        assert {(c[3], c[4]) for c in cases if c[5] == dtype} == {(1, True), (2, False)}, dtype
    assert {c[5] for c in cases} == set(pdl_ops.IMPLS[backend].dtypes)
    qs = {c[0] for c in d2sm_value_cases(backend)}
    for b in d2sm_blocks():
        assert {b, b + 1} <= qs, b
    block_q = _constant("kernels/d2sm.py", "TRITON_BLOCK_Q")
    assert any(q > 2 * block_q for q in qs)
    assert {c[3] for c in d2sm_value_cases(backend)} == set(d2sm_ops.IMPLS[backend].dtypes)
    mdf = mdf_value_cases(backend)
    assert {c[3] for c in mdf} == set(mdf_ops.IMPLS[backend].dtypes)
    for dtype in mdf_ops.IMPLS[backend].dtypes:
        assert any(c[0][0] > 1 and c[3] == dtype for c in mdf) and any(c[1] for c in mdf)


def test_the_issue_sizes_are_in_the_gpu_lists():
    """The sizes issue 22 names: N = 257, 1024, 4097, 8193, >= 300 rows at 8193, two chunks."""
    for backend in GPU_BACKENDS:
        cases = pdl_value_cases(backend)
        assert {257, 1024, 4097, 8193} <= {c[0] for c in cases}
        assert any(c[0] == 8193 and c[1] * c[2] >= MANY_ROWS for c in cases)


@pytest.mark.parametrize("drop", ["tile", "next", "rows", "chunks"])
def test_mutation_a_list_missing_a_regime_is_caught(drop):
    """The coverage check fails on a list with one regime taken out."""
    cases = pdl_value_cases("cuda")
    tiles = cuda_pdl_tiles()
    if drop == "tile":
        cases = [c for c in cases if c[0] != tiles[1]]
    elif drop == "next":
        cases = [c for c in cases if c[0] != tiles[-1] + 1]
    elif drop == "rows":
        cases = [c for c in cases if c[0] <= tiles[-1] or c[1] * c[2] <= segmented()[1]]
    else:
        cases = [c for c in cases if not _is_big(*c[:3])]
    assert _pdl_gaps_of(cases) != []
