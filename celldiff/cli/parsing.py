"""The command line before anything runs: one-line parser errors, argument fix-ups, early value checks.

jsonargparse reports a bad value as a multi-line Union report and Lightning some trainer values with a
traceback, a misleading message or not at all; here each becomes one line (``UsageError``, exit 2).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from celldiff.errors import UsageError

SUBCOMMANDS = ("fit", "validate", "test", "predict", "evaluate")
TOOLS = ("export", "app")  # commands main() runs outside LightningCLI, each with its own --help
SEED_LIMIT = 2**32  # numpy's seeds are 32-bit unsigned
EVALUATE_HELP = "Generate samples and measure them against the test split (FID, KID, classifier metrics)."
TOOL_HELP = {
    "export": "Write a checkpoint's weights as weights/NAME.safetensors (fp16, hyperparameters in its metadata).",
    "app": "Start the browser app on a model (needs the app extra: pip install 'celldiff[app]').",
}


def condense_parser_error(message: str) -> str:
    """jsonargparse's multi-line report (a Union of subtypes, the given value and its type) in one line."""
    keys = re.findall(r'Parser key "([^"]+)"', message)  # nested: "model", then "lr" inside its init_args
    key = re.match(r"(.*)", ".".join(dict.fromkeys(keys))) if keys else None
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", line.strip()) for line in message.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return message
    invalid = re.search(r"invalid choice: '([^']*)' \(choose from 'fit'", message)
    if invalid or ("subcommand" in message and "not provided" in message):
        return f"{f'unknown command {invalid.group(1)!r}' if invalid else 'no command given'}; expected one of {', '.join(SUBCOMMANDS + TOOLS)}"
    given = re.search(r"^\s*Given value: (.*)$", message, re.M)
    literals: list[str] = []
    for values in re.findall(r"Literal\[([^\]]*)\]", message):
        literals += [v.strip().strip("'\"") for v in values.split(",") if v.strip()]
    noise = re.compile(r"(Does not validate|Subtypes|Errors|Given value|Expected a (<class '[^']+'>|typing\..*|collections.*)$)")
    reasons = [line.lstrip("- ").strip() for line in lines]
    reasons = [r for r in reasons if not noise.match(r)]
    reasons = [r for r in reasons if not r.startswith("Problem with given class_path")] or reasons
    if key:
        given_value = given.group(1) if given else ""
        nested = re.match(r"NestedArg\(key='([^']*)', val='(.*)'\)$", given_value)
        name = key.group(1)
        if nested:
            name = name if name.endswith(nested.group(1)) else f"{name}.{nested.group(1)}"
            given_value = nested.group(2)
        where = f"--{name}" + (f" {given_value}" if given_value else "")
        types = [t.rsplit(".", 1)[-1].replace("NoneType", "null") for t in re.findall(r"Expected a <class '([^']+)'>", message)]
        if not reasons and literals:
            return f"{where}: expected one of {', '.join(dict.fromkeys(literals + [t for t in types if t == 'null']))}"
        if not reasons and types:
            return f"{where}: expected {' or '.join(dict.fromkeys(types))}"
        return f"{where}: {'; '.join(reasons[:2]) if reasons else lines[0].lstrip('- ')}"
    return lines[0] + (f" {reasons[1]}" if len(reasons) > 1 and lines[0].endswith(":") else "")


def invalid_configuration(err: Exception) -> UsageError:
    """A value the classes reject (jsonargparse wraps it in a Union report), as one clear line."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Does not validate", "Subtypes", "Errors", "Given", "Expected a"))]
    return UsageError(f"invalid configuration: {reasons[0] if reasons else lines[0]}")


class CellDiffArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line (``celldiff: error: ...``), not a usage wall."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        print(f"celldiff: error: {condense_parser_error(message)} (see --help)", file=sys.stderr)
        sys.exit(2)


def list_evaluate_in_help(parser: LightningArgumentParser) -> None:
    """``celldiff evaluate`` is ``test``'s parser run by main(), ``export`` and ``app`` are main()'s own: list them in --help."""
    action = getattr(parser, "_subcommands_action", None)
    if action is not None:
        action.metavar = "{" + ",".join(SUBCOMMANDS) + "}"
        pseudo = argparse._SubParsersAction._ChoicesPseudoAction
        action._choices_actions.append(pseudo("evaluate", (), EVALUATE_HELP))
        action._choices_actions += [pseudo(name, (), TOOL_HELP[name]) for name in TOOLS]


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


def join_negative_numbers(args: list[str]) -> list[str]:
    """``--model.lr -1e-4`` as ``--model.lr=-1e-4``: argparse takes ``-1e-4`` for an option and reports a missing value."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i].startswith("--") and "=" not in args[i] and i + 1 < len(args) and _NEGATIVE_NUMBER.match(args[i + 1]):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def check_config_yaml(args: list[str]) -> None:
    """A YAML syntax error in a ``--config`` file: one line naming the file and the line (jsonargparse names neither)."""
    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for name in paths:
        path = Path(name)
        if not path.is_file():
            continue  # the parser reports a missing file
        try:
            yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UsageError(f"--config {path}: YAML syntax error{where}: {err.problem or err.context}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UsageError(f"--config {path}: not a YAML file ({err.__class__.__name__}: {err})") from None


def check_seeds(cfg: Namespace) -> None:
    """``--seed`` and ``--seed_everything`` in numpy's range (a bool means Lightning's own choice)."""
    for flag in ("seed", "seed_everything"):
        value = cfg.get(flag)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
            raise UsageError(f"--{flag} {value}: a seed must be an integer in [0, {SEED_LIMIT - 1}] (numpy's range)")


def check_trainer(trainer: Namespace) -> None:
    """Trainer values that Lightning reports with a traceback, a misleading message, or not at all."""
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str):
        name = accelerator.lower()
        if name in ("gpu", "cuda") and not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(
                f"--trainer.accelerator {accelerator}: this machine has no usable GPU ({why}); use --trainer.accelerator cpu or auto"
            )
        if name == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"--trainer.accelerator {accelerator}: Apple MPS is not available here; use cpu or auto")
    devices = trainer.get("devices")
    if isinstance(devices, (int, str)) and re.fullmatch(r"-?\d+", str(devices).strip()):
        if int(devices) == 0 or int(devices) < -1:
            raise UsageError(
                f"--trainer.devices {devices}: expected a number of devices >= 1, -1 (all), 'auto' or a list of device ids"
            )
    bounds = {  # name: (smallest valid value, what it is)
        "num_nodes": (1, "machines"),
        "accumulate_grad_batches": (1, "batches per optimizer step"),
        "check_val_every_n_epoch": (1, "epochs between validations (or null)"),
        "log_every_n_steps": (0, "steps between log rows (0: only at epoch ends)"),
        "gradient_clip_val": (0, "a gradient norm or value (or null)"),
    }
    for name, (low, what) in bounds.items():
        value = trainer.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise UsageError(f"--trainer.{name} {value}: expected >= {low} ({what})")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise UsageError(f"--trainer.val_check_interval {interval}: expected > 0 (a fraction of an epoch, or a number of steps)")
