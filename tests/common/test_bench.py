"""fastloss-bench end to end with tiny settings, its JSON, its errors; the microbenchmarks run."""
import json
import subprocess
import sys

import pytest
import torch

from fastloss import bench

from conftest import requires_cpu_ext
from helpers import ROOT

TINY = ["--steps", "1", "--warmup", "0", "--batch-size", "1", "--crop", "16", "--width", "4", "--no-progress"]
ROW_FIELDS = {"config", "label", "loss", "backend", "steps", "warmup_steps", "median_step_seconds", "steps_per_sec",
              "total_seconds", "final_loss", "relative_to_pixel", "relative_to_vgg", "speedup_vs_reference",
              "rounds", "round_median_step_seconds", "relative_to_vgg_autocast", "speedup_vs_added"}


@requires_cpu_ext
def test_cli_end_to_end_writes_json_and_png(tmp_path, capsys):
    configs = ["l1", "vgg", "pdl-ref", "pdl-fast"]
    assert bench.main(TINY + ["--configs", ",".join(configs), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "VGG weights: random" in out and "L1 + PDL (fast)" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"] for r in data["results"]] == configs  # one row per configuration
    for r in data["results"]:
        assert set(r) == ROW_FIELDS
        assert r["steps_per_sec"] > 0 and r["steps"] == 1
    rows = {r["config"]: r for r in data["results"]}
    assert rows["l1"]["relative_to_pixel"] == 1.0
    assert rows["pdl-fast"]["backend"] == "cpu" and rows["pdl-ref"]["backend"] == "reference"
    assert rows["pdl-fast"]["speedup_vs_reference"] == pytest.approx(
        rows["pdl-fast"]["steps_per_sec"] / rows["pdl-ref"]["steps_per_sec"])
    for key in ("cpu", "torch_threads", "torch", "triton", "backends", "fast_backend", "cpu_kernels"):
        assert key in data["machine"]
    assert data["machine"]["cpu_kernels"] in ("avx2", "baseline")
    assert (tmp_path / "steps_per_sec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_matplotlib_writes_table_and_json_and_names_the_extra(tmp_path, capsys, monkeypatch):
    """matplotlib is in the bench extra only: without it the table, JSON and markdown are still
    written, and the output says which extra adds the chart."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    md = tmp_path / "BENCH.md"
    assert bench.main(TINY + ["--configs", "l1", "--out", str(tmp_path), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "L1 (pixel only)" in out  # the table
    assert "no chart: matplotlib is not installed" in out and "fastloss[bench]" in out
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["config"] == "l1"
    assert not (tmp_path / "steps_per_sec.png").exists()
    assert "no chart: matplotlib is not installed" in md.read_text()
    with pytest.raises(SystemExit, match=r"fastloss\[bench\]"):
        bench.main(["--demo", "--demo-steps", "1", "--crop", "16", "--width", "4", "--out", str(tmp_path)])


def test_cli_demo_writes_side_by_side_pngs(tmp_path):
    assert bench.main(["--demo", "--demo-steps", "1", "--crop", "16", "--width", "4", "--batch-size", "1",
                       "--no-progress", "--out", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("demo_*.png"))
    assert pngs == ["demo_0.png", "demo_1.png", "demo_2.png"]


@requires_cpu_ext
def test_precision_check_trains_each_seed_on_both_backbones_and_reports_the_control(tmp_path, capsys):
    md = tmp_path / "B.md"
    md.write_text("<!-- precision:begin -->\n<!-- precision:end -->\n")
    assert bench.main(["--precision-check", "--precision-seeds", "2", "--demo-steps", "1", "--crop", "16",
                       "--width", "4", "--batch-size", "1", "--layers", "relu1_2", "--no-progress",
                       "--out", str(tmp_path), "--markdown", str(md)]) == 0
    result = json.loads((tmp_path / "precision.json").read_text())
    assert result["seeds"] == [0, 1] and len(result["pdl-fast"]) == len(result["pdl-bf16"]) == 2
    assert result["difference_db"] == [b - f for f, b in zip(result["pdl-fast"], result["pdl-bf16"])]
    assert result["float32_spread_db"] == abs(result["pdl-fast"][0] - result["pdl-fast"][1])
    assert result["pdl-fast"][0] != result["pdl-fast"][1]  # the seeds train different models
    text = md.read_text()
    assert "| 0 |" in text and "| 1 |" in text and "(the control)" in text


@pytest.mark.parametrize("argv,message", [
    (["--configs", "l1,nope"], "unknown configuration"),
    (["--steps", "0"], "expected a positive integer, got 0"),
    (["--batch-size", "x"], "expected a positive integer, got 'x'"),
    (["--crop", "8"], "--crop must be at least 16"),
    (["--sigma", "-1"], "--sigma must be in"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_cli_bad_option_exits_nonzero_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_module_runs_help():
    out = subprocess.run([sys.executable, "-m", "fastloss.bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "fastloss-bench" in out.stdout


# every microbenchmark of benchmarks/test_micro_*.py, with its peers: the smoke subset runs each
SMOKE_TESTS = ["test_micro_pdl.py::test_pdl[", "test_micro_d2sm.py::test_d2sm_kl[",
               "test_micro_d2sm.py::test_d2sm_queue_step[", "test_micro_mdf.py::test_mdf_features[",
               "test_micro_mdf.py::test_mdf_loss["]
SMOKE_PEERS = ["test_pdl[torch.sort-formula-", "test_d2sm_kl[PKT-formula-pkt-smoke",
               "test_d2sm_queue_step[PKT-formula-pkt-smoke", "test_mdf_features[published-loop-smoke"]


def test_microbenchmarks_smoke_subset_runs():
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-v", "-k", "smoke", "--benchmark-disable",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    passed = [line for line in out.stdout.splitlines() if line.rstrip().endswith("PASSED") or " PASSED " in line]
    for name in SMOKE_TESTS + SMOKE_PEERS:
        assert any(name in line for line in passed), f"no smoke microbenchmark {name}... passed:\n{out.stdout[-3000:]}"
    assert all("-smoke-" in line or "-smoke]" in line for line in passed)  # the subset only


def test_ratios_on_known_rows():
    """The ratio columns on rows whose steps/sec are chosen by hand (expected values worked out
    here, not recomputed with the code's formula)."""
    from fastloss.bench.run import add_ratios

    sps = {"l1": 10.0, "vgg": 4.0, "vgg-autocast": 5.0, "pdl-ref": 2.0, "pdl-fast": 3.0, "perc+pdl": 1.0,
           "combined": 2.5, "perc+pdl-bf16": 2.0, "combined-bf16": 3.0}
    rows = {r["config"]: r for r in add_ratios([{"config": k, "steps_per_sec": v} for k, v in sps.items()])}
    assert rows["vgg"]["relative_to_pixel"] == pytest.approx(0.4)
    assert rows["pdl-fast"]["relative_to_vgg"] == pytest.approx(0.75)
    assert rows["pdl-fast"]["speedup_vs_reference"] == pytest.approx(1.5)
    assert rows["pdl-fast"]["relative_to_vgg_autocast"] == pytest.approx(0.6)
    assert rows["combined"]["speedup_vs_added"] == pytest.approx(2.5)
    assert rows["combined-bf16"]["speedup_vs_added"] == pytest.approx(1.5)
    assert rows["pdl-ref"]["speedup_vs_reference"] is None and rows["perc+pdl"]["speedup_vs_added"] is None
