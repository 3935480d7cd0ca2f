"""Loading the compiled extensions, once, thread-safely.

``load("_C")`` returns ``(module, None)`` or ``(None, reason)``; the reason says how to build it.
``require("_C", fn)`` returns the module or raises ``BackendError`` with that reason: every op
that calls an extension goes through it, so a missing build always reads as the build hint.
``origin("_C")`` says which build is in use. Two places are tried, in order:

1. the build installed with the package (``setup.py``), unless its ``_build_status.json`` says
   it was compiled against another torch than the one running;
2. the build of ``python -m fastloss.build`` for this Python, torch and sources (its cache).
"""
import importlib
import importlib.util
import os
import sys
import threading

BUILD_COMMAND = "python -m fastloss.build"  # fastloss.build.BUILD_COMMAND (imported lazily: `python -m` runs it)



class BackendError(RuntimeError):
    """A backend named explicitly cannot run this input (not built, wrong device, dtype)."""


_lock = threading.Lock()
_cache = {}
_origin = {}

_HOW_TO_BUILD = {
    "_C": f"run `{BUILD_COMMAND}` to compile it against this torch",
    "_C_cuda": (
        "it is built only when the installed torch has CUDA and a CUDA toolkit is found; "
        f"run `{BUILD_COMMAND}` on such a machine"
    ),
}


def origin(name):
    """Which build of ``fastloss.<name>`` is in use (a phrase with its path), or None."""
    load(name)
    return _origin.get(name)


def _load(name):
    import torch  # the extension links against libtorch

    from . import build as _build

    here = _build.PACKAGE_DIR
    status = _build.read_status(here) or {}
    info = status.get("extensions", {}).get(name, {})
    problems = []
    if status.get("torch") not in (None, torch.__version__):
        problems.append(f"the build installed with fastloss is for torch {status['torch']}, this is torch "
                        f"{torch.__version__}")
    else:
        try:
            mod = importlib.import_module("fastloss." + name)
            _origin[name] = f"built at install time, {mod.__file__}"
            return mod, None
        except ImportError as e:
            if info.get("built") is False:
                problems.append(f"the install-time build did not build it: {info.get('reason')}")
            elif isinstance(e, ModuleNotFoundError) and e.name == "fastloss." + name:
                problems.append("not built at install time")
            else:
                problems.append(f"the build installed with fastloss does not load ({e})")
    path = _build.cached_extension(name, torch.__version__)
    if path is not None:
        try:
            spec = importlib.util.spec_from_file_location("fastloss." + name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules["fastloss." + name] = mod
            _origin[name] = f"built by `{_build.BUILD_COMMAND}`, {path}"
            return mod, None
        except ImportError as e:
            problems.append(f"the build of `{_build.BUILD_COMMAND}` at {path} does not load ({e})")
    else:
        cached = _build.read_status(os.path.join(_build.cache_dir(torch.__version__), "fastloss")) \
            if _build.source_dir() else None
        info = (cached or {}).get("extensions", {}).get(name, {})
        if info.get("built") is False:
            problems.append(f"`{_build.BUILD_COMMAND}` did not build it: {info.get('reason')}")
    return None, f"fastloss.{name} is not built ({'; '.join(problems)}); {_HOW_TO_BUILD[name]}"


def load(name):
    """Import ``fastloss.<name>`` once; return ``(module or None, reason or None)``."""
    try:
        return _cache[name]
    except KeyError:
        pass
    with _lock:
        if name not in _cache:
            try:
                _cache[name] = _load(name)
            except Exception as e:  # noqa: BLE001 - a broken build must never break import fastloss
                _cache[name] = (None, f"fastloss.{name} could not be loaded ({type(e).__name__}: {e}); "
                                      f"{_HOW_TO_BUILD[name]}")
    return _cache[name]


def require(name, fn="an op"):
    """``fastloss.<name>``, or ``BackendError`` saying what is missing and how to build it."""
    mod, why = load(name)
    if mod is None:
        raise BackendError(f"fastloss: {fn} needs the compiled extension: {why}")
    return mod
