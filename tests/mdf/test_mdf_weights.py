"""MDF weight files: the safe loader of the published pickles, the project's format, convert.

Tests that read the published files skip only when ../shared/mdf-official is absent.
"""
import io
import json
import os
import pickle
import sys

import pytest
import torch

import fastloss
from fastloss.mdf import weights as W

from helpers import MDF_OFFICIAL as OFFICIAL
FILES = {"Ds_JPEG.pth": (32,) * 4 + (64,) * 4, "Ds_Denoising.pth": (32,) * 4 + (64,) * 4 + (128,)}
needs_official = pytest.mark.skipif(not os.path.isdir(OFFICIAL), reason="../shared/mdf-official is absent")


def official(name):
    return os.path.join(OFFICIAL, name)


def random_set(widths=(4, 4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    discs = []
    for n in widths:
        d = {}
        for layer in W.LAYERS:
            cin = 3 if layer == "head" else n
            d[f"{layer}.conv.weight"] = torch.randn(n, cin, 3, 3, generator=g) * 0.3
            d[f"{layer}.conv.bias"] = torch.randn(n, generator=g) * 0.1
            d[f"{layer}.norm.weight"] = torch.rand(n, generator=g) + 0.5
            d[f"{layer}.norm.bias"] = torch.randn(n, generator=g) * 0.1
            d[f"{layer}.norm.running_mean"] = torch.randn(n, generator=g) * 0.1
            d[f"{layer}.norm.running_var"] = torch.rand(n, generator=g) + 0.5
        d["tail.weight"] = torch.randn(1, n, 3, 3, generator=g) * 0.3
        d["tail.bias"] = torch.randn(1, generator=g) * 0.1
        discs.append(d)
    return W.MDFWeights(discs, widths, metadata={"origin": "test"})


# ---------------------------------------------------------------------------- the published files
@needs_official
@pytest.mark.parametrize("name", sorted(FILES))
def test_published_files_load_without_singan(name):
    before = set(sys.modules)
    w = fastloss.mdf.load(official(name))
    assert not [m for m in set(sys.modules) - before if m.split(".")[0] == "SinGAN"]
    assert "SinGAN" not in sys.modules
    assert w.widths == FILES[name] and len(w) == len(FILES[name])
    assert w.eps == 1e-5 and w.negative_slope == 0.2
    for d, n in zip(w.discriminators, w.widths):
        assert set(d) == set(W.tensor_names())
        for t in d.values():
            assert t.device.type == "cpu" and t.dtype == torch.float32 and torch.isfinite(t).all()
        assert d["head.conv.weight"].shape == (n, 3, 3, 3) and d["tail.weight"].shape == (1, n, 3, 3)
        assert (d["head.norm.running_var"] > 0).all()
    assert w.metadata["origin"] == "published" and len(w.metadata["sha256"]) == 64


@needs_official
def test_published_tensors_are_the_files_bytes():
    # The data section starts with the first listed storage: an int64 element count, then the
    # raw float32 values. Read it by hand; it must be one of the loaded tensors, bit for bit.
    import pickletools

    raw = open(official("Ds_JPEG.pth"), "rb").read()
    buf = io.BytesIO(raw)
    for _ in range(5):
        for _op in pickletools.genops(buf):
            pass
    pos = buf.tell()
    numel = int.from_bytes(raw[pos:pos + 8], "little")
    first = torch.frombuffer(bytearray(raw[pos + 8:pos + 8 + 4 * numel]), dtype=torch.float32)
    w = fastloss.mdf.load(official("Ds_JPEG.pth"))
    hits = [k for d in w.discriminators for k, t in d.items() if t.numel() == numel and torch.equal(t.flatten(), first)]
    assert len(hits) == 1, hits


# ---------------------------------------------------------------------------- malicious pickles
def _legacy(main_pickle: bytes, keys_pickle: bytes = None, sys_info=None) -> bytes:
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (pickle.dumps(W._LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + (sys_info if sys_info is not None else pickle.dumps(info, protocol=2)) + main_pickle
            + (keys_pickle if keys_pickle is not None else pickle.dumps([], protocol=2)))


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _WriteFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("where", ["main", "main-after-valid-objects", "sys_info", "storage-keys"])
@pytest.mark.parametrize("payload", ["os.system", "file-write"])
def test_malicious_pickle_is_rejected_without_side_effects(tmp_path, where, payload):
    marker = tmp_path / "pwned"
    evil = _System(f"touch {marker}") if payload == "os.system" else _WriteFile(str(marker))
    evil_bytes = pickle.dumps(evil, protocol=2)
    if where == "main":
        data = _legacy(evil_bytes)
    elif where == "main-after-valid-objects":
        from collections import OrderedDict

        data = _legacy(pickle.dumps([OrderedDict(a=1), [1, 2, 3], evil], protocol=2))
    elif where == "sys_info":
        data = _legacy(pickle.dumps([], protocol=2), sys_info=evil_bytes)
    else:
        data = _legacy(pickle.dumps([], protocol=2), keys_pickle=evil_bytes)
    path = tmp_path / "evil.pth"
    path.write_bytes(data)
    with pytest.raises(W.UnsafePickleError) as e:
        fastloss.mdf.load(path)
    msg = str(e.value)
    assert ("posix.system" in msg or "os.system" in msg or "io.open" in msg or "builtins.open" in msg), msg
    assert "refusing" in msg and "nothing" in msg
    assert not marker.exists()
    with pytest.raises(W.UnsafePickleError):
        fastloss.MDFLoss(str(path))
    assert not marker.exists()


@needs_official
def test_published_file_with_a_swapped_global_is_rejected(tmp_path):
    raw = open(official("Ds_JPEG.pth"), "rb").read()
    assert raw.count(b"SinGAN.models\nWDiscriminator\n") == 1
    bad = raw.replace(b"SinGAN.models\nWDiscriminator\n", b"posix\nsystem\n")
    p = tmp_path / "swapped.pth"
    p.write_bytes(bad)
    with pytest.raises(W.UnsafePickleError, match="posix.system"):
        fastloss.mdf.load(p)


def test_stack_global_and_inst_opcodes_are_refused(tmp_path):
    # Protocol 4 names globals from the stack (STACK_GLOBAL): the scan cannot see the name, so it refuses.
    p = tmp_path / "p4.pth"
    p.write_bytes(_legacy(pickle.dumps(_System("true"), protocol=4)))
    with pytest.raises(W.UnsafePickleError, match="STACK_GLOBAL"):
        fastloss.mdf.load(p)
    p.write_bytes(_legacy(b"(iposix\nsystem\nS'true'\n."))  # protocol 0 INST
    with pytest.raises(W.UnsafePickleError, match="INST"):
        fastloss.mdf.load(p)


# ---------------------------------------------------------------------------- truncated and corrupt
@needs_official
@pytest.mark.parametrize("cut", [10, 200, 30_000, 66_600, 80_000, 2_371_000])
def test_truncated_published_file_gives_a_clear_error(tmp_path, cut):
    raw = open(official("Ds_JPEG.pth"), "rb").read()
    p = tmp_path / "cut.pth"
    p.write_bytes(raw[:cut])
    with pytest.raises(W.WeightFileError, match="truncated"):
        fastloss.mdf.load(p)


@needs_official
def test_corrupt_published_files_give_clear_errors(tmp_path):
    raw = bytearray(open(official("Ds_JPEG.pth"), "rb").read())
    p = tmp_path / "bad.pth"
    # an unknown opcode in the middle of the main pickle
    bad = bytearray(raw)
    bad[5000] = 0xFF
    p.write_bytes(bytes(bad))
    with pytest.raises(W.WeightFileError, match="corrupt|cannot read|expected"):
        fastloss.mdf.load(p)
    # the element count of the first storage in the data section does not match the pickle
    buf = io.BytesIO(bytes(raw))
    import pickletools

    for _ in range(5):
        for _op in pickletools.genops(buf):
            pass
    pos = buf.tell()
    bad = bytearray(raw)
    bad[pos:pos + 8] = (12345).to_bytes(8, "little")
    p.write_bytes(bytes(bad))
    with pytest.raises(W.WeightFileError, match="corrupt: storage"):
        fastloss.mdf.load(p)


@pytest.mark.parametrize("data,match", [
    (b"", "not an MDF weight file"),
    (b"hello world, not a model", "not an MDF weight file"),
    (b"PK\x03\x04" + b"\0" * 40, "zip-format"),
    (b"\x80\x02", "truncated"),
    ((200).to_bytes(8, "little") + b'{"a": 1', "truncated or corrupt safetensors"),
])
def test_garbage_files_give_clear_errors(tmp_path, data, match):
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    with pytest.raises(W.WeightFileError, match=match):
        fastloss.mdf.load(p)


def test_missing_file_and_bad_names():
    with pytest.raises(W.WeightFileError, match="no such file"):
        fastloss.mdf.load("/nonexistent/Ds.pth")
    with pytest.raises(TypeError, match="weights must be"):
        fastloss.mdf.load(42)


# ---------------------------------------------------------------------------- the project's format
def test_safetensors_round_trip(tmp_path):
    w = random_set()
    p = tmp_path / "set.safetensors"
    fastloss.mdf.save(w, p)
    v = fastloss.mdf.load(p)
    assert v.widths == w.widths and v.eps == w.eps and v.negative_slope == w.negative_slope
    assert v.metadata == {"origin": "test"}
    for a, b in zip(w.discriminators, v.discriminators):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the file is plain safetensors with the metadata in its header
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "fastloss-mdf" and json.loads(meta["widths"]) == [4, 4, 6]


def test_truncated_and_foreign_safetensors(tmp_path):
    w = random_set()
    p = tmp_path / "set.safetensors"
    fastloss.mdf.save(w, p)
    raw = p.read_bytes()
    q = tmp_path / "cut.safetensors"
    q.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(W.WeightFileError, match="truncated or corrupt"):
        fastloss.mdf.load(q)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(q))
    with pytest.raises(W.WeightFileError, match="not an MDF set"):
        fastloss.mdf.load(q)


def test_weights_validation():
    w = random_set()
    bad = [dict(d) for d in w.discriminators]
    bad[1]["body.block2.conv.weight"] = torch.zeros(4, 4, 5, 5)
    with pytest.raises(W.WeightFileError, match="body.block2.conv.weight has shape"):
        W.MDFWeights(bad, w.widths)
    del bad[0]["tail.bias"]
    with pytest.raises(W.WeightFileError, match="missing tensors"):
        W.MDFWeights(bad, w.widths)


@needs_official
@pytest.mark.parametrize("name", sorted(FILES))
def test_convert_round_trip(tmp_path, name):
    dst = tmp_path / (name + ".safetensors")
    w = fastloss.mdf.convert(official(name), dst)
    v = fastloss.mdf.load(dst)
    assert v.widths == w.widths == FILES[name]
    assert v.metadata["origin"] == "published" and v.metadata["sha256"] == w.metadata["sha256"]
    for a, b in zip(w.discriminators, v.discriminators):
        assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 3, 16, 20)
    y = torch.rand(1, 3, 16, 20)
    a = fastloss.MDFLoss(official(name), backend="reference")(x, y)
    b = fastloss.MDFLoss(str(dst), backend="reference")(x, y)
    assert torch.equal(a, b)
