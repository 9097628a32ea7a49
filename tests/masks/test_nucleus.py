"""The nucleus mask (celldiff.masks.nucleus) on real cells and synthetic images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from celldiff.masks.nucleus import hematoxylin_score, nucleus_mask
from celldiff.masks.shapes import centre_mask, check_mask
from tests.masks.helpers import NUCLEATED, SIZE, luminance, missing_fraction, seeded


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
    assert 0.005 <= missing_fraction(first) <= 0.05
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
