"""The image losses' input checks (fastloss/_checks.py): each wrong input gets an error naming the
loss and the argument before any kernel runs; images clearly outside the expected range warn once
per loss instance (sampled on the first call only); input_range=(-1, 1) maps to [0, 1]."""
import warnings

import numpy as np
import pytest
import torch

import fastloss

_OK = torch.rand(1, 3, 32, 32)


def _losses():
    torch.manual_seed(0)
    return [("PDLLoss", "restored", fastloss.PDLLoss(extractor_weights=None, layers=("relu2_2",))),
            ("D2SMLoss", "restored", fastloss.D2SMLoss(extractor_weights=None, layer="relu2_2", queue_size=4)),
            ("MDFLoss", "pred", fastloss.MDFLoss(scales=1)),
            ("FDLLoss", "restored", fastloss.FDLLoss(extractor_weights=None, layers=("relu2_2",), num_proj=4))]


BAD = [
    ("numpy", lambda: np.zeros((1, 32, 32, 3), np.float32), TypeError, "is a numpy array"),
    ("list", lambda: [[0.0]], TypeError, "must be a torch.Tensor, got list"),
    ("uint8", lambda: (_OK * 255).to(torch.uint8), TypeError, r"must be a floating-point tensor .*uint8 \(0..255 integers\?\): pass x.float\(\) / 255"),
    ("grayscale", lambda: torch.rand(1, 1, 32, 32), ValueError, r"must have 3 channels \(RGB\), got a grayscale image .*x.expand\(-1, 3, -1, -1\)"),
    ("HWC", lambda: torch.rand(1, 32, 32, 3), ValueError, r"has shape .*channels last .*x.permute\(0, 3, 1, 2\)"),
    ("CHW", lambda: torch.rand(3, 32, 32), ValueError, r"must be .*x.unsqueeze\(0\)"),
]


@pytest.mark.parametrize("kind,make,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_image_names_loss_and_argument(kind, make, exc, message):
    for loss_name, arg, loss in _losses():
        with pytest.raises(exc, match=f"^{loss_name}: {arg} {message}"):
            loss(make(), _OK)


def _range_warnings(loss, *calls):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for u, v in calls:
            loss(u, v)
    return [str(m.message) for m in w if "clearly outside" in str(m.message)]


def test_range_warning_once_per_instance_names_loss_range_and_fix():
    for loss_name, _, loss in _losses():
        big = _OK * 255
        msgs = _range_warnings(loss, (big, big.flip(-1)), (big, big), (big, big))
        assert len(msgs) == 1, (loss_name, msgs)
        assert msgs[0].startswith(f"{loss_name}: images range over [") and "255" in msgs[0]
        assert "divide by 255" in msgs[0]
    # [0, 1] images never warn; [-1, 1] images warn with the input_range hint
    for loss_name, _, loss in _losses():
        assert _range_warnings(loss, (_OK, _OK.flip(-1))) == []
    loss = fastloss.PDLLoss(extractor_weights=None, layers=("relu2_2",))
    (msg,) = _range_warnings(loss, (_OK * 2 - 1, _OK.flip(-1) * 2 - 1))
    assert "input_range=(-1, 1)" in msg


def test_range_check_reads_the_target_not_the_prediction():
    """A restoration network's first outputs range far outside [0, 1] (here [-2, 3], as fastloss-bench's
    untrained denoiser gave): no warning while the clean target is in range; a [0, 255] target warns."""
    for loss_name, _, loss in _losses():
        wild = _OK * 5 - 2
        assert _range_warnings(loss, (wild, _OK)) == [], loss_name
    for loss_name, _, loss in _losses():
        assert len(_range_warnings(loss, (_OK, _OK * 255))) == 1, loss_name


def test_range_check_samples_the_first_call_only():
    """After the first call the check reads nothing from the device: a later out-of-range call
    (a GPU step that would need a sync to see it) does not warn."""
    loss = fastloss.MDFLoss(scales=1)
    assert _range_warnings(loss, (_OK, _OK), (_OK * 255, _OK * 255)) == []


@pytest.mark.parametrize("cls,kw", [(fastloss.PDLLoss, {"layers": ("relu2_2",)}),
                                    (fastloss.D2SMLoss, {"layer": "relu2_2", "queue_size": 4}),
                                    (fastloss.FDLLoss, {"layers": ("relu2_2",), "num_proj": 4})])
def test_input_range_minus_one_one_equals_the_unit_range_loss(cls, kw):
    torch.manual_seed(0)
    a = cls(extractor_weights=None, **kw)
    torch.manual_seed(0)
    b = cls(extractor_weights=None, input_range=(-1, 1), **kw)
    u, v = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)  # 3 rows: D2SM's paper mode is 0 over 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # [-1, 1] images are in range for input_range=(-1, 1)
        got = b(u * 2 - 1, v * 2 - 1)
    torch.testing.assert_close(got, a(u, v))
    with pytest.raises(ValueError, match=r"^%s: input_range must be \(0, 1\) or \(-1, 1\), got \(0, 255\)" % cls.__name__):
        cls(extractor_weights=None, input_range=(0, 255), **kw)
