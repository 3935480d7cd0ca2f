"""python -m fastloss.mdf.train, end to end at a tiny size: two scales, a few iterations."""
import os
import subprocess
import sys

import pytest
import torch

import fastloss
from fastloss.mdf import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = os.path.join(ROOT, "fastloss", "mdf", "data", "seed.png")
TINY = ["--scales", "2", "--iters", "2", "--max-size", "20", "--width", "4", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("task", train.TASKS)
def test_tiny_training_run_writes_a_loadable_set(tmp_path, task):
    out = tmp_path / f"{task}.safetensors"
    assert train.main(["--seed-image", SEED, "--task", task, "--out", str(out)] + TINY) == 0
    w = fastloss.mdf.load(out)
    assert w.widths == (4, 4) and len(w) == 2
    meta = w.metadata
    assert meta["options"]["task"] == task and meta["options"]["scales"] == 2 and meta["options"]["iters"] == 2
    assert meta["command"].startswith("python -m fastloss.mdf.train --seed-image") and not meta["resumed"]
    assert meta["sizes"] == [[15, 15], [20, 20]] and len(meta["per_scale"]) == 2
    assert len(meta["seed_image_sha256"]) == 64
    for d in w.discriminators:  # BatchNorm running statistics were gathered
        assert not torch.equal(d["head.norm.running_var"], torch.ones_like(d["head.norm.running_var"]))
    assert not (tmp_path / f"{task}.safetensors.ckpt").exists()
    crit = fastloss.MDFLoss(str(out), scales=2)
    x = torch.rand(1, 3, 16, 16)
    assert torch.isfinite(crit(x, x.flip(-1))) and crit(x, x).item() == 0.0


def test_resume_continues_from_the_last_scale(tmp_path):
    out = tmp_path / "set.safetensors"
    args = ["--seed-image", SEED, "--task", "denoise", "--out", str(out)] + TINY
    assert train.main(args + ["--until-scale", "1"]) == 0
    ckpt = tmp_path / "set.safetensors.ckpt"
    assert ckpt.exists() and not out.exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["completed"] == 1
    assert train.main(args + ["--resume"]) == 0
    w = fastloss.mdf.load(out)
    assert len(w) == 2 and w.metadata["resumed"] and "--until-scale" in w.metadata["command"]
    # the first discriminator is the one the first run trained
    assert torch.equal(w.discriminators[0]["tail.weight"], state["discriminators"][0]["tail.weight"])


def test_distortions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 24, 24, generator=g)
    assert torch.equal(train.distort(x, "sisr", g), x)
    noisy = train.distort(x, "denoise", g)
    assert 0 < (noisy - x).std() <= train.DENOISE_MAX_SIGMA * 1.2
    jq = train.distort(x, "jpeg", g)
    assert jq.shape == x.shape and 0 < (jq - x).abs().mean() < 0.5 and jq.min() >= 0 and jq.max() <= 1
    assert (train.jpeg(x, 95) - x).abs().mean() < (train.jpeg(x, 7) - x).abs().mean()


def test_threads_option_does_not_leak():
    before = torch.get_num_threads()
    with pytest.raises(SystemExit):
        train.main(["--seed-image", SEED, "--task", "jpeg", "--out", "x", "--threads", "1", "--iters", "0"])
    assert torch.get_num_threads() == before


def test_width_doubles_every_four_scales():
    assert [train.width_at(s, 32, 128) for s in range(10)] == [32] * 4 + [64] * 4 + [128] * 2
    d = train.Discriminator(8)
    assert set(k for k in d.state_dict() if "num_batches" not in k) == set(fastloss.mdf.tensor_names())


@pytest.mark.parametrize("extra,message", [
    (["--scales", "9", "--max-size", "20"], "below the 11 x 11"),
    (["--scale-factor", "1.5"], "--scale-factor must be in"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--resume"], "no checkpoint"),
])
def test_bad_options(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--seed-image", SEED, "--task", "jpeg", "--out", str(tmp_path / "x.safetensors"),
                    "--no-progress"] + extra)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_command_line_entry_point(tmp_path):
    out = tmp_path / "cli.safetensors"
    proc = subprocess.run([sys.executable, "-m", "fastloss.mdf.train", "--seed-image", SEED, "--task", "sisr",
                           "--out", str(out), "--scales", "2", "--iters", "1", "--max-size", "16", "--width", "4",
                           "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it/s" in proc.stderr or "s/it" in proc.stderr  # the tqdm progress bar
    assert fastloss.mdf.load(out).widths == (4, 4)
