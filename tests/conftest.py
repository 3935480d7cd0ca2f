import os

import torch  # noqa: E402  (does not import triton)

# Without a GPU, the Triton kernels run on CPU tensors under the interpreter (it must be set
# before triton loads). With one, TRITON_INTERPRET is left as the caller set it: unset, pytest
# runs in GPU mode (the `gpu`-marked tests on real kernels; the interpreter tests are skipped).
GPU_MODE = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never reach the internet: extractor_weights="torchvision" with no file in the hub cache
# raises instead of downloading (tests/common/test_weights_download.py unsets it against a local server).
os.environ["FASTLOSS_OFFLINE"] = "1"

# torch.compile's on-disk cache is per run: its key does not cover a custom op's registered
# backward, so graphs compiled by an earlier checkout would call that checkout's op signatures
# (seen when fastloss::pdl_backward gained an argument).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastloss-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

import fastloss  # noqa: E402
from fastloss import _backend  # noqa: E402


def pytest_sessionstart(session):
    # CI sets FASTLOSS_REQUIRE_EXT=1: the suite must fail if the C++ extension did not build.
    if os.environ.get("FASTLOSS_REQUIRE_EXT", "0") == "1":
        ok, reason = _backend.status("cpu")
        if not ok:
            pytest.exit(f"FASTLOSS_REQUIRE_EXT=1 but the CPU extension is missing: {reason}", returncode=3)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU tests; run them with scripts/gpu-check.sh)")
    interp = pytest.mark.skip(reason="runs Triton on CPU tensors under the interpreter; in GPU mode "
                              "(CUDA present, TRITON_INTERPRET unset) the gpu-marked tests run the real kernels")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(no_gpu)
        elif GPU_MODE and "triton" in item.nodeid.lower() and not getattr(item.module, "DEVICE_AWARE", False):
            item.add_marker(interp)


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
