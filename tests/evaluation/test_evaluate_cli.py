"""`celldiff evaluate` end to end on tiny checkpoints (unconditional, class-conditional inpainting); moved from tests/test_evaluate_cli.py."""

from __future__ import annotations

import json

import pytest

from tests.cli.helpers import run_cli, run_subprocess
from tests.conftest import REPO, TINY_MODEL_ARGS

TINY_CLASSIFIER = ["--model.width", "8", "--model.feature_dim", "32", "--data.image_size", "16"]


@pytest.fixture
def classifier_ckpt(small_sample, tmp_path):
    run = tmp_path / "cls"
    run_cli(["fit", "--config", str(REPO / "configs" / "demo_classifier.yaml"), "--data.data_dir", str(small_sample),
             "--run_dir", str(run), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
             *TINY_CLASSIFIER], tmp_path)  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


def _diffusion(config: str, small_sample, tmp_path, name: str):
    run = tmp_path / name
    run_cli(["fit", "--config", str(REPO / "configs" / config), "--data.data_dir", str(small_sample), "--run_dir",
             str(run), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
             "[]", "--data.batch_size", "16", *TINY_MODEL_ARGS], tmp_path)  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


def test_evaluate_unconditional(classifier_ckpt, small_sample, tmp_path):
    ckpt = _diffusion("demo.yaml", small_sample, tmp_path, "uncond")
    out = tmp_path / "eval"
    run_cli(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(ckpt),
             "--classifier_ckpt", str(classifier_ckpt), "--output_dir", str(out), "--num_samples", "24",
             "--model.sampling_steps", "3", "--data.data_dir", str(small_sample)], tmp_path)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 24
    assert metrics["frechet_distance"] > 0 and metrics["frechet_distance_floor"] >= 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["kernel_distance_floor_n"] == min(24, metrics["num_real"] // 2) and abs(metrics["kernel_distance"]) < float("inf")
    assert "skipped" in metrics["inception_skipped"]
    assert (out / "metrics.md").is_file() and (out / "generated_grid.png").is_file()


def test_evaluate_class_conditional_inpainting(classifier_ckpt, small_sample, tmp_path):
    ckpt = _diffusion("demo_phase3_inpaint.yaml", small_sample, tmp_path, "cinp")
    out = tmp_path / "eval"
    run_cli(["evaluate", "--config", str(REPO / "configs" / "demo_phase3_inpaint.yaml"), "--ckpt_path", str(ckpt),
             "--classifier_ckpt", str(classifier_ckpt), "--output_dir", str(out), "--num_samples", "16",
             "--model.sampling_steps", "3", "--data.data_dir", str(small_sample),
             "--data.eval_masks", "box,nucleus"], tmp_path)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["family"] for row in metrics["inpainting"]] == ["box", "nucleus"]
    assert all(row["n"] == 8 for row in metrics["inpainting"])
    assert len(metrics["classifier"]["confusion_matrix"]) == 8


def test_evaluate_judges_a_larger_model_with_a_downsampling_classifier(classifier_ckpt, small_sample, tmp_path):
    """A 16 px classifier judges a 32 px model: generated and real cells are downsampled alike."""
    run = tmp_path / "big"
    run_cli(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.data_dir", str(small_sample), "--run_dir",
             str(run), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
             "[]", "--data.batch_size", "16", *TINY_MODEL_ARGS, "--data.image_size", "32",
             "--model.attention_resolutions", "[16]"], tmp_path)  # fmt: skip
    out = tmp_path / "eval"
    run_cli(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
             "--classifier_ckpt", str(classifier_ckpt), "--output_dir", str(out), "--num_samples", "8",
             "--model.sampling_steps", "2", "--data.data_dir", str(small_sample), "--data.image_size", "32"], tmp_path)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert "at 16 px (cells downsampled from 32 px)" in metrics["feature_space"]
    assert 0 <= metrics["classifier_accuracy_real_test"] <= 1 and metrics["num_real"] > 0
    assert "classifier_accuracy_real_test" in (out / "metrics.md").read_text()


def test_evaluate_samples_under_the_trainer_precision(classifier_ckpt, small_sample, tmp_path):
    """--trainer.precision bf16-mixed runs the network under autocast: close to, not equal to, fp32."""
    import numpy as np
    from PIL import Image

    ckpt = _diffusion("demo.yaml", small_sample, tmp_path, "uncond")
    grids = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / f"eval-{precision}"
        run_cli(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(ckpt),
                 "--classifier_ckpt", str(classifier_ckpt), "--output_dir", str(out), "--num_samples", "8",
                 "--model.sampling_steps", "3", "--data.data_dir", str(small_sample),
                 "--trainer.precision", precision], tmp_path)  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["network_precision"] == precision
        assert metrics["sampling_seconds"] > 0 and metrics["sampling_device"] == "cpu" and metrics["sampling_threads"] >= 1
        assert metrics["sampling_seconds_per_image"] == pytest.approx(metrics["sampling_seconds"] / 8, abs=1e-3)
        grids[precision] = np.asarray(Image.open(out / "generated_grid.png"), dtype=np.float64)
    difference = np.abs(grids["32-true"] - grids["bf16-mixed"])
    assert difference.max() > 0 and difference.mean() < 8


def test_evaluate_refuses_a_classifier_larger_than_the_model(classifier_ckpt, small_sample, tmp_path):
    run = tmp_path / "small"
    run_cli(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.data_dir", str(small_sample), "--run_dir",
             str(run), "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
             "[]", "--data.batch_size", "16", *TINY_MODEL_ARGS, "--data.image_size", "8"], tmp_path)  # fmt: skip
    result = run_subprocess(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path",
                             str(run / "checkpoints" / "last.ckpt"), "--classifier_ckpt", str(classifier_ckpt),
                             "--output_dir", str(tmp_path / "o"), "--data.data_dir", str(small_sample),
                             "--data.image_size", "8"], tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "classifier works at 16 px, the diffusion model at 8 px" in result.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_evaluate_needs_a_classifier(small_sample, tmp_path):
    result = run_subprocess(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path",
                             str(tmp_path / "missing.ckpt"), "--output_dir", str(tmp_path / "o")], tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing.ckpt" in result.stderr


def test_evaluate_logs_tables_to_wandb_offline(classifier_ckpt, small_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ckpt = _diffusion("demo_phase3.yaml", small_sample, tmp_path, "cond")
    out = tmp_path / "eval"
    run_cli(["evaluate", "--config", str(REPO / "configs" / "demo_phase3.yaml"), "--ckpt_path", str(ckpt),
             "--classifier_ckpt", str(classifier_ckpt), "--output_dir", str(out), "--num_samples", "16",
             "--model.sampling_steps", "3", "--data.data_dir", str(small_sample),
             "--trainer.logger", "WandbLogger"], tmp_path)  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["classifier"]["num_samples"] == 16
    tables = {p.name.split("_")[0] for p in out.glob("wandb/offline-run-*/files/media/table/eval/*.table.json")}
    assert {"per", "confusion"} <= tables, tables


def test_evaluate_non_learned_baseline_with_lpips(classifier_ckpt, small_sample, tmp_path):
    import torch
    import torchvision

    weights = tmp_path / "alexnet.pth"  # random weights: LPIPS values are meaningless, the plumbing is tested
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    out = tmp_path / "eval"
    run_cli(["evaluate", "--config", str(REPO / "configs" / "demo_inpaint.yaml"), "--baseline", "blur_fill",
             "--classifier_ckpt", str(classifier_ckpt), "--output_dir", str(out), "--num_samples", "16",
             "--data.data_dir", str(small_sample), "--data.image_size", "16",
             "--data.eval_masks", "box,brush", "--metrics.lpips_weights", str(weights)], tmp_path)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sampler"] == "blur_fill" and metrics["num_samples"] == 16
    assert [row["family"] for row in metrics["inpainting"]] == ["box", "brush"]
    assert all(row["psnr"] > 10 and row["lpips"] >= 0 for row in metrics["inpainting"])
    report = (out / "metrics.md").read_text()
    assert "Masked-region metrics per mask family" in report and "lpips" in report
    assert "Fréchet distance per class" in report


def test_evaluate_baseline_and_checkpoint_are_exclusive(small_sample, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    result = run_subprocess(["evaluate", "--config", str(REPO / "configs" / "demo_inpaint.yaml"), "--ckpt_path",
                             str(ckpt), "--baseline", "mean_fill", "--output_dir", str(tmp_path / "o")], tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not both" in result.stderr


@pytest.mark.slow
def test_evaluate_shards_sampling_across_two_ddp_processes(classifier_ckpt, small_sample, tmp_path):
    """Two gloo ranks each generate half of the jobs; the gathered result equals one process's."""
    ckpt = _diffusion("demo_inpaint.yaml", small_sample, tmp_path, "inp")
    common = ["evaluate", "--config", str(REPO / "configs" / "demo_inpaint.yaml"), "--ckpt_path", str(ckpt),
              "--classifier_ckpt", str(classifier_ckpt), "--num_samples", "24", "--model.sampling_steps", "3",
              "--data.data_dir", str(small_sample), "--data.eval_masks", "box,nucleus", "--data.batch_size", "4",
              "--trainer.accelerator", "cpu"]  # fmt: skip
    single = run_subprocess([*common, "--output_dir", str(tmp_path / "one"), "--trainer.devices", "1"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_subprocess([*common, "--output_dir", str(tmp_path / "two"), "--trainer.devices", "2",
                             "--trainer.strategy", "ddp"], tmp_path, timeout=600)  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["num_samples"] == two["num_samples"] == 24
    for a, b in zip(one["inpainting"], two["inpainting"], strict=True):
        assert a["family"] == b["family"] and a["n"] == b["n"]
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-4)
    assert one["frechet_distance"] == pytest.approx(two["frechet_distance"], rel=1e-3)
    # the two ranks each reported their own share of the work
    assert double.stderr.count("inpainting (box) 4/") + double.stderr.count("inpainting (box) 8/") >= 2
