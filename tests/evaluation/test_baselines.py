"""Non-learned inpainting fills: known pixels untouched, holes filled sensibly (moved from tests/test_baselines.py)."""

from __future__ import annotations

import pytest
import torch

from celldiff.evaluation.baselines import BASELINES, FillBaseline, blur_fill, mean_fill


def _square_mask(size: int = 16) -> torch.Tensor:
    mask = torch.zeros(2, 1, size, size)
    mask[:, :, 5:11, 4:12] = 1
    return mask


@pytest.mark.parametrize("fill", [mean_fill, blur_fill])
def test_fill_keeps_known_pixels_and_fills_the_hole(fill):
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = _square_mask()
    out = fill(image, mask)
    assert torch.equal(out * (1 - mask), image * (1 - mask))
    assert torch.isfinite(out).all() and out.abs().max() <= 1


def test_constant_image_is_filled_with_its_colour():
    image = torch.full((2, 3, 16, 16), 0.3)
    for fill in BASELINES.values():
        assert torch.allclose(fill(image, _square_mask()), image, atol=1e-5)


def test_blur_fill_follows_a_gradient_where_mean_fill_cannot():
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(2, 3, 16, 16).contiguous()
    mask = _square_mask()
    err = {name: ((fill(ramp, mask) - ramp) ** 2 * mask).sum() / mask.sum() for name, fill in BASELINES.items()}
    assert err["blur_fill"] < 0.25 * err["mean_fill"]


def test_fill_baseline_acts_as_a_model():
    model = FillBaseline("mean_fill", 16).to("cpu").eval()
    image, mask = torch.rand(2, 3, 16, 16), _square_mask()
    out = model.generate([0, 1], condition=model.network_condition({"image": image, "mask": mask}))
    assert out.shape == image.shape and model.hparams.inpainting
    with pytest.raises(KeyError, match="eval_masks"):
        model.network_condition({"image": image})
    with pytest.raises(ValueError, match="blur_fill"):
        FillBaseline("nope", 16)
