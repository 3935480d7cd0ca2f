"""Microbenchmarks of D2SM: ``fastloss.d2sm_kl`` in both modes and one step of the cached
``fastloss.D2SMQueue``, on every available backend and against the PKT formula as
knowledge-distillation libraries write it, forward and forward+backward, with the peak extra
memory of one call in ``extra_info``.

    pytest benchmarks/test_micro_d2sm.py --benchmark-json=d2sm.json   # everything
    pytest benchmarks/ -k smoke --benchmark-disable                    # what CI runs: they run, nothing timed

Features are post-ReLU Gaussians in float32, one row per sample (D = a flattened VGG map: conv5_4
of a 96 x 96 crop is 512 x 6 x 6 = 18432, of a 64 x 64 crop 512 x 4 x 4 = 8192). Backends:
``reference`` and ``cpu`` on the CPU; ``reference``, ``triton`` and ``cuda`` on a CUDA device
when there is one (those available). The peer, ``PKT-formula``, is the Probabilistic Knowledge
Transfer loss written as the distillation libraries carry it (Passalis and Tefas' code, kept as
``PKT.cosine_similarity_loss`` in torchdistill and RepDistiller): it is the ``pkt`` mode, so it
runs in that mode only; for the queue it recomputes the whole set, ``cat(batch, history)``, at
every call, which is what a memory bank without a similarity cache costs.
"""
import functools
import itertools

import pytest
import torch

import common
import fastloss

# d2sm_kl: (q rows, D)
KL_SIZES = {"smoke": (4, 16), "16x18432": (16, 18432), "256x8192": (256, 8192), "1024x8192": (1024, 8192)}
# D2SMQueue: (queue_size q, batch B, D); the queue is full and its cache warm when timed
QUEUE_SIZES = {"smoke": (6, 2, 16), "q256-b16-D8192": (256, 16, 8192), "q1024-b16-D8192": (1024, 16, 8192)}
MODES = ("paper", "pkt")
N_BATCHES = 4  # distinct batches the queue steps cycle through


def pkt_formula(student, teacher, eps=1e-7):
    """The PKT loss as the distillation libraries write it: each row divided by its norm + eps
    (NaN entries set to 0), cosine similarities mapped to [0, 1] by (s + 1) / 2, every row of
    them divided by its sum, then the mean over all q x q entries of T log((T + eps) / (S + eps)),
    T from the teacher (the target), S from the student."""
    def probabilities(f):
        f = f.flatten(1)
        f = f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)
        f[f != f] = 0
        k = (torch.mm(f, f.t()) + 1.0) / 2.0
        return k / torch.sum(k, dim=1, keepdim=True)

    s, t = probabilities(student), probabilities(teacher.detach())
    return torch.mean(t * torch.log((t + eps) / (s + eps)))


def _params(sizes):
    """(provider, mode, size) for every backend in both modes, and the peer in pkt mode."""
    provs = [(common.micro_label(f"fastloss-{b}", dev), b, dev) for b, dev in common.micro_backends()]
    provs += [(common.micro_label("PKT-formula", dev), None, dev) for dev in common.micro_devices()]
    return [pytest.param(name, backend, dev, mode, size, id=f"{name}-{mode}-{size}")
            for name, backend, dev in provs for mode in MODES if backend is not None or mode == "pkt"
            for size in sizes]


def _rows(n, d, g, device):
    return torch.randn(n, d, generator=g).relu_().to(device)


@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider,backend,device,mode,size", _params(KL_SIZES))
def test_d2sm_kl(benchmark, provider, backend, device, mode, size, passes):
    q, d = KL_SIZES[size]
    g = torch.Generator().manual_seed(0)
    x = _rows(q, d, g, device).requires_grad_(passes != "forward")
    y = _rows(q, d, g, device)
    if backend is None:
        fn = pkt_formula
    else:
        fn = lambda x, y: fastloss.d2sm_kl(x, y, mode=mode, backend=backend)  # noqa: E731
    run = common.micro_run(fn, lambda: (x, y), passes, device)
    common.micro_measure(benchmark, run, f"d2sm_kl {mode} {passes} {size}", device, backend=backend or "peer",
                         mode=mode, q=q, D=d)


@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider,backend,device,mode,size", _params(QUEUE_SIZES))
def test_d2sm_queue_step(benchmark, provider, backend, device, mode, size, passes):
    """One call with a batch of B rows (gradient to them) against the q - B most recent earlier rows."""
    q, b, d = QUEUE_SIZES[size]
    g = torch.Generator().manual_seed(0)
    hp, ht = _rows(q - b, d, g, device), _rows(q - b, d, g, device)  # the history, both sides
    batches = [(_rows(b, d, g, device).requires_grad_(passes != "forward"), _rows(b, d, g, device))
               for _ in range(N_BATCHES)]
    if backend is None:
        fn = lambda x, y: pkt_formula(torch.cat([x, hp]), torch.cat([y, ht]))  # noqa: E731
    else:
        queue = fastloss.D2SMQueue(q, mode=mode, backend=backend)
        with torch.no_grad():  # fill it: the set is then always the batch + the q - B earlier rows
            for i in range(0, q - b, b):
                queue(hp[i:i + b], ht[i:i + b])
        fn = queue
    run = common.micro_run(fn, functools.partial(next, itertools.cycle(batches)), passes, device)
    common.micro_measure(benchmark, run, f"D2SMQueue step {mode} {passes} {size}", device,
                         backend=backend or "peer", mode=mode, queue_size=q, batch=b, D=d)
