"""D2SM in the paper's conventions: Eq. 2 as a plain sum (reduction="sum"), any VGG layer and
several layers, internal patches per image (§3.3) or pooled over the batch, and the queue size
that a setting needs."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastloss
from fastloss import _backend
from fastloss.d2sm import d2sm_reference
from fastloss.features import VGG

CPU = _backend.status("cpu")[0]
TRITON = _backend.status("triton")[0]


def _backends(tiny):
    return ["reference"] + ["cpu"] * CPU + ["triton"] * (TRITON and tiny)


def _eq2(f_pred, f_target):
    """Eq. 2 to 5 of the paper written out with numpy loops, float64, no eps:
    sum_i sum_{j != i} g'_{j|i} log(g'_{j|i} / g_{j|i}), g_{j|i} = K(f_j, f_i) / sum_{k != i} K(f_k, f_i),
    K(a, b) = (a.b / (|a| |b|) + 1) / 2."""
    a = f_pred.detach().flatten(1).double().numpy()
    b = f_target.detach().flatten(1).double().numpy()
    n = a.shape[0]

    def kernel(f, i, j):
        return 0.5 * (float(f[i] @ f[j]) / (np.linalg.norm(f[i]) * np.linalg.norm(f[j])) + 1.0)

    total = 0.0
    for i in range(n):
        zp = sum(kernel(a, k, i) for k in range(n) if k != i)
        zt = sum(kernel(b, k, i) for k in range(n) if k != i)
        for j in range(n):
            if j != i:
                gp, gt = kernel(a, j, i) / zp, kernel(b, j, i) / zt
                total += gp * math.log(gp / gt)
    return total


def _rows(q, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(q, d, generator=g, dtype=torch.float64)
    y = torch.randn(q, d, generator=g, dtype=torch.float64) * 0.5 + 0.6 * x
    return x, y


@pytest.mark.parametrize("q,d", [(2, 3), (5, 4), (9, 6)])
def test_done_when_sum_is_eq2_as_written(q, d):
    x, y = _rows(q, d)
    want = _eq2(x, y)
    for backend in _backends(tiny=True):
        got = fastloss.d2sm_kl(x, y, mode="paper", eps=0, reduction="sum", backend=backend).item()
        assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), (backend, got, want)
        mean = fastloss.d2sm_kl(x, y, mode="paper", eps=0, backend=backend).item()
        assert abs(mean - want / q) <= 1e-9 * max(1.0, abs(want)), backend  # the default keeps the 1/q


@pytest.mark.parametrize("mode", ["paper", "pkt"])
@pytest.mark.parametrize("shape,layout", [((2, 1), "contiguous"), ((7, 3, 2), "contiguous"), ((6, 10), "sliced")])
def test_sum_parity_and_gradients_on_every_backend(mode, shape, layout):
    x, y = torch.randn(shape, dtype=torch.float64).relu(), torch.randn(shape, dtype=torch.float64)
    if layout == "sliced":
        x, y = x[:, ::2], y[:, ::2]
    q = x.shape[0]
    xr = x.clone().requires_grad_()
    ref = d2sm_reference(xr, y, mode, 1e-6, "sum")
    ref.backward(torch.tensor(2.3, dtype=torch.float64))  # an upstream gradient that is not 1
    ref_mean = d2sm_reference(x, y, mode, 1e-6)
    torch.testing.assert_close(ref, ref_mean * (q if mode == "paper" else q * q), rtol=1e-12, atol=1e-14)
    for backend in _backends(tiny=True)[1:]:
        xa = x.clone().requires_grad_()
        out = fastloss.d2sm_kl(xa, y, mode=mode, reduction="sum", backend=backend)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
        out.backward(torch.tensor(2.3, dtype=torch.float64))
        torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not CPU, reason="fastloss._C not built")
def test_sum_gradcheck_float64():
    x, y = _rows(5, 4, seed=2)
    for mode in ("paper", "pkt"):
        assert torch.autograd.gradcheck(
            lambda a: fastloss.d2sm_kl(a, y, mode=mode, reduction="sum", backend="cpu"),
            (x.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_queue_sum_is_eq2_over_the_rows_seen_while_it_fills():
    """With eps = 0 and the queue not yet full, its set is every row seen so far: the sum is Eq. 2
    over them (the earlier pred rows enter with the values they had)."""
    batches = [_rows(3, 5, seed=s) for s in range(3)]
    for backend in _backends(tiny=True):
        queue = fastloss.D2SMQueue(16, mode="paper", eps=0.0, backend=backend, reduction="sum").double()
        for k, (x, y) in enumerate(batches):
            xa = x.clone().requires_grad_()
            out = queue(xa, y)
            seen_x = torch.cat([b[0] for b in batches[:k + 1]])
            seen_y = torch.cat([b[1] for b in batches[:k + 1]])
            want = _eq2(seen_x, seen_y)
            assert abs(out.item() - want) <= 1e-9 * max(1.0, want), (backend, k)
            out.backward(torch.tensor(0.7, dtype=torch.float64))
            # the gradient of the batch rows equals that of Eq. 2 (autograd of the reference over the set)
            sx = seen_x.clone()
            sx_new = x.clone().requires_grad_()
            full = torch.cat([sx[:-3], sx_new])
            d2sm_reference(full, seen_y, "paper", 0.0, "sum").backward(torch.tensor(0.7, dtype=torch.float64))
            torch.testing.assert_close(xa.grad, sx_new.grad, rtol=1e-9, atol=1e-12)
        assert "reduction='sum'" in repr(queue)


@pytest.mark.parametrize("mode", ["paper", "pkt"])
def test_queue_sum_is_the_mean_times_q_once_full(mode):
    for backend in _backends(tiny=True):
        qs = fastloss.D2SMQueue(5, mode=mode, backend=backend, reduction="sum").double()
        qm = fastloss.D2SMQueue(5, mode=mode, backend=backend).double()
        for step in range(4):
            x, y = _rows(2, 3, seed=10 + step)
            s, m = qs(x, y), qm(x, y)
            q = min(2 * (step + 1), 5)
            torch.testing.assert_close(s, m * (q if mode == "paper" else q * q), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda r: fastloss.d2sm_kl(torch.randn(3, 2), torch.randn(3, 2), reduction=r),
    lambda r: fastloss.D2SMQueue(4, reduction=r),
    lambda r: fastloss.D2SMLoss(extractor=nn.Identity(), reduction=r),
], ids=["d2sm", "D2SMQueue", "D2SMLoss"])
def test_bad_reduction(make):
    for bad in ("none", "MEAN", None):
        with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\), got"):
            make(bad)


# ----------------------------------------------------------------------------- layers
def _vgg_rows(arch, layers, x):
    vgg = VGG(arch, layers=layers, weights=None)
    return vgg, {k: v.flatten(1) for k, v in vgg(x).items()}


def _float64_truth(pred, target, layer_weights, weight):
    """The D2SMLoss value (paper mode, reduction="sum") in float64 from the float32 features the
    loss saw, ``pred`` and ``target`` {layer: rows}, and the tolerance of the float32 path around it.

    Why float64: the KLs here are small sums of terms of both signs (VGG rows of 16 x 16 images
    are almost parallel: every P_ij / Q_ij lies within 2.6% of 1). The reference in float32
    normalizes each row in float32, and a row sum's rounding shifts that row's whole KL: over 200
    permutations of the feature columns (the same sums in other orders; measured on an AVX2 CPU)
    the float32 reference moved by 1.1e-6 (sd) and up to 2.8e-6 at the second call, whose value is
    8.0e-4; an AVX-512 CPU got 0.0007997381, 1.3e-6 below the float64 value, and failed the
    former atol of 1e-6 while the path was 3.4e-7 above it. The fused path forms its row sums in
    float64 and has no such error.

    The tolerance is derived from float32's spacing, not fitted: what the path still rounds to
    float32 per entry (i, j) are its kernels K'_ij and K_ij and its log argument, each to the
    nearest float32, an error uniform over one spacing (<= 2^-23 relatively in [0.5, 2]) of sd
    <= 2^-23 / sqrt(12); to first order each moves the KL by about P_ij times that relative error
    (P_ij: the pred row's probabilities; the row sums are float64, nothing else moves with it).
    Independent over the entries, the three give the value an sd of at most
    sigma = 2^-24 sqrt(sum_layers c^2 sum_ij P_ij^2), c the layer's weight times ``weight``:
    5.6e-7 and 5.0e-7 at the two calls below, above the 3.9e-7 and 3.7e-7 that the 200
    permutations measured on the path (at most 1.2e-6 and 1.3e-6). The tolerance is 4 sigma
    (2.2e-6 and 2.0e-6): the second call still fails if the loss is scaled by 1 +- 3e-3."""
    want, var = 0.0, 0.0
    for name, w in layer_weights.items():
        x, y = pred[name].flatten(1).double(), target[name].flatten(1).double()
        want = want + weight * w * d2sm_reference(x, y, "paper", 1e-6, "sum")
        f = torch.nn.functional.normalize(x, dim=1)
        k = (f @ f.T + 1) / 2 * ~torch.eye(len(f), dtype=torch.bool)
        var += (weight * w) ** 2 * (k / k.sum(1, keepdim=True)).square().sum().item()
    return want, 4 * 2.0 ** -24 * math.sqrt(var)


@pytest.mark.skipif(not CPU, reason="fastloss._C not built")
def test_any_vgg_layer_and_several_layers_with_weights():
    torch.manual_seed(0)
    u1, v1, u2, v2 = (torch.rand(3, 3, 16, 16) for _ in range(4))
    crit = fastloss.D2SMLoss(extractor="vgg19", layers=("relu1_2", "pool2", "conv3_1"), layer_weights=(0.5, 2.0, 1.5),
                             extractor_weights=None, queue_size=8, weight=3.0, reduction="sum")
    assert len(crit.queues) == 3 and crit.queue is crit.queues[0]
    vgg = crit.extractor
    weights = dict(zip(crit.layers, (0.5, 2.0, 1.5)))
    first = crit(u1, v1)
    fu, fv = vgg(u1), vgg(v1)
    want, tol = _float64_truth(fu, fv, weights, 3.0)  # float64, not the float32 reference: see there
    torch.testing.assert_close(first.double(), want, rtol=0, atol=tol)
    # the second call: each layer's queue holds its own rows of both batches
    second = crit(u2, v2)
    gu, gv = vgg(u2), vgg(v2)
    want2, tol2 = _float64_truth({n: torch.cat([fu[n], gu[n]]) for n in crit.layers},
                                 {n: torch.cat([fv[n], gv[n]]) for n in crit.layers}, weights, 3.0)
    torch.testing.assert_close(second.double(), want2, rtol=0, atol=tol2)
    assert [q.filled for q in crit.queues] == [6, 6, 6]
    assert [q.pred_queue.shape[1] for q in crit.queues] == [64 * 256, 128 * 16, 256 * 16]
    # every layer's queue travels in the state dict: a fresh loss resumes exactly
    fresh = fastloss.D2SMLoss(extractor="vgg19", layers=("relu1_2", "pool2", "conv3_1"), layer_weights=(0.5, 2.0, 1.5),
                              extractor_weights=None, queue_size=8, weight=3.0, reduction="sum")
    fresh.load_state_dict(crit.state_dict())
    assert any(k.startswith("more_queues.1.") for k in crit.state_dict())
    assert torch.equal(fresh(u1, v1), crit(u1, v1))
    # a single layer by name, any of them, keeps the one-queue state dict
    one = fastloss.D2SMLoss(extractor="vgg16", layer="relu3_2", extractor_weights=None, queue_size=4)
    one(u1[:2], v1[:2])
    assert one.extractor.layers == ("relu3_2",) and "queue.pred_queue" in one.state_dict()
    assert not any(k.startswith("more_queues") for k in one.state_dict())
    crit.reset()
    assert [q.filled for q in crit.queues] == [0, 0, 0]


def test_layer_arguments_errors():
    ident = nn.Identity()
    with pytest.raises(ValueError, match="unknown layer"):
        fastloss.D2SMLoss(layer="fc7", extractor_weights=None)
    with pytest.raises(ValueError, match="pass layer='relu1_1' or layers=.*not both"):
        fastloss.D2SMLoss(extractor=ident, layer="relu1_1", layers=("relu2_1",))
    with pytest.raises(ValueError, match="layers has repeats"):
        fastloss.D2SMLoss(extractor=ident, layers=("relu2_1", "relu2_1"))
    with pytest.raises(ValueError, match="layers must be a non-empty sequence"):
        fastloss.D2SMLoss(extractor=ident, layers=())
    with pytest.raises(ValueError, match="layer_weights has 1 entries for 2 layers"):
        fastloss.D2SMLoss(extractor=ident, layers=("a", "b"), layer_weights=(1.0,))
    with pytest.raises(ValueError, match="layer_weights must be finite numbers, got nan"):
        fastloss.D2SMLoss(extractor=ident, layers=("a", "b"), layer_weights=(1.0, math.nan))
    two = fastloss.D2SMLoss(extractor=_Conv(), layers=("a", "b"), queue_size=8)
    with pytest.raises(ValueError, match=r"returned one tensor but layers=\('a', 'b'\) asks for 2"):
        two(torch.rand(2, 3, 6, 6), torch.rand(2, 3, 6, 6))


# ----------------------------------------------------------------------------- internal patches
class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3).requires_grad_(False)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("backend", _backends(tiny=True))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_image_scope_is_the_mean_over_images_of_each_images_own_set(backend, reduction):
    torch.manual_seed(3)
    ext = _Conv().double()  # float64: a float32 reference is only good to ~1e-4 on KLs of 1e-3
    crit = fastloss.D2SMLoss(extractor=ext, internal_patches=True, patch_scope="image", patch_size=8, patch_stride=4,
                             queue_size=4, weight=2.0, reduction=reduction, backend=backend)
    u = torch.rand(3, 3, 16, 12, dtype=torch.float64, requires_grad=True)  # 3 x 2 = 6 patches each
    v = torch.rand(3, 3, 16, 12, dtype=torch.float64)
    u2 = u.detach().clone().requires_grad_()
    out = crit(u, v)
    want = 0
    for i in range(3):
        pu, pv = crit.patches(u2[i:i + 1]), crit.patches(v[i:i + 1])
        assert pu.shape[0] == 6
        want = want + d2sm_reference(ext(pu).flatten(1), ext(pv).flatten(1), "paper", 1e-6, reduction)
    want = 2.0 * want / 3
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-13)
    g = torch.tensor(1.9, dtype=torch.float64)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-9, atol=1e-12)
    # the sets are the images': a queue of 4 rows is no limit, and nothing is queued
    assert crit.queue.filled == 0
    # the batch scope over the same images pools all 18 patches instead (here: a queue big enough)
    pooled = fastloss.D2SMLoss(extractor=ext, internal_patches=True, patch_size=8, patch_stride=4, queue_size=18,
                               weight=2.0, reduction=reduction, backend=backend)
    ref_pooled = 2.0 * d2sm_reference(ext(pooled.patches(u2)).flatten(1), ext(pooled.patches(v)).flatten(1), "paper",
                                      1e-6, reduction)
    torch.testing.assert_close(pooled(u, v), ref_pooled, rtol=1e-10, atol=1e-13)
    assert not torch.allclose(ref_pooled, want)


def test_queue_size_error_names_the_size_the_setting_needs():
    """The paper's Cityscapes setting: 64 images of 512 x 512, windows of 224 at stride 56, i.e. 6 x 6 =
    36 patches each, 2304 per batch (meta tensors: the check runs before any feature is computed)."""
    crit = fastloss.D2SMLoss(extractor=_Conv(), internal_patches=True, patch_size=224, patch_stride=56)
    x = torch.empty(64, 3, 512, 512, device="meta")
    with pytest.raises(ValueError, match=r"D2SMLoss: queue_size=256 is smaller than the batch \(64 images x 36 "
                                         r"patches = 2304 rows .*needs queue_size >= 2304, or patch_scope='image'"):
        crit(x, x)
    plain = fastloss.D2SMLoss(extractor=_Conv(), queue_size=8)
    y = torch.empty(9, 3, 8, 8, device="meta")
    with pytest.raises(ValueError, match=r"queue_size=8 is smaller than the batch \(9 rows\): this setting needs "
                                         r"queue_size >= 9$"):
        plain(y, y)
    assert crit.queue.filled == 0 and plain.queue.filled == 0


def test_patch_scope_errors():
    with pytest.raises(ValueError, match=r"patch_scope must be one of \('batch', 'image'\), got 'images'"):
        fastloss.D2SMLoss(extractor=_Conv(), internal_patches=True, patch_scope="images")
    with pytest.raises(ValueError, match="patch_scope='image' .* needs internal_patches=True"):
        fastloss.D2SMLoss(extractor=_Conv(), patch_scope="image")
    one = fastloss.D2SMLoss(extractor=_Conv(), internal_patches=True, patch_scope="image", patch_size=8,
                            patch_stride=8)
    with pytest.raises(ValueError, match=r"needs at least 2 patches per image, got 1 \(patch_size=8, patch_stride=8 "
                                         r"on 8 x 12 images\)"):
        one(torch.rand(2, 3, 8, 12), torch.rand(2, 3, 8, 12))
