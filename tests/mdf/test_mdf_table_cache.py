"""The Triton MDF shape-table cache: bounded, except that a table used while a CUDA graph was being
captured is never dropped (the graph reads its device memory on every replay). The policy is
checked here with CPU tensors and the capture flag stubbed; tests/common/test_gpu_graph.py
replays a captured MDF step after churning the cache on a GPU."""
import pytest
import torch

pytest.importorskip("triton")

from fastloss.kernels import mdf as kmdf  # noqa: E402

DEVICE_AWARE = True  # no kernel runs: the policy holds on any machine


def _layout(i):
    """A distinct one-tensor layout (elements per sample, C, channel divisor, nhwc)."""
    return [(3 * (i + 1), 3, i + 1, False)]


def _xs():
    return [torch.empty(2, 3, 1, 1)]


def _captured_table_survives(monkeypatch, cache):
    monkeypatch.setattr(kmdf, "_TABLES", cache)
    monkeypatch.setattr(kmdf, "_capturing", lambda device: True)
    captured = kmdf._table(_xs(), _layout(0), 16)[0]  # used while "capturing"
    ptr, expected = captured.data_ptr(), captured.clone()
    monkeypatch.setattr(kmdf, "_capturing", lambda device: False)
    for i in range(1, 20):  # many more shapes than the bound, none captured
        kmdf._table(_xs(), _layout(i), 16)
        assert len(cache.entries) <= cache.max_entries
    again = kmdf._table(_xs(), _layout(0), 16)[0]
    assert again is captured and again.data_ptr() == ptr and torch.equal(again, expected)


def test_a_table_used_during_capture_outlives_the_bound(monkeypatch):
    _captured_table_survives(monkeypatch, kmdf._TableCache(max_entries=4))


def test_uncaptured_tables_are_dropped_and_rebuilt_equal(monkeypatch):
    cache = kmdf._TableCache(max_entries=4)
    monkeypatch.setattr(kmdf, "_TABLES", cache)
    monkeypatch.setattr(kmdf, "_capturing", lambda device: False)
    first, k = kmdf._table(_xs(), _layout(0), 16)
    assert first.tolist() == [[3, 3, 1, 0]] and k == 1  # 3 elements per sample: one chunk of 16
    for i in range(1, 8):
        kmdf._table(_xs(), _layout(i), 16)
    assert len(cache.entries) <= 4 and not cache.pinned
    rebuilt, k2 = kmdf._table(_xs(), _layout(0), 16)
    assert rebuilt is not first and torch.equal(rebuilt, first) and k2 == k


def test_pinned_tables_may_exceed_the_bound():
    """All entries pinned: the cache grows rather than drop one a graph may read."""
    cache = kmdf._TableCache(max_entries=2)
    built = [cache.get(i, lambda i=i: torch.tensor([i]), capturing=True) for i in range(5)]
    assert len(cache.entries) == 5 and all(cache.get(i, None, False) is built[i] for i in range(5))


def test_mutation_the_old_clear_all_policy_fails_the_check(monkeypatch):
    """The policy this replaced (clear everything at the bound) loses the captured table."""
    class ClearAll(kmdf._TableCache):
        def get(self, key, build, capturing):
            if key not in self.entries and len(self.entries) >= self.max_entries:
                self.entries.clear()
            return super().get(key, build, capturing)

    with pytest.raises(AssertionError):
        _captured_table_survives(monkeypatch, ClearAll(max_entries=4))


def test_capturing_is_false_off_cuda():
    assert kmdf._capturing(torch.device("cpu")) is False
