#!/usr/bin/env bash
# The `selftest --full` shards of scripts/gpu-check.sh, as one program so that the step's time limit
# covers them (timeout runs a program; a shell function it cannot run, and the shards never started).
#
#   bash scripts/gpu-check-selftest.sh PYTHON SHARDS THREADS DIR
#
# Starts the SHARDS shards at once: `PYTHON -m fastloss.selftest --full --shard K/SHARDS --json
# DIR/selftest-K.json`, output in DIR/selftest-K.txt, each with THREADS CPU threads (OMP_NUM_THREADS
# and MKL_NUM_THREADS size torch's intra-op pool, which otherwise takes every core in each shard), so
# that SHARDS x THREADS stays within the cores. Exit status: 1 when a shard found a mismatch (its
# exit 1), else the other non-zero exit of a shard (2: cases not run), else 0. A time limit's signal
# reaches the shards too: timeout signals its whole process group.
set -u
if [ $# -ne 4 ]; then
  echo "usage: $0 PYTHON SHARDS THREADS DIR" >&2
  exit 2
fi
PY=$1 SHARDS=$2 THREADS=$3 DIR=$4
pids=()
for k in $(seq 1 "$SHARDS"); do
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
    "$PY" -m fastloss.selftest --full --shard "$k/$SHARDS" --json "$DIR/selftest-$k.json" > "$DIR/selftest-$k.txt" 2>&1 &
  pids+=($!)
done
worst=0
for pid in "${pids[@]}"; do
  wait "$pid"; rc=$?
  # 1 (mismatch) outranks 2 (not run), which outranks 0
  if [ $rc -eq 1 ] || { [ $rc -ne 0 ] && [ $worst -ne 1 ]; }; then worst=$rc; fi
done
exit $worst
