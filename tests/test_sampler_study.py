"""scripts/sampler_study.py with a fake ``celldiff evaluate`` (no real evaluation)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
spec = importlib.util.spec_from_file_location("_script_sampler_study", SCRIPTS / "sampler_study.py")
sampler_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sampler_study)


class FakeEvaluate:
    """Writes a metrics.json whose FD falls with the steps, and a sampling time that grows with them."""

    def __init__(self, inpainting: bool = False):
        self.calls: list[list[str]] = []
        self.inpainting = inpainting

    def __call__(self, command: list[str]) -> tuple[int, str]:
        self.calls.append(command)
        value = lambda flag: command[command.index(flag) + 1]  # noqa: E731
        steps, times, n = int(value("--model.sampling_steps")), int(value("--model.resample_times")), int(value("--num_samples"))
        out = Path(value("--output_dir"))
        out.mkdir(parents=True, exist_ok=True)
        metrics = {"frechet_distance": 10.0 + 100.0 / steps, "frechet_distance_floor": 0.5, "kernel_distance": 0.01,
                   "kernel_distance_floor": 0.0, "precision": 0.7, "recall": 0.5, "num_samples": n,
                   "sampler": value("--model.sampler"), "steps": steps, "network_precision": "32-true",
                   "sampling_seconds": 0.01 * steps * times * n, "sampling_seconds_per_image": 0.01 * steps * times,
                   "sampling_threads": 1}  # fmt: skip
        if self.inpainting:
            metrics["inpainting"] = [{"family": "nucleus", "n": 4, "mse": 0.01, "psnr": 18.0 + steps / 100, "ssim": 0.5,
                                      "seam": 0.02, "frechet_distance": 3.0, "lpips": 0.1}]  # fmt: skip
        (out / "metrics.json").write_text(json.dumps(metrics))
        return 0, "celldiff: wrote metrics.json"


def _args(tmp_path: Path, out: Path, settings: str, *more: str) -> list[str]:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    return ["--ckpt_path", str(ckpt), "--config", "configs/results/phase1_64_fast.yaml", "--classifier_ckpt",
            "weights/judge64.safetensors", "--out", str(out), "--name", "C", "--settings", settings,
            "--num_samples", "8", *more]  # fmt: skip


def test_settings_parse_with_resampling_and_their_own_n():
    assert sampler_study.parse_setting("dpmsolver:20", 1000) == {
        "setting": "dpmsolver:20@1000", "sampler": "dpmsolver", "steps": 20, "resample_times": 1, "resample_jump": 1,
        "num_samples": 1000}  # fmt: skip
    repaint = sampler_study.parse_setting("ddpm:250:r10:j10@300", 1000)
    assert (repaint["setting"], repaint["resample_times"], repaint["resample_jump"], repaint["num_samples"]) == (
        "ddpm:250:r10:j10@300", 10, 10, 300)  # fmt: skip
    for bad, message in (("dpm:20", "sampler must be one of"), ("ddim", "expected SAMPLER:STEPS"),
                         ("ddim:0", "at least 1"), ("ddim:50@0", "at least 1")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            sampler_study.parse_setting(bad, 8)


def test_network_evaluations_count_repaints_resampling_and_guidance():
    assert sampler_study.network_evaluations(20, 1, 1) == 20
    # 10 steps, jump 2, 3 passes: jump points 0, 2, 4, 6 (p + j <= 9), each stretch of 2 redone twice: 10 + 4 * 2 * 2
    assert sampler_study.network_evaluations(10, 3, 2) == 26
    assert sampler_study.guided(["--model.guidance_scale", "2"]) and sampler_study.guided(["--model.guidance_scale=4"])
    assert not sampler_study.guided(["--model.guidance_scale", "0"]) and not sampler_study.guided(["--model.guidance_scale", "1"])
    assert not sampler_study.guided([])


def test_one_line_per_setting_the_same_seed_and_skipped_when_measured(tmp_path, monkeypatch):
    fake = FakeEvaluate()
    monkeypatch.setattr(sampler_study.curve_points, "run_command", fake)
    out = tmp_path / "study.jsonl"
    assert sampler_study.main(_args(tmp_path, out, "dpmsolver:10,ddim:50,ddpm:1000@4")) == 0
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    assert [p["setting"] for p in lines] == ["dpmsolver:10@8", "ddim:50@8", "ddpm:1000@4"]
    assert [p["num_samples"] for p in lines] == [8, 8, 4] and lines[2]["network_evaluations_per_image"] == 1000
    assert all(c[c.index("--seed") + 1] == "0" for c in fake.calls)
    assert lines[0]["frechet_distance"] == pytest.approx(20.0) and lines[0]["sampling_seconds_per_image"] == pytest.approx(0.1)
    assert lines[0]["machine"]["cpu_count"] >= 1 and lines[0]["inpainting"] == []
    assert sampler_study.main(_args(tmp_path, out, "dpmsolver:10,dpmsolver:20")) == 0
    assert len(fake.calls) == 4 and len(out.read_text().splitlines()) == 4  # dpmsolver:10 was measured already

    text = sampler_study.table([out], None)  # reference: the most network evaluations (ddpm:1000@4)
    assert "**C** (reference: ddpm:1000@4)" in text
    assert "| dpmsolver:10@8 | 10 | 8 | 20 | 0.5 | 9.9 | 0.01 | 0.7 | 0.5 | 0.1 | 100.0x |" in text
    assert "FD - ddim:50@8" in sampler_study.table([out], "ddim:50@8")
    with pytest.raises(SystemExit, match="no such setting"):
        sampler_study.table([out], "ddim:99@8")


def test_inpainting_rows_reach_the_table_and_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sampler_study.curve_points, "run_command", FakeEvaluate(inpainting=True))
    out = tmp_path / "inpaint.jsonl"
    assert sampler_study.main(_args(tmp_path, out, "ddpm:100:r2:j5,dpmsolver:20", "--extra", "--data.eval_masks nucleus")) == 0
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    assert lines[0]["inpainting"][0]["psnr"] == pytest.approx(19.0) and lines[0]["extra"] == "--data.eval_masks nucleus"
    assert "nucleus PSNR / SSIM / seam" in sampler_study.table([out], None)
    with pytest.raises(SystemExit):
        sampler_study.main(["--config", "x"])
    assert "--ckpt_path is required" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no lines"):
        sampler_study.table([tmp_path / "none.jsonl"], None)
