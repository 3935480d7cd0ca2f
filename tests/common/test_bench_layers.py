"""fastloss-bench --layers (the perceptual layers of the vgg and pdl configurations) and the
pdl-paper section of BENCHMARKS.md."""
import json
import subprocess
import sys

import pytest

from fastloss import bench

from conftest import requires_cpu_ext

TINY = ["--steps", "1", "--warmup", "0", "--rounds", "1", "--batch-size", "1", "--crop", "16", "--width", "4",
        "--no-progress"]


def test_help_lists_layers_and_the_markdown_section():
    out = subprocess.run([sys.executable, "-m", "fastloss.bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--layers" in out.stdout and "pdl-paper" in out.stdout


def test_layers_choose_the_perceptual_layers():
    assert bench.parse_args([]).layers == bench.PERCEPTUAL_LAYERS
    args = bench.parse_args(["--layers", "relu4_3"])
    assert args.layers == ("relu4_3",)
    image = bench.make_image(64)
    vgg = bench.setup_config("vgg", args, image)["criterion"]
    pdl = bench.setup_config("pdl-fast", args, image)["criterion"]
    assert vgg.layers == ("relu4_3",) and sorted(vgg.out_index.values()) == ["relu4_3"]
    assert pdl.layers == ("relu4_3",) and pdl.extractor.layers == ("relu4_3",)
    two = bench.parse_args(["--layers", "relu1_2, relu3_3"])
    assert bench.setup_config("pdl-ref", two, image)["criterion"].layers == ("relu1_2", "relu3_3")


@pytest.mark.parametrize("value,message", [("relu9_9", "unknown VGG16 layer(s) ['relu9_9']"),
                                           ("relu4_4", "unknown VGG16 layer(s) ['relu4_4']"),
                                           (",", "unknown VGG16 layer"),
                                           ("relu1_2,relu1_2", "repeated layer")])
def test_bad_layers_exit_with_a_message(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--layers", value])
    assert e.value.code == 2 and message in capsys.readouterr().err


@requires_cpu_ext
def test_pdl_paper_section_end_to_end(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# fastloss benchmarks\n\n<!-- steps:begin -->\nkept\n<!-- steps:end -->\n")
    argv = TINY + ["--layers", "relu2_2", "--configs", "l1,vgg,pdl-ref,pdl-fast", "--out", str(tmp_path),
                   "--markdown", str(md), "--markdown-section", "pdl-paper"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["settings"]["layers"] == ["relu2_2"]
    assert len(data["load_average"]["before"]) == 3 and len(data["load_average"]["after"]) == 3
    text = md.read_text()
    assert "kept" in text  # the steps section is left alone
    section = text.split("<!-- pdl-paper:begin -->")[1].split("<!-- pdl-paper:end -->")[0]
    assert "--layers relu2_2" in section and "load average" in section and "What differs" in section
    for r in data["results"]:
        line = next(ln for ln in section.splitlines() if ln.startswith(r["label"]))
        paper = bench.PDL_PAPER_TABLE_I[r["config"]]
        assert line.split()[-1] == f"{paper:.2f}" and line.split()[-2] == f"{r['relative_to_pixel']:.2f}"
    assert len(data["results"]) == 4
