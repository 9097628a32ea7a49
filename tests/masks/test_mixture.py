"""The mixture (celldiff.masks.mixture): the one registry of families and MaskSampler."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from celldiff.masks.mixture import DEFAULT_MASK_WEIGHTS, FAMILIES, MASK_TYPES, Family, MaskSampler, mask_families
from celldiff.masks.nucleus import nucleus_mask
from celldiff.masks.shapes import check_mask
from tests.masks.helpers import SIZE, assert_valid_mask, missing_fraction, seeded


def test_sampler_draws_types_in_proportion() -> None:
    weights = {"box": 1, "brush": 2, "centre": 0.5, "half": 0.5, "outpaint": 1, "nucleus": 3}
    sampler = MaskSampler(weights)
    names = sampler.choose(seeded(0), 8000)
    total = sum(weights.values())
    for name, weight in weights.items():
        assert names.count(name) / len(names) == pytest.approx(weight / total, abs=0.02)


def test_sampler_call_fires_the_drawn_generator(cells) -> None:
    sampler = MaskSampler(DEFAULT_MASK_WEIGHTS, options={"box": {"num_boxes": (2, 2)}})
    image = cells["lymphocyte"][0]
    fired = []
    for seed in range(60):
        mask = sampler(image, seeded(seed))
        assert_valid_mask(mask)
        # Same generator state: the type is drawn first, then that generator runs with the options.
        replay = seeded(seed)
        name = sampler.choose(replay)
        fired.append(name)
        assert torch.equal(mask, sampler.make(name, image, replay))
    assert set(fired) == {name for name, weight in DEFAULT_MASK_WEIGHTS.items() if weight > 0}


def test_sampler_batch(cells) -> None:
    images = torch.cat([cells["neutrophil"][:4], cells["monocyte"][:4]])
    sampler = MaskSampler()
    masks = sampler.batch(images, seeded(1))
    assert masks.shape == (8, 1, SIZE, SIZE) and masks.dtype == torch.float32
    check_mask(masks, images)
    # One type per image, all drawn first; then the nucleus items in one pass, the others in order.
    replay = seeded(1)
    names = sampler.choose(replay, 8)
    assert len(names) == 8
    rows = [i for i, name in enumerate(names) if name == "nucleus"]
    expected = torch.empty_like(masks)
    if rows:
        expected[rows] = nucleus_mask(images[rows], replay)
    for i, name in enumerate(names):
        if name != "nucleus":
            expected[i] = sampler.make(name, images[i], replay)
    assert torch.equal(masks, expected)
    assert torch.equal(masks, sampler.batch(images, seeded(1)))
    # A nucleus-only sampler is a one-flag experiment and gives the plain nucleus masks.
    only_nucleus = MaskSampler.from_spec("nucleus")
    assert torch.equal(only_nucleus.batch(images, seeded(0)), nucleus_mask(images))
    assert torch.equal(only_nucleus(images[0], seeded(0)), nucleus_mask(images[0]))


def test_per_item_masks_are_one_call_per_item(cells) -> None:
    images = torch.cat([cells["platelet"][:3], cells["lymphocyte"][:3]])
    blank = torch.full((3, SIZE, SIZE), 0.9)  # no stain: the nucleus fallback draws from the item's generator
    images = torch.cat([images, blank[None]])
    sampler = MaskSampler({"nucleus": 3, "box": 1, "brush": 1})
    masks = sampler.per_item(images, [seeded(10 + i) for i in range(len(images))])
    for i, image in enumerate(images):
        assert torch.equal(masks[i], sampler(image, seeded(10 + i))), i


def test_sampler_from_spec_forms() -> None:
    assert MaskSampler.from_spec("nucleus").probabilities == {"nucleus": 1.0}
    assert MaskSampler.from_spec("box, brush").probabilities == {"box": 0.5, "brush": 0.5}
    assert MaskSampler.from_spec(["half", "outpaint"]).probabilities == {"half": 0.5, "outpaint": 0.5}
    mixed = MaskSampler.from_spec({"box": 1, "brush": 2, "centre": 0})
    assert mixed.names == ("box", "brush") and mixed.probabilities["brush"] == pytest.approx(2 / 3)
    boxes = MaskSampler.from_spec("box", options={"box": {"num_boxes": (1, 1), "box_size": (0.5, 0.5)}})
    assert missing_fraction(boxes(torch.zeros(3, SIZE, SIZE), seeded(0))) == 0.25
    assert MaskSampler().names == tuple(name for name, weight in DEFAULT_MASK_WEIGHTS.items() if weight > 0)


def test_sampler_rejects_bad_configs() -> None:
    with pytest.raises(ValueError, match="valid mask types are") as error:
        MaskSampler({"box": 1, "circle": 1})
    assert all(name in str(error.value) for name in MASK_TYPES)
    with pytest.raises(ValueError, match="valid mask types"):
        MaskSampler.from_spec("center")
    with pytest.raises(ValueError, match="unknown option"):
        MaskSampler({"box": 1}, options={"box": {"num_box": (1, 2)}})
    with pytest.raises(ValueError, match="not all zero"):
        MaskSampler({"box": 0})
    with pytest.raises(ValueError, match=">= 0"):
        MaskSampler({"box": -1, "brush": 2})
    with pytest.raises(ValueError, match="square"):
        MaskSampler()(torch.zeros(3, 32, 48), seeded(0))


# --------------------------------------------------------------------------- the registry
def test_every_list_of_mask_names_is_the_registry() -> None:
    assert MASK_TYPES == tuple(FAMILIES) and tuple(DEFAULT_MASK_WEIGHTS) == MASK_TYPES
    assert MaskSampler().names == tuple(name for name in MASK_TYPES if name != "full")  # full: off by default
    assert mask_families({"nucleus": 1, "half": 0, "box": 2}) == ["box", "nucleus"]  # registry order
    assert mask_families("outpaint,centre") == ["centre", "outpaint"]
    with pytest.raises(ValueError, match="valid mask types"):
        mask_families("circle")


def ring_mask(size: int, generator: torch.Generator, width: Sequence[float] = (0.1, 0.2)) -> torch.Tensor:
    """A border ring of random width: a family added in a test."""
    band = max(1, round(float(torch.empty(1).uniform_(*width, generator=generator)) * size))
    mask = torch.ones(1, size, size)
    mask[:, band : size - band, band : size - band] = 0
    return mask


def test_a_new_family_is_its_function_and_one_registry_line(monkeypatch) -> None:
    monkeypatch.setitem(FAMILIES, "ring", Family(ring_mask, 0.5))
    sampler = MaskSampler.from_spec("ring,box", options={"ring": {"width": (0.25, 0.25)}})
    sampler.check()
    mask = sampler.make("ring", torch.zeros(3, SIZE, SIZE), seeded(0))
    assert missing_fraction(mask) == 1 - (SIZE / 2) ** 2 / SIZE**2
    assert mask_families({"ring": 1, "nucleus": 1}) == ["nucleus", "ring"]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['radius'\] for mask type 'ring'"):
        MaskSampler({"ring": 1}, options={"ring": {"radius": 3}})


def test_check_catches_a_family_that_breaks_the_conventions(monkeypatch) -> None:
    monkeypatch.setitem(FAMILIES, "bytes", Family(lambda size, generator: torch.ones(1, size, size, dtype=torch.uint8)))
    monkeypatch.setitem(FAMILIES, "flat", Family(lambda size, generator: torch.ones(size, size)))
    monkeypatch.setitem(FAMILIES, "soft", Family(lambda size, generator: torch.full((1, size, size), 0.5)))
    for name, message in (("bytes", "float32"), ("flat", "shape"), ("soft", "exactly 0.0 or 1.0")):
        with pytest.raises(ValueError, match=message):
            MaskSampler.from_spec(name).check()
    MaskSampler().check()  # every registered family follows them, with its default options


def test_the_full_family_masks_every_pixel_and_is_off_by_default() -> None:
    assert DEFAULT_MASK_WEIGHTS["full"] == 0.0 and "full" not in MaskSampler().names
    sampler = MaskSampler({"full": 1.0, "box": 1.0})
    masks = [sampler(torch.zeros(3, SIZE, SIZE), seeded(seed)) for seed in range(40)]
    full = [mask for mask in masks if bool(mask.all())]
    assert 10 <= len(full) <= 30  # about half of the draws
    assert all(mask.dtype == torch.float32 and mask.shape == (1, SIZE, SIZE) for mask in full)
