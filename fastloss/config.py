"""Build a fastloss loss from a plain dict, as YAML or TOML give it: ``build_loss({"type": "PDLLoss", ...})``.

The keys are the class's own keyword names; ``LOSSES`` maps each type name to its class."""
import inspect

from .perceptual import PerceptualLoss


def _losses():
    from .d2sm import D2SMLoss
    from .fdl import FDLLoss
    from .mdf import MDFLoss
    from .pdl import PDLLoss

    return {"PDLLoss": PDLLoss, "D2SMLoss": D2SMLoss, "MDFLoss": MDFLoss, "FDLLoss": FDLLoss, "PerceptualLoss": PerceptualLoss}


def build_loss(cfg):
    """The loss ``cfg["type"]`` built with the other keys as keyword arguments; ``ValueError``
    listing the valid types or keys for anything unknown. A list of such dicts (or
    ``{"type": "CombinedLoss", "losses": [...]}``) builds ``fastloss.combine`` of them: one backbone
    pass per distinct extractor."""
    from . import LOSSES
    from .combine import combine

    if isinstance(cfg, (list, tuple)):
        if not cfg:
            raise ValueError("build_loss: an empty list of loss configs; give at least one")
        return combine(*(build_loss(c) for c in cfg))
    if isinstance(cfg, dict) and cfg.get("type") == "CombinedLoss":
        unknown = sorted(set(cfg) - {"type", "losses"})
        if unknown or not isinstance(cfg.get("losses"), (list, tuple)):
            raise ValueError(f"build_loss: CombinedLoss takes one key, 'losses' (a list of loss configs), got {cfg!r}")
        return build_loss(list(cfg["losses"]))
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"build_loss: cfg must be a dict with a 'type' key (one of {sorted(LOSSES) + ['CombinedLoss']}) "
                         f"or a list of such dicts, got {cfg!r}")
    kw = dict(cfg)
    name = kw.pop("type")
    if name not in LOSSES:
        raise ValueError(f"build_loss: unknown type {name!r}; valid types: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kw) - set(params))
    if unknown:
        raise ValueError(f"build_loss: unknown key(s) {unknown} for {name}; valid keys: {', '.join(params)}")
    if "layers" in kw and isinstance(kw["layers"], list):
        kw["layers"] = tuple(kw["layers"])
    return cls(**kw)
