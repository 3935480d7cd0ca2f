"""fastloss-bench's FDL rows (L1 + FDL on its reference and fast backends) and benchmarks/bench_fdl.py."""
import json
import os
import subprocess
import sys

import pytest

from fastloss import bench
from fastloss.bench import CONFIGS, OPT_IN, cli

from conftest import requires_cpu_ext
from helpers import ROOT

TINY = ["--steps", "1", "--warmup", "0", "--rounds", "1", "--batch-size", "1", "--width", "4", "--no-progress"]


def test_fdl_rows_are_named_and_left_out_of_all():
    assert CONFIGS["fdl-ref"][1:3] == ("fdl", "reference") and CONFIGS["fdl-fast"][1:3] == ("fdl", "fast")
    assert set(OPT_IN) == {"fdl-ref", "fdl-fast"}
    assert not set(OPT_IN) & set(cli.parse_args([]).configs)
    assert cli.parse_args(["--configs", "l1,fdl-ref,fdl-fast"]).configs == ["l1", "fdl-ref", "fdl-fast"]


def test_fdl_rows_on_small_crops_are_skipped_with_the_loss_error(tmp_path, capsys):
    assert bench.main(TINY + ["--crop", "16", "--configs", "l1,fdl-fast", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert "patch_size=5 is larger than layer relu" in data["skipped"]["fdl-fast"]


@pytest.mark.slow
@requires_cpu_ext
def test_fdl_rows_run_end_to_end(tmp_path):
    assert bench.main(TINY + ["--crop", "80", "--configs", "l1,fdl-ref,fdl-fast", "--out", str(tmp_path)]) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["fdl-fast"]["backend"] == "cpu" and rows["fdl-fast"]["speedup_vs_reference"] > 0


@requires_cpu_ext
@pytest.mark.parametrize("provider,what", [("baseline", "memory"), ("fast", "time")])
def test_bench_fdl_measure_in_process(provider, what):
    """The worker each fresh process runs: one forward + backward, its seconds or its peak extra
    bytes (each provider and each kind in the --quick run under -m slow)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_fdl
    finally:
        sys.path.pop(0)
    value = bench_fdl.measure(provider, [1, 3, 80, 80], 2, "cpu", what)
    assert value > 0 if what == "time" else value >= 0


@pytest.mark.slow
@requires_cpu_ext
def test_bench_fdl_quick_runs(tmp_path):
    """``benchmarks/bench_fdl.py --quick --no-write``: every provider measured in its own process."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_fdl.py"), "--quick", "--no-write",
                           "--json", str(tmp_path / "fdl.json")], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "fdl.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"baseline", "reference", "fast", "fast-bf16"}
    for r in rows:
        assert r["ms"] > 0 and r["peak_extra_bytes"] >= 0
