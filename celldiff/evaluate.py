"""``celldiff evaluate``: how real are the generated cells? Offline, in the cell classifier's features.

For a diffusion checkpoint of any phase, generate (or inpaint) a fixed number of images with a
fixed seed and compare them with the real test split: Fréchet distance (overall and per class)
next to the real-vs-real floor at the same set sizes (n real test cells against the others, read at
the score's reference size; see ``frechet_floor_details``), precision/recall (Kynkäänniemi et al. 2019),
classifier accuracy on class-conditional samples, memorisation (nearest training images), masked-
region metrics for inpainting models, and Inception FID/KID only when local weights are given.

An inpainting model completes the same m test cells under every mask family; each family's m
completions are compared with the test cells that were not inpainted (never with their own
originals, which share their known pixels), and the floor is m real cells against the other N - m.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from celldiff.data import CellDataModule, MaskAssigner, noise_seed_for, tensor_to_uint8
from celldiff.evaluation import (
    classifier_report,
    extract_features,
    frechet_distance,
    frechet_floor_details,
    inception_metrics,
    kernel_distance,
    kernel_distance_floor,
    lpips_distances,
    lpips_network,
    memorisation_report,
    precision_recall,
    write_report,
)
from celldiff.masks import MASK_TYPES, MaskSampler
from celldiff.metrics import inpainting_metrics

SMALL_N_NOTE = "Fréchet distances are biased upwards at small n: compare a model only with the floor at the same n."
DEFAULT_NUM_SAMPLES = 512  # evaluate --num_samples when not given
PR_NEIGHBOURS = 3  # k of precision/recall (Kynkäänniemi et al. 2019)
MIN_SET = PR_NEIGHBOURS + 1  # precision/recall need more than k points per set (the Fréchet distance 2)
DEFAULT_EVAL_MASKS = "box,brush,centre,half,outpaint,nucleus"
INPAINTING_COMPARISONS = (
    "Each of the {m} inpainted test cells is completed once per mask family, and a completion shares its known "
    "pixels with its original. The valid comparisons are therefore made per mask family, between the {m} "
    "completions and the {reference} test cells that were not inpainted (Fréchet distance, kernel distance, "
    "precision/recall; the top-level figures are their means over the {families} families). Not reported: "
    "completions against their own originals (paired through the shared pixels: biased low, it rewards copying "
    "the known part) and all families pooled (each cell {families} times). The floor has the same sizes: {m} real "
    "test cells drawn at random against the other {reference}."
)


class EvaluationInputError(ValueError):
    """An evaluation input that cannot work (the CLI reports it as one line, exit code 2)."""


def evaluation_families(inpainting: bool, eval_masks: Any) -> list[str]:
    """The mask families an evaluation inpaints with ([] when it generates from noise)."""
    if not inpainting:
        return []
    return _mask_families(eval_masks if eval_masks is not None else DEFAULT_EVAL_MASKS)


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


def _progress(done: int, total: int, start: float, what: str) -> None:
    elapsed = time.perf_counter() - start
    eta = elapsed / max(done, 1) * (total - done)
    print(f"celldiff: {what} {done}/{total}, {done / max(elapsed, 1e-9):.2f} images/s, ETA {eta:.0f} s", file=sys.stderr)


def _to_float(images_uint8: Tensor) -> Tensor:
    return images_uint8.float() / 127.5 - 1


def judge_size_problem(classifier_size: int, model_size: int) -> str | None:
    """Why a classifier at ``classifier_size`` px cannot judge a model at ``model_size`` px, or None."""
    if classifier_size <= model_size:
        return None
    return (
        f"the classifier works at {classifier_size} px, the diffusion model at {model_size} px; expected a "
        f"classifier trained at {model_size} px or less (a smaller one judges the cells downsampled)"
    )


def judge_view(images_uint8: Tensor, size: int) -> Tensor:
    """Images (N, 3, S, S) uint8 as the classifier sees them: [-1, 1], resized to ``size`` if S differs.

    A classifier trained at a lower resolution than the diffusion model judges the generated and the
    real cells alike downsampled (antialiased bicubic, torch's match of PIL's filter, which made the
    classifier's own training images), so both sides of every comparison pass the same filter.
    """
    x = _to_float(images_uint8)
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def _mask_families(spec: Any) -> list[str]:
    """The mask types named by a data.masks / data.eval_masks spec, each evaluated on its own."""
    sampler = MaskSampler.from_spec(spec)
    return [name for name in MASK_TYPES if name in sampler.names]


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
) -> tuple[Any, int]:
    """Every input of ``celldiff evaluate``, checked before any decoding or sampling.

    ``model`` is the (not yet loaded) diffusion model built from the checkpoint's architecture, for
    its kind; the data module is asked only for its class names (folder names, no decoding). The
    diffusion checkpoint itself was checked when the command line was parsed.

    Returns:
        (the loaded, frozen classifier, the number of samples: ``DEFAULT_NUM_SAMPLES`` for None).

    Raises:
        EvaluationInputError or ``CheckpointKindError``, each one line naming the input.
    """
    from celldiff.baselines import BASELINES
    from celldiff.classifier import load_classifier

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
    classifier = load_classifier(classifier_ckpt, option="--classifier_ckpt")
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
    inpainting = baseline is not None or bool(model.hparams.inpainting) or datamodule.eval_masks is not None
    conditional = baseline is None and bool(model.hparams.class_conditional)
    try:
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


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_results(mine: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Every rank's {job index: result} on every rank (CPU tensors travel as objects)."""
    rank, world = _world()
    if world == 1:
        return mine
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    merged: dict[int, dict[str, Any]] = {}
    for part in gathered:
        merged.update(part)
    return merged


@torch.no_grad()
def generate_for_evaluation(
    model: Any,
    datamodule: CellDataModule,
    num_samples: int,
    seed: int,
    batch_size: int,
    sampler: str | None,
    steps: int | None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """Generate ``num_samples`` images (or inpaint test cells) for the metrics.

    ``forward_context`` (e.g. the trainer's precision plugin's, an autocast region) wraps the
    sampling; the sampler keeps its own arithmetic in float32 whatever the network runs in.

    The work is cut into batches ("jobs") with one noise seed per image index, so the result does
    not depend on how it is shared out: under DDP each rank runs every world-th job and the jobs are
    gathered on every rank (identical to a single-device run).

    Returns ``images`` uint8 (N, 3, S, S), ``labels`` (requested class, or the real class of an
    inpainted cell), and for inpainting ``families`` (N,), ``positions`` (N,: the test-split position
    of each image's original; the same cells for every family) and per-image masked-region metrics.
    """
    test = datamodule.datasets["test"]
    inpainting = bool(model.hparams.inpainting) or datamodule.eval_masks is not None
    conditional = bool(model.hparams.class_conditional)
    num_classes = datamodule.num_classes
    jobs: list[dict[str, Any]] = []  # family (inpainting), image indices (noise seeds), test positions
    if inpainting:
        names = evaluation_families(True, datamodule.eval_masks)
        per_family = math.ceil(num_samples / len(names))
        # The same test cells for every family and method: a seeded draw over the whole test split
        # (the split is ordered by class, so its first cells would all be basophils).
        order = np.random.default_rng(seed).permutation(len(test))
        for f, name in enumerate(names):
            positions = order[np.arange(per_family) % len(test)]
            for i in range(0, per_family, batch_size):
                index = range(f * per_family + i, f * per_family + min(i + batch_size, per_family))
                jobs.append({"family": name, "index": index, "positions": positions[i : i + batch_size]})
    else:
        labels = [i % num_classes for i in range(num_samples)] if conditional else [-1] * num_samples
        for i in range(0, num_samples, batch_size):
            jobs.append({"family": None, "index": range(i, min(i + batch_size, num_samples))})
    context = forward_context or nullcontext
    rank, world = _world()
    maskers: dict[str, MaskAssigner] = {}
    mine: dict[int, dict[str, Any]] = {}
    total = sum(len(job["index"]) for job in jobs[rank::world])
    start = time.perf_counter()
    for j in range(rank, len(jobs), world):
        job = jobs[j]
        seeds = [noise_seed_for(seed, k) for k in job["index"]]
        if inpainting:
            name = job["family"]
            masker = maskers.setdefault(
                name, MaskAssigner(name, datamodule.mask_options, datamodule.mask_seed, deterministic=True)
            )
            batch = test.get_batch(job["positions"])
            mask = masker(batch["image"], test.indices[job["positions"]]).float().to(model.device)
            known = _to_float(batch["image"]).to(model.device)
            batch_labels = batch["label"]
            condition = model.network_condition({"image": known, "mask": mask, "label": batch_labels.to(model.device)})
            with context():
                images = model.generate(seeds, condition=condition, sampler=sampler, steps=steps)
            metrics = {k: v.cpu() for k, v in inpainting_metrics(images, known, mask).items()}
        else:
            batch_labels = torch.tensor([labels[k] for k in job["index"]])
            condition = model.network_condition({"label": batch_labels.to(model.device)})
            with context():
                images = model.generate(seeds, condition=condition, sampler=sampler, steps=steps)
            metrics = {}
        mine[j] = {"images": tensor_to_uint8(images).cpu(), "labels": batch_labels.cpu(), "metrics": metrics}
        if inpainting:
            mine[j]["originals"] = batch["image"].cpu()
        done = sum(len(r["labels"]) for r in mine.values())
        _progress(done, total, start, f"inpainting ({job['family']})" if inpainting else "sampling")
    results = _gather_results(mine)
    out_images, out_labels, families, masked, originals, positions = [], [], [], [], [], []
    for j, job in enumerate(jobs):
        result = results[j]
        out_images.append(result["images"])
        if inpainting:
            originals.append(result["originals"])
        out_labels.extend(result["labels"].tolist())
        if inpainting:
            families.extend([job["family"]] * len(job["index"]))
            positions.extend(int(p) for p in job["positions"])
            for key, values in result["metrics"].items():
                masked.extend({"family": job["family"], "metric": key, "value": float(v)} for v in values)
    return {
        "images": torch.cat(out_images),
        "originals": torch.cat(originals) if originals else None,
        "labels": torch.tensor(out_labels),
        "families": families,
        "positions": positions,  # inpainting: the test position of each image's original
        "masked": masked,
        "inpainting": inpainting,
        "conditional": conditional,
    }


def run_evaluation(
    model: Any,
    datamodule: CellDataModule,
    classifier: Any,
    output_dir: str | Path,
    num_samples: int = 512,
    seed: int = 0,
    batch_size: int = 64,
    sampler: str | None = None,
    steps: int | None = None,
    inception_weights: str | None = None,
    loggers: list[Any] | None = None,
    lpips_weights: str | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
    network_precision: str = "32-true",
) -> dict[str, Any]:
    """Generate, measure against the real test split, write metrics.json and metrics.md.

    ``forward_context`` wraps the sampling (the trainer's precision: ``network_precision`` names it
    in the report); the classifier and every metric run in float32 regardless.

    Under DDP (a process group is initialised) every rank generates its share of the images; rank 0
    gathers them, measures and writes, and returns the metrics (the other ranks return ``{}``).

    With a W&B logger among ``loggers``, the scalars go to the run summary and the per-class,
    per-family and confusion tables become ``wandb.Table``s.
    """
    datamodule.prepare_data()
    datamodule.setup("fit")
    cached = datamodule.cached
    names = list(datamodule.class_names)
    judge_names = getattr(classifier.hparams, "class_names", None)
    if getattr(classifier.hparams, "num_classes", len(names)) != len(names) or (judge_names and list(judge_names) != names):
        raise EvaluationInputError(
            f"the classifier was trained on classes {list(judge_names) if judge_names else classifier.hparams.num_classes}, "
            f"the data has {names}; expected a classifier trained on the data's classes"
        )
    test, train = datamodule.datasets["test"], datamodule.datasets["train"]
    judge_size, model_size = classifier.hparams.image_size, model.hparams.image_size
    problem = judge_size_problem(judge_size, model_size)
    inpainting = bool(model.hparams.inpainting) or datamodule.eval_masks is not None
    families = evaluation_families(inpainting, datamodule.eval_masks)
    problem = problem or num_samples_problem(num_samples, len(families), bool(model.hparams.class_conditional), len(names))
    problem = problem or (inpainting_size_problem(num_samples, len(families), len(test)) if families else None)
    if problem:
        raise EvaluationInputError(problem)
    real_test = torch.from_numpy(np.ascontiguousarray(cached.images[test.indices])).permute(0, 3, 1, 2)
    real_train = torch.from_numpy(np.ascontiguousarray(cached.images[train.indices])).permute(0, 3, 1, 2)
    real_labels = torch.from_numpy(cached.labels[test.indices])

    generated = generate_for_evaluation(model, datamodule, num_samples, seed, batch_size, sampler, steps, forward_context)
    if _world()[0] != 0:  # every rank generated its share; rank 0 measures and writes
        return {}
    fake = generated["images"]
    n = len(fake)
    real_judged, fake_judged = judge_view(real_test, judge_size), judge_view(fake, judge_size)
    real_feats = extract_features(classifier, real_judged)
    fake_feats = extract_features(classifier, fake_judged)
    train_feats = extract_features(classifier, judge_view(real_train, judge_size))
    num_real = len(real_feats)
    # Per class: generated cells of a class (requested, real for inpainting, else as classified).
    fake_classes = generated["labels"]
    if not generated["conditional"] and not generated["inpainting"]:
        fake_classes = classifier(fake_judged).argmax(1).cpu() if n else fake_classes

    # The comparisons: (generated features, real reference features), one per mask family for
    # inpainting (against the test cells not inpainted), else all generated against all real.
    if generated["inpainting"]:
        family_of = np.array(generated["families"])
        inpainted = np.zeros(num_real, dtype=bool)
        inpainted[np.array(generated["positions"], dtype=np.int64)] = True
        reference = ~torch.from_numpy(inpainted)
        groups = {f: torch.from_numpy(family_of == f) for f in dict.fromkeys(generated["families"])}
    else:
        reference = torch.ones(num_real, dtype=torch.bool)
        groups = {None: torch.ones(n, dtype=torch.bool)}
    compared_n = max(int(g.sum()) for g in groups.values())
    reference_n = int(reference.sum())
    ref_feats = real_feats[reference]
    per_group: dict[Any, dict[str, float]] = {}
    for family, selected in groups.items():
        precision_f, recall_f = precision_recall(ref_feats, fake_feats[selected], k=PR_NEIGHBOURS)
        per_group[family] = {
            "frechet_distance": frechet_distance(ref_feats, fake_feats[selected]),
            "kernel_distance": kernel_distance(ref_feats, fake_feats[selected]),
            "precision": precision_f,
            "recall": recall_f,
        }
    summary = {key: float(np.mean([row[key] for row in per_group.values()])) for key in next(iter(per_group.values()))}
    precision, recall = summary["precision"], summary["recall"]
    # The floor: real cells in place of the generated ones, at the comparison's sizes (n vs N, or m vs N - m).
    floor_info = frechet_floor_details(real_feats, compared_n, torch.Generator().manual_seed(seed), reference_n=reference_n)
    floor = floor_info["floor"]
    kernel_floor, kernel_floor_n = kernel_distance_floor(real_feats, compared_n, torch.Generator().manual_seed(seed))
    if generated["inpainting"]:
        comparison = (f"per mask family, {compared_n} completions vs the {reference_n} test cells not inpainted, "
                      f"mean over {len(groups)} families")  # fmt: skip
    else:
        comparison = f"{n} generated vs all {num_real} real test cells"
    metrics: dict[str, Any] = {
        "feature_space": f"celldiff cell classifier ({fake_feats.shape[1]}-d penultimate features)"
        + (f", at {judge_size} px (cells downsampled from {model_size} px)" if judge_size != model_size else ""),
        # the judge's own accuracy on the real test cells, as it sees them here (the same view as the generated)
        "classifier_accuracy_real_test": float(
            classifier_report(classifier, real_judged, real_labels, names)["accuracy"]
        ),
        "num_samples": n,
        "num_real": num_real,
        "frechet_distance": summary["frechet_distance"],
        "frechet_distance_n": compared_n,
        "frechet_distance_reference_n": reference_n,
        "frechet_distance_comparison": comparison,
        "frechet_distance_floor": floor,
        "frechet_distance_floor_n": floor_info["n"],
        "frechet_distance_floor_reference_n": floor_info["reference_n"],
        "frechet_distance_floor_rest": floor_info["floor_rest"],
        "frechet_distance_floor_draws": floor_info["draws"],
        "frechet_distance_floor_method": floor_info["method"],
        "precision": precision,
        "recall": recall,
        "kernel_distance": summary["kernel_distance"],
        "kernel_distance_floor": kernel_floor,
        "kernel_distance_floor_n": kernel_floor_n,
        "kernel_distance_floor_reference_n": num_real - kernel_floor_n,
        "note": SMALL_N_NOTE,
        "seed": seed,
        "sampler": sampler or model.hparams.sampler,
        "steps": steps if steps is not None else model.hparams.sampling_steps,
        "network_precision": network_precision,
    }
    if generated["inpainting"]:
        metrics["inpainting_comparisons"] = INPAINTING_COMPARISONS.format(m=compared_n, reference=reference_n, families=len(groups))
    per_class = []
    for c, name in enumerate(names):
        real_c = real_labels == c
        ref_c = real_feats[real_c & reference]
        fake_c = {f: fake_feats[selected & (fake_classes == c)] for f, selected in groups.items()}
        sizes = [len(x) for x in fake_c.values()]
        row: dict[str, Any] = {"class": name, "n_generated": sum(sizes), "n_real": int(real_c.sum()),
                               "compared_n": min(sizes), "reference_n": len(ref_c)}  # fmt: skip
        if int(real_c.sum()) >= 4 and len(ref_c) >= 2 and min(sizes) >= 2:
            row["frechet_distance"] = float(np.mean([frechet_distance(ref_c, x) for x in fake_c.values()]))
            details = frechet_floor_details(
                real_feats[real_c], min(sizes), torch.Generator().manual_seed(seed), reference_n=len(ref_c)
            )
            row["floor"], row["floor_n"] = details["floor"], details["n"]
        per_class.append(row)
    metrics["per_class"] = per_class
    if generated["conditional"]:
        metrics["classifier"] = classifier_report(classifier, fake_judged, generated["labels"], names)
    if generated["inpainting"]:
        rows = []
        for family in dict.fromkeys(r["family"] for r in generated["masked"]):
            values = {m: [r["value"] for r in generated["masked"] if r["family"] == family and r["metric"] == m]
                      for m in ("mse", "psnr", "ssim", "seam")}  # fmt: skip
            rows.append({"family": family, "n": len(values["mse"]), **{m: float(np.mean(v)) for m, v in values.items()},
                         **per_group.get(family, {}), "floor": floor})  # fmt: skip
        net, reason = lpips_network(lpips_weights)
        if net is None:
            metrics["lpips_skipped"] = reason
            print(f"celldiff: {reason}", file=sys.stderr)
        else:
            scores = lpips_distances(net.to(fake.device), _to_float(fake), _to_float(generated["originals"]))
            for row in rows:
                row["lpips"] = float(scores[torch.from_numpy(family_of == row["family"])].mean())
        metrics["inpainting"] = rows
    metrics["memorisation"] = memorisation_report(
        _to_float(fake).flatten(1), fake_feats, _to_float(real_train).flatten(1), train_feats,
        _to_float(real_test).flatten(1), real_feats,
    )  # fmt: skip
    inception, reason = inception_metrics(real_test, fake, inception_weights)
    if inception is None:
        metrics["inception_skipped"] = reason
        print(f"celldiff: {reason}", file=sys.stderr)
    else:
        metrics["inception"] = inception
    out = Path(output_dir)
    json_path, md_path = write_report(metrics, out)
    grid_n = min(64, n)
    from celldiff.callbacks import image_grid, save_png

    save_png(image_grid(fake[:grid_n]), out / "generated_grid.png")
    print(
        f"celldiff: Fréchet distance {metrics['frechet_distance']:.4g} ({comparison}) vs real-vs-real floor "
        f"{floor:.4g} ({floor_info['n']} vs {floor_info['reference_n']} real); kernel distance {metrics['kernel_distance']:.4g} vs floor {kernel_floor:.2g}; "
        f"precision {precision:.3f}, recall {recall:.3f}. {SMALL_N_NOTE}",
        file=sys.stderr,
    )
    print(f"celldiff: wrote {json_path} and {md_path}", file=sys.stderr)
    log_to_wandb(metrics, loggers or [], out / "generated_grid.png")
    return metrics


def log_to_wandb(metrics: dict[str, Any], loggers: list[Any], grid_path: Path) -> None:
    """Scalars, tables and the sample grid of an evaluation to every W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        tables: dict[str, Any] = {}
        for key in ("per_class", "inpainting"):
            rows = metrics.get(key) or []
            if rows:
                columns = list(dict.fromkeys(c for row in rows for c in row))
                tables[f"eval/{key}"] = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        report = metrics.get("classifier")
        if report:
            names = report["class_names"]
            data = [[names[i], *row] for i, row in enumerate(report["confusion_matrix"])]
            tables["eval/confusion_matrix"] = wandb.Table(columns=["requested", *names], data=data)
            scalars["eval/classifier_accuracy"] = report["accuracy"]
        logger.experiment.log({**scalars, **tables, "eval/generated": wandb.Image(str(grid_path))})
        logger.experiment.summary.update(scalars)
