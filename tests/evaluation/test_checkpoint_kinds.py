"""Checkpoints of the wrong kind, and every input of ``celldiff evaluate``: one line and exit 2, or the right result (issue 13); moved from tests/test_checkpoint_kinds.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli.helpers import _plain_argv, run_cli  # noqa: F401 (an autouse fixture)
from tests.conftest import REPO, SAMPLE, SMALL_SAMPLE_PER_CLASS, TINY_MODEL_ARGS

CONFIGS = REPO / "configs"
DEMO, PHASE3, INPAINT = str(CONFIGS / "demo.yaml"), str(CONFIGS / "demo_phase3.yaml"), str(CONFIGS / "demo_inpaint.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
STEPS = ["--model.sampler", "ddim", "--model.sampling_steps", "2"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """Tiny checkpoints of every kind, trained once: unconditional, inpainting, Phase 3 on two classes, classifier."""
    root = tmp_path_factory.mktemp("kinds")
    data = root / "pbc_small"
    for class_dir in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (data / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.glob("*.jpg"))[:SMALL_SAMPLE_PER_CLASS]:
            shutil.copy(f, data / class_dir.name / f.name)
    common = ["--data.data_dir", str(data), "--trainer.max_steps", "1", "--trainer.callbacks", "[]", *QUIET]
    runs = {
        "uncond": [DEMO, "--data.batch_size", "16", *TINY_MODEL_ARGS],
        "inpaint": [INPAINT, "--data.batch_size", "16", *TINY_MODEL_ARGS],
        "inpaint_full": [INPAINT, "--data.batch_size", "16", "--data.masks", "{box: 1, full: 1}", *TINY_MODEL_ARGS],
        "two_classes": [PHASE3, "--data.batch_size", "8", "--data.classes", "[eosinophil, platelet]", *TINY_MODEL_ARGS],
        "classifier": [str(CONFIGS / "demo_classifier.yaml"), "--data.batch_size", "16", "--data.image_size", "16",
                       "--model.width", "4", "--model.feature_dim", "16"],
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's function-scoped isolation is not active yet
        mp.setenv("CELLDIFF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "celldiff-cache"))
        mp.setenv("CELLDIFF_RUN_DIR", "")
        for name, (config, *extra) in runs.items():
            run_cli(["fit", "--config", config, "--run_dir", str(root / name), *common, *extra], root)
    ckpts = {name: root / name / "checkpoints" / "last.ckpt" for name in runs}
    return SimpleNamespace(data=data, root=root, **ckpts)


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("celldiff: error:")]


def one_line_exit_2(args: list[str], cwd: Path, capsys) -> str:
    """Run the CLI in-process: it must exit 2 with exactly one error line (returned)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args, cwd)
    assert exit_info.value.code == 2
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    return lines[0]


def predict(kinds, ckpt: Path | str | None, out: Path, *extra: str, config: str = DEMO) -> list[str]:
    return ["predict", "--config", config, "--data.data_dir", str(kinds.data), "--output_dir", str(out),
            "--num_samples", "2", *STEPS, *QUIET, *(["--ckpt_path", str(ckpt)] if ckpt is not None else []), *extra]  # fmt: skip


def evaluate(kinds, out: Path, *extra: str, ckpt: Path | None = None, classifier: Path | str | None = None) -> list[str]:
    return ["evaluate", "--config", DEMO, "--data.data_dir", str(kinds.data), "--output_dir", str(out), *STEPS,
            "--ckpt_path", str(ckpt or kinds.uncond), "--classifier_ckpt", str(classifier or kinds.classifier), *extra]  # fmt: skip


def _images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("sample_*.png"))}


# ---------------------------------------------------------------------------------------------- predict
def test_predict_with_a_classifier_checkpoint_is_one_line(kinds, tmp_path, capsys):
    line = one_line_exit_2(predict(kinds, kinds.classifier, tmp_path / "out"), tmp_path, capsys)
    assert "is a cell classifier checkpoint" in line and "predict needs a diffusion model checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_predict_without_a_checkpoint_is_refused(kinds, tmp_path, capsys):
    line = one_line_exit_2(predict(kinds, None, tmp_path / "out"), tmp_path, capsys)
    assert "predict needs --ckpt_path" in line and "random weights" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sub", ["predict", "validate", "test", "evaluate"])
def test_ckpt_path_last_with_nothing_found_is_refused(kinds, tmp_path, capsys, sub):
    if sub == "predict":
        args = predict(kinds, "last", tmp_path / "out")
    elif sub == "evaluate":
        args = [a if a != str(kinds.uncond) else "last" for a in evaluate(kinds, tmp_path / "out")]
    else:
        args = [sub, "--config", DEMO, "--data.data_dir", str(kinds.data), "--ckpt_path", "last", *QUIET]
    line = one_line_exit_2(args, tmp_path, capsys)
    assert line.startswith("celldiff: error: --ckpt_path last: no run of config 'demo'") and "random weights" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_predict_ckpt_path_last_uses_the_runs_checkpoint(kinds, tmp_path):
    run_cli(predict(kinds, kinds.uncond, tmp_path / "file"), tmp_path)
    run_cli(predict(kinds, "last", tmp_path / "last", "--run_dir", str(kinds.root / "uncond")), tmp_path)
    by_file, by_last = _images(tmp_path / "file"), _images(tmp_path / "last")
    assert len(by_file) == 2 and by_file.keys() == by_last.keys()
    assert all(np.array_equal(by_file[k], by_last[k]) for k in by_file)  # the same weights, not random ones


def test_predict_classes_with_an_unconditional_checkpoint_is_refused(kinds, tmp_path, capsys):
    line = one_line_exit_2(predict(kinds, kinds.uncond, tmp_path / "out", "--classes", "eosinophil"), tmp_path, capsys)
    assert "--classes eosinophil" in line and "is unconditional" in line
    assert not (tmp_path / "out").exists()


def test_a_phase3_checkpoint_brings_its_classes(kinds, tmp_path, capsys):
    """Trained on eosinophil and platelet; the config reads all 8 class folders: labels keep their meaning."""
    out = tmp_path / "out"
    run_cli(predict(kinds, kinds.two_classes, out, "--classes", "platelet", config=PHASE3), tmp_path)
    assert sorted(p.name for p in out.glob("*_0000*.png")) == ["platelet_00000.png", "platelet_00001.png"]
    # A class list that contradicts the checkpoint's: one line naming both.
    line = one_line_exit_2(
        predict(kinds, kinds.two_classes, tmp_path / "o2", "--data.classes", "[basophil, platelet]", config=PHASE3),
        tmp_path, capsys,
    )  # fmt: skip
    assert "trained on the classes eosinophil, platelet" in line and "data.classes is basophil, platelet" in line
    # Data without one of the checkpoint's classes: one line naming it.
    partial = tmp_path / "partial"
    shutil.copytree(kinds.data / "eosinophil", partial / "eosinophil")
    shutil.copytree(kinds.data / "basophil", partial / "basophil")
    args = predict(kinds, kinds.two_classes, tmp_path / "o3", config=PHASE3) + ["--data.data_dir", str(partial)]
    line = one_line_exit_2(args, tmp_path, capsys)
    assert "has no platelet" in line and "it has basophil, eosinophil" in line


def test_an_inpainting_checkpoint_without_masks_is_one_line(kinds, tmp_path, capsys):
    line = one_line_exit_2(predict(kinds, kinds.inpaint, tmp_path / "out"), tmp_path, capsys)
    assert "is an inpainting model" in line and "data.predict_images" in line
    test = ["test", "--config", DEMO, "--data.data_dir", str(kinds.data), "--ckpt_path", str(kinds.inpaint),
            "--run_dir", str(tmp_path / "t"), *QUIET]  # fmt: skip
    assert "data.eval_masks" in one_line_exit_2(test, tmp_path, capsys)


def test_an_inpainting_model_trained_with_full_masks_generates_from_noise(kinds, tmp_path):
    """One model, four tasks: the 'full' family in its training mixture lets predict generate from noise."""
    run_cli(predict(kinds, kinds.inpaint_full, tmp_path / "out", "--seed", "3"), tmp_path)
    images = _images(tmp_path / "out")
    assert len(images) == 2 and all(image.shape[-1] == 3 for image in images.values())
    from celldiff.training.weights import export_weights, read_weights_metadata

    export_weights(kinds.inpaint_full, tmp_path / "full.safetensors")
    assert json.loads(read_weights_metadata(tmp_path / "full.safetensors")["training_masks"]) == {"box": 1.0, "full": 1.0}
    run_cli(predict(kinds, tmp_path / "full.safetensors", tmp_path / "out2", "--seed", "3"), tmp_path)
    again = _images(tmp_path / "out2")
    assert again.keys() == images.keys()
    assert all(np.abs(again[k].astype(int) - images[k].astype(int)).max() <= 2 for k in images)  # fp16 weights


def test_an_inpainting_model_trained_with_full_masks_is_evaluated_as_a_generator(kinds, tmp_path, capsys):
    out = tmp_path / "gen"
    run_cli(evaluate(kinds, out, "--data.eval_masks", "full", "--num_samples", "8", ckpt=kinds.inpaint_full), tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 8 and "inpainting" not in metrics and "frechet_distance" in metrics
    mix = metrics["class_mix"]  # an unconditional generator: its class mix against the data's, as the judge sees both
    assert 0 <= mix["total_variation"] <= 1 and sum(mix["generated_fractions"]) == pytest.approx(1)
    assert "## Class mix" in (out / "metrics.md").read_text()
    refused = evaluate(kinds, tmp_path / "no", "--data.eval_masks", "full", "--num_samples", "8", ckpt=kinds.inpaint)
    assert "not trained with the 'full' mask family" in one_line_exit_2(refused, tmp_path, capsys)


def test_guidance_0_evaluates_a_class_conditional_model_as_unconditional() -> None:
    from jsonargparse import Namespace

    from celldiff.evaluation.inputs import draws_unconditionally, evaluation_mode

    def hp(**kw):
        return Namespace(**{"inpainting": False, "class_conditional": True, "guidance_scale": 2.0, **kw})

    assert evaluation_mode(hp(), None) == (False, True) and not draws_unconditionally(hp(), False, True)
    assert draws_unconditionally(hp(guidance_scale=0.0), False, True)  # the null class alone: class mix measured
    assert draws_unconditionally(hp(class_conditional=False), False, False)
    assert evaluation_mode(hp(inpainting=True), "nucleus") == (True, True) and evaluation_mode(hp(inpainting=True), "full") == (False, True)
    assert not draws_unconditionally(hp(guidance_scale=0.0), True, True)  # inpainting: cells keep their real class
    assert evaluation_mode(hp(inpainting=True), "full", baseline="mean_fill") == (True, False)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    ("config", "ckpt", "expected"),
    [
        (DEMO, "inpaint", "model.inpainting is True in the checkpoint and False in the config"),
        (INPAINT, "uncond", "model.inpainting is False in the checkpoint and True in the config"),
        (DEMO, "two_classes", "model.class_conditional is True in the checkpoint and False in the config"),
        (DEMO, "classifier", "is a cell classifier checkpoint but the config trains a diffusion model"),
    ],
)
def test_resuming_from_a_checkpoint_of_another_kind_is_refused_at_start_up(kinds, tmp_path, capsys, config, ckpt, expected):
    run = tmp_path / "run"
    args = ["fit", "--config", config, "--data.data_dir", str(kinds.data), "--ckpt_path", str(getattr(kinds, ckpt)),
            "--run_dir", str(run), "--trainer.max_steps", "3", "--trainer.callbacks", "[]", *QUIET]  # fmt: skip
    line = one_line_exit_2(args, tmp_path, capsys)
    assert expected in line and "config it was trained with" in line
    assert not run.exists()


def test_resuming_with_the_runs_own_kind_still_works(kinds, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(kinds.root / "inpaint", run)
    # The demo_inpaint config's own architecture is larger: the checkpoint's (CHECKPOINT_ARCH_KEYS) is used.
    run_cli(["fit", "--config", INPAINT, "--data.data_dir", str(kinds.data), "--ckpt_path", "last", "--run_dir", str(run),
             "--trainer.max_steps", "2", "--trainer.callbacks", "[]", "--data.batch_size", "16", *QUIET], tmp_path)  # fmt: skip
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_with_swapped_checkpoints_is_one_line(kinds, tmp_path, capsys):
    swapped = evaluate(kinds, tmp_path / "o1", ckpt=kinds.classifier, classifier=kinds.uncond)
    line = one_line_exit_2(swapped, tmp_path, capsys)
    assert "--ckpt_path" in line and "is a cell classifier checkpoint" in line and "swapped?" in line
    line = one_line_exit_2(evaluate(kinds, tmp_path / "o2", classifier=kinds.uncond), tmp_path, capsys)
    assert "--classifier_ckpt" in line and "is a diffusion model checkpoint" in line and "arbitrary code" not in line
    assert not (tmp_path / "o1").exists() and not any((tmp_path / "o2").glob("*"))


def _truncated(tmp: Path, source: Path) -> str:
    data = source.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    return str(tmp / "truncated.ckpt")


def _not_weights(tmp: Path) -> str:
    (tmp / "notes.pth").write_text("not a weights file")
    return str(tmp / "notes.pth")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (lambda k, t: ["--num_samples", "0"], "--num_samples 0: expected at least 4"),
        (lambda k, t: ["--num_samples", "-5"], "--num_samples -5: expected at least 4"),
        (lambda k, t: ["--num_samples", "2"], "--num_samples 2: expected at least 4"),
        (lambda k, t: ["--classifier_ckpt", str(t / "missing.ckpt")], "missing.ckpt: no such checkpoint file"),
        (lambda k, t: ["--classifier_ckpt", str(t)], "is a directory"),
        (lambda k, t: ["--classifier_ckpt", _truncated(t, k.classifier)], "truncated.ckpt: not a readable checkpoint"),
        (lambda k, t: ["--metrics.inception_weights", str(t / "inception.pth")], "inception.pth: no such file"),
        (lambda k, t: ["--metrics.lpips_weights", str(t / "alexnet.pth")], "alexnet.pth: no such file"),
        (lambda k, t: ["--metrics.lpips_weights", _not_weights(t)], "notes.pth: not a readable weights file"),
        (lambda k, t: ["--data.classes", "[eosinophil, platelet]"], "was trained on the classes basophil, eosinophil"),
        (lambda k, t: ["--classes", "eosinophil"], "evaluate generates every class in turn"),
    ],
    ids=["zero-samples", "negative-samples", "two-samples", "classifier-missing", "classifier-is-a-directory",
         "classifier-truncated", "inception-weights-missing", "lpips-weights-missing", "lpips-weights-not-weights",
         "classifier-of-other-classes", "classes-option"],
)  # fmt: skip
def test_evaluate_bad_input_is_one_line_before_any_work(kinds, tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate(kinds, out, *extra(kinds, tmp_path)), tmp_path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("celldiff: error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in err and "sampling " not in err  # refused before generating anything
    assert not out.exists() or not any(out.iterdir())


def test_evaluate_unknown_baseline_and_no_checkpoint(kinds, tmp_path, capsys):
    base = ["evaluate", "--config", INPAINT, "--data.data_dir", str(kinds.data), "--data.image_size", "16",
            "--classifier_ckpt", str(kinds.classifier), "--output_dir", str(tmp_path / "o"), "--num_samples", "24"]  # fmt: skip
    assert "--baseline nope: unknown; expected one of blur_fill, mean_fill" in one_line_exit_2([*base, "--baseline", "nope"], tmp_path, capsys)
    assert "or --baseline NAME" in one_line_exit_2(base, tmp_path, capsys)


def test_evaluate_num_samples_minimum_follows_the_model(kinds, tmp_path, capsys):
    """Inpainting compares each mask family on its own (4 cells each); too many cells leave no reference."""
    args = ["evaluate", "--config", INPAINT, "--data.data_dir", str(kinds.data), "--ckpt_path", str(kinds.inpaint),
            "--classifier_ckpt", str(kinds.classifier), *STEPS, "--data.eval_masks", "box,nucleus"]  # fmt: skip
    line = one_line_exit_2([*args, "--output_dir", str(tmp_path / "a"), "--num_samples", "6"], tmp_path, capsys)
    assert "--num_samples 6: expected at least 8 (4 cells for each of the 2 mask families" in line
    # 22 test cells: at most 18 per family, so that 4 remain to compare with.
    line = one_line_exit_2([*args, "--output_dir", str(tmp_path / "b"), "--num_samples", "40"], tmp_path, capsys)
    assert "expected at most 36 (2 families x 18 cells)" in line


def test_a_failed_evaluate_leaves_an_empty_output_dir_for_the_retry(kinds, tmp_path, capsys):
    import wandb

    out = tmp_path / "out"
    logger = ["--trainer.logger", "WandbLogger"]  # writes its run id into --output_dir before any work
    try:
        one_line_exit_2(evaluate(kinds, out, "--num_samples", "2", *logger), tmp_path, capsys)
        assert out.is_dir() and not any(out.iterdir())
        run_cli(evaluate(kinds, out, "--num_samples", "8", *logger), tmp_path)  # the retry is not refused as "not empty"
        assert json.loads((out / "metrics.json").read_text())["num_samples"] == 8
    finally:  # in-process: a later W&B logger must not reuse this (disabled) run, nor its settings
        wandb.finish()
        wandb.teardown()


def test_evaluate_reports_how_the_floor_is_measured(kinds, tmp_path):
    out = tmp_path / "out"
    run_cli(evaluate(kinds, out, "--num_samples", "8"), tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    n_real = metrics["num_real"]
    assert metrics["frechet_distance_n"] == 8 and metrics["frechet_distance_reference_n"] == n_real
    assert metrics["frechet_distance_floor_n"] == 8 and metrics["frechet_distance_floor_reference_n"] == n_real
    assert f"8 real cells drawn at random against the other {n_real - 8}" in metrics["frechet_distance_floor_method"]
    assert metrics["frechet_distance_floor_draws"] >= 4
    report = (out / "metrics.md").read_text()
    assert f"Fréchet distance: 8 generated vs all {n_real} real test cells" in report
    assert f"against the other {n_real - 8} real cells" in report


def test_inpainting_evaluate_compares_each_family_with_the_cells_it_did_not_inpaint(kinds, tmp_path):
    out = tmp_path / "out"
    run_cli(["evaluate", "--config", INPAINT, "--data.data_dir", str(kinds.data), "--ckpt_path", str(kinds.inpaint),
             "--classifier_ckpt", str(kinds.classifier), *STEPS, "--data.eval_masks", "box,nucleus",
             "--output_dir", str(out), "--num_samples", "16"], tmp_path)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    n_real = metrics["num_real"]
    assert metrics["frechet_distance_n"] == 8 and metrics["frechet_distance_reference_n"] == n_real - 8
    # the floor at exactly those sizes: 8 real cells against the other n_real - 8
    assert metrics["frechet_distance_floor_n"] == 8 and metrics["frechet_distance_floor_reference_n"] == n_real - 8
    rows = {row["family"]: row for row in metrics["inpainting"]}
    assert set(rows) == {"box", "nucleus"} and all(row["n"] == 8 for row in rows.values())
    assert metrics["frechet_distance"] == pytest.approx(np.mean([row["frechet_distance"] for row in rows.values()]))
    assert "not inpainted" in metrics["inpainting_comparisons"] and "paired" in metrics["inpainting_comparisons"]
    assert sum(row["reference_n"] for row in metrics["per_class"]) == n_real - 8
