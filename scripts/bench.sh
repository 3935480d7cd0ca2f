#!/usr/bin/env bash
# The main job of README.md: set up ./.venv, then run fastloss-bench (training steps/sec under
# every loss configuration, side by side). The table is printed; results.json and the chart
# steps_per_sec.png go to ./fastloss-bench-out/ (untracked), so a run leaves the checkout clean.
#
#   bash scripts/bench.sh                       # results in fastloss-bench-out/
#   bash scripts/bench.sh --update-benchmarks   # also rewrite BENCHMARKS.md's "steps" section, with
#                                               # results and chart in benchmarks/results/ (tracked)
#
# Other arguments go to fastloss-bench (e.g. --steps 5 --configs l1,vgg,pdl-ref,pdl-fast).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
update=0
for a in "$@"; do
  if [ "$a" = "--update-benchmarks" ]; then
    update=1
  else
    args+=("$a")
  fi
done
bash scripts/setup.sh
. .venv/bin/activate
if [ "$update" = 1 ]; then
  exec fastloss-bench --out benchmarks/results --markdown BENCHMARKS.md ${args[@]+"${args[@]}"}
fi
exec fastloss-bench ${args[@]+"${args[@]}"}
