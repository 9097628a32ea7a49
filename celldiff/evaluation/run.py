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
from torch import Tensor

from celldiff.data import CellDataModule
from celldiff.evaluation.distances import (
    class_mix_error,
    compare_sets,
    frechet_distance,
    frechet_floor_details,
    memorisation_report,
    real_floors,
)
from celldiff.evaluation.external import inception_metrics, lpips_distances, lpips_network
from celldiff.evaluation.inputs import (
    EvaluationInputError,
    draws_unconditionally,
    evaluation_families,
    evaluation_mode,
    inpainting_size_problem,
    num_samples_problem,
)
from celldiff.evaluation.judge import (
    classifier_report,
    extract_features,
    judge_size_problem,
    judge_view,
    predicted_classes,
)
from celldiff.evaluation.masked import inpainting_metrics
from celldiff.evaluation.morphology import FEATURES, failure_summary, morphology_distances, morphology_features
from celldiff.evaluation.morphology_cells import cells_archive, save_cells
from celldiff.evaluation.report import INPAINTING_COMPARISONS, log_to_wandb, write_report
from celldiff.evaluation.sharding import rank_and_world, sharded_map
from celldiff.images import image_grid, save_png, to_model_range, to_uint8
from celldiff.seeds import sample_seed

SMALL_N_NOTE = "Fréchet distances are biased upwards at small n: compare a model only with the floor at the same n."
ForwardContext = Callable[[], AbstractContextManager[Any]]


def _progress(done: int, total: int, start: float, what: str) -> None:
    elapsed = time.perf_counter() - start
    eta = elapsed / max(done, 1) * (total - done)
    print(f"celldiff: {what} {done}/{total}, {done / max(elapsed, 1e-9):.2f} images/s, ETA {eta:.0f} s", file=sys.stderr)


def _jobs(datamodule: CellDataModule, inpainting: bool, num_samples: int, seed: int, batch_size: int) -> list[dict[str, Any]]:
    """The batches of an evaluation: mask family (inpainting), image indices (noise seeds), test positions."""
    jobs: list[dict[str, Any]] = []
    if not inpainting:
        return [{"family": None, "index": range(i, min(i + batch_size, num_samples))} for i in range(0, num_samples, batch_size)]
    test = datamodule.datasets["test"]
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
    return jobs


@torch.no_grad()
def generate_for_evaluation(
    model: Any,
    datamodule: CellDataModule,
    num_samples: int,
    seed: int,
    batch_size: int,
    sampler: str | None,
    steps: int | None,
    forward_context: ForwardContext | None = None,
) -> dict[str, Any]:
    """Generate ``num_samples`` images (or inpaint test cells) for the metrics.

    ``forward_context`` (e.g. the trainer's precision plugin's, an autocast region) wraps the
    sampling; the sampler keeps its own arithmetic in float32 whatever the network runs in.

    The work is cut into batches ("jobs") with one noise seed per image index, so the result does
    not depend on how it is shared out: under DDP each rank runs every world-th job and the jobs are
    gathered on every rank (``sharded_map``: identical to a single-device run).

    Returns ``images`` uint8 (N, 3, S, S), ``labels`` (N,) (requested class, or the real class of an
    inpainted cell), and for inpainting ``originals`` uint8 (N, 3, S, S), ``families`` (N,),
    ``positions`` (N,: the test-split position of each image's original; the same cells for every
    family) and ``masked``: per-image masked-region metrics.
    """
    inpainting, conditional = evaluation_mode(model.hparams, datamodule.eval_masks)
    num_classes = datamodule.num_classes
    jobs = _jobs(datamodule, inpainting, num_samples, seed, batch_size)
    context = forward_context or nullcontext
    rank, world = rank_and_world()
    total, done, start = sum(len(job["index"]) for job in jobs[rank::world]), [0], time.perf_counter()

    def run(j: int) -> dict[str, Any]:
        job = jobs[j]
        seeds = [sample_seed(seed, k) for k in job["index"]]
        if inpainting:
            batch = datamodule.fixed_mask_batch("test", job["positions"], job["family"])
            mask, known, labels = batch["mask"].to(model.device), batch["image"].to(model.device), batch["label"]
            condition = model.network_condition({"image": known, "mask": mask, "label": labels.to(model.device)})
        else:
            labels = torch.tensor([k % num_classes if conditional else -1 for k in job["index"]])
            condition = model.network_condition({"label": labels.clamp(min=0).to(model.device)})  # -1: guidance 0 (null class)
        with context():
            images = model.generate(seeds, condition=condition, sampler=sampler, steps=steps)
        result = {"images": to_uint8(images).cpu(), "labels": labels.cpu()}
        if inpainting:
            result["metrics"] = {k: v.cpu() for k, v in inpainting_metrics(images, known, mask).items()}
            result["originals"] = to_uint8(batch["image"])  # exactly the cached uint8 cell
        done[0] += len(labels)
        _progress(done[0], total, start, f"inpainting ({job['family']})" if inpainting else "sampling")
        return result

    results = sharded_map(run, len(jobs))
    sampling_seconds = time.perf_counter() - start
    families, masked, positions = [], [], []
    for job, result in zip(jobs, results, strict=True):
        if inpainting:
            families.extend([job["family"]] * len(job["index"]))
            positions.extend(int(p) for p in job["positions"])
            for key, values in result["metrics"].items():
                masked.extend({"family": job["family"], "metric": key, "value": float(v)} for v in values)
    return {
        "images": torch.cat([r["images"] for r in results]),
        "originals": torch.cat([r["originals"] for r in results]) if inpainting else None,
        "labels": torch.cat([r["labels"] for r in results]),
        "families": families,
        "positions": positions,  # inpainting: the test position of each image's original
        "masked": masked,
        "inpainting": inpainting,
        "conditional": conditional,
        "sampling_seconds": sampling_seconds,  # this process, wall clock, from the first job to the gathered result
        "sampling_images": total,  # the images this process generated
    }


def _check_run(model: Any, datamodule: CellDataModule, classifier: Any, num_samples: int) -> None:
    """The problems ``check_evaluation_inputs`` reports, again with the data set up (for callers without the CLI)."""
    names = list(datamodule.class_names)
    judge_names = getattr(classifier.hparams, "class_names", None)
    if getattr(classifier.hparams, "num_classes", len(names)) != len(names) or (judge_names and list(judge_names) != names):
        raise EvaluationInputError(
            f"the classifier was trained on classes {list(judge_names) if judge_names else classifier.hparams.num_classes}, "
            f"the data has {names}; expected a classifier trained on the data's classes"
        )
    inpainting, conditional = evaluation_mode(model.hparams, datamodule.eval_masks)
    families = evaluation_families(inpainting, datamodule.eval_masks)
    problem = judge_size_problem(classifier.hparams.image_size, model.hparams.image_size)
    problem = problem or num_samples_problem(num_samples, len(families), conditional, len(names))
    test_size = len(datamodule.datasets["test"])
    problem = problem or (inpainting_size_problem(num_samples, len(families), test_size) if families else None)
    if problem:
        raise EvaluationInputError(problem)


def _split_images(datamodule: CellDataModule, name: str) -> Tensor:
    """The cached images of one split, uint8 (N, 3, S, S)."""
    rows = datamodule.datasets[name].indices
    return torch.from_numpy(np.ascontiguousarray(datamodule.cached.images[rows])).permute(0, 3, 1, 2)


def _per_class(names: list[str], real_labels: Tensor, real_feats: Tensor, reference: Tensor, fake_feats: Tensor,
               fake_classes: Tensor, groups: dict[Any, Tensor], seed: int) -> list[dict[str, Any]]:  # fmt: skip
    """Per class: the Fréchet distance of the generated cells of the class (per group, averaged) and its floor."""
    rows = []
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
        rows.append(row)
    return rows


def _inpainting_rows(generated: dict[str, Any], per_group: dict[Any, dict[str, float]], floor: float,
                     lpips_weights: str | None, metrics: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """One row per mask family: masked-region means, LPIPS (with local weights), the family's comparisons."""
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
        fake = generated["images"]
        scores = lpips_distances(net.to(fake.device), to_model_range(fake), to_model_range(generated["originals"]))
        family_of = np.array(generated["families"])
        for row in rows:
            row["lpips"] = float(scores[torch.from_numpy(family_of == row["family"])].mean())
    return rows


def _morphology(real_test: Tensor, real_labels: Tensor, real_train: Tensor, train_labels: np.ndarray,
                generated: dict[str, Any], fake_classes: Tensor, names: list[str], seed: int) -> tuple[dict[str, Any], dict]:  # fmt: skip
    """The morphology section (docs/morphology.md): per class and feature, normalised W1 and its floor, and
    the per-cell values behind it (``morphology_cells.cells_archive``).

    From noise: all generated cells against all real test cells; floor, training cells (a seeded draw of
    at most 4 x as many as were generated) in place of the generated. Inpainting, per mask family: the
    completions against the test cells not inpainted; floor, the completed cells' originals in their place.
    """
    start = time.perf_counter()
    real, fake = morphology_features(real_test), morphology_features(generated["images"])
    real_y, fake_y = real_labels.numpy(), fake_classes.numpy()
    groups: list[tuple[str, dict[str, Any]]] = []
    if generated["inpainting"]:
        family_of, positions = np.array(generated["families"]), np.array(generated["positions"], dtype=np.int64)
        kept = np.ones(len(real_y), dtype=bool)
        kept[positions] = False
        reference = {k: v[kept] for k, v in real.items()}
        for family in dict.fromkeys(generated["families"]):
            chosen = family_of == family
            completed = {k: v[chosen] for k, v in fake.items()}
            originals = {k: v[positions[chosen]] for k, v in real.items()}
            args = (reference, real_y[kept], completed, fake_y[chosen], names)
            groups.append((family, {"args": args, "floor": (originals, real_y[positions[chosen]])}))
        comparison = ("per mask family, the completed cells against the test cells that were not inpainted; floor: "
                      "the completed cells' originals in their place")  # fmt: skip
    else:
        rows = np.random.default_rng(seed).permutation(len(train_labels))[: 4 * max(len(fake_y), 1)]
        train = morphology_features(real_train[torch.from_numpy(np.sort(rows))])
        groups.append(("all", {"args": (real, real_y, fake, fake_y, names), "floor": (train, train_labels[np.sort(rows)])}))
        comparison = (f"{len(fake_y)} generated cells against the {len(real_y)} real test cells, per class; floor: as many "
                      f"training cells of the class in their place (drawn from {len(rows)})")  # fmt: skip
    out = []
    for name, group in groups:
        distances = morphology_distances(*group["args"], *group["floor"], seed=seed)
        out.append({"group": name, "classes": failure_summary(*group["args"], distances), "rows": distances})
    grouping = ("the real class of the completed cell" if generated["inpainting"] else "the requested class"
                if not generated.get("unconditional") else "the class the judge gives them")  # fmt: skip
    print(f"celldiff: morphology of {len(real_y)} real and {len(fake_y)} generated cells in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)  # fmt: skip
    cells = cells_archive(real, real_y, fake, fake_y, names, grouping, generated["families"] if generated["inpainting"] else None)
    return {"features": list(FEATURES), "grouping": grouping, "comparison": comparison, "groups": out,
            "method": "docs/morphology.md"}, cells  # fmt: skip


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
    forward_context: ForwardContext | None = None,
    network_precision: str = "32-true",
    morphology: bool = False,
) -> dict[str, Any]:
    """Generate, measure against the real test split, write metrics.json and metrics.md.

    ``classifier`` is the judge (``celldiff.evaluation.judge.load_judge``; anything with
    ``features``, logits and ``hparams.image_size`` / ``num_classes`` / ``class_names`` works).
    ``forward_context`` wraps the sampling (the trainer's precision: ``network_precision`` names it
    in the report); the classifier and every metric run in float32 regardless.

    Under DDP (a process group is initialised) every rank generates its share of the images; rank 0
    measures and writes, and returns the metrics (the other ranks return ``{}``).

    With a W&B logger among ``loggers``, the scalars go to the run summary and the per-class,
    per-family and confusion tables become ``wandb.Table``s. ``morphology`` adds the morphological
    fidelity section (``_morphology``; docs/morphology.md), which segments every real test cell.
    """
    datamodule.prepare_data()
    datamodule.setup("fit")
    _check_run(model, datamodule, classifier, num_samples)
    names = list(datamodule.class_names)
    judge_size, model_size = classifier.hparams.image_size, model.hparams.image_size
    real_test, real_train = _split_images(datamodule, "test"), _split_images(datamodule, "train")
    real_labels = torch.from_numpy(datamodule.cached.labels[datamodule.datasets["test"].indices])

    generated = generate_for_evaluation(model, datamodule, num_samples, seed, batch_size, sampler, steps, forward_context)
    if rank_and_world()[0] != 0:  # every rank generated its share; rank 0 measures and writes
        return {}
    fake = generated["images"]
    n = len(fake)
    real_judged, fake_judged = judge_view(real_test, judge_size), judge_view(fake, judge_size)
    real_feats, fake_feats = extract_features(classifier, real_judged), extract_features(classifier, fake_judged)
    train_feats = extract_features(classifier, judge_view(real_train, judge_size))
    num_real = len(real_feats)
    # Per class: generated cells of a class (requested, real for inpainting, else as classified).
    fake_classes = generated["labels"]
    unconditional = generated["unconditional"] = draws_unconditionally(model.hparams, generated["inpainting"], generated["conditional"])
    if unconditional and n:
        fake_classes = predicted_classes(classifier, fake_judged)

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
    compared_n, reference_n = max(int(g.sum()) for g in groups.values()), int(reference.sum())
    if generated["inpainting"]:
        comparison = (f"per mask family, {compared_n} completions vs the {reference_n} test cells not inpainted, "
                      f"mean over {len(groups)} families")  # fmt: skip
    else:
        comparison = f"{n} generated vs all {num_real} real test cells"
    per_group = {family: compare_sets(real_feats[reference], fake_feats[selected]) for family, selected in groups.items()}
    summary = {key: float(np.mean([row[key] for row in per_group.values()])) for key in next(iter(per_group.values()))}
    # The floors: real cells in place of the generated ones, at the comparison's sizes (n vs N, or m vs N - m).
    floors = real_floors(real_feats, compared_n, reference_n, seed)
    metrics: dict[str, Any] = {
        "feature_space": f"celldiff cell classifier ({fake_feats.shape[1]}-d penultimate features)"
        + (f", at {judge_size} px (cells downsampled from {model_size} px)" if judge_size != model_size else ""),
        # the judge's own accuracy on the real test cells, as it sees them here (the same view as the generated)
        "classifier_accuracy_real_test": float(classifier_report(classifier, real_judged, real_labels, names)["accuracy"]),
        "num_samples": n,
        "num_real": num_real,
        **summary,
        "frechet_distance_n": compared_n,
        "frechet_distance_reference_n": reference_n,
        "frechet_distance_comparison": comparison,
        **floors,
        "note": SMALL_N_NOTE,
        "seed": seed,
        "sampler": sampler or model.hparams.sampler,
        "steps": steps if steps is not None else model.hparams.sampling_steps,
        "network_precision": network_precision,
        # wall seconds of generation alone (no features, metrics or report), per image this process made, and the
        # threads it had: the sampler's cost to compare (a DDP run's ranks sample in parallel; this is rank 0's)
        "sampling_seconds": round(generated["sampling_seconds"], 2),
        "sampling_seconds_per_image": round(generated["sampling_seconds"] / max(1, generated["sampling_images"]), 4),
        "sampling_threads": torch.get_num_threads(),
        "sampling_device": str(model.device),
    }
    if generated["inpainting"]:
        metrics["inpainting_comparisons"] = INPAINTING_COMPARISONS.format(m=compared_n, reference=reference_n, families=len(groups))
    metrics["per_class"] = _per_class(names, real_labels, real_feats, reference, fake_feats, fake_classes, groups, seed)
    if generated["conditional"]:
        metrics["classifier"] = classifier_report(classifier, fake_judged, generated["labels"], names)
    if unconditional and n:  # an unconditional generator: does it draw the classes as often as the data?
        real_predicted = predicted_classes(classifier, real_judged)
        metrics["class_mix"] = {**class_mix_error(fake_classes, real_predicted, len(names), seed), "classes": names}
    if generated["inpainting"]:
        metrics["inpainting"] = _inpainting_rows(generated, per_group, floors["frechet_distance_floor"], lpips_weights, metrics)
    if morphology:
        train_labels = datamodule.cached.labels[datamodule.datasets["train"].indices]
        metrics["morphology"], cells = _morphology(real_test, real_labels, real_train, np.asarray(train_labels), generated,
                                            fake_classes, names, seed)  # fmt: skip
    metrics["memorisation"] = memorisation_report(
        to_model_range(fake).flatten(1), fake_feats, to_model_range(real_train).flatten(1), train_feats,
        to_model_range(real_test).flatten(1), real_feats,
    )  # fmt: skip
    inception, reason = inception_metrics(real_test, fake, inception_weights)
    if inception is None:
        metrics["inception_skipped"] = reason
        print(f"celldiff: {reason}", file=sys.stderr)
    else:
        metrics["inception"] = inception
    out = Path(output_dir)
    json_path, md_path = write_report(metrics, out)
    save_png(image_grid(fake[: min(64, n)]), out / "generated_grid.png")
    if morphology:  # every cell's features, for histograms (celldiff.evaluation.morphology_cells)
        save_cells(cells, out / "morphology_cells.npz")
    print(
        f"celldiff: Fréchet distance {metrics['frechet_distance']:.4g} ({comparison}) vs real-vs-real floor "
        f"{floors['frechet_distance_floor']:.4g} ({floors['frechet_distance_floor_n']} vs "
        f"{floors['frechet_distance_floor_reference_n']} real); kernel distance {metrics['kernel_distance']:.4g} vs floor "
        f"{floors['kernel_distance_floor']:.2g}; precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}. {SMALL_N_NOTE}",
        file=sys.stderr,
    )
    print(f"celldiff: wrote {json_path} and {md_path}", file=sys.stderr)
    log_to_wandb(metrics, loggers or [], out / "generated_grid.png")
    return metrics
