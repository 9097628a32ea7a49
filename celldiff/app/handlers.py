"""What Run and Generate do, without the page: bounded requests, the model's condition, files to download.

``inpaint`` follows ``celldiff predict`` on a user's image (``celldiff.data.user_images``): the image is
resized to the model's square, the mask downscaled with ``low_res_mask`` (every missing pixel lies in a
missing low-res pixel), the model samples, and the samples are pasted back at the input's own resolution
inside the mask only, so every known pixel of a result is exactly the input's. Sample j of a request
uses the noise seed ``mix_seed(sample_seed(seed, 0), j)``, as ``celldiff predict --seed SEED`` does for
its first image; ``generate_cells`` draws image i from ``sample_seed(seed, i)``, as predict from noise
does. Each request writes into a folder of its own, so two users never see each other's files.
Nothing here imports gradio.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from celldiff.app.inputs import AppInputError, check_missing, masked_preview
from celldiff.app.model import UNCONDITIONAL, AppModel, sample_images
from celldiff.data.user_images import low_res_mask, paste_generated
from celldiff.diffusion.samplers import SAMPLERS
from celldiff.images import image_grid, save_png, to_model_range, to_uint8
from celldiff.seeds import mix_seed, sample_seed

MAX_SAMPLES = 8
MAX_GUIDANCE = 20.0
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Request:
    """The sampling settings of one Run or Generate, checked (``check_request``)."""

    label: int | None  # class label (the null class: unconditional), None for a model without classes
    sampler: str
    steps: int
    guidance_scale: float
    count: int
    seed: int


@dataclass(frozen=True)
class Result:
    """What a request made: the samples (H, W, 3) uint8, the files to download (PNGs, then the zip), a summary."""

    samples: list[np.ndarray]
    files: list[Path]
    summary: str


def class_label(model: AppModel, choice: str | None) -> int | None:
    """The label for the page's class choice: a class name, or ``unconditional`` (the null class).

    A model without classes takes no label (None) whatever the choice.

    Raises:
        AppInputError: A class the model does not know.
    """
    if not model.class_conditional:
        return None
    if choice in (None, "", UNCONDITIONAL):
        return model.null_class
    names = model.class_names
    if choice not in names:
        raise AppInputError(f"unknown class {choice!r}; choose {UNCONDITIONAL} or one of: {', '.join(names)}")
    return names.index(choice)


def _whole(value: float | int | None, what: str) -> int:
    if value is None or isinstance(value, bool) or float(value) != int(float(value)):
        raise AppInputError(f"{what} must be a whole number, got {value!r}")
    return int(float(value))


def check_request(model: AppModel, choice: str | None, sampler: str, steps: float | int | None,
                  guidance_scale: float | None, count: float | int | None, seed: float | int | None) -> Request:  # fmt: skip
    """The page's settings as a ``Request``, within bounds.

    Raises:
        AppInputError: Over ``MAX_SAMPLES`` samples, steps outside 1..T, an unknown sampler or class, a
            guidance scale outside 0..``MAX_GUIDANCE``, a negative or fractional seed.
    """
    if sampler not in SAMPLERS:
        raise AppInputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    count, steps, seed = _whole(count, "the number of samples"), _whole(steps, "steps"), _whole(seed, "the seed")
    if not 1 <= count <= MAX_SAMPLES:
        raise AppInputError(f"at most {MAX_SAMPLES} samples per request (and at least 1), got {count}")
    if not 1 <= steps <= model.num_timesteps:
        raise AppInputError(f"steps must be between 1 and {model.num_timesteps} (the model's T), got {steps}")
    if not 0 <= seed < 2**63:
        raise AppInputError(f"the seed must be between 0 and 2^63 - 1, got {seed}")
    scale = 1.0 if guidance_scale is None else float(guidance_scale)
    if not 0.0 <= scale <= MAX_GUIDANCE:
        raise AppInputError(f"the guidance scale must be between 0 and {MAX_GUIDANCE:g}, got {scale:g}")
    return Request(class_label(model, choice), sampler, steps, scale, count, seed)


def _class_condition(model: AppModel, request: Request) -> dict[str, torch.Tensor]:
    if request.label is None:
        return {}
    return {"class_labels": torch.full((request.count,), request.label, dtype=torch.long)}


def _what(model: AppModel, request: Request) -> str:
    if request.label is None:
        return ""
    if request.label == model.null_class:
        return f" as {UNCONDITIONAL}"
    return f" as {model.class_names[request.label]} (guidance {request.guidance_scale:g})"


def inpaint(model: AppModel, image: np.ndarray, missing: np.ndarray, request: Request, folder: Path,
            progress: Progress | None = None) -> Result:  # fmt: skip
    """Inpaint ``missing`` of ``image``: ``request.count`` samples at the image's own resolution.

    Args:
        model: An inpainting model.
        image: (H, W, 3) uint8, the user's image at its own size.
        missing: (H, W) bool, True = to generate.
        request: The checked settings (``check_request``).
        folder: Where this request's files go (``RequestFolders.new``).
        progress: Told after every reverse step.

    Returns:
        The samples (H, W, 3) uint8: equal to ``image`` wherever ``missing`` is False, the generated pixels
        (resized from the model's square with bicubic) inside; files ``inpainted_J.png``, ``masked_input.png``
        and ``inpainted.zip``.

    Raises:
        AppInputError: A model not trained for inpainting, an empty or full mask, a mask of another size.
    """
    if not model.inpainting:
        raise AppInputError(f"{model.path.name} was not trained for inpainting (model.inpainting false); "
                            "serve an inpainting model, or use the Generate tab")  # fmt: skip
    if missing.shape != image.shape[:2]:
        raise AppInputError(f"the mask is {missing.shape[1]} x {missing.shape[0]} px but the image "
                            f"{image.shape[1]} x {image.shape[0]} px")  # fmt: skip
    check_missing(missing)
    started, size, count = time.perf_counter(), model.image_size, request.count
    # As UserImageDataset.__getitem__: the image squashed to the model's square, the mask downscaled so that
    # every missing pixel lies in a missing low-res pixel.
    square = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0))
    known = to_model_range(torch.from_numpy(square.copy()).permute(2, 0, 1))[None].repeat(count, 1, 1, 1)
    mask = torch.from_numpy(low_res_mask(missing, size)).float()[None, None].repeat(count, 1, 1, 1)
    seeds = [mix_seed(sample_seed(request.seed, 0), j) for j in range(count)]
    condition = {"known": known, "mask": mask, **_class_condition(model, request)}
    generated = to_uint8(sample_images(model, seeds, condition, request.sampler, request.steps,
                                       request.guidance_scale, progress)).permute(0, 2, 3, 1).numpy()  # fmt: skip
    height, width = image.shape[:2]
    samples = [paste_generated(image, missing, g) for g in generated]
    files = write_files(folder, [(f"inpainted_{j}.png", s) for j, s in enumerate(samples)], "inpainted.zip",
                        extra=[("masked_input.png", masked_preview(image, missing))])  # fmt: skip
    seconds = time.perf_counter() - started
    summary = (f"{count} sample{'s' * (count > 1)} of {width} x {height} px{_what(model, request)}, "
               f"{request.sampler} {request.steps} steps, seed {request.seed}: {seconds:.1f} s")  # fmt: skip
    return Result(samples, files, summary)


def generate_cells(model: AppModel, request: Request, folder: Path, progress: Progress | None = None) -> tuple[Result, np.ndarray]:
    """``request.count`` cells from scratch at the model's resolution, and their grid (H', W', 3) uint8.

    An inpainting model generates from an all-missing mask (``DiffusionModule.generate``'s "nothing
    observed"); it makes cells if it was trained with the ``full`` mask family.
    """
    started = time.perf_counter()
    seeds = [sample_seed(request.seed, i) for i in range(request.count)]
    images = sample_images(model, seeds, _class_condition(model, request), request.sampler, request.steps,
                           request.guidance_scale, progress)  # fmt: skip
    samples = list(to_uint8(images).permute(0, 2, 3, 1).numpy())
    grid = image_grid(to_uint8(images))
    prefix = "sample" if request.label is None or request.label == model.null_class else model.class_names[request.label]
    files = write_files(folder, [(f"{prefix}_{i}.png", s) for i, s in enumerate(samples)], "generated.zip",
                        extra=[("grid.png", grid)])  # fmt: skip
    seconds = time.perf_counter() - started
    summary = (f"{request.count} cell{'s' * (request.count > 1)} of {model.image_size} px{_what(model, request)}, "
               f"{request.sampler} {request.steps} steps, seed {request.seed}: {seconds:.1f} s")  # fmt: skip
    return Result(samples, files, summary), grid


def write_files(folder: Path, images: list[tuple[str, np.ndarray]], zip_name: str,
                extra: Sequence[tuple[str, np.ndarray]] = ()) -> list[Path]:  # fmt: skip
    """PNGs of ``images`` (and ``extra``) in ``folder`` and a zip of them all; returns the images' PNGs and the zip."""
    pngs = []
    for name, array in [*images, *extra]:
        save_png(np.ascontiguousarray(array), folder / name)
        pngs.append(folder / name)
    archive = folder / zip_name
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as bundle:  # PNGs are compressed already
        for path in pngs:
            bundle.write(path, arcname=path.name)
    return [*pngs[: len(images)], archive]


class RequestFolders:
    """A fresh folder per request under one root, keeping only the newest ``keep`` (older downloads expire).

    Args:
        root: The app's output folder; None: a new temporary folder (removed by ``cleanup``).
        keep: Request folders kept on disk.
    """

    def __init__(self, root: Path | None = None, keep: int = 64) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="celldiff-app-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()

    def new(self) -> Path:
        """A new empty folder, unique to this request."""
        with self._lock:
            folders = sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            for old in folders[: max(len(folders) - self.keep + 1, 0)]:
                shutil.rmtree(old, ignore_errors=True)
            return Path(tempfile.mkdtemp(prefix="request-", dir=self.root))

    def cleanup(self) -> None:
        """Remove the root and everything in it."""
        shutil.rmtree(self.root, ignore_errors=True)
