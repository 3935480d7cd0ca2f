#!/usr/bin/env bash
# The main job of README.md: set up ./.venv, then run the benchmarks and rewrite BENCHMARKS.md.
# Extra arguments go to the benchmark script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python benchmarks/bench_pdl.py "$@"
