"""fastloss.features: torchvision-compatible layout, truncation, weights loading, frozen-ness."""
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastloss.features import VGG, layer_names, vgg16, vgg19

# Written out again here (not imported) so the test checks the module against torchvision's cfgs.
CFG = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def expected_layout(arch):
    """[(index, name, module type, weight shape or None)] as torchvision's make_layers builds it."""
    out, idx, block, conv, cin = [], 0, 1, 0, 3
    for v in CFG[arch]:
        if v == "M":
            out.append((idx, f"pool{block}", nn.MaxPool2d, None))
            idx, block, conv = idx + 1, block + 1, 0
        else:
            conv += 1
            out.append((idx, f"conv{block}_{conv}", nn.Conv2d, (v, cin, 3, 3)))
            out.append((idx + 1, f"relu{block}_{conv}", nn.ReLU, None))
            idx, cin = idx + 2, v
    return out


def torchvision_state_dict(arch, upto, seed=0):
    """Random torchvision-format state dict with the features up to index `upto`, plus a
    classifier key that the loader must ignore."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for idx, _, typ, wshape in expected_layout(arch):
        if idx > upto:
            break
        if typ is nn.Conv2d:
            sd[f"features.{idx}.weight"] = torch.randn(wshape, generator=g) * 0.05
            sd[f"features.{idx}.bias"] = torch.randn(wshape[0], generator=g) * 0.05
    sd["classifier.0.weight"] = torch.randn(7, 5, generator=g)
    return sd


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_layout_matches_torchvision(arch):
    exp = expected_layout(arch)
    assert list(layer_names(arch)) == [name for _, name, _, _ in exp]
    last = exp[-1][1]
    assert last == "pool5"
    m = VGG(arch, layers=(last,))
    assert len(m.features) == len(exp)
    for idx, name, typ, _ in exp:
        mod = m.features[idx]
        assert type(mod) is typ, (idx, name, mod)
        if typ is nn.Conv2d:
            assert mod.kernel_size == (3, 3) and mod.padding == (1, 1) and mod.stride == (1, 1)
        elif typ is nn.ReLU:
            assert mod.inplace is False
        else:
            assert mod.kernel_size == 2 and mod.stride == 2
    sd = m.state_dict()
    want = {}
    for idx, _, typ, wshape in exp:
        if typ is nn.Conv2d:
            want[f"features.{idx}.weight"] = wshape
            want[f"features.{idx}.bias"] = (wshape[0],)
    # exactly torchvision's keys: buffers for the normalisation are not persistent
    assert {k: tuple(v.shape) for k, v in sd.items()} == want


def test_vgg19_named_layers():
    names = layer_names("vgg19")
    assert names.index("conv3_4") == 16 and names.index("conv4_4") == 25
    assert names.index("conv5_4") == 34 and names.index("pool5") == 36
    assert "conv3_4" not in layer_names("vgg16")
    assert layer_names("vgg16").index("relu4_3") == 22


def test_truncation_and_shapes():
    m = vgg16(layers=("relu2_2", "relu1_2"))
    names = layer_names("vgg16")
    assert len(m.features) == names.index("relu2_2") + 1 == 9
    assert isinstance(m.features[-1], nn.ReLU)
    assert len(m.state_dict()) == 8  # 4 convs, weight + bias each; nothing deeper is held
    x = torch.rand(1, 3, 32, 32)
    out = m(x)
    assert list(out) == ["relu2_2", "relu1_2"]  # requested order, not network order
    assert out["relu1_2"].shape == (1, 64, 32, 32)
    assert out["relu2_2"].shape == (1, 128, 16, 16)

    m19 = vgg19(layers=("conv5_4", "pool3"))
    assert len(m19.features) == 35
    out = m19(x)
    assert out["conv5_4"].shape == (1, 512, 2, 2)
    assert out["pool3"].shape == (1, 256, 4, 4)


def reference_features(m, arch, x, normalize):
    """Hand-written composition of F.conv2d / relu / max_pool2d with the module's weights."""
    if normalize:
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = {}
    for idx, name, typ, _ in expected_layout(arch):
        if idx >= len(m.features):
            break
        if typ is nn.Conv2d:
            x = F.conv2d(x, m.features[idx].weight, m.features[idx].bias, padding=1)
        elif typ is nn.ReLU:
            x = F.relu(x)
        else:
            x = F.max_pool2d(x, 2, 2)
        out[name] = x
    return out


@pytest.mark.parametrize("arch,layers", [
    ("vgg16", ("conv1_1", "relu1_2", "pool1", "conv2_2", "relu3_3")),
    ("vgg19", ("relu1_1", "conv3_4", "relu4_4", "conv5_4")),
])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_hand_written_composition(arch, layers, normalize):
    torch.manual_seed(0)
    m = VGG(arch, layers=layers, normalize=normalize)
    x = torch.rand(2, 3, 32, 32)
    got = m(x)
    ref = reference_features(m, arch, x, normalize)
    assert list(got) == list(layers)
    for name in layers:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5)
    # a conv output is returned before the ReLU after it (no in-place ReLU clobbering it)
    conv_name = next(n for n in layers if n.startswith("conv"))
    assert (got[conv_name] < 0).any()


def test_random_init_is_deterministic():
    torch.manual_seed(123)
    a = vgg16(layers="relu2_1")
    torch.manual_seed(123)
    b = vgg16(layers="relu2_1")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_weights_round_trip_torch_save(tmp_path):
    upto = layer_names("vgg16").index("relu3_3")
    sd = torchvision_state_dict("vgg16", upto)
    path = tmp_path / "vgg16_features.pth"
    torch.save(sd, path)
    for weights in (path, str(path)):  # os.PathLike and str
        m = vgg16(layers=("relu3_3",), weights=weights)
        got = m.state_dict()
        assert set(got) == {k for k in sd if k.startswith("features.")}
        for k, v in got.items():
            assert torch.equal(v, sd[k]), k
        assert all(not p.requires_grad for p in m.parameters())


def test_weights_ignores_deeper_features_keys(tmp_path):
    sd = torchvision_state_dict("vgg19", layer_names("vgg19").index("relu3_4"))
    path = tmp_path / "vgg19.pth"
    torch.save(sd, path)
    m = vgg19(layers="relu2_2", weights=path)
    assert torch.equal(m.features[7].weight, sd["features.7.weight"])


def test_weights_round_trip_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = torchvision_state_dict("vgg19", layer_names("vgg19").index("relu2_2"), seed=1)
    path = tmp_path / "vgg19.safetensors"
    st.save_file(sd, str(path))
    m = vgg19(layers=("relu2_2",), weights=path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_weights_torchvision_from_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints"
    assert os.path.realpath(torch.hub.get_dir()) == os.path.realpath(tmp_path / "hub")
    ckpt.mkdir(parents=True)
    sd = torchvision_state_dict("vgg16", layer_names("vgg16").index("relu1_2"), seed=2)
    torch.save(sd, ckpt / "vgg16-397923af.pth")
    m = vgg16(layers="relu1_2", weights="torchvision")
    assert torch.equal(m.features[2].weight, sd["features.2.weight"])


# ---- errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as ei:
        vgg16(layers="relu1_1", weights=path)
    assert str(path) in str(ei.value) and "weights" in str(ei.value)


def _garbage_is_refused_naming_the_file(path, garbage):
    path.write_bytes(garbage)
    with pytest.raises(ValueError) as ei:
        vgg16(layers="relu1_1", weights=path)
    assert str(path) in str(ei.value)


def test_corrupt_file(tmp_path):
    _garbage_is_refused_naming_the_file(tmp_path / "garbage.pth", b"\x00\x01not a checkpoint\xff" * 20)


def test_corrupt_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    _garbage_is_refused_naming_the_file(tmp_path / "garbage.safetensors", b"\xff" * 64)


def test_not_a_dict_of_tensors(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="list"):
        vgg16(layers="relu1_1", weights=path)
    path2 = tmp_path / "ints.pth"
    torch.save({"features.0.weight": 3}, path2)
    with pytest.raises(ValueError, match="not a dict of tensors"):
        vgg16(layers="relu1_1", weights=path2)


def test_wrong_shape_key(tmp_path):
    sd = torchvision_state_dict("vgg16", layer_names("vgg16").index("relu2_2"))
    sd["features.5.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as ei:
        vgg16(layers="relu2_2", weights=path)
    msg = str(ei.value)
    assert "features.5.weight" in msg and "(128, 64, 1, 1)" in msg and "(128, 64, 3, 3)" in msg
    # the same file is fine for a shallower request that does not need features.5
    vgg16(layers="relu1_2", weights=path)


def test_missing_key(tmp_path):
    sd = torchvision_state_dict("vgg16", layer_names("vgg16").index("relu2_2"))
    del sd["features.7.bias"]
    path = tmp_path / "short.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"features\.7\.bias"):
        vgg16(layers="relu2_2", weights=path)


def test_unknown_layer():
    with pytest.raises(ValueError) as ei:
        vgg16(layers=("relu2_2", "conv3_4"))
    msg = str(ei.value)
    assert "conv3_4" in msg and "relu4_3" in msg and "pool5" in msg  # lists valid names
    with pytest.raises(ValueError, match="arch"):
        VGG("vgg11")


def test_torchvision_weights_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for fn, fname in ((vgg16, "vgg16-397923af.pth"), (vgg19, "vgg19-dcbb9e9d.pth")):
        with pytest.raises(FileNotFoundError) as ei:
            fn(layers="relu1_1", weights="torchvision")
        msg = str(ei.value)
        assert fname in msg
        assert os.path.join(str(tmp_path), "hub", "checkpoints") in msg
        assert "https://download.pytorch.org/models/" + fname in msg
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing created


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _EvilOpen:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload", [_Evil, _EvilOpen])
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, payload, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"features.0.weight": payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(ValueError) as ei:
        vgg16(layers="relu1_1", weights=path)
    assert str(path) in str(ei.value)
    assert not marker.exists()


# ---- frozen -------------------------------------------------------------------------------


def test_frozen_eval_and_input_grad():
    m = vgg16(layers=("relu1_2", "relu2_2"))
    assert all(not p.requires_grad for p in m.parameters())
    assert not m.training
    assert m.train() is m and not m.training
    m.train(True)
    assert not m.training and not any(mod.training for mod in m.modules())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    out = m(x)
    (out["relu1_2"].sum() + out["relu2_2"].square().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


def test_bad_input_shape():
    m = vgg16(layers="relu1_1")
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\)"):
        m(torch.rand(1, 1, 8, 8))
