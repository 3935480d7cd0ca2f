"""fastloss's losses in the real BasicSR (1.4.2, from PyPI) loss registry.

BasicSR's package __init__ imports cv2, its data pipeline and a torchvision module that current
torchvision no longer has, so the test loads the package's own ``basicsr/utils/registry.py`` (the
real Registry class and LOSS_REGISTRY) as ``basicsr.utils.registry`` under empty parent packages,
then builds the losses the way ``basicsr.losses.build_loss`` does: ``LOSS_REGISTRY.get(type)(**opt)``."""
import copy
import importlib.util
import os
import sys
import types

import pytest
import torch

import fastloss
from fastloss.integrations import basicsr as adapter

spec = importlib.util.find_spec("basicsr")
if spec is None:
    pytest.skip("basicsr is not installed (scripts/setup.sh installs basicsr==1.4.2 with --no-deps)",
                allow_module_level=True)


@pytest.fixture
def registry(monkeypatch):
    root = spec.submodule_search_locations[0]
    for name, path in (("basicsr", root), ("basicsr.utils", os.path.join(root, "utils"))):
        mod = types.ModuleType(name)
        mod.__path__ = [path]
        monkeypatch.setitem(sys.modules, name, mod)
    rspec = importlib.util.spec_from_file_location("basicsr.utils.registry", os.path.join(root, "utils", "registry.py"))
    mod = importlib.util.module_from_spec(rspec)
    monkeypatch.setitem(sys.modules, "basicsr.utils.registry", mod)
    rspec.loader.exec_module(mod)
    return mod.LOSS_REGISTRY


def _build(reg, opt):  # basicsr.losses.build_loss, verbatim in substance
    opt = copy.deepcopy(opt)
    loss_type = opt.pop("type")
    return reg.get(loss_type)(**opt)


def test_register_into_the_real_registry(registry):
    names = adapter.register()  # finds basicsr.utils.registry by import
    assert set(names) <= set(registry.keys())
    assert adapter.register(registry) == names  # twice is harmless
    assert type(registry).__module__ == "basicsr.utils.registry"


def test_losses_built_from_options_equal_the_classes(registry):
    adapter.register(registry)
    torch.manual_seed(0)
    u, v = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    pdl = _build(registry, {"type": "PDLLoss", "loss_weight": 0.5, "reduction": "mean", "extractor_weights": None,
                            "layers": ["relu2_2"]})
    torch.manual_seed(1)
    ref = fastloss.PDLLoss(layers=("relu2_2",), extractor_weights=None)
    ref.load_state_dict(pdl.loss.state_dict())
    torch.testing.assert_close(pdl(u, v), 0.5 * ref(u, v))
    mdf = _build(registry, {"type": "MDFLoss", "loss_weight": 2.0})
    torch.testing.assert_close(mdf(u, v), 2.0 * fastloss.MDFLoss()(u, v))
    percep, style = _build(registry, {"type": "FastlossPerceptualLoss", "extractor_weights": None,
                                      "layers": ["relu1_2"]})(u, v)
    assert style is None and percep.dim() == 0
    d2sm = _build(registry, {"type": "D2SMLoss", "extractor_weights": None, "layer": "relu2_2", "queue_size": 8})
    assert torch.isfinite(d2sm(u, v))


def test_basicsr_conventions_are_checked(registry):
    adapter.register(registry)
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        _build(registry, {"type": "MDFLoss", "reduction": "sum"})
    with pytest.raises(ValueError, match="unknown key"):
        _build(registry, {"type": "MDFLoss", "no_such_key": 1})
    with pytest.raises(ValueError, match="per-pixel weight"):
        _build(registry, {"type": "MDFLoss"})(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), weight=torch.ones(1))


def test_a_loss_in_perceptual_opt_unpacks_as_basicsr_models_do(registry):
    """BasicSR's SRModel: ``l_percep, l_style = self.cri_perceptual(output, gt)``. A fastloss loss in
    that slot returns the pair when built with ``perceptual_opt: true``; without it, unpacking a
    0-dim tensor fails as it would in BasicSR."""
    adapter.register(registry)
    u, v = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    opt = {"type": "MDFLoss", "scales": 2, "loss_weight": 0.5}
    with pytest.raises(TypeError, match="0-d tensor"):
        l_percep, l_style = _build(registry, opt)(u, v)
    l_percep, l_style = _build(registry, {**opt, "perceptual_opt": True})(u, v)
    assert l_style is None
    torch.testing.assert_close(l_percep, 0.5 * fastloss.MDFLoss(scales=2)(u, v))
    cfg = [{"type": "PerceptualLoss", "layers": ["relu2_2"], "extractor_weights": None},
           {"type": "PDLLoss", "layers": ["relu2_2"], "extractor_weights": None}]
    l_percep, l_style = _build(registry, {"type": "FastlossCombinedLoss", "perceptual_opt": True, "losses": cfg})(u, v)
    assert l_style is None and l_percep.dim() == 0
    # FastlossPerceptualLoss returns the pair unless told it sits in pixel_opt
    single = _build(registry, {"type": "FastlossPerceptualLoss", "perceptual_opt": False, "extractor_weights": None,
                               "layers": ["relu1_2"]})(u, v)
    assert isinstance(single, torch.Tensor) and single.dim() == 0
    with pytest.raises(ValueError, match="perceptual_opt must be true or false"):
        _build(registry, {**opt, "perceptual_opt": "yes"})
