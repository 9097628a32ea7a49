"""Every input of ``celldiff evaluate``, checked before any decoding or sampling (one line each).

How many samples the metrics need (``MIN_SET`` per compared set), which mask families an
inpainting evaluation uses, and whether the judge, the baseline and the local weights files can work.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from celldiff.evaluation.baselines import BASELINES
from celldiff.evaluation.distances import MIN_SET, PR_NEIGHBOURS
from celldiff.evaluation.external import lpips_network
from celldiff.evaluation.judge import Judge, judge_size_problem, load_judge
from celldiff.masks.mixture import mask_families

if TYPE_CHECKING:
    from celldiff.data import CellDataModule

DEFAULT_NUM_SAMPLES = 512  # evaluate --num_samples when not given
DEFAULT_EVAL_MASKS = "box,brush,centre,half,outpaint,nucleus"


class EvaluationInputError(ValueError):
    """An evaluation input that cannot work (the CLI reports it as one line, exit code 2)."""


def evaluation_mode(hparams: Any, eval_masks: Any, baseline: str | None = None) -> tuple[bool, bool]:
    """(inpainting, conditional) of an evaluation of a model with ``hparams`` under ``data.eval_masks``.

    ``data.eval_masks full`` alone (nothing observed) evaluates an inpainting model trained with the
    ``full`` family as a generator. (A class-conditional model at ``model.guidance_scale 0`` samples with
    the null class alone: see :func:`draws_unconditionally`.)
    """
    only_full = eval_masks is not None and mask_families(eval_masks) == ["full"]
    inpainting = baseline is not None or ((bool(hparams.inpainting) or eval_masks is not None) and not only_full)
    return inpainting, baseline is None and bool(hparams.class_conditional)


def draws_unconditionally(hparams: Any, inpainting: bool, conditional: bool) -> bool:
    """A generation whose cells come from no class: an unconditional model, or guidance 0 (the null class alone).

    Its cells are grouped by the judge's label and its class mix is measured against the data's; a
    class-conditional model at guidance 0 still reports the judge's agreement with the (ignored) requested
    classes: the chance level that conditioning is measured against.
    """
    return not inpainting and (not conditional or float(hparams.get("guidance_scale", 1.0)) == 0)


def evaluation_families(inpainting: bool, eval_masks: Any) -> list[str]:
    """The mask families an evaluation inpaints with ([] when it generates from noise)."""
    if not inpainting:
        return []
    return mask_families(eval_masks if eval_masks is not None else DEFAULT_EVAL_MASKS)


def num_samples_problem(num_samples: int, families: int, conditional: bool, num_classes: int) -> str | None:
    """Why ``num_samples`` is too few for the metrics, or None; checked before any decoding or sampling.

    Precision/recall put a ball through each point's k = 3rd nearest neighbour, so every set they
    compare needs at least 4 points (a Fréchet distance needs 2 for a covariance). Inpainting compares
    each of its ``families`` mask families on its own (ceil(n / families) cells each); a class-conditional
    model draws its classes in turn and needs 2 per class for the per-class Fréchet distances.
    """
    if families:
        minimum = MIN_SET * families
        why = (f"{MIN_SET} cells for each of the {families} mask families, as each family is compared on its own "
               f"and precision/recall use each cell's {PR_NEIGHBOURS} nearest neighbours")  # fmt: skip
    elif conditional:
        minimum = max(MIN_SET, 2 * num_classes)
        why = (f"precision/recall use each sample's {PR_NEIGHBOURS} nearest neighbours (at least {MIN_SET}) and the "
               f"per-class Fréchet distance fits a Gaussian to each of the {num_classes} classes (2 per class)")  # fmt: skip
    else:
        minimum = MIN_SET
        why = f"precision/recall use each sample's {PR_NEIGHBOURS} nearest neighbours"
    if num_samples < minimum:
        return f"--num_samples {num_samples}: expected at least {minimum} ({why}); without it the default is {DEFAULT_NUM_SAMPLES}"
    return None


def inpainting_size_problem(num_samples: int, families: int, num_test: int) -> str | None:
    """Why an inpainting evaluation of ``num_samples`` cannot leave a reference set, or None."""
    per_family, largest = math.ceil(num_samples / families), num_test - MIN_SET
    if per_family <= largest:
        return None
    return (
        f"--num_samples {num_samples}: inpainting {per_family} of the {num_test} test cells per mask family leaves fewer "
        f"than {MIN_SET} uninpainted cells to compare with; expected at most {max(largest, 0) * families} "
        f"({families} families x {max(largest, 0)} cells)"
    )


def _check_weights_file(flag: str, value: str, what: str) -> Path:
    """A weights file given on the command line: it must exist and load as tensors (weights_only)."""
    path = Path(value).expanduser()
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "no such file"
        raise EvaluationInputError(
            f"{flag} {value}: {state}; expected {what} (celldiff never downloads it; leave the option out to skip the metric)"
        )
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise EvaluationInputError(f"{flag} {value}: no permission to read it") from None
    except Exception as err:
        raise EvaluationInputError(f"{flag} {value}: not a readable weights file ({err.__class__.__name__}); expected {what}") from None
    if not isinstance(weights, dict) or not weights:
        raise EvaluationInputError(f"{flag} {value}: holds no state dict; expected {what}")
    return path


def check_evaluation_inputs(
    model: Any,
    datamodule: CellDataModule,
    ckpt_path: str | None,
    classifier_ckpt: str | None,
    baseline: str | None,
    num_samples: int | None,
    inception_weights: str | None = None,
    lpips_weights: str | None = None,
) -> tuple[Judge, int]:
    """Every input of ``celldiff evaluate``, checked before any decoding or sampling.

    ``model`` is the (not yet loaded) diffusion model built from the checkpoint's architecture, for
    its kind; the data module is asked only for its class names (folder names, no decoding). The
    diffusion checkpoint itself was checked when the command line was parsed.

    Returns:
        (the loaded, frozen classifier, the number of samples: ``DEFAULT_NUM_SAMPLES`` for None).

    Raises:
        EvaluationInputError or ``CheckpointKindError``, each one line naming the input.
    """
    if baseline is not None and baseline not in BASELINES:
        raise EvaluationInputError(f"--baseline {baseline}: unknown; expected one of {', '.join(sorted(BASELINES))}")
    if baseline is None and not ckpt_path:
        raise EvaluationInputError(
            "evaluate needs --ckpt_path of a diffusion checkpoint, or --baseline NAME for a non-learned inpainting fill"
        )
    if not classifier_ckpt:
        raise EvaluationInputError(
            "evaluate needs --classifier_ckpt of a cell classifier (trained with celldiff fit --config configs/classifier.yaml)"
        )
    classifier = load_judge(classifier_ckpt, option="--classifier_ckpt")
    names = list(datamodule.class_names)
    judged = classifier.hparams.get("class_names") or [f"{classifier.hparams.num_classes} classes"]
    if list(judged) != names:
        raise EvaluationInputError(
            f"--classifier_ckpt {classifier_ckpt} was trained on the classes {', '.join(map(str, judged))}, the data has "
            f"{', '.join(names)}; expected a classifier trained on the data's classes (the same class list)"
        )
    problem = judge_size_problem(int(classifier.hparams.image_size), int(datamodule.image_size))
    if problem:
        raise EvaluationInputError(f"{problem} (--classifier_ckpt {classifier_ckpt})")
    if num_samples is None:
        num_samples = DEFAULT_NUM_SAMPLES
    try:
        inpainting, conditional = evaluation_mode(model.hparams, datamodule.eval_masks, baseline)
        families = evaluation_families(inpainting, datamodule.eval_masks)
    except (ValueError, KeyError) as err:
        raise EvaluationInputError(f"data.eval_masks {datamodule.eval_masks}: {err}") from None
    problem = num_samples_problem(num_samples, len(families), conditional, len(names))
    if problem:
        raise EvaluationInputError(problem)
    if inception_weights is not None:
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        _check_weights_file("--metrics.inception_weights", inception_weights, "torch-fidelity's Inception weights (.pth)")
        if not _TORCH_FIDELITY_AVAILABLE:
            raise EvaluationInputError(
                f"--metrics.inception_weights {inception_weights}: Inception FID/KID need torch-fidelity, which is not "
                "installed (pip install torch-fidelity), or leave the option out to skip them"
            )
    if lpips_weights is not None:
        what = "torchvision's AlexNet weights (alexnet-owt-7be5be79.pth)"
        _check_weights_file("--metrics.lpips_weights", lpips_weights, what)
        net, reason = lpips_network(lpips_weights)
        if net is None:
            raise EvaluationInputError(f"--metrics.lpips_weights {lpips_weights}: {str(reason).removeprefix('LPIPS skipped: ')}")
    return classifier, num_samples
