"""Old home of the tiny-module helpers, for the tests that still import them from here."""

# TRANSITIONAL: removed by D (import from tests.training.helpers)
from tests.training.helpers import TINY, FixedImages, tiny_module

__all__ = ["TINY", "FixedImages", "tiny_module"]
