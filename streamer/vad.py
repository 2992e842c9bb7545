"""Voice activity: Silero VAD's ONNX model, shipped in the ``silero-vad`` wheel, run with onnxruntime.

The engine does not run it (it stays pure): a :class:`SpeechDetector` per stream turns the audio as it
arrives into one speech probability per :data:`VAD_FRAME` samples (32 ms), and the caller hands those to
:meth:`streamer.engine.StreamSession.accept_speech`::

    vad = SpeechDetector(load_vad())
    session.accept_audio(chunk)
    session.accept_speech(vad.accept(chunk))

Many streams share a run of the model: give each detector its audio (:meth:`SpeechDetector.add`), score them
together (:func:`score`: one run per frame over every stream with a frame pending, in lockstep), then read each
one's probabilities (:meth:`SpeechDetector.take`). A run over a batch costs 0.04-0.06 ms per stream-frame here,
one stream's frame alone 0.09-0.12 ms, mostly the call's overhead; a stream scored alone has all its pending
frames run in one call of the wheel's sequence variant instead (:meth:`VadModel.run_sequence`). A row's numbers
do not depend on the batch: onnxruntime gives every row of a batch, whatever its size and whatever the other
rows hold, and the sequence variant gives every frame, bitwise the probability and state of the frame run alone
(``tests/test_vad_batch.py`` checks it), so batching changes no final.

The probabilities depend only on the audio, not on how it was chunked: frame ``j`` is samples
``[512 j, 512 j + 512)`` of the stream, read with the 64 samples before it (the model's context) and
the recurrent state the frames before it left, exactly as silero-vad's own ``OnnxWrapper`` runs it. So
:func:`speech_probabilities` over a whole buffer gives the same numbers, and :func:`streamer.engine.reference`
with them the same finals as any live chunking.

Why this model (measured on this project's 2-core CPU, ``docs/engine.md``): about 0.3 % of one core per
stream (0.1 ms per 32 ms frame; batched, less), and on espeak-ng speech with pauses under background noise
it ends utterances where webrtcvad either cuts inside sentences or hears the noise as speech. The wheel is
only read for its ``.onnx`` file: its Python package would import torch, which this module never needs.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from streamer.exceptions import StreamerError

__all__ = ["VAD_FRAME", "SpeechDetector", "VadModel", "load_vad", "score", "speech_probabilities"]

VAD_FRAME = 512
"""samples per speech probability at 16 kHz (32 ms), fixed by the model"""
_CONTEXT = 64  # samples of the previous frame the model reads with each frame
_STATE = (2, 1, 128)  # one stream's recurrent state (the model takes [2, streams, 128])


def model_path(name: str = "silero_vad.onnx") -> Path:
    """The ONNX file inside the installed ``silero-vad`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise StreamerError("voice activity detection needs the silero-vad package (pip install silero-vad)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise StreamerError(f"the silero-vad package has no {name}")
    return path


SEQUENCE_MODEL = "silero_vad_16k_sequence.onnx"
"""the wheel's variant of the model that runs one stream's frames in one call (the same weights and steps)"""


class VadModel:
    """One onnxruntime session of the model, shared by every stream (runs are thread-safe).

    One thread per run: a frame takes 0.1 ms, and the engine thread should not fan out over the cores
    that the speech model needs.

    Beside it, the wheel's sequence variant (:data:`SEQUENCE_MODEL`): one stream's frames in one run, its LSTM
    state as ``h`` and ``c`` (the two rows of ``state``). It gives bitwise the probabilities and state of the
    frames run one by one (``tests/test_vad_batch.py``), and most of a run's cost is the call's: a stream's 100 ms
    message (three frames) costs 0.27 ms in one run against 0.41 ms in three. None when the wheel has no such file
    (or with a ``path`` of its own): then every frame is a run.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = Path(path) if path is not None else model_path()
        self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self._rate = np.array(16_000, dtype=np.int64)
        self._sequence = None
        sequence = self.path.with_name(SEQUENCE_MODEL)
        if path is None and sequence.is_file():
            self._sequence = ort.InferenceSession(str(sequence), opts, providers=["CPUExecutionProvider"])

    @property
    def runs_sequences(self) -> bool:
        """Whether :meth:`run_sequence` takes many frames in one run."""
        return self._sequence is not None

    def run_sequence(self, frames: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score one stream's ``frames`` (``[frames, 64 + 512]``, in order) from its ``state`` (``[2, 1, 128]``).

        Returns the speech probabilities (``[frames]``) and the state after the last frame: what :meth:`run`
        gives frame by frame, in one run when the model has its sequence variant.
        """
        if self._sequence is None:
            probs = np.empty(len(frames), dtype=np.float32)
            for j in range(len(frames)):
                p, state = self.run(frames[j : j + 1], state)
                probs[j] = p[0]
            return probs, state
        p, h, c = self._sequence.run(None, {"input": frames, "h": state[0:1], "c": state[1:2]})
        return np.asarray(p, dtype=np.float32).reshape(-1), np.concatenate([h, c]).astype(np.float32, copy=False)

    def run(self, frames: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score ``frames`` (``[streams, 64 + 512]``: context, then the frame) with ``state`` (``[2, streams, 128]``).

        Returns the speech probabilities (``[streams]``) and the next state.
        """
        out, new_state = self._session.run(None, {"input": frames, "state": state, "sr": self._rate})
        return np.asarray(out, dtype=np.float32).reshape(-1), np.asarray(new_state, dtype=np.float32)


_shared: VadModel | None = None
_shared_lock = threading.Lock()


def load_vad() -> VadModel:
    """The process's one :class:`VadModel` (loaded on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = VadModel()
        return _shared


class SpeechDetector:
    """The model's state for one stream: samples in, one speech probability per full 512-sample frame out.

    Either :meth:`accept` samples (scored at once, alone), or :meth:`add` them, let :func:`score` run the frames
    of many detectors together, and :meth:`take` the probabilities; the numbers are the same.
    """

    def __init__(self, model: VadModel) -> None:
        self.model = model
        # The model's context (the 64 samples before the next frame; zeros at the start), then the samples
        # added and not yet scored: after k frames are scored, the next context starts at 512 k.
        self._audio = np.zeros(_CONTEXT, dtype=np.float32)
        self._state = np.zeros(_STATE, dtype=np.float32)  # [2, 1, 128]: the model's state for this stream
        self._scored: list[np.ndarray] = []  # probabilities scored and not yet taken
        self.frames = 0
        """frames scored so far (the next probability is for samples ``[512 frames, 512 frames + 512)``)"""

    @property
    def ready(self) -> int:
        """Full frames added and not yet scored."""
        return (len(self._audio) - _CONTEXT) // VAD_FRAME

    def add(self, samples: np.ndarray) -> None:
        """Add float32 16 kHz mono samples, to be scored by :func:`score` or :meth:`take`."""
        self._audio = np.concatenate([self._audio, np.asarray(samples, dtype=np.float32)])

    def take(self) -> np.ndarray:
        """The probabilities of the frames completed since the last take, scoring (alone) any still pending."""
        if self.ready:
            score([self])
        out = np.concatenate(self._scored) if self._scored else np.zeros(0, dtype=np.float32)
        self._scored.clear()
        return out

    def accept(self, samples: np.ndarray) -> np.ndarray:
        """Add samples; return the probabilities of the frames they completed (maybe none)."""
        self.add(samples)
        return self.take()


def score(detectors: Iterable[SpeechDetector]) -> None:
    """Score the full frames pending in ``detectors``, one model run per frame over every detector with one left
    (a detector alone: one run over all its frames, :meth:`VadModel.run_sequence`).

    Each detector keeps its probabilities for :meth:`SpeechDetector.take`. Runs go in lockstep: the first run
    takes each detector's first pending frame, the next the second of those with two, and so on, so a stream
    with a long piece pending adds runs of its own only past the others' frames.
    """
    by_model: dict[VadModel, list[SpeechDetector]] = {}
    for d in detectors:
        if d.ready:
            by_model.setdefault(d.model, []).append(d)
    for model, group in by_model.items():
        if len(group) == 1:  # one stream: all its frames in one run
            _score_alone(group[0])
            continue
        # The streams with the most frames first: the rows of each run are then the first rows of the batch,
        # and the Python work per stream is done once per call, not once per frame.
        group.sort(key=lambda d: -d.ready)
        steps = [d.ready for d in group]
        audio = np.zeros((len(group), _CONTEXT + steps[0] * VAD_FRAME), dtype=np.float32)
        for r, (d, n) in enumerate(zip(group, steps, strict=True)):
            audio[r, : _CONTEXT + n * VAD_FRAME] = d._audio[: _CONTEXT + n * VAD_FRAME]
        state = np.concatenate([d._state for d in group], axis=1)
        probs = np.empty((len(group), steps[0]), dtype=np.float32)
        done = 0
        try:
            for j in range(steps[0]):
                m = sum(1 for n in steps if n > j)
                at = j * VAD_FRAME
                p, after = model.run(np.ascontiguousarray(audio[:m, at : at + _CONTEXT + VAD_FRAME]),
                                     state if m == len(group) else np.ascontiguousarray(state[:, :m]))
                probs[:m, j] = p
                state[:, :m] = after
                done = j + 1
        finally:  # (a run that raised changed no detector: the frames before it stay scored, the rest pending)
            for r, (d, n) in enumerate(zip(group, steps, strict=True)):
                k = min(n, done)
                d._audio = d._audio[k * VAD_FRAME :]
                d._state = state[:, r : r + 1]
                d._scored.append(probs[r, :k])
                d.frames += k


def _score_alone(d: SpeechDetector) -> None:
    """Score the frames pending in one detector, in one run where the model can (:meth:`VadModel.run_sequence`)."""
    n = d.ready
    frames = np.lib.stride_tricks.sliding_window_view(d._audio[: _CONTEXT + n * VAD_FRAME], _CONTEXT + VAD_FRAME)
    probs, state = d.model.run_sequence(np.ascontiguousarray(frames[::VAD_FRAME]), d._state)
    d._audio = d._audio[n * VAD_FRAME :]  # (a run that raised changed nothing)
    d._state = state
    d._scored.append(probs)
    d.frames += n


def speech_probabilities(audio: np.ndarray, model: VadModel | None = None) -> np.ndarray:
    """The probabilities of every full frame of ``audio`` (what a :class:`SpeechDetector` yields over it)."""
    return SpeechDetector(model or load_vad()).accept(audio)


def speech_runs(probs: Sequence[float] | np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """Frame spans ``[start, end)`` the probabilities call speech (a plain threshold; for reports and tests)."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for j, p in enumerate(np.asarray(probs).tolist()):
        if p >= threshold and start is None:
            start = j
        elif p < threshold and start is not None:
            runs.append((start, j))
            start = None
    if start is not None:
        runs.append((start, len(probs)))
    return runs
