"""What a new user meets in the first hour (issue 24), each bad input with its test:

- [-1, 1] images: every image loss's range warning says to build that loss with
  ``input_range=(-1, 1)``, which each of them takes (MDFLoss too); following the hint silences the
  warning, and the loss on [-1, 1] images equals the (0, 1) loss of ``(x + 1) / 2``.
- A D2SM set that gives exactly 0 (two rows in paper mode; one row in either mode): ``d2sm_kl``
  warns once per call site, ``D2SMQueue`` and ``D2SMLoss`` once per module, saying why and what
  queue the paper uses; sets of 3 rows or more never warn, and the decision reads nothing from
  the device.
"""
import contextlib
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastloss
from fastloss import _backend

_X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
_Y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

IMAGE_LOSSES = {
    "PerceptualLoss": lambda **kw: fastloss.PerceptualLoss(extractor_weights=None, layers=("relu2_2",), **kw),
    "PDLLoss": lambda **kw: fastloss.PDLLoss(extractor_weights=None, layers=("relu2_2",), **kw),
    "D2SMLoss": lambda **kw: fastloss.D2SMLoss(extractor_weights=None, extractor="vgg16", layer="relu2_2",
                                               queue_size=8, **kw),
    "MDFLoss": lambda **kw: fastloss.MDFLoss(scales=2, **kw),
    "FDLLoss": lambda **kw: fastloss.FDLLoss(extractor_weights=None, layers=("relu2_2",), num_proj=4, **kw),
}


@contextlib.contextmanager
def recorded(action="always"):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter(action)
        yield w


def _messages(w, needle):
    return [str(m.message) for m in w if needle in str(m.message)]


# ============================================================================ input_range
@pytest.mark.parametrize("name", sorted(IMAGE_LOSSES))
def test_the_minus_one_one_hint_is_followed_and_the_warning_goes_away(name):
    make = IMAGE_LOSSES[name]
    u, v = _X * 2 - 1, _Y * 2 - 1  # [-1, 1] images
    with recorded() as w:
        torch.manual_seed(0)
        make()(u, v)
    (msg,) = _messages(w, "clearly outside")
    hint = f"{name}(..., input_range=(-1, 1))"
    assert msg.startswith(f"{name}: images range over [") and f"They look like [-1, 1]: build the loss as {hint}" in msg
    # follow it: the loss takes the argument, and the same images no longer warn
    with recorded() as w:
        torch.manual_seed(0)
        make(input_range=(-1, 1))(u, v)
    assert _messages(w, "clearly outside") == []


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("formula", ["published", "paper"])
def test_mdf_input_range_is_the_unit_range_loss_of_the_mapped_images(backend, formula):
    if backend == "auto" and not _backend.status("cpu")[0]:
        pytest.skip("the cpu backend is not built")
    u01, v01 = _X.clone().requires_grad_(), _Y
    u11 = (_X * 2 - 1).requires_grad_()
    v11 = _Y * 2 - 1
    unit = fastloss.MDFLoss(scales=3, backend=backend, formula=formula)
    signed = fastloss.MDFLoss(scales=3, backend=backend, formula=formula, input_range=(-1, 1))
    a, b = unit(u01, v01), signed(u11, v11)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    a.backward()
    b.backward()
    torch.testing.assert_close(u11.grad, 0.5 * u01.grad, rtol=1e-5, atol=1e-12)  # d/dx of (x + 1) / 2
    assert signed.input_range == (-1, 1) and "input_range=(-1, 1)" in repr(signed)


def test_mdf_input_range_checked_and_other_hints():
    for bad in ((0, 255), (-1, 2), "0,1", None):
        with pytest.raises(ValueError, match=r"^MDFLoss: input_range must be \(0, 1\) or \(-1, 1\), got "):
            fastloss.MDFLoss(input_range=bad)
    assert fastloss.MDFLoss(scales=1).input_range == (0, 1)
    # a [0, 255] target with input_range=(-1, 1): the hint maps to [-1, 1], not to [0, 1]
    with recorded() as w:
        fastloss.MDFLoss(scales=1, input_range=(-1, 1))(_X * 255, _Y * 255)
    (msg,) = _messages(w, "clearly outside")
    assert "expected [-1, 1]" in msg and "x / 127.5 - 1" in msg and "divide by 255" not in msg
    built = fastloss.build_loss({"type": "MDFLoss", "scales": 1, "input_range": [-1, 1]})  # from a config
    assert built.input_range == (-1, 1)


# ============================================================================ D2SM: a set that gives 0
def _rows(n, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g), torch.rand(n, d, generator=g)


def test_d2sm_kl_two_rows_in_paper_mode_warns_once_per_call_site():
    p, t = _rows(2)
    with recorded("default") as w:  # Python's default filter: once per call site
        for _ in range(3):
            value = fastloss.d2sm_kl(p, t)  # one call site
        fastloss.d2sm_kl(p, t, reduction="sum")  # another
    assert abs(float(value)) < 1e-6
    msgs = _messages(w, "d2sm_kl: the D2SM set has 2 rows")
    assert len(msgs) == 2, msgs
    assert all(m.category is UserWarning for m in w)
    assert w[0].filename == __file__  # points at the caller's line
    m = msgs[0]
    assert "paper mode over fewer than 3 rows is 0 (up to rounding), and so is its gradient" in m and "probability 1" in m
    assert "queue of 256 feature rows" in m and "mode='pkt'" in m


def test_d2sm_kl_no_warning_from_three_rows_or_in_pkt_mode():
    p, t = _rows(3)
    with recorded() as w:
        assert float(fastloss.d2sm_kl(p, t)) > 0
        assert float(fastloss.d2sm_kl(*_rows(2), mode="pkt")) > 0  # pkt over two rows is not 0
        fastloss.d2sm_kl(*_rows(64))
    assert _messages(w, "D2SM set") == []


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_d2sm_queue_warns_once_while_the_set_gives_zero(backend):
    queue = fastloss.D2SMQueue(8, backend=backend)
    with recorded() as w:
        first = queue(*_rows(2, seed=0))
    assert abs(float(first)) < 1e-6  # 0, up to the fused kernels' rounding
    (msg,) = _messages(w, "D2SM set")
    assert msg.startswith("D2SMQueue: the D2SM set has 2 rows on this call (2 new, 0 from earlier calls)")
    assert "queue_size=8" in msg and "once it holds 3 rows" in msg and "queue of 256 feature rows" in msg
    assert w[0].filename == __file__
    with recorded() as w:
        assert float(queue(*_rows(2, seed=1))) > 0  # 4 rows now
        queue.reset()
        assert abs(float(queue(*_rows(2, seed=2)))) < 1e-6  # 0 again, but this queue has said so once
    assert _messages(w, "D2SM set") == []
    # sets of 3 rows or more from the first call on: never a warning
    with recorded() as w:
        other = fastloss.D2SMQueue(8, backend=backend)
        for s in range(4):
            assert float(other(*_rows(3, seed=s))) > 0
    assert _messages(w, "D2SM set") == []


def test_d2sm_queue_one_row_and_queue_size_two():
    with recorded() as w:
        q1 = fastloss.D2SMQueue(8, mode="pkt")
        assert float(q1(*_rows(1))) == 0.0  # one row: 0 in either mode
        assert float(q1(*_rows(1, seed=1))) > 0  # two rows: pkt is not 0
    (msg,) = _messages(w, "D2SM set")
    assert "has 1 row on this call" in msg and "pkt mode over fewer than 2 rows" in msg
    with recorded() as w:
        q2 = fastloss.D2SMQueue(2)
        for s in range(3):
            assert abs(float(q2(*_rows(2, seed=s)))) < 1e-6  # always 2 rows
    (msg,) = _messages(w, "D2SM set")
    assert "queue_size=2 keeps every set this small" in msg


def test_d2sm_queue_counts_rows_from_a_loaded_state():
    src = fastloss.D2SMQueue(8)
    with recorded():
        src(*_rows(2)), src(*_rows(2, seed=1))
    dst = fastloss.D2SMQueue(8)
    dst.load_state_dict(src.state_dict())
    with recorded() as w:
        assert float(dst(*_rows(2, seed=2))) > 0  # 6 rows: the loaded 4 and these 2
    assert _messages(w, "D2SM set") == []


def test_d2sm_loss_warns_once_per_module_with_its_name():
    torch.manual_seed(0)
    crit = fastloss.D2SMLoss(extractor_weights=None, extractor="vgg16", layers=("relu1_2", "relu2_2"), queue_size=8)
    with recorded() as w:
        first = crit(_X, _Y)
        second = crit(_X, _Y)
        crit(_X, _Y)
    assert abs(float(first)) < 1e-6 and float(second) > 0
    msgs = _messages(w, "D2SM set")
    assert len(msgs) == 1, msgs  # two layers, two queues: one warning
    assert msgs[0].startswith("D2SMLoss: the D2SM set has 2 rows on this call")
    assert w[0].filename == __file__  # the user's line, not torch.nn's
    with recorded() as w:
        torch.manual_seed(0)
        fastloss.D2SMLoss(extractor_weights=None, extractor="vgg16", layer="relu1_2", queue_size=8)(
            torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16))
    assert _messages(w, "D2SM set") == []


def test_d2sm_loss_image_scope_with_two_patches_per_image():
    torch.manual_seed(0)
    crit = fastloss.D2SMLoss(extractor_weights=None, extractor="vgg16", layer="relu1_2", internal_patches=True,
                             patch_size=16, patch_stride=16, patch_scope="image")
    u, v = torch.rand(2, 3, 16, 32), torch.rand(2, 3, 16, 32)  # 2 patches per image
    with recorded() as w:
        assert abs(float(crit(u, v))) < 1e-6
        crit(u, v)
    (msg,) = _messages(w, "D2SM set")
    assert msg.startswith("D2SMLoss: the D2SM set has 2 rows (patch_scope='image'") and "patch_stride" in msg
    with recorded() as w:
        assert float(crit(torch.rand(2, 3, 16, 48), torch.rand(2, 3, 16, 48))) > 0  # 3 patches per image
    assert _messages(w, "D2SM set") == []


# ---- no host read for the decision -------------------------------------------------------
_OWN = str(Path(fastloss.__file__).parent.resolve())
_SYNCS = ("item", "__int__", "__bool__", "__float__", "__index__", "tolist")


@contextlib.contextmanager
def _no_host_read_from(files):
    """Fail on a host read of a tensor (``.item()``, ``int()``, ...) made from ``files``."""
    calls, saved = [], [(m, getattr(torch.Tensor, m)) for m in _SYNCS]

    def guard(name, original):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if str(Path(caller).resolve()) in files:
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)
        return wrapped

    try:
        for name, original in saved:
            setattr(torch.Tensor, name, guard(name, original))
        yield calls
    finally:
        for name, original in saved:
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("backend", ["triton", "reference-device-queue"])
def test_the_few_rows_decision_reads_nothing_from_the_device(backend, monkeypatch):
    """The queue's fill level lives on the device on triton / cuda: the warning must come from
    Python's own count. Here the queue's and the loss's code (outside the kernels) may not read a
    tensor on the host in the calls that decide, and ``filled`` (a host read) is never asked."""
    if backend == "triton":
        if not _backend.status("triton")[0]:
            pytest.skip("the triton backend cannot run here")
        queue = fastloss.D2SMQueue(8, backend="triton")
        files = {str(Path(_OWN, "d2sm", "queue.py")), str(Path(_OWN, "d2sm", "loss.py"))}
    else:  # the decision alone: forbid reading the fill level at all, whatever the backend does
        queue = fastloss.D2SMQueue(8, backend="reference")
        files = set()
    original = type(queue).filled

    def forbidden(self):
        if backend != "triton":
            return original.fget(self)  # the reference backend reads it for its slices
        raise AssertionError("D2SMQueue.filled read during a triton step")

    monkeypatch.setattr(type(queue), "filled", property(forbidden))
    warned = []
    monkeypatch.setattr(type(queue), "_count_rows", _spy(type(queue)._count_rows, warned))
    with recorded() as w, _no_host_read_from(files) as calls:
        for s in range(3):  # sets of 1, 2, 3 rows
            x, y = _rows(1, seed=s)
            queue(x.requires_grad_(), y).backward()
    assert calls == []
    assert warned == [0, 1, 2]  # Python's count before each call
    assert len(_messages(w, "D2SM set")) == 1


def _spy(method, seen):
    def wrapped(self, n):
        seen.append(self._rows_known)
        return method(self, n)
    return wrapped


def test_the_zero_warning_is_not_traced_by_torch_compile():
    """Under torch.compile the warning is skipped (no graph break): a fullgraph compile of
    d2sm_kl over two rows in paper mode traces, and gives the eager value, 0."""
    step = torch.compile(lambda x, y: fastloss.d2sm_kl(x, y, backend="reference"), fullgraph=True, backend="eager")
    torch._dynamo.reset()
    assert abs(float(step(*_rows(2)))) < 1e-6
