"""The page: two tabs of Gradio components wired to the handlers (``celldiff.app.inputs`` and ``.handlers``).

Inpaint: an image (upload or bundled sample) in Gradio's ``ImageEditor`` (brush, eraser, undo), a preset
or a mask file drawn as a layer the brush and eraser can refine, the class, guidance, sampler, steps,
samples and seed; Run shows a progress bar, then the masked input, the samples at the input's own
resolution and their PNGs and zip. Generate: cells from scratch as a grid. The original image lives in
each browser session's own ``gr.State`` (the editor's copy is only for painting), results in a folder per
request, and sampling takes turns on the one model (one queue slot, the model's lock): two users never
mix results. Every ``AppInputError`` becomes a message in the page (``gr.Error``); anything else a short
message there and its traceback on the terminal only.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import gradio as gr
import numpy as np

import celldiff.app.handlers as handlers
import celldiff.app.inputs as inputs
from celldiff.app.handlers import MAX_GUIDANCE, MAX_SAMPLES, RequestFolders
from celldiff.app.inputs import AppInputError
from celldiff.app.model import UNCONDITIONAL, AppModel

MODEL_QUEUE = "model"  # Run and Generate share one concurrency slot: the model samples one request at a time
BRUSH_COLOUR = ("#ff00ff", 0.6)  # translucent magenta, like the presets' layer (inputs.MASK_COLOUR)
BRUSH_SIZE = 36  # the brush's starting radius in canvas pixels (its slider changes it): 18 px of a 360 px cell


def page_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler; its ``AppInputError`` becomes the page's message, any other error a short one (traceback on the terminal)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AppInputError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(f"the app failed ({err.__class__.__name__}); the terminal that runs celldiff app has the details",
                           print_exception=False) from None  # fmt: skip

    return wrapper


def _progress(progress: gr.Progress) -> handlers.Progress:
    return lambda fraction, text: progress(fraction, desc=text)


def _settings(model: AppModel, samples_label: str, default_count: int) -> list[gr.components.Component]:
    """Class, guidance, sampler, steps, samples and seed: the same controls on both tabs."""
    classes = [UNCONDITIONAL, *model.class_names]
    conditional = model.class_conditional
    choice = gr.Dropdown(classes, value=UNCONDITIONAL, label="Complete as" if samples_label == "Samples" else "Class",
                         visible=conditional, info="a cell class, or unconditional")  # fmt: skip
    default_scale = float(model.module.hparams.guidance_scale)
    guidance = gr.Slider(0.0, MAX_GUIDANCE / 2, value=default_scale, step=0.5, label="Guidance scale", visible=conditional,
                         info="1: the class alone; above 1: stronger class features")  # fmt: skip
    sampler = gr.Dropdown(model.samplers, value=model.default_sampler, label="Sampler")
    steps = gr.Slider(1, model.num_timesteps, value=model.default_steps(model.default_sampler), step=1, label="Steps")
    sampler.change(lambda name: gr.update(value=model.default_steps(name)), sampler, steps, queue=False, api_visibility="private")
    count = gr.Slider(1, MAX_SAMPLES, value=default_count, step=1, label=samples_label)
    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
    return [choice, guidance, sampler, steps, count, seed]


def _inpaint_tab(model: AppModel, folders: RequestFolders) -> None:
    cells = inputs.sample_cells()
    original = gr.State(None)  # this session's image, (H, W, 3) uint8 at its own resolution
    if not model.inpainting:
        gr.Markdown(f"**{model.path.name} was not trained for inpainting**: this tab needs an inpainting model "
                    "(`model.inpainting: true`). The Generate tab works.")  # fmt: skip
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                upload = gr.File(label="Upload a PNG or JPEG", file_types=["image"], type="filepath", height=120,
                                 elem_id="image-upload")  # fmt: skip
                sample = gr.Dropdown(list(cells), value=None, label="or pick a sample cell", visible=bool(cells),
                                     elem_id="sample-cell")  # fmt: skip
            brush = gr.Brush(default_size=BRUSH_SIZE, colors=[BRUSH_COLOUR], color_mode="fixed")
            side = inputs.EDITOR_SIDE  # a fixed square canvas: layers set by the page land where they belong
            editor = gr.ImageEditor(label="Paint the missing region (brush, eraser, undo)", type="numpy",
                                    image_mode="RGBA", sources=[], format="png", layers=True, transforms=[],
                                    canvas_size=(side, side), fixed_canvas=True, brush=brush, eraser=gr.Eraser(),
                                    elem_id="mask-editor", height=560)  # fmt: skip
            with gr.Row():
                presets = [gr.Button(f"Mask: {name}", size="sm", elem_id=f"preset-{name}") for name in inputs.PRESETS]
                clear = gr.Button("Clear mask", size="sm")
            mask_file = gr.File(label="or upload a mask (white = missing, black = known)", file_types=["image"],
                                type="filepath", height=100, elem_id="mask-upload")  # fmt: skip
            note = gr.Markdown(elem_id="inpaint-note")
        with gr.Column(scale=2):
            settings = _settings(model, "Samples", 4)
            run = gr.Button("Run", variant="primary", interactive=model.inpainting, elem_id="run")
    summary = gr.Markdown(elem_id="inpaint-summary")
    with gr.Row():
        masked = gr.Image(label="Masked input", type="filepath", format="png", interactive=False, scale=1,
                          buttons=["download", "fullscreen"], elem_id="masked-input")
        gallery = gr.Gallery(label="Samples (at the input's resolution)", format="png", columns=4, height=290, scale=3,
                             buttons=["download", "fullscreen"], elem_id="samples")  # fmt: skip
    downloads = gr.File(label="Download: a PNG per sample and a zip", file_count="multiple", interactive=False,
                        elem_id="downloads")  # fmt: skip

    @page_errors
    def load(path: str | None) -> tuple[np.ndarray, dict, str]:
        image = inputs.read_upload(path)
        return image, inputs.editor_value(image), f"{image.shape[1]} x {image.shape[0]} px: paint the missing region"

    def loaded(image: np.ndarray | None) -> np.ndarray:
        if image is None:
            raise AppInputError("no image: upload a PNG or JPEG, or pick a sample cell")
        return image

    @page_errors
    def preset(name: str, image: np.ndarray | None, seed: float) -> tuple[dict, str]:
        missing, what = inputs.preset_mask(name, loaded(image), int(seed or 0))
        return inputs.editor_value(image, missing), f"Mask: {what} ({missing.mean():.0%} of the image)"

    @page_errors
    def from_file(path: str | None, image: np.ndarray | None) -> tuple[dict, str]:
        image = loaded(image)
        missing = inputs.mask_from_file(path, (image.shape[1], image.shape[0]))
        return inputs.editor_value(image, missing), f"Mask from the file ({missing.mean():.0%} of the image)"

    @page_errors
    def run_inpaint(image: np.ndarray | None, value: dict | None, choice: str, scale: float, sampler: str, steps: float,
                    count: float, seed: float, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (Gradio's way)  # fmt: skip
        image = loaded(image)
        missing = inputs.mask_from_editor(value, (image.shape[1], image.shape[0]))
        request = handlers.check_request(model, choice, sampler, steps, scale, count, seed)
        folder = folders.new()
        result = handlers.inpaint(model, image, missing, request, folder, _progress(progress))
        shown = [(str(path), path.stem) for path in result.files[:-1]]
        return str(folder / "masked_input.png"), shown, [str(p) for p in result.files], result.summary

    light = dict(concurrency_limit=4, show_progress="minimal")
    upload.upload(load, upload, [original, editor, note], api_name="load_image", **light)
    sample.input(lambda label: load(str(cells[label])) if label else (gr.skip(),) * 3, sample, [original, editor, note],
                 api_name="load_sample", **light)  # fmt: skip
    for button, name in zip(presets, inputs.PRESETS, strict=True):
        button.click(functools.partial(preset, name), [original, settings[-1]], [editor, note], api_name=f"preset_{name}", **light)
    clear.click(lambda image: inputs.editor_value(image) if image is not None else gr.skip(), original, editor,
                api_name="clear_mask", **light)  # fmt: skip
    mask_file.upload(from_file, [mask_file, original], [editor, note], api_name="mask_from_file", **light)
    run.click(run_inpaint, [original, editor, *settings], [masked, gallery, downloads, summary], api_name="inpaint",
              concurrency_limit=1, concurrency_id=MODEL_QUEUE)  # fmt: skip


def _generate_tab(model: AppModel, folders: RequestFolders) -> None:
    if model.inpainting:
        gr.Markdown("An inpainting model generates from an all-missing mask: cells if it was trained with the "
                    "`full` mask family.")  # fmt: skip
    with gr.Row():
        with gr.Column(scale=2):
            settings = _settings(model, "Cells", MAX_SAMPLES)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=3):
            grid = gr.Image(label="Cells", type="filepath", format="png", interactive=False, buttons=["download", "fullscreen"],
                            elem_id="grid")
    summary = gr.Markdown(elem_id="generate-summary")
    downloads = gr.File(label="Download: a PNG per cell and a zip", file_count="multiple", interactive=False)

    @page_errors
    def run_generate(choice: str, scale: float, sampler: str, steps: float, count: float, seed: float,
                     progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (Gradio's way)  # fmt: skip
        request = handlers.check_request(model, choice, sampler, steps, scale, count, seed)
        folder = folders.new()
        result, _ = handlers.generate_cells(model, request, folder, _progress(progress))
        return str(folder / "grid.png"), [str(p) for p in result.files], result.summary

    button.click(run_generate, settings, [grid, downloads, summary], api_name="generate", concurrency_limit=1,
                 concurrency_id=MODEL_QUEUE)  # fmt: skip


def build_app(model: AppModel, folders: RequestFolders) -> gr.Blocks:
    """The page for ``model``; requests write into ``folders``. Queue it and launch it (``celldiff.app.launch``)."""
    with gr.Blocks(title="celldiff", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"## celldiff: blood-cell diffusion in the browser\n`{model.describe()}`")
        with gr.Tab("Inpaint", elem_id="tab-inpaint"):
            _inpaint_tab(model, folders)
        with gr.Tab("Generate", elem_id="tab-generate"):
            _generate_tab(model, folders)
    return page
