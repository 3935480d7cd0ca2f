"""D2SMQueue and D2SMLoss: the incremental cache against from-scratch recomputation, warm-up,
reset, checkpoints, internal patches and the clear errors."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import fastloss
from fastloss.d2sm import d2sm_reference

from conftest import requires_cpu_ext

MODES = ("paper", "pkt")


class History:
    """The set the issue defines, kept by hand: the batch plus the queue_size - B latest rows."""

    def __init__(self, queue_size):
        self.queue_size, self.pred, self.target = queue_size, [], []

    def loss_and_grad(self, x, y, mode):
        keep = self.queue_size - x.shape[0]
        hp = self.pred[max(0, len(self.pred) - keep):] if keep > 0 else []
        ht = self.target[max(0, len(self.target) - keep):] if keep > 0 else []
        x2 = x.detach().clone().requires_grad_()
        loss = d2sm_reference(torch.cat([x2] + hp), torch.cat([y] + ht), mode)
        (grad,) = torch.autograd.grad(loss, x2)
        self.pred += list(x.detach().flatten(1).split(1))
        self.target += list(y.detach().flatten(1).split(1))
        return loss.detach(), grad


def _batch(b, d, dtype, gen):
    x = torch.randn(b, d, generator=gen, dtype=torch.float64).relu()
    y = (torch.randn(b, d, generator=gen, dtype=torch.float64).relu() + 0.3 * x).to(dtype)
    return x.to(dtype).requires_grad_(), y


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_against_history(backend, mode, dtype, queue_size, b, d, steps, tol):
    """Each call's loss and gradient against the float64 reference recomputed from scratch over the
    same set (the exact value for these inputs); returns the worst relative errors."""
    gen = torch.Generator().manual_seed(1)
    queue = fastloss.D2SMQueue(queue_size, mode=mode, backend=backend)
    hist = History(queue_size)
    worst_loss = worst_grad = 0.0
    for step in range(steps):
        x, y = _batch(b, d, dtype, gen)
        loss = queue(x, y)
        ref, ref_grad = hist.loss_and_grad(x.double(), y.double(), mode)
        loss.backward()
        assert loss.dtype == dtype
        worst_loss = max(worst_loss, _rel(loss.detach(), ref))
        worst_grad = max(worst_grad, _rel(x.grad, ref_grad))
        assert queue.filled == min((step + 1) * b, queue_size)
    assert worst_loss <= tol and worst_grad <= tol, (worst_loss, worst_grad)
    return queue


# float64: the cache changes nothing (1e-10). float32: within float32's own noise, 5e-5 of the exact
# value (measured up to 2e-5); a float32 recomputation from scratch in plain PyTorch is off by up to
# 1.7e-4 on these losses (KL values of 1e-3 to 1e-6, sums of terms of both signs).
F32_TOL = 5e-5


@requires_cpu_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_cache_matches_from_scratch_after_many_rotations(mode, dtype):
    # queue_size 29 and batch 4: slots wrap at a different place on every pass; 60 calls = 8 rotations
    run_against_history("cpu", mode, dtype, 29, 4, 37, 60, F32_TOL if dtype == torch.float32 else 1e-10)


@requires_cpu_ext
@pytest.mark.parametrize("mode", MODES)
def test_cpu_cache_matches_from_scratch_larger_set(mode):
    run_against_history("cpu", mode, torch.float32, 256, 16, 1024, 20, F32_TOL)  # 4 rotations of 256 rows


@pytest.mark.parametrize("mode", MODES)
def test_reference_queue_matches_from_scratch(mode):
    run_against_history("reference", mode, torch.float64, 11, 3, 9, 20, 1e-10)


@requires_cpu_ext
def test_cpu_and_reference_queues_agree_step_by_step():
    gen = torch.Generator().manual_seed(3)
    qa = fastloss.D2SMQueue(20, mode="pkt", backend="cpu")
    qb = fastloss.D2SMQueue(20, mode="pkt", backend="reference")
    for _ in range(12):
        x, y = _batch(6, 25, torch.float32, gen)
        xb = x.detach().clone().requires_grad_()
        la, lb = qa(x, y), qb(xb, y)
        la.backward()
        lb.backward()
        assert _rel(la.detach(), lb.detach()) < 1e-5 and _rel(x.grad, xb.grad) < 1e-5


@requires_cpu_ext
def test_warm_up_and_first_call_with_one_row():
    queue = fastloss.D2SMQueue(8, mode="pkt")  # paper mode is identically 0 on 2 rows
    x = torch.randn(1, 5, requires_grad=True)
    loss = queue(x, torch.randn(1, 5))
    assert loss.item() == 0.0 and loss.requires_grad  # a set of one row: zero, with a graph
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert queue.filled == 1
    x2, y2 = torch.randn(1, 5, requires_grad=True), torch.randn(1, 5)
    hist_p, hist_t = x.detach(), queue.target_queue[:1].clone()
    loss2 = queue(x2, y2)  # now the set has 2 rows
    assert queue.filled == 2 and loss2.item() > 0
    ref = d2sm_reference(torch.cat([x2, hist_p]), torch.cat([y2, hist_t]), "pkt")
    torch.testing.assert_close(loss2, ref, rtol=1e-5, atol=1e-7)


@requires_cpu_ext
def test_reset_empties_the_queue_and_allows_a_new_width():
    gen = torch.Generator().manual_seed(0)
    queue = fastloss.D2SMQueue(10)
    for _ in range(3):
        queue(*_batch(4, 6, torch.float32, gen))
    assert queue.filled == 10
    with pytest.raises(ValueError, match="D=7 per row but the queue holds D=6; call reset"):
        queue(*_batch(4, 7, torch.float32, gen))
    queue.reset()
    assert queue.filled == 0 and queue.pred_queue is None
    x, y = _batch(4, 7, torch.float32, gen)
    torch.testing.assert_close(queue(x, y), d2sm_reference(x, y), rtol=1e-5, atol=1e-7)
    assert queue.filled == 4


@requires_cpu_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_state_dict_round_trip_resumes_exactly(backend):
    gen = torch.Generator().manual_seed(5)
    queue = fastloss.D2SMQueue(17, mode="paper", backend=backend)
    for _ in range(7):
        queue(*_batch(5, 12, torch.float32, gen))
    state = queue.state_dict()
    assert {"pred_queue", "target_queue", "pred_sim", "target_sim", "pred_rowsum", "target_rowsum"} <= set(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = fastloss.D2SMQueue(17, mode="paper", backend=backend)  # fresh: no buffers yet
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.filled == queue.filled and resumed.ptr == queue.ptr
    used = fastloss.D2SMQueue(17, mode="paper", backend=backend)  # one that already holds other rows
    used(*_batch(3, 12, torch.float32, torch.Generator().manual_seed(9)))
    used.load_state_dict(copy.deepcopy(state))
    for _ in range(6):
        x, y = _batch(5, 12, torch.float32, gen)
        outs = []
        for q in (queue, resumed, used):
            xq = x.detach().clone().requires_grad_()
            loss = q(xq, y)
            loss.backward()
            outs.append((loss.detach(), xq.grad))
        for loss, grad in outs[1:]:
            assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])


@requires_cpu_ext
def test_module_casts_keep_the_queue_working():
    gen = torch.Generator().manual_seed(8)
    queue = fastloss.D2SMQueue(12, mode="pkt")
    hist = History(12)
    for step in range(5):
        if step == 2:
            queue.half()  # as D2SMLoss(...).half() would: every floating buffer becomes float16
        x, y = _batch(4, 9, torch.float32, gen)
        loss = queue(x, y)
        ref, _ = hist.loss_and_grad(x.double(), y.double(), "pkt")
        assert queue.pred_queue.dtype == torch.float32 and queue.pred_rowsum.dtype == torch.float64
        assert _rel(loss.detach(), ref) < (5e-5 if step < 2 else 1e-2)  # the float16 copy lost precision


@requires_cpu_ext
def test_state_dict_of_an_empty_queue_empties_and_sizes_must_match():
    gen = torch.Generator().manual_seed(2)
    queue = fastloss.D2SMQueue(9)
    queue(*_batch(3, 4, torch.float32, gen))
    queue.load_state_dict(fastloss.D2SMQueue(9).state_dict())
    assert queue.pred_queue is None and queue.filled == 0
    with pytest.raises(ValueError, match="queue_size=12, this queue has queue_size=9"):
        other = fastloss.D2SMQueue(12)
        other(*_batch(3, 4, torch.float32, gen))
        queue.load_state_dict(other.state_dict())


def test_queue_bad_arguments():
    with pytest.raises(ValueError, match="queue_size must be an int >= 2, got 1"):
        fastloss.D2SMQueue(1)
    with pytest.raises(ValueError, match="queue_size must be an int >= 2, got 3.5"):
        fastloss.D2SMQueue(3.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        fastloss.D2SMQueue(8, mode="PKT")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastloss.D2SMQueue(8, backend="fast")
    queue = fastloss.D2SMQueue(4)
    with pytest.raises(ValueError, match=r"queue_size=4 is smaller than the batch \(5 rows\)"):
        queue(torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"pred_feats and target_feats shapes differ: \(3, 3\) vs \(3, 4\)"):
        queue(torch.randn(3, 3), torch.randn(3, 4))
    with pytest.raises(TypeError, match="pred_feats must be a floating-point tensor, got dtype torch.int64"):
        queue(torch.ones(3, 3, dtype=torch.long), torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 dims"):
        queue(torch.randn(3), torch.randn(3))
    assert queue.filled == 0  # nothing was written by a call that failed its checks
    queue(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="the queue is on cpu but the features are on meta; move the module"):
        queue(torch.randn(2, 3, device="meta"), torch.randn(2, 3, device="meta"))
    assert queue.filled == 2


# ------------------------------------------------------------------------- D2SMLoss
@requires_cpu_ext
def test_d2sm_loss_with_random_vgg19_matches_hand_composition():
    torch.manual_seed(4)
    # float64 throughout: a random VGG19's conv5_4 rows are nearly parallel, so the KL is tiny (1e-7)
    crit = fastloss.D2SMLoss(queue_size=6, mode="pkt", weight=2.5, extractor_weights=None).double()
    assert crit.extractor.arch == "vgg19" and crit.extractor.layers == ("conv5_4",)
    hist = History(6)
    for _ in range(3):
        u = torch.rand(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)  # conv5_4 is 512 x 1 x 1
        v = torch.rand(2, 3, 16, 16, dtype=torch.float64)
        out = crit(u, v)
        fu = crit.extractor(u)["conv5_4"]  # before its ReLU: negative values present
        assert (fu < 0).any()
        with torch.no_grad():
            fv = crit.extractor(v)["conv5_4"]
        loss, _ = hist.loss_and_grad(fu.flatten(1), fv.flatten(1), "pkt")
        torch.testing.assert_close(out, 2.5 * loss, rtol=1e-9, atol=0)
        out.backward()
        assert u.grad is not None and u.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in crit.extractor.parameters())
    assert "queue.pred_queue" in crit.state_dict()


class TinyExtractor(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.conv, self.as_dict = nn.Conv2d(3, 4, 3), as_dict

    def forward(self, x):
        y = self.conv(x)
        return {"conv5_4": y} if self.as_dict else y


@requires_cpu_ext
@pytest.mark.parametrize("as_dict", [False, True])
def test_internal_patches_are_the_samples(as_dict):
    torch.manual_seed(0)
    ext = TinyExtractor(as_dict)
    crit = fastloss.D2SMLoss(extractor=ext, internal_patches=True, patch_size=16, patch_stride=8, queue_size=64)
    u, v = torch.rand(2, 3, 40, 48), torch.rand(2, 3, 40, 48)
    patches = crit.patches(u)
    assert patches.shape == (2 * 4 * 5, 3, 16, 16)  # (40-16)/8+1 = 4 rows, (48-16)/8+1 = 5 columns
    torch.testing.assert_close(patches[1 * 20 + 2 * 5 + 3], u[1, :, 16:32, 24:40])
    out = crit(u, v)
    ref = d2sm_reference(ext(crit.patches(u)) if not as_dict else ext(crit.patches(u))["conv5_4"],
                         (ext(crit.patches(v)) if not as_dict else ext(crit.patches(v))["conv5_4"]).detach())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"images of \(12, 48\) are smaller than patch_size=16"):
        crit(torch.rand(1, 3, 12, 48), torch.rand(1, 3, 12, 48))


def test_d2sm_loss_bad_arguments():
    with pytest.raises(ValueError, match="extractor must be 'vgg16', 'vgg19' or an nn.Module"):
        fastloss.D2SMLoss(extractor="resnet", extractor_weights=None)
    with pytest.raises(ValueError, match="patch_stride must be an int >= 1, got 0"):
        fastloss.D2SMLoss(extractor=TinyExtractor(), patch_stride=0)
    crit = fastloss.D2SMLoss(extractor=TinyExtractor(), queue_size=8)
    with pytest.raises(ValueError, match=r"restored and clean shapes differ"):
        crit(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9))
    with pytest.raises(ValueError, match=r"restored must be \(B, C, H, W\)"):
        crit(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="clean must be a floating-point tensor"):
        crit(torch.rand(2, 3, 8, 8), torch.ones(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="did not return layer 'conv5_4'"):
        fastloss.D2SMLoss(extractor=nn.ModuleDict(), queue_size=8).__class__  # construction is fine
        bad = fastloss.D2SMLoss(extractor=_DictWithout(), queue_size=8)
        bad(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(FileNotFoundError):
        fastloss.D2SMLoss(extractor_weights="/nonexistent/vgg19.pth")


class _DictWithout(nn.Module):
    def forward(self, x):
        return {"relu1_1": x}


@requires_cpu_ext
def test_reset_on_the_loss_module():
    crit = fastloss.D2SMLoss(extractor=TinyExtractor(), queue_size=8)
    crit(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))
    assert crit.queue.filled == 2
    crit.reset()
    assert crit.queue.filled == 0
