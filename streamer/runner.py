"""What a model backend is: windows of 16 kHz audio in, CTC log-probabilities out.

:class:`Runner` is the seam between the engine and wherever the model runs. The in-process
PyTorch runner (:class:`streamer.model.TorchRunner`, made by :func:`streamer.model.load_model`)
implements it; a remote model server or another backend implements the same few members, and
everything above it (the batching worker, the daemon, ``transcribe``, ``mic``) works unchanged.
A runner knows nothing about words or decoding: the word decoder is built from ``[decoder]``
(:func:`streamer.decoder.build_decoder`) and passed where sessions are made.

No torch here: this module only names the contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from streamer.ctc import Vocabulary

__all__ = ["Runner", "TokenVocabulary"]


@runtime_checkable
class TokenVocabulary(Vocabulary, Protocol):
    """A CTC vocabulary that can also spell words (what a word list needs)."""

    @property
    def token_ids(self) -> Mapping[str, int]:
        """Token string to id, as the tokenizer spells words."""
        ...

    @property
    def size(self) -> int:
        """Number of output classes (the log-probabilities' last dimension)."""
        ...


@runtime_checkable
class Runner(Protocol):
    """A loaded model: call :meth:`run` from one thread at a time (the batching worker's)."""

    @property
    def name(self) -> str:
        """What to call the model in logs, ``ready`` messages and ``/healthz``."""
        ...

    @property
    def device(self) -> str:
        """Where it runs (``cpu``, ``cuda:0``, a server address)."""
        ...

    @property
    def sample_rate(self) -> int:
        """The rate windows are given in (16000 for wav2vec2)."""
        ...

    @property
    def vocab(self) -> TokenVocabulary:
        """The checkpoint's own CTC vocabulary (blank, word delimiter, spelling)."""
        ...

    @property
    def n_parameters(self) -> int:
        """Model size, for summaries; 0 when unknown."""
        ...

    def run(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One ``[frames, vocab]`` float32 log-probability array per float32 window, in order.

        Windows of equal length must give the same output whatever they are batched with (beyond float
        rounding). Raises :class:`streamer.exceptions.InferenceError` when the model call fails.
        """
        ...

    def warmup(self, samples: int) -> float:
        """Run one window of ``samples`` samples so that the first real one is not slow; seconds taken."""
        ...

    def shipped_file(self, name: str) -> Path | None:
        """A file the checkpoint ships next to its weights (``words.txt``), if it has one; never downloads."""
        ...
