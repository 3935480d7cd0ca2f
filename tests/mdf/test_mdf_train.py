"""python -m fastloss.mdf.train, end to end at a tiny size: two scales, a few iterations."""
import os
import subprocess
import sys

import pytest
import torch

import fastloss
from fastloss.mdf import train

from helpers import ROOT

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


# ---------------------------------------------------------------------------- the paper's recipe (issue 15)
def _png(path, h, w, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([yy, xx, (yy * xx + 0.2 * torch.rand(h, w, generator=g)).clamp(0, 1)], -1)
    Image.fromarray((img * 255).round().to(torch.uint8).numpy()).save(path)
    return str(path)


def test_help_shows_the_presets_and_lanczos():
    proc = subprocess.run([sys.executable, "-m", "fastloss.mdf.train", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    out = " ".join(proc.stdout.split())
    assert "--preset {paper}" in out and "lanczos" in out
    # --help says what the preset sets, every option of it
    for key, value in train.PRESETS["paper"].items():
        flag = "--" + key.replace("_", "-")
        assert (flag if value is True else f"{flag} {value}") in out, flag


def test_paper_preset_sets_the_recipe_and_flags_still_win(tmp_path, capsys):
    seed = _png(tmp_path / "s.png", 26, 30, 0)
    out = tmp_path / "p.safetensors"
    # the preset asks for K = 8 at the seed's own size; 26 px allows 2 levels at rho = 2 (26, 13)
    args = ["--seed-image", seed, "--task", "denoise", "--out", str(out), "--preset", "paper", "--iters", "2",
            "--width", "4", "--threads", "1", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "26 x 30" in err and "below the 11 x 11" in err and "--fit-scales (trains 2)" in err
    assert train.main(args + ["--fit-scales"]) == 0
    printed = capsys.readouterr().out
    assert "training K = 2 scales instead of 8" in printed
    meta = fastloss.mdf.load(out).metadata
    o = meta["options"]
    assert o["preset"] == "paper" and o["scales"] == 2 and o["scales_requested"] == 8
    assert (o["scale_factor"], o["resample"], o["alpha"], o["distortion_as_noise"], o["first_input"], o["max_size"]) \
        == (0.5, "lanczos", 100.0, True, "seed", 0)
    assert o["iters"] == 2  # given on the command line: wins over the preset's 3000
    assert meta["sizes"] == [[13, 15], [26, 30]]
    assert [p["noise_amp"] for p in meta["per_scale"]] == [0.0, 0.0]  # the distortion is the only noise


def test_rho_and_resample(tmp_path):
    x = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    lz = train._resize(x, (20, 18), "lanczos")
    bc = train._resize(x, (20, 18), "bicubic")
    assert lz.shape == bc.shape == (1, 3, 20, 18) and lz.dtype == x.dtype
    assert not torch.allclose(lz, bc, atol=1e-3)                       # a different filter
    assert (lz.mean((2, 3)) - x.mean((2, 3))).abs().max() < 0.02      # both keep the local means
    flat = torch.full((1, 3, 40, 36), 0.3)
    torch.testing.assert_close(train._resize(flat, (20, 18), "lanczos"), torch.full((1, 3, 20, 18), 0.3))
    seed = _png(tmp_path / "s.png", 24, 24, 2)
    out = tmp_path / "r.safetensors"
    assert train.main(["--seed-image", seed, "--task", "sisr", "--out", str(out), "--rho", "2", "--scales", "2",
                       "--resample", "lanczos", "--iters", "1", "--width", "4", "--max-size", "0", "--threads", "1",
                       "--no-progress"]) == 0
    meta = fastloss.mdf.load(out).metadata
    assert meta["options"]["scale_factor"] == 0.5 and meta["sizes"] == [[12, 12], [24, 24]]


def test_first_input_and_distortion_as_noise():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(1, 3, 16, 16, generator=g)
    opts = {"task": "sisr", "seed": 0, "width": 4, "max_width": 4, "iters": 1, "d_steps": 1, "g_steps": 1,
            "lr": 5e-4, "alpha": 10.0, "gp_weight": 0.1, "noise_amp": 0.1, "first_input": "seed",
            "distortion_as_noise": True}
    t = train._Trainer(opts, [[(12, 12), (16, 16)]], [real])
    t.train_scale(0)
    # the first scale's input is the downsampled seed (plus the distortion: none for sisr), not zeros
    assert torch.equal(t._prev(0, rec=False), t.reals[0][0])
    assert t.noise_amps == [0.0]                 # sisr: z^k = 0 and no SinGAN noise
    t2 = train._Trainer(dict(opts, task="denoise"), [[(12, 12), (16, 16)]], [real])
    x0 = t2._first_input(0, rec=False)
    assert 0 < (x0 - t2.reals[0][0]).abs().mean() < 0.5  # seed + Gaussian noise
    t3 = train._Trainer(dict(opts, first_input="zeros", distortion_as_noise=False), [[(12, 12), (16, 16)]], [real])
    assert torch.equal(t3._prev(0, rec=False), torch.zeros_like(t3.reals[0][0]))


def test_several_seed_images(tmp_path):
    seeds = [_png(tmp_path / "a.png", 20, 20, 3), _png(tmp_path / "b.png", 24, 18, 4)]
    out = tmp_path / "m.safetensors"
    assert train.main(["--seed-image", *seeds, "--task", "jpeg", "--out", str(out),
                       "--seed-source", "drawn by this test, CC0"] + TINY) == 0
    meta = fastloss.mdf.load(out).metadata
    assert [s["file"] for s in meta["seed_images"]] == ["a.png", "b.png"]
    assert meta["seed_source"] == "drawn by this test, CC0"
    assert len({s["sha256"] for s in meta["seed_images"]}) == 2 and meta["seed_image_sha256"] == meta["seed_images"][0]["sha256"]
