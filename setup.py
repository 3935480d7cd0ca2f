"""Build fastloss.

- The C++ CPU extension ``fastloss._C`` is always built (with ninja when present).
- The CUDA extension ``fastloss._C_cuda`` is built only when the installed torch has CUDA
  and a CUDA toolkit is found.
- ``FASTLOSS_SKIP_BUILD=1`` installs pure Python (every op then runs on ``reference``, or
  ``triton`` on a GPU).

Install with ``pip install -e . --no-build-isolation`` so that the torch already installed
is the one compiled against: setup never asks pip for a second torch.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_BUILD = os.environ.get("FASTLOSS_SKIP_BUILD", "0") == "1"


def extensions():
    if SKIP_BUILD:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - exercised only on a machine without torch
        raise SystemExit(
            "fastloss: building the C++ extension needs torch installed first "
            "(pip install torch), then `pip install -e . --no-build-isolation`; "
            "or set FASTLOSS_SKIP_BUILD=1 for a pure-Python install"
        ) from e

    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    exts = [
        cpp_extension.CppExtension(
            "fastloss._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + sorted(
            glob.glob(os.path.join("csrc", "cuda", "*_binding.cpp"))
        )
        exts.append(
            cpp_extension.CUDAExtension(
                "fastloss._C_cuda",
                cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20"]},
            )
        )
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fastloss",
    version="0.1.0",
    description="Fused, fast, exactly-right perceptual losses (PDL, D2SM, MDF) for PyTorch",
    packages=["fastloss", "fastloss.kernels", "fastloss.mdf"],
    package_dir={"fastloss": "fastloss", "fastloss.kernels": "kernels"},
    # the shipped MDF discriminator sets and the seed image they were trained on
    package_data={"fastloss.mdf": ["data/*.safetensors", "data/seed.png"]},
    python_requires=">=3.9",
    # No torch pin here: the torch already installed is the one the extension is built
    # against, and pip must never fetch another one while installing fastloss.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"bench": ["tqdm", "matplotlib", "pytest-benchmark", "pot"], "test": ["pytest", "expecttest"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastloss-bench=fastloss.bench:main"]},
    zip_safe=False,
)
