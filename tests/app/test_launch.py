"""``celldiff app`` before the server starts: the model file, its errors, the command line (no gradio needed)."""

from __future__ import annotations

import pytest

import celldiff.app.model as app_model
from celldiff.app import main
from celldiff.app.model import ModelLoadError, load_model, resolve_weights_path
from celldiff.training.weights import export_weights
from tests.app.helpers import tiny_checkpoint


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("celldiff: error: "), err
    return lines[0]


def test_an_unreadable_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00not a checkpoint" * 10)
    assert main(["--ckpt_path", str(broken)]) == 2
    assert str(broken) in _one_error_line(capsys)
    half = tmp_path / "half.safetensors"
    half.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["--ckpt_path", str(half)]) == 2
    assert str(half) in _one_error_line(capsys)


def test_a_missing_file_and_a_missing_shipped_model(tmp_path, capsys, monkeypatch):
    assert main(["--ckpt_path", str(tmp_path / "nothing.ckpt")]) == 2
    assert "nothing.ckpt: no such file" in _one_error_line(capsys)
    assert main(["--ckpt_path", str(tmp_path)]) == 2
    assert "is a folder" in _one_error_line(capsys)
    monkeypatch.setattr(app_model, "DEFAULT_WEIGHTS", tmp_path / "weights" / "celldiff64.safetensors")
    assert main([]) == 2
    assert "no --ckpt_path given and the shipped model" in _one_error_line(capsys)


def test_the_default_is_the_shipped_weights_file(tmp_path, monkeypatch):
    shipped = tmp_path / "celldiff64.safetensors"
    shipped.write_bytes(b"")
    monkeypatch.setattr(app_model, "DEFAULT_WEIGHTS", shipped)
    assert resolve_weights_path(None) == shipped
    assert app_model.DEFAULT_WEIGHTS.name == "celldiff64.safetensors"


def test_bad_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "many"])
    assert exit_info.value.code == 2
    assert "argument --port: invalid int value" in _one_error_line(capsys)
    assert main(["--port", "70000"]) == 2
    assert "--port 70000" in _one_error_line(capsys)


def test_a_weights_file_and_a_checkpoint_load_alike(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    weights = tmp_path / "tiny.safetensors"
    export_weights(ckpt, weights)
    from_ckpt, from_file = load_model(ckpt), load_model(weights)
    for served in (from_ckpt, from_file):
        assert served.inpainting and served.class_conditional and served.image_size == 16
        assert not served.module.training and served.default_sampler == "dpmsolver" and served.default_steps("dpmsolver") == 20
    assert from_file.describe().startswith("tiny.safetensors: 16 px, inpainting, 8 classes, ")


def test_a_device_that_is_not_there(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    with pytest.raises(ModelLoadError, match="--device tpu"):
        load_model(ckpt, "tpu")
