"""The paper's PDL conventions: root (W_p, Eq. 5), normalization (Eq. 2's 1/N or Eq. 3's sum),
RPP with m x C projections (Table 7's RPP-2x), and Fig. 2a.

Values are checked against POT's ``ot.wasserstein_1d`` (an implementation independent of
fastloss, returning W_p^p with uniform weights), gradients against autograd of
``torch.linalg.vector_norm`` of the sorted differences, on every backend that runs here.
"""
import numpy as np
import pytest
import torch

import fastloss
from fastloss import _backend
from fastloss.pdl import PDLLoss, pdl_reference, project, projection_matrix

from helpers import assert_compiled_matches_eager

try:
    import ot  # POT, in requirements-dev.txt and the bench extra
except ImportError:  # pragma: no cover
    ot = None
requires_pot = pytest.mark.skipif(ot is None, reason="POT (pip install pot) is not installed")

CONVENTIONS = [(p, root, norm) for p in (1, 2) for root in (False, True) for norm in ("mean", "sum")]


def _backends(tiny):
    """reference always; cpu where built; triton (interpreted on CPU tensors) only for tiny inputs."""
    out = ["reference"]
    if _backend.status("cpu")[0]:
        out.append("cpu")
    if tiny and _backend.status("triton")[0]:
        out.append("triton")
    return out


def _pot(x, y, p, root, norm):
    """Per (b, c): POT's W_p^p of the two empirical distributions, in the asked convention, float64."""
    xs, ys = x.detach().flatten(2).double().numpy(), y.detach().flatten(2).double().numpy()
    B, C, N = xs.shape
    w = np.empty((B, C))
    for b in range(B):
        for c in range(C):
            w[b, c] = ot.wasserstein_1d(xs[b, c], ys[b, c], p=p)  # (1/N) sum |d|^p
    if norm == "sum":
        w = w * N
    if root:
        w = w ** (1.0 / p)
    return torch.from_numpy(w)


def _oracle(x, y, p, root, norm):
    """Per (b, c) with autograd, written with vector_norm: its gradient at d = 0 is 0."""
    x, y = x.flatten(2), y.flatten(2)
    n = x.shape[-1]
    d = torch.sort(x, dim=-1, stable=True).values - torch.sort(y, dim=-1, stable=True).values
    scale = 1.0 if norm == "sum" else 1.0 / n
    norm_p = torch.linalg.vector_norm(d, ord=p, dim=-1)  # (sum |d|^p)^(1/p)
    if root:
        return norm_p * scale ** (1.0 / p)
    return norm_p ** p * scale


def _inputs(shape, layout="contiguous", kind="randn", dtype=torch.float64):
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randn(shape, dtype=torch.float64) * 1.3 + 0.2
    if kind == "ties":
        x, y = x.relu(), (y - 0.4).relu().round()
    if kind == "equal_rows":  # W = 0 on some channels: the root's gradient must be 0 there, not NaN
        y[:, ::2] = x[:, ::2]
    x, y = x.to(dtype), y.to(dtype)
    if layout == "channels_last":
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x, y = x[:, ::2], y[:, ::2]
    return x, y


SHAPES = [
    ((2, 3, 1), "contiguous", "randn"),         # N = 1
    ((2, 3, 5, 7), "contiguous", "randn"),      # N = 35
    ((3, 1, 11), "contiguous", "ties"),         # C = 1, ties
    ((2, 4, 3, 5), "channels_last", "randn"),
    ((2, 6, 3, 3), "sliced", "ties"),
    ((2, 4, 6), "contiguous", "equal_rows"),    # W = 0 rows
]


@requires_pot
@pytest.mark.parametrize("p,root,norm", CONVENTIONS)
@pytest.mark.parametrize("shape,layout,kind", SHAPES, ids=[f"{s}-{l}-{k}" for s, l, k in SHAPES])
def test_values_match_pot_and_gradients_match_vector_norm(p, root, norm, shape, layout, kind):
    x, y = _inputs(shape, layout, kind)
    want = _pot(x, y, p, root, norm)  # [B, C]
    # the interpreted triton kernels are slow: every shape in one convention, every convention on
    # the small shapes (the convention is the same Python on the per-row output for every backend)
    tiny = x.numel() <= 24 or (p, root, norm) == (2, True, "sum")
    for backend in _backends(tiny=tiny):
        xa, ya = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        xb, yb = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        out = fastloss.pdl(xa, ya, p=p, root=root, normalization=norm, reduction="none", backend=backend)
        torch.testing.assert_close(out, want.sum(1), rtol=1e-10, atol=1e-10, msg=backend)
        g = torch.rand(out.shape, dtype=out.dtype) + 0.5  # an upstream gradient that is not 1
        out.backward(g)
        (_oracle(xb, yb, p, root, norm).sum(1) * g).sum().backward()
        for got, ref in ((xa.grad, xb.grad), (ya.grad, yb.grad)):
            assert torch.isfinite(got).all(), backend
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12, msg=backend)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float32_backends_match_the_reference_in_every_convention(reduction):
    for backend in _backends(tiny=True)[1:]:
        shape = (2, 3, 2, 3) if backend == "triton" else (3, 5, 6, 7)
        _float32_parity(backend, shape, reduction)


def _float32_parity(backend, shape, reduction):
    x, y = _inputs(shape, "channels_last", "ties", torch.float32)
    for p, root, norm in CONVENTIONS:
        ref_x = x.detach().clone().requires_grad_()
        ref = pdl_reference(ref_x, y, p, reduction, root, norm)
        ref.backward(torch.tensor(1.7))
        xa = x.detach().clone().requires_grad_()
        out = fastloss.pdl(xa, y, p=p, root=root, normalization=norm, reduction=reduction, backend=backend)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-5, msg=f"{backend} {p} {root} {norm}")
        out.backward(torch.tensor(1.7))
        torch.testing.assert_close(xa.grad, ref_x.grad, rtol=2e-5, atol=1e-6)


@requires_pot
def test_done_when_p2_root_is_the_sum_of_pot_roots():
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    y = torch.randn(2, 16, 9, 9, dtype=torch.float64).relu()
    xs, ys = x.flatten(2).numpy(), y.flatten(2).numpy()
    want = np.mean([sum(np.sqrt(ot.wasserstein_1d(xs[b, c], ys[b, c], p=2)) for c in range(16)) for b in range(2)])
    for backend in _backends(tiny=False):
        got = fastloss.pdl(x, y, p=2, root=True, backend=backend).item()
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (backend, got, want)
    # and the default is still W_2^2 with the 1/N, which differs
    assert abs(fastloss.pdl(x, y, p=2).item() - want) > 1e-2


@pytest.mark.parametrize("p,root,norm", [c for c in CONVENTIONS if c != (1, False, "mean")])
def test_gradcheck_float64(p, root, norm):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    for backend in _backends(tiny=False):
        assert torch.autograd.gradcheck(
            lambda a, b: fastloss.pdl(a, b, p=p, root=root, normalization=norm, reduction="none", backend=backend),
            (x, y), eps=1e-6, atol=1e-6), backend


def test_root_at_zero_distance_has_zero_gradient_on_every_backend():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    for backend in _backends(tiny=True):
        for norm in ("mean", "sum"):
            xa = x.clone().requires_grad_()
            out = fastloss.pdl(xa, x.clone(), p=2, root=True, normalization=norm, backend=backend)
            out.backward(torch.tensor(3.0))
            assert out.item() == 0.0 and torch.equal(xa.grad, torch.zeros_like(x)), backend


def test_unused_conventions_change_nothing():
    x, y = _inputs((2, 3, 4, 5))
    for backend in _backends(tiny=False):
        base = fastloss.pdl(x, y, backend=backend)
        assert torch.equal(fastloss.pdl(x, y, root=True, backend=backend), base)  # p = 1: W_1 is its own root
        assert torch.equal(fastloss.pdl(x, y, root=False, normalization="mean", backend=backend), base)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"root": "yes"}, TypeError, "pdl: root must be True or False, got 'yes'"),
    ({"root": 1}, TypeError, "pdl: root must be True or False, got 1"),
    ({"normalization": "none"}, ValueError, r"pdl: normalization must be one of \('mean', 'sum'\), got 'none'"),
    ({"normalization": None}, ValueError, "pdl: normalization must be one of"),
])
def test_bad_convention_values(kwargs, exc, match):
    x = torch.randn(1, 2, 3)
    with pytest.raises(exc, match=match):
        fastloss.pdl(x, x, **kwargs)
    with pytest.raises(exc, match=match.replace("pdl:", "PDLLoss:")):
        PDLLoss(extractor=torch.nn.Identity(), **kwargs)


class _Conv(torch.nn.Module):
    """A tiny extractor: one fixed 3 -> 6 conv and a ReLU, returned as one tensor."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1).requires_grad_(False)

    def forward(self, x):
        return self.conv(x).relu()


@pytest.mark.parametrize("p,root,norm", CONVENTIONS)
def test_pdl_loss_passes_the_conventions_on(p, root, norm):
    ext = _Conv()
    crit = PDLLoss(layers=("f",), extractor=ext, weight=0.3, pixel_weight=0.5, p=p, root=root, normalization=norm,
                   projection="rpp", num_projections=12, seed=4)
    u, v = torch.rand(2, 3, 7, 6, requires_grad=True), torch.rand(2, 3, 7, 6)
    u2 = u.detach().clone().requires_grad_()
    m = projection_matrix("rpp", 6, 12, 4)
    assert m.shape == (12, 6)
    want = 0.5 * (u2 - v).abs().mean() + 0.3 * pdl_reference(project(ext(u2), m), project(ext(v), m), p, "mean",
                                                              root, norm)
    got = crit(u, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- RPP with m x C projections
def test_rpp_stacks_m_perturbed_identities():
    square = projection_matrix("rpp", 5, None, seed=7)
    for m in (1, 2, 3):
        w = projection_matrix("rpp", 5, 5 * m, seed=7)
        assert w.shape == (5 * m, 5)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(5 * m))
        torch.testing.assert_close(w[:5], square)  # the first block is the square rpp, as before
        for k in range(m):  # each block is a perturbed identity: its diagonal dominates
            block = w[5 * k:5 * (k + 1)]
            assert (block.diagonal() > 0.6).all() and (block - torch.diag(block.diagonal())).abs().max() < 0.5
        if m > 1:
            assert not torch.allclose(w[5:10], w[:5])  # fresh perturbations, not copies
    torch.testing.assert_close(projection_matrix("rpp", 5, 10, seed=7), projection_matrix("rpp", 5, 10, seed=7),
                               rtol=0, atol=0)


@pytest.mark.parametrize("num", [3, 7, 11, 1])
def test_rpp_other_sizes_say_what_is_allowed(num):
    with pytest.raises(ValueError, match=rf"multiple m \* C of the channels C=5 .*5, 10, 15, \.\.\.\), got {num}"):
        projection_matrix("rpp", 5, num)


def test_pdl_loss_rpp_2x_on_relu4_3_builds_and_checks_at_construction():
    crit = PDLLoss(layers=("relu4_3",), projection="rpp", num_projections=1024, extractor_weights=None)
    assert crit._matrix(0, 512, torch.device("cpu")).shape == (1024, 512)
    with pytest.raises(ValueError, match="PDLLoss: projection 'rpp' on relu4_3: num_projections must be a multiple"):
        PDLLoss(layers=("relu4_3",), projection="rpp", num_projections=1000, extractor_weights=None)
    for bad in (0, -3, 2.5, True, "1024"):
        with pytest.raises(ValueError, match="PDLLoss: num_projections must be None or an int >= 1"):
            PDLLoss(layers=("relu4_3",), projection="rpp", num_projections=bad, extractor_weights=None)


# ------------------------------------------------------------------------- the paper's Fig. 2a
def _kl(p, q, eps=1e-12):
    return float((p * torch.log((p + eps) / (q + eps))).sum())


def _js(p, q):
    m = (p + q) / 2
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def test_fig2a_shifted_histogram_pdl_grows_while_kl_and_js_saturate():
    """A discrete distribution (a histogram over integer bins) shifted bin by bin: PDL (W_1) grows
    with the shift; KL and JS of the histograms stop changing once the supports no longer overlap
    (JS at log 2), so they no longer see how far apart the distributions are."""
    base = torch.randn(1, 1, 3000, dtype=torch.float64).mul(1.3).round().clamp(-3, 3)  # 7 bins, -3 .. 3

    def hist(v):  # over the bins -3 .. 40
        return torch.bincount((v.flatten() + 3).long(), minlength=44).double() / v.numel()

    shifts = list(range(31))
    pdl = [fastloss.pdl(base + s, base, backend="reference").item() for s in shifts]
    kl = [_kl(hist(base + s), hist(base)) for s in shifts]
    js = [_js(hist(base + s), hist(base)) for s in shifts]
    # W_1 of a translated distribution is the shift itself: strictly growing
    np.testing.assert_allclose(pdl, shifts, rtol=0, atol=1e-12)
    # from shift 7 on the supports are disjoint: KL and JS are constant (JS = log 2)
    far = shifts[7:]
    assert max(js[s] for s in far) - min(js[s] for s in far) < 1e-12
    assert abs(js[7] - np.log(2)) < 1e-9
    assert max(kl[s] for s in far) - min(kl[s] for s in far) < 1e-9 * kl[7]
    # while over the same shifts PDL grew from 7 to 30
    assert pdl[30] - pdl[7] == 23.0
    # before the supports part, both divergences did grow with the shift: saturation, not blindness
    assert js[0] == 0.0 and js[1] < js[3] < js[7] and kl[1] < kl[3] < kl[7]
    # and the fused backends give the same distances
    for backend in _backends(tiny=False)[1:]:
        got = [fastloss.pdl(base + s, base, backend=backend).item() for s in (0, 7, 30)]
        np.testing.assert_allclose(got, [0.0, 7.0, 30.0], rtol=0, atol=1e-12)


@pytest.mark.skipif(not _backend.status("cpu")[0], reason="fastloss._C not built")
def test_torch_compile_fullgraph_with_root_and_sum():
    def step(a, b):
        return fastloss.pdl(a, b, p=2, root=True, normalization="sum", backend="cpu") * 1.5

    x, y = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    y[:, 1] = x[:, 1]  # a zero-distance channel inside the compiled graph too
    assert torch.isfinite(assert_compiled_matches_eager(step, x, y)).all()
