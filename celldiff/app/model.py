"""The model the app serves: loaded once at start-up, shared by every request behind one lock.

``load_model`` reads a shipped weights file (``weights/NAME.safetensors``) or a Lightning checkpoint with
``celldiff.training.weights.load_diffusion_module`` (nothing unpickled) and says what the page may offer:
inpainting (a model trained with ``model.inpainting``), classes (``model.class_conditional``), the
samplers. Nothing here imports gradio.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from celldiff.diffusion.samplers import SAMPLERS
from celldiff.training.module import DiffusionModule
from celldiff.training.weights import load_diffusion_module

REPOSITORY = Path(__file__).resolve().parents[2]  # the checkout that holds the package
DEFAULT_WEIGHTS = REPOSITORY / "weights" / "celldiff64.safetensors"
SAMPLE_CELLS = REPOSITORY / "data" / "pbc_sample"
PREFERRED_SAMPLER = "dpmsolver"  # DPM-Solver++ 2M: 20 steps by default
UNCONDITIONAL = "unconditional"


class ModelLoadError(Exception):
    """The checkpoint or weights file cannot be served; the message is one line naming the file."""


@dataclass
class AppModel:
    """A loaded ``DiffusionModule`` and what the page can do with it.

    Args:
        module: The model, in eval mode on its device.
        path: The file it came from (shown in the page).
        lock: Held while the model samples: requests take turns, never share a sampling run.
    """

    module: DiffusionModule
    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def image_size(self) -> int:
        """Side of the square images the model works at."""
        return int(self.module.hparams.image_size)

    @property
    def inpainting(self) -> bool:
        """Trained for inpainting: the network sees the known image and the mask."""
        return bool(self.module.hparams.inpainting)

    @property
    def class_conditional(self) -> bool:
        """The network takes a class label (and a null class for unconditional sampling)."""
        return bool(self.module.hparams.class_conditional)

    @property
    def class_names(self) -> list[str]:
        """The class names a class-conditional model knows, in label order (``[]`` for an unconditional model)."""
        if not self.class_conditional:
            return []
        count = int(self.module.hparams.num_classes)
        names = list(self.module.hparams.get("class_names") or [])
        return [str(names[i]) if i < len(names) else f"class {i}" for i in range(count)]

    @property
    def null_class(self) -> int:
        """The label index of the unconditional (null) class embedding."""
        return int(self.module.denoiser.null_class)

    @property
    def num_timesteps(self) -> int:
        """T, the most reverse steps a sampler can take."""
        return int(self.module.hparams.num_timesteps)

    @property
    def samplers(self) -> list[str]:
        """The sampler names (``celldiff.diffusion.samplers.SAMPLERS``)."""
        return list(SAMPLERS)

    @property
    def default_sampler(self) -> str:
        """DPM-Solver++ where the registry has it, else the model's own sampler."""
        return PREFERRED_SAMPLER if PREFERRED_SAMPLER in SAMPLERS else str(self.module.hparams.sampler)

    def default_steps(self, sampler: str) -> int:
        """The sampler's default number of reverse steps (at most T)."""
        steps = SAMPLERS[sampler].default_steps
        return self.num_timesteps if steps is None else min(steps, self.num_timesteps)

    def describe(self) -> str:
        """One line for the page: the file, the resolution and what the model was trained for."""
        kinds = ["inpainting" if self.inpainting else "generation only"]
        if self.class_conditional:
            kinds.append(f"{len(self.class_names)} classes")
        count = sum(p.numel() for p in self.module.ema_unet.parameters())
        params = f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count / 1e3:.0f} k"
        return f"{self.path.name}: {self.image_size} px, {', '.join(kinds)}, {params} parameters"


def resolve_weights_path(ckpt_path: str | None) -> Path:
    """``--ckpt_path`` as a path; without it the shipped ``weights/celldiff64.safetensors`` of the repository.

    Raises:
        ModelLoadError: The file does not exist (or is a folder).
    """
    if ckpt_path is None:
        if not DEFAULT_WEIGHTS.is_file():
            raise ModelLoadError(f"no --ckpt_path given and the shipped model {DEFAULT_WEIGHTS} is missing;"
                                 " give --ckpt_path weights/NAME.safetensors or a checkpoint (.ckpt)")  # fmt: skip
        return DEFAULT_WEIGHTS
    path = Path(ckpt_path)
    if path.is_dir():
        raise ModelLoadError(f"--ckpt_path {path} is a folder; expected a weights file (.safetensors) or a checkpoint (.ckpt)")
    if not path.is_file():
        raise ModelLoadError(f"--ckpt_path {path}: no such file (resolved to {path.absolute()})")
    return path


def load_model(path: str | Path, device: str = "cpu") -> AppModel:
    """Load a diffusion model for the app, once: a weights file or a Lightning checkpoint, in eval mode.

    Args:
        path: ``weights/NAME.safetensors`` or a ``.ckpt`` of a ``DiffusionModule``.
        device: Where it samples (``cpu``, ``cuda``, ``cuda:1``).

    Raises:
        ModelLoadError: One line naming the file: unreadable, truncated, of another kind, or not buildable.
    """
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"--device {device}: {err}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: no CUDA device is available; use --device cpu")
    try:
        module = load_diffusion_module(path, map_location=torch_device)
    except Exception as err:  # WeightsFileError and anything a damaged file can raise: one line, never a trace
        message = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ModelLoadError(message if str(path) in message else f"{path}: {message}") from None
    if not isinstance(module, DiffusionModule):
        raise ModelLoadError(f"{path} holds a {type(module).__name__}; celldiff app serves diffusion models")
    return AppModel(module=module.eval(), path=Path(path))


@torch.no_grad()
def sample_images(
    model: AppModel,
    seeds: list[int],
    condition: dict,
    sampler: str,
    steps: int,
    guidance_scale: float,
    progress: Callable[[float, str], None] | None = None,
) -> torch.Tensor:
    """``DiffusionModule.generate`` under the model's lock: images (B, 3, S, S) in [-1, 1] on the CPU.

    Args:
        model: The served model.
        seeds: One noise seed per image.
        condition: ``class_labels``, and for inpainting ``known`` and ``mask`` (``network_condition``'s keys).
        sampler, steps, guidance_scale: As ``generate`` takes them.
        progress: Called as ``progress(done_fraction, text)`` after every reverse step, or None.
    """

    def report(state: dict) -> None:
        if progress is not None:
            done = int(state["i"]) + 1
            progress(done / max(int(state["num_steps"]), 1), f"step {done} of {state['num_steps']}")

    device = model.module.device
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in condition.items()}
    with model.lock:
        images = model.module.generate(seeds, condition=on_device, sampler=sampler, steps=steps,
                                       guidance_scale=guidance_scale, callback=report)  # fmt: skip
    return images.cpu()
