"""fastloss-bench rounds (configurations interleaved) and the BENCHMARKS.md section it writes."""
import json

import pytest

from fastloss import bench

from conftest import requires_cpu_ext

TINY = ["--steps", "1", "--warmup", "0", "--batch-size", "1", "--crop", "16", "--width", "4", "--no-progress"]


@requires_cpu_ext
def test_rounds_and_markdown_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# fastloss benchmarks\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n\n"
                  "<!-- steps:begin -->\nstale table\n<!-- steps:end -->\n")
    out = tmp_path / "out"
    configs = ["l1", "pdl-ref", "pdl-fast"]
    argv = TINY + ["--rounds", "2", "--configs", ",".join(configs), "--out", str(out), "--markdown", str(md)]
    assert bench.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    for r in data["results"]:
        assert r["rounds"] == 2 and len(r["round_median_step_seconds"]) == 2
        assert r["median_step_seconds"] == pytest.approx(1.0 / r["steps_per_sec"])
    text = md.read_text()
    assert "keep me" in text and "stale table" not in text  # only the steps section is replaced
    assert text.count("<!-- steps:begin -->") == 1 and text.count("<!-- steps:end -->") == 1
    section = text.split("<!-- steps:begin -->")[1].split("<!-- steps:end -->")[0]
    assert "fastloss-bench " + " ".join(argv) in section  # the command that produced it
    for label in ("L1 (pixel only)", "L1 + PDL (reference)", "L1 + PDL (fast)"):
        assert label in section
    assert "torch threads" in section and "VGG weights" in section
    png = section.split("](")[1].split(")")[0]
    assert (md.parent / png).read_bytes()[:4] == b"\x89PNG"


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + ["--rounds", "0"])
    assert e.value.code == 2 and "--rounds" in capsys.readouterr().err


def test_default_rounds_alternate_configurations_every_few_steps():
    """The README's defaults: 10 rounds of 3 timed steps (after 2 warm-up steps)."""
    args = bench.parse_args([])
    assert (args.rounds, args.steps, args.warmup) == (10, 3, 2)


def test_header_says_whether_the_cpu_has_amx():
    """Every benchmark header names the CPU's AVX-512 / AMX flags, and says AMX's absence outright."""
    from fastloss.bench.report import flags_text

    amd = flags_text({"flags": ["avx512f", "avx512_bf16"], "torch_cpu_capability": "AVX512"})
    intel = flags_text({"flags": ["avx512f", "avx512_bf16", "amx_bf16", "amx_tile"], "torch_cpu_capability": "AVX512"})
    assert amd == "; flags: avx512f avx512_bf16, no AMX, torch CPU capability AVX512"
    assert "amx_bf16 amx_tile" in intel and "no AMX" not in intel
    assert flags_text(None) == ""
