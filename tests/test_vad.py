"""The voice-activity detector (Silero VAD's shipped ONNX model) and the endpoint rule it feeds, on espeak-ng
speech and the shipped demo model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streamer.config import Config, EndpointConfig, load_config
from streamer.endpoint import EndpointRules
from streamer.engine import reference, run_session
from streamer.events import Final
from streamer.exceptions import ConfigError
from streamer.testing import espeak_audio
from streamer.transcribe import feed_audio, new_session, speech_detector
from streamer.vad import VAD_FRAME, SpeechDetector, load_vad, speech_probabilities, speech_runs

SENTENCES = ["turn on the kitchen lights", "set a timer for twenty minutes", "add milk to the shopping list"]
PAUSE_S = 0.5


@pytest.fixture(scope="module")
def sentences():
    """Three espeak-ng sentences (trimmed) 0.5 s apart, 1 s of silence after; (audio, [(start, end) samples])."""
    parts, spans, pos = [], [], 0
    for text in SENTENCES:
        audio = espeak_audio(text)
        voiced = np.flatnonzero(np.abs(audio) > 1e-3)
        audio = audio[voiced[0] : voiced[-1] + 1]
        gap = np.zeros(int(PAUSE_S * 16000) if text != SENTENCES[-1] else 16000, dtype=np.float32)
        spans.append((pos, pos + len(audio)))
        parts += [audio, gap]
        pos += len(audio) + len(gap)
    return np.concatenate(parts), spans


@pytest.mark.parametrize("chunk", [1, 7, 160, 1000, "random"])
def test_probabilities_do_not_depend_on_chunking(sentences, chunk):
    audio = sentences[0][: 16000 * 3 + 77]
    whole = speech_probabilities(audio)
    assert len(whole) == len(audio) // VAD_FRAME
    rng = np.random.default_rng(7)
    detector = SpeechDetector(load_vad())
    got, i = [], 0
    while i < len(audio):
        n = int(rng.integers(1, 8001)) if chunk == "random" else chunk
        got.append(detector.accept(audio[i : i + n]))
        i += n
    assert np.array_equal(np.concatenate(got), whole)
    assert detector.frames == len(whole)


def test_detector_hears_the_sentences_and_the_pauses_between_them(sentences):
    audio, spans = sentences
    probs = speech_probabilities(audio)
    # runs of speech, joined across the short gaps between words (below the 0.3 s endpoint silence)
    runs: list[list[int]] = []
    for a, b in speech_runs(probs):
        if runs and (a - runs[-1][1]) * VAD_FRAME < 0.3 * 16000:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    assert len(runs) == len(SENTENCES)
    for (a, b), (start, end) in zip(runs, spans, strict=True):
        assert abs(a * VAD_FRAME - start) <= 0.15 * 16000
        assert abs(b * VAD_FRAME - end) <= 0.2 * 16000


def test_endpoint_config_builds_the_vad_rule_and_refuses_bad_values():
    cfg = load_config(None, ["endpoint.vad=true", "endpoint.vad_silence_ms=250"])
    rules = cfg.endpoint.rules()
    assert rules.vad and rules.vad_silence_s == 0.25 and rules.vad_silence_frames == 8
    assert EndpointConfig().rules().vad and not EndpointConfig(vad=False).rules().vad  # on by default
    assert not EndpointConfig(enabled=False, vad=True).rules().vad  # endpointing off: the client's flush only
    for bad, message in [({"vad_silence_ms": 10}, "too small"), ({"vad_threshold": 0.0}, "too small"),
                         ({"vad_threshold": 1.5}, "too large"), ({"vad": "yes"}, "true or false")]:
        with pytest.raises(ConfigError, match=message):
            EndpointConfig(**bad)
    with pytest.raises(ValueError, match="voice-activity"):
        EndpointRules(vad=True, vad_silence_s=0)


def vad_config(on: bool) -> Config:
    return dataclasses.replace(Config(), endpoint=EndpointConfig(vad=on))


def finals_by_position(runner, audio, cfg, words=None, chunk=1600):
    """Stream ``audio`` in ``chunk``s through a session of ``cfg``: (samples received, final) pairs."""
    session = new_session(cfg, runner.vocab, words)
    detector = speech_detector(session)
    assert (detector is not None) == cfg.endpoint.vad
    out = []
    for i in range(0, len(audio), chunk):
        feed_audio(session, audio[i : i + chunk], detector)
        run_session(session, runner)
        out += [(min(i + chunk, len(audio)), e) for e in session.events_received() if isinstance(e, Final)]
    session.finish()
    run_session(session, runner)
    return out + [(len(audio), e) for e in session.events_received() if isinstance(e, Final)]


def test_demo_model_ends_each_sentence_soon_after_it(model_runner, demo_words, sentences):
    """With the detector, each sentence is its own final, sent about 0.3 s after its last word (plus at most
    the 0.1 s chunk and the detector's 32 ms frame); the same words as the CTC rule alone gives."""
    audio, spans = sentences
    vad = finals_by_position(model_runner, audio, vad_config(True), demo_words)
    ctc = finals_by_position(model_runner, audio, vad_config(False), demo_words)
    assert [f.text for _, f in vad] == SENTENCES
    assert [f.reason for _, f in vad] == ["silence"] * 3
    for (at, _), (_, end) in zip(vad, spans, strict=True):
        assert end + 0.3 * 16000 <= at <= end + 0.55 * 16000
    assert " ".join(f.text for _, f in ctc) == " ".join(SENTENCES)
    # the CTC rule's first final comes later (0.8 s of blank final frames, or the look-ahead's)
    assert ctc[0][0] > vad[0][0]


@pytest.mark.parametrize("chunk", [320, 1000, "random"])
def test_demo_model_finals_arrival_invariant_with_the_vad(model_runner, demo_words, sentences, chunk):
    from tests.test_engine import arrival, stream

    audio = sentences[0][: 16000 * 5]
    probs = speech_probabilities(audio)
    cfg = vad_config(True)
    schedule = cfg.stream.schedule()
    rules = cfg.endpoint.rules()
    ref_ids, ref_finals = reference(audio, model_runner, schedule, model_runner.vocab, rules, demo_words, probs)
    ids, events = stream(audio, model_runner, schedule, arrival(chunk, len(audio)), rules, words=demo_words,
                         speech=probs)
    assert ids == ref_ids
    finals = [e for e in events if isinstance(e, Final)]
    assert [(f.text, f.start, f.end, f.reason) for f in finals] == [
        (f.text, f.start, f.end, f.reason) for f in ref_finals
    ]
    assert [f.text for f in finals][:2] == SENTENCES[:2]


async def test_daemon_streams_end_on_the_detector(daemon_factory, model_runner, demo_words, sentences):
    """The daemon runs a detector per stream with ``endpoint.vad``: its finals over the native protocol are the
    reference's with the same probabilities, one per sentence, each ended by the silence after it."""
    from tests.conftest import pcm16
    from tests.test_server import finals_of, native_session

    audio = np.frombuffer(pcm16(sentences[0]), "<i2").astype(np.float32) / 32768
    d = await daemon_factory("endpoint.vad=true")
    msgs, code = await native_session(d.port, pcm16(audio), chunk=3200)
    assert code == 1000
    cfg = vad_config(True)
    _, expected = reference(audio, model_runner, cfg.stream.schedule(), model_runner.vocab, cfg.endpoint.rules(),
                            demo_words, speech_probabilities(audio))
    got = finals_of(msgs)
    assert [(f["text"], f["reason"]) for f in got] == [(f.text, f.reason) for f in expected]
    assert [f["text"] for f in got] == SENTENCES
    assert [f["reason"] for f in got] == ["silence"] * 3


def test_voice_events_follow_the_sentences(model_runner, sentences):
    """The detector's speech started/stopped events on espeak-ng speech: one pair per sentence, near its span."""
    from streamer.events import SpeechStarted, SpeechStopped

    audio, spans = sentences
    session = new_session(vad_config(True), model_runner.vocab, voice_events=True)
    detector = speech_detector(session)
    events = []
    for i in range(0, len(audio), 1600):
        feed_audio(session, audio[i : i + 1600], detector)
        events += session.voice_events()
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped] * len(SENTENCES)
    for (started, stopped), (start, end) in zip(zip(events[::2], events[1::2], strict=True), spans, strict=True):
        assert abs(started.time - start / 16000) <= 0.1
        assert 0 <= stopped.time - end / 16000 <= 0.15


@pytest.mark.parametrize("vad", ["true", "false"])
async def test_daemon_loads_the_detector_at_start(daemon_factory, monkeypatch, vad):
    """The detector's model is loaded when the daemon starts (about 0.5 s here), not by a stream's first audio;
    also with the rule off, since a client may ask for its own endpointing."""
    import streamer.vad

    monkeypatch.setattr(streamer.vad, "_shared", None)
    await daemon_factory(f"endpoint.vad={vad}")
    assert streamer.vad._shared is not None
