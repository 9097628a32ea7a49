"""Bad input, signals and crashes on the command line: one clear line, a non-zero exit, nothing lost (issue 13)."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from celldiff.cli.checkpoints import AtomicCheckpointIO, AtomicModelCheckpoint, CheckpointReadError, atomic_torch_save
from tests.cli.helpers import _plain_argv, run_cli  # noqa: F401 (an autouse fixture)
from tests.conftest import REPO, SAMPLE, SMALL_SAMPLE_PER_CLASS, TINY_MODEL_ARGS

DEMO = str(REPO / "configs" / "demo.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def tiny_fit(data: Path, *extra: str) -> list[str]:
    return ["fit", "--config", DEMO, "--data.data_dir", str(data), "--data.batch_size", "16", "--trainer.callbacks", "[]",
            *QUIET, *TINY_MODEL_ARGS, *extra]  # fmt: skip


def tiny_predict(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--config", DEMO, "--data.data_dir", str(data), "--ckpt_path", str(ckpt), "--output_dir", str(out),
            "--num_samples", "6", "--data.batch_size", "2", "--model.sampler", "ddim", "--model.sampling_steps", "2",
            *QUIET, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (1 epoch, 3 steps) shared by the tests of this module; tests copy what they change."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "pbc_small"
    for class_dir in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (data / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.glob("*.jpg"))[:SMALL_SAMPLE_PER_CLASS]:
            shutil.copy(f, data / class_dir.name / f.name)
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's function-scoped isolation is not active yet
        mp.setenv("CELLDIFF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "celldiff-cache"))
        mp.setenv("CELLDIFF_RUN_DIR", "")
        run_cli(tiny_fit(data, "--run_dir", str(root / "run"), "--trainer.max_epochs", "1"), root)
    return SimpleNamespace(data=data, run=root / "run", ckpt=root / "run" / "checkpoints" / "last.ckpt")


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("celldiff: error:")]


# ---------------------------------------------------------------------------------------------- bad values
def _yaml_with_syntax_error(tmp: Path) -> str:
    path = tmp / "broken.yaml"
    path.write_text("trainer:\n  max_epochs: 3\n  callbacks: [a, b\nmodel:\n  init_args: {}\n")
    return str(path)


def _a_file(tmp: Path) -> str:
    (tmp / "notes.txt").write_text("not a directory")
    return str(tmp / "notes.txt")


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
BAD_INPUTS = [
    # args builder (tmp path -> args), what the one line must contain
    pytest.param(lambda t: ["predict", "--config", DEMO, "--ckpt_path", "CKPT", "--output_dir", _a_file(t)], "is a file", id="output-dir-is-a-file"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--run_dir", _a_file(t)], "--run_dir", id="run-dir-is-a-file"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--run_dir", _a_file(t) + "/run"], "cannot be created", id="run-dir-under-a-file"),
    pytest.param(lambda t: ["validate", "--config", DEMO, "--run_dir", _a_file(t)], "is a file", id="validate-run-dir-is-a-file"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--trainer.default_root_dir", _a_file(t)], "default_root_dir", id="root-dir-is-a-file"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--seed", "-1"], "4294967295", id="negative-seed"),
    pytest.param(lambda t: ["predict", "--config", DEMO, "--ckpt_path", "CKPT", "--seed", str(2**32)], "4294967295", id="seed-too-large"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--seed_everything", str(2**32)], "--seed_everything", id="seed-everything-too-large"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--trainer.accelerator", "gpu"], "no usable GPU", id="gpu-without-gpu", marks=NO_GPU),
    pytest.param(lambda t: ["test", "--config", DEMO, "--trainer.accelerator", "cuda"], "no usable GPU", id="cuda-without-gpu", marks=NO_GPU),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--trainer.devices", "0"], "--trainer.devices 0", id="zero-devices"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--trainer.devices", "-2"], "--trainer.devices -2", id="devices-minus-two"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--trainer.precision", "17"], "bf16-mixed", id="unknown-precision"),
    pytest.param(lambda t: ["predict", "--config", DEMO, "--ckpt_path", "CKPT", "--trainer.precision", "16-wrong"], "16-mixed", id="unknown-precision-predict"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--model.lr", "0"], "model.lr must be > 0", id="zero-lr"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--model.lr", "-1e-4"], "model.lr must be > 0", id="negative-lr"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--model.warmup_steps", "-1"], "model.warmup_steps", id="negative-warmup"),
    pytest.param(lambda t: ["predict", "--config", DEMO, "--ckpt_path", "CKPT", "--model.sampling_steps", "0"], "model.sampling_steps", id="zero-sampling-steps"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--trainer.max_steps", "-5"], "max_steps", id="negative-max-steps"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches", id="zero-accumulation"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--checkpoint.every_n_train_steps", "-1"], "every_n_train_steps", id="negative-checkpoint-interval"),
    pytest.param(lambda t: ["predict", "--config", DEMO, "--ckpt_path", "CKPT", "--num_samples", "0"], "--num_samples", id="zero-samples"),
    pytest.param(lambda t: ["predict", "--config", DEMO, "--ckpt_path", "CKPT", "--samples_per_image", "0"], "--samples_per_image must be at least 1", id="zero-samples-per-image"),
    pytest.param(lambda t: ["predict", "--config", DEMO, "--ckpt_path", "CKPT", "--samples_per_image", "2"], "generates from noise", id="samples-per-image-from-noise"),
    pytest.param(lambda t: ["evaluate", "--config", DEMO, "--ckpt_path", "CKPT", "--samples_per_image", "2"], "takes no --samples_per_image", id="samples-per-image-evaluate"),
    pytest.param(lambda t: ["fit", "--config", DEMO, "--trainer.enable_checkpointing", "false"], "save_top_k 0", id="no-checkpointing"),
    pytest.param(lambda t: ["fit", "--config", _yaml_with_syntax_error(t)], "broken.yaml: YAML syntax error at line 4", id="yaml-syntax-error"),
    pytest.param(lambda t: ["fitt", "--config", DEMO], "evaluate", id="typo-in-command"),
    pytest.param(lambda t: [], "evaluate", id="no-command"),
]


@pytest.mark.parametrize("make_args, expected", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(make_args, expected, trained, tmp_path, capsys):
    args = [str(trained.ckpt) if a == "CKPT" else a for a in make_args(tmp_path)]  # predict needs a checkpoint
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*args, "--data.data_dir", str(SAMPLE)] if args else args, tmp_path)
    assert exit_info.value.code == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and expected in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created (no run directory, no runs/)


def test_run_dir_with_a_config_but_no_checkpoint_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("precious: true\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", DEMO, "--data.data_dir", str(SAMPLE), "--run_dir", str(run_dir)], tmp_path)
    assert exit_info.value.code == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "saved no last.ckpt" in lines[0] and "nothing to resume" in lines[0]
    assert (run_dir / "config.yaml").read_text() == "precious: true\n"


# ---------------------------------------------------------------------------------------------- predict's grid
def test_prediction_nrow_sets_the_columns_of_grid_png(trained, tmp_path):
    out = tmp_path / "out"
    run_cli(tiny_predict(trained.data, trained.ckpt, out, "--prediction.nrow", "3"), tmp_path)
    grid = np.asarray(Image.open(out / "grid.png"))
    tile = 16 + 2  # image + padding
    assert grid.shape[:2] == (2 * tile + 2, 3 * tile + 2)  # 6 images in rows of 3 (default: about sqrt(6) = 3 x 3)


# ---------------------------------------------------------------------------------------------- default_root_dir
def test_default_root_dir_is_where_run_directories_go(trained, tmp_path):
    root = tmp_path / "experiments"
    run_cli(tiny_fit(trained.data, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2"), tmp_path)
    runs = list((root / "demo").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file() and (runs[0] / "config.yaml").is_file()
    assert not (tmp_path / "runs").exists()
    # --ckpt_path last finds the newest run under the same root.
    run_cli(tiny_fit(trained.data, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "3", "--ckpt_path", "last"),
            tmp_path)  # fmt: skip
    assert list((root / "demo").iterdir()) == runs
    assert torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


# ---------------------------------------------------------------------------------------------- checkpoints
def _full_disk_halfway(monkeypatch) -> None:
    """torch.save into a real file writes half the bytes, then fails as a full disk does."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):  # an in-memory buffer cannot fill the disk
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
        else:
            Path(f).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", save)


def test_a_crash_mid_write_keeps_the_last_checkpoint_and_no_temp_file(trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    last = run / "checkpoints" / "last.ckpt"
    before, files = last.read_bytes(), sorted(os.listdir(last.parent))
    _full_disk_halfway(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_fit(trained.data, "--run_dir", str(run), "--ckpt_path", "last", "--trainer.max_epochs", "2"), tmp_path)
    monkeypatch.undo()
    assert exit_info.value.code == 1
    assert last.read_bytes() == before  # the good checkpoint, untouched
    assert sorted(os.listdir(last.parent)) == files  # no temporary file left behind
    assert torch.load(last, weights_only=False)["global_step"] == 3
    err = capsys.readouterr().err
    assert "could not write" in err and "simulated" in err and "Traceback" not in err


def test_atomic_save_and_link_keep_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)
    good = target.read_bytes()
    _full_disk_halfway(monkeypatch)
    with pytest.raises(OSError):
        atomic_torch_save({"step": 2}, target)
    monkeypatch.undo()
    assert target.read_bytes() == good and os.listdir(tmp_path) == ["last.ckpt"]

    # save_last="link": Lightning removes last.ckpt first, then links or copies; a failed copy lost it.
    other = tmp_path / "epoch0001.ckpt"
    atomic_torch_save({"step": 3}, other)
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *a: None))

    def no_symlink(*args):
        raise OSError("no symlinks here")

    def copy_fails(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(os, "symlink", no_symlink)
    monkeypatch.setattr(shutil, "copyfile", copy_fails)
    with pytest.raises(OSError):
        AtomicModelCheckpoint._link_checkpoint(trainer, str(other), str(target))
    monkeypatch.undo()
    assert target.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["epoch0001.ckpt", "last.ckpt"]
    AtomicModelCheckpoint._link_checkpoint(trainer, str(other), str(target))
    assert target.is_symlink() and torch.load(target)["step"] == 3
    assert AtomicModelCheckpoint().state_key.startswith("ModelCheckpoint{")  # old runs' callback state still loads


def test_resuming_from_a_truncated_checkpoint_is_one_line(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    for ckpt in ("last", str(last)):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(tiny_fit(trained.data, "--run_dir", str(run), "--ckpt_path", ckpt), tmp_path)
        assert exit_info.value.code == 2
        lines = error_lines(capsys)
        assert len(lines) == 1 and "last.ckpt" in lines[0] and "readable" in lines[0], lines
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(last)


# ---------------------------------------------------------------------------------------------- signals
class SignalAt(L.Callback):
    """Sends this process a signal after optimizer step ``step`` (fit) or predict batch ``batch``."""

    def __init__(self, signame: str = "SIGINT", step: int = -1, batch: int = -1) -> None:
        self.signame, self.step, self.batch = signame, step, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signame))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            os.kill(os.getpid(), getattr(signal, self.signame))


def signal_at(signame: str, **at: int) -> list[str]:
    args = ["--trainer.callbacks+=tests.cli.test_cli_errors.SignalAt", "--trainer.callbacks.signame", signame]
    for key, value in at.items():
        args += [f"--trainer.callbacks.{key}", str(value)]
    return args


def test_ctrl_c_during_fit_saves_the_step_and_says_how_to_resume(trained, tmp_path, capsys):
    run = tmp_path / "run"
    extra = ["--run_dir", str(run), "--trainer.max_epochs", "-1", "--trainer.max_steps", "9", "--checkpoint.every_n_epochs",
             "null", "--checkpoint.every_n_train_steps", "100"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_fit(trained.data, *extra, *signal_at("SIGINT", step=4)), tmp_path)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Ctrl-C: saved" in err and f"--ckpt_path last --run_dir {run}" in err and "holds step 4" in err
    at_stop = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert at_stop["global_step"] == 4 and int(at_stop["state_dict"]["ema_updates"]) == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_predict_stops_it_and_says_what_was_written(trained, tmp_path, capsys, signame, code):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_predict(trained.data, trained.ckpt, out, *signal_at(signame, batch=0)), tmp_path)
    assert exit_info.value.code == code
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_00000.png", "sample_00001.png"]  # batch 0 only
    assert not (out / "grid.png").exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"celldiff: stopped by {'Ctrl-C' if signame == 'SIGINT' else 'SIGTERM'}") and "wrote 2" in last
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_failed_predict_can_be_retried_with_the_same_output_dir(trained, tmp_path, monkeypatch):
    from celldiff.training.module import DiffusionModule

    def boom(self, *args, **kwargs):
        raise RuntimeError("predict failed (simulated)")

    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        monkeypatch.setattr(DiffusionModule, "predict_step", boom)
        with pytest.raises(RuntimeError, match="simulated"):
            run_cli(tiny_predict(trained.data, trained.ckpt, out), tmp_path)
        monkeypatch.undo()
        assert (out.is_dir() and not os.listdir(out)) if out.name == "empty" else not out.exists()
        run_cli(tiny_predict(trained.data, trained.ckpt, out), tmp_path)  # the retry works
        assert len(list(out.glob("sample_*.png"))) == 6 and (out / "config.yaml").is_file()


STOPPED_OUTSIDE_A_LOOP = """
import os, signal, sys, time
from celldiff.cli.main import CellDiffCLI, main
from celldiff.data.datamodule import CellDataModule

def arrives(*args, **kwargs):  # a long step outside Lightning's loops: the signal arrives
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(30)
    raise AssertionError("not stopped")

if sys.argv[2] == "evaluate":  # generating and measuring
    CellDiffCLI._run_subcommand = arrives
else:  # building the image cache before training
    CellDataModule.prepare_data = arrives
main(sys.argv[2:])
"""


@pytest.mark.parametrize(
    "command, signame, code, expected",
    [("evaluate", "SIGTERM", 143, "nothing was written to"), ("evaluate", "SIGINT", 130, "nothing was written to"),
     ("fit", "SIGTERM", 143, "no checkpoint had been saved yet")],
)  # fmt: skip
def test_a_signal_outside_lightnings_loops_stops_with_one_line(trained, tmp_path, command, signame, code, expected):
    import subprocess
    import sys

    args = ["--config", DEMO, "--data.data_dir", str(trained.data), *QUIET]
    if command == "evaluate":
        args = ["evaluate", *args, "--ckpt_path", str(trained.ckpt), "--classifier_ckpt", str(trained.ckpt),
                "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    else:
        args = ["fit", *args, "--run_dir", str(tmp_path / "run")]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", STOPPED_OUTSIDE_A_LOOP, signame, *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"celldiff: stopped by {'Ctrl-C' if signame == 'SIGINT' else 'SIGTERM'}") and expected in last


def test_a_ddp_child_rank_does_not_repeat_the_error_line(tmp_path, capsys, monkeypatch):
    """Every rank meets the same bad input; only the process the user started prints it (one line, not W)."""
    args = ["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.data_dir", str(tmp_path / "missing")]
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            run_cli([*args, "--run_dir", str(tmp_path / f"run{rank}")], tmp_path)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.count("celldiff: error:") == lines
