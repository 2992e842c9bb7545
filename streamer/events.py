"""Every message of the native wire protocol, typed, with its one JSON mapping.

The engine produces :class:`Partial` and :class:`Final`; the daemon adds :class:`Ready`,
:class:`ViewerReady`, :class:`Error` and :class:`End`. Each is a frozen dataclass whose
``to_dict()`` is what travels over the native websocket, MQTT and ``--format jsonl``; sinks
that speak another protocol (Vosk, Hermes, subtitles) serialise the same objects their own way.
:func:`parse_event` reads a server message back (clients, tests).

Errors: :func:`error_for` is the one mapping from an exception to its ``code`` and websocket
close code (``docs/protocol.md`` lists them).

No I/O here, and nothing but the standard library and :mod:`streamer.exceptions`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from streamer.exceptions import AudioError, ProtocolError

__all__ = [
    "Alternative",
    "CLOSE_BAD_DATA",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_SERVER_ERROR",
    "CLOSE_TRY_AGAIN",
    "End",
    "Error",
    "Event",
    "Final",
    "Message",
    "Partial",
    "Ready",
    "Transcript",
    "SpeechStarted",
    "SpeechStopped",
    "UtteranceEnd",
    "ViewerReady",
    "VoiceEvent",
    "Word",
    "error_for",
    "message_from_dict",
    "parse_event",
]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server shuts down
CLOSE_BAD_DATA = 1003  # a kind of data the endpoint cannot accept (text where audio is expected)
CLOSE_INVALID = 1007  # data inconsistent with the message type (bad JSON, bad PCM)
CLOSE_POLICY = 1008  # policy violation (wrong message order, unknown type)
CLOSE_SERVER_ERROR = 1011
CLOSE_TRY_AGAIN = 1013


def _r(x: float) -> float:
    return round(x, 3)


@dataclass(frozen=True)
class Word:
    """One recognised word with its time span in seconds from stream start."""

    word: str
    start: float
    end: float
    conf: float
    """mean probability of the word's characters, 0..1"""

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "start": _r(self.start), "end": _r(self.end), "conf": _r(self.conf)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Word:
        return cls(str(d["word"]), float(d["start"]), float(d["end"]), float(d["conf"]))


@dataclass(frozen=True)
class Transcript:
    """What a partial and a final share: the text of one segment, its span and its words."""

    type: ClassVar[str]
    segment: int
    text: str
    start: float
    end: float
    words: tuple[Word, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "segment": self.segment,
            "text": self.text,
            "start": _r(self.start),
            "end": _r(self.end),
            "words": [w.to_dict() for w in self.words],
        }

    @staticmethod
    def _fields(d: dict[str, Any]) -> dict[str, Any]:
        return {"segment": int(d["segment"]), "text": str(d["text"]), "start": float(d["start"]),
                "end": float(d["end"]), "words": tuple(Word.from_dict(w) for w in d.get("words", []))}


@dataclass(frozen=True)
class Partial(Transcript):
    """Tentative text of the open segment; a later partial or the final replaces it."""

    type: ClassVar[str] = "partial"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Partial:
        return cls(**cls._fields(d))


@dataclass(frozen=True)
class Final(Transcript):
    """Text of a closed segment: it never changes.

    ``reason`` says why the segment closed: ``silence``, ``max_length``, ``flush`` or ``end``.
    """

    type: ClassVar[str] = "final"
    reason: str = "end"
    alternatives: tuple[Alternative, ...] = field(default=())
    """the search's n-best readings, best first (``[decoder] alternatives``); empty: not asked, or greedy"""

    def to_dict(self) -> dict[str, Any]:
        d = {**super().to_dict(), "reason": self.reason}
        if self.alternatives:
            d["alternatives"] = [a.to_dict() for a in self.alternatives]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Final:
        return cls(**cls._fields(d), reason=str(d.get("reason", "end")),
                   alternatives=tuple(Alternative.from_dict(a) for a in d.get("alternatives", [])))


@dataclass(frozen=True)
class Alternative:
    """One reading of a final's segment from the word search's final hypotheses (n-best)."""

    text: str
    confidence: float
    """the reading's share of the probability of the search's final hypotheses (their scores taken as
    log-probabilities, the alignments of one text summed): 0..1; a final's alternatives sum to at most 1"""
    words: tuple[Word, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "confidence": round(self.confidence, 6)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alternative:
        return cls(str(d["text"]), float(d["confidence"]))


Event = Partial | Final
"""What the engine produces."""


@dataclass(frozen=True)
class SpeechStarted:
    """The voice-activity detector heard speech begin (``[endpoint] vad``); ``time``: seconds from stream start.

    The start of the first 32 ms frame it called speech after a stretch that ended speech (or the stream's
    start), as voice-agent APIs send it to let an agent stop talking (barge-in).
    """

    type: ClassVar[str] = "speech_started"
    time: float

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "time": _r(self.time)}


@dataclass(frozen=True)
class SpeechStopped:
    """The detector heard ``vad_silence_ms`` of non-speech after speech; ``time``: where the speech ended.

    Sent when that silence is complete (``time`` + the silence), where the voice-activity rule asks for an
    endpoint; the final, if the model heard words, follows once the endpoint window ran.
    """

    type: ClassVar[str] = "speech_stopped"
    time: float

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "time": _r(self.time)}


@dataclass(frozen=True)
class UtteranceEnd:
    """The model heard no word for ``utterance_end_ms`` after the last final's last word (a turn signal).

    ``time``: where that last word ended, seconds from stream start. Sent once per final with text, after it,
    when the audio that completes the gap has run through the model (only to streams that asked for it).
    """

    type: ClassVar[str] = "utterance_end"
    time: float

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "time": _r(self.time)}


VoiceEvent = SpeechStarted | SpeechStopped | UtteranceEnd
"""What the engine reports about speech and pauses, apart from the transcript (:meth:`StreamSession.voice_events`)."""


@dataclass(frozen=True)
class Ready:
    """First message of a native stream: the session id, the model and how audio is cut."""

    type: ClassVar[str] = "ready"
    session: str
    model: str
    sample_rate: int
    encodings: tuple[str, ...]
    schedule: dict[str, int]
    """left_context_ms, hop_ms, lookahead_ms, window_samples"""
    endpoint: dict[str, Any]
    """enabled, silence_after_speech_s"""
    server_pid: int | None = None
    """the front-end process that serves the stream, in a daemon of several (``server.processes``); else None"""
    language: str = ""
    """the model's language (``[model] language``, a BCP 47 tag), when known: a caption page sets ``lang`` from it"""

    def to_dict(self) -> dict[str, Any]:
        out = {"type": self.type, "session": self.session, "model": self.model, "sample_rate": self.sample_rate,
               "encodings": list(self.encodings), "schedule": dict(self.schedule), "endpoint": dict(self.endpoint)}
        if self.server_pid is not None:
            out["server_pid"] = self.server_pid
        if self.language:
            out["language"] = self.language
        return out


@dataclass(frozen=True)
class ViewerReady:
    """First message to a viewer of stream ``stream`` (``/v1/listen/NAME``)."""

    type: ClassVar[str] = "ready"
    stream: str
    server_pid: int | None = None
    """the front-end process that serves the viewer, in a daemon of several (``server.processes``); else None"""
    language: str = ""
    """the model's language (``[model] language``), when known, as in :class:`Ready`: a viewer's captions take it"""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "stream": self.stream, "mode": "listen"}
        if self.server_pid is not None:
            out["server_pid"] = self.server_pid
        if self.language:
            out["language"] = self.language
        return out


@dataclass(frozen=True)
class Error:
    """An error event; the connection is then closed with ``close_code`` (not sent in the JSON)."""

    type: ClassVar[str] = "error"
    code: str
    """a short machine-readable name: ``busy``, ``bad_audio``, ``malformed_json``, ..."""
    message: str
    close_code: int = CLOSE_POLICY

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "code": self.code, "message": self.message}

    @property
    def close_reason(self) -> str:
        """The websocket close reason: the code and message, cut to fit a close frame."""
        return f"{self.code}: {self.message}"[:120]


@dataclass(frozen=True)
class End:
    """Last message of a native stream, after its finals."""

    type: ClassVar[str] = "end"
    session: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "session": self.session, "reason": self.reason}


Message = Partial | Final | Ready | ViewerReady | Error | End | SpeechStarted | SpeechStopped | UtteranceEnd
"""Everything the daemon sends on the native protocol."""


def to_json(message: Message) -> str:
    """The text frame of ``message``."""
    return json.dumps(message.to_dict(), ensure_ascii=False)


def error_for(exc: BaseException) -> Error:
    """The error event and close code for an exception that ends a stream.

    :class:`~streamer.exceptions.ProtocolError` carries its own; bad audio is 1007; anything else
    (a failed model call) is the server's fault, 1011.
    """
    if isinstance(exc, ProtocolError):
        return Error(exc.kind, str(exc), exc.code)
    if isinstance(exc, AudioError):
        return Error("bad_audio", str(exc), CLOSE_INVALID)
    return Error("inference_failed", str(exc), CLOSE_SERVER_ERROR)


def busy(max_streams: int) -> Error:
    """The error sent to a connection refused because ``max_streams`` streams are open."""
    return Error("busy", f"server busy: {max_streams} streams at most, try again later", CLOSE_TRY_AGAIN)


_VOICE: dict[str, type[SpeechStarted] | type[SpeechStopped] | type[UtteranceEnd]] = {
    c.type: c for c in (SpeechStarted, SpeechStopped, UtteranceEnd)}


def parse_event(text: str) -> Message:
    """Read one server message (a client's side of the native protocol); raises ValueError."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"not a JSON object: {text[:80]!r}")
    return message_from_dict(d)


def message_from_dict(d: dict[str, Any]) -> Message:
    """A server message from its wire mapping (``to_dict()``'s inverse); raises ValueError."""
    kind = d.get("type")
    try:
        if kind == "partial":
            return Partial.from_dict(d)
        if kind == "final":
            return Final.from_dict(d)
        if kind == "ready" and d.get("mode") == "listen":
            return ViewerReady(str(d["stream"]), int(d["server_pid"]) if d.get("server_pid") is not None else None,
                               str(d.get("language", "")))
        if kind == "ready":
            return Ready(str(d["session"]), str(d["model"]), int(d["sample_rate"]), tuple(d["encodings"]),
                         dict(d["schedule"]), dict(d["endpoint"]),
                         int(d["server_pid"]) if d.get("server_pid") is not None else None,
                         str(d.get("language", "")))
        if kind == "error":
            return Error(str(d["code"]), str(d["message"]))
        if kind == "end":
            return End(str(d["session"]), str(d["reason"]))
        if kind in _VOICE:
            return _VOICE[kind](float(d["time"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {kind} message: {exc}") from None
    raise ValueError(f"unknown message type {kind!r}")
