"""The voice-activity detector run over many streams at once: a row's probabilities do not depend on the batch it
was scored in, and the engine thread scores the streams whose calls wait in one batch. The shipped Silero model,
espeak-ng speech."""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
import pytest

from streamer.aio.stream import EngineThread
from streamer.config import Config
from streamer.engine import reference, run_session
from streamer.events import Final
from streamer.testing import speech_audio
from streamer.transcribe import feed_audio, new_session
from streamer.vad import VAD_FRAME, SpeechDetector, VadModel, model_path, score, speech_probabilities


class CountingVad(VadModel):
    """The real model, noting the frames of each stream in each run of many streams' frames."""

    def __init__(self) -> None:
        super().__init__()
        assert self.runs_streams  # the wheel ships the sequence variant
        self.runs: list[list[int]] = []

    def run_streams(self, frames: np.ndarray, counts: np.ndarray, state: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        self.runs.append(list(counts))
        return super().run_streams(frames, counts, state)


@pytest.fixture(scope="module")
def model() -> CountingVad:
    return CountingVad()


@pytest.fixture(scope="module")
def voices() -> list[np.ndarray]:
    """Different audio for each stream: espeak-ng speech shifted, scaled, with noise, and noise alone."""
    rng = np.random.default_rng(3)
    speech = speech_audio(8.0)
    out = []
    for k in range(64):
        x = np.roll(speech, int(rng.integers(0, len(speech)))) * rng.uniform(0.1, 2.0)
        if k % 5 == 4:
            x = np.zeros_like(x)
        x = x + rng.normal(0, rng.uniform(0, 0.03), len(x))
        out.append(x.astype(np.float32)[: 3 * 16000 + int(rng.integers(0, VAD_FRAME))])
    return out


def one_by_one(model: VadModel, audio: np.ndarray) -> np.ndarray:
    """Every full frame of ``audio`` scored alone, as silero-vad's ``OnnxWrapper`` runs the model (the oracle)."""
    context = np.zeros(64, np.float32)
    state = np.zeros((2, 1, 128), np.float32)
    probs = []
    for j in range(len(audio) // VAD_FRAME):
        frame = audio[j * VAD_FRAME : (j + 1) * VAD_FRAME]
        p, state = model.run(np.concatenate([context, frame])[None, :], state)
        probs.append(p[0])
        context = frame[-64:]
    return np.array(probs, np.float32)


@pytest.mark.parametrize("streams", [1, 2, 7, 64])
@pytest.mark.parametrize("chunk", [1, 7, 320, 1000, "random", "mixed"])
def test_batched_probabilities_equal_each_streams_own(model, voices, streams, chunk):
    """Streams with their own audio, chunking and start scored together round after round, a random part of them
    per run of :func:`score`: each stream's probabilities are bitwise those of its audio scored alone."""
    if chunk in (1, 7) and streams == 64:
        streams = 16  # (a sample or seven a round: the rounds are many)
    rng = np.random.default_rng(streams * 31 + len(str(chunk)))
    audio = [voices[k][: 16000 + 77] if chunk in (1, 7) else voices[k] for k in range(streams)]
    mixed: list[int | str] = [1, 7, 320, 1000, 4000, "random"]
    sizes = [mixed[int(rng.integers(0, len(mixed)))] if chunk == "mixed" else chunk for _ in range(streams)]
    starts = [int(rng.integers(0, 4)) if streams > 1 else 0 for _ in range(streams)]  # rounds before it joins
    detectors = [SpeechDetector(model) for _ in range(streams)]
    got: list[list[np.ndarray]] = [[] for _ in range(streams)]
    fed = [0] * streams
    rounds = 0
    while any(f < len(a) for f, a in zip(fed, audio, strict=True)):
        for k, d in enumerate(detectors):
            if rounds >= starts[k] and fed[k] < len(audio[k]):
                n = int(rng.integers(1, 8001)) if sizes[k] == "random" else int(sizes[k])
                d.add(audio[k][fed[k] : fed[k] + n])
                fed[k] += n
        pick = [d for d in detectors if rng.random() < 0.7]
        score(pick)
        for k, d in enumerate(detectors):
            if d in pick or rng.random() < 0.3:  # the rest wait a round or more (take scores alone what is left)
                got[k].append(d.take())
        rounds += 1
    for k, d in enumerate(detectors):
        probs = np.concatenate([*got[k], d.take()])
        assert np.array_equal(probs, one_by_one(model, audio[k])), f"stream {k} (chunk {sizes[k]})"
        assert np.array_equal(probs, speech_probabilities(audio[k], model))
        assert d.frames == len(audio[k]) // VAD_FRAME


def test_every_frame_of_every_stream_is_scored_in_one_run(model, voices):
    """Streams with from one to forty frames pending, scored together: one run of the model, and each stream's
    probabilities and state after it bitwise those of its frames run one by one (the model without its sequence
    variant runs them so), whatever the others hold."""
    frame_by_frame = VadModel(model_path())
    assert not frame_by_frame.runs_streams
    rng = np.random.default_rng(5)
    counts = [1, 40, 3, 3, 4, 2, 7, 1, 3, 12]
    detectors = [SpeechDetector(model) for _ in counts]
    alone = [SpeechDetector(frame_by_frame) for _ in counts]
    for k, (d, a) in enumerate(zip(detectors, alone, strict=True)):
        lead = voices[k][: VAD_FRAME * int(rng.integers(0, 8))]  # each stream with a state of its own first
        d.accept(lead)
        a.accept(lead)
    model.runs.clear()
    for k, (d, a, n) in enumerate(zip(detectors, alone, counts, strict=True)):
        x = voices[k + 10][: n * VAD_FRAME + int(rng.integers(0, VAD_FRAME))]
        d.add(x)
        a.add(x)
    score(detectors)
    assert model.runs == [counts]
    for d, a, n in zip(detectors, alone, counts, strict=True):
        got = d.take()
        assert len(got) == n
        assert np.array_equal(got, a.take())
        assert np.array_equal(d._state, a._state)


def test_engine_thread_scores_the_waiting_streams_in_one_batch(model, voices, model_runner):
    """Eight real-time streams' calls wait while the thread is busy; before the first of them runs, the thread
    scores the frames of all eight together, in one run, not one per stream. A burst's call
    waiting beside them (no deadline) is heard only when its own turn comes, and a call cancelled before it began
    never reaches its detector. Each stream's finals are the reference's with its audio's own probabilities."""
    cfg = Config()
    assert cfg.endpoint.vad  # the detector is on by default
    piece = 6 * VAD_FRAME + 128  # six frames a round, and every fourth round a seventh
    keys = [f"live{k}" for k in range(8)] + ["burst", "gone"]
    length = min(len(x) for x in voices[: len(keys)])
    audio = {key: x[:length] for key, x in zip(keys, voices, strict=False)}
    detectors = {key: SpeechDetector(model) for key in keys}
    sessions = {key: new_session(cfg, model_runner.vocab) for key in keys}
    finals: dict[str, list[Final]] = {key: [] for key in keys}

    def call(key: str, x: np.ndarray) -> None:  # what a stream's engine call does with heard audio
        feed_audio(sessions[key], x, detectors[key], heard=True)
        run_session(sessions[key], model_runner)
        finals[key] += [e for e in sessions[key].events_received() if isinstance(e, Final)]

    engine = EngineThread()
    try:
        for at in range(0, length, piece):
            gate, holding = threading.Event(), threading.Event()
            busy = engine.submit("busy", 0.0, hold, holding, gate)  # holds the thread while the calls queue, once
            assert holding.wait(10)  # it runs: a call queued before the thread took it would be heard before it
            waiting = {key: engine.submit(key, math.inf if key == "burst" else 1.0 + k, call, key,
                                          audio[key][at : at + piece],
                                          hear=functools.partial(hear, detectors[key], audio[key][at : at + piece]))
                       for k, key in enumerate(keys)}
            assert waiting.pop("gone").cancel()  # its stream stopped waiting
            before = detectors["live0"].frames
            model.runs.clear()
            gate.set()
            for fut in [busy, *waiting.values()]:
                fut.result(30)
            frames = detectors["live0"].frames - before
            assert all(detectors[key].frames == detectors["live0"].frames for key in waiting)
            runs = [[frames] * 8, [frames]] if frames else []  # (the last piece may complete no frame)
            assert model.runs[:1] == runs[:1], "the live streams' frames were not scored together"
            assert model.runs[1:] == runs[1:], "the burst's frames were not heard alone, after the live streams'"
    finally:
        engine.shutdown()
    assert detectors["gone"].frames == 0 and not detectors["gone"].ready
    rules, schedule = cfg.endpoint.rules(), cfg.stream.schedule()
    for key in keys[:9]:
        x = audio[key]
        session = sessions[key]
        session.finish()
        run_session(session, model_runner)
        finals[key] += [e for e in session.events_received() if isinstance(e, Final)]
        _, expected = reference(x, model_runner, schedule, model_runner.vocab, rules, None,
                                speech_probabilities(x, model))
        assert [(f.text, f.start, f.end, f.reason) for f in finals[key]] == [
            (f.text, f.start, f.end, f.reason) for f in expected], key


def hold(holding: threading.Event, gate: threading.Event) -> None:
    """A call that holds the engine thread until ``gate`` opens; ``holding`` says it runs."""
    holding.set()
    gate.wait(10)


def hear(detector: SpeechDetector, x: np.ndarray) -> SpeechDetector:
    """A call's first step: the detector hears the audio the call will feed its session."""
    detector.add(x)
    return detector


def test_a_streams_next_call_is_heard_only_after_its_call_before_ran():
    """Two calls of one stream waiting (as a flush may come behind a feed): the thread never gives the detector
    the second call's audio before the first call has read its own probabilities."""
    engine = EngineThread()
    gate = threading.Event()
    seen: list[str] = []

    def hearing(name: str):
        def hear() -> None:
            seen.append(f"hear {name}")
        return hear

    try:
        busy = engine.submit("busy", 0.0, gate.wait, 10)
        futures = [engine.submit(key, due, seen.append, f"run {name}", hear=hearing(name))
                   for key, name, due in [("a", "a1", 1.0), ("b", "b", 2.0), ("a", "a2", 3.0)]]
        gate.set()
        for fut in [busy, *futures]:
            fut.result(10)
    finally:
        engine.shutdown()
    assert seen.index("hear a2") > seen.index("run a1")
    assert seen[:3] == ["hear a1", "hear b", "run a1"]  # the other stream's call is heard with the first



def _feed_in_turn(engine: EngineThread, detectors: dict[str, SpeechDetector], audio: dict[str, np.ndarray],
                  rounds: range, spacing_s: float) -> dict[str, list[np.ndarray]]:
    """Each round, every stream submits one feeding call (a 100 ms message), one stream every ``spacing_s``, as
    live clients' messages come spread over time; each round's calls are awaited before the next. The
    probabilities each call took."""
    import time

    taken: dict[str, list[np.ndarray]] = {key: [] for key in detectors}
    for r in rounds:
        futures = {}
        for key, detector in detectors.items():
            x = audio[key][r * 1600 : (r + 1) * 1600]
            futures[key] = engine.submit(key, 1.0, detector.take, hear=functools.partial(hear, detector, x))
            time.sleep(spacing_s)
        for key, fut in futures.items():
            taken[key].append(fut.result(30))
    return taken


def test_many_streams_feeding_at_once_are_held_and_heard_together(model, voices):
    """Twenty-four streams' calls come one every 2 ms to an idle thread: taken as they come, each stream's frames
    would be scored alone (and are, for the first hundred calls). Past a hundred calls a second the thread holds
    each feeding call (50 ms at most here) and scores the streams that came meanwhile in one batch. Every call
    still reads its own audio's probabilities, as a detector alone gives them."""
    engine = EngineThread(gather_s=0.05)
    audio = {f"s{k}": voices[k % len(voices)] for k in range(24)}
    detectors = {key: SpeechDetector(model) for key in audio}
    try:
        model.runs.clear()
        warm = _feed_in_turn(engine, detectors, audio, range(6), spacing_s=0.002)
        alone = sum(1 for run in model.runs if len(run) == 1)  # (a stream's frames scored alone)
        model.runs.clear()
        held = _feed_in_turn(engine, detectors, audio, range(6, 12), spacing_s=0.002)
    finally:
        engine.shutdown()
    assert alone >= 50, "the first calls, before the rate was reached, were held"
    assert sum(map(sum, model.runs)) == 24 * (12 * 1600 // VAD_FRAME - 6 * 1600 // VAD_FRAME)
    streams = [len(run) for run in model.runs]
    assert sum(streams) / len(streams) >= 4, f"the held calls were not heard together: {streams}"
    for key, x in audio.items():
        got = np.concatenate(warm[key] + held[key])
        np.testing.assert_array_equal(got, speech_probabilities(x[: 12 * 1600], model))


def test_a_few_streams_are_never_held(model, voices):
    """Two streams sending 100 ms messages (20 calls a second): under the rate at which calls are held, each call
    runs as it comes, even with a hold of 30 s allowed (a held call would fail its 10 s wait)."""
    engine = EngineThread(gather_s=30.0)
    detectors = {"a": SpeechDetector(model), "b": SpeechDetector(model)}
    try:
        for r in range(10):
            for key, detector in detectors.items():
                x = voices[1][r * 1600 : (r + 1) * 1600]
                engine.submit(key, 1.0, detector.take, hear=functools.partial(hear, detector, x)).result(10)
    finally:
        engine.shutdown()
    assert all(d.frames == 10 * 1600 // VAD_FRAME for d in detectors.values())


def test_while_feeding_calls_are_held_only_calls_with_a_deadline_run_meanwhile():
    """A real-time stream's feeding call is held; meanwhile another real-time stream's call that feeds no audio (a
    merge) runs, but a call of audio sent ahead of real time (no deadline) waits until the held call has run, as
    it would without the hold."""
    engine = EngineThread(gather_s=0.3)
    ran: list[str] = []
    try:
        warm = [engine.submit(f"w{k}", 1.0, lambda: None, hear=lambda: None) for k in range(300)]
        for fut in warm:  # (300 feeding calls at once: past the rate at which the thread holds them)
            fut.result(10)
        live = engine.submit("live", 1.0, ran.append, "live feed", hear=lambda: ran.append("live heard"))
        burst = engine.submit("burst", math.inf, ran.append, "burst merge")
        other = engine.submit("other", 2.0, ran.append, "other merge")
        for fut in (live, burst, other):
            fut.result(10)
    finally:
        engine.shutdown()
    assert ran == ["other merge", "live heard", "live feed", "burst merge"]


def test_a_variant_that_cannot_run_many_streams_leaves_the_detector_frame_by_frame(model, voices, monkeypatch,
                                                                                  caplog):
    """A wheel whose sequence variant is built otherwise (its graph cannot be taken to run many streams): the model
    loads, says so once, and scores frame by frame the numbers the variant gives."""
    import logging

    import streamer.vad

    def built_otherwise(path):
        raise ValueError(f"{path.name}: its LSTM does not read the state h, c as this module expects")

    monkeypatch.setattr(streamer.vad, "_streams_model", built_otherwise)
    with caplog.at_level(logging.WARNING, logger="streamer.vad"):
        fallback = VadModel()
    assert not fallback.runs_streams
    assert "runs frame by frame" in caplog.text and "h, c" in caplog.text
    x = voices[2][: 16000 + 300]
    assert np.array_equal(speech_probabilities(x, fallback), speech_probabilities(x, model))


def test_the_shipped_models_convolutions_run_as_large_products_with_the_same_numbers(model, voices):
    """The wheel's model takes the short-time transform as one product over all the frames of a run, and in runs of
    ``GROUPED_FROM`` frames or more the encoder's first convolutions over images of several frames (it checked at
    load that this machine gives the same numbers so): every stream's probabilities and state are bitwise those of
    its frames run one by one through the model as shipped, in a small run and in a large one."""
    from streamer.vad import GROUPED_FROM

    frame_by_frame = VadModel(model_path())
    assert model.product and model.grouped and not frame_by_frame.product
    for counts in ([1, 3, 40, 2, 9], [2, 1, 3], [1, 2], [1] * GROUPED_FROM):
        detectors = [SpeechDetector(model) for _ in counts]
        alone = [SpeechDetector(frame_by_frame) for _ in counts]
        for k, (d, a, n) in enumerate(zip(detectors, alone, counts, strict=True)):
            x = voices[k + 20][: n * VAD_FRAME + 100] * (k + 1)  # loud and quiet, speech and noise alone
            d.add(x)
            a.add(x)
        score(detectors)
        for d, a in zip(detectors, alone, strict=True):
            assert np.array_equal(d.take(), a.take()), counts
            assert np.array_equal(d._state, a._state), counts


def test_the_second_convolution_reads_the_first_ones_image_without_the_frames_between(model):
    """In the grouped variant the encoder's second convolution takes the first one's image of five frames side by
    side (moved, the columns between frames made zero) instead of the frames cut out of it and put side by side
    again: nothing makes the first convolution's frames, and no transpose lies between the two; and the first one's
    image is the short-time transform's magnitude with each frame's columns padded, transposed once (the numbers
    are the same: the test above)."""
    import onnx

    from streamer.vad import SEQUENCE_MODEL, _faster, _streams_model

    graph = onnx.load_from_string(_faster(_streams_model(model.path.with_name(SEQUENCE_MODEL)), True)).graph
    convs = [n for n in graph.node if n.op_type == "Conv" and n.input[1].startswith(("encoder.0.", "encoder.1."))]
    assert [c.input[1] for c in convs] == ["encoder.0.weight", "encoder.1.weight"]
    made = {o: n for n in graph.node for o in n.output}
    path, name = [], convs[1].input[0]
    while name != convs[0].output[0]:  # from the second convolution's input back to the first one's output
        node = made[name]
        path.append(node.op_type)
        name = node.input[0]
    assert path == ["Mul", "Pad", "Relu"]
    assert "/encoder.0/Conv_output_0" not in made
    path, name = [], convs[0].input[0]
    while made[name].op_type != "Sqrt":  # the first one's input back to the short-time transform's magnitude
        path.append(made[name].op_type)
        name = made[name].input[0]
    assert path == ["Transpose", "Reshape", "Pad"]  # each frame's columns padded, then one transpose


@pytest.mark.parametrize("off", ["large runs", "all runs"])
def test_convolutions_whose_products_give_other_numbers_stay_as_they_are(voices, monkeypatch, caplog, off):
    """Where a variant would give other numbers in the last bits (another CPU's onnxruntime: here its filters one
    step of float32 off), the model notices at load, says so, and runs as the wheel does where it would (large runs
    only, or every run), the probabilities bitwise those of the frames run one by one."""
    import logging

    import onnx
    from onnx import numpy_helper

    import streamer.vad

    real = streamer.vad._faster

    def a_bit_off(data: bytes, grouped: bool) -> bytes | None:
        faster = real(data, grouped)
        if not grouped and off == "large runs":
            return faster
        assert faster is not None
        m = onnx.ModelProto()
        m.ParseFromString(faster)
        [filters] = [i for i in m.graph.initializer if i.name == "faster/filters"]
        nudged = np.nextafter(numpy_helper.to_array(filters), np.float32(np.inf)).astype(np.float32)
        filters.CopyFrom(numpy_helper.from_array(nudged, filters.name))
        return m.SerializeToString()

    monkeypatch.setattr(streamer.vad, "_faster", a_bit_off)
    with caplog.at_level(logging.INFO, logger="streamer.vad"):
        checked = VadModel()
    assert checked.runs_streams and not checked.grouped
    assert checked.product == (off == "large runs")
    assert "stay as they are" in caplog.text
    oracle = VadModel(model_path())
    for x in (voices[3][: 2 * 16000 + 300], voices[4][: 5 * VAD_FRAME]):  # one run of 62 frames, one of 5
        assert np.array_equal(speech_probabilities(x, checked), one_by_one(oracle, x))
