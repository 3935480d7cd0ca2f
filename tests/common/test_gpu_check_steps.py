"""scripts/gpu-check.sh driven to the end without a GPU (issue 22): PYTHON points it at a fake python
that answers the GPU probe (capability 9.0) and stands in for every heavy command (the build, each
selftest shard, pytest, the GPU timings), recording that it started, its arguments, its thread
count and whether it ran under a time limit; a `timeout` first on PATH records each limit and runs
the real one. Checked: every step's command started (each selftest shard wrote its result), every
command ran under a limit, the limits and their kill grace add up to at most the 10 minutes the
script promises, and the shards x threads fit the cores."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
BUDGET_S = 600  # "the whole run ends within 10 minutes"

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None,
                                reason="needs bash and GNU timeout")

FAKE_PYTHON = r'''#!/usr/bin/env bash
# records each call in a file of its own (the shards run at once): argv, OMP_NUM_THREADS, the time
# limit it ran under (if any)
"$REAL_PY" - "$@" > "$(mktemp "$FAKE_LOG/call.XXXXXXXX")" <<'PYEOF'
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS"),
                  "limit": os.environ.get("FAKE_TIMEOUT_LIMIT")}))
PYEOF
case "$1" in
  -c) echo "9.0"; exit 0 ;;  # the GPU probe (and the env report): a capability 9.0 device
  -) exec "$REAL_PY" "$@" ;;  # the script's own Python (merging the shards' results): run it
esac
if [ "$1 $2" = "-m fastloss.selftest" ]; then
  shard= json=
  while [ $# -gt 0 ]; do
    case "$1" in --shard) shard=$2; shift ;; --json) json=$2; shift ;; esac
    shift
  done
  k=${shard%/*}
  code=0
  [ "$k" = "${FAKE_FAIL_SHARD:-}" ] && code=1
  status=$([ $code -eq 0 ] && echo pass || echo fail)
  printf '{"exit_code": %d, "results": [{"status": "%s", "backend": "cuda", "name": "stub shard %s", %s}]}' \
    "$code" "$status" "$shard" '"detail": "", "errors": ""' > "$json"
  echo "stub selftest shard $shard"
  exit $code
fi
for a in "$@"; do  # benchmarks/gpu_ops.py --json FILE
  if [ "${prev:-}" = "--json" ]; then echo '{}' > "$a"; fi
  prev=$a
done
exit 0
'''

FAKE_TIMEOUT = r'''#!/usr/bin/env bash
# records the limit of each call, then runs the real timeout
args=("$@") kill=0 i=0
while [ $i -lt ${#args[@]} ]; do
  a=${args[$i]}
  case "$a" in
    --kill-after=*) kill=${a#--kill-after=} ;;
    -k) i=$((i + 1)); kill=${args[$i]} ;;
    -k*) kill=${a#-k} ;;
    -s|--signal) i=$((i + 1)) ;;
    -*) ;;
    *) limit=$a; break ;;
  esac
  i=$((i + 1))
done
echo "{\"limit\": \"$limit\", \"kill_after\": \"$kill\", \"command\": \"${args[$((i + 1))]}\"}" \
  > "$(mktemp "$FAKE_TIMEOUT_LOG/call.XXXXXXXX")"
FAKE_TIMEOUT_LIMIT=$limit exec "$REAL_TIMEOUT" "$@"
'''

FAKE_NPROC = '#!/usr/bin/env bash\necho "$FAKE_CORES"\n'

FAKE_SANITIZER = r'''#!/usr/bin/env bash
# records its options and the environment's PYTORCH_NO_CUDA_MEMORY_CACHING, then runs the program
opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tool|--error-exitcode) opts+=("$1" "$2"); shift 2 ;;
    --*) opts+=("$1"); shift ;;
    *) break ;;
  esac
done
echo "${opts[*]} caching_off=${PYTORCH_NO_CUDA_MEMORY_CACHING:-} program=$*" >> "$FAKE_SANITIZER_LOG"
exec "$@"
'''


def _seconds(text):
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def run_gpu_check(tmp_path, cores=16, script=SCRIPT, fail_shard=None):
    """Runs the script on the fakes; (completed process, out dir, python calls, timeout calls)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("timeout", FAKE_TIMEOUT), ("nproc", FAKE_NPROC),
                       ("compute-sanitizer", FAKE_SANITIZER)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    out, pylog, tlog = tmp_path / "out", tmp_path / "python-calls", tmp_path / "timeout-calls"
    pylog.mkdir()
    tlog.mkdir()
    env = dict(os.environ, PYTHON=str(fake / "python"), REAL_PY=sys.executable, FAKE_LOG=str(pylog),
               FAKE_TIMEOUT_LOG=str(tlog), REAL_TIMEOUT=shutil.which("timeout"), FAKE_CORES=str(cores),
               FAKE_SANITIZER_LOG=str(tmp_path / "sanitizer-calls"),
               PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_FAIL_SHARD=str(fail_shard or ""))
    env.pop("FAKE_TIMEOUT_LIMIT", None)
    p = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)
    calls = [json.loads(f.read_text()) for f in sorted(pylog.iterdir())]
    limits = [json.loads(f.read_text()) for f in sorted(tlog.iterdir())]
    return p, out, calls, limits


def _shards(calls):
    return [c for c in calls if c["argv"][:2] == ["-m", "fastloss.selftest"]]


@pytest.mark.parametrize("cores", [16, 40])
def test_every_step_starts_under_a_limit_and_the_limits_fit_ten_minutes(tmp_path, cores):
    p, out, calls, limits = run_gpu_check(tmp_path, cores=cores)
    log = p.stdout + p.stderr + "".join(f"\n--- {f.name}\n" + f.read_text() for f in sorted(out.glob("*.txt")))
    assert p.returncode == 0, log
    assert "gpu-check: every step passed" in p.stdout, log
    summary = (out / "summary.txt").read_text()
    for step in ("build", "selftest --full", "pytest", "benchmarks/gpu_ops.py", "fastloss-bench",
                 "compute-sanitizer memcheck", "compute-sanitizer racecheck"):
        assert any(line.startswith("PASS  " + step) for line in summary.splitlines()), (step, summary)

    # each step's command started
    argvs = [" ".join(c["argv"]) for c in calls]
    assert any(a.startswith("-m pip install -v -e . --no-build-isolation --no-deps") for a in argvs), argvs
    assert any(a.startswith("-m pytest") and "tests/common/test_gpu.py" in a for a in argvs), argvs
    assert any(a.startswith("benchmarks/gpu_ops.py") for a in argvs), argvs
    assert any(a.startswith("-m fastloss.bench --device cuda") for a in argvs), argvs
    # the sanitizer ran the kernel driver under memcheck and racecheck, each reporting errors by its
    # exit code, with the caching allocator off (an access past a tensor lands outside any allocation)
    assert sum(a == "scripts/gpu-sanitize-cases.py" for a in argvs) == 2, argvs
    sanitized = (tmp_path / "sanitizer-calls").read_text().splitlines()
    for tool in ("memcheck", "racecheck"):
        assert any(f"--tool {tool} --error-exitcode 1 caching_off=1 program=" in line
                   and line.endswith("scripts/gpu-sanitize-cases.py") for line in sanitized), sanitized
    shards = _shards(calls)
    n = min(cores, 16)
    started = sorted(c["argv"][c["argv"].index("--shard") + 1] for c in shards)
    assert started == sorted(f"{k}/{n}" for k in range(1, n + 1))
    assert all("--full" in c["argv"] for c in shards)
    # every shard wrote its result, merged into selftest.json
    merged = json.loads((out / "selftest.json").read_text())
    assert merged["shard_exit_codes"] == [0] * n
    assert sorted(r["name"] for r in merged["results"]) == sorted(f"stub shard {k}/{n}" for k in range(1, n + 1))
    assert f"selftest: {n} passed, 0 failed, 0 not run" in summary
    assert all(f"stub selftest shard {k}/{n}" in (out / "selftest.txt").read_text() for k in range(1, n + 1))

    # shards x threads within the cores, and more than one thread where the cores allow it
    threads = {c["omp"] for c in shards}
    assert len(threads) == 1 and None not in threads, threads
    assert n * int(threads.pop()) == cores // n * n <= cores

    # every command ran under a time limit, and the limits (with their kill grace) fit 10 minutes
    assert calls and all(c["limit"] is not None for c in calls), [c for c in calls if c["limit"] is None]
    total = sum(_seconds(t["limit"]) + _seconds(t["kill_after"]) for t in limits)
    assert total <= BUDGET_S, (total, limits)
    # the selftest has the largest share
    by_command = sorted(limits, key=lambda t: -_seconds(t["limit"]))
    assert by_command[0]["command"] == "bash", by_command


def test_a_failing_shard_fails_the_selftest_step(tmp_path):
    p, out, calls, _ = run_gpu_check(tmp_path, fail_shard=3)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL  selftest --full" in (out / "summary.txt").read_text()
    assert len(_shards(calls)) == 16  # the other shards ran to the end, and so did the later steps
    assert any(c["argv"][:2] == ["-m", "pytest"] for c in calls)
    merged = json.loads((out / "selftest.json").read_text())
    assert merged["shard_exit_codes"][2] == 1
