"""PDL, the Projected Distribution Loss (Delbracio, Talebi and Milanfar).

Per feature channel, the 1D Wasserstein distance between the spatial value distributions of
prediction and target::

    W[b, c] = (1/N) * sum_i |sort(pred[b, c])_i - sort(target[b, c])_i| ** p     (p = 1 or 2)
    loss[b] = sum_c W[b, c]                                  reduction: mean over b, sum, none

``p=2`` gives W_2 squared by default; the paper's other conventions are options applied to the
per-row W: ``root=True`` (``sum_c W[b, c]^(1/p)``, Eq. 5) and ``normalization="sum"`` (no 1/N,
Eq. 3 and Algorithm 1).

Everything PDL is in Python lives in this folder:

- ``reference.py``: the plain-PyTorch formula (``pdl_reference``) and the conventions;
- ``ops.py``: the ``torch.library`` custom ops, their fake kernels and autograd, the backend
  table (``IMPLS``: ``csrc/cpu/pdl.cpp``, ``kernels/pdl.py``, ``csrc/cuda/pdl_kernels.cu``) and
  the public op ``pdl``;
- ``projections.py``: the random projections of the paper's Table 7;
- ``loss.py``: the ``PDLLoss`` module on images.
"""
from .loss import PDLLoss
from .ops import pdl
from .projections import PROJECTIONS, project, projection_matrix
from .reference import NORMALIZATIONS, pdl_reference

__all__ = ["pdl", "pdl_reference", "PDLLoss", "PROJECTIONS", "NORMALIZATIONS", "project", "projection_matrix"]
