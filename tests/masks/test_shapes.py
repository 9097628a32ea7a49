"""Mask shapes (celldiff.masks.shapes): box, brush, centre, half, outpaint; the conventions and the masked image."""

from __future__ import annotations

import math

import pytest
import torch

from celldiff.masks.shapes import (
    _draw_segments,
    box_mask,
    brush_mask,
    centre_mask,
    check_mask,
    half_mask,
    masked_image,
    outpaint_mask,
)
from tests.masks.helpers import SIZE, assert_valid_mask, missing_fraction, seeded

RANDOM_GENERATORS = {
    "box": box_mask,
    "brush": brush_mask,
    "centre": centre_mask,
    "half": half_mask,
    "outpaint": outpaint_mask,
}


# --------------------------------------------------------------------------- every random generator
@pytest.mark.parametrize("name", sorted(RANDOM_GENERATORS))
def test_generator_shape_dtype_binary(name: str) -> None:
    for seed in range(20):
        assert_valid_mask(RANDOM_GENERATORS[name](SIZE, seeded(seed)))
    assert_valid_mask(RANDOM_GENERATORS[name](37, seeded(0)), size=37)  # odd sizes work too


@pytest.mark.parametrize("name", sorted(RANDOM_GENERATORS))
def test_generator_deterministic_given_seed(name: str) -> None:
    generate = RANDOM_GENERATORS[name]
    for seed in range(3):
        assert torch.equal(generate(SIZE, seeded(seed)), generate(SIZE, seeded(seed)))
    distinct = {tuple(generate(SIZE, seeded(seed)).flatten().tolist()) for seed in range(12)}
    assert len(distinct) >= (4 if name in ("half", "centre") else 8)
    # The generator is advanced: consecutive draws from one generator differ (except by chance for "half").
    if name != "half":
        generator = seeded(0)
        assert not torch.equal(generate(SIZE, generator), generate(SIZE, generator))


def test_generators_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    for generate in RANDOM_GENERATORS.values():
        generate(SIZE, seeded(0))
    assert torch.equal(torch.random.get_rng_state(), state)


# --------------------------------------------------------------------------- one by one
def test_box_coverage_and_shape() -> None:
    smallest = round(0.1 * SIZE) ** 2 / SIZE**2
    largest = round(0.4 * SIZE) ** 2 / SIZE**2
    for seed in range(30):
        coverage = missing_fraction(box_mask(SIZE, seeded(seed)))
        assert smallest <= coverage <= 3 * largest
    # One box: the mask is exactly the rectangle spanned by its missing pixels.
    for seed in range(10):
        mask = box_mask(SIZE, seeded(seed), num_boxes=(1, 1), box_size=(0.2, 0.3))[0]
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert mask.sum() == height * width and mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        assert round(0.2 * SIZE) <= min(height, width) and max(height, width) <= round(0.3 * SIZE)


def test_centre_is_exactly_a_centred_square() -> None:
    for seed in range(20):
        mask = centre_mask(SIZE, seeded(seed))[0]
        margin = int(mask[SIZE // 2].nonzero()[0])
        side = SIZE - 2 * margin
        expected = torch.zeros(SIZE, SIZE)
        expected[margin : SIZE - margin, margin : SIZE - margin] = 1
        assert torch.equal(mask, expected)
        assert 0.25 * SIZE - 2 <= side <= 0.5 * SIZE + 2
    # Without a generator: the middle of the range.
    assert missing_fraction(centre_mask(SIZE, None, fraction=(0.5, 0.5))) == 0.25


def test_half_is_exactly_one_half() -> None:
    halves = {
        "left": (slice(None), slice(0, SIZE // 2)),
        "right": (slice(None), slice(SIZE // 2, None)),
        "top": (slice(0, SIZE // 2), slice(None)),
        "bottom": (slice(SIZE // 2, None), slice(None)),
    }
    seen = set()
    for seed in range(20):
        mask = half_mask(SIZE, seeded(seed))[0]
        assert missing_fraction(mask) == 0.5
        side = next(name for name, index in halves.items() if mask[index].all())
        seen.add(side)
    assert seen == set(halves)
    for seed in range(5):
        assert half_mask(SIZE, seeded(seed), sides=("top",))[0][halves["top"]].all()


def test_outpaint_band_coverage_formula() -> None:
    for seed in range(20):
        mask = outpaint_mask(SIZE, seeded(seed))[0]
        band = int((mask[SIZE // 2] == 0).nonzero()[0])  # known centre starts after the band
        expected = torch.ones(SIZE, SIZE)
        expected[band : SIZE - band, band : SIZE - band] = 0
        assert torch.equal(mask, expected)
        assert missing_fraction(mask) == pytest.approx(1 - ((SIZE - 2 * band) / SIZE) ** 2, abs=1e-7)
        assert round(0.1 * SIZE) <= band <= round(0.25 * SIZE)


def test_brush_coverage() -> None:
    thinnest_disk = math.pi * (0.04 * SIZE / 2) ** 2 / SIZE**2
    coverages = [missing_fraction(brush_mask(SIZE, seeded(seed))) for seed in range(30)]
    assert min(coverages) >= thinnest_disk and max(coverages) < 0.9
    assert 0.03 < sum(coverages) / len(coverages) < 0.5


def test_brush_segment_is_a_round_capsule() -> None:
    """Pixels within the radius of the segment are set (up to 4 % of it), farther ones are not."""
    y0, x0, y1, x1, radius = 10.3, 5.7, 40.2, 50.9, 3.4
    drawn = _draw_segments(SIZE, [(y0, x0, y1, x1, radius)])
    ys, xs = torch.meshgrid(torch.arange(float(SIZE)), torch.arange(float(SIZE)), indexing="ij")
    direction = torch.tensor([y1 - y0, x1 - x0])
    t = (((ys - y0) * direction[0] + (xs - x0) * direction[1]) / direction.square().sum()).clamp(0, 1)
    distance = ((ys - y0 - t * direction[0]) ** 2 + (xs - x0 - t * direction[1]) ** 2).sqrt()
    assert drawn[distance <= 0.96 * radius].all()
    assert not drawn[distance > radius + 1e-6].any()


@pytest.mark.parametrize(
    ("generate", "kwargs"),
    [
        (box_mask, {"box_size": (0.5, 0.2)}),
        (box_mask, {"num_boxes": (0, 2)}),
        (brush_mask, {"width": (0.1, 1.5)}),
        (centre_mask, {"fraction": (0.3,)}),
        (half_mask, {"sides": ("middle",)}),
        (outpaint_mask, {"band": (0.1, 0.6)}),
    ],
)
def test_invalid_ranges_raise(generate, kwargs) -> None:
    with pytest.raises(ValueError):
        generate(SIZE, seeded(0), **kwargs)


# --------------------------------------------------------------------------- the conventions and the masked image
def test_masked_image_layout() -> None:
    """The known part the inpainting model sees (its mask channel: tests/diffusion/test_denoiser.py)."""
    image = torch.rand(2, 3, SIZE, SIZE, generator=seeded(0)) * 2 - 1
    mask = torch.stack([box_mask(SIZE, seeded(1)), brush_mask(SIZE, seeded(2))])
    known = masked_image(image, mask)
    assert known.shape == (2, 3, SIZE, SIZE) and known.dtype == image.dtype
    assert torch.equal(known, image * (1 - mask))
    assert (known[mask.expand(-1, 3, -1, -1) == 1] == 0).all()  # nothing leaks from the missing part
    assert torch.equal(known[mask.expand(-1, 3, -1, -1) == 0], image[mask.expand(-1, 3, -1, -1) == 0])
    # Unbatched, and in the image's (mixed-precision) dtype.
    assert torch.equal(masked_image(image[0], mask[0]), known[0])
    assert masked_image(image.bfloat16(), mask).dtype == torch.bfloat16


def test_check_mask_errors() -> None:
    image = torch.zeros(2, 3, SIZE, SIZE)
    good = torch.zeros(2, 1, SIZE, SIZE)
    check_mask(good, image)
    check_mask(good[0], image[0])
    cases = [
        (good.double(), image, "float32"),
        (good.bool(), image, "float32"),
        (torch.zeros(2, 3, SIZE, SIZE), image, "shape"),
        (torch.zeros(SIZE, SIZE), None, "shape"),
        (torch.zeros(2, 1, SIZE, 32), image, "does not match"),
        (torch.zeros(3, 1, SIZE, SIZE), image, "does not match"),
        (good[0], image, "batched"),
        (torch.full((1, SIZE, SIZE), 0.5), None, "exactly 0.0 or 1.0"),
        (torch.full((1, SIZE, SIZE), float("nan")), None, "exactly 0.0 or 1.0"),
    ]
    for mask, against, message in cases:
        with pytest.raises(ValueError, match=message):
            check_mask(mask, against)
    with pytest.raises(ValueError, match="does not match"):
        masked_image(image, torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="floating point"):
        masked_image(image, good.bool())
    # bf16-true / 16-true precision casts floating batch tensors: 0 and 1 stay exact, so it is accepted.
    assert torch.equal(masked_image(image, good.bfloat16()), masked_image(image, good))
