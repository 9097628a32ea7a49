"""The tables and figures of docs/results.md (the shipped model) from the kept evaluation reports.

    python scripts/shipped_tables.py [--dir docs/results/ship64] [--figures docs/results] > /tmp/shipped.md

``scripts/evaluate_shipped.sh`` keeps each ``celldiff evaluate`` report of the shipped model as
``<dir>/NAME.json`` (+ ``.md``, and ``.png``: its grid of up to 64 generated cells): ``uncond``
(unconditional), ``class_g1`` / ``class_g2`` / ``class_g4`` (class-conditional at guidance 1 / 2 / 4) and
``inpaint_g1`` (six mask families, conditioned on the true class), all with the morphology section.
A report not there yet is skipped (and named on stderr). Prints Markdown to stdout:

1. generation: n, Fréchet distance (FD) and its real-vs-real floor, KID and its floor, precision, recall,
   the judge's agreement with the requested class (class-conditional) or the class mix's total variation
   and its floor (unconditional), memorisation in the judge's features;
2. the unconditional class mix; 3. the class-conditional agreement per class and guidance;
4. inpainting per mask family; 5. morphology: per setting x feature and per class x setting, mean normalised W1
   (floor in brackets).

Figures (needs matplotlib; skipped with a note on stderr without it, or with ``--figures ""``):
``<figures>/morphology_w1.png`` (``celldiff.evaluation.report.morphology_figure``, every class x feature) and
``<figures>/ship64_samples.png`` (the kept sample grids side by side, one panel per setting) and
``<figures>/morphology_histograms.png`` (per class and feature, the real test cells' histogram and each
setting's, from the kept per-cell values ``<dir>/NAME.npz``; ``celldiff.evaluation.morphology_cells``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

GENERATION = {"uncond": "unconditional", "class_g1": "guidance 1", "class_g2": "guidance 2", "class_g4": "guidance 4"}
INPAINT = "inpaint_g1"
NAMES = (*GENERATION, INPAINT)
MORPHOLOGY_INPAINT = ("nucleus", "nucleus inpainting")  # the inpaint report's group shown, and its setting name
DASH = "–"


def _number(value: Any) -> float | None:
    """A finite float, or None (absent, null in JSON, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def sig(value: Any, digits: int = 3) -> str:
    """``digits`` significant digits, without exponents for ordinary sizes (26.1, 0.224, -0.000668, 1234)."""
    v = _number(value)
    if v is None:
        return DASH
    if v == 0:
        return "0"
    if abs(v) < 1e-4:
        return f"{v:.{digits - 1}e}"
    decimals = digits - 1 - math.floor(math.log10(abs(v)))
    return f"{v:.{max(decimals, 0)}f}"


def dec(value: Any, decimals: int = 3) -> str:
    """A fixed number of decimals (fractions: 3; PSNR: 1)."""
    v = _number(value)
    return DASH if v is None else f"{v:.{decimals}f}"


def bracket(value: Any, floor: Any, fmt=sig) -> str:
    """``value (floor)``; the value alone when there is no floor."""
    if _number(value) is None:
        return DASH
    return fmt(value) if _number(floor) is None else f"{fmt(value)} ({fmt(floor)})"


def dec_2(value: Any) -> str:
    return dec(value, 2)


def mean(values: Iterable[Any]) -> float | None:
    finite = [v for v in (_number(x) for x in values) if v is not None]
    return sum(finite) / len(finite) if finite else None


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_reports(folder: Path) -> dict[str, dict[str, Any]]:
    """The kept reports that are there, by name; the missing ones are named on stderr."""
    reports, missing = {}, []
    for name in NAMES:
        path = folder / f"{name}.json"
        if path.is_file():
            reports[name] = json.loads(path.read_text())
        else:
            missing.append(name)
    if missing:
        print(
            f"shipped_tables: not there yet (skipped): {', '.join(f'{folder / n}.json' for n in missing)}",
            file=sys.stderr,
        )
    return reports


# 1. Generation ------------------------------------------------------------------------------------------------


def generation_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    header = ["setting", "n", "FD", "FD floor (n / reference)", "KID", "KID floor", "precision", "recall",
              "judge agreement", "class-mix TV (floor)", "NN ratio", "below test p01"]  # fmt: skip
    rows = []
    for name, setting in GENERATION.items():
        m = reports.get(name)
        if m is None:
            continue
        floor_n = f"{m.get('frechet_distance_floor_n', '?')} / {m.get('frechet_distance_floor_reference_n', '?')}"
        mix, judge = m.get("class_mix") or {}, m.get("classifier") or {}
        memo = (m.get("memorisation") or {}).get("feature") or {}
        rows.append([
            setting, str(m.get("num_samples", DASH)), sig(m.get("frechet_distance")),
            f"{sig(m.get('frechet_distance_floor'))} ({floor_n})", sig(m.get("kernel_distance")),
            sig(m.get("kernel_distance_floor")), dec(m.get("precision")), dec(m.get("recall")), dec(judge.get("accuracy")),
            bracket(mix.get("total_variation"), mix.get("total_variation_floor"), dec),
            sig(memo.get("median_ratio")), dec(memo.get("fraction_below_test_p01")),
        ])  # fmt: skip
    if not rows:
        return ""
    first = next(reports[n] for n in GENERATION if n in reports)
    notes = (
        f"In the judge's features (its accuracy on the {first.get('num_real', '?')} real test cells: "
        f"{dec(first.get('classifier_accuracy_real_test'))}); all generated cells against all real test cells. "
        "FD floor: as many real cells against the others, at the score's sizes; KID floor: n real cells against the "
        "rest (0 in expectation). Judge agreement: the fraction the judge classifies as the requested class. "
        "Class-mix TV: total variation between the generated and the real class fractions, both as the judge "
        "classifies them (floor: as many real test cells). NN ratio: median distance of a generated cell to its nearest "
        "training cell over the same for a test cell (1 = as close as unseen real cells); below test p01: the fraction "
        "of generated cells nearer a training cell than 99 % of test cells are (about 0.01 without copying)."
    )
    return "### Generation (shipped model)\n\n" + table(header, rows) + "\n" + notes + "\n"


# 2. Unconditional class mix -----------------------------------------------------------------------------------


def class_mix_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    mix = (reports.get("uncond") or {}).get("class_mix")
    if not mix:
        return ""
    rows = [
        [c, dec(g), dec(r)]
        for c, g, r in zip(mix["classes"], mix["generated_fractions"], mix["real_fractions"], strict=True)
    ]
    return (
        f"### Unconditional class mix (n = {reports['uncond'].get('num_samples')}, as the judge classifies them)\n\n"
        + table(["class", "generated fraction", "real fraction"], rows)
        + f"\nTotal variation {dec(mix.get('total_variation'))} (floor {dec(mix.get('total_variation_floor'))}).\n"
    )


# 3. Class-conditional agreement -------------------------------------------------------------------------------


def agreement_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    judged = {
        GENERATION[n]: reports[n]["classifier"] for n in GENERATION if n in reports and reports[n].get("classifier")
    }
    if not judged:
        return ""
    classes = list(dict.fromkeys(c for r in judged.values() for c in r.get("class_names") or r["per_class_accuracy"]))
    rows = [[c, *(dec(r["per_class_accuracy"].get(c)) for r in judged.values())] for c in classes]
    rows.append(["**all**", *(f"**{dec(r.get('accuracy'))}**" for r in judged.values())])
    rows.append(["mean probability of the requested class", *(dec(r.get("mean_confidence")) for r in judged.values())])
    counts = ", ".join(f"{s}: {r.get('num_samples')}" for s, r in judged.items())
    return (
        "### Class-conditional generation: the judge's agreement with the requested class\n\n"
        + table(["class", *judged], rows)
        + f"\nFraction of the cells generated as a class that the judge classifies as that class ({counts} cells, "
        "the classes in turn).\n"
    )


# 4. Inpainting ------------------------------------------------------------------------------------------------


def _morphology_groups(m: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {g["group"]: g["rows"] for g in (m.get("morphology") or {}).get("groups", [])}


def inpainting_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    m = reports.get(INPAINT)
    rows = (m or {}).get("inpainting")
    if not rows:
        return ""
    morphology = _morphology_groups(m)
    lpips = any("lpips" in r for r in rows)  # only with local LPIPS weights
    comparisons = [(key, label, fmt) for key, label, fmt in (("kernel_distance", "KID", sig), ("precision", "precision", dec),
                   ("recall", "recall", dec)) if any(key in r for r in rows)]  # fmt: skip
    header = ["family", "m", "PSNR (dB)", "SSIM", "MSE", "seam", *(["LPIPS"] if lpips else []), "FD (floor)"]
    header += [label for _, label, _ in comparisons] + (["morphology W1 (floor)"] if morphology else [])
    out = []
    for r in rows:
        row = [
            r["family"],
            str(r.get("n", DASH)),
            dec(r.get("psnr"), 1),
            dec(r.get("ssim")),
            sig(r.get("mse")),
            sig(r.get("seam")),
        ]
        row += [dec(r.get("lpips"))] if lpips else []
        row += [bracket(r.get("frechet_distance"), r.get("floor"))] + [fmt(r.get(key)) for key, _, fmt in comparisons]
        if morphology:
            group = morphology.get(r["family"], [])
            row.append(bracket(mean(x.get("normalised_w1") for x in group), mean(x.get("floor") for x in group), dec_2))
        out.append(row)
    m_cells, reference = m.get("frechet_distance_n", "m"), m.get("frechet_distance_reference_n", "the other")
    notes = (
        f"{m_cells} test cells (a seeded draw), each completed under every mask family, conditioned on its true class "
        "at guidance 1. PSNR, SSIM, MSE (intensities in [0, 1]) over the missing pixels only; seam: gradient mismatch "
        f"on the mask boundary (0 = as in the real cell). FD, per family: the {m_cells} completions against the "
        f"{reference} test cells not inpainted; floor: {m_cells} real test cells against the other {reference}."
    )
    if morphology:
        notes += (" Morphology W1: normalised W1 of the completed cells against the test cells not inpainted, mean over "
                  "classes and features (floor: the completed cells' originals in their place).")  # fmt: skip
    return "### Inpainting per mask family\n\n" + table(header, out) + "\n" + notes + "\n"


# 5. Morphology ------------------------------------------------------------------------------------------------


def morphology_settings(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{setting: morphology_distances rows}``: unconditional, guidance 1 / 2 / 4, nucleus inpainting (those there)."""
    settings = {}
    for name, setting in GENERATION.items():
        groups = _morphology_groups(reports.get(name) or {})
        if "all" in groups:
            settings[setting] = groups["all"]
    groups = _morphology_groups(reports.get(INPAINT) or {})
    if MORPHOLOGY_INPAINT[0] in groups:
        settings[MORPHOLOGY_INPAINT[1]] = groups[MORPHOLOGY_INPAINT[0]]
    return settings


def _features(
    reports: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[str]:
    for m in reports.values():
        if (m.get("morphology") or {}).get("features"):
            return list(m["morphology"]["features"])
    return list(dict.fromkeys(r["feature"] for rows in settings.values() for r in rows))


def morphology_tables(reports: Mapping[str, Mapping[str, Any]]) -> str:
    settings = morphology_settings(reports)
    if not settings:
        return ""
    features = _features(reports, settings)
    by_feature = []
    for setting, rows in settings.items():
        cells = []
        for feature in features:
            mine = [r for r in rows if r["feature"] == feature]
            cells.append(bracket(mean(r.get("normalised_w1") for r in mine), mean(r.get("floor") for r in mine), dec_2))
        measured = {r["class"] for r in rows if _number(r.get("normalised_w1")) is not None}
        classes = {r["class"] for r in rows}
        by_feature.append([setting, f"{len(measured)} / {len(classes)}", *cells])
    classes = list(dict.fromkeys(r["class"] for rows in settings.values() for r in rows))
    by_class = []
    for c in classes:
        cells = []
        for rows in settings.values():
            mine = [r for r in rows if r["class"] == c]
            cells.append(bracket(mean(r.get("normalised_w1") for r in mine), mean(r.get("floor") for r in mine), dec_2))
        by_class.append([c, *cells])
    overall = [bracket(mean(r.get("normalised_w1") for r in rows), mean(r.get("floor") for r in rows), dec_2)
               for rows in settings.values()]  # fmt: skip
    by_class.append(["**all**", *overall])
    return (
        "### Morphology: normalised W1 per feature (mean over classes, floor in brackets)\n\n"
        + table(["setting", "classes", *(f.replace("_", " ") for f in features)], by_feature)
        + "\nWasserstein-1 distance between the generated and the real test cells' values of the feature, over the real "
        "cells' standard deviation, per class (docs/morphology.md), then averaged over the classes measured (classes: "
        "those with generated cells of the class: unconditional cells are grouped by the class the judge gives them). "
        "Floor: training cells in place of the generated (nucleus inpainting: the completed cells' originals, against "
        "the test cells not inpainted); about what a perfect generator scores at these sizes.\n\n"
        "### Morphology per class (mean over features, floor in brackets)\n\n"
        + table(["class", *settings], by_class)
        + "\n**all**: the mean over every (class, feature) measured.\n"
    )


# 6. Figures ---------------------------------------------------------------------------------------------------


def _sample_panels(reports: Mapping[str, Mapping[str, Any]], folder: Path) -> list[tuple[str, Path]]:
    panels = []
    for name in NAMES:
        if name not in reports:
            continue
        path = folder / f"{name}.png"
        if not path.is_file():
            print(f"shipped_tables: {path} is not there: no panel", file=sys.stderr)
            continue
        if name == INPAINT:
            rows = reports[name].get("inpainting") or [{}]
            title = f"inpainting, {rows[0].get('family', '?')} masks"  # the grid: the first family's first completions
        else:
            title = GENERATION[name]
        panels.append((title, path))
    return panels


def samples_figure(panels: Sequence[tuple[str, Path]], path: Path) -> Path:
    """The kept sample grids in one row of panels, each titled by its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    for ax, (title, png) in zip(axes.flat, panels, strict=True):
        with Image.open(png) as image:
            ax.imshow(image.convert("RGB"), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=150, format="png")  # a panel about as wide as its grid (530 px)
    plt.close(fig)
    # 256 colours (octree), as scripts/morphology_panel.py: a fraction of the size, without visible loss.
    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path


def histogram_settings(folder: Path) -> tuple[tuple | None, dict[str, tuple], list[str]]:
    """(real cells, {setting: generated cells}, class names) from the kept ``NAME.npz`` files, in NAMES order;
    the inpainting report contributes its nucleus completions only."""
    from celldiff.evaluation.morphology import FEATURES
    from celldiff.evaluation.morphology_cells import load_cells, select

    real, settings, classes = None, {}, []
    for name in NAMES:
        path = folder / f"{name}.npz"
        if not path.is_file():
            continue
        cells = load_cells(path)
        if real is None:  # every report holds the same real test cells
            real, classes = ({f: cells[f"real_{f}"] for f in FEATURES}, cells["real_class"]), list(cells["classes"])
        if name == INPAINT:
            settings[MORPHOLOGY_INPAINT[1]] = select(cells, MORPHOLOGY_INPAINT[0])
        else:
            settings[GENERATION[name] + (" (judge's class)" if name == "uncond" else "")] = select(cells, None)
    return real, settings, classes


def write_figures(reports: Mapping[str, Mapping[str, Any]], folder: Path, figures: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("shipped_tables: matplotlib is not installed: no figures", file=sys.stderr)
        return []
    written = []
    settings = morphology_settings(reports)
    if settings:
        from celldiff.evaluation.report import morphology_figure

        written.append(morphology_figure(settings, figures / "morphology_w1.png"))
    real, per_cell, classes = histogram_settings(folder)
    if real is not None:
        from celldiff.evaluation.morphology_cells import histogram_figure

        written.append(histogram_figure(real, per_cell, classes, figures / "morphology_histograms.png"))
    panels = _sample_panels(reports, folder)
    if panels:
        written.append(samples_figure(panels, figures / "ship64_samples.png"))
    for path in written:
        print(f"shipped_tables: wrote {path}", file=sys.stderr)
    return written


def _link(path: Path) -> str:
    """``path`` as docs/results.md links it (relative to docs/ when it lies there)."""
    try:
        return Path(path).resolve().relative_to(Path("docs").resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def figures_markdown(figures: Sequence[Path]) -> str:
    captions = {
        "morphology_w1.png": "Normalised W1 per class and feature in every setting (floor in brackets).",
        "morphology_histograms.png": "Per class (rows) and feature (columns): the real test cells' distribution (grey) "
        "and each setting's (lines; unconditional cells under the class the judge gives them, nucleus inpainting under "
        "the completed cell's real class; cells whose segmentation failed are left out).",
        "ship64_samples.png": "Generated cells of the shipped model, the first 64 of each evaluation (class-conditional: "
        "the classes in turn, so each column is one class, basophil to platelet; inpainting: the first mask family's "
        "completions).",
    }
    lines = [f"![{Path(f).stem}]({_link(f)})\n\n{captions.get(Path(f).name, '')}\n" for f in figures]
    return "### Figures\n\n" + "\n".join(lines) if lines else ""


def render(reports: Mapping[str, Mapping[str, Any]], figures: Sequence[Path] = ()) -> str:
    parts = [generation_table(reports), class_mix_table(reports), agreement_table(reports), inpainting_table(reports),
             morphology_tables(reports), figures_markdown(figures)]  # fmt: skip
    return "\n".join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dir", type=Path, default=Path("docs/results/ship64"), help="the kept reports (NAME.json, NAME.png)"
    )
    parser.add_argument("--figures", default="docs/results", help='folder of the figures ("" for none)')
    args = parser.parse_args(argv)
    reports = load_reports(args.dir)
    if not reports:
        print(f"shipped_tables: no report in {args.dir}", file=sys.stderr)
        return 1
    figures = write_figures(reports, args.dir, Path(args.figures)) if args.figures else []
    print(render(reports, figures), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
