"""``python -m fastloss.selftest``: the acceptance run of fastloss's fast backends on this machine.

Every case runs a fast backend (``cpu``, ``triton``, ``cuda``) on the device and compares its
values and gradients with ground truth computed **on the CPU in float64 from the same data**,
never with another GPU result; errors are computed and reported in float64. On a GPU machine this
is how the Triton and CUDA paths are validated (``scripts/gpu-check.sh`` runs it with ``--full``).

- TF32 is off (cuDNN and matmul) for the run, and restored afterwards.
- The caching allocator is poisoned (freed blocks filled with 0xFF: NaN, -1) before every fast
  call, so an output a kernel does not write cannot hold a correct value.
- PDL's saved permutations are checked to be permutations, equal to the stable order (-0.0 ==
  +0.0, NaN of either sign last) of the ground truth.
- The cases cover every regime the dispatch can take (``--list`` prints them): PDL row lengths
  across every CUDA tile, the segmented path, every Triton block and the ``torch.sort`` fallback,
  p = 1 and 2, the target with and without grad, four dtypes, three layouts, +-0 ties and NaNs of
  both signs; D2SM set sizes over several Triton blocks in both modes and ``D2SMQueue`` filling and
  wrapping; MDF in four dtypes, grouped or not, channels_last, gradients for pred and target; and,
  with ``--full``, run-to-run determinism where docs/guarantees.md promises it, ``torch.compile``
  (fullgraph) steps, and on CUDA inputs made on a side stream, ``cuda:1`` while ``cuda:0`` is
  current, a step under ``torch.cuda.set_sync_debug_mode("error")`` and a CUDA-graph capture and
  replay of a training step with each loss.

Exit status: 0 only when every requested backend ran every case and all passed; 1 on any
mismatch (or a case that raised); 2 when a requested backend cannot run, or when no fast backend
ran at all ("nothing was tested"). A case that did not run is never reported as passed. A case
is n/a only when it lies outside what the backend declares (``outside``: the dtypes of its row in
the loss's ``IMPLS`` table, or the case's own ``applies``, e.g. CUDA-only), decided before it runs
and listed at the end; an error a backend raises in a case it declares (``BackendError``
included) is a failure.

The package: ``harness`` (error arithmetic, hygiene, the runner), ``tolerances`` (the tolerance
table, shared with the tests), one case file per loss (``pdl``, ``d2sm``, ``mdf``), ``steps`` (the
whole-training-step cases) and ``cli`` (the command line).
"""
from .cli import main
from .d2sm import D2SM_Q_FULL, D2SM_Q_QUICK, d2sm_inputs, d2sm_truth
from .harness import (DTYPES, EXIT_MISMATCH, EXIT_NOT_RUN, EXIT_PASS, FAST_BACKENDS, Case, Checker, NotApplicable,
                      NotRunnable, Result, _run_one, _to, acceptance_problem, cases, exit_code, no_tf32, outside,
                      poison, rel_error, run, select)
from .mdf import mdf_weights
from .pdl import PDL_N_FULL, PDL_N_QUICK, _neg_nan, pdl_inputs, pdl_truth
from .steps import _sync_debug_case
from .tolerances import D2SM_TOL, MDF_TOL, TOL

__all__ = ["run", "main", "cases", "select", "exit_code", "outside", "acceptance_problem", "Case", "Result", "Checker", "NotRunnable", "NotApplicable",
           "rel_error", "no_tf32", "poison", "EXIT_PASS", "EXIT_MISMATCH", "EXIT_NOT_RUN", "FAST_BACKENDS", "DTYPES",
           "TOL", "D2SM_TOL", "MDF_TOL", "PDL_N_FULL", "PDL_N_QUICK", "D2SM_Q_FULL", "D2SM_Q_QUICK", "pdl_inputs",
           "pdl_truth", "d2sm_inputs", "d2sm_truth", "mdf_weights",
           # private, but the tests reach them through the package
           "_run_one", "_to", "_neg_nan", "_sync_debug_case"]
