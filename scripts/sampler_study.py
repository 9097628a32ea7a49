"""The sampler study: one checkpoint, many samplers, the same cells and seeds; one JSON line per setting.

    python scripts/sampler_study.py --ckpt_path ~/celldiff-runs/recipe/C/checkpoints/last.ckpt \
        --config configs/results/phase1_64_fast.yaml --classifier_ckpt weights/judge64.safetensors \
        --out docs/results/samplers/generation_C.jsonl --name C \
        --settings dpmsolver:10,dpmsolver:15,dpmsolver:20,dpmsolver:25,dpmsolver:50,ddim:25,ddim:50,ddim:100,ddpm:1000@500 \
        [--num_samples 1000] [--seed 0] [--data_dir ../shared/data/pbc64] [--extra "--trainer.precision bf16-mixed"] \
        [--eval_dir DIR] [--dry_run]
    python scripts/sampler_study.py --table docs/results/samplers/generation_C.jsonl [--reference ddpm:1000@500]

A setting is ``SAMPLER:STEPS`` (``dpmsolver:20``), optionally RePaint's resampling ``:rTIMES:jJUMP``
(``ddpm:250:r10:j10``: 250 reverse steps, each stretch of 10 redone 10 times) and its own number of images
``@N`` (``ddpm:1000@500``; else ``--num_samples``). Each runs ``celldiff evaluate`` on the checkpoint with
``--model.sampler``, ``--model.sampling_steps``, ``--model.resample_times``/``--model.resample_jump``, the same
``--seed`` (image i's noise depends only on the seed and i, so every setting draws from the same noise) and,
for inpainting (``--extra "--data.eval_masks ..."``), the same test cells and masks; settings already in
``--out`` with the same checkpoint, config, judge, seed, images and extra flags are skipped, so a stopped study
goes on where it was. Two studies may append to one file at once (one line per write).

A line holds the setting, ``network_evaluations_per_image`` (reverse steps that call the network: the
steps, times RePaint's resamplings; twice that under classifier-free guidance other than 0 or 1), FD / KID
/ precision / recall / class mix as ``scripts/curve_points.py`` records them, ``sampling_seconds_per_image``
(evaluate's generation alone, on the threads it had: ``sampling_threads``), per mask family the masked-region
PSNR / SSIM / seam error (inpainting), the machine, the time and the commit.

``--table`` prints the Markdown table of one or more files, with each setting's FD minus the reference
setting's (default: the line with the most network evaluations) next to the real-vs-real FD floor at the
same n, and its speed-up in seconds per image over the reference.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curve_points  # noqa: E402 - the shared evaluate runner, JSONL writer and machine record

SETTING = re.compile(r"^(?P<sampler>[a-z]+):(?P<steps>\d+)(?::r(?P<times>\d+):j(?P<jump>\d+))?(?:@(?P<n>\d+))?$")
MATCH = ("name", "checkpoint", "config", "judge", "setting", "num_samples", "seed", "extra")


def parse_setting(text: str, default_n: int) -> dict:
    """``ddpm:250:r10:j10@500`` -> sampler, steps, resample_times, resample_jump, num_samples, setting (the text)."""
    match = SETTING.match(text.strip())
    if not match:
        raise SystemExit(
            f"sampler_study: error: setting {text!r}: expected SAMPLER:STEPS[:rTIMES:jJUMP][@N], e.g. dpmsolver:20, "
            "ddpm:250:r10:j10, ddpm:1000@500"
        )
    from celldiff.diffusion.samplers import SAMPLERS

    if match["sampler"] not in SAMPLERS:
        raise SystemExit(f"sampler_study: error: setting {text!r}: sampler must be one of {tuple(SAMPLERS)}")
    steps, times, jump = int(match["steps"]), int(match["times"] or 1), int(match["jump"] or 1)
    if steps < 1 or times < 1 or jump < 1 or (match["n"] is not None and int(match["n"]) < 1):
        raise SystemExit(f"sampler_study: error: setting {text!r}: steps, rTIMES, jJUMP and @N must be at least 1")
    n = int(match["n"]) if match["n"] is not None else default_n
    label = f"{match['sampler']}:{steps}" + (f":r{times}:j{jump}" if times > 1 else "") + f"@{n}"
    return {"setting": label, "sampler": match["sampler"], "steps": steps, "resample_times": times,
            "resample_jump": jump, "num_samples": n}  # fmt: skip


def network_evaluations(steps: int, times: int, jump: int) -> int:
    """Reverse steps that call the network along RePaint's walk (``steps`` without resampling)."""
    from celldiff.diffusion.trajectory import resampling_walk

    walk = resampling_walk(steps, jump, times)
    return sum(1 for a, b in itertools.pairwise(walk) if b < a)


def guided(extra: list[str]) -> bool:
    """Whether ``--model.guidance_scale`` in the extra flags runs two network passes per step."""
    for i, flag in enumerate(extra):
        value = flag.split("=", 1)[1] if flag.startswith("--model.guidance_scale=") else None
        if flag == "--model.guidance_scale" and i + 1 < len(extra):
            value = extra[i + 1]
        if value is not None:
            try:
                return float(value) not in (0.0, 1.0)
            except ValueError:
                return False
    return False


def key(line: dict) -> tuple:
    return tuple(line.get(k) for k in MATCH)


def inpainting_rows(metrics: dict) -> list[dict]:
    keep = ("family", "n", "mse", "psnr", "ssim", "seam", "frechet_distance")
    return [{k: row.get(k) for k in keep} for row in metrics.get("inpainting") or []]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", nargs="+", type=Path, help="print the Markdown table of these files and stop")
    parser.add_argument("--reference", help="the --table row others are compared with (default: most evaluations)")
    parser.add_argument("--ckpt_path", type=Path, help="the checkpoint or weights file studied")
    parser.add_argument("--config", help="the config evaluate is given")
    parser.add_argument("--classifier_ckpt", help="the judge")
    parser.add_argument("--out", type=Path, help="the JSONL file the lines are appended to")
    parser.add_argument("--name", help="the study's name in the file (default: the checkpoint's file name)")
    parser.add_argument("--settings", help="comma list of SAMPLER:STEPS[:rTIMES:jJUMP][@N]")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="../shared/data/pbc64")
    parser.add_argument("--extra", default="", help='more evaluate flags, one string: "--data.eval_masks nucleus"')
    parser.add_argument("--eval_dir", type=Path, help="keep each evaluation's output under this folder")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, measure nothing")
    args = parser.parse_args(argv)
    if args.table:
        return args
    for flag in ("ckpt_path", "config", "classifier_ckpt", "out", "settings"):
        if getattr(args, flag) is None:
            parser.error(f"--{flag} is required (or --table FILE)")
    if not args.ckpt_path.is_file():
        parser.error(f"--ckpt_path {args.ckpt_path}: no such file")
    if args.num_samples < 1:
        parser.error(f"--num_samples {args.num_samples}: expected at least 1")
    return args


def study(args: argparse.Namespace) -> int:
    settings = [parse_setting(s, args.num_samples) for s in args.settings.split(",") if s.strip()]
    extra = shlex.split(args.extra)
    base = {"name": args.name or args.ckpt_path.name, "checkpoint": str(args.ckpt_path), "config": args.config,
            "judge": args.classifier_ckpt, "seed": args.seed, "extra": shlex.join(extra)}  # fmt: skip
    done = {key(p) for p in curve_points.read_points(args.out)}
    host, failed = curve_points.machine(), 0
    for setting in settings:
        line = {**base, **setting}
        if key(line) in done:
            print(f"sampler_study: {setting['setting']}: already in {args.out}", file=sys.stderr)
            continue
        tag = hashlib.sha256(json.dumps(key(line)).encode()).hexdigest()[:8]
        scratch = None
        if args.eval_dir is not None:
            out_dir = args.eval_dir / base["name"] / f"{setting['setting'].replace(':', '_').replace('@', '_n')}-{tag}"
        else:
            scratch = tempfile.TemporaryDirectory(prefix="sampler-study-")
            out_dir = Path(scratch.name) / "eval"
        command = [*curve_points.celldiff_command(), "evaluate", "--config", args.config, "--ckpt_path",
                   str(args.ckpt_path), "--classifier_ckpt", args.classifier_ckpt, "--output_dir", str(out_dir),
                   "--num_samples", str(setting["num_samples"]), "--seed", str(args.seed),
                   "--model.sampler", setting["sampler"], "--model.sampling_steps", str(setting["steps"]),
                   "--model.resample_times", str(setting["resample_times"]),
                   "--model.resample_jump", str(setting["resample_jump"]), "--data.data_dir", args.data_dir, *extra]  # fmt: skip
        if args.dry_run:
            print(shlex.join(command))
            if scratch is not None:
                scratch.cleanup()
            continue
        print(f"sampler_study: {setting['setting']}: {shlex.join(command)}", file=sys.stderr)
        begin, metrics, why = time.perf_counter(), None, ""
        try:
            code, last = curve_points.run_command(command)
            why = last or f"exit code {code}"
            if code == 0 and (out_dir / "metrics.json").is_file():
                metrics = json.loads((out_dir / "metrics.json").read_text())
        except (OSError, ValueError) as error:
            why = f"{type(error).__name__}: {error}"
        finally:
            if scratch is not None:
                scratch.cleanup()
        if metrics is None:
            failed += 1
            print(f"sampler_study: {setting['setting']} FAILED: {why}", file=sys.stderr)
            continue
        nfe = network_evaluations(setting["steps"], setting["resample_times"], setting["resample_jump"])
        line.update({
            "network_evaluations_per_image": nfe * (2 if guided(extra) else 1),
            **curve_points.summary(metrics),
            "sampling_seconds": metrics.get("sampling_seconds"),
            "sampling_seconds_per_image": metrics.get("sampling_seconds_per_image"),
            "sampling_threads": metrics.get("sampling_threads"),
            "inpainting": inpainting_rows(metrics),
            "eval_wall_s": round(time.perf_counter() - begin, 1), "machine": host,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": curve_points.git_commit(),
        })  # fmt: skip
        curve_points.append_line(args.out, line)
        print(f"sampler_study: {setting['setting']}: FD {line['frechet_distance']} (floor "
              f"{line['frechet_distance_floor']}), {line['sampling_seconds_per_image']} s/image", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table(paths: list[Path], reference: str | None) -> str:
    """The Markdown table of the study files: one row per (name, setting), the reference's differences."""
    lines = [p for path in paths for p in curve_points.read_points(path)]
    if not lines:
        raise SystemExit(f"sampler_study: error: no lines in {', '.join(map(str, paths))}")
    out = []
    for name in dict.fromkeys(p["name"] for p in lines):
        rows = [p for p in lines if p["name"] == name]
        ref = next((p for p in rows if p["setting"] == reference), None) if reference else None
        if reference and ref is None:
            raise SystemExit(f"sampler_study: error: --reference {reference}: no such setting for {name}")
        ref = ref or max(rows, key=lambda p: p["network_evaluations_per_image"])
        families = list(dict.fromkeys(r["family"] for p in rows for r in p.get("inpainting") or []))
        head = ["setting", "network evaluations", "n", "FD", "floor", f"FD - {ref['setting']}", "KID", "P", "R",
                "s / image", "speed-up"] + [f"{f} PSNR / SSIM / seam" for f in families]  # fmt: skip
        out += [f"**{name}** (reference: {ref['setting']})", "", "| " + " | ".join(head) + " |",
                "|" + " --- |" * len(head)]  # fmt: skip
        for p in sorted(rows, key=lambda p: (p["sampler"], p["network_evaluations_per_image"])):
            speed = p.get("sampling_seconds_per_image")
            base = ref.get("sampling_seconds_per_image")
            cells = [p["setting"], str(p["network_evaluations_per_image"]), str(p["num_samples"]),
                     _num(p.get("frechet_distance")), _num(p.get("frechet_distance_floor")),
                     _num(p["frechet_distance"] - ref["frechet_distance"]) if p is not ref else "-",
                     _num(p.get("kernel_distance")), _num(p.get("precision"), 2), _num(p.get("recall"), 2),
                     _num(speed), f"{base / speed:.1f}x" if speed and base else "-"]  # fmt: skip
            by_family = {r["family"]: r for r in p.get("inpainting") or []}
            for family in families:
                r = by_family.get(family)
                cells.append(f"{_num(r['psnr'])} / {_num(r['ssim'], 2)} / {_num(r['seam'], 2)}" if r else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(args.table, args.reference))
        return 0
    return study(args)


if __name__ == "__main__":
    sys.exit(main())
