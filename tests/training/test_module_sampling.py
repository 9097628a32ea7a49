"""DiffusionModule.generate and the CLI with each sampler: reproducible per seed, guidance, inpainting, v-models."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from celldiff.training.module import DiffusionModule
from tests.training.helpers import TINY

NAMES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def _tiny_module(**overrides):
    torch.manual_seed(0)
    module = DiffusionModule(**{**TINY, **overrides})
    with torch.no_grad():  # move away from the zero-initialised output so images depend on the network
        for p in module.ema_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_module_generates_with_dpmsolver(prediction_type: str) -> None:
    module = _tiny_module(prediction_type=prediction_type, sampler="dpmsolver")  # sampling_steps None: 20
    calls: list[dict] = []
    a = module.generate([11, 12, 13], callback=calls.append)
    b = module.generate([13, 99])
    assert len(calls) == 20 and calls[0]["t"] == 99 and calls[-1]["t"] == 0
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a[2], b[0])  # the image of seed 13, whatever its batch
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(a, module.generate([11, 12, 13], sampler="ddim", steps=20))


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_module_dpmsolver_recovers_a_point_mass_through_the_denoiser(prediction_type: str) -> None:
    # An oracle network for data = the constant image c, in the module's own output parameterisation:
    # the model_fn must hand the sampler the right eps for eps- and v-models alike.
    module = _tiny_module(prediction_type=prediction_type, num_timesteps=1000)
    c = 0.37
    alpha_bar = module.schedule.alpha_bar

    class Oracle(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            ab = alpha_bar[t].view(-1, 1, 1, 1)
            eps = (x.double() - ab.sqrt() * c) / (1 - ab).sqrt()
            out = eps if prediction_type == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * c
            return out.float()

    module.ema_unet = Oracle()
    out = module.generate([1, 2], sampler="dpmsolver", steps=20)
    assert (out - c).abs().max() < 1e-3


def test_module_dpmsolver_guidance_and_inpainting() -> None:
    module = _tiny_module(class_conditional=True, num_classes=8, class_names=NAMES)
    labels, seeds = torch.tensor([1, 7]), [5, 6]

    def gen(condition: dict, scale: float) -> Tensor:
        return module.generate(seeds, condition, sampler="dpmsolver", steps=8, guidance_scale=scale)

    null = gen({"class_labels": torch.full_like(labels, 8)}, 1.0)
    assert torch.equal(gen({"class_labels": labels}, 0.0), null)  # guidance closed over in model_fn
    cond, strong = gen({"class_labels": labels}, 1.0), gen({"class_labels": labels}, 3.0)
    assert not torch.allclose(cond, null) and not torch.allclose(strong, cond)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    known = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    inpainted = gen({"class_labels": labels, "known": known, "mask": mask}, 2.0)
    keep = mask.expand(-1, 3, -1, -1) == 0
    assert torch.equal(inpainted[keep], known[keep])


def test_module_rejects_unknown_sampler() -> None:
    with pytest.raises(ValueError, match="dpmsolver"):
        _tiny_module(sampler="euler")
    with pytest.raises(ValueError, match="dpmsolver"):
        _tiny_module().generate([0], sampler="euler")


def test_cli_fit_predict_evaluate_with_dpmsolver(small_sample, tmp_path, monkeypatch) -> None:
    """`celldiff predict ... --model.sampler dpmsolver --model.sampling_steps 20` on a tiny model; the
    SampleGrid callback with `sampler: dpmsolver`; `celldiff evaluate` with the model's dpmsolver."""
    import json
    import sys

    import numpy as np
    from PIL import Image

    from tests.cli.helpers import fit_args, run_cli
    from tests.conftest import REPO, TINY_MODEL_ARGS
    from tests.evaluation.test_evaluate_cli import TINY_CLASSIFIER

    monkeypatch.setattr(sys, "argv", ["celldiff"])
    run_dir = tmp_path / "run"
    run_cli([*fit_args(small_sample, run_dir), "--trainer.max_epochs", "1", "--trainer.callbacks.sampler", "dpmsolver"],
            tmp_path)  # fmt: skip
    assert len(list((run_dir / "samples").glob("epoch*.png"))) == 1
    ckpt = run_dir / "checkpoints" / "last.ckpt"

    def predict(out, *extra: str) -> None:
        run_cli(["predict", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(ckpt), "--output_dir",
                 str(out), "--num_samples", "3", "--seed", "3", "--model.sampler", "dpmsolver",
                 "--model.sampling_steps", "20", "--trainer.enable_progress_bar", "false", "--data.data_dir",
                 str(small_sample), *extra], tmp_path)  # fmt: skip

    predict(tmp_path / "a")
    predict(tmp_path / "b", "--data.batch_size", "2")
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "a" / f"sample_{i:05d}.png"))
        assert a.shape == (16, 16, 3)
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / f"sample_{i:05d}.png")))

    classifier = tmp_path / "cls"
    run_cli(["fit", "--config", str(REPO / "configs" / "demo_classifier.yaml"), "--data.data_dir", str(small_sample),
             "--run_dir", str(classifier), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
             *TINY_CLASSIFIER], tmp_path)  # fmt: skip
    out = tmp_path / "eval"
    run_cli(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(ckpt),
             "--classifier_ckpt", str(classifier / "checkpoints" / "last.ckpt"), "--output_dir", str(out),
             "--num_samples", "8", "--model.sampler", "dpmsolver", "--model.sampling_steps", "5",
             "--data.data_dir", str(small_sample), *TINY_MODEL_ARGS[-2:]], tmp_path)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sampler"] == "dpmsolver" and metrics["steps"] == 5 and metrics["num_samples"] == 8
