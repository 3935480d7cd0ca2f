#!/usr/bin/env bash
# The GPU acceptance check: one command for a GPU machine (first target: one H200, 16 cores, no
# network, Python 3.12 with torch 2.11.0+cu130, triton 3.6.0, nvcc 13.0, pytest).
#
#   bash scripts/gpu-check.sh [OUTDIR]      (default OUTDIR: ./gpu-check-out)
#
# Uses the python3 it finds (never creates a venv, never installs torch or anything else from a
# network), builds fastloss's CPU and CUDA extensions in place against that torch, then runs:
#   1. python -m fastloss.selftest --full, sharded over the cores (every fast backend against CPU
#      float64 ground truth; scripts/gpu-check-selftest.sh runs the shards, SHARDS x THREADS <= cores);
#   2. pytest in GPU mode (real kernels, TRITON_INTERPRET unset): the gpu-marked tests and the
#      device-aware Triton test modules;
#   3. the op timings on the GPU (benchmarks/gpu_ops.py) and a short fastloss-bench --device cuda;
#   4. compute-sanitizer memcheck, then racecheck, over one small call of every CUDA kernel
#      (scripts/gpu-sanitize-cases.py; PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own
#      allocation); a reported error fails the step.
# Writes at most 9 files to OUTDIR: summary.txt, env.txt, build.log, selftest.txt, selftest.json,
# pytest.txt, bench.txt, bench.json, sanitizer.txt. Every command runs under `timeout` with its limit below; the
# limits plus their kill grace add up to at most 600 s (tests/common/test_gpu_check_steps.py checks it, on
# a fake python), so the whole run ends within 10 minutes, the selftest taking the largest share.
# Exit status: 0 when every step passed; 1 when one failed or ran out of time; 2 when there is no
# GPU here (before anything is built).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

# Time limits in seconds (each command also gets KILL_S after its limit to die of SIGTERM): with the
# kill grace they add up to 597 of the 600 s; the rest is the shell's own work. (The sanitizer's 40 s
# came from the two timing steps, 30 + 35 -> 20 + 20: correctness first on a first GPU run.)
KILL_S=2
T_PROBE=20 T_ENV=30 T_BUILD=120 T_INFO=15 T_SELFTEST=210 T_MERGE=10 T_PYTEST=90 T_GPU_OPS=20 T_BENCH=20
T_MEMCHECK=20 T_RACECHECK=20
bounded() {  # bounded LIMIT_S CMD...: CMD under its time limit (the process group is signalled)
  local limit=$1; shift
  timeout --kill-after="$KILL_S" "$limit" "$@"
}

# the GPU probe: exit 0 and the device's compute capability on the last line
ARCH=$(bounded "$T_PROBE" "$PY" -c "import torch, sys
if not torch.cuda.is_available(): sys.exit(1)
c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null | tail -1)
if ! [[ $ARCH =~ ^[0-9]+\.[0-9]+$ ]]; then
  say "gpu-check: no CUDA device is visible to $PY (torch.cuda.is_available() is False, torch is missing, or the probe took over ${T_PROBE}s); nothing was built or tested"
  exit 2
fi
unset TRITON_INTERPRET
# the cores this process may use (nproc would answer OMP_NUM_THREADS if the caller set it)
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$CORES" PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
{
  date -u
  echo "cores $CORES, TORCH_CUDA_ARCH_LIST=$ARCH"
  bounded "$T_ENV" "$PY" -c "import subprocess, sys
def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f'{cmd[0]}: {e}'
print('python', sys.version.split()[0])
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(), 'count', torch.cuda.device_count())
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton:', type(e).__name__, e)
print('\n'.join(run(['nvcc', '--version']).splitlines()[-2:]))
print(run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader']))"
} > "$OUT/env.txt" 2>&1
status=0
step() {  # step NAME LIMIT_S LOGFILE CMD...: run with a time limit, append to LOGFILE, record the result
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS
  bounded "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then say "PASS  $name (${took}s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "FAIL  $name: ran past its ${limit}s limit"; status=1
  else say "FAIL  $name: exit $rc (${took}s; see $(basename "$log"))"; status=1; fi
  return $rc
}

# 1. build both extensions in place against this torch (the CPU one even if the CUDA one fails)
if ! step "build (pip install -e . --no-build-isolation --no-deps, sm_${ARCH/./})" "$T_BUILD" "$OUT/build.log" \
    "$PY" -m pip install -v -e . --no-build-isolation --no-deps; then
  say "gpu-check: the build failed; the tests below run what was built"
fi
bounded "$T_INFO" "$PY" -m fastloss.info >> "$OUT/env.txt" 2>&1

# 2. the acceptance run, sharded over the cores (the shards share the Triton cache), each shard with
# an equal part of the cores for torch's CPU threads (the float64 CPU ground truth)
SHARDS=$(( CORES < 16 ? CORES : 16 ))
THREADS=$(( CORES / SHARDS ))
tmp=$(mktemp -d)
step "selftest --full ($SHARDS shards x $THREADS threads)" "$T_SELFTEST" "$OUT/selftest.txt" \
  bash scripts/gpu-check-selftest.sh "$PY" "$SHARDS" "$THREADS" "$tmp"
# the shards' results into selftest.txt / selftest.json; the counts and the first failures to the summary
bounded "$T_MERGE" "$PY" - "$tmp" "$OUT" <<'PYEOF' 2>&1 | tee -a "$summary"
import glob, json, os, sys
tmp, out = sys.argv[1:3]
results, codes, text = [], [], []
for k in sorted(glob.glob(os.path.join(tmp, "selftest-*.txt")), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0])):
    text.append(f"==== {os.path.basename(k)}\n" + open(k).read())
    j = k[:-4] + ".json"
    if os.path.exists(j):
        d = json.load(open(j)); results += d["results"]; codes.append(d["exit_code"])
    else:
        codes.append(None)
with open(os.path.join(out, "selftest.txt"), "a") as f:
    f.write("\n".join(text))
json.dump({"shard_exit_codes": codes, "results": results}, open(os.path.join(out, "selftest.json"), "w"), indent=1)
bad = [r for r in results if r["status"] in ("fail", "error", "not run")]
print(f"selftest: {sum(r['status'] == 'pass' for r in results)} passed, "
      f"{sum(r['status'] in ('fail', 'error') for r in results)} failed, "
      f"{sum(r['status'] == 'not run' for r in results)} not run, {sum(r['status'] == 'n/a' for r in results)} n/a; "
      f"shard exit codes {codes}")
for r in bad[:40]:
    print(f"  {r['status'].upper():7} {r['backend']:6} {r['name']}  {r['detail'] or r['errors']}")
# n/a only where the backend's table does not declare the case (decided before it runs): listed
for r in [r for r in results if r["status"] == "n/a"]:
    print(f"  N/A     {r['backend']:6} {r['name']}  {r['detail']}")
PYEOF
rm -rf "$tmp"

# 3. pytest in GPU mode: real kernels
step "pytest -m gpu + device-aware Triton tests" "$T_PYTEST" "$OUT/pytest.txt" \
  "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/common/test_gpu.py tests/pdl/test_pdl_triton.py tests/pdl/test_pdl_triton_n1.py tests/d2sm/test_d2sm_triton.py \
  tests/common/test_gpu_graph.py tests/common/test_gpu_values.py

# 4. op timings on the GPU and a short steps/sec run
step "benchmarks/gpu_ops.py" "$T_GPU_OPS" "$OUT/bench.txt" "$PY" benchmarks/gpu_ops.py --json "$OUT/bench.json"
step "fastloss-bench --device cuda (short)" "$T_BENCH" "$OUT/bench.txt" \
  "$PY" -m fastloss.bench --device cuda --steps 2 --warmup 1 --rounds 2 --no-progress --out "$tmp-bench"
rm -rf "$tmp-bench"

# 5. compute-sanitizer over one small call of every CUDA kernel (the CUDA toolkit's, if not on PATH)
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
step "compute-sanitizer memcheck" "$T_MEMCHECK" "$OUT/sanitizer.txt" \
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
  "$PY" scripts/gpu-sanitize-cases.py
step "compute-sanitizer racecheck" "$T_RACECHECK" "$OUT/sanitizer.txt" \
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool racecheck --error-exitcode 1 \
  "$PY" scripts/gpu-sanitize-cases.py

say "gpu-check: $([ $status -eq 0 ] && echo 'every step passed' || echo 'FAILED (see above)'); files in $OUT"
exit $status
