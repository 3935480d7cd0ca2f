#!/usr/bin/env bash
# Retrain the shipped MDF sets (fastloss/mdf/data/{denoise,jpeg,sisr}.safetensors) as they were made:
# on scikit-image's `coffee` photograph (CC0, Rachel Michetti), with the paper's recipe where it fits
# a 600 x 400 seed and about an hour per set on a 2-core CPU (docs/mdf.md, "The shipped sets").
#
#   bash scripts/train_mdf_sets.sh [OUTDIR]        (default: fastloss/mdf/data; needs scikit-image)
#
# The three sets train in parallel, one thread each. The seed is checked against the hash the
# shipped sets record, so a different scikit-image file is refused rather than silently used.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-fastloss/mdf/data}
PY=${PYTHON:-python}
SEED_SHA256=cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7
mkdir -p build/mdf-seed "$OUT"
SEED=build/mdf-seed/coffee.png
SOURCE="scikit-image's data/coffee.png (skimage.data.coffee(), 600 x 400): photograph by Rachel Michetti, CC0 1.0, no copyright restrictions"
"$PY" - "$SEED" <<'EOF'
import os, shutil, sys
import skimage.data
shutil.copyfile(os.path.join(os.path.dirname(skimage.data.__file__), "coffee.png"), sys.argv[1])
EOF
echo "$SEED_SHA256  $SEED" | sha256sum -c -
for task in denoise jpeg sisr; do
  "$PY" -m fastloss.mdf.train --seed-image "$SEED" --task "$task" --out "$OUT/$task.safetensors" \
      --scales 8 --max-size 128 --scale-factor 0.75 --resample lanczos --alpha 100 --distortion-as-noise \
      --first-input seed --iters 1000 --width 16 --seed 0 --threads 1 --no-progress \
      --seed-source "$SOURCE" &
done
wait
