#!/usr/bin/env bash
# The GPU acceptance check: one command for a GPU machine (first target: one H200, 16 cores, no
# network, Python 3.12 with torch 2.11.0+cu130, triton 3.6.0, nvcc 13.0, pytest).
#
#   bash scripts/gpu-check.sh [OUTDIR]      (default OUTDIR: ./gpu-check-out)
#
# Uses the python3 it finds (never creates a venv, never installs torch or anything else from a
# network), builds fastloss's CPU and CUDA extensions in place against that torch, then runs:
#   1. python -m fastloss.selftest --full, sharded over the cores (every fast backend against CPU
#      float64 ground truth);
#   2. pytest in GPU mode (real kernels, TRITON_INTERPRET unset): the gpu-marked tests and the
#      device-aware Triton test modules;
#   3. the op timings on the GPU (benchmarks/gpu_ops.py) and a short fastloss-bench --device cuda.
# Writes at most 8 files to OUTDIR: summary.txt, env.txt, build.log, selftest.txt, selftest.json,
# pytest.txt, bench.txt, bench.json. Each step has a time limit, so that the whole run ends within
# 10 minutes. Exit status: 0 when every step passed; 1 when one failed or ran out of time; 2 when
# there is no GPU here (before anything is built).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "gpu-check: no CUDA device is visible to $PY (torch.cuda.is_available() is False, or torch is missing); nothing was built or tested"
  exit 2
fi
unset TRITON_INTERPRET
CORES=$(nproc)
ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$CORES" PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
{
  date -u
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(), 'count', torch.cuda.device_count())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  (nvcc --version 2>&1 | tail -2) || echo "nvcc not found"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  echo "cores $CORES, TORCH_CUDA_ARCH_LIST=$ARCH"
} > "$OUT/env.txt" 2>&1
status=0
step() {  # step NAME LIMIT_S LOGFILE CMD...: run with a time limit, append to LOGFILE, record the result
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then say "PASS  $name (${took}s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "FAIL  $name: ran past its ${limit}s limit"; status=1
  else say "FAIL  $name: exit $rc (${took}s; see $(basename "$log"))"; status=1; fi
  return $rc
}

# 1. build both extensions in place against this torch (the CPU one even if the CUDA one fails)
if ! step "build (pip install -e . --no-build-isolation --no-deps, sm_${ARCH/./})" 240 "$OUT/build.log" \
    "$PY" -m pip install -v -e . --no-build-isolation --no-deps; then
  say "gpu-check: the build failed; the tests below run what was built"
fi
"$PY" -m fastloss.info >> "$OUT/env.txt" 2>&1

# 2. the acceptance run, sharded over the cores (the shards share the Triton cache)
SHARDS=$(( CORES < 16 ? CORES : 16 ))
tmp=$(mktemp -d)
selftest_shards() {
  local pids=() k rc=0 worst=0
  for k in $(seq 1 "$SHARDS"); do
    "$PY" -m fastloss.selftest --full --shard "$k/$SHARDS" --json "$tmp/selftest-$k.json" > "$tmp/selftest-$k.txt" 2>&1 &
    pids+=($!)
  done
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}"; rc=$?
    # 1 (mismatch) outranks 2 (not run), which outranks 0
    if [ $rc -eq 1 ] || { [ $rc -ne 0 ] && [ $worst -ne 1 ]; }; then worst=$rc; fi
  done
  return $worst
}
step "selftest --full ($SHARDS shards)" 300 "$OUT/selftest.txt" selftest_shards
"$PY" - "$tmp" "$OUT" <<'PYEOF'
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
PYEOF
rm -rf "$tmp"

# 3. pytest in GPU mode: real kernels
step "pytest -m gpu + device-aware Triton tests" 150 "$OUT/pytest.txt" \
  "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/common/test_gpu.py tests/pdl/test_pdl_triton.py tests/d2sm/test_d2sm_triton.py

# 4. op timings on the GPU and a short steps/sec run
step "benchmarks/gpu_ops.py" 90 "$OUT/bench.txt" "$PY" benchmarks/gpu_ops.py --json "$OUT/bench.json"
step "fastloss-bench --device cuda (short)" 90 "$OUT/bench.txt" \
  "$PY" -m fastloss.bench --device cuda --steps 2 --warmup 1 --rounds 2 --no-progress --out "$tmp-bench"
rm -rf "$tmp-bench"

say "gpu-check: $([ $status -eq 0 ] && echo 'every step passed' || echo 'FAILED (see above)'); files in $OUT"
exit $status
