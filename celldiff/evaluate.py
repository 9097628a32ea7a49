"""``celldiff evaluate``: how real are the generated cells? Offline, in the cell classifier's features.

For a diffusion checkpoint of any phase, generate (or inpaint) a fixed number of images with a
fixed seed and compare them with the real test split: Fréchet distance (overall and per class)
next to the real-vs-real floor at the same n, precision/recall (Kynkäänniemi et al. 2019),
classifier accuracy on class-conditional samples, memorisation (nearest training images), masked-
region metrics for inpainting models, and Inception FID/KID only when local weights are given.
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
    frechet_distance_floor,
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
    inpainted cell), and for inpainting ``families`` (N,) and per-image masked-region metrics.
    """
    test = datamodule.datasets["test"]
    inpainting = bool(model.hparams.inpainting) or datamodule.eval_masks is not None
    conditional = bool(model.hparams.class_conditional)
    num_classes = datamodule.num_classes
    jobs: list[dict[str, Any]] = []  # family (inpainting), image indices (noise seeds), test positions
    if inpainting:
        spec = datamodule.eval_masks if datamodule.eval_masks is not None else "box,brush,centre,half,outpaint,nucleus"
        names = _mask_families(spec)
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
    out_images, out_labels, families, masked, originals = [], [], [], [], []
    for j, job in enumerate(jobs):
        result = results[j]
        out_images.append(result["images"])
        if inpainting:
            originals.append(result["originals"])
        out_labels.extend(result["labels"].tolist())
        if inpainting:
            families.extend([job["family"]] * len(job["index"]))
            for key, values in result["metrics"].items():
                masked.extend({"family": job["family"], "metric": key, "value": float(v)} for v in values)
    return {
        "images": torch.cat(out_images),
        "originals": torch.cat(originals) if originals else None,
        "labels": torch.tensor(out_labels),
        "families": families,
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
    if getattr(classifier.hparams, "num_classes", len(names)) != len(names):
        raise ValueError(f"the classifier knows {classifier.hparams.num_classes} classes, the data {len(names)}")
    test, train = datamodule.datasets["test"], datamodule.datasets["train"]
    real_test = torch.from_numpy(np.ascontiguousarray(cached.images[test.indices])).permute(0, 3, 1, 2)
    real_train = torch.from_numpy(np.ascontiguousarray(cached.images[train.indices])).permute(0, 3, 1, 2)
    real_labels = torch.from_numpy(cached.labels[test.indices])
    judge_size, model_size = classifier.hparams.image_size, model.hparams.image_size
    problem = judge_size_problem(judge_size, model_size)
    if problem:
        raise ValueError(problem)

    generated = generate_for_evaluation(model, datamodule, num_samples, seed, batch_size, sampler, steps, forward_context)
    if _world()[0] != 0:  # every rank generated its share; rank 0 measures and writes
        return {}
    fake = generated["images"]
    n = len(fake)
    real_judged, fake_judged = judge_view(real_test, judge_size), judge_view(fake, judge_size)
    real_feats = extract_features(classifier, real_judged)
    fake_feats = extract_features(classifier, fake_judged)
    train_feats = extract_features(classifier, judge_view(real_train, judge_size))
    floor, floor_n = frechet_distance_floor(real_feats, n=n, generator=torch.Generator().manual_seed(seed))
    precision, recall = precision_recall(real_feats, fake_feats, k=3)
    kernel_floor, kernel_floor_n = kernel_distance_floor(real_feats, n, torch.Generator().manual_seed(seed))
    metrics: dict[str, Any] = {
        "feature_space": f"celldiff cell classifier ({fake_feats.shape[1]}-d penultimate features)"
        + (f", at {judge_size} px (cells downsampled from {model_size} px)" if judge_size != model_size else ""),
        # the judge's own accuracy on the real test cells, as it sees them here (the same view as the generated)
        "classifier_accuracy_real_test": float(
            classifier_report(classifier, real_judged, real_labels, names)["accuracy"]
        ),
        "num_samples": n,
        "num_real": len(real_feats),
        "frechet_distance": frechet_distance(real_feats, fake_feats),
        "frechet_distance_floor": floor,
        "frechet_distance_floor_n": floor_n,
        "precision": precision,
        "recall": recall,
        "kernel_distance": kernel_distance(real_feats, fake_feats),
        "kernel_distance_floor": kernel_floor,
        "kernel_distance_floor_n": kernel_floor_n,
        "note": SMALL_N_NOTE,
        "seed": seed,
        "sampler": sampler or model.hparams.sampler,
        "steps": steps if steps is not None else model.hparams.sampling_steps,
        "network_precision": network_precision,
    }
    # Per class: generated cells of a class (requested, real for inpainting, else as classified).
    fake_classes = generated["labels"]
    if not generated["conditional"] and not generated["inpainting"]:
        fake_classes = classifier(fake_judged).argmax(1).cpu() if n else fake_classes
    per_class = []
    for c, name in enumerate(names):
        real_c, fake_c = real_feats[real_labels == c], fake_feats[fake_classes == c]
        row = {"class": name, "n_generated": len(fake_c), "n_real": len(real_c)}
        if len(real_c) >= 4 and len(fake_c) >= 2:
            row["frechet_distance"] = frechet_distance(real_c, fake_c)
            row["floor"], row["floor_n"] = frechet_distance_floor(real_c, n=len(fake_c), generator=torch.Generator().manual_seed(seed))
        per_class.append(row)
    metrics["per_class"] = per_class
    if generated["conditional"]:
        metrics["classifier"] = classifier_report(classifier, fake_judged, generated["labels"], names)
    if generated["inpainting"]:
        rows = []
        for family in dict.fromkeys(r["family"] for r in generated["masked"]):
            values = {m: [r["value"] for r in generated["masked"] if r["family"] == family and r["metric"] == m]
                      for m in ("mse", "psnr", "ssim", "seam")}  # fmt: skip
            rows.append({"family": family, "n": len(values["mse"]), **{m: float(np.mean(v)) for m, v in values.items()}})
        net, reason = lpips_network(lpips_weights)
        if net is None:
            metrics["lpips_skipped"] = reason
            print(f"celldiff: {reason}", file=sys.stderr)
        else:
            scores = lpips_distances(net.to(fake.device), _to_float(fake), _to_float(generated["originals"]))
            family_of = np.array(generated["families"])
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
        f"celldiff: Fréchet distance {metrics['frechet_distance']:.3f} (n = {n}) vs real-vs-real floor "
        f"{floor:.3f} (n = {floor_n}); kernel distance {metrics['kernel_distance']:.4g} vs floor {kernel_floor:.2g}; "
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
