"""``celldiff app``: try a trained model in the browser (Gradio; the ``celldiff[app]`` extra).

``launch`` parses the command line and serves the page, ``ui`` builds the page (the only module that
imports gradio), ``handlers`` and ``inputs`` are what its buttons do (testable without a browser or
gradio), ``model`` loads the model once. The layer just below the CLI: it may import any of celldiff but
``celldiff.cli``, and only the CLI's ``celldiff app`` imports it.
"""

from celldiff.app.launch import main

__all__ = ["main"]
