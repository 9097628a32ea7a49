"""Measure every checkpoint of a training run and append one JSON line per checkpoint to a committed file.

    python scripts/curve_points.py --run_dir ~/celldiff-runs/ship_64 --config configs/phase3_inpaint.yaml \
        --classifier_ckpt weights/judge64.safetensors --out docs/results/curves/ship_64.jsonl \
        [--num_samples 1000] [--sampler dpmsolver --steps 20] [--seed 0] [--data_dir ../shared/data/pbc64] \
        [--extra "--data.eval_masks full --model.guidance_scale 0"] [--every 1] [--only 469,938] \
        [--eval_dir runs/curves/eval] [--name ship_64] [--images_offset N --wall_offset S --step_offset K] [--last]
        [--dry_run]

A run directory (``RUN/config.yaml``, ``RUN/checkpoints/epochNNNN-stepNNNNNNN.ckpt``) can be lost when its
machine is recycled; the JSONL file, committed, is what survives. Run this while the run trains (again and
again: it measures only the checkpoints it has not measured yet) and commit the file after each call.

For every numbered checkpoint (``last.ckpt`` and ``hpc_ckpt_*`` are not numbered), by step, whose
(run name, step, config, evaluation settings) is not in ``--out`` yet, it runs ``celldiff evaluate``
in a subprocess, reads its ``metrics.json`` and appends ONE line, flushed and fsynced before the next
checkpoint starts (a killed script loses at most the checkpoint it was measuring). The line holds:

- ``run`` (``--name``, default the run directory's name), ``config``, ``checkpoint`` (file name), ``step``
  (``--step_offset`` + the checkpoint's step: a later leg's steps go on from the earlier legs', so the
  legs of one model are one curve under one name; ``--every`` and ``--only`` count this leg's own steps);
- ``images_seen``: ``--images_offset`` (a leg started on a fresh machine from the previous leg's weights
  file) + step x the run's ``data.batch_size`` x ``trainer.accumulate_grad_batches`` (from
  ``RUN/config.yaml``), counted for ONE process: a DDP run's images are this times its world size
  (``images_seen_basis`` says so);
- ``wall_s``: the checkpoint file's mtime minus ``RUN/config.yaml``'s mtime, i.e. the run's wall time up to
  that checkpoint (+ ``--wall_offset``, the earlier legs' seconds), validation and sample grids included (a resumed run also counts the time it was stopped;
  a copied checkpoint whose mtime was not kept gives nonsense); ``wall_s_basis`` says so;
- ``settings``: num_samples, sampler, steps, seed, judge (``--classifier_ckpt`` as given), extra (the
  ``--extra`` flags, normalised), data_dir (recorded, not matched: a location of the same data);
- the metrics: frechet_distance (+ ``_floor``), kernel_distance (+ ``_floor``), precision, recall,
  class_mix_total_variation (+ ``_floor``, unconditional models), classifier_accuracy (class-conditional
  models), num_samples and sampler/steps as evaluate ran them, ``eval_wall_s`` (the evaluate subprocess);
- ``machine``: CPU model, whether its flags hold avx512_bf16 / amx_bf16, OMP_NUM_THREADS, CPU count;
  ``measured_at`` (UTC) and the repository's ``git_commit``.

``--last`` also measures ``RUN/checkpoints/last.ckpt``, at the step it holds (its ``global_step``, read without
unpickling anything), unless a numbered checkpoint has that step: a run's final step is rarely a multiple of
its checkpoint interval, so without it a finished run's curve stops short of its end. Use it once the run has
finished (while it trains, last.ckpt is just the latest checkpoint, already measured as a numbered one).
``--every K`` measures the K-th, 2K-th, ... numbered checkpoint (a stable choice while the run adds
more); ``--only`` takes a comma list of steps. ``--eval_dir DIR`` keeps each evaluation's output in
``DIR/<run>/step<NNNNNNN>-<settings hash>`` (else a temporary folder, deleted). A failed evaluation prints
its last stderr line and the script goes on with the next checkpoint; the exit code is then 1.
``--dry_run`` prints the commands and measures nothing. ``scripts/plot_curves.py`` draws the files.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CHECKPOINT = re.compile(r"^epoch(\d+)-step(\d+)(?:-v\d+)?\.ckpt$")
MATCH_SETTINGS = ("num_samples", "sampler", "steps", "seed", "judge", "extra")  # data_dir is recorded only
WALL_BASIS = "checkpoint file mtime - RUN/config.yaml mtime: the run's wall time up to this checkpoint"


def numbered_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``epochNNNN-stepNNNNNNN.ckpt`` in RUN/checkpoints, by step (newest file per step)."""
    found: dict[int, Path] = {}
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        match = CHECKPOINT.match(path.name)
        if match:
            step = int(match.group(2))
            if step not in found or path.stat().st_mtime > found[step].stat().st_mtime:
                found[step] = path
    return sorted(found.items())


def last_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(step, path) of ``RUN/checkpoints/last.ckpt`` (its ``global_step``), or None when there is none."""
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    import torch

    try:
        step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one line
        raise SystemExit(
            f"curve_points: error: {path}: cannot read its global_step ({type(error).__name__}); "
            "expected a Lightning checkpoint written by celldiff fit"
        ) from None
    return step, path


def run_config(run_dir: Path) -> dict:
    """The run's resolved config (RUN/config.yaml) as a dict."""
    return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}


def images_per_step(config: dict) -> tuple[int, str]:
    """Training images one process sees per optimizer step, and a sentence saying how it was counted."""
    data = config.get("data") or {}
    data = data.get("init_args", data)  # a data section given as class_path / init_args
    trainer = config.get("trainer") or {}
    if "batch_size" not in data:
        raise SystemExit("curve_points: error: the run's config.yaml has no data.batch_size")
    batch = int(data["batch_size"])
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    basis = f"step x data.batch_size ({batch}) x trainer.accumulate_grad_batches ({accumulate}), one process"
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if devices not in (1, "1", None) or nodes not in (1, "1", None):
        basis += f" (the config says devices={devices}, num_nodes={nodes}: multiply by the world size)"
    return batch * accumulate, basis


def machine() -> dict:
    """The CPU (model, bf16 flags), OMP_NUM_THREADS and the CPU count of this machine."""
    from celldiff.cli.cpu import read_cpuinfo

    model, flags = read_cpuinfo()
    flags = flags or set()
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count()}  # fmt: skip


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def celldiff_command() -> list[str]:
    """``.venv/bin/celldiff`` next to this Python, else ``python -m celldiff.cli``."""
    script = Path(sys.executable).parent / "celldiff"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "celldiff.cli"]


def match_key(line: dict) -> tuple:
    settings = line.get("settings") or {}
    return (line.get("run"), line.get("step"), line.get("config"), *(settings.get(k) for k in MATCH_SETTINGS))


def read_points(path: Path) -> list[dict]:
    """The lines of a curve file (a torn last line, from a killed write, is skipped with a warning)."""
    if not path.is_file():
        return []
    points = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if text.strip():
            try:
                points.append(json.loads(text))
            except json.JSONDecodeError:
                print(f"curve_points: {path}:{number} is not JSON; ignored", file=sys.stderr)
    return points


def append_line(path: Path, line: dict) -> None:
    """Append one JSON line, flushed and fsynced, so it survives the script being killed right after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a torn last line (no newline) must not swallow this one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(line, sort_keys=False) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def run_command(command: list[str]) -> tuple[int, str]:
    """Run ``command``, passing its output through; return its exit code and its last non-empty stderr line."""
    tail: collections.deque[str] = collections.deque(maxlen=1)
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace") as process:
        assert process.stderr is not None
        for text in process.stderr:
            sys.stderr.write(text)
            parts = [p for p in re.split(r"[\r\n]", text) if p.strip()]
            if parts:
                tail.append(parts[-1].strip())
    return process.returncode, tail[0] if tail else ""


def summary(metrics: dict) -> dict:
    """The curve's numbers from an evaluate ``metrics.json``."""
    mix, judge = metrics.get("class_mix") or {}, metrics.get("classifier") or {}
    out = {key: metrics.get(key) for key in ("frechet_distance", "frechet_distance_floor", "kernel_distance",
                                             "kernel_distance_floor", "precision", "recall")}  # fmt: skip
    out["class_mix_total_variation"] = mix.get("total_variation")
    out["class_mix_total_variation_floor"] = mix.get("total_variation_floor")
    out["classifier_accuracy"] = judge.get("accuracy")
    out["evaluated"] = {key: metrics.get(key) for key in ("num_samples", "sampler", "steps", "network_precision")}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, required=True, help="the training run (config.yaml, checkpoints/)")
    parser.add_argument("--config", required=True, help="the config evaluate is given")
    parser.add_argument("--classifier_ckpt", required=True, help="the judge (a classifier checkpoint or weights file)")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file the lines are appended to")
    parser.add_argument("--name", help="the run's name in the file (default: the run directory's name)")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--sampler", default="dpmsolver")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="../shared/data/pbc64")
    parser.add_argument("--extra", default="", help='more evaluate flags, one string: "--data.eval_masks full"')
    parser.add_argument("--every", type=int, default=1, help="measure every K-th numbered checkpoint")
    parser.add_argument("--only", help="comma list of steps to measure (and no others)")
    parser.add_argument("--eval_dir", type=Path, help="keep each evaluation's output under this folder")
    parser.add_argument("--images_offset", type=int, default=0,
                        help="images seen before this run: a leg started from --model.init_weights (its file's images_seen_total)")
    parser.add_argument("--wall_offset", type=float, default=0.0,
                        help="seconds of training before this run (the earlier legs' wall time)")
    parser.add_argument("--step_offset", type=int, default=0,
                        help="optimizer steps before this run (the earlier legs'); the recorded step is this + the checkpoint's")
    parser.add_argument("--last", action="store_true",
                        help="also measure checkpoints/last.ckpt at its global_step (a finished run's final step)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, measure nothing")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every {args.every}: expected at least 1")
    for flag, value in (("--images_offset", args.images_offset), ("--wall_offset", args.wall_offset), ("--step_offset", args.step_offset)):
        if value < 0:
            parser.error(f"{flag} {value:g}: expected 0 or more")
    try:
        args.only = None if args.only is None else {int(s) for s in args.only.split(",") if s.strip()}
    except ValueError:
        parser.error(f"--only {args.only}: expected a comma list of steps, e.g. 469,938")
    for flag, path in (("--run_dir", args.run_dir / "config.yaml"), ("--run_dir", args.run_dir / "checkpoints")):
        if not path.exists():
            parser.error(f"{flag} {args.run_dir}: no {path.name} in it (expected a celldiff run directory)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.name or args.run_dir.resolve().name
    config = run_config(args.run_dir)
    per_step, basis = images_per_step(config)
    start_mtime = (args.run_dir / "config.yaml").stat().st_mtime
    extra = shlex.split(args.extra)
    settings = {"num_samples": args.num_samples, "sampler": args.sampler, "steps": args.steps, "seed": args.seed,
                "judge": args.classifier_ckpt, "extra": shlex.join(extra), "data_dir": args.data_dir}  # fmt: skip
    tag = hashlib.sha256(json.dumps([settings[k] for k in MATCH_SETTINGS] + [args.config]).encode()).hexdigest()[:8]
    done = {match_key(p) for p in read_points(args.out)}
    checkpoints = numbered_checkpoints(args.run_dir)
    numbered_steps = {step for step, _ in checkpoints}
    checkpoints = [c for i, c in enumerate(checkpoints, 1) if i % args.every == 0]
    last = last_checkpoint(args.run_dir) if args.last else None
    if args.last and last is None:
        print(f"curve_points: --last: no last.ckpt in {args.run_dir / 'checkpoints'}", file=sys.stderr)
    if last is not None and last[0] not in numbered_steps:
        checkpoints.append(last)
    failed = 0
    if args.only is not None:
        missing = sorted(args.only - {step for step, _ in checkpoints})
        for step in missing:
            print(
                f"curve_points: no numbered checkpoint at step {step} in {args.run_dir / 'checkpoints'}",
                file=sys.stderr,
            )
        failed += len(missing)
        checkpoints = [c for c in checkpoints if c[0] in args.only]
    todo = []
    for step, path in checkpoints:
        line = {"run": name, "step": args.step_offset + step, "config": args.config, "settings": settings}
        if match_key(line) not in done:
            todo.append((step, path))
    print(f"curve_points: {name}: {len(checkpoints)} checkpoint(s) chosen, {len(checkpoints) - len(todo)} already in "
          f"{args.out}, {len(todo)} to measure", file=sys.stderr)  # fmt: skip
    host = machine()
    for step, path in todo:
        scratch = None
        if args.eval_dir is not None:
            out_dir = args.eval_dir / name / f"step{step:07d}-{tag}"
        elif args.dry_run:
            out_dir = Path(tempfile.gettempdir()) / "<a new temporary folder>"
        else:
            scratch = tempfile.TemporaryDirectory(prefix=f"curve-{name}-step{step}-")
            out_dir = Path(scratch.name) / "eval"
        command = [*celldiff_command(), "evaluate", "--config", args.config, "--ckpt_path", str(path),
                   "--classifier_ckpt", args.classifier_ckpt, "--output_dir", str(out_dir),
                   "--num_samples", str(args.num_samples), "--seed", str(args.seed), "--model.sampler", args.sampler,
                   "--model.sampling_steps", str(args.steps), "--data.data_dir", args.data_dir, *extra]  # fmt: skip
        if args.dry_run:
            print(shlex.join(command))
            continue
        print(f"curve_points: {name} step {step}: {shlex.join(command)}", file=sys.stderr)
        metrics_file, metrics, why = out_dir / "metrics.json", None, ""
        wall = round(path.stat().st_mtime - start_mtime, 1)  # now: the run may delete the file meanwhile
        begin = time.perf_counter()
        try:
            code, last = run_command(command)
            why = last or f"exit code {code}"
            if code == 0 and metrics_file.is_file():
                metrics = json.loads(metrics_file.read_text())
            elif code == 0:
                why = f"evaluate wrote no {metrics_file}"
        except (OSError, ValueError) as error:  # no celldiff to run, an unreadable metrics.json
            why = f"{type(error).__name__}: {error}"
        finally:
            if scratch is not None:
                scratch.cleanup()
        eval_wall = time.perf_counter() - begin
        if metrics is None:
            failed += 1
            print(f"curve_points: {name} step {step} FAILED: {why}", file=sys.stderr)
            continue
        line = {
            "run": name, "config": args.config, "checkpoint": path.name, "step": args.step_offset + step,
            "images_seen": args.images_offset + step * per_step,
            "images_seen_basis": basis + (f" + {args.images_offset} before this run (--images_offset)" if args.images_offset else ""),
            "wall_s": round(args.wall_offset + wall, 1),
            "wall_s_basis": WALL_BASIS + (f" + {args.wall_offset:g} s before this run (--wall_offset)" if args.wall_offset else ""),
            "settings": settings, **summary(metrics), "eval_wall_s": round(eval_wall, 1), "machine": host,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
        }  # fmt: skip
        append_line(args.out, line)
        print(f"curve_points: {name} step {step}: FD {line['frechet_distance']} (floor {line['frechet_distance_floor']}), "
              f"appended to {args.out}", file=sys.stderr)  # fmt: skip
    if failed:
        print(f"curve_points: {failed} checkpoint(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
