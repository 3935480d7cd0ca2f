"""What the ops of every loss share: the backend table's row type, how a row calls the compiled
extensions and the Triton kernels, the accumulation dtype, the CUDA stream and device guard, the
interpreter check, autocast control, and the pred / target pair check.

Each loss's ``ops.py`` holds ONE table ``IMPLS = {backend: Impl(...)}``: the ``reference`` row is
plain PyTorch, the others call ``_C`` (``cpu``), ``kernels/<loss>.py`` (``triton``) or
``_C_cuda`` (``cuda``). The dispatch (``_backend.resolve``) picks the row; nothing else in an op
module asks which backend it runs on.
"""
import contextlib
import dataclasses
import importlib
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _ext


@dataclasses.dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op: ``forward`` / ``backward`` and the op's extra hooks
    (``extra``), the dtypes it takes, and ``promote``: dtypes that ``backend="auto"`` runs on this
    backend after a cast (``{torch.float16: torch.float32}``) instead of falling back.
    ``formula``: the row is the plain-PyTorch formula, differentiated by autograd (``reference``),
    not the fused op."""

    forward: Optional[Callable] = None
    backward: Optional[Callable] = None
    formula: bool = False
    dtypes: Tuple[torch.dtype, ...] = _backend.FLOAT_DTYPES
    promote: Dict[torch.dtype, torch.dtype] = dataclasses.field(default_factory=dict)
    extra: Dict[str, Callable] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name):  # the op's own hooks: impl.rows_combine(...), impl.insert(...)
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)


def dtypes(impls):
    """``{backend: dtypes}`` of a table, as ``_backend.resolve`` takes it."""
    return {name: impl.dtypes for name, impl in impls.items()}


def select(op, impls, backend, device, dtype):
    """``(backend name, dtype to run in)`` for a call: ``_backend.resolve`` over the table's dtypes,
    except that ``auto`` runs a dtype that a row of the device's automatic order ``promote``s on
    that row, after the cast, rather than falling back in the input's own dtype."""
    for name, impl in impls.items():
        if dtype in impl.promote and _promotes(op, name, backend, device, impl.promote[dtype]):
            return name, impl.promote[dtype]
    return _backend.resolve(op, backend, device, dtype, dtypes=dtypes(impls)), dtype


@torch.compiler.assume_constant_result  # like _backend.resolve: decided once at trace time
def _promotes(op: str, name: str, backend: str, device: torch.device, promoted: torch.dtype) -> bool:
    return (_backend.requested(backend, op) == "auto" and name in _backend.AUTO_ORDER.get(device.type, ())
            and _backend.why_not(name, device, promoted) is None)


# --------------------------------------------------------------------------- calling a backend
def stream(t: Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as the CUDA extension's launchers take it."""
    return torch.cuda.current_stream(t.device).cuda_stream


def cpu(fn: str) -> Callable:
    """A call of ``fastloss._C.<fn>`` (the build hint if it was not built)."""
    def call(*args):
        return getattr(_ext.require("_C", fn), fn)(*args)
    call.__name__ = call.__qualname__ = f"_C.{fn}"
    return call


def cuda(fn: str, stream_at: int = -1) -> Callable:
    """A call of ``fastloss._C_cuda.<fn>`` with the current stream of the first tensor argument
    inserted at position ``stream_at`` (default: last)."""
    def call(*args):
        first = next(a for a in args if isinstance(a, Tensor) or isinstance(a, (list, tuple)))
        s = stream(first if isinstance(first, Tensor) else first[0])
        args = list(args)
        args.insert(len(args) if stream_at == -1 else stream_at, s)
        return getattr(_ext.require("_C_cuda", fn), fn)(*args)
    call.__name__ = call.__qualname__ = f"_C_cuda.{fn}"
    return call


def triton(module: str, fn: str) -> Callable:
    """A call of ``fastloss.kernels.<module>.<fn>``, imported on first use (triton is optional),
    under the interpreter's launch lock."""
    def call(*args):
        kernels = importlib.import_module(f"fastloss.kernels.{module}")
        with _backend.triton_launch_guard():
            return getattr(kernels, fn)(*args)
    call.__name__ = call.__qualname__ = f"kernels.{module}.{fn}"
    return call


# --------------------------------------------------------------------------- device caches
def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class DeviceCache:
    """Small device tensors the kernels read (shape tables, scalars), built once per key instead
    of once per call, at most ``max_entries`` of them, except those a CUDA graph may read: a graph
    captured with a launch reads that tensor's memory on every replay, so an entry used while the
    stream was capturing is pinned for the life of the process (freed, its memory would go back
    to the allocator and a replay would read whatever took it). A full cache drops its unpinned
    entries. A miss while capturing is built and not cached: its contents would exist only once
    the graph replays."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries = {}
        self.pinned = set()

    def get(self, key, build: Callable, capturing: bool):
        hit = self.entries.get(key)
        if hit is None:
            if capturing:
                return build()
            if len(self.entries) >= self.max_entries:
                for k in [k for k in self.entries if k not in self.pinned]:
                    del self.entries[k]
            hit = self.entries[key] = build()
        if capturing:
            self.pinned.add(key)
        return hit


# --------------------------------------------------------------------------- shared helpers
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_guard(t: Tensor):
    """Triton launches on the current CUDA device: make it ``t``'s."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def interpreting(kernel) -> bool:
    """Whether a ``triton.jit`` kernel runs under the interpreter (decided at decoration time, so
    ask the kernel rather than the environment)."""
    return type(kernel).__name__ == "InterpretedFunction"


def autocast_off(device: torch.device):
    """Autocast off inside a loss formula: the kernels take one dtype, and the formula's products
    must not drop to bfloat16 / float16 under the caller's autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def check_pair(op: str, pred, target, names=("pred", "target"), min_dim: int = 1, what: str = ""):
    """Both tensors, floating point, one dtype, one device, one non-empty shape of at least
    ``min_dim`` dims (``what`` describes the expected shape in the message)."""
    pn, tn = names
    for name, t in ((pn, pred), (tn, target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if pred.dtype != target.dtype:
        raise TypeError(f"{op}: {pn} and {tn} dtypes differ: {pred.dtype} vs {target.dtype}")
    if pred.device != target.device:
        raise ValueError(f"{op}: {pn} and {tn} are on different devices: {pred.device} vs {target.device}")
    if pred.dim() < min_dim:
        raise ValueError(f"{op}: {pn} must {what or f'have at least {min_dim} dims'}, got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{op}: {pn} and {tn} shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"{op}: {pn} is empty, shape {tuple(pred.shape)}")
