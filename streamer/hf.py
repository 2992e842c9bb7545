"""Calls into transformers whose type hints change between its releases, in one place.

transformers gains and loses type hints from one patch release to the next (``from_pretrained`` of the auto
classes, the logging helpers, the tokenizer and feature-extractor constructors): a call that strict mypy flags as
untyped in one release is typed in the next, and a ``type: ignore`` on it then fails as unused. Such calls go
through :func:`hf`, so the project's type check does not depend on the transformers a machine resolved.
"""

from __future__ import annotations

from typing import Any

__all__ = ["hf", "quiet_transformers"]


def hf(obj: object) -> Any:
    """``obj`` (a transformers class or function) typed as ``Any``: ``hf(AutoModelForCTC).from_config(c)``."""
    return obj


def quiet_transformers() -> None:
    """transformers' warnings and progress bars off: the loading lines that matter are streamer's own."""
    from transformers.utils import logging as hf_logging

    hf(hf_logging.set_verbosity_error)()
    hf(hf_logging.disable_progress_bar)()
