"""MDF, the Multi-Scale Discriminative Feature loss (Mustafa et al., WACV 2022).

>>> import fastloss
>>> criterion = fastloss.MDFLoss()                  # the shipped "denoise" set, no file needed
>>> criterion = fastloss.MDFLoss("../shared/mdf-official/Ds_JPEG.pth")  # a published set, loaded safely
>>> fastloss.mdf.convert("Ds_JPEG.pth", "jpeg.safetensors")             # into the project's format

Everything MDF is in Python lives in this folder:

- ``reference.py``: the published order of operations (``mdf_reference``), the ground truth;
- ``ops.py``: the fast path: BatchNorm folding, the merged convolutions, the custom ops and their
  autograd, the backend table (``IMPLS``: ``csrc/cpu/mdf.cpp``, ``kernels/mdf.py``,
  ``csrc/cuda/mdf_kernels.cu``);
- ``loss.py``: the ``MDFLoss`` module;
- ``weights.py``: the weight files (safe loader of the published pickles, the project's
  safetensors format); ``train.py``: the trainer of new sets, ``python -m fastloss.mdf.train``.
"""
from .loss import MDFLoss
from .ops import fold
from .reference import discriminator_features, mdf_reference, select
from .weights import (SHIPPED, MDFWeights, UnsafePickleError, WeightFileError, convert, load, load_published, save,
                      shipped_path, tensor_names)

__all__ = ["MDFLoss", "mdf_reference", "discriminator_features", "fold", "select", "MDFWeights", "WeightFileError",
           "UnsafePickleError", "load", "load_published", "save", "convert", "SHIPPED", "shipped_path", "tensor_names"]
