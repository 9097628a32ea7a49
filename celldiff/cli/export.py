"""``celldiff export``: a checkpoint's network as a weights file (``celldiff.training.weights.export_weights``).

    celldiff export --ckpt_path runs/ship_64/<time>/checkpoints/last.ckpt --output weights/celldiff64.safetensors

writes the EMA U-Net (``--weights raw``: the trained weights themselves) of a diffusion checkpoint, or a
cell classifier's network, in float16 with the model's hyperparameters in the file's metadata. An
existing output file with other weights is kept unless ``--overwrite``. Errors are one line
(``celldiff: error: ...``), exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from celldiff.errors import UsageError
from celldiff.training.weights import WEIGHTS_CHOICES, export_weights


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``celldiff: error: ...``) and exit 2, like the other commands."""

    def error(self, message: str) -> NoReturn:
        print(f"celldiff: error: {message} (see celldiff export --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> _Parser:
    parser = _Parser(
        prog="celldiff export",
        description="Write a checkpoint's network as a float16 safetensors weights file with its hyperparameters"
        " (architecture, schedule, prediction type, class names) in the file's metadata. Load it with"
        " --ckpt_path FILE (predict, evaluate, validate, test) or --model.init_weights FILE (fit).",
    )
    parser.add_argument("--ckpt_path", required=True, help="A Lightning checkpoint (.ckpt) of a diffusion model or a cell classifier.")
    parser.add_argument("--output", required=True, help="The weights file to write, e.g. weights/celldiff64.safetensors.")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS_CHOICES,
        default="ema",
        help="A diffusion model's EMA weights (default, what sampling uses) or its raw trained weights.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file that holds other weights.")
    parser.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra metadata, repeatable (e.g. --meta license=CC-BY-4.0 --meta images_seen=300000).",
    )
    return parser


def _extra_metadata(pairs: list[str]) -> dict[str, Any]:
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--meta {pair}: expected KEY=VALUE")
        extra[key.strip()] = value
    return extra


def main(args: list[str]) -> int:
    """Run ``celldiff export`` with ``args`` (after the word ``export``); returns the exit code.

    Args:
        args: The command line after ``export``.
    """
    options = _parser().parse_args(args)
    out = Path(options.output)
    before = out.stat().st_mtime_ns if out.is_file() else None
    try:
        meta = export_weights(
            options.ckpt_path,
            options.output,
            weights=options.weights,
            extra_metadata=_extra_metadata(options.meta),
            overwrite=options.overwrite,
        )
    except UsageError as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        return 2
    step = f", step {meta['global_step']}" if meta.get("global_step") else ""
    what = f"{meta['weights']} weights ({meta['class_path'].rsplit('.', 1)[-1]}{step}, float16, {out.stat().st_size / 2**20:.1f} MiB)"
    if before is not None and out.stat().st_mtime_ns == before:
        print(f"celldiff: {out} already holds these {what}; left as it is", file=sys.stderr)
    else:
        print(f"celldiff: exported {what} to {out}", file=sys.stderr)
    return 0
