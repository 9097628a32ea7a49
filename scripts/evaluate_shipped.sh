#!/usr/bin/env bash
# The measurements of the shipped model (docs/results.md; weights/README.md): one model, four tasks,
# judged at 64 px by weights/judge64.safetensors on the 3,444 pbc64 test cells. Two queues of one thread
# each (2 cores); each evaluation's metrics.json / metrics.md are copied into docs/results/ship64/ when done.
#   bash scripts/evaluate_shipped.sh [MODEL.safetensors] [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-weights/celldiff64.safetensors}
DATA=${2:-../shared/data/pbc64}
OUT=${EVAL_DIR:-$HOME/celldiff-runs/evals/shipped}
KEEP=docs/results/ship64
CELLDIFF=${CELLDIFF:-.venv/bin/celldiff}
mkdir -p "$OUT" "$KEEP"
export OMP_NUM_THREADS=1 WANDB_MODE=disabled

run() {  # NAME N EXTRA...: one evaluation (skipped when its metrics are already kept)
    local name=$1 n=$2; shift 2
    [ -f "$KEEP/$name.json" ] && { echo "evaluate_shipped: $name already measured"; return; }
    rm -rf "${OUT:?}/$name"
    local start=$SECONDS
    "$CELLDIFF" evaluate --config configs/shipped.yaml --ckpt_path "$MODEL" --classifier_ckpt weights/judge64.safetensors \
        --data.data_dir "$DATA" --output_dir "$OUT/$name" --num_samples "$n" --seed 0 --data.batch_size 100 \
        --model.sampler dpmsolver --model.sampling_steps 20 --trainer.precision bf16-mixed "$@" 2> "$OUT/$name.log"
    cp "$OUT/$name/metrics.json" "$KEEP/$name.json"
    cp "$OUT/$name/metrics.md" "$KEEP/$name.md"
    cp "$OUT/$name/generated_grid.png" "$KEEP/$name.png"
    cp "$OUT/$name/morphology_cells.npz" "$KEEP/$name.npz"  # every cell's morphology (the histograms)
    echo "evaluate_shipped: $name done in $((SECONDS - start)) s"
}

# n = 1,000 generated cells per setting (the inpainting: 150 cells x 6 families). Guidance 0 and 1 cost one
# network call per step, guidance 2 and 4 two (conditional and null class): the queues hold about equal work.
queue_a() {
    run uncond 1000 --data.eval_masks full --model.guidance_scale 0 --morphology true   # unconditional generation
    run class_g2 1000 --data.eval_masks full --model.guidance_scale 2 --morphology true  # class-conditional, guidance 2
    run class_g1 1000 --data.eval_masks full --model.guidance_scale 1 --morphology true
}
queue_b() {
    run inpaint_g1 900 --data.eval_masks box,brush,centre,half,outpaint,nucleus --model.guidance_scale 1 --morphology true
    run class_g4 1000 --data.eval_masks full --model.guidance_scale 4 --morphology true
}
queue_a & queue_b & wait
