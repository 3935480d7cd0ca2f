"""The main job leaves the checkout clean (issue 24): ``bash scripts/bench.sh`` runs fastloss-bench
into the untracked ``fastloss-bench-out/`` and touches BENCHMARKS.md and benchmarks/results/ only
with ``--update-benchmarks`` (which the README shows); the chart's legend says which bars are the
fast backend."""
import os
import shutil
import stat
import subprocess

import pytest

from fastloss.bench import cli
from fastloss.bench.report import BAR_KINDS, bar_chart, bar_kind

from helpers import ROOT  # noqa: E402  (the repository)


def _fake_checkout(tmp_path):
    """A copy of scripts/bench.sh beside a stand-in setup.sh and a .venv whose fastloss-bench
    prints its arguments, so the script's command line is seen without a build or a run."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(ROOT, "scripts", "bench.sh"), tmp_path / "scripts" / "bench.sh")
    (tmp_path / "scripts" / "setup.sh").write_text("#!/usr/bin/env bash\necho setup-ran >&2\n")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    fake = venv_bin / "fastloss-bench"
    fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def _bench_sh(checkout, *args):
    proc = subprocess.run(["bash", str(checkout / "scripts" / "bench.sh"), *args], capture_output=True, text=True,
                          timeout=60, cwd=str(checkout))
    assert proc.returncode == 0, proc.stderr
    assert "setup-ran" in proc.stderr
    return proc.stdout.splitlines()


def test_bench_sh_writes_nothing_tracked_by_default(tmp_path):
    checkout = _fake_checkout(tmp_path)
    assert _bench_sh(checkout) == []  # fastloss-bench's own defaults: --out fastloss-bench-out
    assert _bench_sh(checkout, "--steps", "5", "--configs", "l1,vgg") == ["--steps", "5", "--configs", "l1,vgg"]
    assert cli.parse_args([]).out == "fastloss-bench-out" and cli.parse_args([]).markdown is None
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/fastloss-bench-out/" in f.read().split()


def test_bench_sh_updates_benchmarks_only_when_asked(tmp_path):
    checkout = _fake_checkout(tmp_path)
    got = _bench_sh(checkout, "--steps", "2", "--update-benchmarks", "--configs", "l1")
    assert got == ["--out", "benchmarks/results", "--markdown", "BENCHMARKS.md", "--steps", "2", "--configs", "l1"]


def test_readme_shows_the_flag():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert "bash scripts/bench.sh --update-benchmarks" in text


def _row(label, backend, rel):
    return {"label": label, "backend": backend, "relative_to_pixel": rel}


def test_chart_legend_names_the_fast_backend(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fastloss.bench.report import chart_figure

    rows = [_row("L1 (pixel only)", "-", 1.0), _row("L1 + PDL (reference)", "reference", 0.5),
            _row("L1 + PDL (fast)", "cpu", 0.8)]
    fig = chart_figure(rows, "t")
    try:
        (legend,) = fig.legends
        texts = [t.get_text() for t in legend.get_texts()]
        assert texts == ["baseline (no fastloss loss)", "fastloss, reference backend", "fastloss, fast backend (cpu)"]
        colours = {tuple(round(c, 3) for c in p.get_facecolor()) for p in fig.axes[0].patches}
        assert len(colours) == 3
    finally:
        plt.close(fig)
    # only the kinds drawn are listed
    fig = chart_figure(rows[:1], "t")
    try:
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["baseline (no fastloss loss)"]
    finally:
        plt.close(fig)
    bar_chart(rows, str(tmp_path / "c.png"), "t")
    assert (tmp_path / "c.png").stat().st_size > 0
    assert [bar_kind(b) for b in ("-", "reference", "cpu", "triton", "cuda")] == \
        ["baseline", "reference", "fast", "fast", "fast"]
    assert set(BAR_KINDS) == {"baseline", "reference", "fast"}
