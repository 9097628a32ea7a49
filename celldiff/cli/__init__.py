"""The ``celldiff`` command line (the top layer: it may import every other part; nothing imports it).

``main`` (``celldiff.cli.main``) is the console script's entry point; ``python -m celldiff.cli`` runs it too.
"""

from celldiff.cli.main import main

__all__ = ["main"]
