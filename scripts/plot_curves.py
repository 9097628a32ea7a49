"""Quality curves of training runs, from the JSONL files of scripts/curve_points.py: a figure and a table.

    python scripts/plot_curves.py docs/results/curves/*.jsonl --out docs/results/recipe_curves.png \
        [--x images_seen|wall_s] [--headline A_NAME C_NAME] > /tmp/curves.md

One figure: Fréchet distance (the real-vs-real floor dashed), kernel distance (floor dashed), precision
(solid) and recall (dotted), class-mix total variation (floor dashed; unconditional models only), against
the training images seen (top row) and the run's wall time in hours (bottom row); ``--x`` draws one of the
two rows only. One line per run; a run measured under several evaluation settings (sampler, steps,
n, seed, judge, extra flags) gets one line per setting, labelled with it, since FD depends on n.

It prints a Markdown table of every point (run, step, images seen, wall h, FD, floor, KID, P, R, TV) and,
with ``--headline A C``: the wall time run C needs to reach run A's final FD (linear interpolation between
C's checkpoints, ``time_to_reach``) as a ratio of A's wall time to its final checkpoint. Wall times compare
only between runs on the same machine and thread count: the headline warns when the files say otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SETTINGS = ("num_samples", "sampler", "steps", "seed", "judge", "extra")
COLUMNS = ["run", "step", "images seen", "wall h", "FD", "floor", "KID", "P", "R", "TV"]


def read_points(paths: list[Path]) -> list[dict]:
    """Every line of the given curve files (lines that are not JSON are skipped with a warning)."""
    points = []
    for path in paths:
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if text.strip():
                try:
                    points.append(json.loads(text))
                except json.JSONDecodeError:
                    print(f"plot_curves: {path}:{number} is not JSON; ignored", file=sys.stderr)
    return points


def setting_key(point: dict) -> tuple:
    settings = point.get("settings") or {}
    return (point.get("config"), *(settings.get(k) for k in SETTINGS))


def group_runs(points: list[dict]) -> dict[str, list[dict]]:
    """Label -> that run's points by step (one per step: the last line wins). The label is the run name, with
    the evaluation settings added when the same run was measured under more than one."""
    by_run: dict[str, dict[tuple, dict[int, dict]]] = {}
    for point in points:
        by_run.setdefault(point["run"], {}).setdefault(setting_key(point), {})[int(point["step"])] = point
    groups = {}
    for run, variants in by_run.items():
        for key, steps in variants.items():
            label = run
            if len(variants) > 1:
                _, n, sampler, k, seed, _, extra = key
                label = f"{run} ({sampler} {k}, n={n}, seed {seed}{', ' + extra if extra else ''})"
            groups[label] = [steps[s] for s in sorted(steps)]
    return groups


def time_to_reach(points_a: list[dict], target_fd: float) -> float | None:
    """The first wall time (s) at which the run's FD reaches ``target_fd`` (FD <= target), interpolated
    linearly between the two checkpoints around the crossing; the first checkpoint's time if it is already
    there; None if the run never gets there."""
    curve = sorted(
        (p["wall_s"], p["frechet_distance"])
        for p in points_a
        if p.get("wall_s") is not None and p.get("frechet_distance") is not None
    )
    previous = None
    for wall, fd in curve:
        if fd <= target_fd:
            if previous is None:
                return float(wall)
            wall0, fd0 = previous  # fd0 > target_fd >= fd
            return wall0 + (fd0 - target_fd) / (fd0 - fd) * (wall - wall0)
        previous = (wall, fd)
    return None


def find_group(groups: dict[str, list[dict]], name: str) -> tuple[str, list[dict]]:
    if name in groups:
        return name, groups[name]
    matches = [label for label, points in groups.items() if points[0]["run"] == name]
    if len(matches) != 1:
        what = "no run" if not matches else "more than one curve"
        raise SystemExit(f"plot_curves: error: --headline {name}: {what} of that name; the curves: {', '.join(groups)}")
    return matches[0], groups[matches[0]]


def headline(groups: dict[str, list[dict]], name_a: str, name_c: str) -> str:
    """'C reaches A's final FD after X h: R x A's wall time', with warnings when the two are not comparable."""
    label_a, points_a = find_group(groups, name_a)
    label_c, points_c = find_group(groups, name_c)
    final = points_a[-1]
    target, wall_a = final["frechet_distance"], final["wall_s"]
    lines = []
    if setting_key(final) != setting_key(points_c[-1]):
        lines.append(f"warning: {label_a} and {label_c} were evaluated under different settings: FDs do not compare")
    machines = {json.dumps(p.get("machine"), sort_keys=True) for p in points_a + points_c}
    if len(machines) > 1:
        lines.append("warning: the points come from more than one machine or thread count: wall times may not compare")
    reached = time_to_reach(points_c, target)
    where = f"{label_a}'s final FD {target:.4g} (step {final['step']}, {wall_a / 3600:.2f} h)"
    if reached is None:
        best = min(points_c, key=lambda p: p["frechet_distance"])
        lines.append(f"{label_c} does not reach {where}: its best FD is {best['frechet_distance']:.4g} at step "
                     f"{best['step']} ({best['wall_s'] / 3600:.2f} h)")  # fmt: skip
    else:
        ratio = f"{reached / wall_a:.2f} x" if wall_a else "n/a"
        lines.append(f"{label_c} reaches {where} after {reached / 3600:.2f} h: {ratio} {label_a}'s wall time")
    return "\n".join(lines)


def fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(groups: dict[str, list[dict]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for label, points in groups.items():
        for p in points:
            wall = p.get("wall_s")
            row = [label, p["step"], f"{p.get('images_seen', 0):,}", None if wall is None else f"{wall / 3600:.2f}",
                   p.get("frechet_distance"), p.get("frechet_distance_floor"), p.get("kernel_distance"),
                   p.get("precision"), p.get("recall"), p.get("class_mix_total_variation")]  # fmt: skip
            lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


PANELS = [  # title, [(key, style, legend suffix)]
    ("Fréchet distance (floor dashed)", [("frechet_distance", "-", ""), ("frechet_distance_floor", "--", None)]),
    ("kernel distance (floor dashed)", [("kernel_distance", "-", ""), ("kernel_distance_floor", "--", None)]),
    ("precision (solid), recall (dotted)", [("precision", "-", ""), ("recall", ":", None)]),
    ("class-mix total variation (floor dashed)",
     [("class_mix_total_variation", "-", ""), ("class_mix_total_variation_floor", "--", None)]),
]  # fmt: skip
X_AXES = {"images_seen": ("training images seen", 1.0), "wall_s": ("run wall time (h)", 1 / 3600)}


def plot(plt, groups: dict[str, list[dict]], out: Path, rows: list[str]) -> None:
    fig, axes = plt.subplots(len(rows), len(PANELS), figsize=(4.2 * len(PANELS), 3.4 * len(rows)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, x_key in enumerate(rows):
        x_label, scale = X_AXES[x_key]
        for c, (title, series) in enumerate(PANELS):
            ax = axes[r][c]
            for i, (label, points) in enumerate(groups.items()):
                for key, style, suffix in series:
                    xy = [
                        (p[x_key] * scale, p[key])
                        for p in points
                        if p.get(x_key) is not None and p.get(key) is not None
                    ]
                    if xy:
                        xs, ys = zip(*xy, strict=True)
                        ax.plot(xs, ys, style, marker="o" if style == "-" else None, markersize=3,
                                color=colours[i % len(colours)], label=None if suffix is None else label + suffix)  # fmt: skip
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
            values = [y for line in ax.get_lines() for y in line.get_ydata()]
            if c == 0 and values and min(values) > 0:  # FD from far above the floor down to near it
                ax.set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if len(rows) > 1 else 0.88))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="curve files (JSONL) of scripts/curve_points.py")
    parser.add_argument("--out", type=Path, default=Path("docs/results/recipe_curves.png"))
    parser.add_argument("--x", choices=list(X_AXES), help="draw only this row (default: both)")
    parser.add_argument("--headline", nargs=2, metavar=("A_NAME", "C_NAME"),
                        help="print the wall time C needs to reach A's final FD, as a ratio of A's")  # fmt: skip
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    groups = group_runs(read_points(args.files))
    if not groups:
        parser.error(f"no points in {', '.join(map(str, args.files))}")
    print(markdown_table(groups))
    if args.headline:
        print(headline(groups, *args.headline) + "\n")
    try:
        import matplotlib
    except ImportError:
        print("plot_curves: error: matplotlib is not installed (pip install -e '.[dev]'); no figure", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot(plt, groups, args.out, [args.x] if args.x else list(X_AXES))
    print(f"plot_curves: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
