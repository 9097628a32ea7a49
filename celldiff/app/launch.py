"""``celldiff app``: the model in a local web page (Gradio), started from the command line.

    celldiff app [--ckpt_path weights/NAME.safetensors | CKPT] [--host 127.0.0.1] [--port 7860] [--device cpu]

The model loads once, before the server starts; a file that cannot be served is one line on the
terminal (``celldiff: error: ...``) and exit code 2, as is a port in use or a missing Gradio (the
``celldiff[app]`` extra). Gradio runs offline: no analytics, no share link, its own fonts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import NoReturn

from celldiff.app.handlers import RequestFolders
from celldiff.app.model import DEFAULT_WEIGHTS, REPOSITORY, ModelLoadError, load_model, resolve_weights_path


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``celldiff: error: ...``) and exit 2, like the other commands."""

    def error(self, message: str) -> NoReturn:
        print(f"celldiff: error: {message} (see celldiff app --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> _Parser:
    default = DEFAULT_WEIGHTS.relative_to(REPOSITORY)
    parser = _Parser(prog="celldiff app", description="Inpaint and generate blood cells with a trained model in a local web page.")
    parser.add_argument("--ckpt_path", default=None, help=f"A weights file (NAME.safetensors) or a Lightning checkpoint (.ckpt); default: the shipped {default}.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: the network).")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on (default 7860).")
    parser.add_argument("--device", default="cpu", help="Where the model samples: cpu (default), cuda, cuda:N.")
    return parser


def _stop_on_sigterm() -> None:
    """SIGTERM ends the app like Ctrl-C (the server closes and the request folders are removed)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass


def main(argv: list[str] | None = None) -> int:
    """Run ``celldiff app`` with ``argv`` (the command line after ``app``); returns the exit code.

    Args:
        argv: The arguments; None reads ``sys.argv[1:]``.
    """
    options = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 <= options.port <= 65535:
        print(f"celldiff: error: --port {options.port}: expected 0-65535", file=sys.stderr)
        return 2
    try:
        model = load_model(resolve_weights_path(options.ckpt_path), options.device)
    except ModelLoadError as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from celldiff.app.ui import build_app
    except ImportError as err:
        print(f"celldiff: error: celldiff app needs Gradio: pip install 'celldiff[app]' (no module named {err.name!r})", file=sys.stderr)
        return 2
    folders = RequestFolders()
    page = build_app(model, folders)
    page.queue(max_size=32, default_concurrency_limit=1)
    try:
        _, url, _ = page.launch(server_name=options.host, server_port=options.port, share=False, inbrowser=False,
                                show_error=False, quiet=True, prevent_thread_lock=True,
                                allowed_paths=[str(folders.root)], footer_links=[])  # fmt: skip
    except OSError as err:
        folders.cleanup()
        print(f"celldiff: error: cannot serve on {options.host}:{options.port} ({str(err).splitlines()[0]})", file=sys.stderr)
        return 2
    print(f"celldiff app: {model.describe()}; open {url} in a browser (Ctrl-C stops it)", flush=True)
    _stop_on_sigterm()
    try:
        page.block_thread()
    finally:
        page.close()
        folders.cleanup()
    return 0
