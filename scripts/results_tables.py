"""Collect the evaluation outputs of the results runs into the Markdown tables of docs/results.md.

    python scripts/results_tables.py [runs/results/eval] > /tmp/tables.md

Reads every ``<eval dir>/<name>/metrics.json`` written by ``celldiff evaluate`` (names as in
docs/results.md) and prints: fidelity per run, masked-region metrics per mask family and method,
the sampler comparison, and per-class classifier agreement for class-conditional runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.1 or value == 0 else f"{value:.2g}"
    return "" if value is None else str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def seconds(log: Path) -> str:
    """Sampling wall time from the last progress line of an evaluate log (images/s → s per image)."""
    if not log.is_file():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "images/s, ETA" in line]
    if not lines:
        return ""
    rate = float(lines[-1].split(",")[1].split()[0])
    return f"{1 / rate:.2f}" if rate > 0 else ""


def main(root: Path) -> None:
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/metrics.json"))}
    fidelity = []
    for name, m in runs.items():
        memo = m.get("memorisation", {}).get("feature", {})
        fidelity.append({
            "run": name, "sampler": f"{m.get('sampler')} {m.get('steps') or ''}".strip(), "n": m["num_samples"],
            "FD": m["frechet_distance"], "floor": m["frechet_distance_floor"], "precision": m["precision"],
            "recall": m["recall"], "KID": m.get("kernel_distance"), "KID floor": m.get("kernel_distance_floor"),
            "below test p01": memo.get("fraction_below_test_p01"),
            "s/image": seconds(root / f"{name}.log"),
            "judge acc (real)": m.get("classifier_accuracy_real_test"),
        })  # fmt: skip
    print("### Fidelity (classifier features)\n")
    print(table(fidelity, ["run", "sampler", "n", "FD", "floor", "precision", "recall", "KID", "KID floor", "below test p01", "s/image",
                           "judge acc (real)"]))  # fmt: skip
    for name, m in runs.items():
        if m.get("classifier") or m.get("inpainting") or not m.get("per_class"):
            continue  # class mix and per-class FD of unconditional samples, as the classifier reads them
        n_fake, n_real = m["num_samples"], m["num_real"]
        rows = [{"class": r["class"], "generated %": 100 * r["n_generated"] / n_fake, "real %": 100 * r["n_real"] / n_real,
                 "FD": r.get("frechet_distance"), "floor": r.get("floor")} for r in m["per_class"]]  # fmt: skip
        print(f"### Classes drawn: {name} (as the classifier reads them, n = {n_fake})\n")
        print(table(rows, ["class", "generated %", "real %", "FD", "floor"]))
    rows = []
    for name, m in runs.items():
        for r in m.get("inpainting") or []:
            rows.append({"family": r["family"], "method": name, **{k: r.get(k) for k in ("n", "mse", "psnr", "ssim", "seam", "lpips")}})
    if rows:
        rows.sort(key=lambda r: (r["family"], -r["psnr"]))
        print("### Masked-region metrics (sorted by PSNR within each mask family)\n")
        print(table(rows, ["family", "method", "n", "mse", "psnr", "ssim", "seam"]))
    for name, m in runs.items():
        report = m.get("classifier")
        if not report:
            continue
        print(f"### Classifier agreement: {name} (accuracy {report['accuracy']:.3f}, n = {report['num_samples']})\n")
        per_class = {r["class"]: r for r in m.get("per_class", [])}
        rows = [
            {"class": c, "accuracy": acc, "n": report["per_class_count"].get(c),
             "FD": per_class.get(c, {}).get("frechet_distance"), "floor": per_class.get(c, {}).get("floor")}
            for c, acc in report["per_class_accuracy"].items()
        ]  # fmt: skip
        print(table(rows, ["class", "accuracy", "n", "FD", "floor"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/results/eval"))
