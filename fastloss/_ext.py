"""Loading the compiled extensions, once, thread-safely.

``load("_C")`` returns ``(module, None)`` or ``(None, reason)``; the reason says how to build it.
"""
import importlib
import threading

_lock = threading.Lock()
_cache = {}

_HOW_TO_BUILD = {
    "_C": "build it with `pip install -e . --no-build-isolation` (with FASTLOSS_SKIP_BUILD unset)",
    "_C_cuda": (
        "it is built only when the installed torch has CUDA and a CUDA toolkit is found; "
        "reinstall with `pip install -e . --no-build-isolation` on such a machine"
    ),
}


def load(name):
    """Import ``fastloss.<name>`` once; return ``(module or None, reason or None)``."""
    try:
        return _cache[name]
    except KeyError:
        pass
    with _lock:
        if name not in _cache:
            try:
                import torch  # noqa: F401  (the extension links against libtorch)

                _cache[name] = (importlib.import_module("fastloss." + name), None)
            except ImportError as e:
                _cache[name] = (None, f"fastloss.{name} is not built ({e}); {_HOW_TO_BUILD[name]}")
    return _cache[name]
