"""MDF, the Multi-Scale Discriminative Feature loss (Mustafa et al., WACV 2022).

>>> import fastloss
>>> criterion = fastloss.MDFLoss()                  # the shipped "denoise" set, no file needed
>>> criterion = fastloss.MDFLoss("../shared/mdf-official/Ds_JPEG.pth")  # a published set, loaded safely
>>> fastloss.mdf.convert("Ds_JPEG.pth", "jpeg.safetensors")             # into the project's format

The loss (formula, reference and fast path) is in ``fastloss/mdf/loss.py``; the weight files
(safe loader of the published pickles, the project's safetensors format) in
``fastloss/mdf/weights.py``; the trainer of new sets is ``python -m fastloss.mdf.train``.
"""
from .loss import MDFLoss, discriminator_features, fold, mdf_reference, select
from .weights import (SHIPPED, MDFWeights, UnsafePickleError, WeightFileError, convert, load, load_published, save,
                      shipped_path, tensor_names)

__all__ = ["MDFLoss", "mdf_reference", "discriminator_features", "fold", "select", "MDFWeights", "WeightFileError",
           "UnsafePickleError", "load", "load_published", "save", "convert", "SHIPPED", "shipped_path", "tensor_names"]
