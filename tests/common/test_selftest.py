"""`python -m fastloss.selftest`, the GPU acceptance run: its own logic checked on the CPU (exit
codes, the case list, the float64 error arithmetic, the ground truth), and proof that it fails
when a fast op returns wrong values or leaves its outputs unwritten."""
import dataclasses
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastloss
from fastloss import _backend, selftest

from conftest import requires_cpu_ext

from fastloss.d2sm import ops as d2sm_ops
from fastloss.mdf import ops as mdf_ops
from fastloss.pdl import ops as pdl_ops


def _wrap_forward(monkeypatch, impls, wrap, backend="cpu"):
    """A mutant: the ``backend`` row of an op's table with its forward wrapped, ``wrap(real, *args)``."""
    row = impls[backend]
    monkeypatch.setitem(impls, backend, dataclasses.replace(row, forward=lambda *args: wrap(row.forward, *args)))

HAVE_TRITON = _backend.status("triton")[0]


def _quick(backends, **kw):
    buf = io.StringIO()
    code, results = selftest.run("cpu", backends=backends, out=buf, **kw)
    return code, results, buf.getvalue()


# --------------------------------------------------------------------------- exit codes
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_nothing_tested_exits_2_in_a_fresh_process():
    """The command of the issue, on a CPU machine without the interpreter: triton and cuda cannot run."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    p = subprocess.run([sys.executable, "-m", "fastloss.selftest", "--backends", "triton", "cuda"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "nothing was tested" in p.stdout
    assert "all passed" not in p.stdout


def test_no_usable_backend_is_not_a_pass(monkeypatch):
    monkeypatch.setattr(_backend, "why_not", lambda *a, **k: "not built here")
    code, results, text = _quick(None)
    assert code == selftest.EXIT_NOT_RUN and results == []
    assert "nothing was tested" in text and "all passed" not in text
    code, _, text = _quick(["cpu"])
    assert code == selftest.EXIT_NOT_RUN and "CANNOT RUN cpu" in text


def _result(status):
    return selftest.Result("c", "pdl", "cpu", "cpu", "float32", status, {}, {}, None, 0.0)


@pytest.mark.parametrize("statuses, unusable, code", [
    (["pass", "pass"], False, 0),
    (["pass", "fail"], False, 1),
    (["pass", "error"], False, 1),
    (["fail", "not run"], True, 1),          # a mismatch outranks what did not run
    (["pass", "not run"], False, 2),
    (["pass"], True, 2),                     # a requested backend could not run
    (["n/a"], False, 2),                     # nothing at all ran
    ([], False, 2),
    (["pass", "n/a"], False, 0),             # a case that does not apply is not a failure (nor a pass)
])
def test_exit_code_rules(statuses, unusable, code):
    assert selftest.exit_code([_result(s) for s in statuses], unusable) == code


def test_a_case_that_compares_nothing_is_an_error():
    empty = selftest.Case("compares nothing", "pdl", torch.float32, lambda backend, device, chk: None)
    r = selftest._run_one(empty, "reference", "cpu")
    assert r.status == "error"


# --------------------------------------------------------------------------- the case list
def test_full_case_list_covers_every_regime():
    names = [c.label for c in selftest.cases(full=True)]
    joined = "\n".join(names)
    for n in selftest.PDL_N_FULL:
        for p in (1, 2):
            for tg in (0, 1):
                for dt in ("float32", "float64", "float16", "bfloat16"):
                    assert f"pdl N={n} p={p} target_grad={tg} [{dt}]" in names
    for word in ("channels_last", "transposed", "zeros", "nan"):
        assert f" {word} [" in joined
    for q in selftest.D2SM_Q_FULL:
        for mode in ("paper", "pkt"):
            assert f"d2sm_kl {mode} q={q} D=96 [float32]" in names
    assert any(n.startswith("D2SMQueue paper") for n in names) and any(n.startswith("D2SMQueue pkt") for n in names)
    for dt in ("float32", "float64", "float16", "bfloat16"):
        assert f"mdf (4, 3, 128, 128) grouped [{dt}]" in names
        assert f"mdf (2, 3, 40, 37) grouped channels_last target_grad [{dt}]" in names
    for dt in ("float32", "float64"):  # FDL: no half cases (fdl computes half features in float32)
        assert any(n.startswith("fdl (2, 64, 24, 24) 256 filters") and n.endswith(f"[{dt}]") for n in names)
    assert any(n.startswith("fdl") and "phase_weight 2.0 channels_last [float64]" in n for n in names)
    for loss in ("pdl", "d2sm", "mdf"):
        for what in ("determinism", "torch.compile(fullgraph=True)", "side stream", "cuda:1",
                     "set_sync_debug_mode('error')", "CUDA-graph capture and replay"):
            assert any(n.startswith(loss) and what in n for n in names), (loss, what)
    assert len(names) == len(set(names))


def test_quick_list_has_every_loss_and_the_triton_regimes():
    names = [c.label for c in selftest.cases(full=False)]
    assert {c.loss for c in selftest.cases(full=False)} == {"pdl", "d2sm", "mdf", "fdl"}
    assert any("sort fallback" in n for n in names) and any("blocks of 16" in n for n in names)


def test_shards_partition_the_cases():
    all_cases = selftest.cases(full=True)
    shards = [selftest.select(all_cases, (k, 5)) for k in range(1, 6)]
    labels = [c.label for s in shards for c in s]
    assert sorted(labels) == sorted(c.label for c in all_cases)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_list_and_bad_shard(capsys):
    assert selftest.main(["--list", "--losses", "mdf"]) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert out and all(line.startswith("mdf") for line in out)
    with pytest.raises(SystemExit) as e:
        selftest.main(["--shard", "3/2"])
    assert e.value.code != 0
    with pytest.raises(SystemExit) as e:
        selftest.main(["--dtypes", "int8"])
    assert e.value.code != 0


# --------------------------------------------------------------------------- float64 arithmetic
def test_errors_are_float64():
    truth = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    got = truth * (1 + 1e-12)
    err = selftest.rel_error(got, truth)
    assert 0.5e-12 < err < 2e-12  # a float32 cast would make it 0
    assert selftest.rel_error(got.float(), truth) < 1e-7


def test_error_of_non_finite_entries():
    nan, inf = float("nan"), float("inf")
    t = torch.tensor([1.0, nan, inf, -inf], dtype=torch.float64)
    assert selftest.rel_error(t.clone(), t) == 0.0
    assert selftest.rel_error(torch.tensor([1.0, 0.0, inf, -inf]), t) == math.inf     # NaN lost
    assert selftest.rel_error(torch.tensor([1.0, nan, -inf, -inf]), t) == math.inf    # wrong infinity
    assert selftest.rel_error(torch.tensor([nan, nan, inf, -inf]), t) == math.inf     # NaN where finite
    assert selftest.rel_error(torch.zeros(3), torch.zeros(3, dtype=torch.float64)) == 0.0
    assert selftest.rel_error(torch.tensor([0.0, 1e-3, 0.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)) == 1e-3
    assert selftest.rel_error(torch.ones(2), torch.ones(3, dtype=torch.float64)) == math.inf


def test_norm_metric():
    truth = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert selftest.rel_error(truth + torch.tensor([0.0, 0.5]), truth, "norm") == pytest.approx(0.1)
    assert selftest.rel_error(truth + torch.tensor([0.0, 0.5]), truth, "max") == pytest.approx(0.125)


# --------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("kind", ["plain", "zeros"])
def test_pdl_truth_equals_the_reference(p, kind):
    x, y = selftest.pdl_inputs(2, 3, 37, torch.float64, "contiguous", kind, seed=p)
    g = torch.tensor([0.5, 1.5], dtype=torch.float64)
    loss, w, ox, oy, gx, gy = selftest.pdl_truth(x, y, p, g)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref = fastloss.pdl_reference(xr, yr, p=p, reduction="none")
    ref.backward(g)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gy, yr.grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(ox, torch.sort(x, dim=-1, stable=True).indices)


def test_pdl_truth_orders_nan_of_both_signs_last_and_zeros_stably():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        neg = selftest._neg_nan(dtype)
        assert torch.isnan(neg).all()
    x = torch.tensor([[[2.0, float("nan"), -0.0, 0.0, -1.0, 0.0]]], dtype=torch.float64)
    x[0, 0, 4] = selftest._neg_nan(torch.float64)[0]
    _, _, ox, _, _, _ = selftest.pdl_truth(x, x, 1, torch.ones(1))
    assert ox[0, 0].tolist() == [2, 3, 5, 0, 1, 4]  # zeros in input order, NaNs last in input order


def test_inputs_keep_their_layout():
    x, _ = selftest.pdl_inputs(2, 3, 35, torch.float32, "channels_last", "plain", 0)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x, _ = selftest.pdl_inputs(2, 3, 35, torch.float32, "transposed", "plain", 0)
    assert x.stride() == (35, 70, 1)
    assert selftest._to(x, "cpu").stride() == x.stride()
    x, _ = selftest.pdl_inputs(2, 3, 35, torch.float32, "contiguous", "nan", 0)
    assert torch.isnan(x).sum() == 4 and (x.view(torch.int32)[torch.isnan(x)] < 0).sum() == 2


@requires_cpu_ext
def test_tf32_is_off_inside_and_restored():
    seen = []

    def probe(backend, device, chk):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        chk.true("ran", True)

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        monkey = [selftest.Case("probe", "pdl", torch.float32, probe)]
        code, _, _ = _quick(["cpu"], case_list=monkey)
        assert code == 0 and seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --------------------------------------------------------------------------- it passes, and it can fail
@requires_cpu_ext
def test_cpu_quick_passes(tmp_path):
    out = tmp_path / "r.json"
    buf = io.StringIO()
    code, results = selftest.run("cpu", backends=["cpu"], out=buf)
    assert code == 0, buf.getvalue()
    by_label = {c.label: c for c in selftest.cases(full=False)}
    assert [selftest.acceptance_problem(by_label[r.case], r, "cpu") for r in results] == [None] * len(results)
    assert {r.loss for r in results if r.status == "pass"} == {"pdl", "d2sm", "mdf", "fdl"}
    assert "FAIL" not in buf.getvalue() and "all passed" in buf.getvalue()
    assert selftest.main(["--device", "cpu", "--backends", "cpu", "--losses", "d2sm", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["exit_code"] == 0 and data["results"]
    for r in data["results"]:
        assert {"name", "backend", "dtype", "errors", "max_error", "tolerance", "pass", "seconds"} <= set(r)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton unavailable (needs TRITON_INTERPRET=1 on CPU)")
def test_triton_quick_passes_under_the_interpreter():
    """`--backends triton --quick` under TRITON_INTERPRET=1: a third of the cases, every loss (both FDL ones)."""
    quick = selftest.cases(full=False)
    some = [c for i, c in enumerate(quick) if i % 3 == 0 or "fallback" in c.name or "blocks" in c.name
            or c.loss == "fdl"]
    assert {c.loss for c in some} == {"pdl", "d2sm", "mdf", "fdl"}
    code, results, text = _quick(["triton"], case_list=some)
    assert code == 0, text
    assert [selftest.acceptance_problem(c, r, "cpu") for c, r in zip(some, results)] == [None] * len(some)


def _pdl_only():
    return [c for c in selftest.cases(full=False) if c.loss == "pdl" and "N=35" in c.name][:4]


@requires_cpu_ext
def test_mutation_wrong_values_fail(monkeypatch):
    def wrong(real, *args):
        w, *rest = real(*args)
        return (w * 1.01, *rest)

    _wrap_forward(monkeypatch, pdl_ops.IMPLS, wrong)
    code, _, text = _quick(["cpu"], case_list=_pdl_only())
    assert code == selftest.EXIT_MISMATCH and "FAIL" in text
    assert selftest.main(["--device", "cpu", "--backends", "cpu", "--losses", "pdl", "--dtypes", "float64"]) == 1


@requires_cpu_ext
def test_mutation_float64_error_below_float32_resolution_fails(monkeypatch):
    """A float64 result off by 1e-7 relative (the fp32-typed LeakyReLU slope kind of bug) fails."""
    def off(real, *args):
        loss, *rest = real(*args)
        return (loss * (1 + 1e-7), *rest)

    _wrap_forward(monkeypatch, d2sm_ops.IMPLS, off)
    cases = [c for c in selftest.cases(full=False) if c.loss == "d2sm" and c.dtype == torch.float64]
    code, _, text = _quick(["cpu"], case_list=cases)
    assert code == selftest.EXIT_MISMATCH, text


@requires_cpu_ext
def test_mutation_unwritten_outputs_fail(monkeypatch):
    """A fast op that allocates its value and derivative outputs and writes nothing into them (the
    permutations stay real: garbage indices would make the C++ backward scatter out of bounds)."""
    def lazy(real, *args):
        w, perm, perm_t, deriv = real(*args)
        return torch.empty_like(w), perm, perm_t, torch.empty_like(deriv)

    _wrap_forward(monkeypatch, pdl_ops.IMPLS, lazy)
    code, results, text = _quick(["cpu"], case_list=_pdl_only())
    assert code == selftest.EXIT_MISMATCH, text
    assert sum(r.status in ("fail", "error") for r in results) >= len(results) // 2, text


@requires_cpu_ext
def test_mutation_a_swapped_permutation_fails(monkeypatch):
    """Two ranks swapped in the saved permutation (a wrong tie order): values may still match."""
    def swapped(real, *args):
        w, perm, *rest = real(*args)
        perm = perm.clone()
        perm[..., [0, 1]] = perm[..., [1, 0]]
        return (w, perm, *rest)

    _wrap_forward(monkeypatch, pdl_ops.IMPLS, swapped)
    cases = [c for c in _pdl_only() if "N=35" in c.name]
    code, results, text = _quick(["cpu"], case_list=cases)
    assert code == selftest.EXIT_MISMATCH, text
    assert any(r.errors.get("perm") == math.inf for r in results)


# --------------------------------------------------------------------------- n/a is declared, never caught
def _covered_pdl_case():
    """A quick PDL float32 case: every backend's PDL row declares float32."""
    case = next(c for c in selftest.cases(full=False) if c.loss == "pdl" and c.dtype == torch.float32)
    assert torch.float32 in pdl_ops.IMPLS["cpu"].dtypes
    return case


@requires_cpu_ext
def test_mutation_a_backend_error_in_a_covered_case_fails(monkeypatch):
    """A backend row that refuses (BackendError) a case its table declares: the case is an error,
    the run exits 1, and the GPU acceptance test's verdict (acceptance_problem) rejects it. The
    harness used to turn this BackendError into n/a, which the acceptance test accepted."""
    def refuse(real, *args):
        raise _backend.BackendError("pdl: backend 'cpu' cannot run this input (a stub refusing a covered case)")

    _wrap_forward(monkeypatch, pdl_ops.IMPLS, refuse)
    case = _covered_pdl_case()
    r = selftest._run_one(case, "cpu", "cpu")
    assert r.status == "error" and "BackendError" in r.detail
    assert selftest.acceptance_problem(case, r, "cpu") is not None
    code, _, text = _quick(["cpu"], case_list=[case])
    assert code == selftest.EXIT_MISMATCH and "ERROR" in text and "all passed" not in text


def test_an_na_verdict_on_a_covered_case_is_rejected():
    """What the old harness returned for a refused case (n/a) fails the acceptance verdict, and a
    pass of a case outside the table (which should not have run) is rejected too."""
    case = _covered_pdl_case()
    na = dataclasses.replace(_result("n/a"), case=case.label, detail="refused")
    assert selftest.acceptance_problem(case, na, "cpu") is not None
    assert selftest.acceptance_problem(case, _result("pass"), "cpu") is None
    half_mdf = next(c for c in selftest.cases(full=False) if c.loss == "mdf" and c.dtype == torch.bfloat16)
    assert torch.bfloat16 not in mdf_ops.IMPLS["cpu"].dtypes  # the premise: the cpu MDF row declares no bfloat16
    assert selftest.acceptance_problem(half_mdf, _result("n/a"), "cpu") is None
    assert selftest.acceptance_problem(half_mdf, _result("pass"), "cpu") is not None


def test_na_comes_from_the_table_before_the_case_runs_and_is_listed(monkeypatch):
    """A dtype the row does not declare is n/a without running the case (its run would raise),
    with the table named in the reason and the case in the closing n/a list; the same case with the
    dtype declared runs (and here fails on the raising run)."""
    ran = []

    def run(backend, device, chk):
        ran.append(backend)
        raise RuntimeError("ran")

    case = selftest.Case("probe", "pdl", torch.float64, run)
    monkeypatch.setitem(pdl_ops.IMPLS, "cpu", dataclasses.replace(pdl_ops.IMPLS["cpu"], dtypes=(torch.float32,)))
    monkeypatch.setattr(_backend, "why_not", lambda *a, **k: None)  # as if the cpu backend were built here
    code, results, text = _quick(["cpu"], case_list=[case])
    assert ran == [] and results[0].status == "n/a" and "IMPLS" in results[0].detail
    listed = text.split("not applicable, outside what the backend declares (1):\n")[1]
    assert listed.startswith("  cpu     probe [float64]: cpu pdl takes float32 (fastloss/pdl/ops.py IMPLS)")
    assert code == selftest.EXIT_NOT_RUN  # nothing ran: not a pass
    monkeypatch.setitem(pdl_ops.IMPLS, "cpu", dataclasses.replace(pdl_ops.IMPLS["cpu"], dtypes=(torch.float64,)))
    code, results, _ = _quick(["cpu"], case_list=[case])
    assert ran == ["cpu"] and results[0].status == "error" and code == selftest.EXIT_MISMATCH


def test_not_applicable_raised_while_running_is_an_error(monkeypatch):
    """n/a is decided up front (the table, the case's ``applies``); a case that raises
    NotApplicable from its run is an error, while its ``applies`` hook is honoured."""
    def run(backend, device, chk):
        raise selftest.NotApplicable("decided too late")

    monkeypatch.setattr(_backend, "why_not", lambda *a, **k: None)
    late = selftest.Case("late", "pdl", torch.float32, run)
    assert selftest._run_one(late, "cpu", "cpu").status == "error"
    early = selftest.Case("early", "pdl", torch.float32, run, applies=lambda b, d: "a CUDA-only case")
    r = selftest._run_one(early, "cpu", "cpu")
    assert r.status == "n/a" and r.detail == "a CUDA-only case"


def test_list_shows_backends_from_the_table(monkeypatch, capsys):
    """``--list`` names the backends each case runs on, from the tables: take float32 out of the cpu
    MDF row and every float32 MDF case lists cpu as n/a."""
    def listing():
        assert selftest.main(["--list", "--device", "cpu", "--losses", "mdf", "--dtypes", "float32"]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]

    before = listing()
    assert before and all("runs: cpu" in line and "n/a" not in line for line in before)
    monkeypatch.setitem(mdf_ops.IMPLS, "cpu", dataclasses.replace(mdf_ops.IMPLS["cpu"], dtypes=(torch.float64,)))
    after = listing()
    assert len(after) == len(before) and all("n/a: cpu: " in line and "runs: cpu" not in line for line in after)


# --------------------------------------------------------------------------- the --huge cases, small
from fastloss.selftest import huge  # noqa: E402


@pytest.mark.parametrize("n", [7, 1031, 4099])
def test_huge_construction_has_sorted_difference_one(n):
    """The construction the --huge cases rely on: sort(x) - sort(y) = 1 at every rank, ties and
    all, checked with torch.sort at sizes where that is cheap; rows use disjoint value ranges."""
    x, y = huge.constructed(2, 3, n, torch.float16, "cpu")
    d = torch.sort(x.double(), -1).values - torch.sort(y.double(), -1).values
    assert torch.equal(d, torch.ones_like(d))
    assert not torch.equal(torch.sort(x[0, 0]).values, x[0, 0])  # the rows are not already sorted
    assert x[0, 0].min() > 0 and x[0, 1].max() <= 0


def _small_huge(p):
    return huge._pdl_huge_case(p, n=1031, rows=(2, 3), backends_device_types=("cpu", "cuda"))


@requires_cpu_ext
@pytest.mark.parametrize("p", [1, 2])
def test_huge_case_body_passes_on_cpu_at_a_small_size(p):
    r = selftest._run_one(_small_huge(p), "cpu", "cpu")
    assert r.status == "pass", (r.detail, r.errors)
    assert selftest._run_one(huge._pdl_huge_case(p), "cpu", "cpu").status == "n/a"  # the real size: CUDA only


@requires_cpu_ext
@pytest.mark.parametrize("mutant", ["wrapped offsets", "duplicate rank"])
def test_mutation_the_huge_case_catches_wrong_offsets(monkeypatch, mutant):
    """A forward that reads row 0's data for row 1 (an offset that wrapped), or a permutation that
    names one element twice (another left unwritten by the backward), fails the small case."""
    def wrapped(real, pred, target, *rest):
        pred = pred.clone()
        pred[:, 1:] = pred[:, :1]
        return real(pred, target, *rest)

    def duplicate(real, *args):
        w, perm, *rest = real(*args)
        perm = perm.clone()
        perm[..., 0] = perm[..., 1]
        return (w, perm, *rest)

    _wrap_forward(monkeypatch, pdl_ops.IMPLS, wrapped if mutant == "wrapped offsets" else duplicate)
    r = selftest._run_one(_small_huge(1), "cpu", "cpu")
    assert r.status in ("fail", "error"), (r.detail, r.errors)


@pytest.mark.parametrize("mode", ["paper", "pkt"])
@pytest.mark.parametrize("q, a", [(8, 3), (37, 18), (301, 150)])
def test_d2sm_two_clusters_closed_form_equals_the_reference(mode, q, a):
    """The closed form the --huge D2SM case compares with, against d2sm_reference in float64."""
    x = torch.zeros(q, 2, dtype=torch.float64)
    x[:, 0] = 1
    y = torch.zeros(q, 2, dtype=torch.float64)
    y[:a, 0] = 1
    y[a:, 1] = 1
    ref = float(fastloss.d2sm_reference(x, y, mode=mode, eps=1e-6))
    assert ref > 1e-6  # something to compare
    assert huge.d2sm_two_clusters(q, a, mode, 1e-6) == pytest.approx(ref, rel=1e-12)


@requires_cpu_ext
@pytest.mark.parametrize("mode", ["paper", "pkt"])
def test_huge_d2sm_case_body_passes_on_cpu_at_a_small_size(mode, monkeypatch):
    small = huge._d2sm_huge_case(mode, q=301, backends_device_types=("cpu", "cuda"))
    r = selftest._run_one(small, "cpu", "cpu")
    assert r.status == "pass", (r.detail, r.errors)
    assert selftest._run_one(huge._d2sm_huge_case(mode), "cpu", "cpu").status == "n/a"

    def off(real, *args):  # a loss 1e-2 off, as a wrapped offset reading other entries would give
        loss, *rest = real(*args)
        return (loss * 1.01, *rest)

    _wrap_forward(monkeypatch, d2sm_ops.IMPLS, off)
    assert selftest._run_one(small, "cpu", "cpu").status == "fail"
