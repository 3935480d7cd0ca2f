"""Bad input to FDLLoss and fdl: a clear error naming the loss, the argument and the value, raised
before any kernel runs."""
import numpy as np
import pytest
import torch

import fastloss
from fastloss.fdl import fdl


def make(**kw):
    kw.setdefault("extractor_weights", None)
    kw.setdefault("num_proj", 2)
    return fastloss.FDLLoss(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"num_proj": 0}, "FDLLoss: num_proj must be an int >= 1, got 0"),
    ({"num_proj": 2.5}, "FDLLoss: num_proj must be an int >= 1, got 2.5"),
    ({"num_proj": True}, "FDLLoss: num_proj must be an int >= 1, got True"),
    ({"stride": 0}, "FDLLoss: stride must be an int >= 1, got 0"),
    ({"patch_size": 0}, "FDLLoss: patch_size must be an int >= 1, got 0"),
    ({"phase_weight": -1.0}, r"FDLLoss: phase_weight must be a finite number >= 0, got -1.0"),
    ({"phase_weight": float("nan")}, r"FDLLoss: phase_weight must be a finite number >= 0, got nan"),
    ({"pixel_weight": -0.1}, r"FDLLoss: pixel_weight must be a finite number >= 0 \(the weight of the pixel L1 term, 0 = none\), got -0.1"),
    ({"layers": ()}, "FDLLoss: layers must name at least one layer"),
    ({"layers": ("relu1_2", "relu1_2")}, "FDLLoss: layers has repeats"),
    ({"layers": ("relu9_9",)}, "unknown layer"),
    ({"backend": "gpu"}, "FDLLoss: backend: unknown backend 'gpu'"),
    ({"input_range": (0, 255)}, r"FDLLoss: input_range must be \(0, 1\) or \(-1, 1\), got \(0, 255\)"),
    ({"compute_dtype": torch.float16}, "FDLLoss: compute_dtype must be None or torch.bfloat16"),
    ({"extractor": "resnet"}, "FDLLoss: extractor must be 'vgg16', 'vgg19' or an nn.Module, got 'resnet'"),
    ({"seed": 1.5}, "FDLLoss: seed must be an int, got 1.5"),
    ({"channels": (1, 2, 3, 4, 5)}, r"FDLLoss: channels=\(1, 2, 3, 4, 5\) does not match vgg19's"),
    ({"extractor": torch.nn.Identity()}, "FDLLoss: a custom extractor needs channels="),
    ({"extractor": torch.nn.Identity(), "layers": ("a",), "channels": (0,)}, "FDLLoss: channels must be one int >= 1"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_patch_larger_than_a_layer_map_names_the_layer_before_any_kernel(monkeypatch):
    crit = make()
    calls = []
    monkeypatch.setattr(fastloss.features.VGG, "forward", lambda *a: calls.append(1))
    u = torch.rand(1, 3, 64, 100)
    with pytest.raises(ValueError, match=r"FDLLoss: patch_size=5 is larger than layer relu5_4's feature map, "
                                         r"4 x 6 \(images 64 x 100\)"):
        crit(u, u)
    crit = make(layers=("relu1_2", "relu2_2"), patch_size=7)
    with pytest.raises(ValueError, match=r"patch_size=7 is larger than layer relu2_2's feature map, 6 x 10"):
        crit(u[..., :12, :20], u[..., :12, :20])
    assert calls == []  # raised before the backbone (and every kernel) ran


def test_patch_larger_than_a_custom_extractor_map():
    ext = torch.nn.Identity()
    crit = make(extractor=ext, layers=("x",), channels=(3,), patch_size=5)
    u = torch.rand(1, 3, 4, 9)
    with pytest.raises(ValueError, match=r"FDLLoss: patch_size=5 is larger than layer x's feature map, 4 x 9"):
        crit(u, u)


@pytest.mark.parametrize("u,v,exc,match", [
    (torch.rand(1, 3, 16, 16).int(), torch.rand(1, 3, 16, 16), TypeError, "FDLLoss: restored must be a floating-point"),
    (torch.rand(3, 16, 16), torch.rand(3, 16, 16), ValueError, r"FDLLoss: restored must be \(B, 3, H, W\)"),
    (torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), ValueError, "FDLLoss: restored must have 3 channels"),
    (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 14), ValueError, "FDLLoss: restored and clean shapes differ"),
    (np.zeros((1, 3, 16, 16)), torch.rand(1, 3, 16, 16), TypeError, "FDLLoss: restored is a numpy array"),
])
def test_bad_images(u, v, exc, match):
    with pytest.raises(exc, match=match):
        make(layers=("relu1_2",))(u, v)


def test_images_out_of_range_warn():
    with pytest.warns(UserWarning, match=r"FDLLoss: images range over .*divide by 255"):
        make(layers=("relu1_2",))(torch.rand(1, 3, 16, 16) * 255, torch.rand(1, 3, 16, 16) * 255)


def test_custom_extractor_with_the_wrong_channels():
    crit = make(extractor=torch.nn.Identity(), layers=("x",), channels=(4,), patch_size=3)
    u = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"FDLLoss: layer x's features have shape \(1, 3, 8, 8\), expected \(B, 4, H, W\)"):
        crit(u, u)


def test_op_bad_inputs():
    x = torch.rand(1, 2, 6, 6)
    with pytest.raises(ValueError, match=r"fdl: filters must be \(K, 2, k, k\)"):
        fdl(x, x, torch.rand(3, 4, 3, 3))
    with pytest.raises(ValueError, match=r"fdl: patch_size=7 is larger than the feature map, 6 x 6"):
        fdl(x, x, torch.rand(3, 2, 7, 7))
    with pytest.raises(ValueError, match="fdl: stride must be an int >= 1, got 0"):
        fdl(x, x, torch.rand(3, 2, 3, 3), stride=0)
    with pytest.raises(ValueError, match="fdl: phase_weight must be >= 0, got -1"):
        fdl(x, x, torch.rand(3, 2, 3, 3), phase_weight=-1)
    with pytest.raises(ValueError, match="fdl: pred and target shapes differ"):
        fdl(x, x[..., :5], torch.rand(3, 2, 3, 3))
    with pytest.raises(TypeError, match="fdl: pred must be a floating-point tensor"):
        fdl(x.int(), x.int(), torch.rand(3, 2, 3, 3))
