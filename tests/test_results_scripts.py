"""scripts/curve_points.py and scripts/plot_curves.py, with a fake ``celldiff evaluate`` (no real evaluation)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
T0 = 1_800_000_000.0  # the run's config.yaml mtime


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


curve_points = _load("curve_points")
plot_curves = _load("plot_curves")


def _fake_run(root: Path, walls: dict[int, float], batch_size: int = 32) -> Path:
    """A run directory: config.yaml at T0, one numbered checkpoint per step at T0 + wall, and a last.ckpt."""
    run = root / "ship_64"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"trainer:\n  devices: 1\n  accumulate_grad_batches: 1\ndata:\n  batch_size: {batch_size}\n"
    )
    os.utime(run / "config.yaml", (T0, T0))
    for epoch, (step, wall) in enumerate(sorted(walls.items()), 1):
        path = run / "checkpoints" / f"epoch{epoch:04d}-step{step:07d}.ckpt"
        path.write_bytes(b"not a real checkpoint")
        os.utime(path, (T0 + wall, T0 + wall))
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run


class FakeEvaluate:
    """Stands in for ``curve_points.run_command``: writes a metrics.json into --output_dir, or fails."""

    def __init__(self, fail_steps: tuple[int, ...] = ()):
        self.calls: list[list[str]] = []
        self.fail_steps = fail_steps

    def __call__(self, command: list[str]) -> tuple[int, str]:
        self.calls.append(command)
        ckpt = Path(command[command.index("--ckpt_path") + 1])
        step = int(ckpt.stem.split("step")[1]) if ckpt.name != "last.ckpt" else 10_000
        if step in self.fail_steps:
            return 2, "celldiff: error: the judge was trained on other classes"
        out = Path(command[command.index("--output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        metrics = {
            "frechet_distance": 1000.0 / step, "frechet_distance_floor": 1.7, "kernel_distance": 0.5,
            "kernel_distance_floor": 0.001, "precision": 0.6, "recall": 0.4, "num_samples": 8, "sampler": "dpmsolver",
            "steps": 20, "network_precision": "32-true",
            "class_mix": {"total_variation": 0.2, "total_variation_floor": 0.03, "classes": ["a", "b"]},
        }  # fmt: skip
        (out / "metrics.json").write_text(json.dumps(metrics))
        return 0, "celldiff: wrote metrics.json and metrics.md"


def _args(run: Path, out: Path, *more: str) -> list[str]:
    return ["--run_dir", str(run), "--config", "configs/phase3.yaml", "--classifier_ckpt", "weights/judge64.safetensors",
            "--out", str(out), "--num_samples", "8", "--data_dir", "data/pbc_sample", *more]  # fmt: skip


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _steps(fake: FakeEvaluate) -> list[int]:
    return [int(Path(c[c.index("--ckpt_path") + 1]).stem.split("step")[1]) for c in fake.calls]


def test_a_later_leg_counts_the_earlier_legs_images_and_wall_time(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, {469: 1000.0})
    monkeypatch.setattr(curve_points, "run_command", FakeEvaluate())
    out = tmp_path / "leg2.jsonl"
    assert curve_points.main(_args(run, out, "--images_offset", "105440", "--wall_offset", "7200")) == 0
    (line,) = _lines(out)
    assert line["step"] == 469 and line["images_seen"] == 105440 + 469 * 32 and line["wall_s"] == 8200.0
    assert "105440 before this run" in line["images_seen_basis"] and "7200 s before this run" in line["wall_s_basis"]


def test_a_later_leg_continues_the_step_count_of_the_same_curve(tmp_path, monkeypatch):
    """With --step_offset a leg's points go on from the earlier legs' (no clash with leg 1's step 469)."""
    out = tmp_path / "ship_64.jsonl"
    leg1 = _fake_run(tmp_path / "leg1", {469: 1000.0})
    monkeypatch.setattr(curve_points, "run_command", FakeEvaluate())
    assert curve_points.main(_args(leg1, out, "--name", "ship_64")) == 0
    leg2 = _fake_run(tmp_path / "leg2", {469: 900.0, 938: 1800.0})
    fake = FakeEvaluate()
    monkeypatch.setattr(curve_points, "run_command", fake)
    more = ["--name", "ship_64", "--step_offset", "469", "--images_offset", str(469 * 32), "--wall_offset", "1000"]
    assert curve_points.main(_args(leg2, out, *more, "--only", "469,938")) == 0
    assert _steps(fake) == [469, 938]  # the leg's own checkpoints, chosen by the leg's own steps
    assert [(p["step"], p["images_seen"], p["wall_s"]) for p in _lines(out)] == [
        (469, 469 * 32, 1000.0), (938, 938 * 32, 1900.0), (1407, 1407 * 32, 2800.0)]
    assert curve_points.main(_args(leg2, out, *more)) == 0 and len(_lines(out)) == 3  # measured once
    with pytest.raises(SystemExit):
        curve_points.main(_args(leg2, out, "--step_offset", "-1"))


def test_appends_one_line_per_checkpoint_with_images_seen_and_wall_time(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, {469: 1000.0, 938: 2500.0})
    fake = FakeEvaluate()
    monkeypatch.setattr(curve_points, "run_command", fake)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "curves" / "ship_64.jsonl"
    assert curve_points.main(_args(run, out, "--extra", "--data.eval_masks full  --model.guidance_scale 0")) == 0
    assert _steps(fake) == [469, 938]  # by step; last.ckpt is not numbered
    command = fake.calls[0]
    at = command.index("evaluate")  # after .venv/bin/celldiff, or python -m celldiff.cli
    assert command[at : at + 3] == ["evaluate", "--config", "configs/phase3.yaml"]
    for flag, value in [("--num_samples", "8"), ("--seed", "0"), ("--model.sampler", "dpmsolver"), ("--model.sampling_steps", "20"),
                        ("--data.data_dir", "data/pbc_sample"), ("--classifier_ckpt", "weights/judge64.safetensors"),
                        ("--data.eval_masks", "full"), ("--model.guidance_scale", "0")]:  # fmt: skip
        assert command[command.index(flag) + 1] == value
    first, second = _lines(out)
    assert first["run"] == "ship_64" and first["config"] == "configs/phase3.yaml"
    assert first["checkpoint"] == "epoch0001-step0000469.ckpt" and first["step"] == 469
    assert first["images_seen"] == 469 * 32 and second["images_seen"] == 938 * 32
    assert "one process" in first["images_seen_basis"]
    assert first["wall_s"] == 1000.0 and second["wall_s"] == 2500.0
    assert "config.yaml mtime" in first["wall_s_basis"]
    assert first["settings"] == {"num_samples": 8, "sampler": "dpmsolver", "steps": 20, "seed": 0,
                                 "judge": "weights/judge64.safetensors",
                                 "extra": "--data.eval_masks full --model.guidance_scale 0", "data_dir": "data/pbc_sample"}  # fmt: skip
    assert first["frechet_distance"] == pytest.approx(1000 / 469) and first["frechet_distance_floor"] == 1.7
    assert (first["kernel_distance"], first["kernel_distance_floor"]) == (0.5, 0.001)
    assert (first["precision"], first["recall"]) == (0.6, 0.4)
    assert (first["class_mix_total_variation"], first["class_mix_total_variation_floor"]) == (0.2, 0.03)
    assert first["classifier_accuracy"] is None  # an unconditional model's metrics have no classifier section
    assert first["evaluated"]["num_samples"] == 8 and first["eval_wall_s"] >= 0
    assert set(first["machine"]) >= {"cpu", "avx512_bf16", "amx_bf16", "omp_num_threads"}
    assert first["machine"]["omp_num_threads"] == "1"


def test_skips_steps_already_measured_with_the_same_settings(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, {469: 1000.0, 938: 2500.0, 1407: 4000.0})
    out = tmp_path / "ship_64.jsonl"
    fake = FakeEvaluate()
    monkeypatch.setattr(curve_points, "run_command", fake)
    assert curve_points.main(_args(run, out, "--only", "938")) == 0
    assert _steps(fake) == [938]
    assert curve_points.main(_args(run, out)) == 0
    assert _steps(fake) == [938, 469, 1407]
    assert curve_points.main(_args(run, out)) == 0  # nothing new
    assert len(fake.calls) == 3
    assert curve_points.main(_args(run, out, "--data_dir", "elsewhere/pbc64")) == 0  # the same data elsewhere
    assert len(fake.calls) == 3
    assert curve_points.main(_args(run, out, "--sampler", "ddim", "--steps", "50", "--every", "2")) == 0
    assert _steps(fake)[3:] == [938]  # other settings: measured again; --every 2 takes the 2nd checkpoint
    lines = _lines(out)
    assert [(p["step"], p["settings"]["sampler"]) for p in lines] == [
        (938, "dpmsolver"), (469, "dpmsolver"), (1407, "dpmsolver"), (938, "ddim")]  # fmt: skip


def test_a_failed_evaluation_goes_on_and_exits_1(tmp_path, monkeypatch, capsys):
    run = _fake_run(tmp_path, {469: 1000.0, 938: 2500.0})
    out = tmp_path / "ship_64.jsonl"
    fake = FakeEvaluate(fail_steps=(469,))
    monkeypatch.setattr(curve_points, "run_command", fake)
    assert curve_points.main(_args(run, out)) == 1
    assert "the judge was trained on other classes" in capsys.readouterr().err
    assert [p["step"] for p in _lines(out)] == [938]
    fake.fail_steps = ()
    assert curve_points.main(_args(run, out)) == 0  # the retry measures only the failed one
    assert _steps(fake) == [469, 938, 469]
    assert [p["step"] for p in _lines(out)] == [938, 469]


def test_a_missing_only_step_fails_and_dry_run_measures_nothing(tmp_path, monkeypatch, capsys):
    run = _fake_run(tmp_path, {469: 1000.0})
    out = tmp_path / "ship_64.jsonl"
    fake = FakeEvaluate()
    monkeypatch.setattr(curve_points, "run_command", fake)
    assert curve_points.main(_args(run, out, "--only", "469,5000")) == 1
    assert "no numbered checkpoint at step 5000" in capsys.readouterr().err
    assert curve_points.main(_args(run, tmp_path / "other.jsonl", "--dry_run")) == 0
    printed = capsys.readouterr().out
    assert "evaluate --config configs/phase3.yaml" in printed and "epoch0001-step0000469.ckpt" in printed
    assert len(fake.calls) == 1 and not (tmp_path / "other.jsonl").exists()


def test_last_adds_the_finished_runs_final_step_read_from_last_ckpt(tmp_path, monkeypatch, capsys):
    import torch

    run, out = _fake_run(tmp_path, {469: 600.0, 938: 1200.0}), tmp_path / "curve.jsonl"
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 1113, "epoch": 2, "state_dict": {"w": torch.zeros(2)}}, last)
    os.utime(last, (T0 + 1500.0, T0 + 1500.0))
    monkeypatch.setattr(curve_points, "run_command", FakeEvaluate())
    assert curve_points.main(_args(run, out)) == 0
    assert [p["step"] for p in _lines(out)] == [469, 938]  # without --last: the numbered ones only
    assert curve_points.main(_args(run, out, "--last")) == 0
    final = _lines(out)[-1]
    assert (final["step"], final["checkpoint"], final["images_seen"], final["wall_s"]) == (1113, "last.ckpt", 1113 * 32, 1500.0)
    assert curve_points.main(_args(run, out, "--last")) == 0 and len(_lines(out)) == 3  # measured once
    torch.save({"global_step": 938}, last)  # last.ckpt at a numbered step: not measured twice
    out2 = tmp_path / "other.jsonl"
    assert curve_points.main(_args(run, out2, "--last")) == 0 and [p["step"] for p in _lines(out2)] == [469, 938]
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read its global_step"):
        curve_points.main(_args(run, tmp_path / "third.jsonl", "--last"))
    last.unlink()
    assert curve_points.main(_args(run, out2, "--last")) == 0
    assert "--last: no last.ckpt" in capsys.readouterr().err


def test_run_command_returns_the_exit_code_and_last_stderr_line(capsys):
    code, last = curve_points.run_command(
        [sys.executable, "-c", "import sys; print('progress 1/2', file=sys.stderr); print('celldiff: error: boom', file=sys.stderr); sys.exit(2)"]
    )  # fmt: skip
    assert (code, last) == (2, "celldiff: error: boom")
    assert "progress 1/2" in capsys.readouterr().err  # passed through to the user


def test_a_torn_last_line_does_not_swallow_the_next(tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text(
        '{"run": "a", "step": 1}\n{"run": "a", "st'
    )  # killed mid-write (by hand: append_line fsyncs whole lines)
    curve_points.append_line(out, {"run": "a", "step": 2})
    assert [p["step"] for p in curve_points.read_points(out)] == [1, 2]


def _points(run: str, curve: list[tuple[float, float]]) -> list[dict]:
    return [{"run": run, "step": 100 * (i + 1), "images_seen": 3200 * (i + 1), "wall_s": wall, "frechet_distance": fd,
             "frechet_distance_floor": 1.7, "kernel_distance": fd / 100, "kernel_distance_floor": 0.0, "precision": 0.5,
             "recall": 0.3, "class_mix_total_variation": 0.1, "class_mix_total_variation_floor": 0.02,
             "settings": {"num_samples": 8}, "machine": {"cpu": "x"}}
            for i, (wall, fd) in enumerate(curve)]  # fmt: skip


def test_time_to_reach_interpolates_between_checkpoints():
    points = _points("c", [(400.0, 10.0), (100.0, 50.0), (200.0, 30.0)])  # any order
    assert plot_curves.time_to_reach(points, 20.0) == pytest.approx(300.0)  # halfway from 30 (200 s) to 10 (400 s)
    assert plot_curves.time_to_reach(points, 40.0) == pytest.approx(150.0)
    assert plot_curves.time_to_reach(points, 30.0) == pytest.approx(200.0)  # reached exactly at a checkpoint
    assert plot_curves.time_to_reach(points, 60.0) == 100.0  # the first checkpoint is already there
    assert plot_curves.time_to_reach(points, 5.0) is None
    assert plot_curves.time_to_reach([], 5.0) is None
    bumpy = _points("c", [(100.0, 50.0), (200.0, 15.0), (300.0, 40.0), (400.0, 5.0)])
    assert plot_curves.time_to_reach(bumpy, 20.0) == pytest.approx(100 + 30 / 35 * 100)  # the FIRST crossing


def test_headline_is_the_ratio_of_wall_times():
    groups = plot_curves.group_runs(
        _points("A", [(500.0, 40.0), (1000.0, 20.0)]) + _points("C", [(100.0, 50.0), (200.0, 30.0), (400.0, 10.0)])
    )
    text = plot_curves.headline(groups, "A", "C")
    assert "C reaches A's final FD 20 (step 200, 0.28 h) after 0.08 h: 0.30 x A's wall time" in text
    assert "warning" not in text
    assert "does not reach" in plot_curves.headline(groups, "C", "A")
    with pytest.raises(SystemExit, match="no run of that name"):
        plot_curves.headline(groups, "A", "B")


def test_plot_writes_a_png_and_prints_the_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, c = tmp_path / "A.jsonl", tmp_path / "C.jsonl"
    a.write_text("".join(json.dumps(p) + "\n" for p in _points("A", [(500.0, 40.0), (1000.0, 20.0)])))
    c.write_text("".join(json.dumps(p) + "\n" for p in _points("C", [(100.0, 50.0), (200.0, 30.0), (400.0, 10.0)])))
    png = tmp_path / "figs" / "curves.png"
    assert plot_curves.main([str(a), str(c), "--out", str(png), "--headline", "A", "C"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| run | step | images seen | wall h | FD | floor | KID | P | R | TV |" in printed
    assert "| C | 300 | 9,600 | 0.11 | 10 | 1.7 | 0.1 | 0.5 | 0.3 | 0.1 |" in printed
    assert "0.30 x A's wall time" in printed
    one_row = tmp_path / "wall.png"
    assert plot_curves.main([str(a), "--out", str(one_row), "--x", "wall_s"]) == 0
    assert one_row.is_file()


def test_recipe_runs_script_trains_and_resumes_with_a_fake_celldiff(tmp_path):
    """scripts/recipe_runs.sh: the config of each run, one thread, --ckpt_path last once a last.ckpt exists."""
    import subprocess

    fake = tmp_path / "celldiff"
    fake.write_text('#!/usr/bin/env bash\necho "$OMP_NUM_THREADS $*" >> "$(dirname "$0")/calls"\n')
    fake.chmod(0o755)
    env = {**os.environ, "CELLDIFF": str(fake), "RECIPE_RUNS": str(tmp_path / "runs")}
    script = str(SCRIPTS / "recipe_runs.sh")
    assert subprocess.run(["bash", script, "train", "A", "C"], env=env, capture_output=True).returncode == 0
    (tmp_path / "runs" / "A" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "A" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert subprocess.run(["bash", script, "train", "A"], env=env, capture_output=True).returncode == 0
    calls = sorted((tmp_path / "calls").read_text().splitlines())
    assert len(calls) == 3 and all(c.startswith("1 fit --config configs/results/") for c in calls)
    first_a, second_a, c = sorted(calls, key=lambda c: ("phase1_64_fast" in c, "ckpt_path" in c))
    assert "seed_phase1_64.yaml" in first_a and "--ckpt_path" not in first_a
    assert "seed_phase1_64.yaml" in second_a and second_a.endswith("--ckpt_path last")
    assert "phase1_64_fast.yaml" in c and f"--run_dir {tmp_path / 'runs' / 'C'}" in c
    assert "--trainer.precision bf16-mixed" in c or "--trainer.precision 32-true" in c
    assert (tmp_path / "runs" / "A.done").is_file()  # fit returned 0: the run finished
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\necho "$*" >> "$(dirname "$0")/curve_calls"\n')
    python.chmod(0o755)
    (tmp_path / "runs" / "C.done").unlink()
    done = subprocess.run(["bash", script, "curves", "A", "C"], env={**env, "PYTHON": str(python)}, capture_output=True)
    assert done.returncode == 0, done.stderr
    curve_a, curve_c = sorted((tmp_path / "curve_calls").read_text().splitlines(), key=lambda c: "recipe_C" in c)
    assert "--out docs/results/curves/recipe_A.jsonl" in curve_a and "--last" in curve_a  # finished: its final step too
    assert "--out docs/results/curves/recipe_C.jsonl" in curve_c and "--last" not in curve_c
    assert f"--eval_dir {tmp_path / 'runs' / 'evals'}" in curve_a
    for argv, message in ((["train", "D"], "unknown run 'D'"), (["train"], "needs one or more"),
                          (["train", "A", "B", "C"], "at most two"), ([], "usage")):  # fmt: skip
        done = subprocess.run(["bash", script, *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)
