"""Recipes that build models for ``streamer``: run from the repository root (``python -m recipes.demo.train``).

They live outside the ``streamer`` package and are not in its wheel; they import ``streamer`` (installed, or
this checkout) for the engine's frame grid, the error-rate metrics and the espeak-ng and checkpoint helpers.
"""
