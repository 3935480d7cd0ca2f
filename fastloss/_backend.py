"""Backend selection, shared by every op.

Four backends, one name each:

- ``reference``: plain PyTorch, any device, autograd through torch ops (the ground truth).
- ``cpu``: the C++ extension ``fastloss._C`` (CPU tensors).
- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``cuda``: the CUDA C++ extension ``fastloss._C_cuda`` (CUDA tensors).

``backend="auto"`` (every op's default) takes, in order, the ``fastloss.use_backend(name)``
scope, then the ``FASTLOSS_BACKEND`` environment variable, then the first backend of
``AUTO_ORDER[device.type]`` that can run the input. auto never fails because a build is
missing: it falls back to ``reference`` and warns once, unless ``FASTLOSS_REQUIRE_EXT=1``
(CI's proof that the extension was really built and used), which makes that fallback an error.
A backend named explicitly that cannot run the input raises ``BackendError`` saying why.
"""
import contextlib
import contextvars
import os
import threading
import warnings

import torch

from . import _ext
from ._ext import BackendError  # noqa: F401  (raised by _ext.require too: one class)

BACKENDS = ("reference", "cpu", "triton", "cuda")
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_scope = contextvars.ContextVar("fastloss_backend", default=None)
_deterministic = [False]
_warned = set()
_warn_lock = threading.Lock()


def _check_name(name, what):
    if not isinstance(name, str) or (name not in BACKENDS and name != "auto"):
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {('auto',) + BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Run the ops inside this scope on backend ``name`` unless a call names its own."""
    token = _scope.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _scope.reset(token)


_cudnn_saved = []


def use_deterministic(flag=True):
    """Ask for bitwise-reproducible results (``torch.use_deterministic_algorithms(True)`` asks
    the same). fastloss's own kernels change nothing for it: none of them, on any backend,
    reduces with atomics (each reduces in a fixed order; tests/common/test_dispatch_gpu.py checks
    the sources), so they give the same bits run to run whether asked or not (the README says
    where that was checked). What is not fastloss's (cuDNN, cuBLAS) follows torch's settings.

    It also sets cuDNN's deterministic mode (``torch.backends.cudnn.deterministic = True``,
    ``benchmark = False``): the convolutions of MDF and of the VGG extractors, forward and
    backward, run through cuDNN, whose fastest algorithms are not all deterministic. The global
    flags are set because the backward runs outside any fastloss call; ``use_deterministic(False)``
    restores the values they had before."""
    flag = bool(flag)
    if flag and not _deterministic[0]:
        _cudnn_saved[:] = [torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif not flag and _deterministic[0] and _cudnn_saved:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = _cudnn_saved
        _cudnn_saved.clear()
    _deterministic[0] = flag


def deterministic():
    """Whether deterministic results were asked for, by fastloss or by torch."""
    return _deterministic[0] or torch.are_deterministic_algorithms_enabled()


def requested(backend, op="fastloss"):
    """The backend a call asks for: its keyword, else the scope, else FASTLOSS_BACKEND."""
    _check_name(backend, f"{op}: backend")
    if backend != "auto":
        return backend
    scoped = _scope.get()
    if scoped is not None and scoped != "auto":
        return scoped
    env = os.environ.get("FASTLOSS_BACKEND", "").strip()
    if env:
        return _check_name(env, "FASTLOSS_BACKEND")
    return "auto"


_interpreter_lock = threading.RLock()


def triton_launch_guard():
    """A lock around Triton launches under TRITON_INTERPRET=1, whose interpreter patches
    triton.language globally while a kernel runs and so cannot run two kernels at once; a
    no-op on the GPU."""
    return _interpreter_lock if _triton_interpret() else contextlib.nullcontext()


# Triton 3.x compiles for NVIDIA GPUs of compute capability 7.5 (Turing) and newer; on older ones
# it fails at compile time instead of running, so auto must not pick it there.
TRITON_MIN_CAPABILITY = (7, 5)


def _triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status(device=None):
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if torch.cuda.is_available() and not _triton_interpret():
        # the GPU the input is on (a machine may mix cards), else the current one
        gpu = device if device is not None and device.type == "cuda" else None
        cap = torch.cuda.get_device_capability(gpu)
        name = torch.cuda.get_device_name(gpu)
        if cap < TRITON_MIN_CAPABILITY:
            return False, (f"{name} has compute capability {cap[0]}.{cap[1]}; fastloss's Triton kernels need "
                           f"{TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} or newer (auto uses cuda or reference)")
        return True, f"triton {triton.__version__} on {name} (sm_{cap[0]}{cap[1]})"
    if _triton_interpret():
        return True, f"triton {triton.__version__}, CPU tensors under TRITON_INTERPRET=1"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"


def cpu_kernels():
    """The instruction set the cpu backend's PDL sort kernels run ("avx2" or "baseline"), or None
    without the C++ extension (or with one built before the choice existed)."""
    mod, _ = _ext.load("_C")
    return mod.cpu_isa() if mod is not None and hasattr(mod, "cpu_isa") else None


def _reference_status(device=None):
    return True, "plain PyTorch"


def _cpu_status(device=None):
    mod, why = _ext.load("_C")
    if mod is None:
        return False, why
    isa = f", PDL sort kernels: {cpu_kernels()}" if cpu_kernels() else ""
    return True, f"fastloss._C ({mod.compiler}{', OpenMP' if mod.openmp else ''}{isa}; {_ext.origin('_C')})"


def _cuda_status(device=None):
    mod, why = _ext.load("_C_cuda")
    if mod is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "fastloss._C_cuda is built but no CUDA device is available"
    return True, f"fastloss._C_cuda ({_ext.origin('_C_cuda')})"


# The backends: how to tell whether one is usable here, and which devices' tensors it takes
# (``device.type`` -> True, or a callable deciding at call time). Each loss's ops.py maps these
# names to its implementations (its ``IMPLS`` table).
_REGISTRY = {
    "reference": (_reference_status, None, "any"),
    "cpu": (_cpu_status, {"cpu": True}, "CPU tensors"),
    "triton": (_triton_status, {"cuda": True, "cpu": _triton_interpret},
               "CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"),
    "cuda": (_cuda_status, {"cuda": True}, "CUDA tensors"),
}


# status answers, computed once per key (_status_key): every op call asks, and the answer costs a
# triton import check, a GPU query and string formatting
_status_cache = {}
_EXT_OF = {"cpu": "_C", "cuda": "_C_cuda"}


def _status_key(name, device):
    """What a backend's status depends on, or None where it is not cached (a CUDA device given
    without an index: the current device, which can change)."""
    if name == "triton":
        if device is None or (device.type == "cuda" and device.index is None):
            return None
        return name, device.type, device.index, _triton_interpret()
    if name in _EXT_OF:  # the extension's load result (tests replace it) and, for cuda, a device
        return name, _ext._cache.get(_EXT_OF[name]), name == "cuda" and torch.cuda.is_available()
    return (name,)


def status(name, device=None):
    """``(available, reason)`` of one backend on this machine; ``device``: for the GPU the input
    is on (Triton's compute-capability floor is per card). Cached per device."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}")
    key = _status_key(name, device)
    hit = _status_cache.get(key) if key is not None else None
    if hit is None:
        hit = _REGISTRY[name][0](device)
        if key is not None:
            _status_cache[key] = hit
    return hit


def backends():
    """Each backend's availability on this machine and why: ``{name: {"available", "reason"}}``."""
    return {name: dict(zip(("available", "reason"), status(name))) for name in BACKENDS}


def why_not(name, device, dtype, dtypes=FLOAT_DTYPES):
    """Why backend ``name`` cannot run an input on ``device`` of ``dtype``; None if it can."""
    ok, reason = status(name, device)
    if not ok:
        return reason
    _, devices, what = _REGISTRY[name]
    takes = True if devices is None else devices.get(device.type, False)
    if not (takes() if callable(takes) else takes):
        return f"it takes {what}, got a tensor on {device}"
    if dtype not in dtypes:
        return f"it does not support {dtype} (supported: {', '.join(str(d) for d in dtypes)})"
    return None


def _warn_once(key, message):
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


@torch.compiler.assume_constant_result  # torch.compile runs it once at trace time
def resolve(op, backend, device, dtype, dtypes=None):
    """The backend that runs this call of ``op``; see the module docstring for the rules.

    ``dtypes`` maps a backend name to the dtypes it supports for this op (default: all floats).
    """
    dtypes = dtypes or {}
    name = requested(backend, op)
    if name != "auto":
        reason = why_not(name, device, dtype, dtypes.get(name, FLOAT_DTYPES))
        if reason is not None:
            raise BackendError(f"{op}: backend {name!r} cannot run this input: {reason}")
        return name
    reasons = {}
    order = AUTO_ORDER.get(device.type, ("reference",))  # fast backends first, reference last
    for candidate in order:
        reason = why_not(candidate, device, dtype, dtypes.get(candidate, FLOAT_DTYPES))
        if reason is None:
            if reasons:
                detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
                if candidate == order[-1] and os.environ.get("FASTLOSS_REQUIRE_EXT", "0") == "1":
                    if not any(status(b)[0] for b in order[:-1]):
                        raise BackendError(f"{op}: FASTLOSS_REQUIRE_EXT=1 but no fast backend for {device.type} "
                                           f"tensors is available ({detail})")
                _warn_once((op, device.type, tuple(reasons.items())),
                           f"{op}: falling back to backend {candidate!r} ({detail})")
            return candidate
        reasons[candidate] = reason
    raise BackendError(f"{op}: no backend can run this input: {reasons}")  # pragma: no cover
