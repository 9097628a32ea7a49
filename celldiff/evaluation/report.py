"""The evaluation report: ``metrics.json``, ``metrics.md`` (a Markdown table per section) and W&B tables.

``write_report`` takes the metrics dict of ``celldiff.evaluation.run.run_evaluation`` (with
``evaluate --morphology``, a morphology section: ``celldiff.evaluation.morphology``; its table and
heatmap also serve a study across runs: ``morphology_markdown``, ``morphology_figure``). Adding a
metric: compute it in ``celldiff.evaluation.distances`` and give it a row here (``_FIDELITY_KEYS``
for a scalar, the per-family columns for an inpainting comparison).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from celldiff.evaluation.morphology import FEATURES

SMALL_N_NOTE = (
    "Fréchet distances are biased upwards at small n (Chong & Forsyth 2020): compare them only at equal n, "
    "and against the real-vs-real floor at that n. The kernel distance (KID) is unbiased: its real-vs-real floor "
    "is 0 in expectation and shows the noise at this n."
)
INPAINTING_COMPARISONS = (
    "Each of the {m} inpainted test cells is completed once per mask family, and a completion shares its known "
    "pixels with its original. The valid comparisons are therefore made per mask family, between the {m} "
    "completions and the {reference} test cells that were not inpainted (Fréchet distance, kernel distance, "
    "precision/recall; the top-level figures are their means over the {families} families). Not reported: "
    "completions against their own originals (paired through the shared pixels: biased low, it rewards copying "
    "the known part) and all families pooled (each cell {families} times). The floor has the same sizes: {m} real "
    "test cells drawn at random against the other {reference}."
)


def _format(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    if value is None:
        return "–"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) with the given ``columns`` (missing cells: –)."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        cells = [_format(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist() if value.ndim else value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    if isinstance(value, Path):
        return str(value)
    return value


# Scalars of the top-level dict, with the sample count each Fréchet figure was measured at.
# (``frechet_distance_n``, when given, is the generated side of each comparison: per mask family for inpainting.)
_FIDELITY_KEYS = (
    ("frechet_distance", "frechet_distance_n"),
    ("frechet_distance_floor", "frechet_distance_floor_n"),
    ("precision", "frechet_distance_n"),
    ("recall", "frechet_distance_n"),
    ("kernel_distance", "frechet_distance_n"),
    ("kernel_distance_floor", "kernel_distance_floor_n"),
    ("classifier_accuracy_real_test", "num_real"),
)
# The comparisons of each mask family shown in its row of the masked-region table (besides mse ... seam, lpips).
_FAMILY_COLUMNS = ("frechet_distance", "floor", "precision", "recall")
# Described in the text under the fidelity table rather than listed under "Other".
_FLOOR_TEXT_KEYS = (
    "frechet_distance_reference_n",
    "frechet_distance_comparison",
    "frechet_distance_floor_reference_n",
    "frechet_distance_floor_rest",
    "frechet_distance_floor_draws",
    "frechet_distance_floor_method",
    "kernel_distance_floor_reference_n",
    "inpainting_comparisons",
)


def _floor_text(metrics: dict[str, Any]) -> str:
    """How the score and its floor were measured: the two set sizes of each (for metrics.md)."""
    n, num_real = metrics.get("num_samples"), metrics.get("num_real", "?")
    comparison = metrics.get("frechet_distance_comparison") or f"{n} generated vs {num_real} real images"
    floor_n = metrics.get("frechet_distance_floor_n", "?")
    method = metrics.get("frechet_distance_floor_method") or f"{floor_n} real images vs other real images"
    text = f"Fréchet distance: {comparison}. Floor (a perfect generator's expected score at these sizes): {method}."
    if metrics.get("frechet_distance_floor_rest", metrics.get("frechet_distance_floor")) != metrics.get("frechet_distance_floor"):
        text += (f" Against the {metrics.get('num_real', 0) - floor_n if isinstance(floor_n, int) else '?'} other real "
                 f"cells alone, without the extrapolation, it is {_format(metrics['frechet_distance_floor_rest'])}.")  # fmt: skip
    compared = metrics.get("frechet_distance_n", n)
    if isinstance(compared, int) and isinstance(floor_n, int) and floor_n < compared:
        text += (f" The floor can use at most half of the real cells ({floor_n}), fewer than the score's {compared}: "
                 "it is higher than a perfect generator would score.")  # fmt: skip
    if "kernel_distance_floor_reference_n" in metrics:
        text += (f" Kernel distance floor: {metrics.get('kernel_distance_floor_n')} real cells vs the other "
                 f"{metrics['kernel_distance_floor_reference_n']} (unbiased at any sizes: 0 in expectation).")  # fmt: skip
    if metrics.get("inpainting_comparisons"):
        text += f"\n\n{metrics['inpainting_comparisons']}"
    return text


def _morphology_text(section: dict[str, Any]) -> str:
    """The morphology section of metrics.md: per group (all, or a mask family) failures, then W1 per feature."""
    text = [
        "## Morphology (nucleus and cell, per class)\n\n"
        f"Generated cells are grouped by {section['grouping']}; {section['comparison']}. Each cell: Wasserstein-1 "
        "distance between the real and generated values of the feature over the real cells' standard deviation, "
        "its floor in brackets (about what a perfect generator scores at these sizes; 0 is unreachable). "
        f"Segmentation and features: {section['method']}.\n"
    ]
    for group in section["groups"]:
        columns = ["class", "n_real", "n_generated", "failed_real", "failed_generated", "mean_normalised_w1", "mean_floor"]
        classes = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
                   for row in group["classes"]]  # fmt: skip
        text.append(f"### {group['group']}\n\n" + markdown_table(classes, columns) + "\n"
                    + morphology_markdown({"": group["rows"]}))  # fmt: skip
    return "\n".join(text)


def _grid(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[str], np.ndarray]:
    classes = list(dict.fromkeys(r["class"] for r in rows))
    grid = np.full((len(classes), len(FEATURES)), np.nan)
    for r in rows:
        if r.get(key) is not None and r["feature"] in FEATURES:
            grid[classes.index(r["class"]), FEATURES.index(r["feature"])] = r[key]
    return classes, grid


def morphology_markdown(settings: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One Markdown table per setting (e.g. ``{"guidance 1": rows}``): classes x features, normalised W1 (floor)."""
    parts = []
    for setting, rows in settings.items():
        classes, value = _grid(rows, "normalised_w1")
        _, floor = _grid(rows, "floor")
        lines = [f"**{setting}**\n" if setting else "", "| class | " + " | ".join(FEATURES) + " |",
                 "| --- |" + " --- |" * len(FEATURES)]  # fmt: skip
        for i, name in enumerate(classes):
            cells = ["–" if not np.isfinite(v) else f"{v:.2f} ({f:.2f})" if np.isfinite(f) else f"{v:.2f}"
                     for v, f in zip(value[i], floor[i], strict=True)]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(line for line in lines if line) + "\n")
    return "\n".join(parts)


def morphology_figure(
    settings: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, columns: int = 2, vmax: float | None = None
) -> Path:
    """Heatmaps of normalised W1 (classes x features), one panel per setting, floors in brackets; saved to ``path``.

    Args:
        settings: ``{name: morphology_distances rows}`` (e.g. unconditional, guidance 0 / 1 / 2 / 4, inpainting).
        path: The image file (PNG, PDF, ...).
        columns: Panels per row.
        vmax: Top of the shared colour scale (default: the largest value, at least 1).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {name: (_grid(rows, "normalised_w1"), _grid(rows, "floor")[1]) for name, rows in settings.items()}
    top = vmax or max([1.0] + [float(np.nanmax(g[0][1])) for g in grids.values() if np.isfinite(g[0][1]).any()])
    columns = max(1, min(columns, len(grids)))
    nrows = math.ceil(len(grids) / columns)
    fig, axes = plt.subplots(nrows, columns, figsize=(7.5 * columns, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(grids) :]:
        ax.axis("off")
    for ax, (name, ((classes, value), floor)) in zip(axes.flat, grids.items(), strict=False):
        image = ax.imshow(value, cmap="magma_r", vmin=0, vmax=top, aspect="auto")
        for (i, j), v in np.ndenumerate(value):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}\n({floor[i, j]:.2f})", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.6 * top else "black")  # fmt: skip
        ax.set_xticks(range(len(FEATURES)), [f.replace("_", " ") for f in FEATURES], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_title(name, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.03, label="W1 / real std (floor)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def write_report(metrics: dict[str, Any], output_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` (a Markdown table per section) into ``output_dir``.

    Expected keys (others are listed in an "other" table): ``frechet_distance``, ``num_samples``
    (generated images), ``frechet_distance_floor`` and ``frechet_distance_floor_n``, ``num_real``,
    ``precision``, ``recall``, ``feature_space``; optional sections ``classifier``
    (``classifier_report``), ``memorisation`` (``memorisation_report``), ``inception``
    (``inception_metrics``' dict) or ``inception_skipped`` (its reason), ``morphology`` (``run._morphology``).

    Returns:
        The paths of metrics.json and metrics.md.
    """
    missing = [k for k in ("frechet_distance", "frechet_distance_floor", "num_samples") if k not in metrics]
    if missing:
        raise ValueError(f"write_report: metrics lacks {', '.join(missing)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "metrics.json", out / "metrics.md"
    json_path.write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")

    sections = ["# celldiff evaluation\n"]
    space = metrics.get("feature_space", "cell classifier features")
    rows = [
        {"metric": key, "value": metrics[key], "n": metrics.get(n_key, metrics.get("num_samples"))}
        for key, n_key in _FIDELITY_KEYS
        if key in metrics
    ]
    sections.append(f"## Fidelity ({space})\n\n" + markdown_table(rows, ["metric", "value", "n"]))
    sections.append(f"{_floor_text(metrics)}\n\n{SMALL_N_NOTE}\n")

    inception = metrics.get("inception")
    if inception:
        labels = {"inception_fid": "FID", "inception_kid_mean": "KID (mean)", "inception_kid_std": "KID (std)"}
        n = inception.get("num_generated")
        rows = [{"metric": label, "value": inception.get(key), "n": n} for key, label in labels.items()]
        sections.append(
            "## Inception (ImageNet features)\n\n"
            + markdown_table(rows, ["metric", "value", "n"])
            + f"FID: {inception.get('num_generated')} generated vs {inception.get('num_real')} real images. {SMALL_N_NOTE}\n"
        )
    elif metrics.get("inception_skipped"):
        sections.append(f"## Inception (ImageNet features)\n\n{metrics['inception_skipped']}\n")

    per_class = metrics.get("per_class")
    if per_class:
        sections.append(
            "## Fréchet distance per class\n\n"
            + markdown_table(
                per_class, ["class", "frechet_distance", "floor", "n_generated", "compared_n", "reference_n", "n_real"]
            )
            + "\nGenerated cells are counted under the class they were asked for (class-conditional), the class of the "
            "real cell they complete (inpainting), or else the class the classifier gives them. Each distance compares "
            "compared_n generated cells of the class (inpainting: per mask family, then averaged) with reference_n real "
            "test cells of the class (inpainting: those not inpainted); its floor, compared_n real cells of the class "
            "against the others at the same sizes. "
            f"{SMALL_N_NOTE}\n"
        )
    inpainting = metrics.get("inpainting")
    if inpainting:
        columns = ["family", "n", "mse", "psnr", "ssim", "seam"] + (["lpips"] if "lpips" in inpainting[0] else [])
        columns += [c for c in _FAMILY_COLUMNS if c in inpainting[0]]
        sections.append(
            "## Masked-region metrics per mask family\n\n"
            + markdown_table(inpainting, columns)
            + "\nOver the missing pixels only, intensities in [0, 1]: MSE, PSNR (dB) and SSIM (mean of the SSIM map inside "
            "the mask); seam: mean |gradient| mismatch with the real image on the mask boundary (0 = as in the real cell). "
            + (f"{metrics['lpips_skipped']}\n" if metrics.get("lpips_skipped") else "LPIPS (AlexNet) on the whole image.\n")
            + ("Fréchet distance, precision and recall: the family's completions against the test cells that were not "
               "inpainted, next to the real-vs-real floor at the same sizes.\n" if "frechet_distance" in inpainting[0] else "")
        )

    if metrics.get("morphology"):
        sections.append(_morphology_text(metrics["morphology"]))

    report = metrics.get("classifier")
    if report:
        names = report["class_names"]
        rows = [
            {"class": name, "accuracy": acc, "n": report["per_class_count"].get(name)}
            for name, acc in report["per_class_accuracy"].items()
        ]
        rows.append({"class": "all", "accuracy": report["accuracy"], "n": report["num_samples"]})
        confusion = [
            {"requested \\ predicted": names[i], **dict(zip(names, row, strict=True))}
            for i, row in enumerate(report["confusion_matrix"])
            if sum(row)
        ]
        sections.append(
            "## Classifier agreement (generated as → classified as)\n\n"
            + markdown_table(rows, ["class", "accuracy", "n"])
            + f"\nMean probability of the requested class: {_format(report.get('mean_confidence'))}\n\n"
            + markdown_table(confusion, ["requested \\ predicted", *names])
        )

    mix = metrics.get("class_mix")
    if mix:
        rows = [{"class": name, "generated": g, "real": r} for name, g, r in
                zip(mix["classes"], mix["generated_fractions"], mix["real_fractions"], strict=True)]  # fmt: skip
        sections.append(
            "## Class mix (fractions, both as the judge classifies them)\n\n"
            + f"Total variation {_format(mix['total_variation'])} (floor: {_format(mix['total_variation_floor'])}, "
            + "as many real test cells against all of them).\n\n" + markdown_table(rows, ["class", "generated", "real"])
        )

    memo = metrics.get("memorisation")
    if memo:
        rows = [{"space": space_name, **memo[space_name]} for space_name in ("pixel", "feature") if space_name in memo]
        columns = [
            "space",
            "gen_to_train_median",
            "test_to_train_median",
            "median_ratio",
            "test_to_train_p01",
            "fraction_below_test_p01",
        ]
        sections.append(
            "## Memorisation (nearest training image)\n\n"
            + f"{memo.get('num_generated')} generated, {memo.get('num_test')} test, {memo.get('num_train')} train images. "
            + "A model that does not copy has about 1% of generated images below the test images' 1st percentile.\n\n"
            + markdown_table(rows, columns)
            + f"\nCopy candidates (generated indices): {memo.get('copy_candidates') or 'none'}\n\n"
            + markdown_table(
                memo.get("closest_pairs", []),
                ["generated", "train", "pixel_distance", "feature_distance_to_nearest", "feature_nearest_train"],
            )
        )

    known = {k for pair in _FIDELITY_KEYS for k in pair} | set(_FLOOR_TEXT_KEYS) | {
        "num_real",
        "feature_space",
        "inception",
        "inception_skipped",
        "classifier",
        "memorisation",
        "lpips_skipped",
    }
    other = [{"key": k, "value": v} for k, v in metrics.items() if k not in known and not isinstance(v, dict | list)]
    if other:
        sections.append("## Other\n\n" + markdown_table(other, ["key", "value"]))
    md_path.write_text("\n".join(sections))
    return json_path, md_path


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
        morphology = [{"group": g["group"], **row} for g in (metrics.get("morphology") or {}).get("groups", []) for row in g["rows"]]
        if morphology:
            columns = list(dict.fromkeys(c for row in morphology for c in row))
            tables["eval/morphology"] = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in morphology])
        report = metrics.get("classifier")
        if report:
            names = report["class_names"]
            data = [[names[i], *row] for i, row in enumerate(report["confusion_matrix"])]
            tables["eval/confusion_matrix"] = wandb.Table(columns=["requested", *names], data=data)
            scalars["eval/classifier_accuracy"] = report["accuracy"]
        logger.experiment.log({**scalars, **tables, "eval/generated": wandb.Image(str(grid_path))})
        logger.experiment.summary.update(scalars)
