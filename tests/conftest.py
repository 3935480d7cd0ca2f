import os

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastloss  # noqa: E402
from fastloss import _backend  # noqa: E402


def pytest_sessionstart(session):
    # CI sets FASTLOSS_REQUIRE_EXT=1: the suite must fail if the C++ extension did not build.
    if os.environ.get("FASTLOSS_REQUIRE_EXT", "0") == "1":
        ok, reason = _backend.status("cpu")
        if not ok:
            pytest.exit(f"FASTLOSS_REQUIRE_EXT=1 but the CPU extension is missing: {reason}", returncode=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fast_cpu_backends():
    """The non-reference backends that run CPU tensors at any size here."""
    return [b for b in ("cpu",) if _backend.status(b)[0]]


requires_cpu_ext = pytest.mark.skipif(not _backend.status("cpu")[0], reason="fastloss._C not built")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_bitwise_identical(runs):
    """Every run's tensors equal the first run's, bit for bit."""
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert torch.equal(u, v)
