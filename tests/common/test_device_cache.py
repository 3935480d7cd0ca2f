"""The device caches of the Triton kernels (``_ops.DeviceCache``): MDF's shape tables, MDF's
LeakyReLU slope and D2SM's eps, built once instead of once per call, bounded, except that an entry
used while a CUDA graph was being captured is never dropped (the graph reads its memory on every
replay), and a miss during capture is not cached. The policy is checked here with CPU tensors and
the capture flag stubbed; tests/common/test_gpu_graph.py replays a captured MDF step after
churning the table cache on a GPU."""
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from fastloss import _backend, _ops  # noqa: E402
from fastloss.kernels import d2sm as kd2sm  # noqa: E402
from fastloss.kernels import mdf as kmdf  # noqa: E402

DEVICE_AWARE = True  # the policy holds on any machine; the kernel calls below skip off the interpreter


def _layout(i):
    """A distinct one-tensor layout (elements per sample, C, channel divisor, nhwc)."""
    return [(3 * (i + 1), 3, i + 1, False)]


def _xs():
    return [torch.empty(2, 3, 1, 1)]


def _capture_flag(monkeypatch, value):
    monkeypatch.setattr(_ops, "capturing", lambda device: value)


def _captured_table_survives(monkeypatch, cache):
    monkeypatch.setattr(kmdf, "_TABLES", cache)
    _capture_flag(monkeypatch, False)
    captured = kmdf._table(_xs(), _layout(0), 16)[0]  # built in the warm-up ...
    _capture_flag(monkeypatch, True)
    assert kmdf._table(_xs(), _layout(0), 16)[0] is captured  # ... and used while "capturing"
    ptr, expected = captured.data_ptr(), captured.clone()
    _capture_flag(monkeypatch, False)
    for i in range(1, 20):  # many more shapes than the bound, none captured
        kmdf._table(_xs(), _layout(i), 16)
        assert len(cache.entries) <= cache.max_entries + len(cache.pinned)
    again = kmdf._table(_xs(), _layout(0), 16)[0]
    assert again is captured and again.data_ptr() == ptr and torch.equal(again, expected)


def test_a_table_used_during_capture_outlives_the_bound(monkeypatch):
    _captured_table_survives(monkeypatch, _ops.DeviceCache(max_entries=4))


def test_uncaptured_tables_are_dropped_and_rebuilt_equal(monkeypatch):
    cache = _ops.DeviceCache(max_entries=4)
    monkeypatch.setattr(kmdf, "_TABLES", cache)
    _capture_flag(monkeypatch, False)
    first, k = kmdf._table(_xs(), _layout(0), 16)
    assert first.tolist() == [[3, 3, 1, 0]] and k == 1  # 3 elements per sample: one chunk of 16
    for i in range(1, 8):
        kmdf._table(_xs(), _layout(i), 16)
    assert len(cache.entries) <= 4 and not cache.pinned
    rebuilt, k2 = kmdf._table(_xs(), _layout(0), 16)
    assert rebuilt is not first and torch.equal(rebuilt, first) and k2 == k


def test_pinned_entries_may_exceed_the_bound():
    """All entries pinned: the cache grows rather than drop one a graph may read."""
    cache = _ops.DeviceCache(max_entries=2)
    built = [cache.get(i, lambda i=i: torch.tensor([i]), capturing=False) for i in range(2)]
    built = [cache.get(i, lambda i=i: torch.tensor([i]), capturing=True) for i in range(2)]
    built += [cache.get(i, lambda i=i: torch.tensor([i]), capturing=False) for i in range(2, 5)]
    assert all(cache.get(i, None, False) is built[i] for i in range(2))
    assert len(cache.entries) <= 2 + len(cache.pinned)


def test_a_miss_during_capture_is_not_cached():
    """Built inside a capture, a tensor's contents exist only when the graph replays: later eager
    calls must not read it."""
    cache = _ops.DeviceCache(max_entries=4)
    inside = cache.get("k", lambda: torch.tensor([1]), capturing=True)
    assert "k" not in cache.entries and not cache.pinned
    assert cache.get("k", lambda: torch.tensor([2]), capturing=False) is not inside


def test_mutation_the_old_clear_all_policy_fails_the_check(monkeypatch):
    """The policy this replaced (clear everything at the bound) loses the captured table."""
    class ClearAll(_ops.DeviceCache):
        def get(self, key, build, capturing):
            if key not in self.entries and len(self.entries) >= self.max_entries:
                self.entries.clear()
            return super().get(key, build, capturing)

    with pytest.raises(AssertionError):
        _captured_table_survives(monkeypatch, ClearAll(max_entries=4))


def test_capturing_is_false_off_cuda():
    assert _ops.capturing(torch.device("cpu")) is False


def _count_fills(monkeypatch):
    fills = []
    real = torch.full

    def full(*args, **kwargs):
        fills.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "full", full)
    return fills


needs_interpreter = pytest.mark.skipif(not kmdf._interpreting() or not _backend.status("triton")[0],
                                       reason="runs the Triton kernels on CPU tensors (TRITON_INTERPRET=1)")


@needs_interpreter
def test_the_slope_is_filled_once_not_per_convolution(monkeypatch):
    monkeypatch.setattr(kmdf, "_SLOPES", _ops.DeviceCache(max_entries=4))
    fills = _count_fills(monkeypatch)
    y0 = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    for _ in range(3):
        y = kmdf.bias_leaky_relu_(y0.clone(), b, 0.2)
    assert len(fills) == 1
    torch.testing.assert_close(y, torch.nn.functional.leaky_relu(y0 + b[:, None, None], 0.2), rtol=0, atol=0)


@needs_interpreter
def test_d2sm_eps_is_filled_once(monkeypatch):
    monkeypatch.setattr(kd2sm, "_EPS", _ops.DeviceCache(max_entries=4))
    fills = _count_fills(monkeypatch)
    q = 5
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(q, 7, generator=g, dtype=torch.float64), dim=1)
    sp = st = x @ x.T
    dots = sp.sum(1)
    rows = torch.arange(q)
    losses = [kd2sm.d2sm_forward(sp, st, dots, dots, rows, True, 1e-6)[0] for _ in range(3)]
    assert len(fills) == 1 and all(torch.equal(v, losses[0]) for v in losses)


def test_mdf_refuses_more_samples_than_the_grid_takes():
    """Triton MDF puts the samples on the grid's second dimension (at most 65535 on CUDA), as the
    CUDA backend does, and says so instead of failing at launch; the check runs before any launch
    (so it holds here without a GPU)."""
    src = (Path(__file__).resolve().parents[2] / "csrc/cuda/mdf_kernels.cu").read_text()
    limit = int(re.search(r"params\.B > (\d+)", src).group(1))  # the CUDA backend's own limit
    assert kmdf.MAX_GRID_SAMPLES == limit
    w = [torch.ones(1)]
    with pytest.raises(ValueError, match=f"{limit + 1} samples in one call"):
        kmdf.mdf_sqdiff_forward([torch.zeros(2 * (limit + 1), 1, 1, 1)], w, limit + 1, False)
    with pytest.raises(ValueError, match=f"{limit + 1} samples in one call"):
        kmdf.mdf_sqdiff_backward(torch.ones(limit + 1), [torch.zeros(limit + 1, 1, 1, 1)], w)


def test_mdf_channel_weights_a_graph_captured_are_kept(monkeypatch):
    """MDF's per-channel weights (every backend of the fast path) were an LRU of 64: the 65th shape
    freed the weights a captured graph reads. Now the same DeviceCache policy: pinned when used
    while capturing."""
    from fastloss.mdf import ops as mdf_ops

    monkeypatch.setattr(mdf_ops, "_CHAN_WEIGHTS", _ops.DeviceCache(max_entries=4))
    units, cpu = [(1, 2)], torch.device("cpu")

    def weights(i):
        return mdf_ops._chan_weights(units, [2, 2], [(5 + i, 5), (3 + i, 3), (1 + i, 1)], cpu, torch.float32)

    _capture_flag(monkeypatch, False)
    first = weights(0)
    _capture_flag(monkeypatch, True)
    captured = weights(0)
    assert all(a is b for a, b in zip(first, captured))
    _capture_flag(monkeypatch, False)
    for i in range(1, 12):
        weights(i)
    assert all(a is b for a, b in zip(weights(0), captured))
    assert torch.equal(captured[0], torch.full((2,), 1 / (2 * 5 * 5)))  # 1 / (C_f H W) of the head


def test_mdf_sum_weights_are_built_once(monkeypatch):
    """The paper formula's weights of 1 came from a fill per tensor per call; now once per shape."""
    from fastloss.mdf import ops as mdf_ops

    monkeypatch.setattr(mdf_ops, "_CHAN_WEIGHTS", _ops.DeviceCache(max_entries=4))
    _capture_flag(monkeypatch, False)
    calls = [mdf_ops._sum_weights([(1, 2), (2, 3)], 5, torch.device("cpu"), torch.float16) for _ in range(3)]
    assert all(a is b for call in calls[1:] for a, b in zip(call, calls[0]))
    assert [t.tolist() for t in calls[0]] == [[1.0] * 5] + [[1.0] * 2] * 3 + [[1.0] * 6] * 3
    assert all(t.dtype == torch.float32 for t in calls[0])  # the accumulation dtype of float16
