"""The page's wiring without a browser: each event's function as Gradio calls it, and what each model shows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")

from celldiff.app.handlers import RequestFolders  # noqa: E402
from celldiff.app.ui import build_app, page_errors  # noqa: E402


@pytest.fixture(scope="module")
def page(model, tmp_path_factory):
    return build_app(model, RequestFolders(tmp_path_factory.mktemp("requests")))


def event(page, api_name: str):
    """The function behind the event ``api_name``, as the page calls it."""
    return next(f.fn for f in page.fns.values() if f.api_name == api_name)


def test_load_preset_run_through_the_pages_functions(page, cell_path, cell):
    image, value, note = event(page, "load_image")(str(cell_path))
    assert np.array_equal(image, cell) and value["layers"] == [] and note == "360 x 363 px: paint the missing region"
    value, note = event(page, "preset_nucleus")(image, 0)
    assert note.startswith("Mask: the nucleus, from the stain (")
    masked, gallery, downloads, summary = event(page, "inpaint")(image, value, "erythroblast", 2.0, "dpmsolver", 4, 2, 1)
    assert [caption for _, caption in gallery] == ["inpainted_0", "inpainted_1"]
    assert [path.rsplit("/", 1)[-1] for path in downloads] == ["inpainted_0.png", "inpainted_1.png", "inpainted.zip"]
    sample, preview = np.asarray(Image.open(gallery[0][0])), np.asarray(Image.open(masked))
    known = ~(preview == 128).all(axis=2)
    assert sample.shape == cell.shape and np.array_equal(sample[known], cell[known])
    assert summary.startswith("2 samples of 360 x 363 px as erythroblast (guidance 2), dpmsolver 4 steps, seed 1: ")


def test_bad_input_becomes_a_message_in_the_page(page, cell, tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"GIF? no")
    with pytest.raises(gr.Error, match="fake.jpg is not an image this app can read"):
        event(page, "load_image")(str(fake))
    empty = {"background": cell, "layers": [], "composite": None}
    with pytest.raises(gr.Error, match="the mask is empty"):
        event(page, "inpaint")(cell, empty, "unconditional", 1.0, "dpmsolver", 4, 2, 0)
    value, _ = event(page, "preset_centre")(cell, 0)
    with pytest.raises(gr.Error, match="at most 8 samples per request"):
        event(page, "inpaint")(cell, value, "unconditional", 1.0, "dpmsolver", 4, 9, 0)
    with pytest.raises(gr.Error, match="no image: upload a PNG or JPEG, or pick a sample cell"):
        event(page, "inpaint")(None, None, "unconditional", 1.0, "dpmsolver", 4, 2, 0)
    Image.fromarray(np.dstack([np.eye(8, dtype=np.uint8) * 255, np.zeros((8, 8, 2), np.uint8)])).save(tmp_path / "red.png")
    with pytest.raises(gr.Error, match="mask file red.png: mask is a colour image"):
        event(page, "mask_from_file")(str(tmp_path / "red.png"), cell)


def test_an_unexpected_error_is_a_short_message_and_a_traceback_on_the_terminal(capsys):
    @page_errors
    def broken() -> None:
        raise ZeroDivisionError("1 / 0")

    with pytest.raises(gr.Error, match=r"the app failed \(ZeroDivisionError\); the terminal that runs celldiff app has"):
        broken()
    assert "Traceback" in capsys.readouterr().err


def test_generate_tab(page):
    grid, downloads, summary = event(page, "generate")("platelet", 1.0, "ddim", 3, 4, 2)
    assert np.asarray(Image.open(grid)).shape == (38, 38, 3)
    assert downloads[-1].endswith("generated.zip") and "4 cells of 16 px as platelet" in summary


def test_each_model_shows_what_it_can_do(model, plain_model, tmp_path):
    def components(served):
        built = build_app(served, RequestFolders(tmp_path / served.path.stem))
        return {c.elem_id: c for c in built.blocks.values() if getattr(c, "elem_id", None)}, built

    full, _ = components(model)
    assert full["run"].interactive is not False
    plain, built = components(plain_model)
    assert plain["run"].interactive is False
    dropdowns = [c for c in built.blocks.values() if isinstance(c, gr.Dropdown) and c.label in ("Complete as", "Class")]
    assert dropdowns and all(c.visible is False for c in dropdowns)  # no class choice for a model without classes
    texts = " ".join(c.value for c in built.blocks.values() if isinstance(c, gr.Markdown) and isinstance(c.value, str))
    assert "was not trained for inpainting" in texts
