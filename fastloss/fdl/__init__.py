"""FDL, the Frequency Distribution Loss (Ni, Wu, Wang, Kong and Lin, CVPR 2024; eezkni/FDL).

Per VGG19 layer, the 2-D FFT of pred and target features; magnitude and phase each projected by
the same ``num_proj`` random unit-norm ``patch_size`` x ``patch_size`` filters (conv2d, no
padding); each projected channel sorted over its positions::

    S(a, b)  = (1/(K N)) sum_k sum_i |sort(P_k * a)_i - sort(P_k * b)_i|
    score[b] = sum_l S(|F x_l|, |F y_l|) + phase_weight * S(angle F x_l, angle F y_l)
    loss     = mean_b score[b]

Everything FDL is in Python lives in this folder:

- ``reference.py``: the published formula in plain PyTorch (``torch.sort``, autograd) and the
  filters (``make_projections``);
- ``ops.py``: ``fdl``, one layer's FDL with the sorts on ``fastloss.pdl``'s fused op (no kernel of
  its own: FFT and convolutions are PyTorch's), and the map-size check;
- ``loss.py``: the ``FDLLoss`` module on images (filters as buffers, ``combine()`` hooks).
"""
from .loss import DEFAULT_LAYERS, FDLLoss
from .ops import fdl, sliced_w1
from .reference import fdl_layer_reference, fdl_reference, make_projections

__all__ = ["FDLLoss", "fdl", "sliced_w1", "fdl_reference", "fdl_layer_reference", "make_projections",
           "DEFAULT_LAYERS"]
