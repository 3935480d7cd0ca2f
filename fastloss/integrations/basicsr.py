"""fastloss's losses in BasicSR's loss registry (and in the frameworks that share its registry and
option format: traiNNer-redux, neosr).

>>> from fastloss.integrations import basicsr
>>> basicsr.register()            # once, before BasicSR builds the model's losses

Then a BasicSR option file names them like its own losses. BasicSR's models unpack
``perceptual_opt`` as a pair ``(perceptual, style)``: a fastloss loss placed there says so with
``perceptual_opt: true`` (``FastlossPerceptualLoss`` always returns the pair)::

    pixel_opt:
      type: L1Loss                 # BasicSR's own pixel loss (fastloss's pixel_weight stays 0)
      loss_weight: 1.0
    perceptual_opt:
      type: PDLLoss
      perceptual_opt: true         # return (loss, None), as BasicSR unpacks this slot
      loss_weight: 1.0
      layers: [relu4_3]
      weight: 0.01

Several fastloss losses on one backbone pass (``fastloss.combine``)::

    perceptual_opt:
      type: FastlossCombinedLoss
      perceptual_opt: true
      loss_weight: 1.0
      losses:
        - {type: PerceptualLoss, layers: [relu4_3]}
        - {type: PDLLoss, layers: [relu4_3]}

BasicSR's conventions: the constructor takes ``loss_weight`` (a factor on the loss) and
``reduction`` (fastloss's losses are means over the batch, so only ``"mean"`` is accepted) and
passes every other key to the fastloss class under its own keyword names; ``forward(pred, target)``
(BasicSR's optional per-pixel ``weight`` is refused: none of these losses is per pixel). BasicSR
already registers a ``PerceptualLoss`` of its own, so fastloss's is registered as
``FastlossPerceptualLoss``; like BasicSR's it returns ``(perceptual, style)`` with ``style = None``,
which is what BasicSR's models unpack.
"""
import torch.nn as nn

from .. import config

__all__ = ["register", "NAMES"]

# registry name -> fastloss type name
NAMES = {"PDLLoss": "PDLLoss", "D2SMLoss": "D2SMLoss", "MDFLoss": "MDFLoss", "FDLLoss": "FDLLoss",
         "FastlossPerceptualLoss": "PerceptualLoss", "FastlossCombinedLoss": "CombinedLoss"}


class _Adapter(nn.Module):
    _type = None
    _returns_pair = False

    def __init__(self, loss_weight=1.0, reduction="mean", perceptual_opt=None, **kwargs):
        super().__init__()
        name = type(self).__name__
        if perceptual_opt not in (None, True, False):
            raise ValueError(f"{name} (fastloss): perceptual_opt must be true or false (true: the loss sits in "
                             f"BasicSR's perceptual_opt and returns (loss, None)), got {perceptual_opt!r}")
        self.returns_pair = self._returns_pair if perceptual_opt is None else perceptual_opt
        if reduction != "mean":
            raise ValueError(f"{name} (fastloss): reduction must be 'mean' (the loss is a mean over the batch), "
                             f"got {reduction!r}")
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)):
            raise ValueError(f"{name} (fastloss): loss_weight must be a number, got {loss_weight!r}")
        self.loss_weight, self.reduction = float(loss_weight), reduction
        self.loss = config.build_loss({"type": self._type, **kwargs})

    def forward(self, pred, target, weight=None, **kwargs):
        if weight is not None:
            raise ValueError(f"{type(self).__name__} (fastloss): a per-pixel weight is not supported")
        out = self.loss_weight * self.loss(pred, target)
        return (out, None) if self.returns_pair else out


def _adapter(registry_name, type_name):
    return type(registry_name, (_Adapter,), {
        "_type": type_name, "_returns_pair": type_name == "PerceptualLoss", "__module__": __name__,
        "__doc__": f"fastloss.{type_name} with BasicSR's loss_weight / reduction / forward(pred, target)."})


ADAPTERS = {name: _adapter(name, t) for name, t in NAMES.items()}
globals().update(ADAPTERS)


def register(registry=None):
    """Add the adapters to ``registry`` (default: ``basicsr.utils.registry.LOSS_REGISTRY``); a name
    already holding the same class is left as it is, so calling it twice is harmless. Returns the
    registered names."""
    if registry is None:
        try:
            from basicsr.utils.registry import LOSS_REGISTRY as registry
        except ImportError as e:
            raise ImportError("fastloss.integrations.basicsr.register(): basicsr is not importable "
                              f"({e}); pip install basicsr, or pass the registry to register()") from e
    for name, cls in ADAPTERS.items():
        if name in registry:
            if registry.get(name) is cls:
                continue
            raise ValueError(f"fastloss.integrations.basicsr: the registry already holds another {name!r}")
        registry.register(cls)
    return list(ADAPTERS)
