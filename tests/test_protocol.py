"""The wire, as pure functions: every message's JSON mapping, the parsers (string in, message or error out),
the one exception-to-close-code mapping, and the viewer queue's drop policy. No sockets, no event loop."""

from __future__ import annotations

import json
import random

import pytest

from streamer.aio.hub import ViewerQueue
from streamer.events import (
    End,
    Error,
    Final,
    Partial,
    Ready,
    Transcript,
    ViewerReady,
    Word,
    busy,
    error_for,
    parse_event,
    to_json,
)
from streamer.exceptions import AudioError, InferenceError, ProtocolError
from streamer.protocol import json_depth, parse_control, parse_vosk_text, vosk_final, vosk_partial

WORDS = (Word("turn", 0.42, 0.6201, 0.93), Word("on", 0.7, 0.8, 0.5))
MESSAGES = [
    Partial(0, "turn on", 0.42, 0.8, WORDS),
    Final(3, "turn on", 0.42, 0.8, WORDS, "silence"),
    Ready("3f2a9c0e1b7d", "demo", 16000, ("s16le", "f32le"),
          {"left_context_ms": 1600, "hop_ms": 400, "lookahead_ms": 1000, "window_samples": 48080},
          {"enabled": True, "silence_after_speech_s": 0.8}),
    ViewerReady("kitchen"),
    Error("busy", "server busy"),
    End("3f2a9c0e1b7d", "stopped by client"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_its_json(message):
    text = to_json(message)
    assert json.loads(text)["type"] == message.type
    back = parse_event(text)
    assert type(back) is type(message)
    if isinstance(message, Error):  # the close code is the websocket's, not the JSON's
        assert (back.code, back.message) == (message.code, message.message)
    elif isinstance(message, Transcript):  # times are rounded to milliseconds on the wire
        assert back == type(message)(**{**message.__dict__, "words": (
            Word("turn", 0.42, 0.62, 0.93), Word("on", 0.7, 0.8, 0.5))})
    else:
        assert back == message


def test_partial_and_final_are_distinct_types_with_a_shared_base():
    p, f = MESSAGES[0], MESSAGES[1]
    assert isinstance(p, Transcript) and isinstance(f, Transcript)
    assert not isinstance(f, Partial) and not isinstance(p, Final)
    assert "reason" not in p.to_dict() and f.to_dict()["reason"] == "silence"
    assert Final(0, "x", 0, 1).reason == "end"


def test_the_documented_wire_forms():
    assert ViewerReady("desk").to_dict() == {"type": "ready", "stream": "desk", "mode": "listen"}
    assert End("s", "idle timeout").to_dict() == {"type": "end", "session": "s", "reason": "idle timeout"}
    assert Error("bad_audio", "odd length", 1007).to_dict() == {"type": "error", "code": "bad_audio",
                                                                 "message": "odd length"}
    assert Partial(0, "hi", 0.0, 0.2).to_dict() == {"type": "partial", "segment": 0, "text": "hi", "start": 0.0,
                                                     "end": 0.2, "words": []}


@pytest.mark.parametrize(("text", "why"), [
    ("[1, 2]", "not a JSON object"),
    ('{"type": "nope"}', "unknown message type"),
    ('{"type": "final", "text": "x"}', "malformed final"),
])
def test_parse_event_refuses_what_the_server_never_sends(text, why):
    with pytest.raises(ValueError, match=why):
        parse_event(text)


def test_one_mapping_from_exception_to_code_and_close():
    assert error_for(ProtocolError("late", kind="late_start", code=1008)) == Error("late_start", "late", 1008)
    assert error_for(AudioError("nan")) == Error("bad_audio", "nan", 1007)
    assert error_for(InferenceError("oom")) == Error("inference_failed", "oom", 1011)
    b = busy(4)
    assert (b.code, b.close_code) == ("busy", 1013) and "4 streams at most" in b.message
    assert len(Error("x", "y" * 500).close_reason) == 120  # a close frame's reason is short


@pytest.mark.parametrize(("text", "kind", "code"), [
    ("hello", "text_not_audio", 1003),
    ("{nope", "malformed_json", 1007),
    ('{"type": 3}', "bad_message", 1007),
    ('{"no_type": 1}', "bad_message", 1007),
    ('{"type": "pause"}', "unknown_type", 1008),
    ('{"type": "start", "sample_rate": 4000}', "unsupported_rate", 1008),
    ('{"type": "start", "sample_rate": true}', "unsupported_rate", 1008),
    ('{"type": "start", "encoding": "mp3"}', "unsupported_encoding", 1008),
    ('{"type": "start", "channels": 9}', "unsupported_channels", 1008),
    ('{"type": "start", "name": "a/b"}', "bad_start", 1008),
    ('{"type": "start", "volume": 3}', "bad_start", 1008),
    ('{"type": "start", "partials": "no"}', "bad_start", 1008),
    ('{"type": "start", "words": "on off"}', "bad_words", 1008),
    ('{"type": "start", "words": ["[unk]"]}', "bad_words", 1008),
])
def test_native_control_errors(text, kind, code):
    with pytest.raises(ProtocolError) as info:
        parse_control(text)
    assert (info.value.kind, info.value.code) == (kind, code)


def test_native_control_messages():
    ctrl = parse_control('{"type": "start", "sample_rate": 44100, "encoding": "f32le", "channels": 2, "name": "k",'
                         ' "words": ["turn on", "on", "[unk]"]}')
    assert ctrl.type == "start" and ctrl.start is not None
    s = ctrl.start
    assert (s.sample_rate, s.encoding, s.channels, s.name, s.words) == (44100, "f32le", 2, "k", ("turn", "on"))
    assert s.partials and parse_control('{"type": "start", "partials": false}').start.partials is False
    assert parse_control('  {"type": "flush"}').type == "flush"
    assert parse_control('{"type": "stop"}').start is None


def test_vosk_messages_and_replies():
    cfg = parse_vosk_text('{"config" : {"sample_rate": 8000.0, "words": 1, "max_alternatives": 2,'
                          ' "phrase_list": ["lights on", "[unk]"]}}')
    assert cfg.kind == "config" and cfg.config is not None
    assert (cfg.config.sample_rate, cfg.config.words, cfg.config.max_alternatives,
            cfg.config.phrase_list, cfg.config.unk) == (8000.0, True, 2, ("lights", "on"), True)
    # as vosk-server reads them: numbers in strings, [] and ["[unk]"] for no restriction (an empty tuple)
    cfg = parse_vosk_text('{"config": {"sample_rate": "16000", "max_alternatives": "2", "phrase_list": ["[unk]"]}}')
    assert cfg.config is not None
    assert (cfg.config.sample_rate, cfg.config.max_alternatives, cfg.config.phrase_list) == (16000.0, 2, ())
    assert parse_vosk_text('{"config": {"phrase_list": []}}').config.phrase_list == ()
    assert parse_vosk_text('{"config": {"words": 0}}').config.phrase_list is None
    assert parse_vosk_text('{"eof" : 1}').kind == "eof"
    assert parse_vosk_text('{"reset": 1}').kind == "reset"
    for bad, kind in (('{"config": 3}', "bad_message"), ('{"config": {"sample_rate": -1}}', "unsupported_rate"),
                      ('{"config": {"sample_rate": "x"}}', "unsupported_rate"),
                      ('{"config": {"max_alternatives": "2.5"}}', "bad_message"),
                      ('{"hello": 1}', "unknown_type"), ("{", "malformed_json")):
        with pytest.raises(ProtocolError) as info:
            parse_vosk_text(bad)
        assert info.value.kind == kind
    final = Final(0, "turn on", 0.42, 0.8, WORDS)
    assert vosk_partial(Partial(0, "tu", 0, 1)) == {"partial": "tu"} and vosk_partial(None) == {"partial": ""}
    assert vosk_final([final]) == {"result": [{"conf": 0.93, "end": 0.62, "start": 0.42, "word": "turn"},
                                              {"conf": 0.5, "end": 0.8, "start": 0.7, "word": "on"}],
                                   "text": "turn on"}
    assert vosk_final([final], words=False) == {"text": "turn on"}
    assert vosk_final([], words=True) == {"text": ""}


def test_a_full_viewer_queue_makes_room_with_partials_never_finals():
    q = ViewerQueue(3)
    q.put(Final(0, "a", 0, 1))
    q.put(Partial(1, "b", 1, 2))
    q.put(Final(1, "b c", 1, 2))
    q.put(Final(2, "d", 2, 3))  # full: the queued partial goes
    q.put(Partial(3, "e", 3, 4))  # full of finals: a new partial is dropped
    assert [e.text for e in (q.get_nowait(), q.get_nowait(), q.get_nowait())] == ["a", "b c", "d"]
    assert q.get_nowait() is None and q.dropped_partials == 2 and not q.overflowed
    for i in range(4):  # a fourth final does not fit beside three: the viewer must be closed, nothing evicted
        q.put(Final(i, str(i), 0, 1))
    assert q.overflowed
    assert [q.get_nowait().text for _ in range(3)] == ["0", "1", "2"]


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def test_json_depth_counts_only_brackets_outside_strings():
    """The depth read off the text (before parsing, so a deep event is refused before ``json`` recurses) is the
    depth of the parsed value, with brackets, quotes and backslashes inside strings."""
    rng = random.Random(7)
    pieces = ['[', ']', '{', '}', '"', '\\', 'a', ' ', '\\"', '\\\\']

    def value(level: int) -> object:
        kind = rng.randrange(4 if level < 12 else 2)
        if kind == 0:
            return "".join(rng.choice(pieces) for _ in range(rng.randrange(8)))
        if kind == 1:
            return rng.randrange(100)
        if kind == 2:
            return [value(level + 1) for _ in range(rng.randrange(4))]
        return {str(value(level + 1)): value(level + 1) for _ in range(rng.randrange(3))}

    for _ in range(2000):
        doc = value(0)
        assert json_depth(json.dumps(doc)) == _depth(doc), json.dumps(doc)
    assert json_depth('{"a": "unterminated [[[') == 1
