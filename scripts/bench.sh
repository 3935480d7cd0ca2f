#!/usr/bin/env bash
# The main job of README.md: set up ./.venv, then run fastloss-bench (training steps/sec under
# every loss configuration, side by side) and rewrite the "steps" section of BENCHMARKS.md with
# its table, command, machine details and chart (benchmarks/results/).
# Extra arguments go to fastloss-bench (e.g. --steps 5 --configs l1,vgg,pdl-ref,pdl-fast).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec fastloss-bench --out benchmarks/results --markdown BENCHMARKS.md "$@"
