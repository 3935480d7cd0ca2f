"""MDF discriminator sets: the safe loader of the published files, the project's own format, convert.

A set is a list of SinGAN discriminators of the published architecture (width N per discriminator)::

    head        Conv2d(3, N, 3) -> BatchNorm2d(N) -> LeakyReLU(0.2)
    body.block1 Conv2d(N, N, 3) -> BatchNorm2d(N) -> LeakyReLU(0.2)      (block2, block3 alike)
    tail        Conv2d(N, 1, 3)                                            no activation

every conv 3x3, stride 1, no padding. ``MDFWeights`` holds the raw (unfolded) tensors of each
discriminator under its module path (``head.conv.weight``, ``body.block2.norm.running_var``,
``tail.bias``...), the widths, and the training metadata.

**The published files** (``Ds_JPEG.pth``, ``Ds_Denoising.pth``) are legacy (non-zip) ``torch.save``
pickles of whole ``nn.Module`` objects. ``load_published`` reads them without importing ``SinGAN``
and without running anything the file names:

- every pickle in the file is first scanned opcode by opcode (``pickletools.genops`` executes
  nothing); a global outside the allow-list below, or an opcode that could reach one unseen
  (``STACK_GLOBAL``, ``INST``, ``OBJ``, ``EXT*``), raises ``UnsafePickleError`` before any object is
  built;
- the unpickler then maps each allowed global to a stand-in defined here: module classes become
  inert records that keep only the known layer fields, ``_rebuild_tensor_v2`` / ``_rebuild_parameter``
  become functions that check bounds and build CPU views, ``OrderedDict`` stays ``OrderedDict``;
- the legacy ``('module', class, source file, source text)`` records give back the stand-in class
  (the source text is never compiled), ``('storage', type, key, location, numel, view)`` records
  become CPU tensors whatever device they name; their bytes are read after the pickles, with
  sizes checked against the file, so a truncated or corrupt file raises ``WeightFileError``.

**The project's format** is one safetensors file: tensors ``D{i}.{module path}`` plus string metadata
``format = "fastloss-mdf"``, ``format_version``, ``widths`` (JSON list), ``eps``, ``negative_slope``
and ``training`` (JSON: how the set was made). ``convert(src, dst)`` writes a published file in it.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import pickle
import pickletools
import sys
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import Tensor

__all__ = ["MDFWeights", "WeightFileError", "UnsafePickleError", "load", "load_published", "save", "convert",
           "SHIPPED", "shipped_path", "LAYERS", "tensor_names"]

FORMAT = "fastloss-mdf"
FORMAT_VERSION = "1"
LAYERS = ("head", "body.block1", "body.block2", "body.block3")  # conv -> norm -> LeakyReLU each
SHIPPED = ("denoise", "jpeg", "sisr")
_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

PathLike = Union[str, "os.PathLike[str]"]


class WeightFileError(ValueError):
    """A weight file is missing, truncated, corrupt, or not of a supported format or architecture."""


class WeightFileNotFoundError(WeightFileError, FileNotFoundError):
    """The weight file does not exist (both a ``WeightFileError`` and a ``FileNotFoundError``)."""


class UnsafePickleError(WeightFileError):
    """A pickle names a global (or uses an opcode) outside the loader's allow-list; nothing in it ran."""


def tensor_names(prefix: str = "") -> List[str]:
    """The tensor names of one discriminator, in network order (``prefix`` e.g. ``"D0."``)."""
    names = []
    for layer in LAYERS:
        names += [f"{layer}.conv.weight", f"{layer}.conv.bias", f"{layer}.norm.weight", f"{layer}.norm.bias",
                  f"{layer}.norm.running_mean", f"{layer}.norm.running_var"]
    names += ["tail.weight", "tail.bias"]
    return [prefix + n for n in names]


@dataclasses.dataclass
class MDFWeights:
    """A discriminator set: raw tensors per discriminator (float32, CPU), coarsest first."""

    discriminators: List[Dict[str, Tensor]]
    widths: Tuple[int, ...]
    eps: float = 1e-5
    negative_slope: float = 0.2
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""  # where it was loaded from, for messages

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        _check_set(self.discriminators, self.widths, self.source or "MDFWeights")

    def __len__(self):
        return len(self.discriminators)


def _check_set(discs, widths, where):
    if len(discs) == 0:
        raise WeightFileError(f"{where}: the set has no discriminators")
    if len(discs) != len(widths):
        raise WeightFileError(f"{where}: {len(discs)} discriminators but {len(widths)} widths")
    for i, (d, n) in enumerate(zip(discs, widths)):
        if n < 1:
            raise WeightFileError(f"{where}: discriminator {i} has width {n}")
        expected = {}
        for layer in LAYERS:
            cin = 3 if layer == "head" else n
            expected[f"{layer}.conv.weight"] = (n, cin, 3, 3)
            for t in ("conv.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"):
                expected[f"{layer}.{t}"] = (n,)
        expected["tail.weight"] = (1, n, 3, 3)
        expected["tail.bias"] = (1,)
        missing = sorted(set(expected) - set(d))
        extra = sorted(set(d) - set(expected))
        if missing or extra:
            raise WeightFileError(f"{where}: discriminator {i}: missing tensors {missing}, unexpected {extra}")
        for k, shape in expected.items():
            t = d[k]
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                raise WeightFileError(f"{where}: discriminator {i}: {k} has shape "
                                      f"{tuple(getattr(t, 'shape', ()))}, expected {shape} for width {n}")
            if not t.is_floating_point():
                raise WeightFileError(f"{where}: discriminator {i}: {k} has dtype {t.dtype}, expected floating point")


# ============================================================================ the published files
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

# The module classes a published file may name, and the fields each keeps (everything else is dropped).
_MODULE_FIELDS = {"training", "_parameters", "_buffers", "_modules"}
_MODULE_CLASSES = {
    ("SinGAN.models", "WDiscriminator"): ("WDiscriminator", set()),
    ("SinGAN.models", "ConvBlock"): ("ConvBlock", set()),
    ("torch.nn.modules.container", "Sequential"): ("Sequential", set()),
    ("torch.nn.modules.conv", "Conv2d"): ("Conv2d", {"in_channels", "out_channels", "kernel_size", "stride",
                                                     "padding", "dilation", "transposed", "output_padding",
                                                     "groups", "padding_mode"}),
    ("torch.nn.modules.batchnorm", "BatchNorm2d"): ("BatchNorm2d", {"num_features", "eps", "momentum", "affine",
                                                                   "track_running_stats"}),
    ("torch.nn.modules.activation", "LeakyReLU"): ("LeakyReLU", {"negative_slope", "inplace"}),
}

# Opcodes that can bring in a global the scan cannot see by name, or out-of-band data.
_FORBIDDEN_OPCODES = {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEWOBJ_EX", "PERSID",
                      "NEXT_BUFFER", "READONLY_BUFFER"}


class _ModuleRecord:
    """Inert stand-in for a pickled module: ``kind`` and the known fields of its ``__dict__``."""

    kind = "?"
    fields: frozenset = frozenset()

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise WeightFileError(f"{self.kind}: pickled state is a {type(state).__name__}, expected a dict")
        self.state = {k: v for k, v in state.items() if k in _MODULE_FIELDS or k in self.fields}

    def child(self, name, kind, where):
        modules = self.state.get("_modules") or {}
        c = modules.get(name)
        if not isinstance(c, _ModuleRecord) or c.kind != kind:
            got = c.kind if isinstance(c, _ModuleRecord) else type(c).__name__
            raise WeightFileError(f"{where}: expected a {kind} at '{name}', found {got}")
        return c

    def tensor(self, group, name, where):
        t = (self.state.get(group) or {}).get(name)
        if not isinstance(t, Tensor):
            raise WeightFileError(f"{where}: {self.kind} has no tensor '{name}'")
        return t


_RECORD_CLASSES = {key: type(f"_{kind}Record", (_ModuleRecord,), {"kind": kind, "fields": frozenset(fields)})
                   for key, (kind, fields) in _MODULE_CLASSES.items()}


class _StorageType:
    def __init__(self, name):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Storage:
    """A CPU tensor [numel] that the file's data section fills after unpickling."""

    def __init__(self, key, dtype, numel, data=None):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data = torch.empty(numel, dtype=dtype) if data is None else data


def _is_int_tuple(v):
    return isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: a bounds-checked CPU view of the storage."""
    if not isinstance(storage, _Storage):
        raise WeightFileError(f"tensor record: storage is a {type(storage).__name__}, not a storage record")
    if not (isinstance(storage_offset, int) and storage_offset >= 0 and _is_int_tuple(size)
            and _is_int_tuple(stride) and len(size) == len(stride)):
        raise WeightFileError(f"tensor record: bad offset/size/stride {storage_offset!r}, {size!r}, {stride!r}")
    if any(s == 0 for s in size):
        ok = storage_offset <= storage.numel
    else:
        ok = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) < storage.numel
    if not ok:
        raise WeightFileError(f"tensor record: size {size} / stride {stride} at offset {storage_offset} runs past "
                              f"its storage of {storage.numel} elements")
    return storage.data.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter: the plain tensor (the sets are frozen)."""
    if not isinstance(data, Tensor):
        raise WeightFileError(f"parameter record: data is a {type(data).__name__}, not a tensor")
    return data


def _ordered_dict(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
        raise WeightFileError("OrderedDict record: unexpected arguments")
    return collections.OrderedDict(*args)


_SAFE_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    **_RECORD_CLASSES,
}


class _Context:
    """State shared by the pickles of one file: its storages, and the bytes the data section holds."""

    def __init__(self, where, data_bytes):
        self.where, self.data_bytes = where, data_bytes
        self.storages: Dict[str, _Storage] = {}

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or not isinstance(pid[0], str):
            raise WeightFileError(f"{self.where}: bad persistent record {type(pid).__name__}")
        if pid[0] == "module":
            # ('module', class, source file, source text): the legacy format's check that the class
            # source did not change. Only the class matters, and it is already a stand-in.
            if len(pid) != 4 or not (isinstance(pid[1], type) and issubclass(pid[1], _ModuleRecord)):
                raise WeightFileError(f"{self.where}: bad module record")
            return pid[1]
        if pid[0] == "storage":
            if len(pid) != 6:
                raise WeightFileError(f"{self.where}: storage record has {len(pid)} fields, expected 6")
            _, stype, key, location, numel, view = pid
            if not (isinstance(stype, _StorageType) and isinstance(key, str) and isinstance(location, str)
                    and isinstance(numel, int) and numel >= 0):
                raise WeightFileError(f"{self.where}: bad storage record {key!r}")
            nbytes = numel * torch.empty((), dtype=stype.dtype).element_size()
            if nbytes > self.data_bytes:
                raise WeightFileError(f"{self.where}: storage {key!r} claims {nbytes} bytes but the file has only "
                                      f"{self.data_bytes} bytes of tensor data (truncated or corrupt)")
            st = self.storages.get(key)
            if st is None:
                st = self.storages[key] = _Storage(key, stype.dtype, numel)  # on CPU, whatever `location` says
            elif st.dtype != stype.dtype or st.numel != numel:
                raise WeightFileError(f"{self.where}: storage {key!r} is declared twice with different types")
            if view is None:
                return st
            if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[1], int)
                    and isinstance(view[2], int) and 0 <= view[1] <= view[1] + view[2] <= numel):
                raise WeightFileError(f"{self.where}: bad storage view {view!r} of {key!r}")
            return _Storage(view[0], st.dtype, view[2], st.data[view[1]:view[1] + view[2]])
        raise WeightFileError(f"{self.where}: unknown persistent record type {pid[0]!r}")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, ctx):
        super().__init__(f)
        self._ctx = ctx

    def find_class(self, module, name):
        obj = _SAFE_GLOBALS.get((module, name))
        if obj is None:  # the scan already refused it; this is the second line
            raise UnsafePickleError(f"{self._ctx.where}: refusing global {module}.{name}")
        return obj

    def persistent_load(self, pid):
        return self._ctx.persistent_load(pid)


def _scan(buf: io.BytesIO, where: str, what: str):
    """Walk one pickle's opcodes without executing any; refuse unknown globals. Returns end offset."""
    start = buf.tell()
    try:
        for op, arg, pos in pickletools.genops(buf):
            if op.name in _FORBIDDEN_OPCODES:
                raise UnsafePickleError(f"{where}: the {what} pickle uses opcode {op.name} at byte {pos}, which the "
                                        "safe loader does not allow; nothing was loaded")
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if (module, name) not in _SAFE_GLOBALS:
                    raise UnsafePickleError(
                        f"{where}: the {what} pickle names global {module}.{name} (byte {pos}), which is not a "
                        "tensor, storage or known layer of the published MDF discriminators; refusing to load it "
                        "(nothing in the file was executed)")
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or corrupt pickle stream
        raise WeightFileError(f"{where}: the {what} pickle at byte {start} is truncated or corrupt ({e})") from None
    return buf.tell()


def _unpickle(raw: bytes, start: int, ctx: _Context, what: str):
    try:
        return _RestrictedUnpickler(io.BytesIO(raw[start:]), ctx).load()
    except WeightFileError:
        raise
    except Exception as e:
        raise WeightFileError(f"{ctx.where}: cannot read the {what} pickle ({type(e).__name__}: {e})") from None


def _load_legacy_records(raw: bytes, where: str):
    """The object of a legacy torch.save file, with module records and CPU tensors in place of modules."""
    buf = io.BytesIO(raw)
    names = ("magic number", "protocol version", "system info", "main", "storage keys")
    bounds = []
    for what in names:  # scan every pickle before unpickling any
        start = buf.tell()
        if start >= len(raw):
            raise WeightFileError(f"{where}: truncated: the file ends before its {what} pickle")
        bounds.append((start, _scan(buf, where, what)))
    data_start = bounds[-1][1]
    ctx = _Context(where, len(raw) - data_start)
    magic = _unpickle(raw, bounds[0][0], ctx, names[0])
    if magic != _LEGACY_MAGIC:
        raise WeightFileError(f"{where}: not a legacy torch.save file (magic number {magic!r})")
    protocol = _unpickle(raw, bounds[1][0], ctx, names[1])
    if protocol != _LEGACY_PROTOCOL:
        raise WeightFileError(f"{where}: unsupported legacy protocol version {protocol!r}")
    sys_info = _unpickle(raw, bounds[2][0], ctx, names[2])
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False) or sys.byteorder != "little":
        raise WeightFileError(f"{where}: only little-endian files on little-endian machines are supported")
    obj = _unpickle(raw, bounds[3][0], ctx, names[3])
    keys = _unpickle(raw, bounds[4][0], ctx, names[4])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise WeightFileError(f"{where}: the storage key list is corrupt")
    if set(keys) != set(ctx.storages):
        raise WeightFileError(f"{where}: the storage key list does not match the storages the pickle uses")
    pos = data_start
    for key in keys:  # each: int64 element count, then the raw little-endian elements
        st = ctx.storages[key]
        if pos + 8 > len(raw):
            raise WeightFileError(f"{where}: truncated: the file ends before the data of storage {key!r}")
        numel = int.from_bytes(raw[pos:pos + 8], "little", signed=True)
        nbytes = st.numel * st.data.element_size()
        if numel != st.numel:
            raise WeightFileError(f"{where}: corrupt: storage {key!r} has {numel} elements in the data section, "
                                  f"{st.numel} in the pickle")
        if pos + 8 + nbytes > len(raw):
            raise WeightFileError(f"{where}: truncated: storage {key!r} needs {nbytes} bytes at byte {pos + 8}, "
                                  f"the file has {len(raw) - pos - 8}")
        if nbytes:
            chunk = torch.frombuffer(bytearray(raw[pos + 8:pos + 8 + nbytes]), dtype=torch.uint8)
            st.data.view(torch.uint8).copy_(chunk)
        pos += 8 + nbytes
    return obj


def _number(rec, field, where, kinds=(int, float)):
    v = rec.state.get(field)
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise WeightFileError(f"{where}: {rec.kind}.{field} is {v!r}")
    return v


def _conv(rec, cin, cout, where):
    expect = {"kernel_size": (3, 3), "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1,
              "transposed": False, "padding_mode": "zeros"}
    for k, v in expect.items():
        if rec.state.get(k, v) != v:
            raise WeightFileError(f"{where}: unsupported architecture: Conv2d.{k} is {rec.state.get(k)!r}, "
                                  f"expected {v!r}")
    w, b = rec.tensor("_parameters", "weight", where), rec.tensor("_parameters", "bias", where)
    if tuple(w.shape) != (cout, cin, 3, 3) or tuple(b.shape) != (cout,):
        raise WeightFileError(f"{where}: unsupported architecture: conv weight {tuple(w.shape)}, bias "
                              f"{tuple(b.shape)}, expected ({cout}, {cin}, 3, 3) and ({cout},)")
    return w, b


def _block(rec, cin, n, where):
    conv = rec.child("conv", "Conv2d", where)
    norm = rec.child("norm", "BatchNorm2d", where)
    act = rec.child("LeakyRelu", "LeakyReLU", where)
    w, b = _conv(conv, cin, n, where + ".conv")
    if not norm.state.get("affine", True) or not norm.state.get("track_running_stats", True):
        raise WeightFileError(f"{where}.norm: unsupported BatchNorm2d without affine or running statistics")
    t = {"conv.weight": w, "conv.bias": b}
    for k, group in (("weight", "_parameters"), ("bias", "_parameters"), ("running_mean", "_buffers"),
                     ("running_var", "_buffers")):
        t["norm." + k] = norm.tensor(group, k, where + ".norm")
    return t, float(_number(norm, "eps", where + ".norm")), float(_number(act, "negative_slope", where + ".LeakyRelu"))


def _discriminator(rec, index, where):
    where = f"{where}: discriminator {index}"
    if not isinstance(rec, _ModuleRecord) or rec.kind != "WDiscriminator":
        got = rec.kind if isinstance(rec, _ModuleRecord) else type(rec).__name__
        raise WeightFileError(f"{where} is a {got}, expected a WDiscriminator")
    head = rec.child("head", "ConvBlock", where)
    w = head.child("conv", "Conv2d", where + " head").tensor("_parameters", "weight", where)
    n = int(w.shape[0]) if w.dim() == 4 else 0
    out, eps, slope = {}, set(), set()
    body = rec.child("body", "Sequential", where)
    blocks = [k for k in (body.state.get("_modules") or {})]
    if blocks != ["block1", "block2", "block3"]:
        raise WeightFileError(f"{where}: unsupported architecture: body blocks {blocks}, expected block1..block3")
    for layer in LAYERS:
        r = head if layer == "head" else body.child(layer.split(".")[1], "ConvBlock", where)
        t, e, s = _block(r, 3 if layer == "head" else n, n, f"{where} {layer}")
        out.update({f"{layer}.{k}": v for k, v in t.items()})
        eps.add(e)
        slope.add(s)
    tw, tb = _conv(rec.child("tail", "Conv2d", where), n, 1, where + " tail")
    out["tail.weight"], out["tail.bias"] = tw, tb
    return out, n, eps, slope


def load_published(path: PathLike) -> MDFWeights:
    """Load a published legacy ``.pth`` set safely (see the module docstring); tensors on CPU."""
    path = os.fspath(path)
    raw = _read(path)
    return _from_legacy(raw, path)


def _from_legacy(raw: bytes, where: str) -> MDFWeights:
    obj = _load_legacy_records(raw, where)
    if not isinstance(obj, list) or not obj:
        raise WeightFileError(f"{where}: expected a list of discriminators, found {type(obj).__name__}")
    discs, widths, eps, slope = [], [], set(), set()
    for i, rec in enumerate(obj):
        t, n, e, s = _discriminator(rec, i, where)
        discs.append({k: v.detach().to(torch.float32).contiguous() for k, v in t.items()})
        widths.append(n)
        eps |= e
        slope |= s
    if len(eps) != 1 or len(slope) != 1:
        raise WeightFileError(f"{where}: unsupported: BatchNorm eps {sorted(eps)} / LeakyReLU slopes {sorted(slope)} "
                              "differ between layers")
    meta = {"origin": "published", "file": os.path.basename(where), "sha256": hashlib.sha256(raw).hexdigest(),
            "paper": "Mustafa et al., Training a Task-Specific Image Reconstruction Loss, WACV 2022",
            "license": "BSD-3-Clause, (c) 2021 Graphics and Displays group, University of Cambridge"}
    return MDFWeights(discs, tuple(widths), eps.pop(), slope.pop(), meta, where)


# ============================================================================ the project's format
def save(weights: MDFWeights, dst: PathLike) -> None:
    """Write ``weights`` in the project's format (safetensors + widths + training metadata)."""
    from safetensors.torch import save as st_save

    tensors = {}
    for i, d in enumerate(weights.discriminators):
        for k in tensor_names():
            tensors[f"D{i}.{k}"] = d[k].detach().to("cpu", torch.float32).contiguous()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "widths": json.dumps(list(weights.widths)),
            "eps": repr(float(weights.eps)), "negative_slope": repr(float(weights.negative_slope)),
            "training": json.dumps(weights.metadata, sort_keys=True)}
    dst = os.fspath(dst)
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:  # open() rather than save_file: the usual permissions (umask)
        f.write(st_save(tensors, metadata=meta))
    os.replace(tmp, dst)


def _from_safetensors(raw: bytes, where: str) -> MDFWeights:
    from safetensors.torch import load as st_load

    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
        meta = header.get("__metadata__") or {}
        tensors = st_load(raw)
    except Exception as e:
        raise WeightFileError(f"{where}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT and any(k.startswith("features.") for k in header):
        raise WeightFileError(f"{where}: a VGG state dict in safetensors (features.0.weight, ...), not an MDF set; "
                              "pass it to PDLLoss or D2SMLoss as extractor_weights=")
    if meta.get("format") != FORMAT:
        raise WeightFileError(f"{where}: a safetensors file but not an MDF set (metadata format="
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightFileError(f"{where}: MDF format version {meta.get('format_version')!r}, this fastloss reads "
                              f"{FORMAT_VERSION!r}")
    try:
        widths = [int(w) for w in json.loads(meta["widths"])]
        eps, slope = float(meta["eps"]), float(meta["negative_slope"])
        training = json.loads(meta.get("training", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise WeightFileError(f"{where}: corrupt MDF metadata ({e})") from None
    discs = []
    for i in range(len(widths)):
        prefix = f"D{i}."
        discs.append({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    known = {f"D{i}.{k}" for i in range(len(widths)) for k in tensor_names()}
    extra = sorted(set(tensors) - known)
    if extra:
        raise WeightFileError(f"{where}: unexpected tensors {extra[:5]}")
    return MDFWeights([{k: v.float() for k, v in d.items()} for d in discs], tuple(widths), eps, slope,
                      training, where)


# ============================================================================ entry points
def shipped_path(name: str) -> str:
    """Path of a shipped set (``"denoise"``, ``"jpeg"``, ``"sisr"``)."""
    if name not in SHIPPED:
        raise ValueError(f"MDF: unknown shipped set {name!r}; expected one of {SHIPPED} or a path")
    return os.path.join(_DATA_DIR, f"{name}.safetensors")


def _read(path: str) -> bytes:
    if os.path.isdir(path):
        raise WeightFileError(f"MDF: weights={path!r} is a directory, expected a weight file")
    if not os.path.isfile(path):
        raise WeightFileNotFoundError(f"MDF: weights={path!r}: no such file (expected a path to a weight file "
                                      f"or one of the shipped sets {SHIPPED})")
    with open(path, "rb") as f:
        return f.read()


def load(weights: Union[str, "os.PathLike[str]", MDFWeights]) -> MDFWeights:
    """A set from a shipped name, a path in the project's format, or a path to a published ``.pth``."""
    if isinstance(weights, MDFWeights):
        return weights
    if isinstance(weights, str) and weights in SHIPPED:
        path = shipped_path(weights)
        if not os.path.isfile(path):
            raise WeightFileError(f"MDF: the shipped {weights!r} set is missing from the installation ({path})")
    elif isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
    else:
        raise TypeError(f"MDF: weights must be one of {SHIPPED}, a path or MDFWeights, got {type(weights).__name__}")
    raw = _read(path)
    if raw[:4] == b"PK\x03\x04":
        if b"features.0.weight" in raw[:1 << 20] or b"features.0.bias" in raw[:1 << 20]:
            raise WeightFileError(f"{path}: a VGG state dict (torchvision format, features.0.weight, ...), not an "
                                  "MDF discriminator set; it is an extractor's weights: pass it to PDLLoss or "
                                  "D2SMLoss as extractor_weights=, and give MDFLoss a shipped set or an MDF file")
        raise WeightFileError(f"{path}: a zip-format torch.save file; fastloss reads the published legacy .pth "
                              "files and its own safetensors format (see fastloss.mdf.convert)")
    if raw[:2] == b"\x80\x02":
        return _from_legacy(raw, path)
    if len(raw) >= 10 and raw[8:9] == b"{" and int.from_bytes(raw[:8], "little") <= len(raw) - 8:
        return _from_safetensors(raw, path)
    if len(raw) >= 9 and raw[8:9] == b"{":
        raise WeightFileError(f"{path}: truncated or corrupt safetensors file (the header runs past the end)")
    raise WeightFileError(f"{path}: not an MDF weight file (neither a legacy torch.save pickle nor safetensors; "
                          f"starts with {raw[:8]!r})")


def convert(src_pth: PathLike, dst: PathLike) -> MDFWeights:
    """Convert a published ``.pth`` set (loaded safely) into the project's format at ``dst``."""
    w = load_published(src_pth)
    save(w, dst)
    return w
