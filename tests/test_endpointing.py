"""A stream's own endpointing: ``endpointing_ms`` (or none but the client's flush), ``utterance_end_ms`` and the
detector's speech events; the engine with a scripted model, then the native protocol on espeak-ng speech."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from streamer.endpoint import EndpointRules, stream_rules
from streamer.engine import StreamSession, run_session
from streamer.events import Final, SpeechStarted, SpeechStopped, UtteranceEnd, parse_event, to_json
from streamer.exceptions import ProtocolError
from streamer.protocol import parse_control
from tests.test_engine import SCHED, VAD_RULES, ScriptVocab, arrival, frames, script_audio, script_model, script_speech

# "ab c" over frames 0..7, 0.5 s of silence, "d" at frames 33-34, then 1.6 s of silence
SPEC = "__aab|_c" + "_" * 25 + "dd" + "_" * 80
VOICED = "+" * 8 + "." * 25 + "++" + "." * 80


def run(rules, spec=SPEC, voiced=VOICED, chunks=None, voice_events=True, flush_at=None):
    """Stream a scripted model's audio and speech probabilities; (samples received, event) pairs in the order a
    protocol sends them (speech events, the transcript, utterance ends)."""
    audio = script_audio(frames(spec))
    probs = script_speech(voiced, len(audio))
    session = StreamSession(SCHED, ScriptVocab(), EndpointRules(), voice_events=voice_events)
    session.use_endpoint(rules, voice_events=voice_events)
    out = []
    i = 0
    for n in chunks or arrival(160, len(audio)):
        if i >= len(audio):
            break
        session.accept_audio(audio[i : i + n])
        if session.vad:
            session.accept_speech(probs[i // 512 : min(i + n, len(audio)) // 512])
        i = min(i + n, len(audio))
        if flush_at is not None and i >= flush_at:
            session.flush()
            flush_at = None
        run_session(session, script_model)
        voice = session.voice_events()
        out += [(i, e) for e in voice if not isinstance(e, UtteranceEnd)]
        out += [(i, e) for e in session.events_received()]
        out += [(i, e) for e in voice if isinstance(e, UtteranceEnd)]
    session.finish()
    run_session(session, script_model)
    return out + [(-1, e) for e in session.events_received() + session.voice_events()]


def test_utterance_end_follows_the_last_final_after_the_gap():
    rules = dataclasses.replace(VAD_RULES, utterance_end_s=1.0)
    timed = run(rules)
    seq = [(type(e).__name__, getattr(e, "text", getattr(e, "time", None))) for _, e in timed
           if not isinstance(e, SpeechStarted | SpeechStopped)]
    # the 0.5 s pause after "ab c" ends its segment (the detector's 0.3 s), but is shorter than the utterance end
    # gap: one utterance end, after "d", at the end of its last word
    assert [k for k, _ in seq if k != "Partial"] == ["Final", "Final", "UtteranceEnd"]
    finals = [e for _, e in timed if isinstance(e, Final)]
    assert [f.text for f in finals] == ["ab c", "d"]
    (at, end), = [(at, e) for at, e in timed if isinstance(e, UtteranceEnd)]
    assert end.time == pytest.approx(finals[1].end) == pytest.approx(0.7)
    # sent once the model's frames over 1 s after that word were seen (a full window's look-ahead), not before
    assert 320 * 35 + 16000 <= at <= 320 * 35 + 16000 + 320 * (SCHED.hop + SCHED.lookahead) + 80
    # no utterance end without asking
    assert not any(isinstance(e, UtteranceEnd) for _, e in run(VAD_RULES))


def test_utterance_end_whatever_the_arrival():
    """The utterance ends (and, apart, the speech events) and their times are the same for every chunking; how
    they interleave is not: speech events are read off the audio as it comes, utterance ends off the model."""
    rules = dataclasses.replace(VAD_RULES, utterance_end_s=0.4)

    def seq(chunks):
        timed = run(rules, chunks=chunks)
        return ([(type(e).__name__, e.time) for _, e in timed if isinstance(e, UtteranceEnd)],
                [(type(e).__name__, e.time) for _, e in timed if isinstance(e, SpeechStarted | SpeechStopped)],
                [(e.text, e.end) for _, e in timed if isinstance(e, Final)])

    expected = seq(arrival(160, 0))
    # the 0.5 s pause is now long enough: one utterance end after each final, at its end
    assert expected[0] == [("UtteranceEnd", pytest.approx(end)) for _, end in expected[2]]
    assert len(expected[0]) == 2
    for chunk in (1, 7, 320, 1000, "random"):
        assert seq(arrival(chunk, 0)) == expected, chunk
    # and each comes after its final
    timed = run(rules, chunks=arrival("random", 0))
    order = [type(e).__name__ for _, e in timed if isinstance(e, Final | UtteranceEnd)]
    assert order == ["Final", "UtteranceEnd"] * 2


def test_utterance_end_does_not_need_the_detector():
    # with the CTC rule alone, the gap is read off the model's frames all the same
    rules = EndpointRules(silence_no_speech_s=1.0, silence_after_speech_s=0.8, utterance_end_s=1.0)
    timed = run(rules, voice_events=False)
    assert [type(e).__name__ for _, e in timed if isinstance(e, Final | UtteranceEnd)] == [
        "Final", "UtteranceEnd"]
    assert [f.text for _, f in timed if isinstance(f, Final)] == ["ab cd"]


def test_endpointing_off_waits_for_the_flush():
    """``endpointing_ms = false``: no final until the client flushes, whatever the pauses; the speech events
    still come from the detector."""
    rules = stream_rules(VAD_RULES, endpointing_ms=False, speech_events=True)
    assert not rules.enabled and rules.vad
    flush_at = 320 * 100
    timed = run(rules, flush_at=flush_at)
    finals = [(at, e) for at, e in timed if isinstance(e, Final)]
    assert [(f.text, f.reason) for _, f in finals] == [("ab cd", "flush")]
    assert all(at >= flush_at for at, _ in finals)
    assert [type(e).__name__ for _, e in timed if isinstance(e, SpeechStarted | SpeechStopped)] == [
        "SpeechStarted", "SpeechStopped"] * 2
    # the same without the flush: only the end of the stream ends it
    assert [(f.text, f.reason) for _, f in run(rules) if isinstance(f, Final)] == [("ab cd", "end")]


def test_stream_rules_from_a_start():
    base = EndpointRules(silence_after_speech_s=0.8)
    assert stream_rules(base) == base
    assert stream_rules(base, endpointing_ms=True) == base
    fast = stream_rules(base, endpointing_ms=100)
    assert fast.enabled and fast.vad and fast.vad_silence_s == 0.1 and fast.silence_after_speech_s == 0.8
    slow = stream_rules(base, endpointing_ms=2000)
    assert slow.vad_silence_s == 2.0 and slow.silence_after_speech_s == 2.0  # the CTC rule waits as long
    off = stream_rules(dataclasses.replace(base, vad=True), endpointing_ms=False)
    assert not off.enabled and not off.vad  # no detector unless its events are asked for
    assert stream_rules(base, utterance_end_ms=1500).utterance_end_s == 1.5
    assert stream_rules(base, speech_events=True).vad
    with pytest.raises(ValueError, match="utterance end"):
        EndpointRules(utterance_end_s=-1)


def test_endpoint_rules_change_only_before_audio():
    session = StreamSession(SCHED, ScriptVocab(), EndpointRules())
    session.accept_audio(np.zeros(100, np.float32))
    with pytest.raises(RuntimeError, match="before the first audio"):
        session.use_endpoint(VAD_RULES)


def test_start_options_parse_and_bad_values_are_refused():
    start = parse_control('{"type": "start", "endpointing_ms": 250, "utterance_end_ms": 1000, "vad_events": true}')
    assert start.start is not None
    assert (start.start.endpointing_ms, start.start.utterance_end_ms, start.start.vad_events) == (250, 1000, True)
    off = parse_control('{"type": "start", "endpointing_ms": false}').start
    assert off is not None and off.endpointing_ms is False
    default = parse_control('{"type": "start", "endpointing_ms": true}').start
    assert default is not None and default.endpointing_ms is None and not default.vad_events
    for field, value in [("endpointing_ms", 5), ("endpointing_ms", 10_001), ("endpointing_ms", 250.5),
                         ("endpointing_ms", "250"), ("utterance_end_ms", 50),
                         ("utterance_end_ms", True), ("utterance_end_ms", False), ("vad_events", 1),
                         ("vad_events", "yes")]:
        with pytest.raises(ProtocolError, match=field) as info:
            parse_control(json.dumps({"type": "start", field: value}))
        assert (info.value.kind, info.value.code) == ("bad_start", 1008)


def test_voice_events_travel_and_parse_back():
    for event in (SpeechStarted(1.25), SpeechStopped(2.5), UtteranceEnd(3.125)):
        assert parse_event(to_json(event)) == event
    assert UtteranceEnd(0.7).to_dict() == {"type": "utterance_end", "time": 0.7}

