"""What a model backend is: windows of 16 kHz audio in, CTC log-probabilities out.

:class:`Runner` is the seam between the engine and wherever the model runs. The in-process
PyTorch runner (:class:`streamer.model.TorchRunner`, made by :func:`streamer.model.load_model`)
implements it; a remote model server or another backend implements the same few members, and
everything above it (the batching worker, the daemon, ``transcribe``, ``mic``) works unchanged.
A runner knows nothing about words or decoding: the word decoder is built from ``[decoder]``
(:func:`streamer.decoder.build_decoder`) and passed where sessions are made.

:class:`LocalRunner` is what the in-process backends share (PyTorch, ONNX Runtime): the checkpoint's own
tokenizer and feature extractor around a model call, and equal-length windows batched without padding.

A runner also says where its output frames lie on the audio (:class:`FrameGeometry`, its ``geometry``
attribute, read through :func:`geometry_of`): the engine's windows are cut on that grid. A runner without
one is taken to have wav2vec2's (320 samples per frame, 400 for the first), so runners written before the
attribute existed keep working unchanged.

No torch here: this module names the contract and the backend-neutral part of running windows.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from streamer.ctc import Vocabulary
from streamer.engine import FRAME_SAMPLES, RECEPTIVE_FIELD, SAMPLE_RATE, Schedule, n_frames
from streamer.exceptions import ModelLoadError

__all__ = ["WAV2VEC2_GEOMETRY", "FrameGeometry", "LocalRunner", "RunStats", "Runner", "TokenVocabulary",
           "TokenizerVocabulary", "geometry_of", "probe_windows"]


@dataclass(frozen=True)
class FrameGeometry:
    """Where a model's output frames lie on 16 kHz audio: the grid the engine cuts windows on.

    A window of ``n`` samples that starts at sample ``frame_samples · s`` yields
    ``(n - receptive_field) // frame_samples + 1`` frames (none below ``receptive_field``), and its frame ``t``
    is the stream's frame ``s + t``; windows on this grid stack without padding. ``receptive_field`` is what the
    model's length arithmetic asks for the first frame; with global attention every frame still depends on the
    whole window.
    """

    frame_samples: int = FRAME_SAMPLES
    """samples per output frame (320 = 20 ms for wav2vec2; 640 = 40 ms for Wav2Vec2-BERT with its adapter)"""
    receptive_field: int = RECEPTIVE_FIELD
    """samples a window needs for its first frame (400 for wav2vec2's conv stack, 560 for Wav2Vec2-BERT)"""
    kind: str = "wav2vec2"
    """which front end it was derived from: ``wav2vec2`` (convolutional feature encoder) or ``wav2vec2-bert``"""

    def n_frames(self, n_samples: int) -> int:
        """Frames for a window of ``n_samples`` samples."""
        return n_frames(n_samples, self.frame_samples, self.receptive_field)

    @property
    def frame_ms(self) -> float:
        return self.frame_samples * 1000 / SAMPLE_RATE

    def schedule(self, stream: Any) -> Schedule:
        """The window schedule of a ``[stream]`` config section (:class:`streamer.config.StreamConfig`) on this grid."""
        return stream.schedule(self.frame_samples, self.receptive_field)  # type: ignore[no-any-return]

    def describe(self) -> str:
        return (f"{self.kind} grid: {self.frame_ms:g} ms frames ({self.frame_samples} samples), first frame after "
                f"{self.receptive_field} samples")


WAV2VEC2_GEOMETRY = FrameGeometry()
"""the grid of wav2vec2's feature encoder (``conv_kernel`` 10,3,3,3,3,2,2 and ``conv_stride`` 5,2,2,2,2,2,2)"""


def geometry_of(runner: object) -> FrameGeometry:
    """The runner's frame grid: its ``geometry`` attribute, or wav2vec2's for runners that have none."""
    geometry = getattr(runner, "geometry", None)
    return geometry if isinstance(geometry, FrameGeometry) else WAV2VEC2_GEOMETRY


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

    # Optional (read with :func:`geometry_of`, so that runners without it keep working):
    # ``geometry: FrameGeometry`` -- where the output frames lie; default wav2vec2's grid.


class TokenizerVocabulary:
    """A :class:`streamer.ctc.Vocabulary` backed by a Hugging Face CTC tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ModelLoadError("the tokenizer has no pad token, which CTC uses as its blank")
        self._blank = int(pad)
        delim_token = getattr(tokenizer, "word_delimiter_token", None)
        delim = tokenizer.convert_tokens_to_ids(delim_token) if delim_token else None
        self._delim = None if delim is None or delim == tokenizer.unk_token_id else int(delim)
        self.size = len(tokenizer)
        self._cache: dict[tuple[int, ...], str] = {}

    @property
    def blank_id(self) -> int:
        return self._blank

    @property
    def delimiter_id(self) -> int | None:
        return self._delim

    @property
    def token_ids(self) -> dict[str, int]:
        """Token string to id, as the tokenizer spells words."""
        return dict(self.tokenizer.get_vocab())

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's own decoding, memoised: words and partials are decoded again and again."""
        if not ids:
            return ""
        key = tuple(ids)
        text = self._cache.get(key)
        if text is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            text = self._cache[key] = str(
                self.tokenizer.decode(list(ids), skip_special_tokens=False, group_tokens=False)
            )
        return text


@dataclass
class RunStats:
    """Counters of a local runner (read by ``streamer eval``)."""

    seconds: float = 0.0
    """time spent in :meth:`LocalRunner.run`"""
    calls: int = 0
    """model calls (batches)"""


def checkpoint_file(source: str, name: str, revision: str | None = None) -> Path | None:
    """The file ``name`` of the checkpoint ``source`` (a directory or a hub id): in the directory, or in the hub
    cache; never downloaded. None when it has no such file (or the id is not valid, or nothing is cached)."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, name, revision=revision)
    except Exception:  # not a valid repo id, no cache: no such file
        return None
    return Path(found) if isinstance(found, str) else None


class LocalRunner(ABC):
    """A model in this process: windows of 16 kHz float32 audio in, log-probs out (a :class:`Runner`).

    Each window is normalised on its own by the checkpoint's ``Wav2Vec2FeatureExtractor`` (as the ASR
    pipeline does it), so a window's output depends on its samples alone. Windows of equal length are stacked
    into batches of at most ``max_batch`` with no padding and no mask; windows of other lengths run in their
    own batches. A backend whose output for a window would depend on its batch companions (dynamic int8
    quantisation scales each call's activations as a whole) sets ``per_window``: it is called with one window
    at a time, which keeps the finals independent of how audio arrived.

    Subclasses implement :meth:`_forward` and :attr:`n_parameters`.
    """

    def __init__(self, tokenizer: Any, feature_extractor: Any, *, name: str, device: str, precision: str,
                 max_batch: int = 64, source: str | None = None, revision: str | None = None,
                 per_window: bool = False, geometry: FrameGeometry = WAV2VEC2_GEOMETRY) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.vocab = TokenizerVocabulary(tokenizer)
        self.name = name
        self.device = device
        self.precision = precision
        """the arithmetic the model runs in: ``float32``, ``float16``, ``bfloat16`` or ``int8``"""
        self.max_batch = 1 if per_window else max_batch
        self.per_window = per_window
        self.sample_rate = int(getattr(feature_extractor, "sampling_rate", SAMPLE_RATE))
        self.stats = RunStats()
        self.source = source or name
        """where the checkpoint was loaded from (a directory or a hub id): :meth:`shipped_file` looks there"""
        self.revision = revision
        self.geometry = geometry
        """where the output frames lie (the engine's schedule is cut on this grid)"""
        self._lock = threading.Lock()

    backend: str = ""
    """``torch`` or ``onnxruntime``"""

    @property
    @abstractmethod
    def n_parameters(self) -> int:
        """Model size, for summaries."""

    @abstractmethod
    def _forward(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        """Log-probs of equal-length windows (at most ``max_batch``); raise InferenceError on failure."""

    def __call__(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.run(windows)

    def run(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return one ``[frames, vocab]`` float32 log-probability array per window."""
        out: list[np.ndarray | None] = [None] * len(windows)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, w in enumerate(windows):
            if len(w) < self.geometry.receptive_field:
                out[i] = np.zeros((0, self.vocab.size), dtype=np.float32)
            else:
                groups[len(w)].append(i)
        t0 = time.perf_counter()
        with self._lock:
            for idx in groups.values():
                for k in range(0, len(idx), self.max_batch):
                    part = idx[k : k + self.max_batch]
                    self.stats.calls += 1
                    # (a feature extractor may pad a window's features, and the model give a frame for the
                    # padding: frames past the grid's count are the padding's, never the window's)
                    n = self.geometry.n_frames(len(windows[part[0]]))
                    for i, lp in zip(part, self._forward([windows[i] for i in part]), strict=True):
                        out[i] = lp[:n]
        self.stats.seconds += time.perf_counter() - t0
        return [o for o in out if o is not None]

    def normalise(self, batch: list[np.ndarray]) -> np.ndarray:
        """``[windows, samples]`` float32 model input: each window normalised by the feature extractor."""
        feats = self.feature_extractor(batch, sampling_rate=self.sample_rate, return_tensors="np",
                                       return_attention_mask=False)
        return np.asarray(feats["input_values"], dtype=np.float32)

    def filterbanks(self, batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``[windows, frames, 160]`` stacked log-mel features and their ``[windows, frames]`` attention mask.

        For Wav2Vec2-BERT: the checkpoint's ``SeamlessM4TFeatureExtractor`` computes each window's filterbanks and
        normalises them per mel bin over that window alone, as the ASR pipeline does for each chunk; the mask
        is the one it returns (it pads to an even number of 10 ms frames), which the pipeline passes on too.
        """
        feats = self.feature_extractor(batch, sampling_rate=self.sample_rate, return_tensors="np",
                                       return_attention_mask=True)
        return (np.asarray(feats["input_features"], dtype=np.float32),
                np.asarray(feats["attention_mask"], dtype=np.int64))

    def shipped_file(self, name: str) -> Path | None:
        """The checkpoint's own file ``name``: in its directory, or in the hub cache (never downloaded)."""
        return checkpoint_file(self.source, name, self.revision)

    def warmup(self, samples: int) -> float:
        """Run one window of silence-like noise; return the seconds it took."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        self.run([rng.normal(0, 1e-3, samples).astype(np.float32)])
        return time.perf_counter() - t0


def probe_windows(n: int, samples: int) -> np.ndarray:
    """``[n, samples]`` speech-like model inputs (noise in bursts of different rhythms), normalised as the feature
    extractor normalises a window: for checking an export and timing a backend without real audio."""
    rng = np.random.default_rng(0)
    bursts = np.sin(np.arange(samples) / (1600.0 / np.arange(1, n + 1))[:, None]) > 0
    x = rng.normal(0, 1, (n, samples)) * bursts
    return np.asarray((x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-7), dtype=np.float32)
