#!/usr/bin/env bash
# The quality-per-CPU-hour measurement (docs/results.md): runs A (the seed project's Phase 1 recipe,
# configs/results/seed_phase1_64.yaml), B (configs/results/phase1_64.yaml) and C (configs/results/phase1_64_fast.yaml)
# at 64 x 64 on pbc64, one thread each, then every checkpoint of each judged by weights/judge64.safetensors
# (n = 1,000, DPM-Solver++ 20 steps, seed 0: the same seeds at every checkpoint), the curve points appended to
# docs/results/curves/recipe_<X>.jsonl (commit them after each call: the run directories die with their machine),
# and the figure docs/results/recipe_curves.png with the headline (the wall time C needs to reach A's final FD).
#
#   bash scripts/recipe_runs.sh train A C     # two runs side by side, one thread each (2 cores)
#   bash scripts/recipe_runs.sh train B
#   bash scripts/recipe_runs.sh curves A C    # measure the checkpoints not measured yet, one thread each
#   bash scripts/recipe_runs.sh plot
#
# A run that was stopped goes on from its last.ckpt (--ckpt_path last) when its run directory is still there.
# Its wall time then counts the time it was stopped too (scripts/curve_points.py): run each in one go, on
# one machine, for a fair headline. bf16-mixed where the CPU has AVX-512 BF16 or AMX, else fp32 (25x faster
# there than bf16); the machine goes into every curve point. About 1 h per run on one AMX thread (20 images/s),
# 4.5 h in fp32 on an AVX2-only core.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${RECIPE_RUNS:-$HOME/celldiff-runs/recipe}
DATA=${DATA_DIR:-../shared/data/pbc64}
CELLDIFF=${CELLDIFF:-.venv/bin/celldiff}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then PREC=bf16-mixed; else PREC=32-true; fi

config() {
    case $1 in
        A) echo configs/results/seed_phase1_64.yaml ;;
        B) echo configs/results/phase1_64.yaml ;;
        C) echo configs/results/phase1_64_fast.yaml ;;
        *) echo "recipe_runs: unknown run '$1'; expected A, B or C" >&2; exit 2 ;;
    esac
}

train() {  # RUN: fit (or go on with --ckpt_path last), log in ROOT/RUN.log
    local run=$1 cfg resume=()
    cfg=$(config "$run")
    [ -f "$ROOT/$run/checkpoints/last.ckpt" ] && resume=(--ckpt_path last)
    mkdir -p "$ROOT"
    echo "recipe_runs: $run: $cfg, $PREC, $ROOT/$run ${resume[*]}"
    "$CELLDIFF" fit --config "$cfg" --data.data_dir "$DATA" --run_dir "$ROOT/$run" --trainer.precision "$PREC" \
        --trainer.enable_progress_bar false "${resume[@]}" >> "$ROOT/$run.log" 2>&1
    date -u +%FT%TZ > "$ROOT/$run.done"  # fit returned 0: last.ckpt is the run's final step (curves --last)
}

curves() {  # RUN: every checkpoint not measured yet (the numbered ones and, once the run has finished, last.ckpt at
            # its final step), one line each in docs/results/curves/recipe_RUN.jsonl; outputs kept in ROOT/evals
    local run=$1
    config "$run" > /dev/null
    "$PY" scripts/curve_points.py --run_dir "$ROOT/$run" --config "$(config "$run")" \
        --classifier_ckpt weights/judge64.safetensors --out "docs/results/curves/recipe_$run.jsonl" --name "$run" \
        --num_samples 1000 --sampler dpmsolver --steps 20 --seed 0 --data_dir "$DATA" --eval_dir "$ROOT/evals" \
        $([ -f "$ROOT/$run.done" ] && echo --last) \
        --extra "--trainer.precision $PREC --data.batch_size 100"
}

what=${1:-}
shift || true
case $what in
    train | curves)
        [ $# -gt 0 ] || { echo "recipe_runs: $what needs one or more of A, B, C" >&2; exit 2; }
        [ $# -le 2 ] || { echo "recipe_runs: at most two runs at once on 2 cores" >&2; exit 2; }
        for run in "$@"; do config "$run" > /dev/null; done  # an unknown run: exit 2 before anything starts
        pids=()
        for run in "$@"; do "$what" "$run" & pids+=($!); done
        status=0
        for pid in "${pids[@]}"; do wait "$pid" || status=1; done
        exit $status ;;
    plot)
        files=(docs/results/curves/recipe_*.jsonl)
        "$PY" scripts/plot_curves.py "${files[@]}" --out docs/results/recipe_curves.png --headline A C ;;
    *)
        echo "usage: bash scripts/recipe_runs.sh train|curves RUN [RUN] | plot   (RUN: A, B or C)" >&2
        exit 2 ;;
esac
