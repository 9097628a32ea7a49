#!/usr/bin/env bash
# Reproduce the second set of results in docs/results.md ("At the seed project's size and budget"):
#   - Phase 1 at 64 x 64 with an 11 M-parameter U-Net, 57,600 images seen (configs/results/phase1_64.yaml),
#     and its sampler comparison (DDIM 25 / 50 / 100 against DDPM 1000 on the same checkpoint);
#   - Phase 2 with celldiff's recipe and with the seed project's recipe at two thirds of the seed's Phase 2 budget
#     (3,000 steps x 64 = 192,000 images each; the 1.19 M U-Net at 32 x 32), with the non-learned fills;
#   - the cell classifier that judges them (skipped if runs/results/classifier already holds one).
# bf16-mixed throughout: about 2 hours on 2 cores of a CPU with AMX-BF16 (Intel Sapphire Rapids
# and newer). On a CPU without it, bf16 is far slower than fp32: replace bf16-mixed by 32-true below
# (and in configs/results/phase1_64.yaml) and expect about 2.5x the time.
#   bash scripts/reproduce_results_large.sh [DATA_DIR]      # DATA_DIR default ../shared/data/pbc64
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/pbc64}
export WANDB_MODE=disabled
R=runs/results
mkdir -p $R/eval
LONG="--trainer.max_steps 3000 --trainer.precision bf16-mixed --checkpoint.every_n_train_steps 500"
fit() { local name=$1 cfg=$2; shift 2
  .venv/bin/celldiff fit --config configs/results/$cfg.yaml --data.data_dir "$DATA" --run_dir $R/$name "$@" > $R/$name.log 2>&1; }
CLS=$R/classifier/checkpoints/last.ckpt
E() { local name=$1; shift
  .venv/bin/celldiff evaluate --data.data_dir "$DATA" --classifier_ckpt $CLS --seed 0 \
    --output_dir $R/eval/$name "$@" > $R/eval/$name.log 2>&1; }
P64=$R/phase1_64/checkpoints/last.ckpt

# 1. Phase 1 at 64 px (two threads) and, beside it, the classifier (one thread)
OMP_NUM_THREADS=2 fit phase1_64 phase1_64 &
PHASE1_PID=$!
[ -f $CLS ] || OMP_NUM_THREADS=1 fit classifier classifier --trainer.precision bf16-mixed
export OMP_NUM_THREADS=1
# 2. both Phase 2 recipes at 192 k images while Phase 1 finishes (one thread each), then the
#    Phase 1 sampler comparison: DDIM 25 / 50 at n = 256, and DDIM 25 / 50 / 100 with DDPM 1000 at
#    n = 32 (DDPM 1000 at n = 256 would take longer than everything else together)
(
  fit seed_inpaint_192k seed_inpaint $LONG
  E seed192k_ddim50 --config configs/results/seed_inpaint.yaml --ckpt_path $R/seed_inpaint_192k/checkpoints/last.ckpt \
    --num_samples 120 --model.sampler ddim --model.sampling_steps 50 --trainer.precision bf16-mixed
  # the seed recipe's own sampler (DDPM 1000 steps, replacement) on the first 10 of the 40 cells per family
  E seed192k_ddpm1000 --config configs/results/seed_inpaint.yaml --ckpt_path $R/seed_inpaint_192k/checkpoints/last.ckpt \
    --num_samples 30 --trainer.precision bf16-mixed
) &
(
  fit phase2_192k phase2 $LONG
  E phase2_192k_ddim50 --config configs/results/phase2.yaml --ckpt_path $R/phase2_192k/checkpoints/last.ckpt \
    --num_samples 120 --trainer.precision bf16-mixed
  E mean_fill --config configs/results/phase2.yaml --baseline mean_fill --num_samples 120
  E blur_fill --config configs/results/phase2.yaml --baseline blur_fill --num_samples 120
) &
wait $PHASE1_PID
(
  P1="--config configs/results/phase1_64.yaml --ckpt_path $P64"
  E p64_ddim50 $P1 --num_samples 256 --model.sampler ddim --model.sampling_steps 50
  E p64_ddim25 $P1 --num_samples 256 --model.sampler ddim --model.sampling_steps 25
  E p64_ddpm1000 $P1 --num_samples 32 --model.sampler ddpm --model.sampling_steps 1000
  for s in 25 50 100; do
    E p64_ddim${s}_n32 $P1 --num_samples 32 --model.sampler ddim --model.sampling_steps $s
  done
) &
wait
.venv/bin/celldiff test --config configs/results/classifier.yaml --data.data_dir "$DATA" --ckpt_path $CLS \
    --run_dir $R/classifier_test > $R/classifier_test.log 2>&1
.venv/bin/python scripts/results_tables.py $R/eval
.venv/bin/python scripts/results_figures.py --phase2-run phase2_192k --seed-run seed_inpaint_192k --phase1-run "" \
    --data-dir "$DATA" --out docs/results/inpainting_comparison_192k.png
# 3. notebook 01 against the 64 px Phase 1 model
.venv/bin/python notebooks/execute_notebooks.py 01_unconditional_diffusion --phase1-run phase1_64 --data-dir "$DATA"
