"""Build fastloss: the metadata is in pyproject.toml, the C++ and CUDA build here.

- The C++ CPU extension ``fastloss._C`` is built whenever the installed torch can be imported:
  directly (``pip install . --no-build-isolation``, ``scripts/setup.sh``) or, under pip's build
  isolation, from the environment being installed into (so a plain ``pip install .`` compiles
  against the torch already there and never fetches a second one).
- The CUDA extension ``fastloss._C_cuda`` is built only when that torch has CUDA and a CUDA
  toolkit is found, after the CPU one and on its own: a failing CUDA build (for instance a
  toolkit whose version differs from torch's) is reported and skipped, never taking the CPU
  build down with it.
- Without an importable torch, or with ``FASTLOSS_SKIP_BUILD=1``, fastloss installs as pure
  Python with its C++ sources inside, and ``python -m fastloss.build`` compiles them later.
- A failed CPU build is reported and leaves a pure-Python install (the same fallback), unless
  ``FASTLOSS_REQUIRE_EXT=1``, which makes it fail the install (``scripts/setup.sh`` and CI).

The flags and the build command live in ``fastloss/build.py``, shared with ``python -m fastloss.build``.
"""
import importlib.util
import os
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_BUILD = os.environ.get("FASTLOSS_SKIP_BUILD", "0") == "1"


def _say(msg):
    sys.stderr.write(f"fastloss setup: {msg}\n")


def _build_module():
    # by path: importing the fastloss package here would import torch
    spec = importlib.util.spec_from_file_location("_fastloss_build", os.path.join(ROOT, "fastloss", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _import_torch():
    """The installed torch, or None. pip's build isolation hides the environment being installed
    into; its torch is then taken from there (never a second torch from the index)."""
    try:
        import torch

        return torch
    except ImportError:
        pass
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    candidates = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")] + [base["purelib"], base["platlib"]]
    paths = [p for p in dict.fromkeys(candidates) if os.path.isdir(os.path.join(p, "torch"))]
    if not paths:
        return None
    sys.path.extend(paths)
    try:
        import torch

        _say(f"building against the torch {torch.__version__} of the environment being installed into ({paths[0]})")
        return torch
    except Exception as e:  # noqa: BLE001 - any failure leaves a pure-Python install
        _say(f"found torch in {paths[0]} but could not import it ({type(e).__name__}: {e})")
        return None


def extensions():
    if SKIP_BUILD:
        _say("FASTLOSS_SKIP_BUILD=1: pure-Python install; `python -m fastloss.build` compiles the kernels later")
        return [], {}
    torch = _import_torch()
    if torch is None:
        if os.environ.get("FASTLOSS_REQUIRE_EXT", "0") == "1":
            raise SystemExit("fastloss setup: FASTLOSS_REQUIRE_EXT=1 but torch cannot be imported by the build; "
                             "install torch first, then `pip install . --no-build-isolation`")
        _say("torch is not importable by this build, so the C++ kernels are not compiled now; after installing, "
             "run `python -m fastloss.build` (or install with `pip install . --no-build-isolation`)")
        return [], {}
    from torch.utils import cpp_extension

    b = _build_module()
    with_cuda, why_not = b.cuda_wanted(torch, cpp_extension)
    if not with_cuda:
        _say(f"the CUDA extension is not built: {why_not}")
    exts = b.extensions(cpp_extension, "csrc", os.path.join(ROOT, "csrc"), with_cuda)
    skipped = {} if with_cuda else {"fastloss._C_cuda": why_not}
    return exts, {"build_ext": b.build_ext_class(cpp_extension, torch.__version__, skipped)}


ext_modules, cmdclass = extensions()

setup(
    # every package under fastloss/ (one folder per loss), plus the Triton kernels and the C++ / CUDA
    # sources, which live at the top level and install as fastloss.kernels and fastloss.csrc
    # The data folders (fastloss/mdf/data, csrc/cpu, csrc/cuda) are listed as packages too, without
    # an __init__.py: setuptools warns (BuildBackendWarning) about any folder whose files are
    # installed but that is not in `packages`.
    packages=["fastloss"] + ["fastloss." + p for p in find_packages(os.path.join(ROOT, "fastloss"))]
    + ["fastloss.mdf.data", "fastloss.kernels", "fastloss.csrc", "fastloss.csrc.cpu", "fastloss.csrc.cuda"],
    package_dir={"fastloss": "fastloss", "fastloss.kernels": "kernels", "fastloss.csrc": "csrc"},
    # the shipped MDF discriminator sets and the seed image they were trained on; the C++/CUDA
    # sources, which `python -m fastloss.build` compiles after a pure-Python install
    package_data={"fastloss.mdf.data": ["*.safetensors", "seed.png"],
                  "fastloss.csrc.cpu": ["*.cpp", "*.h"],
                  "fastloss.csrc.cuda": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
