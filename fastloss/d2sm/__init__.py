"""D2SM, Deep Semantic Statistics Matching (Mei, Patel and Huang): a cosine-kernel KL over a
set of feature rows, and a queue of past features (memorized historic sampling).

For the (q, D) features of the prediction and of the target (one row per sample), each row is
normalized, ``f_hat = f / (||f||_2 + eps)`` (entries that come out NaN become 0), and the
cosine kernel is ``K = (f_hat f_hat^T + 1) / 2``, in [0, 1]; ``K'`` comes from ``pred``, ``K``
from ``target``, which is a constant. Two modes::

    pkt    S = K' / K'.sum(1),  T = K / K.sum(1)  (diagonal included)
           loss = mean over the q*q entries of T log((T + eps) / (S + eps))
    paper  p'_i(j) = K'_ij / sum_{k != i} K'_ik,  p_i(j) likewise from K  (i != j)
           loss = (1/q) sum_i sum_{j != i} p'_i(j) log((p'_i(j) + eps) / (p_i(j) + eps))

``pkt`` is the Probabilistic Knowledge Transfer formula of the published D2SM code; ``paper`` is
equations (2) to (5) of the paper. ``reduction="sum"`` drops the 1/q (paper) or the mean over the
q*q entries (pkt): with eps = 0, paper mode's sum is Eq. 2 as written. The row sums ``sum_k K_ik = (q + sum_k G_ik) / 2`` (less the
diagonal term in paper mode) are the float64 sums of the similarity entries themselves: a KL
moves by about d when a row's probabilities sum to 1 + d, so float32 row sums, or row sums that
the rounded entries do not add up to (such as ``f_hat_i . sum_k f_hat_k``), would put errors of
1e-4 relative on losses of 1e-3 (and 1e-5 on a KL that is exactly 0). ``d2sm_kl`` sums the
matrices it has just formed; ``D2SMQueue`` keeps running sums of its cache, with no q x q pass.

The fused op (``csrc/cpu/d2sm.cpp``, ``kernels/d2sm.py``, ``csrc/cuda/d2sm_kernels.cu``) takes
the similarity matrices ``G = f_hat f_hat^T`` and those row sums, and does the kernel, the row
normalization, the log, the KL and the gradient with respect to the similarities in one pass; the
products with the features stay matrix products. ``D2SMQueue`` keeps the past rows, a q x q
similarity cache updated in place and the running row sums of the cache, so that a call costs
N x q x D multiply-adds for its N new rows instead of q x q x D.
Everything D2SM is in Python lives in this folder:

- ``reference.py``: the plain-PyTorch formula (``d2sm_reference``), the ground truth;
- ``ops.py``: the fused op (``torch.library``), its autograd, the backend table (``IMPLS``:
  ``csrc/cpu/d2sm.cpp``, ``kernels/d2sm.py``, ``csrc/cuda/d2sm_kernels.cu``) and ``d2sm_kl``;
- ``queue.py``: ``D2SMQueue``, its similarity cache and the ``torch.distributed`` gather;
- ``loss.py``: the ``D2SMLoss`` module on images.
"""
from .loss import PATCH_SCOPES, D2SMLoss
from .ops import MODES, REDUCTIONS, d2sm_kl
from .queue import D2SMQueue
from .reference import d2sm_reference

__all__ = ["d2sm_kl", "d2sm_reference", "D2SMQueue", "D2SMLoss", "MODES", "REDUCTIONS", "PATCH_SCOPES"]
