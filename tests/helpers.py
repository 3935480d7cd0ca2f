"""What the test files of several folders share (tests/pdl, tests/d2sm, tests/mdf, tests/common).

Imported as ``helpers``, like ``conftest``: tests/ is on sys.path because the root conftest.py
lives there (pytest's default ``prepend`` import mode). The test folders have no ``__init__.py``,
so every test file's basename is unique across them."""
import os
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# ----------------------------------------------------------------------------- CUDA sources
CSRC = Path(ROOT) / "csrc"
# what tests/common/test_cuda_compile.py compiles: every CUDA source (nvcc) and torch binding (host compiler)
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
BINDING_SOURCES = sorted((CSRC / "cuda").glob("*_binding.cpp"))
