"""Inpainting masks (celldiff.masks): generators, the nucleus mask on real cells, the mixture, the condition."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from celldiff.masks import (
    DEFAULT_MASK_WEIGHTS,
    MASK_TYPES,
    MaskSampler,
    _draw_segments,
    box_mask,
    brush_mask,
    centre_mask,
    check_mask,
    half_mask,
    hematoxylin_score,
    inpainting_condition,
    mask_coverage,
    masked_image,
    nucleus_mask,
    outpaint_mask,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "pbc_sample"
SIZE = 64
RANDOM_GENERATORS = {
    "box": box_mask,
    "brush": brush_mask,
    "centre": centre_mask,
    "half": half_mask,
    "outpaint": outpaint_mask,
}
NUCLEATED = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil")
IMAGES_PER_CLASS = 6


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_valid_mask(mask: torch.Tensor, size: int = SIZE) -> None:
    assert mask.shape == (1, size, size) and mask.dtype == torch.float32
    assert ((mask == 0) | (mask == 1)).all()
    assert 0 < mask.sum() < mask.numel(), "mask must be neither empty nor full"


def load_cell(path: Path, size: int = SIZE) -> torch.Tensor:
    """Centre-crop to the shorter side, bicubic resize, to (3, size, size) in [-1, 1]."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture(scope="module")
def cells() -> dict[str, torch.Tensor]:
    """The first few images of each class, (N, 3, 64, 64)."""
    return {
        name: torch.stack([load_cell(p) for p in sorted((SAMPLE / name).glob("*.jpg"))[:IMAGES_PER_CLASS]])
        for name in (*NUCLEATED, "platelet")
    }


def luminance(images: torch.Tensor) -> torch.Tensor:
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None]


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
        coverage = mask_coverage(box_mask(SIZE, seeded(seed)))
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
    assert mask_coverage(centre_mask(SIZE, None, fraction=(0.5, 0.5))) == 0.25


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
        assert mask_coverage(mask) == 0.5
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
        assert mask_coverage(mask) == pytest.approx(1 - ((SIZE - 2 * band) / SIZE) ** 2, abs=1e-7)
        assert round(0.1 * SIZE) <= band <= round(0.25 * SIZE)


def test_brush_coverage() -> None:
    thinnest_disk = math.pi * (0.04 * SIZE / 2) ** 2 / SIZE**2
    coverages = [mask_coverage(brush_mask(SIZE, seeded(seed))) for seed in range(30)]
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


# --------------------------------------------------------------------------- nucleus mask
def test_hematoxylin_score_reference_values() -> None:
    """An image made of c x the (unit) haematoxylin OD vector deconvolves to c; white to 0."""
    h_vector = torch.tensor([0.65, 0.70, 0.29])
    h_vector = h_vector / h_vector.norm()
    amounts = torch.tensor([0.0, 0.3, 0.8])
    intensity = (256 * 10 ** (-amounts[:, None] * h_vector) - 1) / 255  # inverts OD = -log10((255 I + 1) / 256)
    image = (2 * intensity - 1).T.reshape(3, 1, 3)
    assert torch.allclose(hematoxylin_score(image).flatten(), amounts, atol=1e-4)
    eosin = torch.tensor([0.07, 0.99, 0.11])
    pink = (2 * (256 * 10 ** (-0.5 * eosin / eosin.norm()) - 1) / 255 - 1).reshape(3, 1, 1)
    assert abs(hematoxylin_score(pink).item()) < 1e-4  # pure eosin: no haematoxylin


@pytest.mark.parametrize("name", NUCLEATED)
def test_nucleus_mask_lands_on_the_dark_nucleus(cells, name: str) -> None:
    images = cells[name]
    masks, found = nucleus_mask(images, return_found=True)
    assert masks.shape == (len(images), 1, SIZE, SIZE) and masks.dtype == torch.float32
    assert found.all(), f"no nucleus found in some {name} images"
    check_mask(masks, images)
    lum = luminance(images)
    # The 3-px ring just outside the mask: much lighter than the inside if the mask hugs the nucleus.
    # (A centre square, which is also darker inside than out, fails this: its ring cuts through the
    # nucleus or its inside holds pale cytoplasm and red cells.)
    rings = (F.max_pool2d(masks, 7, stride=1, padding=3) - masks).bool()
    for image_lum, mask, ring in zip(lum, masks.bool(), rings, strict=True):
        assert 0.02 <= mask.float().mean() <= 0.6  # small erythroblast nuclei cover ~2.5 % at 64 px
        inside, outside = image_lum[mask].mean(), image_lum[~mask].mean()
        assert inside < outside - 0.2, f"{name}: inside {inside:.2f} vs outside {outside:.2f}"
        assert image_lum[ring].mean() > inside + 0.35, f"{name}: ring {image_lum[ring].mean():.2f} vs {inside:.2f}"
    # The mask follows the nucleus: shifting the cell shifts its mask. (Without the centre rule, which
    # would let a neighbouring cell near the limit in or out.)
    shifted = nucleus_mask(images.roll((5, -6), dims=(-2, -1)), centre_distance=None)
    expected = nucleus_mask(images, centre_distance=None).roll((5, -6), dims=(-2, -1))
    overlap = (shifted * expected).flatten(1).sum(1) / torch.maximum(shifted, expected).flatten(1).sum(1)
    assert (overlap > 0.85).all(), f"{name}: IoU with the shifted mask {overlap.tolist()}"
    # Unbatched gives the same masks as batched.
    for image, mask in zip(images[:2], masks[:2], strict=True):
        single, single_found = nucleus_mask(image, return_found=True)
        assert single_found is True and torch.equal(single, mask)


@pytest.mark.parametrize("name", ["lymphocyte", "erythroblast"])
def test_round_nuclei_cover_the_darkest_pixels(cells, name: str) -> None:
    """The darkest 5 % of the cell's central 32 x 32 region lies in the mask (neighbouring cells at the
    border are left out on purpose, and a small erythroblast nucleus is under 5 % of the whole image)."""
    images = cells[name]
    masks = nucleus_mask(images).bool()[..., 16:48, 16:48]
    lum = luminance(images)[..., 16:48, 16:48]
    for image_lum, mask in zip(lum, masks, strict=True):
        darkest = image_lum <= image_lum.flatten().quantile(0.05)
        assert (darkest & mask).sum() >= 0.9 * darkest.sum()


def test_platelets_get_a_small_mask_or_the_fallback(cells) -> None:
    images = cells["platelet"]
    masks, found = nucleus_mask(images, return_found=True)
    lum = luminance(images)
    for image_lum, mask, hit in zip(lum, masks.bool(), found, strict=True):
        if hit:
            assert mask.float().mean() < 0.08
            assert image_lum[mask].mean() < image_lum[~mask].mean() - 0.1
        else:
            assert torch.equal(mask.float(), centre_mask(SIZE, None))


def test_nucleus_fallback_on_an_image_without_stain() -> None:
    blank = torch.full((3, SIZE, SIZE), 0.9)  # background only
    mask, found = nucleus_mask(blank, return_found=True)
    assert found is False and torch.equal(mask, centre_mask(SIZE, None))
    # With a generator the fallback square is drawn from fallback_fraction, reproducibly.
    first = nucleus_mask(blank, seeded(3), fallback_fraction=(0.1, 0.2))
    assert torch.equal(first, nucleus_mask(blank, seeded(3), fallback_fraction=(0.1, 0.2)))
    assert 0.005 <= mask_coverage(first) <= 0.05
    # A purple disk in the centre is found, and covered with the dilation margin.
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disk = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2) <= 8**2
    cell = blank.clone()
    cell[:, disk] = torch.tensor([-0.4, -0.6, 0.1])[:, None]  # dark purple-blue
    mask, found = nucleus_mask(cell, dilate=2, return_found=True)
    ring = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2) <= (8 + 2) ** 2  # disk + dilation
    assert found is True and mask[0][disk].all() and not mask[0][~ring].any()


def test_nucleus_mask_rejects_bad_images() -> None:
    with pytest.raises(ValueError, match="shape"):
        nucleus_mask(torch.zeros(1, SIZE, SIZE))
    with pytest.raises(ValueError, match="square"):
        nucleus_mask(torch.zeros(3, SIZE, SIZE + 2))


# --------------------------------------------------------------------------- the mixture
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
        fired.append(sampler.last_type)
        # Same generator state: the type is drawn first, then that generator runs with the options.
        replay = seeded(seed)
        name = sampler.choose(replay)
        assert name == sampler.last_type
        assert torch.equal(mask, sampler.make(name, image, replay))
    assert set(fired) == set(MASK_TYPES)


def test_sampler_batch(cells) -> None:
    images = torch.cat([cells["neutrophil"][:4], cells["monocyte"][:4]])
    sampler = MaskSampler()
    masks = sampler.batch(images, seeded(1))
    assert masks.shape == (8, 1, SIZE, SIZE) and masks.dtype == torch.float32
    check_mask(masks, images)
    assert len(sampler.last_types) == 8
    assert torch.equal(masks, sampler.batch(images, seeded(1)))
    # A nucleus-only sampler is a one-flag experiment and gives the plain nucleus masks.
    only_nucleus = MaskSampler.from_spec("nucleus")
    assert torch.equal(only_nucleus.batch(images, seeded(0)), nucleus_mask(images))
    assert torch.equal(only_nucleus(images[0], seeded(0)), nucleus_mask(images[0]))


def test_sampler_from_spec_forms() -> None:
    assert MaskSampler.from_spec("nucleus").probabilities == {"nucleus": 1.0}
    assert MaskSampler.from_spec("box, brush").probabilities == {"box": 0.5, "brush": 0.5}
    assert MaskSampler.from_spec(["half", "outpaint"]).probabilities == {"half": 0.5, "outpaint": 0.5}
    mixed = MaskSampler.from_spec({"box": 1, "brush": 2, "centre": 0})
    assert mixed.names == ("box", "brush") and mixed.probabilities["brush"] == pytest.approx(2 / 3)
    boxes = MaskSampler.from_spec("box", options={"box": {"num_boxes": (1, 1), "box_size": (0.5, 0.5)}})
    assert mask_coverage(boxes(torch.zeros(3, SIZE, SIZE), seeded(0))) == 0.25
    assert MaskSampler().names == tuple(DEFAULT_MASK_WEIGHTS)


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


# --------------------------------------------------------------------------- the condition
def test_inpainting_condition_layout() -> None:
    image = torch.rand(2, 3, SIZE, SIZE, generator=seeded(0)) * 2 - 1
    mask = torch.stack([box_mask(SIZE, seeded(1)), brush_mask(SIZE, seeded(2))])
    condition = inpainting_condition(image, mask)
    assert condition.shape == (2, 4, SIZE, SIZE) and condition.dtype == image.dtype
    assert torch.equal(condition[:, :3], image * (1 - mask))
    assert torch.equal(condition[:, :3], masked_image(image, mask))
    assert (condition[:, :3][mask.expand(-1, 3, -1, -1) == 1] == 0).all()  # nothing leaks from the missing part
    assert torch.equal(condition[:, :3][mask.expand(-1, 3, -1, -1) == 0], image[mask.expand(-1, 3, -1, -1) == 0])
    assert torch.equal(condition[:, 3:], mask)
    # Unbatched, and in the image's (mixed-precision) dtype.
    assert torch.equal(inpainting_condition(image[0], mask[0]), condition[0])
    assert inpainting_condition(image.bfloat16(), mask).dtype == torch.bfloat16


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
        inpainting_condition(image, torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="floating point"):
        inpainting_condition(image, good.bool())
    # bf16-true / 16-true precision casts floating batch tensors: 0 and 1 stay exact, so it is accepted.
    assert torch.equal(inpainting_condition(image, good.bfloat16()), inpainting_condition(image, good))


def test_mask_coverage() -> None:
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1
    assert mask_coverage(mask) == 0.25
    assert mask_coverage(mask[0]) == 0.5
