"""Voice activity: Silero VAD's ONNX model, shipped in the ``silero-vad`` wheel, run with onnxruntime.

The engine does not run it (it stays pure): a :class:`SpeechDetector` per stream turns the audio as it
arrives into one speech probability per :data:`VAD_FRAME` samples (32 ms), and the caller hands those to
:meth:`streamer.engine.StreamSession.accept_speech`::

    vad = SpeechDetector(load_vad())
    session.accept_audio(chunk)
    session.accept_speech(vad.accept(chunk))

Many streams share a run of the model: give each detector its audio (:meth:`SpeechDetector.add`), score them
together (:func:`score`: one run over every frame pending in every stream), then read each one's probabilities
(:meth:`SpeechDetector.take`). The run is the wheel's sequence variant of the model, taken at load to run many
streams at once (:meth:`VadModel.run_streams`): the frames of all streams go through the model's convolutions
as one batch, and its LSTM steps the streams side by side, each over its own frames. A row's numbers do not
depend on the batch: onnxruntime gives every frame, whatever the batch and whatever the other rows hold, bitwise
the probability and state of the frame run alone (``tests/test_vad_batch.py`` checks it), so batching changes
no final.

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
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from streamer.exceptions import StreamerError

logger = logging.getLogger("streamer.vad")

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


def _streams_model(path: Path) -> bytes:
    """The wheel's sequence variant (:data:`SEQUENCE_MODEL`) made to run many streams' frames in one run.

    The variant takes one stream's frames (``input``, ``[frames, 64 + 512]``), runs each through the short-time
    transform and the encoder's convolutions, then steps its LSTM over them from the state ``h``, ``c``
    (``[1, 1, 128]``). Here the frames of many streams come as the rows of ``input``, in any order; ``index``
    (``[steps, streams]``) says which row is each stream's frame at each step (any row past a stream's last), and
    ``lens`` (``[streams]``) how many frames each has: the LSTM then steps the streams side by side, each over its
    own frames, from ``h``, ``c`` (``[1, streams, 128]``), and ``hn``, ``cn`` are each stream's state after its
    last frame (ONNX's ``sequence_lens``). ``speech_probs`` is ``[streams * steps]``, stream by stream.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    [lstm] = [n for n in graph.node if n.op_type == "LSTM"]
    if list(lstm.input[5:7]) != ["h", "c"] or any(lstm.input[4:5]):
        raise ValueError(f"{path.name}: its LSTM does not read the state h, c as this module expects")
    for value in [*graph.input, *graph.output]:
        if value.name in ("h", "c", "hn", "cn"):
            dim = value.type.tensor_type.shape.dim[1]
            dim.ClearField("dim_value")
            dim.dim_param = "streams"
    graph.input.extend([helper.make_tensor_value_info("index", TensorProto.INT64, ["steps", "streams"]),
                        helper.make_tensor_value_info("lens", TensorProto.INT32, ["streams"])])
    graph.initializer.append(numpy_helper.from_array(np.array([-1, _STATE[2]], np.int64), "streams/rows"))
    # the encoder's output, one [1, 128] row per frame -> [frames, 128] -> [steps, streams, 128]
    graph.node.extend([helper.make_node("Reshape", [lstm.input[0], "streams/rows"], ["streams/flat"]),
                       helper.make_node("Gather", ["streams/flat", "index"], ["streams/steps"], axis=0)])
    lstm.input[0] = "streams/steps"
    lstm.input[4] = "lens"
    del graph.value_info[:]  # (shapes inferred for one stream)
    nodes = list(graph.node)  # the two new nodes must come before the LSTM that reads them
    at = nodes.index(lstm)
    nodes = [*nodes[:at], *nodes[-2:], *nodes[at:-2]]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class VadModel:
    """One onnxruntime session of the model, shared by every stream (runs are thread-safe).

    One thread per run: a frame takes 0.1 ms, and the engine thread should not fan out over the cores
    that the speech model needs.

    Beside it, the wheel's sequence variant (:data:`SEQUENCE_MODEL`), taken to run many streams' frames in one run
    (:meth:`run_streams`): the same weights and steps, and bitwise the probabilities and state of the frames run
    one by one (``tests/test_vad_batch.py``). Live streams' messages come at their own times, so the engine thread
    scores a few streams at a time, three frames each (100 ms): in one run for them all, not one run per frame
    over the streams, the detector cost 6 % less at two streams a run and 14 % less at four, and 8 % more at eight
    (``clients/frontcpu.py --streams 32 --vad-batch K --compare``); two daemons side by side on one core, 16
    streams each, the one scoring so used 1-5 % less CPU in all nine repetitions (``docs/scaling.md``). Without the
    variant (or with a ``path`` of its own), :meth:`run_streams` runs frame by frame.
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
        self._streams = None
        sequence = self.path.with_name(SEQUENCE_MODEL)
        if path is None and sequence.is_file():
            try:
                self._streams = ort.InferenceSession(_streams_model(sequence), opts,
                                                     providers=["CPUExecutionProvider"])
            except Exception as exc:  # (a wheel whose variant is built otherwise) the same numbers, frame by frame
                logger.warning("the voice-activity detector runs frame by frame: %s cannot run many streams (%s)",
                               sequence.name, exc)

    @property
    def runs_streams(self) -> bool:
        """Whether :meth:`run_streams` takes every frame of many streams in one run."""
        return self._streams is not None

    def run_streams(self, frames: np.ndarray, counts: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score the frames of many streams: ``frames`` (``[rows, 64 + 512]``) holds each stream's frames in order,
        stream after stream, ``counts[i]`` of stream ``i`` (at least one each), whose state is ``state[:, i]``
        (``[2, streams, 128]``).

        Returns the speech probabilities (``[rows]``, in the order of ``frames``) and each stream's state after
        its last frame: what :meth:`run` gives frame by frame, in one run when the model has its sequence variant.
        """
        counts = np.asarray(counts, dtype=np.int32)
        if self._streams is None:
            probs = np.empty(len(frames), dtype=np.float32)
            state = state.copy()
            row = 0
            for i, n in enumerate(counts.tolist()):
                s = state[:, i : i + 1]
                for j in range(row, row + n):
                    p, s = self.run(frames[j : j + 1], s)
                    probs[j] = p[0]
                state[:, i : i + 1] = s
                row += n
            return probs, state
        starts = np.cumsum(counts) - counts
        steps = np.arange(int(counts.max()), dtype=np.int64)[:, None]
        index = np.where(steps < counts, starts + steps, 0)  # [steps, streams]: each stream's row at each step
        p, h, c = self._streams.run(None, {"input": frames, "index": index, "lens": counts,
                                           "h": np.ascontiguousarray(state[0:1]),
                                           "c": np.ascontiguousarray(state[1:2])})
        by_step = np.asarray(p, dtype=np.float32).reshape(len(counts), -1)  # [streams, steps]
        return by_step[steps.T < counts[:, None]], np.concatenate([h, c]).astype(np.float32, copy=False)

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
    """Score the full frames pending in ``detectors``: one run of each model over all of them
    (:meth:`VadModel.run_streams`). Each detector keeps its probabilities for :meth:`SpeechDetector.take`."""
    by_model: dict[VadModel, list[SpeechDetector]] = {}
    for d in detectors:
        if d.ready:
            by_model.setdefault(d.model, []).append(d)
    for model, group in by_model.items():
        counts = [d.ready for d in group]
        frames = np.concatenate([_frames(d, n) for d, n in zip(group, counts, strict=True)])
        probs, state = model.run_streams(frames, np.array(counts), np.concatenate([d._state for d in group], axis=1))
        # (a run that raised changed no detector: their frames stay pending)
        row = 0
        for i, (d, n) in enumerate(zip(group, counts, strict=True)):
            d._audio = d._audio[n * VAD_FRAME :]
            d._state = state[:, i : i + 1]
            d._scored.append(probs[row : row + n])
            d.frames += n
            row += n


def _frames(d: SpeechDetector, n: int) -> np.ndarray:
    """A detector's first ``n`` pending frames, each with its context: a view, ``[n, 64 + 512]``."""
    audio = d._audio[: _CONTEXT + n * VAD_FRAME]
    return np.lib.stride_tricks.sliding_window_view(audio, _CONTEXT + VAD_FRAME)[::VAD_FRAME]


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
