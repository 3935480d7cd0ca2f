"""FDL against an independent transcription of the published formula (eezkni/FDL,
FDL_pytorch/FDL.py), written here without fastloss's reference: value and input gradient, every
available backend, odd and small shapes, phase_weight 0 and 2, an upstream gradient other than 1.

Why float64 end to end: the phase of a frequency whose value is (nearly) a negative real number is
+pi or -pi according to the rounding of its imaginary part. Sparse ReLU features have many such
bins (a map with one nonzero pixel has a real spectrum), and float32 and float64 FFTs round that
imaginary part differently: the published formula itself, run in float32 and in float64 on the
same images, differs by ~1e-3 (2 pi jumps in the phase distributions). So the truth is float64 on
a float64 backbone; the float32 module is compared with the same transcription run in float32 on
its own float32 features, as the published code runs."""
import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss.features import layer_names
from fastloss.fdl import fdl

from conftest import fast_cpu_backends

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def published(xs, ys, rands, stride=1, phase_weight=1.0, per_proj_mean=True):
    """FDL_loss.forward after the backbone, in whatever dtype it is given.
    ``per_proj_mean=False`` is a mutant without the 1/num_proj (mean over positions only)."""
    score = []
    for x, y, rand in zip(xs, ys, rands):
        def once(a, b, rand=rand):
            pa = F.conv2d(a, rand, stride=stride)
            pa = pa.reshape(pa.shape[0], pa.shape[1], -1)
            pb = F.conv2d(b, rand, stride=stride)
            pb = pb.reshape(pb.shape[0], pb.shape[1], -1)
            pa, _ = torch.sort(pa, dim=-1)
            pb, _ = torch.sort(pb, dim=-1)
            d = torch.abs(pa - pb)
            return d.mean([1, 2]) if per_proj_mean else d.mean(2).sum(1)

        fx, fy = torch.fft.fftn(x, dim=(-2, -1)), torch.fft.fftn(y, dim=(-2, -1))
        score.append(once(torch.abs(fx), torch.abs(fy)) + once(torch.angle(fx), torch.angle(fy)) * phase_weight)
    return sum(score).mean()


def vgg_by_hand(vgg, x, layers):
    """The torchvision VGG19 Sequential run module by module in x's dtype (NCHW), ImageNet-normalised
    with float32 constants (the published code's buffers, cast as a float64 module casts them)."""
    mean = torch.tensor(MEAN).to(x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD).to(x.dtype).view(1, 3, 1, 1)
    h, out = (x - mean) / std, {}
    names = layer_names("vgg19")
    for i, name in enumerate(names[: max(names.index(n) for n in layers) + 1]):
        m = vgg.features[i]
        if name.startswith("conv"):
            h = F.conv2d(h, m.weight.to(x.dtype), m.bias.to(x.dtype), padding=1)
        elif name.startswith("relu"):
            h = F.relu(h)
        else:
            h = F.max_pool2d(h, 2, 2)
        out[name] = h
    return [out[n] for n in layers]


def truth(crit, u, v, g=1.0, dtype=torch.float64, **mutant):
    """(value, gradient of g * value w.r.t. u) of the published formula in ``dtype`` on crit's VGG and filters."""
    u2 = u.detach().to(dtype).requires_grad_()
    xs = vgg_by_hand(crit.extractor, u2, crit.layers)
    with torch.no_grad():
        ys = vgg_by_hand(crit.extractor, v.to(dtype), crit.layers)
    kw = dict(stride=crit.stride, phase_weight=crit.phase_weight)
    kw.update(mutant)
    value = published(xs, ys, [p.to(dtype) for p in crit.projections], **kw)
    (value * g).backward()
    return value.detach(), u2.grad


def backends_here():
    return ["reference"] + fast_cpu_backends()


def _grad_tol(ref, rel=1e-9):
    return dict(rtol=rel, atol=rel * ref.abs().max().item())


def float64_loss(**kw):
    """FDLLoss on a float64 VGG (filters cast with it) that runs NCHW like ``vgg_by_hand``."""
    crit = fastloss.FDLLoss(extractor_weights=None, **kw).double()
    crit.extractor.channels_last = False
    return crit


CASES = [  # (layers, image H, W, num_proj, patch_size, stride, phase_weight)
    (("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4"), 83, 80, 6, 5, 1, 1.0),  # relu5_4: 5 x 5
    (("relu1_2", "relu2_2"), 21, 19, 8, 5, 1, 0.0),   # odd H, W
    (("relu2_2", "relu3_4"), 23, 30, 5, 3, 2, 2.0),   # relu3_4: 5 x 7 with 3 x 3 patches, stride 2
    (("relu4_4",), 27, 33, 4, 2, 1, 1.0),             # a 3 x 4 map (smaller than 5 x 5) with 2 x 2 patches
]


def _case_params():
    """Every backend on every case; the five-layer case (float64 VGG19 to relu5_4, ~15 s) on the
    reference backend only under ``-m slow``."""
    out = []
    for case in CASES:
        for b in backends_here():
            slow = len(case[0]) == 5 and b == "reference"
            out.append(pytest.param(b, case, marks=pytest.mark.slow) if slow else (b, case))
    return out


@pytest.mark.parametrize("backend,case", _case_params(), ids=lambda c: c if isinstance(c, str) else f"{c[1]}x{c[2]}-{len(c[0])}layers-k{c[4]}-s{c[5]}-pw{c[6]}")
def test_fdl_loss_matches_published_formula_float64(backend, case):
    layers, h, w, num_proj, k, stride, pw = case
    torch.manual_seed(2)
    crit = float64_loss(layers=layers, num_proj=num_proj, patch_size=k, stride=stride, phase_weight=pw, seed=7,
                        backend=backend)
    b = 1 if len(layers) == 5 else 2  # the deep case at batch 1: float64 VGG19 to relu5_4 is slow
    u = torch.rand(b, 3, h, w, dtype=torch.float64, requires_grad=True)
    v = torch.rand(b, 3, h, w, dtype=torch.float64)
    g = 0.37  # an upstream gradient other than 1
    out = crit(u, v)
    (out * g).backward()
    ref, ref_grad = truth(crit, u, v, g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u.grad, ref_grad, **_grad_tol(ref_grad))


@pytest.mark.parametrize("backend", backends_here())
def test_fdl_loss_float32_matches_published_code_in_float32(backend):
    """The float32 module against the transcription in float32 on the same backbone: float32 rounding
    of the sums and the sorted differences only (the FFTs round alike)."""
    torch.manual_seed(5)
    crit = fastloss.FDLLoss(layers=("relu1_2", "relu2_2", "relu3_4"), num_proj=8, extractor_weights=None,
                            phase_weight=2.0, backend=backend)
    crit.extractor.channels_last = False
    u, v = torch.rand(2, 3, 29, 26, requires_grad=True), torch.rand(2, 3, 29, 26)
    out = crit(u, v)
    (out * 0.6).backward()
    ref, ref_grad = truth(crit, u, v, 0.6, dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u.grad, ref_grad, **_grad_tol(ref_grad, 1e-4))


def test_parity_tolerance_catches_wrong_formulas():
    """The parity test's tolerance fails a swapped phase weight, a missing 1/num_proj and a
    magnitude-only loss: the test can fail."""
    torch.manual_seed(3)
    crit = float64_loss(layers=("relu1_2",), num_proj=6, phase_weight=2.0)
    u = torch.rand(2, 3, 14, 13, dtype=torch.float64, requires_grad=True)
    v = torch.rand(2, 3, 14, 13, dtype=torch.float64)
    out = crit(u, v)
    out.backward()
    ref, ref_grad = truth(crit, u, v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u.grad, ref_grad, **_grad_tol(ref_grad))
    for mutant in ({"phase_weight": 0.5}, {"per_proj_mean": False}, {"phase_weight": 0.0}):
        bad, bad_grad = truth(crit, u, v, **mutant)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(out, bad, rtol=1e-10, atol=1e-12)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(u.grad, bad_grad, **_grad_tol(bad_grad))


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("shape,k,stride", [((2, 5, 9, 7), 3, 1), ((1, 4, 6, 11), 5, 2), ((3, 2, 4, 4), 4, 1)])
def test_fdl_op_float64_matches_published_formula(backend, shape, k, stride):
    """One layer's ``fdl`` on float64 features: the fused path at float64 rounding."""
    torch.manual_seed(4)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64)
    filters = torch.randn(7, shape[1], k, k, dtype=torch.float64)
    x2 = x.detach().clone().requires_grad_()
    g = torch.tensor(1.7, dtype=torch.float64)
    out = fdl(x, y, filters, stride=stride, phase_weight=2.0, backend=backend)
    (out * g).backward()
    ref = published([x2], [y], [filters], stride=stride, phase_weight=2.0)
    (ref * g).backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", fast_cpu_backends())
def test_fdl_op_in_chunks_of_filters_matches_published_formula(backend, monkeypatch):
    """The projections in chunks of 2 filters (7 filters: 2, 2, 2, 1) and the signs scattered one
    filter at a time give the one-chunk result."""
    from fastloss.fdl import ops

    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(ops, "MIN_CHUNK_FILTERS", 2)
    monkeypatch.setattr(ops, "SCATTER_FILTERS", 1)
    torch.manual_seed(6)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    filters = torch.randn(7, 3, 3, 3, dtype=torch.float64)
    x2 = x.detach().clone().requires_grad_()
    out = fdl(x, y, filters, stride=2, phase_weight=0.5, backend=backend)
    (out * 1.3).backward()
    ref = published([x2], [y], [filters], stride=2, phase_weight=0.5)
    (ref * 1.3).backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
