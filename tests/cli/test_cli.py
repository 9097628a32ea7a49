"""The ``celldiff`` command line: configs parse, fit → predict round trip, resume, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from jsonargparse import Namespace
from PIL import Image

from celldiff.cli import main
from celldiff.cli.main import _set_predict_counts
from celldiff.errors import UsageError
from tests.cli.helpers import _plain_argv, fit_args, run_cli, run_subprocess  # noqa: F401 (an autouse fixture)
from tests.conftest import REPO, SMALL_SAMPLE_SPLIT, TINY_MODEL_ARGS

CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))  # configs/results/ too


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_print_config_for_every_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("celldiff.")
    # image_size, num_classes and class_names come from the data module (linked), not the config.
    assert "image_size" not in printed["model"]["init_args"]
    assert printed["data"]["image_size"] in (16, 32, 64)


def test_fit_then_predict_round_trip(small_sample, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(fit_args(small_sample, run_dir), tmp_path)
    # Everything of the run is in its directory.
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "metrics.csv").is_file()
    split = yaml.safe_load((run_dir / "split.json").read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == SMALL_SAMPLE_SPLIT
    grids = sorted((run_dir / "samples").glob("epoch*.png"))
    assert len(grids) == 2
    metrics = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in metrics and "val/loss" in metrics and "val/loss_t0000-0012" in metrics

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert any(k.startswith("ema_unet.") for k in ckpt["state_dict"])

    out = tmp_path / "samples"
    predict = ["predict", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path",
               str(run_dir / "checkpoints" / "last.ckpt"), "--output_dir", str(out), "--num_samples", "5",
               "--seed", "3", "--model.sampler", "ddim", "--model.sampling_steps", "4",
               "--trainer.enable_progress_bar", "false", "--data.data_dir", str(small_sample)]  # fmt: skip
    run_cli(predict, tmp_path)
    files = sorted(out.glob("sample_*.png"))
    assert [f.name for f in files] == [f"sample_{i:05d}.png" for i in range(5)]
    assert (out / "grid.png").is_file()
    first = np.asarray(Image.open(files[0]))
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8

    # Same seed, other batch size: the same images.
    out2 = tmp_path / "samples2"
    predict2 = [a if a != str(out) else str(out2) for a in predict] + ["--data.batch_size", "2"]
    run_cli(predict2, tmp_path)
    for i in range(5):
        a = np.asarray(Image.open(out / f"sample_{i:05d}.png"))
        b = np.asarray(Image.open(out2 / f"sample_{i:05d}.png"))
        assert np.array_equal(a, b)

    # The output directory is never overwritten.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict, tmp_path)
    assert exit_info.value.code == 2


def test_resume_last_continues_the_run(small_sample, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(fit_args(small_sample, run_dir), tmp_path)
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    run_cli(fit_args(small_sample, run_dir, "--ckpt_path", "last", "--trainer.max_epochs", "3"), tmp_path)
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert second["epoch"] == first["epoch"] + 1
    assert second["global_step"] > first["global_step"]
    assert int(second["state_dict"]["ema_updates"]) > int(first["state_dict"]["ema_updates"])
    # The original config is kept; the resumed one is saved beside it.
    assert (run_dir / "config.yaml").is_file()
    assert len(list(run_dir.glob("config.resumed-*.yaml"))) == 1


def test_the_runs_split_json_is_authoritative_for_later_commands(small_sample, tmp_path, capsys):
    """Resume and test of a run reuse its split.json; a file it lists that is gone is an error, never a re-split."""
    run_dir = tmp_path / "run"
    run_cli(fit_args(small_sample, run_dir, "--trainer.max_epochs", "1"), tmp_path)
    split = yaml.safe_load((run_dir / "split.json").read_text())
    # Another split seed on the resume: the run's split still holds (it would otherwise move ~30 % of the cells).
    run_cli(fit_args(small_sample, run_dir, "--ckpt_path", "last", "--data.split_seed", "7"), tmp_path)
    assert "using the run's split" in capsys.readouterr().err
    assert yaml.safe_load((run_dir / "split.json").read_text()) == split
    (small_sample / split["test"][0]).unlink()  # a test cell removed from the data
    test = ["test", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
            "--data.data_dir", str(small_sample), "--trainer.enable_progress_bar", "false", *TINY_MODEL_ARGS[-2:]]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(test, tmp_path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"split file {run_dir / 'split.json'} lists 1 file(s) not among" in err and split["test"][0] in err


def test_resume_in_a_moved_run_dir_overwrites_last_ckpt(small_sample, tmp_path):
    """A run directory moved (or renamed) between legs: the resumed leg still writes last.ckpt, not last-v1.ckpt."""
    run_cli(fit_args(small_sample, tmp_path / "first", "--trainer.max_epochs", "1"), tmp_path)
    moved = tmp_path / "moved"
    (tmp_path / "first").rename(moved)
    first = torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    run_cli(fit_args(small_sample, moved, "--ckpt_path", "last"), tmp_path)
    second = torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert second["global_step"] > first["global_step"]
    assert not list((moved / "checkpoints").glob("last-v*.ckpt"))


def test_existing_run_dir_is_not_overwritten(small_sample, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("precious: true\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(small_sample, run_dir), tmp_path)
    assert exit_info.value.code == 2
    assert (run_dir / "config.yaml").read_text() == "precious: true\n"


def test_bf16_mixed_on_cpu(small_sample, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(fit_args(small_sample, run_dir, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1"), tmp_path)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "make_dir, expected",
    [
        (lambda tmp: tmp / "does-not-exist", "does not exist"),
        (lambda tmp: tmp, "class"),
    ],
    ids=["missing", "no-class-folders"],
)
def test_bad_data_dir_is_one_clear_line(tmp_path, make_dir, expected):
    data_dir = make_dir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a dataset")
    result = run_subprocess(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.data_dir", str(data_dir),
                             "--run_dir", str(tmp_path / "run")], tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("celldiff: error:")]
    assert len(error_lines) == 1 and str(data_dir) in error_lines[0] and expected in error_lines[0].lower()


def test_wrong_key_gets_a_clear_message(tmp_path):
    result = run_subprocess(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--model.base_chanels", "8"], tmp_path)
    assert result.returncode != 0
    assert "base_chanels" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_subcommands(tmp_path):
    result = run_subprocess(["--help"], tmp_path, timeout=120)
    assert result.returncode == 0
    for sub in ("fit", "validate", "test", "predict", "evaluate"):
        assert sub in result.stdout
    assert "{fit,validate,test,predict,evaluate}" in result.stdout


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(small_sample, tmp_path):
    """Two gloo processes; no --run_dir, so both must agree on the default one."""
    args = fit_args(small_sample, tmp_path / "unused", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--trainer.max_epochs", "1")  # fmt: skip
    args = [a for a in args if a not in ("--run_dir", str(tmp_path / "unused"))]
    result = run_subprocess(args, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "runs" / "demo").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "split.json").is_file()
    assert len(list((run_dir / "samples").glob("epoch*.png"))) == 1


def test_wandb_without_api_key_goes_offline_with_one_warning(small_sample, tmp_path):
    run_dir = tmp_path / "run"
    env_home = tmp_path / "home"
    env_home.mkdir()
    args = fit_args(small_sample, run_dir, "--trainer.logger", "WandbLogger", "--trainer.max_epochs", "1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(env_home), PYTHONWARNINGS="default")
    result = subprocess.run([sys.executable, "-m", "celldiff.cli", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("W&B runs offline") == 1
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert offline_runs[0].name.endswith(run_id)


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


class StopAfterEpochs(L.Callback):
    """Stops a run at the end of epoch ``n`` (what a pre-empted job looks like to the resume)."""

    def __init__(self, n: int = 1) -> None:
        self.n = n

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.n:
            trainer.should_stop = True


def test_resume_is_exact_at_epoch_boundaries(small_sample, tmp_path):
    """Stopped after 1 epoch and resumed == 2 epochs straight: weights, EMA, optimizer, loss curve."""
    extra = ["--data.masks", "box,brush", "--trainer.callbacks", "[]", "--trainer.log_every_n_steps", "1",
             "--checkpoint.every_n_epochs", "1"]  # fmt: skip
    straight = tmp_path / "straight"
    run_cli(fit_args(small_sample, straight, *extra), tmp_path)
    split = tmp_path / "resumed"
    run_cli(fit_args(small_sample, split, *extra, "--trainer.callbacks+=tests.cli.test_cli.StopAfterEpochs"), tmp_path)
    assert _weights(split / "checkpoints" / "last.ckpt")["global_step"] == 3
    run_cli(fit_args(small_sample, split, *extra, "--ckpt_path", "last"), tmp_path)
    a, b = _weights(straight / "checkpoints" / "last.ckpt"), _weights(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for k in opt_a:
        torch.testing.assert_close(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"], rtol=0, atol=0)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]

    def losses(run: Path) -> dict[int, str]:
        rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
        col = rows[0].index("train/loss")
        return {int(r[1]): r[col] for r in rows[1:] if r[col]}

    # The resumed run appends to the same metrics.csv: every step once, no gap, no repeat.
    assert losses(split) == losses(straight)
    assert sorted(losses(split)) == list(range(6))


class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM after optimizer step ``step`` (mid-epoch with 3 batches per epoch)."""

    def __init__(self, step: int = 4) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resumes_without_gap_or_repeat(small_sample, tmp_path):
    run_dir = tmp_path / "run"
    extra = ["--trainer.max_epochs", "-1", "--trainer.max_steps", "9", "--trainer.log_every_n_steps", "1",
             "--trainer.callbacks", "[]", "--checkpoint.every_n_epochs", "null", "--checkpoint.every_n_train_steps", "100"]  # fmt: skip
    killed = run_subprocess(fit_args(small_sample, run_dir, *extra, "--trainer.callbacks+=tests.cli.test_cli.SigtermAtStep"), tmp_path)
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert "saved" in killed.stderr and "--ckpt_path last" in killed.stderr and "Traceback" not in killed.stderr
    at_kill = _weights(run_dir / "checkpoints" / "last.ckpt")  # no periodic checkpoint before step 100
    assert at_kill["global_step"] == 4 and int(at_kill["state_dict"]["ema_updates"]) == 4
    assert at_kill["epoch"] == 1  # mid-epoch: 3 batches per epoch

    resumed = run_subprocess(fit_args(small_sample, run_dir, *extra, "--ckpt_path", "last"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    end = _weights(run_dir / "checkpoints" / "last.ckpt")
    assert end["global_step"] == 9 and int(end["state_dict"]["ema_updates"]) == 9
    assert all(int(state["step"]) == 9 for state in end["optimizer_states"][0]["state"].values())
    assert end["lr_schedulers"][0]["last_epoch"] == 9
    rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("train/loss")
    steps = [int(r[1]) for r in rows[1:] if r[col]]
    assert steps == list(range(9))  # every step once: no gap, no repeat


def test_a_crash_while_saving_keeps_the_last_checkpoint(small_sample, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_cli(fit_args(small_sample, run_dir, "--trainer.max_epochs", "1"), tmp_path)
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(small_sample, run_dir, "--ckpt_path", "last"), tmp_path)
    assert exit_info.value.code == 1  # one line, no traceback: "could not write ... (disk full); the previous file ... is intact"
    err = capsys.readouterr().err
    assert "could not write" in err and "simulated" in err and "intact" in err and "Traceback" not in err
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before  # intact, still loadable
    monkeypatch.undo()
    assert _weights(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3


def _predict_config(num_samples=None, samples_per_image=None, **data) -> Namespace:
    data = {"predict_images": None, "predict_source": "noise", "masks": None, "eval_masks": None, "num_predict_samples": 16,
            **data}  # fmt: skip
    return Namespace(num_samples=num_samples, samples_per_image=samples_per_image, data=Namespace(**data),
                     model=Namespace(init_args=Namespace(samples_per_image=1)))  # fmt: skip


def test_num_samples_counts_images_from_noise_and_samples_per_image_counts_per_masked_image(capsys):
    cfg = _predict_config(num_samples=5)
    _set_predict_counts(cfg)
    assert (cfg.data.num_predict_samples, cfg.model.init_args.samples_per_image) == (5, 1)
    cfg = _predict_config(samples_per_image=3, predict_source="test", masks="box")
    _set_predict_counts(cfg)
    assert (cfg.data.num_predict_samples, cfg.model.init_args.samples_per_image) == (16, 3)
    assert "deprecated" not in capsys.readouterr().err
    # The old spelling keeps working for inpainting, with a note.
    cfg = _predict_config(num_samples=2, predict_images="imgs")
    _set_predict_counts(cfg)
    assert (cfg.data.num_predict_samples, cfg.model.init_args.samples_per_image) == (16, 2)
    assert "--num_samples with inpainting is deprecated: use --samples_per_image 2" in capsys.readouterr().err
    with pytest.raises(UsageError, match="give only --samples_per_image"):
        _set_predict_counts(_predict_config(num_samples=2, samples_per_image=2, predict_images="imgs"))
    with pytest.raises(UsageError, match="generates from noise"):
        _set_predict_counts(_predict_config(samples_per_image=2, masks="box"))  # masks, but predict_source noise


def test_help_says_what_num_samples_and_samples_per_image_count(tmp_path):
    result = run_subprocess(["predict", "--help"], tmp_path, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--num_samples NUM_SAMPLES predict from noise: images to generate" in text
    assert "--samples_per_image SAMPLES_PER_IMAGE predict with masks" in text
    assert "--prediction.nrow" in text and "--prediction.max_grid_panels" in text
