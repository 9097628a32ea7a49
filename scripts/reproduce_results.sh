#!/usr/bin/env bash
# Reproduce docs/results.md: train every results model on pbc64 (32 x 32), evaluate, execute the notebooks.
# About 3 hours on a 2-core CPU (two jobs at a time, one thread each). Checkpoints go to runs/results/.
#   bash scripts/reproduce_results.sh [DATA_DIR]      # DATA_DIR default ../shared/data/pbc64
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/pbc64}
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
R=runs/results
mkdir -p $R/eval
fit() { .venv/bin/celldiff fit --config configs/results/$1.yaml --data.data_dir "$DATA" --run_dir $R/$1 > $R/$1.log 2>&1; }
CLS=$R/classifier/checkpoints/last.ckpt
E() { local name=$1; shift; .venv/bin/celldiff evaluate --data.data_dir "$DATA" --classifier_ckpt $CLS --seed 0 \
        --output_dir $R/eval/$name "$@" > $R/eval/$name.log 2>&1; }

# 1. training, two at a time
(fit phase1; fit seed_inpaint) &
(fit classifier; fit phase2; fit phase3) &
wait
.venv/bin/celldiff test --config configs/results/classifier.yaml --data.data_dir "$DATA" --ckpt_path $CLS \
    --run_dir $R/classifier_test > $R/classifier_test.log 2>&1

# 2. evaluation (same seed, same test cells and masks for every inpainting method)
P1=$R/phase1/checkpoints/last.ckpt
(
  E phase1_ddpm1000 --config configs/results/phase1.yaml --ckpt_path $P1 --num_samples 128 --model.sampler ddpm --model.sampling_steps 1000
  for s in 25 50 100; do
    E phase1_ddim$s --config configs/results/phase1.yaml --ckpt_path $P1 --num_samples 128 --model.sampler ddim --model.sampling_steps $s
  done
  E phase3_ddim50 --config configs/results/phase3.yaml --ckpt_path $R/phase3/checkpoints/last.ckpt --num_samples 256
) &
(
  E phase2_ddim50 --config configs/results/phase2.yaml --ckpt_path $R/phase2/checkpoints/last.ckpt --num_samples 120
  E phase1_replacement_ddim50 --config configs/results/phase2.yaml --ckpt_path $P1 --num_samples 120
  E mean_fill --config configs/results/phase2.yaml --baseline mean_fill --num_samples 120
  E blur_fill --config configs/results/phase2.yaml --baseline blur_fill --num_samples 120
  E seed_ddim50 --config configs/results/seed_inpaint.yaml --ckpt_path $R/seed_inpaint/checkpoints/last.ckpt --num_samples 120 \
    --model.sampler ddim --model.sampling_steps 50
  # the seed recipe's own sampler, DDPM 1000 steps: 20x the cost, so 10 cells per mask family
  E seed_ddpm1000 --config configs/results/seed_inpaint.yaml --ckpt_path $R/seed_inpaint/checkpoints/last.ckpt --num_samples 15
) &
wait
.venv/bin/python scripts/results_tables.py $R/eval
.venv/bin/python scripts/results_figures.py --runs $R --data-dir "$DATA"

# 3. the notebooks, executed against these checkpoints
.venv/bin/python notebooks/execute_notebooks.py --data-dir "$DATA"
