"""Run and Generate without the page: class choice, bounds, inpainting at the input's size, seeds, users at once."""

from __future__ import annotations

import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from celldiff.app.handlers import (
    MAX_SAMPLES,
    RequestFolders,
    check_request,
    class_label,
    generate_cells,
    inpaint,
)
from celldiff.app.inputs import AppInputError, preset_mask
from celldiff.app.model import UNCONDITIONAL


@pytest.fixture
def folders(tmp_path):
    return RequestFolders(tmp_path / "out")


@pytest.fixture(scope="module")
def stroke(cell) -> np.ndarray:
    """A brush-like band across the cell, True = missing."""
    missing = np.zeros(cell.shape[:2], bool)
    missing[150:200, 100:260] = True
    return missing


def request(model, count=2, seed=0, choice=UNCONDITIONAL, sampler="dpmsolver", steps=5, scale=1.0):
    return check_request(model, choice, sampler, steps, scale, count, seed)


def test_class_choice_maps_to_labels(model, plain_model):
    assert model.class_names[2] == "erythroblast" and model.null_class == 8
    assert class_label(model, "erythroblast") == 2
    assert class_label(model, UNCONDITIONAL) == class_label(model, None) == model.null_class
    assert class_label(plain_model, "erythroblast") is None  # a model without classes takes no label
    with pytest.raises(AppInputError, match="unknown class 'neuron'; choose unconditional or one of: basophil, eosinophil"):
        class_label(model, "neuron")


def test_requests_are_bounded(model):
    assert request(model, count=MAX_SAMPLES).count == 8
    with pytest.raises(AppInputError, match="at most 8 samples per request"):
        request(model, count=9)
    with pytest.raises(AppInputError, match="at most 8 samples per request"):
        request(model, count=0)
    with pytest.raises(AppInputError, match=r"steps must be between 1 and 50 \(the model's T\), got 51"):
        request(model, steps=51)
    with pytest.raises(AppInputError, match="unknown sampler 'euler'; choose one of ddpm, ddim, dpmsolver"):
        request(model, sampler="euler")
    with pytest.raises(AppInputError, match="the guidance scale must be between 0 and 20"):
        request(model, scale=-1)
    with pytest.raises(AppInputError, match="the seed must be a whole number, got 1.5"):
        request(model, seed=1.5)
    with pytest.raises(AppInputError, match="the seed must be between 0"):
        request(model, seed=-3)
    assert request(model, seed=7.0, count=3.0).seed == 7  # Gradio's numbers may come as floats


def test_inpainting_keeps_every_known_pixel_at_the_inputs_size(model, cell, stroke, folders):
    result = inpaint(model, cell, stroke, request(model, count=3, choice="erythroblast", scale=2.0), folders.new())
    assert len(result.samples) == 3
    for sample in result.samples:
        assert sample.shape == cell.shape and sample.dtype == np.uint8
        assert np.array_equal(sample[~stroke], cell[~stroke])
        assert (sample[stroke] != cell[stroke]).any(axis=1).mean() > 0.5
    assert not np.array_equal(result.samples[0], result.samples[1])  # one seed per sample
    names = [path.name for path in result.files]
    assert names == ["inpainted_0.png", "inpainted_1.png", "inpainted_2.png", "inpainted.zip"]
    assert np.array_equal(np.asarray(Image.open(result.files[0])), result.samples[0])  # the PNG is the sample, lossless
    with zipfile.ZipFile(result.files[-1]) as bundle:
        assert sorted(bundle.namelist()) == ["inpainted_0.png", "inpainted_1.png", "inpainted_2.png", "masked_input.png"]
    assert (result.files[0].parent / "masked_input.png").is_file()
    assert "3 samples of 360 x 363 px as erythroblast (guidance 2), dpmsolver 5 steps, seed 0" in result.summary


def test_sample_j_depends_only_on_the_seed_and_j(model, cell, stroke, folders):
    two = inpaint(model, cell, stroke, request(model, count=2, seed=5), folders.new()).samples
    four = inpaint(model, cell, stroke, request(model, count=4, seed=5), folders.new()).samples
    assert all(np.array_equal(a, b) for a, b in zip(two, four[:2], strict=True))
    other = inpaint(model, cell, stroke, request(model, count=1, seed=6), folders.new()).samples
    assert not np.array_equal(other[0], two[0])


def test_a_preset_mask_inpaints(model, cell, folders):
    missing, _ = preset_mask("nucleus", cell)
    sample = inpaint(model, cell, missing, request(model, count=1), folders.new()).samples[0]
    assert np.array_equal(sample[~missing], cell[~missing]) and not np.array_equal(sample[missing], cell[missing])


def test_inpainting_refuses_what_it_cannot_do(model, plain_model, cell, stroke, folders):
    with pytest.raises(AppInputError, match="the mask is empty"):
        inpaint(model, cell, np.zeros_like(stroke), request(model), folders.new())
    with pytest.raises(AppInputError, match="the mask covers the whole image"):
        inpaint(model, cell, np.ones_like(stroke), request(model), folders.new())
    with pytest.raises(AppInputError, match="the mask is 3 x 2 px but the image 360 x 363 px"):
        inpaint(model, cell, np.ones((2, 3), bool), request(model), folders.new())
    with pytest.raises(AppInputError, match=r"tiny.ckpt was not trained for inpainting \(model.inpainting false\)"):
        inpaint(plain_model, cell, stroke, request(plain_model), folders.new())


def test_generate_makes_a_grid_for_both_kinds_of_model(model, plain_model, folders):
    for served, choice in ((model, "platelet"), (model, UNCONDITIONAL), (plain_model, UNCONDITIONAL)):
        result, grid = generate_cells(served, request(served, count=4, seed=3, choice=choice), folders.new())
        assert [s.shape for s in result.samples] == [(16, 16, 3)] * 4
        assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 2 x 2 tiles with 2 px padding
        prefix = "platelet" if choice == "platelet" else "sample"
        assert [p.name for p in result.files] == [f"{prefix}_{i}.png" for i in range(4)] + ["generated.zip"]
    first = generate_cells(model, request(model, count=2, seed=3), folders.new())[0].samples
    again = generate_cells(model, request(model, count=3, seed=3), folders.new())[0].samples
    assert all(np.array_equal(a, b) for a, b in zip(first, again[:2], strict=True))


def test_progress_is_reported_every_step(model, cell, stroke, folders):
    seen = []
    inpaint(model, cell, stroke, request(model, count=1, steps=4), folders.new(), progress=lambda f, text: seen.append((f, text)))
    assert seen == [(0.25, "step 1 of 4"), (0.5, "step 2 of 4"), (0.75, "step 3 of 4"), (1.0, "step 4 of 4")]


def test_two_users_at_once_get_their_own_results(model, cell, stroke, folders):
    """Requests in parallel threads (the server's workers) equal the same requests one after the other."""
    other_image = np.ascontiguousarray(cell[::-1])
    jobs = [(cell, 11), (other_image, 12), (cell, 13), (other_image, 14)]
    alone = [inpaint(model, image, stroke, request(model, count=2, seed=seed), folders.new()) for image, seed in jobs]
    together: dict[int, object] = {}

    def run(k: int) -> None:
        image, seed = jobs[k]
        together[k] = inpaint(model, image, stroke, request(model, count=2, seed=seed), folders.new())

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, expected in enumerate(alone):
        assert all(np.array_equal(a, b) for a, b in zip(together[k].samples, expected.samples, strict=True))
    assert len({r.files[0].parent for r in together.values()}) == len(jobs)  # a folder per request


def test_request_folders_are_fresh_and_old_ones_expire(tmp_path):
    folders = RequestFolders(tmp_path / "out", keep=2)
    made = [folders.new() for _ in range(4)]
    assert len(set(made)) == 4 and all(not any(p.iterdir()) for p in made if p.exists())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in made[-2:])
    folders.cleanup()
    assert not (tmp_path / "out").exists()
