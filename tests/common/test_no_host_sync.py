"""No host synchronisation in a training step on the triton path (issue 13).

A GPU step that calls ``.item()``, ``int()``, ``bool()``, ``float()`` or ``.tolist()`` on a tensor,
or builds a tensor from host data (``torch.tensor`` / ``torch.as_tensor``, a host-to-device copy
from pageable memory), waits for the GPU, and breaks CUDA-graph capture. Here, on CPU tensors
under TRITON_INTERPRET=1, those methods and functions are wrapped during forward + backward steps
taken after a warm-up (which may build caches), and any call from fastloss's own code (the
``fastloss`` package and its ``kernels``) fails the test. Calls from torch or from Triton's
interpreter are not fastloss's and pass. The acceptance run adds
``torch.cuda.set_sync_debug_mode("error")`` and CUDA-graph capture on a GPU.
"""
import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

pytest.importorskip("triton")

import fastloss  # noqa: E402
import fastloss.kernels  # noqa: E402
from fastloss import _backend  # noqa: E402
from fastloss.kernels import pdl as triton_pdl  # noqa: E402

if not triton_pdl._interpreting():
    pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors through the Triton kernels)", allow_module_level=True)
if not _backend.status("triton")[0]:
    pytest.skip("the triton backend cannot run here", allow_module_level=True)

OWN = tuple(str(Path(p).resolve()) for p in [Path(fastloss.__file__).parent, *fastloss.kernels.__path__])
METHODS = ("item", "__int__", "__bool__", "__float__", "__index__", "tolist")
FUNCTIONS = ("tensor", "as_tensor")


def _own(filename):
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return path.startswith(OWN)


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Fail on a host sync, as listed in the module docstring, made by fastloss's own code."""
    calls = []

    def guard(name, original):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1)
            if _own(caller.f_code.co_filename):
                where = f"{caller.f_code.co_filename}:{caller.f_lineno} ({caller.f_code.co_name})"
                calls.append(f"{name} at {where}")
                raise HostSync(f"host sync: {name} at {where}")
            return original(*args, **kwargs)
        return wrapped

    saved = [(torch.Tensor, m, getattr(torch.Tensor, m)) for m in METHODS]
    saved += [(torch, f, getattr(torch, f)) for f in FUNCTIONS]
    try:
        for owner, name, original in saved:
            setattr(owner, name, guard(f"{'Tensor.' if owner is torch.Tensor else 'torch.'}{name}", original))
        yield calls
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    assert not calls, calls  # also when fastloss caught the exception


def _pdl_step(p, target_grad, gen):
    x = torch.randn(2, 3, 37, generator=gen, requires_grad=True)
    y = torch.randn(2, 3, 37, generator=gen, requires_grad=target_grad)
    loss = fastloss.pdl(x, y, p=p, backend="triton")
    (loss * 1.5).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("target_grad", [False, True])
def test_pdl_step_has_no_host_sync(p, target_grad, monkeypatch):
    monkeypatch.setattr(triton_pdl, "TRITON_MAX_SORT_N", 16)  # both regimes: 8 in-program, 37 past the cap
    gen = torch.Generator().manual_seed(0)
    _pdl_step(p, target_grad, gen)  # warm-up
    with no_host_sync():
        loss, grad = _pdl_step(p, target_grad, gen)
    assert torch.isfinite(loss).all() and grad.abs().sum() > 0


class _TinyExtractor(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("mode", ["paper", "pkt"])
def test_d2sm_queue_steps_have_no_host_sync(mode):
    gen = torch.Generator().manual_seed(1)
    queue = fastloss.D2SMQueue(7, mode=mode, backend="triton")
    ref = fastloss.D2SMQueue(7, mode=mode, backend="reference")

    def step(guarded):
        x = torch.randn(3, 5, generator=gen).relu()
        y = torch.randn(3, 5, generator=gen).relu()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with no_host_sync() if guarded else contextlib.nullcontext():
            la = queue(xa, y)
            la.backward()
        lb = ref(xb, y)
        lb.backward()
        torch.testing.assert_close(la.detach(), lb.detach(), rtol=2e-4, atol=1e-7)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=2e-4, atol=1e-6)

    step(False)  # warm-up: allocates the buffers
    for _ in range(4):  # set sizes 6, 7, 7, 7: filling, then wrapping
        step(True)
    assert queue.filled == 7 and queue.ptr == 15 % 7


def test_d2sm_loss_step_has_no_host_sync():
    torch.manual_seed(2)
    crit = fastloss.D2SMLoss(extractor=_TinyExtractor(), queue_size=6, backend="triton")
    restored = torch.rand(2, 3, 6, 6, requires_grad=True)
    clean = torch.rand(2, 3, 6, 6)
    crit(restored, clean).backward()  # warm-up
    for _ in range(3):
        restored.grad = None
        with no_host_sync():
            loss = crit(restored, clean)
            loss.backward()
        assert torch.isfinite(loss) and restored.grad.abs().sum() > 0


def test_bfloat16_backbone_and_combined_steps_have_no_host_sync():
    """Issue 21's paths: the bfloat16 VGG (its cached weight casts), its channels_last layout, the
    float32 formula on upcast features, and combine()'s shared pass, with the triton backend."""
    torch.manual_seed(3)
    perc = fastloss.PerceptualLoss(layers=("relu1_2",), extractor_weights=None, compute_dtype=torch.bfloat16)
    pdl = fastloss.PDLLoss(layers=("relu1_2",), extractor_weights=None, compute_dtype=torch.bfloat16,
                           pixel_weight=0.0, backend="triton")
    pdl.extractor.load_state_dict(perc.vgg.state_dict())
    restored = torch.rand(2, 3, 8, 8, requires_grad=True)
    clean = torch.rand(2, 3, 8, 8)
    for crit in (pdl, fastloss.combine(perc, pdl)):
        crit(restored, clean).backward()  # warm-up: the range check's one read, the casts
        restored.grad = None
        with no_host_sync():
            loss = crit(restored, clean)
            loss.backward()
        assert torch.isfinite(loss) and restored.grad.abs().sum() > 0


def test_mdf_step_has_no_host_sync(monkeypatch):
    from fastloss.kernels import mdf as triton_mdf

    monkeypatch.setattr(triton_mdf, "TRITON_BLOCK", 512)  # fewer interpreted programs
    crit = fastloss.MDFLoss(scales=2, backend="triton")
    gen = torch.Generator().manual_seed(3)
    pred = torch.rand(1, 3, 14, 14, generator=gen, requires_grad=True)
    target = torch.rand(1, 3, 14, 14, generator=gen)
    crit(pred, target).backward()  # warm-up: the descriptor tables and weights are built once
    pred.grad = None
    with no_host_sync():
        loss = crit(pred, target)
        loss.backward()
    assert torch.isfinite(loss) and pred.grad.abs().sum() > 0


def test_fdl_step_has_no_host_sync():
    """FDL (issue 23): FFT, magnitude / phase, the chunked projections, the fused sort's forward on
    the triton row, the sign scattered to its own position, the transposed-convolution backward."""
    torch.manual_seed(4)
    ext = _TinyExtractor()
    crit = fastloss.FDLLoss(layers=("x",), extractor=_Named(ext), channels=(4,), num_proj=3, patch_size=3,
                            phase_weight=2.0, backend="triton")
    restored = torch.rand(2, 3, 8, 9, requires_grad=True)
    clean = torch.rand(2, 3, 8, 9)
    crit(restored, clean).backward()  # warm-up: the range check's one read
    restored.grad = None
    with no_host_sync():
        loss = crit(restored, clean)
        loss.backward()
    assert torch.isfinite(loss) and restored.grad.abs().sum() > 0


class _Named(nn.Module):
    """The tiny extractor's features as {"x": features}."""
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"x": self.inner(x)}


# ------------------------------------------------------------------------------ the check itself
MUTANTS = ["t.item()", "int(t)", "bool(t)", "float(t)", "t.tolist()", "range(10)[t]", "torch.tensor([1.0])",
           "torch.as_tensor([1.0])"]


@pytest.mark.parametrize("sync", MUTANTS)
def test_guard_catches_a_sync_inserted_into_fastloss(sync, monkeypatch):
    """Mutation check: the same pdl step with one host sync compiled as if it sat in
    fastloss/pdl/ops.py (a wrapper of the triton row's forward) fails; the wrapper alone, clean, passes."""
    from fastloss.pdl import ops as pdl_ops

    row = pdl_ops.IMPLS["triton"]
    env = {"torch": torch, "original": row.forward}
    src = "def forward(pred, *args):\n    t = pred.sum() > 0\n    {}\n    return original(pred, *args)\n"
    exec(compile(src.format("pass"), pdl_ops.__file__, "exec"), env)
    monkeypatch.setitem(pdl_ops.IMPLS, "triton", dataclasses.replace(row, forward=env["forward"]))
    gen = torch.Generator().manual_seed(4)
    _pdl_step(1, False, gen)
    with no_host_sync():
        _pdl_step(1, False, gen)  # the clean wrapper: no sync
    exec(compile(src.format(sync), pdl_ops.__file__, "exec"), env)
    monkeypatch.setitem(pdl_ops.IMPLS, "triton", dataclasses.replace(row, forward=env["forward"]))
    with pytest.raises(HostSync, match="host sync"):
        with no_host_sync():
            _pdl_step(1, False, gen)


@pytest.mark.skipif(not _backend.status("cpu")[0], reason="needs the C++ CPU extension")
def test_guard_catches_the_host_reads_the_cpu_queue_keeps():
    """The cpu backend's queue still reads its fill level and pointer on the host (int(ptr), a
    CPU tensor: no sync there); the guard sees those reads, as it saw the triton path's before."""
    queue = fastloss.D2SMQueue(7, backend="cpu")
    x, y = torch.rand(3, 5), torch.rand(3, 5)
    queue(x, y)
    with pytest.raises(HostSync, match=r"Tensor.__int__ at .*d2sm/queue.py"):
        with no_host_sync():
            queue(x, y)


def test_guard_ignores_syncs_outside_fastloss():
    t = torch.ones(())
    with no_host_sync():
        assert t.item() == 1.0 and int(t) == 1 and torch.tensor([1.0]).numel() == 1
