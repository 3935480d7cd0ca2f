"""The sets learned their distortion: the loss between clean images and distorted copies grows
monotonically with the noise level (denoise sets) and as the JPEG quality falls (jpeg sets), for
the shipped sets and the published ones (benchmarks/mdf_sensitivity.py prints them side by side)."""
import os
import sys

import pytest
import torch

import fastloss

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import mdf_sensitivity as S  # noqa: E402

from test_mdf_weights import needs_official, official  # noqa: E402


@pytest.fixture(scope="module")
def x():
    return S.images()


def _increasing(vals):
    return all(b > a for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("weights", ["denoise", pytest.param("Ds_Denoising.pth", marks=needs_official)])
def test_denoise_loss_grows_with_sigma(x, weights):
    w = official(weights) if weights.endswith(".pth") else weights
    vals = S.denoise_curve(w, x)
    assert vals[0] == 0.0 and _increasing(vals), vals


@pytest.mark.parametrize("weights", ["jpeg", pytest.param("Ds_JPEG.pth", marks=needs_official)])
def test_jpeg_loss_grows_as_quality_falls(x, weights):
    w = official(weights) if weights.endswith(".pth") else weights
    vals = S.jpeg_curve(w, x)
    assert vals[0] > 0 and _increasing(vals), vals


COFFEE_SHA256 = "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"  # scikit-image 0.26's coffee.png


@pytest.mark.parametrize("name", fastloss.mdf.SHIPPED)
def test_shipped_sets_load_with_their_training_record(name):
    w = fastloss.mdf.load(name)
    assert len(w) == 8 and w.widths == (16,) * 4 + (32,) * 4
    meta = w.metadata
    assert meta["options"]["task"] == name
    assert os.path.getsize(fastloss.mdf.shipped_path(name)) < 1_000_000
    # a natural seed (issue 15): its file, hash and license, and the paper's recipe as far as it went
    assert meta["seed_image"] == "coffee.png" and meta["seed_image_sha256"] == COFFEE_SHA256
    assert meta["seed_images"] == [{"file": "coffee.png", "sha256": COFFEE_SHA256}]
    assert "CC0" in meta["seed_source"] and "scikit-image" in meta["seed_source"]
    opts = meta["options"]
    assert (opts["resample"], opts["alpha"], opts["distortion_as_noise"], opts["first_input"]) == \
        ("lanczos", 100.0, True, "seed")
    assert (opts["scales"], opts["scale_factor"], opts["max_size"], opts["iters"]) == (8, 0.75, 128, 1000)
    assert f"--task {name} " in meta["command"] and meta["sizes"][-1] == [85, 128]


def test_default_loss_needs_no_file(x):
    crit = fastloss.MDFLoss()
    assert crit.weights.metadata["options"]["task"] == "denoise"
    y = x.clone().requires_grad_()
    loss = crit(y, x.flip(-1))
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(y.grad).all()


# ---------------------------------------------------------------------------- the comparison's tools (issue 15)
def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(16, generator=g).tolist(), torch.rand(16, generator=g).tolist()
    b[3] = b[5]  # a tie
    assert abs(S.spearman(a, b) - stats.spearmanr(a, b).statistic) < 1e-12
    assert S.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert S.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("kind", S.EQUAL_PSNR)
def test_equal_psnr_distortions_hit_their_target(x, kind):
    img = x[:1, :, :32, :32]
    for target in (25.0, 35.0):
        y = S.equal_psnr(img, kind, target)
        assert y.shape == img.shape
        if kind == "jpeg" and target == 35.0:  # past what Pillow's 4:2:0 JPEG reaches on this scene: its best
            assert S.psnr(y, img) >= S.psnr(S.jpeg(img, 95), img)
        else:
            assert abs(S.psnr(y, img) - target) <= (3.0 if kind == "jpeg" else 0.05), (kind, target, S.psnr(y, img))


def test_distortion_grid_worsens_within_each_family(x):
    img = x[:1, :, :32, :32]
    grid = S.distortion_grid(img)
    assert len(grid) == len(S.NOISE_GRID) + len(S.JPEG_GRID) + len(S.BLUR_GRID) == 16
    for family in ("noise", "jpeg", "blur"):
        p = [S.psnr(d, img) for label, d in grid if label.startswith(family)]
        assert all(b < a for a, b in zip(p, p[1:])), (family, p)


def test_natural_test_images_leave_out_the_training_images():
    """The rank-agreement images are scikit-image's photographs less every seed image of the shipped
    sets, matched by the sha256 their metadata records (a name can be reused; a hash cannot)."""
    data = pytest.importorskip("skimage.data")
    import hashlib

    folder = os.path.dirname(data.__file__)
    sha = {os.path.splitext(f)[0]: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
           for f in os.listdir(folder) if os.path.splitext(f)[0] in S.NATURAL}
    names, xs = S.natural_images(exclude_sha256=set())
    assert names == list(S.NATURAL) and xs.shape == (len(S.NATURAL), 3, 96, 96)
    names, xs = S.natural_images(exclude_sha256={sha["coffee"]})
    assert names == [n for n in S.NATURAL if n != "coffee"] and xs.shape[0] == len(S.NATURAL) - 1
    names, _ = S.natural_images()  # the default: the shipped sets' own seeds, read from their metadata
    assert S.seed_hashes() == {COFFEE_SHA256} == {sha["coffee"]}
    assert names == [n for n in S.NATURAL if n != "coffee"]
