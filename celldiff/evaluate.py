"""TRANSITIONAL: removed by D. ``celldiff evaluate`` moved to ``celldiff.evaluation`` (run, inputs, judge, report)."""

# TRANSITIONAL: removed by D (importers: celldiff.cli, notebooks/03_class_conditional).
from celldiff.evaluation.distances import MIN_SET, PR_NEIGHBOURS  # noqa: F401
from celldiff.evaluation.inputs import (  # noqa: F401
    DEFAULT_EVAL_MASKS,
    DEFAULT_NUM_SAMPLES,
    EvaluationInputError,
    check_evaluation_inputs,
    evaluation_families,
    inpainting_size_problem,
    num_samples_problem,
)
from celldiff.evaluation.judge import judge_size_problem, judge_view  # noqa: F401
from celldiff.evaluation.report import INPAINTING_COMPARISONS, log_to_wandb  # noqa: F401
from celldiff.evaluation.run import SMALL_N_NOTE, generate_for_evaluation, run_evaluation  # noqa: F401
