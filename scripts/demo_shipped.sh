#!/usr/bin/env bash
# The last part of `make demo`: what the shipped model (weights/celldiff64.safetensors, weights/README.md) draws,
# without training anything: four 64 px cells of each class, and one test cell of the bundled sample with its
# nucleus masked and inpainted four times. About 40 s on one CPU thread.
#   bash scripts/demo_shipped.sh OUT_DIR      # writes OUT_DIR/shipped_classes/grid.png, OUT_DIR/shipped_nucleus/grid.png
# Without the weights file (a checkout without weights/) it says so and exits 0: the demo's own model is the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/demo_shipped.sh OUT_DIR}
SHIPPED=${SHIPPED:-weights/celldiff64.safetensors}
CELLDIFF=${CELLDIFF:-.venv/bin/celldiff}
if [ ! -f "$SHIPPED" ]; then
    echo "celldiff demo: no $SHIPPED in this checkout: the shipped model's grids are skipped"
    exit 0
fi
"$CELLDIFF" predict --config configs/shipped.yaml --ckpt_path "$SHIPPED" --output_dir "$OUT/shipped_classes" \
    --classes all --num_samples 4 --seed 0 --trainer.enable_progress_bar false
"$CELLDIFF" predict --config configs/shipped.yaml --ckpt_path "$SHIPPED" --output_dir "$OUT/shipped_nucleus" \
    --data.predict_source test --data.num_predict_samples 1 --samples_per_image 4 --seed 0 \
    --trainer.enable_progress_bar false
echo ""
echo "the shipped model ($SHIPPED, 64 x 64, weights/README.md) draws:"
echo "  four cells of each class:        $OUT/shipped_classes/grid.png"
echo "  a test cell, nucleus inpainted:  $OUT/shipped_nucleus/grid.png (masked input | 4 samples | original)"
