#!/usr/bin/env bash
# The test command of README.md: set up ./.venv, then run the suite (fast subset of the
# benchmarks included as a smoke test). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m fastloss.info
exec python -m pytest tests -q -m "not slow" "$@"
