"""Whole-training-step cases (``--full``): run-to-run determinism, ``torch.compile(fullgraph=True)``,
and on CUDA a side stream, ``cuda:1`` while ``cuda:0`` is current, a step under
``torch.cuda.set_sync_debug_mode("error")`` and a CUDA-graph capture and replay."""
import contextlib

import torch

import fastloss
from fastloss import _backend

from .d2sm import d2sm_inputs
from .harness import Case, _cpu_gen, _to, poison
from .mdf import mdf_weights
from .pdl import pdl_inputs
from .tolerances import BY_LOSS


def _step_fns(loss):
    """(make inputs on the CPU, the loss's forward ``fwd(backend, x, y) -> loss``) of a small
    training step of ``loss``; ``_step`` runs it with the backward."""
    if loss == "pdl":
        def make():
            return pdl_inputs(2, 3, 4096, torch.float32, "contiguous", "zeros", 7)

        def fwd(backend, x, y):
            return fastloss.pdl(x, y, backend=backend)
    elif loss == "d2sm":
        def make():
            return d2sm_inputs(300, 64, torch.float32, 7)

        def fwd(backend, x, y):
            return fastloss.d2sm_kl(x, y, backend=backend)
    else:
        crits = {}

        def make():
            g = _cpu_gen(7)
            x = torch.rand(2, 3, 40, 37, generator=g)
            return x, (x + 0.1 * torch.randn(2, 3, 40, 37, generator=g)).clamp(0, 1)

        def fwd(backend, x, y):
            key = (backend, x.device, x.dtype)
            if key not in crits:  # built outside any compiled region by a first eager call
                crits[key] = fastloss.MDFLoss(mdf_weights(), scales=3, backend=backend).to(x.device)
            return crits[key](x, y)
    return make, fwd


def _step(fwd, backend, x, y):
    """(loss, gradient of pred) of one forward+backward."""
    x = x.detach().requires_grad_()
    out = fwd(backend, x, y)
    (gx,) = torch.autograd.grad(out, x)
    return out.detach(), gx


def _determinism_case(loss):
    def applies(backend, device):
        if loss != "pdl" and backend != "cpu":
            return f"docs/guarantees.md promises bitwise determinism for {loss} on the cpu backend only"
        return None

    def run(backend, device, chk):
        make, fwd = _step_fns(loss)
        x0, y0 = make()
        x, y = _to(x0, device), _to(y0, device)
        runs = []
        with _deterministic():
            for _ in range(3):
                poison(device)
                runs.append(_step(fwd, backend, x, y))
        same = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))
        chk.true("3 runs bitwise identical", same)

    return Case(f"{loss} determinism (3 runs, use_deterministic)", loss, torch.float32, run, applies)


@contextlib.contextmanager
def _deterministic():
    was = _backend._deterministic[0]
    fastloss.use_deterministic(True)
    try:
        yield
    finally:
        fastloss.use_deterministic(was)


def _truth_step(loss, x, y):
    """The same step on the CPU in float64 on the reference backend."""
    _, fwd = _step_fns(loss)
    return _step(fwd, "reference", x.double(), y.double())


def _compare_step(chk, label, got, truth, tol):
    chk.close(f"{label} loss", got[0], truth[0], tol)
    chk.close(f"{label} grad", got[1], truth[1], tol, "norm")


def _compile_case(loss):
    tol = BY_LOSS[loss][torch.float32]

    def run(backend, device, chk):
        make, fwd = _step_fns(loss)
        x0, y0 = make()
        truth = _truth_step(loss, x0, y0)
        x, y = _to(x0, device), _to(y0, device)
        _step(fwd, backend, x, y)  # eager first: loads, builds the loss's caches
        torch._dynamo.reset()
        compiled = torch.compile(lambda u, v: fwd(backend, u, v), fullgraph=True)
        poison(device)
        _compare_step(chk, "compiled", _step(lambda _b, u, v: compiled(u, v), backend, x, y), truth, tol)

    return Case(f"{loss} torch.compile(fullgraph=True) step", loss, torch.float32, run)


def _cuda_only(backend, device):
    """The ``applies`` hook of a CUDA-only case."""
    return None if torch.device(device).type == "cuda" else "a CUDA-only case"


def _two_gpus(backend, device):
    """The ``applies`` hook of the cuda:1 case."""
    if torch.device(device).type != "cuda":
        return "a CUDA-only case"
    return None if torch.cuda.device_count() >= 2 else "needs two CUDA devices"


def _side_stream_case(loss):
    tol = BY_LOSS[loss][torch.float32]

    def run(backend, device, chk):
        make, fwd = _step_fns(loss)
        x0, y0 = make()
        truth = _truth_step(loss, x0, y0)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # inputs produced on the side stream by a long kernel chain, consumed there
            xs = _to(x0, device)
            for _ in range(20):
                xs = xs * 1.0 + 0.0
            got = _step(fwd, backend, xs, _to(y0, device))
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        _compare_step(chk, "side stream", got, truth, tol)

    return Case(f"{loss} step on a side stream", loss, torch.float32, run, _cuda_only)


def _second_device_case(loss):
    tol = BY_LOSS[loss][torch.float32]

    def run(backend, device, chk):
        make, fwd = _step_fns(loss)
        x0, y0 = make()
        truth = _truth_step(loss, x0, y0)
        with torch.cuda.device(0):
            got = _step(fwd, backend, _to(x0, "cuda:1"), _to(y0, "cuda:1"))
        chk.true("outputs on cuda:1", got[0].device == torch.device("cuda:1"))
        _compare_step(chk, "cuda:1", got, truth, tol)

    return Case(f"{loss} on cuda:1 while cuda:0 is current", loss, torch.float32, run, _two_gpus)


def _training_step(loss, backend, device):
    """A module, its loss object and a step function ``step(x, y) -> loss`` that also runs the
    backward into the module's parameters (the step a training loop runs)."""
    net = torch.nn.Conv2d(3, 3, 3, padding=1).to(device)
    if loss == "pdl":
        crit = lambda u, v: fastloss.pdl(net(u), v, backend=backend)  # noqa: E731
        shape = (2, 3, 32, 48)
    elif loss == "d2sm":
        queue = fastloss.D2SMQueue(queue_size=16, backend=backend).to(device)
        crit = lambda u, v: queue(net(u).flatten(1), v.flatten(1))  # noqa: E731
        shape = (4, 3, 8, 8)
    else:
        mdf = fastloss.MDFLoss(mdf_weights(), scales=3, backend=backend).to(device)
        crit = lambda u, v: mdf(net(u).clamp(0, 1), v)  # noqa: E731
        shape = (2, 3, 24, 24)

    def step(x, y):
        out = crit(x, y)
        out.backward()
        return out.detach()

    return net, step, shape


def _sync_debug_case(loss):
    def run(backend, device, chk):
        net, step, shape = _training_step(loss, backend, device)
        g = _cpu_gen(3)
        x, y = torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device)
        for _ in range(3):  # warm-up: first-call loads, JIT compiles, queue allocation
            step(x, y)
        torch.cuda.synchronize(device)
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                step(x, y)
            ok, why = True, ""
        except RuntimeError as e:
            ok, why = False, str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(old)
        chk.true(f"no host sync in a training step{(': ' + why) if why else ''}", ok)

    return Case(f"{loss} training step under set_sync_debug_mode('error')", loss, torch.float32, run, _cuda_only)


def _cuda_graph_case(loss):
    tol = BY_LOSS[loss][torch.float32]

    def run(backend, device, chk):
        net, step, shape = _training_step(loss, backend, device)
        g = _cpu_gen(5)
        batches = [(torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device))
                   for _ in range(6)]
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        # warm-up on a side stream (as torch.cuda.graphs asks), then the eager twin is a copy of
        # this state: module, queue, gradients
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for x, y in batches[:2]:
                step(x, y)
        torch.cuda.current_stream(device).wait_stream(side)
        static_x, static_y = batches[2][0].clone(), batches[2][1].clone()
        eager_net, eager_step, _ = _training_step(loss, backend, device)
        eager_net.load_state_dict(net.state_dict())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_x, static_y)
        # the eager twin replays the same history: the two warm-up steps, then the batches
        for x, y in batches[:2]:
            eager_step(x, y)
        for i, (x, y) in enumerate(batches[2:]):
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            ref = eager_step(x, y)
            chk.close(f"replay {i} loss", static_out, ref, tol)

    return Case(f"{loss} CUDA-graph capture and replay of a training step", loss, torch.float32, run, _cuda_only)


def _whole_step_cases():
    cases = []
    for loss in ("pdl", "d2sm", "mdf"):
        cases += [_determinism_case(loss), _compile_case(loss), _side_stream_case(loss),
                  _second_device_case(loss), _sync_debug_case(loss), _cuda_graph_case(loss)]
    return cases
