#!/usr/bin/env bash
# Create ./.venv (once), install the dev requirements, and build fastloss's C++ extension in
# place with `pip install -e . --no-build-isolation` (so the torch already installed is the
# one compiled against; FASTLOSS_REQUIRE_EXT=1 makes a failed C++ build fail here, loudly).
# Rebuilds only when csrc/, setup.py, pyproject.toml, fastloss/build.py or FASTLOSS_DEBUG changed
# since the last build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
req_stamp=.venv/.fastloss-req-$(sha256sum requirements-dev.txt | cut -c1-16)
if [ ! -f "$req_stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-dev.txt
  # BasicSR, for tests/common/test_integrations_basicsr.py only: --no-deps, since its requirements
  # (tb-nightly, opencv, a torchvision import that current torchvision lacks) would pull a second
  # torch; the test loads just its registry. A failure here skips that test, it fails nothing else.
  python -m pip install -q --no-deps --no-build-isolation basicsr==1.4.2 \
    || echo "setup: basicsr 1.4.2 could not be installed; tests/common/test_integrations_basicsr.py will skip" >&2
  touch "$req_stamp"
fi
# FASTLOSS_DEBUG=1 (debug information in the extension) is part of the key: switching it rebuilds
src_hash=$( { cat setup.py pyproject.toml fastloss/build.py $(find csrc -type f | sort); echo "FASTLOSS_DEBUG=${FASTLOSS_DEBUG:-0}"; } | sha256sum | cut -c1-16)
if [ "$(cat .venv/.fastloss-build 2>/dev/null || true)" != "$src_hash" ] || ! python -c "import torch, fastloss._C" 2>/dev/null; then
  echo "building fastloss (C++ CPU extension)..." >&2
  FASTLOSS_REQUIRE_EXT=1 python -m pip install -q -e . --no-build-isolation --no-deps
  python -c "import torch, fastloss._C"
  echo "$src_hash" > .venv/.fastloss-build
fi
