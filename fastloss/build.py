"""Build fastloss's compiled kernels against the torch installed here: ``python -m fastloss.build``.

Two ways get the C++ CPU extension ``fastloss._C`` (and, with a CUDA torch and toolkit, the CUDA
extension ``fastloss._C_cuda``):

- at install time, by ``setup.py``, whenever the build can import the installed torch
  (``pip install . --no-build-isolation``, ``scripts/setup.sh``, or a plain ``pip install .``
  that finds the torch of the environment it installs into);
- afterwards, by ``python -m fastloss.build``, which compiles the sources shipped inside the
  package into a cache folder keyed by the Python ABI, the torch version and a hash of the
  sources (``$FASTLOSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastloss``, else ``~/.cache/fastloss``;
  a ``-debug`` suffix for ``FASTLOSS_DEBUG=1`` builds),
  so that it works on a read-only install and never goes stale when torch changes. This is
  what the one-time fallback warning names.

Both use the same flags (defined here, once): release builds without debug information (-g0; the
extension is ~0.75 MB instead of ~28 MB), ``FASTLOSS_DEBUG=1`` with it (-g). The CPU extension is built first and on its own:
a CUDA build that fails (no toolkit, a toolkit whose version differs from torch's, a compiler
error) is reported and skipped, and never takes the CPU build down with it. What each build
gave is recorded in ``_build_status.json`` next to the extensions, and ``fastloss.backends()``
says which build is in use. This module imports torch only when it builds.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import traceback

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
STATUS_FILE = "_build_status.json"
BUILD_COMMAND = "python -m fastloss.build"
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20"]
# Python's own CFLAGS (sysconfig) carry -g, which made _C 28 MB of debug information around
# 0.75 MB of code. Release builds add -g0 after them (the last -g option wins); FASTLOSS_DEBUG=1
# keeps the debug information (-g, and nvcc's -g -lineinfo).
DEBUG_ENV = "FASTLOSS_DEBUG"
RELEASE_FLAGS = ["-g0"]
DEBUG_FLAGS = ["-g"]
NVCC_DEBUG_FLAGS = ["-g", "-lineinfo"]
NAMES = ("_C", "_C_cuda")


# --------------------------------------------------------------------------- sources
def source_dir():
    """The C++/CUDA sources: ``fastloss/csrc`` in an installed package, ``csrc`` in a checkout."""
    for d in (os.path.join(PACKAGE_DIR, "csrc"), os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")):
        if os.path.isdir(os.path.join(d, "cpu")):
            return d
    return None


def cpu_sources(csrc):
    return sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def cuda_sources(csrc):
    return sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu"))) + sorted(
        glob.glob(os.path.join(csrc, "cuda", "*_binding.cpp")))


def source_hash(csrc):
    """A hash of every source file (names and bytes), the cache key's last part."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if os.path.isfile(path) and not path.endswith((".pyc", ".json")):
            h.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def debug_build():
    """Whether ``FASTLOSS_DEBUG=1`` asks for a build with debug information."""
    return os.environ.get(DEBUG_ENV, "0") == "1"


def cxx_flags(base=CXX_FLAGS):
    """``base`` and, last, -g0 (release) or -g (``FASTLOSS_DEBUG=1``)."""
    return list(base) + (DEBUG_FLAGS if debug_build() else RELEASE_FLAGS)


def nvcc_flags():
    return list(NVCC_FLAGS) + (NVCC_DEBUG_FLAGS if debug_build() else [])


def extensions(cpp_extension, csrc, include_dir, with_cuda):
    """The extension definitions, shared by setup.py and ``python -m fastloss.build``."""
    exts = [cpp_extension.CppExtension(
        "fastloss._C", cpu_sources(csrc), include_dirs=[include_dir],
        extra_compile_args={"cxx": cxx_flags()}, extra_link_args=list(LINK_FLAGS))]
    if with_cuda:
        exts.append(cpp_extension.CUDAExtension(
            "fastloss._C_cuda", cuda_sources(csrc), include_dirs=[include_dir],
            extra_compile_args={"cxx": cxx_flags(["-O3", "-std=c++20"]), "nvcc": nvcc_flags()}))
    return exts


def cuda_wanted(torch, cpp_extension):
    """``(build the CUDA extension?, why not)``."""
    if os.environ.get("FASTLOSS_SKIP_CUDA", "0") == "1":
        return False, "FASTLOSS_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, f"the installed torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, None


def _is_cuda(ext):
    return any(src.endswith(".cu") for src in ext.sources)


def _short(ext_name):
    return ext_name.rsplit(".", 1)[-1]


def _error_summary(e):
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[-6:])[-1500:] if lines else type(e).__name__


# --------------------------------------------------------------------------- build_ext
def build_ext_class(cpp_extension, torch_version, skipped=None, require=None):
    """torch's ``BuildExtension`` (ninja), building the CPU extension first and each CUDA
    extension on its own, so a failing CUDA build is reported and never aborts the CPU one.

    ``skipped``: ``{name: why}`` of extensions deliberately not built (recorded as such).
    ``require``: raise when the CPU build fails (default: ``FASTLOSS_REQUIRE_EXT=1``); a CUDA
    failure only raises under ``FASTLOSS_REQUIRE_CUDA=1``.
    """
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)
    skipped = dict(skipped or {})

    class BuildExt(base):
        def run(self):
            self.fastloss_status = {_short(k): {"built": False, "reason": v} for k, v in skipped.items()}
            super().run()
            self._write_status()

        def build_extensions(self):
            exts = sorted(self.extensions, key=_is_cuda)  # CPU first
            keep = []
            for ext in exts:
                if _is_cuda(ext):
                    try:  # torch checks the toolkit against its own CUDA once, for every extension
                        compiler_name, compiler_version = self._check_abi()
                        cpp_extension._check_cuda_version(compiler_name, compiler_version)
                    except Exception as e:  # noqa: BLE001 - any failure here only costs the CUDA build
                        self._failed(ext, e)
                        continue
                keep.append(ext)
            self.extensions = keep
            super().build_extensions()
            # what failed is not an output: the copy to the source tree and the wheel skip it
            self.extensions = [e for e in keep if self.fastloss_status.get(_short(e.name), {}).get("built")]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._failed(ext, e)
                return
            self.fastloss_status[_short(ext.name)] = {"built": True}

        def _failed(self, ext, e):
            name = _short(ext.name)
            self.fastloss_status[name] = {"built": False, "reason": f"its build failed: {_error_summary(e)}"}
            strict = os.environ.get("FASTLOSS_REQUIRE_CUDA" if _is_cuda(ext) else "FASTLOSS_REQUIRE_EXT", "0") == "1"
            if require is not None and not _is_cuda(ext):
                strict = require
            what = "CUDA extension" if _is_cuda(ext) else "C++ CPU extension"
            then = ("the CPU extension and the rest of fastloss are unaffected" if _is_cuda(ext) else
                    f"fastloss will run on its reference backend; run `{BUILD_COMMAND}` to see the "
                    "compiler's full output")
            sys.stderr.write(f"\nfastloss: building the {what} fastloss.{name} failed; {then}.\n"
                             f"  {_error_summary(e)}\n\n")
            if strict:
                raise e

        def _write_status(self):
            out = os.path.dirname(self.get_ext_fullpath("fastloss._C"))
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, STATUS_FILE), "w") as f:
                json.dump({"torch": torch_version, "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "extensions": self.fastloss_status}, f, indent=1)

    return BuildExt


# --------------------------------------------------------------------------- the cache
def cache_root():
    root = os.environ.get("FASTLOSS_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "fastloss")
    return root


def cache_dir(torch_version=None, csrc=None):
    """The folder ``python -m fastloss.build`` builds into for this Python, torch and sources."""
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    csrc = csrc or source_dir()
    tag = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    key = f"{tag}-torch{torch_version}-{source_hash(csrc) if csrc else 'nosrc'}" + ("-debug" if debug_build() else "")
    return os.path.join(cache_root(), key.replace("+", "_"))


def cached_extension(name, torch_version=None):
    """The path of ``fastloss.<name>`` built by ``python -m fastloss.build`` for this torch, or None."""
    if source_dir() is None:
        return None
    d = os.path.join(cache_dir(torch_version), "fastloss")
    found = sorted(glob.glob(os.path.join(d, name + ".*.so")) + glob.glob(os.path.join(d, name + ".so")))
    return found[0] if found else None


def read_status(folder):
    try:
        with open(os.path.join(folder, STATUS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _file_lock(path):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(cuda=None, force=False, verbose=False):
    """Build the extensions into the cache (see the module docstring); returns ``(folder, status)``.

    Safe when several processes call it at once: one builds under a file lock, into a temporary
    folder moved into place when done; the others wait and find it built.
    """
    import torch
    from setuptools import setup
    from torch.utils import cpp_extension

    csrc = source_dir()
    if csrc is None:
        raise SystemExit(f"fastloss.build: the C++ sources are missing from this installation ({PACKAGE_DIR}/csrc); "
                         "reinstall fastloss from its sdist or checkout")
    final = cache_dir(torch.__version__, csrc)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with _file_lock(final + ".lock"):
        status = read_status(os.path.join(final, "fastloss"))
        if status is not None and status.get("extensions", {}).get("_C", {}).get("built") and not force:
            return final, status
        want_cuda, why_not = cuda_wanted(torch, cpp_extension)
        if cuda is False:
            want_cuda, why_not = False, "not asked for (--no-cuda)"
        skipped = {} if want_cuda else {"fastloss._C_cuda": why_not}
        tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp", dir=os.path.dirname(final))
        try:
            exts = extensions(cpp_extension, csrc, csrc, want_cuda)
            cmd = build_ext_class(cpp_extension, torch.__version__, skipped, require=False)
            args = ["build_ext", "--build-lib", tmp, "--build-temp", os.path.join(tmp, "temp")]
            quiet = [] if verbose else ["--quiet"]
            cwd = os.getcwd()
            try:
                os.chdir(tmp)  # setuptools writes nothing next to the sources
                setup(name="fastloss-build", ext_modules=exts, cmdclass={"build_ext": cmd},
                      script_args=quiet + args)
            finally:
                os.chdir(cwd)
            shutil.rmtree(os.path.join(tmp, "temp"), ignore_errors=True)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, read_status(os.path.join(final, "fastloss"))


def main(argv=None):
    ap = argparse.ArgumentParser(prog=BUILD_COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if this torch and these sources are built")
    ap.add_argument("--no-cuda", action="store_true", help="build the CPU extension only")
    ap.add_argument("--verbose", "-v", action="store_true", help="show the compiler commands")
    ap.add_argument("--print-dir", action="store_true", help="print the cache folder for this torch and exit")
    args = ap.parse_args(argv)
    if args.print_dir:
        print(cache_dir())
        return 0
    print("fastloss.build: compiling the C++ extension against torch (this takes a few minutes)...", file=sys.stderr)
    try:
        folder, status = build(cuda=False if args.no_cuda else None, force=args.force, verbose=args.verbose)
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    print(f"fastloss.build: {folder}")
    ok = True
    for name in NAMES:
        info = (status or {}).get("extensions", {}).get(name, {"built": False, "reason": "not attempted"})
        print(f"  fastloss.{name}: " + ("built" if info.get("built") else f"not built ({info.get('reason')})"))
        ok = ok and (info.get("built") or name != "_C")
    if not ok:
        print(f"fastloss.build: the CPU extension did not build; rerun with `{BUILD_COMMAND} --force -v` "
              "for the compiler's output", file=sys.stderr)
        return 1
    # the new build is used by processes started from now on
    print("fastloss.build: done; `python -m fastloss.info` shows the build in use")
    return 0


if __name__ == "__main__":
    sys.exit(main())
