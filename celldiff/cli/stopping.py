"""SIGTERM and Ctrl-C on the command line: stop with one last line that says what was kept, exit 143 or 130.

Inside Lightning's loops ``celldiff.training.stopping`` stops at a step boundary and records what it saved
in ``STOP``; outside them (parsing, data preparation, evaluate) the handler here stops at once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from celldiff.cli.rundirs import RUN_DIR_ENV
from celldiff.training.stopping import STOP, main_thread


def install_sigterm_handler() -> Any:
    """Make SIGTERM outside Lightning's loops (data preparation, evaluate) stop with a line, not silently.

    Inside a loop (``STOP.graceful``) Lightning's own handler, which runs first, sets the flag that stops
    it at the end of the step; this one then does nothing. Returns the previous handler to restore, or
    None when another one was installed (a launcher's, a test's): that one is left alone.
    """
    if not main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def on_sigterm(signum: int, frame: Any) -> None:
        if STOP.graceful:
            return
        STOP.signal = STOP.signal or "SIGTERM"
        raise SIGTERMException

    signal.signal(signal.SIGTERM, on_sigterm)
    return signal.SIG_DFL


def report_stop() -> None:
    """The last line after SIGTERM or Ctrl-C: what was saved or written, and how to go on; exit 143 or 130."""
    by_ctrl_c = STOP.signal == "SIGINT"
    name = "Ctrl-C" if by_ctrl_c else "SIGTERM"
    where = STOP.run_dir or os.environ.get(RUN_DIR_ENV) or "<run_dir>"
    if STOP.command == "fit":
        last = Path(where) / "checkpoints" / "last.ckpt"
        resume = f"resume with the same command plus --ckpt_path last --run_dir {where}"
        if STOP.saved_step is not None:
            message = f"{last} holds step {STOP.saved_step}; {resume}"
        elif last.is_file():
            lost = "the step in progress and those" if STOP.hard else "the steps"
            message = f"{lost} since the last checkpoint were not saved ({last} is older); {resume}"
        else:
            message = "no checkpoint had been saved yet, so there is nothing to resume: run the command again"
    elif STOP.message:
        message = STOP.message
    elif STOP.command == "evaluate":
        message = f"evaluate writes its results at the end, so nothing was written to {where}"
    elif STOP.command is None:
        message = "before the command started: nothing was written"
    else:
        message = "nothing was written"
    print(f"celldiff: stopped by {name}: {message}", file=sys.stderr)
    sys.exit(130 if by_ctrl_c else 143)  # 128 + the signal number, as a shell reports it
