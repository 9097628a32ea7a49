"""What the page hands the app: uploads, the editor's layers, presets, mask files (no browser, no gradio)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from celldiff.app.inputs import (
    EDITOR_SIDE,
    MAX_SIDE,
    PRESET_SIZE,
    AppInputError,
    check_missing,
    editor_value,
    frame_box,
    mask_from_editor,
    mask_from_file,
    masked_preview,
    painted,
    preset_mask,
    read_upload,
    sample_cells,
)
from celldiff.masks.shapes import centre_mask


def test_read_upload_gives_rgb_at_the_files_own_size(cell_path, tmp_path):
    image = read_upload(cell_path)
    assert image.shape == (363, 360, 3) and image.dtype == np.uint8
    rgba = tmp_path / "cell.png"
    Image.fromarray(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])).save(rgba)
    assert np.array_equal(read_upload(rgba), image)  # an opaque RGBA PNG is the same picture


def test_a_file_that_is_not_an_image_gets_a_message(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture")
    with pytest.raises(AppInputError, match="notes.png is not an image this app can read; upload a PNG or JPEG"):
        read_upload(fake)
    with pytest.raises(AppInputError, match="no image"):
        read_upload(None)


def test_images_over_4096_px_per_side_are_refused(tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (MAX_SIDE + 1, 8)).save(wide)
    with pytest.raises(AppInputError, match=r"wide.png is 4097 x 8 px; images up to 4096 px per side are accepted"):
        read_upload(wide)
    edge = tmp_path / "edge.png"
    Image.new("RGB", (MAX_SIDE, 4)).save(edge)
    assert read_upload(edge).shape == (4, MAX_SIDE, 3)


def test_the_painted_layers_alpha_is_the_mask():
    layer = np.zeros((5, 7, 4), np.uint8)
    layer[1:3, 2:5, 3] = 1  # the faintest paint counts
    layer[4, 6, :3] = 255  # colour without alpha is no paint
    missing = mask_from_editor({"background": np.zeros((5, 7, 3), np.uint8), "layers": [layer], "composite": None}, (7, 5))
    expected = np.zeros((5, 7), bool)
    expected[1:3, 2:5] = True
    assert np.array_equal(missing, expected)


def test_every_layer_counts_and_layers_of_other_sizes_cover_the_image():
    first, second = np.zeros((4, 4, 4), np.uint8), np.zeros((8, 8, 4), np.uint8)
    first[0, 0, 3] = 200
    second[6:, 6:, 3] = 255  # half resolution of the canvas: scaled with nearest neighbours
    value = {"background": np.zeros((4, 4, 3), np.uint8), "layers": [first, second], "composite": None}
    missing = mask_from_editor(value, (4, 4))
    assert missing.tolist() == [[True, False, False, False], [False] * 4, [False] * 4, [False, False, False, True]]


def test_the_image_is_framed_on_the_square_canvas_and_layers_map_back():
    assert EDITOR_SIDE == 720 and frame_box((100, 50)) == (0, 180, 720, 360) and frame_box((360, 363)) == (3, 0, 714, 720)
    image = np.full((50, 100, 3), 7, np.uint8)
    value = editor_value(image)
    background = value["background"]
    assert background.shape == (720, 720, 3) and (background[:180] == 255).all() and (background[180:540] == 7).all()
    layer = np.zeros((720, 720, 4), np.uint8)
    layer[:180, :, 3] = 255  # paint on the white frame around the image is no mask
    layer[180:216, 0:72, 3] = 255  # the image's top-left 10 x 5 pixels
    missing = mask_from_editor({**value, "layers": [layer]}, (100, 50))
    assert missing.sum() == 50 and missing[:5, :10].all()


def test_no_layer_is_an_empty_mask_and_no_image_a_message():
    value = {"background": np.zeros((3, 2, 3), np.uint8), "layers": [], "composite": None}
    assert not mask_from_editor(value, (2, 3)).any()
    for empty in (None, {"background": None, "layers": [], "composite": None}):
        with pytest.raises(AppInputError, match="no image: upload a PNG or JPEG, or pick a sample cell"):
            mask_from_editor(empty, (2, 3))


def test_layers_as_files_and_other_modes(tmp_path):
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[1, 1] = (255, 0, 255, 90)
    Image.fromarray(rgba).save(tmp_path / "layer.png")
    assert painted(str(tmp_path / "layer.png")).sum() == 1
    assert painted(np.eye(3, dtype=np.uint8)).sum() == 3  # L: non-zero
    assert painted(np.dstack([np.eye(3, dtype=np.uint8)] * 3)).sum() == 3  # RGB: any channel


def test_a_mask_shown_in_the_editor_comes_back_unchanged(cell):
    missing, _ = preset_mask("nucleus", cell)
    assert np.array_equal(mask_from_editor(editor_value(cell, missing), (cell.shape[1], cell.shape[0])), missing)
    assert editor_value(cell)["layers"] == []


def test_empty_and_full_masks_get_messages():
    with pytest.raises(AppInputError, match="the mask is empty: paint the region to fill in with the brush, or choose a preset"):
        check_missing(np.zeros((4, 4), bool))
    with pytest.raises(AppInputError, match="the mask covers the whole image: nothing is known"):
        check_missing(np.ones((4, 4), bool))
    check_missing(np.eye(4, dtype=bool))


def test_the_nucleus_preset_finds_the_stained_nucleus(cell):
    missing, note = preset_mask("nucleus", cell)
    assert missing.shape == cell.shape[:2] and note == "the nucleus, from the stain"
    assert 0.02 < missing.mean() < 0.5
    darkness = 255 - cell.astype(float).mean(axis=2)
    assert darkness[missing].mean() > darkness[~missing].mean() + 40  # the dark purple nucleus, not the pale background
    _, uniform_note = preset_mask("nucleus", np.full((50, 60, 3), 230, np.uint8))
    assert uniform_note == "no nucleus found in the stain: the centre square instead"


def test_the_box_preset_follows_the_seed_and_the_centre_preset_is_centre_mask():
    image = np.zeros((PRESET_SIZE, PRESET_SIZE, 3), np.uint8)
    box_a, note = preset_mask("box", image, seed=1)
    assert note == "a box placed by seed 1" and np.array_equal(box_a, preset_mask("box", image, seed=1)[0])
    assert not np.array_equal(box_a, preset_mask("box", image, seed=2)[0])
    rows, cols = np.nonzero(box_a)
    assert box_a[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one rectangle
    assert 0.3 * PRESET_SIZE - 1 <= rows.max() - rows.min() + 1 <= 0.5 * PRESET_SIZE + 1
    centre, _ = preset_mask("centre", image)
    assert np.array_equal(centre, centre_mask(PRESET_SIZE, None)[0].numpy() == 1)
    wide, _ = preset_mask("centre", np.zeros((40, 100, 3), np.uint8))  # scaled to the image's own shape
    assert wide.shape == (40, 100) and wide[20, 50] and not wide[0, 0]
    with pytest.raises(AppInputError, match="the seed must be between 0 and 2"):
        preset_mask("box", image, seed=-1)
    with pytest.raises(AppInputError, match="unknown preset 'ring'; choose one of nucleus, box, centre"):
        preset_mask("ring", image)


def test_mask_files_white_is_missing_and_colour_is_refused(tmp_path):
    grey = np.zeros((20, 10), np.uint8)
    grey[5:10, :] = 255
    Image.fromarray(grey).save(tmp_path / "mask.png")
    missing = mask_from_file(tmp_path / "mask.png", (20, 40))  # any size: resized to the image
    assert missing.shape == (40, 20) and missing[10:20].all() and not missing[:10].any()
    colour = np.zeros((20, 10, 3), np.uint8)
    colour[5:10, :, 0] = 255
    Image.fromarray(colour).save(tmp_path / "red.png")
    with pytest.raises(AppInputError, match=r"mask file red.png: mask is a colour image \(RGB\); expected a 1-channel black/white PNG"):
        mask_from_file(tmp_path / "red.png", (10, 20))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(AppInputError, match="mask file black.png: mask is empty"):
        mask_from_file(tmp_path / "black.png", (4, 4))
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(AppInputError, match="mask file white.png: mask is full"):
        mask_from_file(tmp_path / "white.png", (4, 4))
    (tmp_path / "notes.png").write_text("no")
    with pytest.raises(AppInputError, match="mask file notes.png is not an image"):
        mask_from_file(tmp_path / "notes.png", (4, 4))
    Image.new("L", (8, MAX_SIDE + 1)).save(tmp_path / "tall.png")
    with pytest.raises(AppInputError, match="^mask file tall.png is 8 x 4097 px; masks up to 4096 px per side"):
        mask_from_file(tmp_path / "tall.png", (4, 4))


def test_the_masked_preview_is_grey_where_missing(cell):
    missing = np.zeros(cell.shape[:2], bool)
    missing[:10] = True
    preview = masked_preview(cell, missing)
    assert (preview[:10] == 128).all() and np.array_equal(preview[10:], cell[10:])


def test_the_bundled_sample_cells():
    cells = sample_cells()
    assert len(cells) == 16 and all(path.is_file() for path in cells.values())
    assert next(iter(cells)).startswith("basophil 1 (")
