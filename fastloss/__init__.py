"""fastloss: fused, fast, exactly-right perceptual losses for PyTorch.

>>> import fastloss
>>> loss = fastloss.pdl(pred_features, target_features)        # the op
>>> criterion = fastloss.PDLLoss(extractor_weights="torchvision")  # the module on images
>>> fastloss.backends()                                         # what can run here, and why

Every functional op takes ``backend="auto"``; see ``fastloss._backend`` for the rules, and
``python -m fastloss.info`` for a report to paste into a bug.
"""
import torch  # noqa: F401  (load libtorch before the extensions)

from ._backend import BACKENDS, BackendError, backends, deterministic, use_backend, use_deterministic
from .pdl import PDLLoss, pdl, pdl_reference
from . import mdf
from .mdf import MDFLoss
from .d2sm import D2SMLoss, D2SMQueue, d2sm_kl, d2sm_reference
from .fdl import FDLLoss, fdl, fdl_reference

from .perceptual import PerceptualLoss
from .combine import CombinedLoss, combine
from .config import build_loss, _losses

LOSSES = _losses()  # type name -> class, what build_loss({"type": ...}) accepts

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "backends", "use_backend", "use_deterministic", "deterministic", "pdl", "pdl_reference", "PDLLoss",
           "d2sm_kl", "d2sm_reference", "D2SMQueue", "D2SMLoss",
           "__version__"]
__all__ += ["FDLLoss", "fdl", "fdl_reference", "mdf", "MDFLoss", "PerceptualLoss", "build_loss", "LOSSES", "combine", "CombinedLoss"]
