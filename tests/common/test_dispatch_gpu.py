"""The GPU dispatch rules, checked on a CPU machine by asking for a CUDA device: what
FASTLOSS_REQUIRE_EXT polices, the compute-capability floor of the Triton kernels, and cuDNN's
deterministic mode under fastloss.use_deterministic."""
import warnings

import pytest
import torch

import fastloss
from fastloss import _backend

CUDA = torch.device("cuda")


@pytest.fixture
def no_fast_gpu_backend(monkeypatch):
    """This machine as a CUDA machine would look with neither triton nor fastloss._C_cuda usable."""
    real = _backend.status
    monkeypatch.setattr(_backend, "status", lambda name, device=None: (False, f"{name} unusable (test)")
                        if name in ("triton", "cuda") else real(name, device))
    monkeypatch.setattr(_backend, "_warned", set())


def test_require_ext_covers_cuda_inputs(monkeypatch, no_fast_gpu_backend):
    monkeypatch.setenv("FASTLOSS_REQUIRE_EXT", "1")
    with pytest.raises(fastloss.BackendError, match="FASTLOSS_REQUIRE_EXT=1 but no fast backend for cuda"):
        _backend.resolve("pdl", "auto", CUDA, torch.float32)


def test_without_require_ext_cuda_falls_back_with_a_warning(monkeypatch, no_fast_gpu_backend):
    monkeypatch.delenv("FASTLOSS_REQUIRE_EXT", raising=False)
    with pytest.warns(RuntimeWarning, match="falling back to backend 'reference'"):
        assert _backend.resolve("pdl", "auto", CUDA, torch.float32) == "reference"


def test_require_ext_still_allows_a_dtype_fallback_on_cpu(monkeypatch):
    """A CPU dtype the cpu backend does not take (MDF in bfloat16) is computed by reference: that
    is a dispatch rule, not a missing build."""
    if not _backend.status("cpu")[0]:
        pytest.skip("fastloss._C not built")
    monkeypatch.setenv("FASTLOSS_REQUIRE_EXT", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _backend.resolve("mdf-test", "auto", torch.device("cpu"), torch.bfloat16,
                               {"cpu": (torch.float32, torch.float64)})
    assert got == "reference"


@pytest.mark.parametrize("cap, ok", [((7, 0), False), ((7, 2), False), ((7, 5), True), ((9, 0), True)])
def test_triton_needs_compute_capability_7_5(monkeypatch, cap, ok):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    available, reason = _backend.status("triton")
    assert available == ok, reason
    if not ok:
        assert f"compute capability {cap[0]}.{cap[1]}" in reason and "7.5" in reason
        assert fastloss.backends()["triton"] == {"available": False, "reason": reason}
        assert _backend.why_not("triton", CUDA, torch.float32) == reason


def test_use_deterministic_sets_and_restores_cudnn():
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    try:
        fastloss.use_deterministic(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert fastloss.deterministic()
        fastloss.use_deterministic(True)  # twice: still restores the user's values
        fastloss.use_deterministic(False)
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
        assert not fastloss.deterministic()
    finally:
        fastloss.use_deterministic(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@pytest.fixture
def two_cards(monkeypatch):
    """A machine with an sm_90 card as cuda:0 (current) and an sm_70 card as cuda:1; the number of
    capability queries made is counted in the returned list."""
    pytest.importorskip("triton")
    caps = {0: (9, 0), 1: (7, 0)}
    queries = []

    def index(d):
        d = torch.device("cuda", 0) if d is None else torch.device(d)
        return 0 if d.index is None else d.index

    def capability(d=None):
        queries.append(index(d))
        return caps[index(d)]

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_status_cache", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"card {index(d)}")
    return queries


def test_triton_is_decided_on_the_tensors_card(two_cards):
    """An sm_70 card is refused even while an sm_90 card is the current device, and the reverse."""
    assert _backend.why_not("triton", torch.device("cuda:0"), torch.float32) is None
    reason = _backend.why_not("triton", torch.device("cuda:1"), torch.float32)
    assert reason is not None and "card 1" in reason and "7.0" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _backend.resolve("pdl", "auto", torch.device("cuda:1"), torch.float32) != "triton"
        assert _backend.resolve("pdl", "auto", torch.device("cuda:0"), torch.float32) == "triton"


def test_status_is_computed_once_per_card(two_cards):
    for _ in range(50):
        for i in (0, 1):
            _backend.why_not("triton", torch.device("cuda", i), torch.float32)
    assert sorted(two_cards) == [0, 1]  # one query per card, not one per call
    # a device given without an index means the current one, which can change: not cached
    _backend.status("triton", torch.device("cuda"))
    _backend.status("triton", torch.device("cuda"))
    assert len(two_cards) == 4


def test_no_kernel_reduces_with_atomics():
    """use_deterministic's docstring says fastloss's kernels need no deterministic variant because
    none uses atomics: the CUDA sources and the Triton kernels call no atomic operation."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sources = sorted((root / "csrc/cuda").glob("*.cu*")) + sorted((root / "kernels").glob("*.py"))
    assert len(sources) >= 6
    atomic = re.compile(r"\batomic[A-Z_]\w*\s*\(|\btl\.atomic_\w+|\bcub::Device(Histogram|Run)")
    found = [(p.name, m.group(0)) for p in sources for m in atomic.finditer(p.read_text())]
    assert found == []
    assert atomic.search("atomicAdd(&s, v)") and atomic.search("tl.atomic_add(ptr, v)")  # the pattern can match
