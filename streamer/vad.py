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
no final. Its convolutions are done as onnxruntime does large products (:func:`_faster`): about a third less CPU
over live streams, and bitwise the same numbers, which the model checks at load on the machine it runs on.

The probabilities depend only on the audio, not on how it was chunked: frame ``j`` is samples
``[512 j, 512 j + 512)`` of the stream, read with the 64 samples before it (the model's context) and
the recurrent state the frames before it left, exactly as silero-vad's own ``OnnxWrapper`` runs it. So
:func:`speech_probabilities` over a whole buffer gives the same numbers, and :func:`streamer.engine.reference`
with them the same finals as any live chunking.

Why this model (measured on this project's 2-core CPU, ``docs/engine.md``): about 0.3 % of one core per
stream (0.1 ms per 32 ms frame alone; 0.03-0.05 ms batched), and on espeak-ng speech with pauses under background noise
it ends utterances where webrtcvad either cuts inside sentences or hears the noise as speech. The wheel is
only read for its ``.onnx`` file: its Python package would import torch, which this module never needs.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


_PADDED = _CONTEXT + VAD_FRAME + 256  # a frame and its context as the short-time transform reads it (reflect-padded)
GROUP = 5
"""frames side by side in one image of the encoder's first convolutions (:func:`_faster`): at most 32 columns"""
GROUPED_FROM = 5
"""the fewest frames a run takes the grouped variant for: below, its rows padded to a multiple of :data:`GROUP` cost
more than it saves (one stream's run, per frame: 1 frame 125 → 200 µs, 2 frames 83 → 104; from 5 frames on the same
or less: 58 → 42 µs at 5, 54 → 54 at 6, 48 → 34 at 9)"""


class _Image(NamedTuple):
    """A grouped convolution's output image (:func:`_faster`): :data:`GROUP` frames side by side."""

    conv: str  # the rewrite's prefix: the image is ``{conv}/y``
    per: int  # columns per frame
    cols: int  # of which the first are the frame's own (the rest read past it)
    width: int  # the image's columns


def _faster(data: bytes, grouped: bool) -> bytes | None:
    """The streams model (:func:`_streams_model`) with its convolutions done as onnxruntime does large products;
    None when its graph is not the one this expects.

    onnxruntime runs the model's convolutions frame after frame, each a product with four columns or fewer, which
    the CPU does at a fraction of its speed. Here:

    - the short-time transform (258 filters of 256 samples at a stride of 128 over each frame's padded 832 samples;
      the model reads the last four of its five columns) is one ``[4 frames, 256] × [256, 258]`` product over every
      frame of the run, and the magnitude is taken in that layout;
    - ``grouped``: the encoder's convolutions that give a frame two columns or more (the first two) each run over
      images of :data:`GROUP` frames side by side, each frame's columns padded as before (the run's frames must be a
      multiple of :data:`GROUP`; rows past the last are never read). The first one's image is the magnitude with each
      frame's columns padded, transposed once; the second reads the first one's image itself, through the Relu
      between them, each frame's columns moved by its padding and the columns between frames made zero: the frames
      are not cut out and put side by side again (that glue was a quarter of the run's time).

    Each number is the same sum of the same products in the same order: a product of at most 32 columns sums its
    terms in one block in onnxruntime's CPU kernels, as the convolution of one frame does (a wider image, or the
    filters as the constant operand, sums them in blocks, and differs in the last bits). :class:`VadModel` checks at
    load that the probabilities are bitwise those of the model run frame by frame, and keeps the plain variant
    otherwise. Against the streams model as the wheel ships it, the detector's run per frame costs a seventh less in
    runs of 3 frames, a fifth at 6, two fifths at 12 and more than half in runs of 30 frames or more
    (``docs/scaling.md``); the last two convolutions, one column a frame, gain nothing so.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.ParseFromString(data)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = list(graph.node)

    def const(name: str, value: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), f"faster/const/{name}"))
        return f"faster/const/{name}"

    def users(name: str) -> list[Any]:
        return [n for n in nodes if name in n.input]

    def attrs(node: Any) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    # the transform: conv -> two Slices of the channels (real, imaginary) -> each a Slice of its last four columns
    # -> Pow -> Add -> Sqrt
    convs = [n for n in nodes if n.op_type == "Conv" and list(weights.get(n.input[1], onnx.TensorProto()).dims)
             == [258, 1, 256]]
    if len(convs) != 1:
        return None
    [conv] = convs
    a = attrs(conv)
    if list(a.get("strides", [])) != [128] or any(a.get("pads", [0, 0])) or len(conv.input) != 2:
        return None
    try:
        halves = users(conv.output[0])
        [[re_cols], [im_cols]] = [users(h.output[0]) for h in halves]
        [[re_pow], [im_pow]] = [users(c.output[0]) for c in (re_cols, im_cols)]
        [add] = users(re_pow.output[0])
        [sqrt] = users(add.output[0])
    except ValueError:
        return None
    if ([n.op_type for n in (*halves, re_cols, im_cols, re_pow, im_pow, add, sqrt)]
            != ["Slice"] * 4 + ["Pow", "Pow", "Add", "Sqrt"] or add.input[1] != im_pow.output[0]):
        return None
    filters = numpy_helper.to_array(weights[conv.input[1]])[:, 0, :]  # [258, 256]
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(filters.T), "faster/filters"))
    # [frames, 1, 832] -> samples 128..767 as five blocks of 128 -> column j reads blocks j and j + 1
    steps = [
        helper.make_node("Reshape", [conv.input[0], const("padded", [-1, _PADDED])], ["faster/x"]),
        helper.make_node("Slice", ["faster/x", const("from", [128]), const("to", [768]), const("axis", [1])],
                         ["faster/read"]),
        helper.make_node("Reshape", ["faster/read", const("blocks", [-1, 5, 128])], ["faster/blocks"]),
        helper.make_node("Slice", ["faster/blocks", const("0", [0]), const("4", [4]), "faster/const/axis"],
                         ["faster/left"]),
        helper.make_node("Slice", ["faster/blocks", const("1", [1]), const("5", [5]), "faster/const/axis"],
                         ["faster/right"]),
        helper.make_node("Concat", ["faster/left", "faster/right"], ["faster/columns"], axis=2),  # [frames, 4, 256]
        helper.make_node("MatMul", ["faster/columns", "faster/filters"], ["faster/spectrum"]),  # [frames, 4, 258]
        helper.make_node("Slice", ["faster/spectrum", "faster/const/0", const("129", [129]), const("last", [2])],
                         ["faster/re"]),
        helper.make_node("Slice", ["faster/spectrum", "faster/const/129", const("258", [258]), "faster/const/last"],
                         ["faster/im"]),
        helper.make_node("Pow", ["faster/re", re_pow.input[1]], ["faster/re2"]),
        helper.make_node("Pow", ["faster/im", im_pow.input[1]], ["faster/im2"]),
        helper.make_node("Add", ["faster/re2", "faster/im2"], ["faster/power"]),
        helper.make_node("Sqrt", ["faster/power"], ["faster/magnitude"]),
        helper.make_node("Transpose", ["faster/magnitude"], [sqrt.output[0]], perm=[0, 2, 1]),  # [frames, 129, 4]
    ]
    gone = {id(n) for n in (conv, *halves, re_cols, im_cols, re_pow, im_pow, add, sqrt)}
    at = nodes.index(sqrt)  # (every input of the steps is made before it)
    nodes = [*(n for n in nodes[:at] if id(n) not in gone), *steps, *(n for n in nodes[at:] if id(n) not in gone)]

    def mask(name: str, padded: int, pad: int, width: int) -> str:
        """1 over each frame's ``width`` columns of an image (from ``pad`` in every ``padded``), 0 between."""
        row = np.zeros(GROUP * padded, np.float32)
        for j in range(GROUP):
            row[j * padded + pad : j * padded + pad + width] = 1
        graph.initializer.append(numpy_helper.from_array(row, f"faster/const/{name}"))
        return f"faster/const/{name}"

    if grouped:
        width = 4  # the columns each frame has
        out = []
        images_of: dict[str, _Image] = {}  # a Relu's output -> the image of the grouped convolution it follows
        for node in nodes:
            w = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
            if w is None or len(w.dims) != 3:
                out.append(node)
                continue
            a = attrs(node)
            (pad, pad_end), [stride], (filters_n, channels, k) = a.get("pads", [0, 0]), a.get("strides", [1]), w.dims
            padded = width + pad + pad_end
            cols = (padded - k) // stride + 1  # a frame's columns out
            image = (GROUP * padded - k) // stride + 1  # an image's (at most 32: one block of terms, as for a frame)
            if (cols < 2 or image > 32 or padded % stride or a.get("group", 1) != 1
                    or list(a.get("dilations", [1])) != [1]):
                out.append(node)
                width = cols
                continue
            per = padded // stride  # a frame's columns out of the image, the last ones read past the frame
            tag = node.name.strip("/")
            name = f"faster/{tag}"
            fed = images_of.get(node.input[0])
            made = next((n for n in nodes if node.input[0] in n.output), None)
            if fed is not None and fed.per == padded and fed.cols == width and GROUP * padded >= fed.width + pad:
                # The input is the image of the grouped convolution before, through a Relu: each frame's columns
                # moved by ``pad`` and the columns between frames made zero give this one's image as it would be
                # cut from the frames (the same numbers, each one copied or a +0), without the frames between.
                out += [
                    helper.make_node("Relu", [f"{fed.conv}/y"], [f"{name}/y_before"]),
                    helper.make_node("Pad", [f"{name}/y_before", const(f"{tag}/shift", [
                        0, 0, pad, 0, 0, GROUP * padded - fed.width - pad])], [f"{name}/shifted"]),
                    helper.make_node("Mul", [f"{name}/shifted", mask(f"{tag}/mask", padded, pad, width)],
                                     [f"{name}/images"]),
                ]
            elif made is not None and made.op_type == "Transpose" and list(attrs(made).get("perm", [])) == [0, 2, 1]:
                # The input is a transpose of frames' columns (the short-time transform's magnitude, [frames, 4,
                # channels]): pad each frame's columns there, and one transpose of frames side by side gives the image.
                out += [
                    helper.make_node("Pad", [made.input[0], const(f"{tag}/rows", [0, pad, 0, 0, pad_end, 0])],
                                     [f"{name}/padded_rows"]),
                    helper.make_node("Reshape", [f"{name}/padded_rows",
                                                 const(f"{tag}/image_rows", [-1, GROUP * padded, channels])],
                                     [f"{name}/image_rows"]),
                    helper.make_node("Transpose", [f"{name}/image_rows"], [f"{name}/images"], perm=[0, 2, 1]),
                ]
            else:
                out += [
                    helper.make_node("Pad", [node.input[0], const(f"{tag}/pads", [0, 0, pad, 0, 0, pad_end])],
                                     [f"{name}/padded"]),
                    helper.make_node("Reshape", [f"{name}/padded",
                                                 const(f"{tag}/frames", [-1, GROUP, channels, padded])],
                                     [f"{name}/frames"]),
                    helper.make_node("Transpose", [f"{name}/frames"], [f"{name}/side"], perm=[0, 2, 1, 3]),
                    helper.make_node("Reshape", [f"{name}/side",
                                                 const(f"{tag}/images", [-1, channels, GROUP * padded])],
                                     [f"{name}/images"]),
                ]
            out += [
                helper.make_node("Conv", [f"{name}/images", *node.input[1:]], [f"{name}/y"], kernel_shape=[k],
                                 pads=[0, 0], strides=[stride]),
                helper.make_node("Pad", [f"{name}/y", const(f"{tag}/tail", [0, 0, 0, 0, 0, GROUP * per - image])],
                                 [f"{name}/y_padded"]),
                helper.make_node("Reshape", [f"{name}/y_padded", const(f"{tag}/y_frames", [-1, filters_n, GROUP, per])],
                                 [f"{name}/y_frames"]),
                helper.make_node("Slice", [f"{name}/y_frames", "faster/const/0", const(f"{tag}/cols", [cols]),
                                           const(f"{tag}/axis", [3])], [f"{name}/y_cols"]),
                helper.make_node("Transpose", [f"{name}/y_cols"], [f"{name}/y_side"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", [f"{name}/y_side", const(f"{tag}/out", [-1, filters_n, cols])],
                                 [node.output[0]]),
            ]
            width = cols
            for relu in users(node.output[0]):
                if relu.op_type == "Relu":
                    images_of[relu.output[0]] = _Image(name, per, cols, image)
        # Leave out what no longer leads to an output: the frames cut from an image that the next convolution reads
        # itself, the Relu after them, a transpose whose input is now padded instead. (The nodes are in order: from
        # the last, a node is kept if a kept node or the graph's output reads it.)
        read = {o.name for o in graph.output}
        kept = []
        for n in reversed(out):
            if read.intersection(n.output):
                kept.append(n)
                read.update(n.input)
        nodes = kept[::-1]
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

    The variant's convolutions run as large products (:func:`_faster`: :attr:`product`, and :attr:`grouped` for runs
    of :data:`GROUPED_FROM` frames or more), each kept only if it gives bitwise the numbers of the frames run one by
    one in a few runs at load.
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
        self._grouped = None
        self.product = False
        """whether the streams' runs take the short-time transform as one product (:func:`_faster`)"""
        self.grouped = False
        """whether runs of :data:`GROUPED_FROM` frames or more also take the encoder's first convolutions over images
        of :data:`GROUP` frames (:func:`_faster`)"""
        sequence = self.path.with_name(SEQUENCE_MODEL)
        if path is None and sequence.is_file():
            try:
                streams = _streams_model(sequence)
                self._streams = ort.InferenceSession(streams, opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # (a wheel whose variant is built otherwise) the same numbers, frame by frame
                logger.warning("the voice-activity detector runs frame by frame: %s cannot run many streams (%s)",
                               sequence.name, exc)
            else:
                self._take_faster(streams, opts)

    def _take_faster(self, streams: bytes, opts: Any) -> None:
        """Run the streams with the convolutions as large products (:func:`_faster`), each variant only if this
        machine's onnxruntime gives with it bitwise the numbers of the model run frame by frame (a check of a few
        runs at load; otherwise the runs stay as they were)."""
        import onnxruntime as ort

        rng = np.random.default_rng(0)
        t = np.arange(41 * VAD_FRAME, dtype=np.float32) / 16_000
        sound = (0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t) + rng.normal(0, 0.05, len(t))).astype(np.float32)
        runs = []
        for sizes in ([1], [3, 1, 8], [40], [2] * 16, [3] * 4):
            rows = sum(sizes)
            frames = np.lib.stride_tricks.sliding_window_view(sound, _CONTEXT + VAD_FRAME)[::VAD_FRAME][:rows]
            frames = np.ascontiguousarray(frames * rng.uniform(0.2, 3.0, (rows, 1)), dtype=np.float32)
            state = rng.normal(0, 0.3, (2, len(sizes), 128)).astype(np.float32)
            runs.append((frames, np.array(sizes, np.int32), state))
        for grouped in (False, True):
            try:
                data = _faster(streams, grouped)
                session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]) if data else None
            except Exception as exc:
                logger.info("the voice-activity detector's convolutions stay as they are: %s", exc)
                return
            if session is None:
                logger.info("the voice-activity detector's convolutions stay as they are: its graph is not the one "
                            "expected")
                return
            for frames, counts, state in runs:
                want = self._frame_by_frame(frames, counts, state)
                got = _run_streams(session, _grouped_rows(frames) if grouped else frames, counts, state)
                if not all(np.array_equal(a, b) for a, b in zip(want, got, strict=True)):
                    logger.info("the voice-activity detector's convolutions stay as they are%s: done as products, "
                                "this machine's onnxruntime gives other numbers in the last bits",
                                " in large runs" if grouped else "")
                    return
            if grouped:
                self._grouped, self.grouped = session, True
            else:
                self._streams, self.product = session, True

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
            return self._frame_by_frame(frames, counts, state)
        if self._grouped is not None and len(frames) >= GROUPED_FROM:
            return _run_streams(self._grouped, _grouped_rows(frames), counts, state)
        return _run_streams(self._streams, frames, counts, state)

    def _frame_by_frame(self, frames: np.ndarray, counts: np.ndarray, state: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`run_streams` one frame at a time (the model as silero-vad runs it)."""
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

    def run(self, frames: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score ``frames`` (``[streams, 64 + 512]``: context, then the frame) with ``state`` (``[2, streams, 128]``).

        Returns the speech probabilities (``[streams]``) and the next state.
        """
        out, new_state = self._session.run(None, {"input": frames, "state": state, "sr": self._rate})
        return np.asarray(out, dtype=np.float32).reshape(-1), np.asarray(new_state, dtype=np.float32)


def _grouped_rows(frames: np.ndarray) -> np.ndarray:
    """``frames`` and rows of zeros to a multiple of :data:`GROUP` (the grouped variant's images; never read back)."""
    extra = -len(frames) % GROUP
    return np.concatenate([frames, np.zeros((extra, frames.shape[1]), np.float32)]) if extra else frames


def _run_streams(session: Any, frames: np.ndarray, counts: np.ndarray, state: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One run of a streams model (:func:`_streams_model`): :meth:`VadModel.run_streams`'s numbers."""
    starts = np.cumsum(counts) - counts
    steps = np.arange(int(counts.max()), dtype=np.int64)[:, None]
    index = np.where(steps < counts, starts + steps, 0)  # [steps, streams]: each stream's row at each step
    p, h, c = session.run(None, {"input": frames, "index": index, "lens": counts,
                                 "h": np.ascontiguousarray(state[0:1]), "c": np.ascontiguousarray(state[1:2])})
    by_step = np.asarray(p, dtype=np.float32).reshape(len(counts), -1)  # [streams, steps]
    return by_step[steps.T < counts[:, None]], np.concatenate([h, c]).astype(np.float32, copy=False)


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
        frames = _frames(group, counts)
        probs, state = model.run_streams(frames, np.array(counts), np.concatenate([d._state for d in group], axis=1))
        # (a run that raised changed no detector: their frames stay pending)
        row = 0
        for i, (d, n) in enumerate(zip(group, counts, strict=True)):
            d._audio = d._audio[n * VAD_FRAME :]
            d._state = state[:, i : i + 1]
            d._scored.append(probs[row : row + n])
            d.frames += n
            row += n


def _frames(detectors: list[SpeechDetector], counts: list[int]) -> np.ndarray:
    """Each detector's first ``counts[i]`` pending frames with their contexts, one after the other, as
    ``[rows, 64 + 512]``.

    Frame ``j`` of a detector is its samples ``[512 j, 512 j + 576)``: the context is the first 64 of each 512, the
    frame the 512 after: two copies of whole blocks per detector. (A ``sliding_window_view`` of each detector's
    frames, then joined, cost 11-15 µs per detector and run, the copies 2-3: a run of three frames each, 2 to 32
    detectors.)"""
    frames = np.empty((sum(counts), _CONTEXT + VAD_FRAME), np.float32)
    row = 0
    for d, n in zip(detectors, counts, strict=True):
        audio = d._audio
        frames[row : row + n, :_CONTEXT] = audio[: n * VAD_FRAME].reshape(n, VAD_FRAME)[:, :_CONTEXT]
        frames[row : row + n, _CONTEXT:] = audio[_CONTEXT : _CONTEXT + n * VAD_FRAME].reshape(n, VAD_FRAME)
        row += n
    return frames


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
