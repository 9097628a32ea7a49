"""Shipped weights on the command line (issue 16): ``celldiff export``, ``--ckpt_path NAME.safetensors``,
``--model.init_weights``, one line for every bad file, and the ``export`` / ``app`` dispatch of ``main``."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from celldiff.cli import main
from celldiff.training.weights import load_weights, read_weights_metadata
from tests.cli.helpers import _plain_argv, run_cli  # noqa: F401 (an autouse fixture)
from tests.conftest import REPO, SAMPLE, SMALL_SAMPLE_PER_CLASS, TINY_MODEL_ARGS

DEMO = str(REPO / "configs" / "demo.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
STEPS = ["--model.sampler", "ddim", "--model.sampling_steps", "2"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A tiny diffusion model and a tiny classifier, trained one step each and exported with ``celldiff export``."""
    root = tmp_path_factory.mktemp("shipped")
    data = root / "pbc_small"
    for class_dir in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (data / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.glob("*.jpg"))[:SMALL_SAMPLE_PER_CLASS]:
            shutil.copy(f, data / class_dir.name / f.name)
    common = ["--data.data_dir", str(data), "--trainer.max_steps", "1", "--trainer.callbacks", "[]", "--data.batch_size", "16", *QUIET]
    classifier = [str(REPO / "configs" / "demo_classifier.yaml"), "--data.image_size", "16", "--model.width", "4",
                  "--model.feature_dim", "16"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's function-scoped isolation is not active yet
        mp.setenv("CELLDIFF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "celldiff-cache"))
        mp.setenv("CELLDIFF_RUN_DIR", "")
        mp.setattr(sys, "argv", ["celldiff"])
        run_cli(["fit", "--config", DEMO, "--run_dir", str(root / "uncond"), *common, *TINY_MODEL_ARGS], root)
        run_cli(["fit", "--config", classifier[0], "--run_dir", str(root / "cls"), *common, *classifier[1:]], root)
        for run, name in (("uncond", "tiny"), ("cls", "judge")):
            main(["export", "--ckpt_path", str(root / run / "checkpoints" / "last.ckpt"), "--output", str(root / "weights" / f"{name}.safetensors")])
    return types.SimpleNamespace(data=data, root=root, ckpt=root / "uncond" / "checkpoints" / "last.ckpt",
                                 weights=root / "weights" / "tiny.safetensors", judge=root / "weights" / "judge.safetensors")  # fmt: skip


def one_line_exit_2(args: list[str], cwd: Path, capsys) -> str:
    """Run the CLI in-process: exit 2 with exactly one ``celldiff: error:`` line (returned), no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args, cwd)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("celldiff: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def predict(shipped, ckpt: Path | str, out: Path, *extra: str) -> list[str]:
    return ["predict", "--config", DEMO, "--data.data_dir", str(shipped.data), "--output_dir", str(out), "--num_samples", "3",
            *STEPS, *QUIET, "--ckpt_path", str(ckpt), *extra]  # fmt: skip


def _images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.glob("sample_*.png"))}


def test_predict_with_a_weights_file_and_a_config_of_another_architecture(shipped, tmp_path, capsys):
    """demo.yaml's own U-Net is larger than the tiny one: the architecture comes from the file."""
    run_cli(predict(shipped, shipped.weights, tmp_path / "file"), tmp_path)
    assert "Loaded model weights from the checkpoint" not in capsys.readouterr().err  # Lightning never torch.loads it
    run_cli(predict(shipped, shipped.ckpt, tmp_path / "ckpt"), tmp_path)
    by_file, by_ckpt = _images(tmp_path / "file"), _images(tmp_path / "ckpt")
    assert len(by_file) == 3 and by_file.keys() == by_ckpt.keys()
    for name in by_file:  # the checkpoint's EMA weights in fp16: the same images up to rounding
        assert np.abs(by_file[name] - by_ckpt[name]).max() <= 3 and np.abs(by_file[name] - by_ckpt[name]).mean() < 0.1


def test_evaluate_takes_weights_files_for_the_model_and_the_judge(shipped, tmp_path):
    out = tmp_path / "eval"
    run_cli(["evaluate", "--config", DEMO, "--data.data_dir", str(shipped.data), "--output_dir", str(out), *STEPS,
             "--ckpt_path", str(shipped.weights), "--classifier_ckpt", str(shipped.judge), "--num_samples", "8"], tmp_path)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 8 and metrics["frechet_distance"] >= 0


def test_fit_refuses_a_weights_file_as_ckpt_path(shipped, tmp_path, capsys):
    args = ["fit", "--config", DEMO, "--data.data_dir", str(shipped.data), "--ckpt_path", str(shipped.weights),
            "--run_dir", str(tmp_path / "run"), *QUIET]  # fmt: skip
    line = one_line_exit_2(args, tmp_path, capsys)
    assert f"--ckpt_path {shipped.weights} is a weights file" in line and f"--model.init_weights {shipped.weights}" in line
    assert not (tmp_path / "run").exists()


class RecordStart(L.Callback):
    """The U-Nets' weights when the first training step begins (read by the test below)."""

    seen: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        RecordStart.seen = {name: {k: v.clone() for k, v in getattr(module, name).state_dict().items()}
                            for name in ("unet", "ema_unet")}  # fmt: skip


def test_init_weights_starts_a_fine_tuning_fit_from_the_file(shipped, tmp_path, capsys):
    run = tmp_path / "finetune"
    run_cli(["fit", "--config", DEMO, "--data.data_dir", str(shipped.data), "--run_dir", str(run), "--trainer.max_steps", "1",
             "--trainer.callbacks", "[]", "--trainer.callbacks+=tests.cli.test_weights_cli.RecordStart", "--data.batch_size", "16", *QUIET,
             *TINY_MODEL_ARGS, "--model.init_weights", str(shipped.weights)], tmp_path)  # fmt: skip
    assert f"fit starts from {shipped.weights} (ema weights of step 1)" in capsys.readouterr().err
    _, _, state = load_weights(shipped.weights)
    for name in ("unet", "ema_unet"):
        seen = RecordStart.seen[name]
        assert seen.keys() == state.keys() and all(torch.equal(seen[k], state[k]) for k in state), name
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_init_weights_of_another_architecture_is_one_line(shipped, tmp_path, capsys):
    content = shipped.weights.read_bytes()
    args = ["fit", "--config", DEMO, "--data.data_dir", str(shipped.data), "--run_dir", str(tmp_path / "run"), *QUIET,
            *TINY_MODEL_ARGS, "--model.base_channels", "16", "--model.num_res_blocks", "2",
            "--model.init_weights", str(shipped.weights)]  # fmt: skip
    line = one_line_exit_2(args, tmp_path, capsys)
    assert f"--model.init_weights {shipped.weights} does not fit the config" in line
    assert "base_channels: config 16, file 8; num_res_blocks: config 2, file 1" in line
    assert not (tmp_path / "run").exists() and shipped.weights.read_bytes() == content


def _bad(kind: str, shipped, tmp: Path) -> Path:
    path = tmp / "bad.safetensors"
    if kind == "not-safetensors":
        path.write_text("these are not weights")
    elif kind == "truncated":
        path.write_bytes(shipped.weights.read_bytes()[:-512])
    elif kind == "not-celldiff":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(4)}, str(path), metadata={"format": "pt"})
    return path


BAD = {"not-safetensors": "not a safetensors file", "truncated": "truncated", "not-celldiff": "not a celldiff weights file",
       "missing": "no such weights file"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("where", ["predict", "evaluate-judge", "init_weights"])
def test_a_bad_weights_file_is_one_line_naming_it(shipped, tmp_path, capsys, kind, where):
    bad = _bad(kind, shipped, tmp_path)
    content = bad.read_bytes() if bad.exists() else None
    out = tmp_path / "out"
    if where == "predict":
        args, option = predict(shipped, bad, out), "--ckpt_path"
    elif where == "evaluate-judge":
        args = ["evaluate", "--config", DEMO, "--data.data_dir", str(shipped.data), "--output_dir", str(out), *STEPS,
                "--ckpt_path", str(shipped.weights), "--classifier_ckpt", str(bad), "--num_samples", "8"]  # fmt: skip
        option = "--classifier_ckpt"
    else:
        args = ["fit", "--config", DEMO, "--data.data_dir", str(shipped.data), "--run_dir", str(out), *QUIET,
                *TINY_MODEL_ARGS, "--model.init_weights", str(bad)]  # fmt: skip
        option = "--model.init_weights"
    line = one_line_exit_2(args, tmp_path, capsys)
    assert f"{option} {bad}" in line and BAD[kind] in line, line
    assert (bad.read_bytes() if bad.exists() else None) == content
    assert not out.exists() or not any(out.iterdir())


def test_export_refuses_to_overwrite_other_weights(shipped, tmp_path, capsys):
    target = tmp_path / "w.safetensors"
    shutil.copy(shipped.judge, target)
    content = target.read_bytes()
    export = ["export", "--ckpt_path", str(shipped.ckpt), "--output", str(target)]
    line = one_line_exit_2(export, tmp_path, capsys)
    assert f"--output {target} exists and holds other weights; give --overwrite" in line
    assert target.read_bytes() == content
    main([*export, "--overwrite", "--meta", "license=CC-BY-4.0"])
    meta = read_weights_metadata(target)
    assert meta["class_path"].endswith("DiffusionModule") and meta["license"] == "CC-BY-4.0"
    main([*export, "--meta", "license=CC-BY-4.0"])  # the same weights and metadata again: nothing to do, no error
    assert "already holds these ema weights" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (lambda s, t: ["--ckpt_path", str(t / "none.ckpt"), "--output", str(t / "o.safetensors")], "none.ckpt: no such checkpoint file"),
        (lambda s, t: ["--ckpt_path", str(s.weights), "--output", str(t / "o.safetensors")], "is a weights file already"),
        (lambda s, t: ["--ckpt_path", str(s.ckpt), "--output", str(t / "o.pt")], "name the weights file NAME.safetensors"),
        (lambda s, t: ["--ckpt_path", str(s.ckpt)], "the following arguments are required: --output"),
        (lambda s, t: ["--ckpt_path", str(s.ckpt), "--output", str(t / "o.safetensors"), "--meta", "x"], "--meta x: expected KEY=VALUE"),
    ],
    ids=["missing", "already-weights", "suffix", "no-output", "bad-meta"],
)  # fmt: skip
def test_export_bad_input_is_one_line(shipped, tmp_path, capsys, args, expected):
    line = one_line_exit_2(["export", *args(shipped, tmp_path)], tmp_path, capsys)
    assert expected in line
    assert not (tmp_path / "o.safetensors").exists()


def test_app_is_dispatched_lazily(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "celldiff.app", None)  # as if the app (or its extra) were not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["app", "--port", "7860"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("celldiff: error:")]
    assert len(lines) == 1 and lines[0].startswith("celldiff: error: celldiff app needs the app extra: pip install 'celldiff[app]'")
    calls = []
    monkeypatch.setitem(sys.modules, "celldiff.app", types.SimpleNamespace(main=lambda args: calls.append(args) or 0))
    main(["app", "--port", "7860"])
    assert calls == [["--port", "7860"]]


def test_help_lists_export_and_app(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,predict,evaluate}" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()]
    assert "export" in listed and "app" in listed
