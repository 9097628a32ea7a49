"""Weights files (issue 16): export a checkpoint as fp16 safetensors, load it back, check it fits, refuse bad files."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from celldiff.evaluation.judge import CheckpointKindError, load_judge
from celldiff.nets.weightsfile import FORMAT_TAG, read_tensors
from celldiff.training.classifier import CellClassifier
from celldiff.training.weights import (
    WeightsFileError,
    check_fits,
    export_weights,
    load_diffusion_module,
    load_weights,
    mismatch_line,
    read_weights_metadata,
)
from tests.training.helpers import TINY, FixedImages, cpu_trainer, tiny_module

CLASSES = ["basophil", "eosinophil"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny DiffusionModule trained a few steps (its EMA lags the raw weights), saved as a Lightning checkpoint."""
    root = tmp_path_factory.mktemp("weights")
    module = tiny_module(lr=3e-3, warmup_steps=1, lr_schedule="constant", ema_decay=0.5, prediction_type="v",
                         num_classes=2, class_names=CLASSES, sampler="ddim", sampling_steps=3)  # fmt: skip
    trainer = cpu_trainer(max_steps=4)
    trainer.fit(module, datamodule=FixedImages(steps=4))
    trainer.save_checkpoint(root / "tiny.ckpt")
    return root / "tiny.ckpt"


def _ckpt_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_export_then_load_generates_what_the_checkpoint_generates(trained, tmp_path):
    out = tmp_path / "tiny.safetensors"
    export_weights(trained, out)
    from_ckpt, from_file = load_diffusion_module(trained), load_diffusion_module(out)
    assert not from_file.training and not from_ckpt.training
    state = _ckpt_state(trained)
    ema = {k.removeprefix("ema_unet."): v for k, v in state.items() if k.startswith("ema_unet.")}
    assert any(not torch.equal(v, state[f"unet.{k}"]) for k, v in ema.items())  # EMA and raw differ: the test means it
    for net in (from_file.ema_unet, from_file.unet):  # both hold the file's (EMA) weights
        for key, value in net.state_dict().items():
            assert torch.equal(value, ema[key].half().float()), key
    seeds = [0, 1, 2]
    reference = from_ckpt.generate(seeds)  # the checkpoint's EMA weights (use_ema)
    loaded = from_file.generate(seeds)
    assert reference.abs().max() > 0.05  # a trained network, not the zero-initialised output
    torch.testing.assert_close(loaded, reference, atol=5e-3, rtol=0)
    from_file.hparams.use_ema = False  # the raw U-Net holds the same weights
    assert torch.equal(from_file.generate(seeds), loaded)


def test_the_file_is_fp16_and_its_metadata_describes_the_model(trained, tmp_path):
    out = tmp_path / "tiny.safetensors"
    returned = export_weights(trained, out, extra_metadata={"license": "CC-BY-4.0"})
    meta = read_weights_metadata(out)
    assert meta["celldiff_format"] == FORMAT_TAG and meta["class_path"] == "celldiff.training.module.DiffusionModule"
    assert {k: v for k, v in returned.items() if k != "hparams"} == {k: v for k, v in meta.items() if k != "hparams"}
    assert json.loads(returned["hparams"]) == meta["hparams"]
    hparams = meta["hparams"]
    for key, value in {**TINY, "channel_mult": [1, 2], "attention_resolutions": [8]}.items():
        assert hparams[key] == value, key
    assert hparams["class_names"] == CLASSES and hparams["prediction_type"] == "v" and hparams["beta_schedule"] == "linear"
    assert hparams["sampler"] == "ddim" and hparams["sampling_steps"] == 3 and "init_weights" not in hparams
    assert meta["weights"] == "ema" and meta["dtype"] == "float16" and meta["global_step"] == "4"
    assert meta["source"] == "tiny.ckpt" and meta["license"] == "CC-BY-4.0"
    tensors = read_tensors(out)
    assert tensors and all(t.dtype == torch.float16 for t in tensors.values())
    export_weights(trained, tmp_path / "raw.safetensors", weights="raw")
    _, _, raw = load_weights(tmp_path / "raw.safetensors")
    state = _ckpt_state(trained)
    assert all(torch.equal(v, state[f"unet.{k}"].half().float()) for k, v in raw.items())


def test_export_never_overwrites_other_weights(trained, tmp_path):
    out = tmp_path / "tiny.safetensors"
    export_weights(trained, out)
    before, mtime = out.read_bytes(), out.stat().st_mtime_ns
    export_weights(trained, out)  # the same weights: nothing to do
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(WeightsFileError, match="exists and holds other weights; give --overwrite"):
        export_weights(trained, out, weights="raw")
    assert out.read_bytes() == before
    export_weights(trained, out, weights="raw", overwrite=True)
    assert read_weights_metadata(out)["weights"] == "raw"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]  # no temporary file left


def _good(trained: Path, tmp: Path) -> Path:
    export_weights(trained, tmp / "good.safetensors")
    return tmp / "good.safetensors"


BAD_FILES = {
    "not-safetensors": (lambda t, tmp: (tmp / "x.safetensors").write_text("not a weights file"), "not a safetensors file"),
    "truncated": (lambda t, tmp: (tmp / "x.safetensors").write_bytes(_good(t, tmp).read_bytes()[:-100]), "truncated"),
    "truncated-header": (lambda t, tmp: (tmp / "x.safetensors").write_bytes(_good(t, tmp).read_bytes()[:40]), "truncated"),
    "not-celldiff": (lambda t, tmp: save_file({"w": torch.zeros(3)}, str(tmp / "x.safetensors")), "not a celldiff weights file"),
    "a-checkpoint": (lambda t, tmp: (tmp / "x.safetensors").write_bytes(t.read_bytes()), "zip archive"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_one_line_naming_the_file_and_stay_untouched(trained, tmp_path, case):
    make, expected = BAD_FILES[case]
    make(trained, tmp_path)
    bad = tmp_path / "x.safetensors"
    content = bad.read_bytes()
    for read in (read_weights_metadata, load_weights, load_diffusion_module):
        with pytest.raises(WeightsFileError) as info:
            read(bad)
        message = str(info.value)
        assert str(bad) in message and expected in message and "\n" not in message, message
    with pytest.raises(CheckpointKindError, match=expected):
        load_judge(bad)
    assert bad.read_bytes() == content


def test_check_fits_names_the_architecture_keys_that_differ(trained, tmp_path):
    out = tmp_path / "tiny.safetensors"
    export_weights(trained, out)
    file_hparams = read_weights_metadata(out)["hparams"]
    config = {**TINY, "channel_mult": (1, 2), "attention_resolutions": (8,), "prediction_type": "v"}  # tuples = lists
    assert check_fits(file_hparams, config) == []
    config.update(base_channels=16, lr=1.0)  # lr is not architecture
    assert check_fits(file_hparams, config) == ["base_channels"]
    assert mismatch_line(["base_channels"], file_hparams, config) == "base_channels: config 16, file 8"
    assert "num_timesteps" in check_fits(file_hparams, {})  # left out of the config: the class default (1000)


class RecordStart(L.Callback):
    """What the networks held when the first training step began."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.unet = {k: v.clone() for k, v in module.unet.state_dict().items()}
        self.ema = {k: v.clone() for k, v in module.ema_unet.state_dict().items()}


def test_init_weights_starts_a_fit_from_the_file(trained, tmp_path):
    out = tmp_path / "tiny.safetensors"
    export_weights(trained, out)
    _, _, state = load_weights(out)
    module = tiny_module(init_weights=str(out), prediction_type="v", noise_seed=1)
    assert not all(torch.equal(v, state[k]) for k, v in module.unet.state_dict().items())  # built: its own init
    record = RecordStart()
    cpu_trainer(max_steps=1, callbacks=[record]).fit(module, datamodule=FixedImages(steps=1))
    for net in (record.unet, record.ema):
        assert net.keys() == state.keys() and all(torch.equal(net[k], state[k]) for k in state)
    wrong = tiny_module(init_weights=str(out), base_channels=16, prediction_type="v")
    with pytest.raises(WeightsFileError, match=r"does not fit the config \(base_channels: config 16, file 8\)"):
        cpu_trainer(max_steps=1).fit(wrong, datamodule=FixedImages(steps=1))


def test_a_run_in_legs_records_the_lineage_total_of_images_seen(trained, tmp_path):
    """Leg 2 starts from leg 1's weights file (--model.init_weights): its export adds leg 1's images to its own."""
    ckpt = torch.load(trained, map_location="cpu", weights_only=False)
    ckpt["datamodule_hyper_parameters"] = {"batch_size": 8}
    batches = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert batches == 4
    parent = None
    for leg in (1, 2, 3):
        ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "init_weights": str(parent) if parent else None}
        torch.save(ckpt, tmp_path / f"leg{leg}.ckpt")
        meta = export_weights(tmp_path / f"leg{leg}.ckpt", tmp_path / f"leg{leg}.safetensors")
        assert meta["images_seen"] == "32"  # this leg's own images
        if leg == 1:
            assert "images_seen_total" not in meta and "fine_tuned_from" not in meta
        else:
            assert meta["fine_tuned_from"] == f"leg{leg - 1}.safetensors"
            assert meta["images_seen_total"] == str(32 * leg)  # leg 3: leg 2's total (64) + 32, not 32 + 32
            assert read_weights_metadata(tmp_path / f"leg{leg}.safetensors")["images_seen_total"] == str(32 * leg)
        parent = tmp_path / f"leg{leg}.safetensors"
    (tmp_path / "leg2.safetensors").unlink()  # the parent is gone (another machine): no total, still exported
    meta = export_weights(tmp_path / "leg3.ckpt", tmp_path / "leg3b.safetensors")
    assert meta["fine_tuned_from"] == "leg2.safetensors" and "images_seen_total" not in meta


def test_a_classifier_ships_as_a_weights_file(tmp_path):
    torch.manual_seed(0)
    module = CellClassifier(image_size=16, num_classes=2, class_names=CLASSES, width=4, feature_dim=8)
    with torch.no_grad():  # BatchNorm statistics other than the defaults
        for name, buffer in module.net.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
    hparams = {"_class_path": "celldiff.training.classifier.CellClassifier", **module.hparams}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 7, "epoch": 1}, tmp_path / "c.ckpt")
    out = tmp_path / "judge.safetensors"
    meta = export_weights(tmp_path / "c.ckpt", out)
    assert meta["weights"] == "net" and meta["class_path"] == "celldiff.training.classifier.CellClassifier"
    judge_file, judge_ckpt = load_judge(out), load_judge(tmp_path / "c.ckpt")
    assert judge_file.hparams.class_names == CLASSES and judge_file.hparams.image_size == 16
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(judge_file.features(x), judge_ckpt.features(x), atol=2e-2, rtol=1e-2)
    fresh = CellClassifier(image_size=16, num_classes=2, class_names=CLASSES, width=4, feature_dim=8, init_weights=str(out))
    fresh.setup("fit")
    _, _, state = load_weights(out)
    assert all(torch.equal(v, state[k]) for k, v in fresh.net.state_dict().items())
    with pytest.raises(WeightsFileError, match="holds a cell classifier; expected a diffusion model"):
        load_diffusion_module(out)


def test_load_judge_refuses_a_diffusion_weights_file(trained, tmp_path):
    out = tmp_path / "tiny.safetensors"
    export_weights(trained, out)
    with pytest.raises(CheckpointKindError, match=r"is a diffusion model weights file; expected a cell classifier .*swapped\?"):
        load_judge(out)
