"""Deepgram's listen API as plain code: query parameters in, Deepgram's JSON messages out (``docs/deepgram.md``).

Deepgram's ``/v1/listen`` is what voice-agent software integrates first, and much of it takes a custom
Deepgram URL (the official SDK's environment, Pipecat's and LiveKit's ``base_url``). This module is
its wire format, with no I/O: :func:`parse_query` reads the query string of a live websocket or a
pre-recorded ``POST`` into :class:`ListenOptions` (or a :class:`DeepgramError` in Deepgram's shape);
:func:`results`, :func:`speech_started`, :func:`utterance_end` and :func:`metadata` write the
engine's events as Deepgram's server messages; :func:`parse_control` reads a client's
``KeepAlive`` / ``Finalize`` / ``CloseStream``; :meth:`ListenOptions.rules` turns ``endpointing``,
``utterance_end_ms`` and ``vad_events`` into the stream's own endpoint rules.

How the engine's events map::

    Partial (interim_results=true)       -> Results is_final=false speech_final=false
    Final, reason silence                -> Results is_final=true  speech_final=true    (the endpoint; false
                                                                                   with endpointing=false)
    Final, reason max_length or end      -> Results is_final=true  speech_final=false
    Final after a Finalize (a flush)     -> Results is_final=true  from_finalize=true
    SpeechStarted (vad_events=true)      -> SpeechStarted
    UtteranceEnd (utterance_end_ms)      -> UtteranceEnd
    the close                            -> Metadata

The asyncio side is :mod:`streamer.aio.protocols.deepgram`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamer.endpoint import EndpointRules, stream_rules
from streamer.events import Event, Final, Word

__all__ = ["CONTROL_TYPES", "ENCODINGS", "DeepgramError", "ListenOptions", "error_message", "metadata",
           "model_uuid", "parse_control", "parse_query", "prerecorded", "results", "speech_started", "utterance_end"]

ENCODINGS = {"linear16": ("s16le", 2), "mulaw": ("mulaw", 1), "alaw": ("alaw", 1)}
"""Deepgram's raw encodings served here: the daemon's encoding and its bytes per sample"""
OTHER_ENCODINGS = ("linear32", "flac", "opus", "ogg-opus", "speex", "amr-nb", "amr-wb", "g729")
"""Deepgram's other encodings, refused by name"""
CONTROL_TYPES = ("KeepAlive", "Finalize", "CloseStream")
NO_OPS = ("punctuate", "smart_format", "profanity_filter", "filler_words", "numerals", "no_delay", "dictation",
          "diarize", "diarize_version", "multichannel_version", "mip_opt_out", "detect_entities", "redact",
          "replace", "search", "extra", "version", "tier", "callback", "callback_method", "measurements",
          "paragraphs", "utterances", "utt_split", "detect_language", "detect_topics", "intents", "sentiment",
          "summarize", "topics", "language_hint")
"""Deepgram parameters accepted and without effect here (``docs/deepgram.md``): formatting the project has not
got, add-ons, and what only concerns Deepgram's billing"""
MAX_KEYWORDS = 1000
MAX_KEYWORD_CHARS = 200
MAX_TAGS = 16
MAX_PARAM_CHARS = 200
"""the longest value of a parameter that is not a keyword (a model name, a language, a tag)"""
MAX_ENDPOINTING_MS = 60_000
MAX_UTTERANCE_END_MS = 60_000


class DeepgramError(Exception):
    """A request Deepgram would refuse: its HTTP status, ``err_code`` and message.

    Before a websocket opens and on ``POST`` it is an HTTP answer (:meth:`body`, and the ``dg-error`` header);
    on an open websocket an ``Error`` message (:func:`error_message`).
    """

    def __init__(self, message: str, *, status: int = 400, code: str = "INVALID_QUERY_PARAMETER") -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def body(self, request_id: str) -> dict[str, Any]:
        """Deepgram's error body: ``err_code``, ``err_msg``, ``request_id``."""
        return {"err_code": self.code, "err_msg": str(self), "request_id": request_id}


def error_message(description: str, variant: str = "DATA-0000", message: str = "") -> dict[str, Any]:
    """Deepgram's ``Error`` message on a websocket: ``variant`` names the kind (``SchemaError`` for a client
    message that could not be read, ``DATA-0000`` for audio, ``NET-0000`` for the server), ``message`` the
    client's text that could not be read."""
    return {"type": "Error", "variant": variant, "description": description, "message": message}


@dataclass(frozen=True)
class ListenOptions:
    """A listen request's query parameters, checked (:func:`parse_query`)."""

    encoding: str | None = None
    """Deepgram's name (``linear16``, ``mulaw``, ``alaw``); None: a file in a container (pre-recorded only)"""
    sample_rate: int | None = None
    channels: int = 1
    multichannel: bool = False
    """each channel its own stream, its results with its ``channel_index``; else the channels are mixed"""
    interim_results: bool = False
    endpointing: bool = True
    """false: no result is ``speech_final``; finals still come where the daemon's endpointing closes a segment, as
    Deepgram's ``is_final`` results come whatever ``endpointing`` says (and a segment never grows without end)"""
    endpointing_ms: int | None = None
    """silence that ends an utterance, heard by the voice-activity detector (and quiet CTC frames); None: the
    daemon's ``[endpoint]``"""
    utterance_end_ms: int | None = None
    vad_events: bool = False
    keywords: tuple[tuple[str, float | None], ...] = ()
    """``keywords=word:intensifier`` (the intensifier a hotword weight; none: ``[decoder] hotword_weight``)"""
    keyterms: tuple[str, ...] = ()
    language: str = ""
    model: str = ""
    tags: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default=())
    """the parameters given that have no effect here (:data:`NO_OPS`)"""

    def rules(self, base: EndpointRules) -> EndpointRules:
        """The stream's endpoint rules: the daemon's (``base``) as ``endpointing``, ``utterance_end_ms`` and
        ``vad_events`` change them (:func:`streamer.endpoint.stream_rules`)."""
        return stream_rules(base, endpointing_ms=self.endpointing_ms, utterance_end_ms=self.utterance_end_ms,
                            speech_events=self.vad_events)

    @property
    def daemon_encoding(self) -> str:
        """The encoding as :func:`streamer.audio.decode_pcm` names it."""
        return ENCODINGS[self.encoding or "linear16"][0]

    @property
    def frame_bytes(self) -> int:
        """Bytes of one frame (a sample of every channel): audio is cut at whole frames."""
        return ENCODINGS[self.encoding or "linear16"][1] * self.channels

    @property
    def streams(self) -> int:
        """How many streams the request opens: one per channel with ``multichannel``, else one."""
        return self.channels if self.multichannel else 1

    def hotwords(self) -> tuple[tuple[str, float | None], ...] | None:
        """``keywords`` and ``keyterm`` as a stream's hotwords; None without either."""
        out = list(self.keywords) + [(k, None) for k in self.keyterms]
        return tuple(out) or None


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1 and len(set(values)) > 1:
        raise DeepgramError(f"{name} was given {len(values)} times with different values; give it once")
    value = values[-1]
    if len(value) > MAX_PARAM_CHARS:
        raise DeepgramError(f"{name} has {len(value)} characters; at most {MAX_PARAM_CHARS}")
    return value


def _bool(query: Mapping[str, Sequence[str]], name: str, default: bool = False) -> bool:
    value = _one(query, name)
    if value is None or value == "":
        return default
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise DeepgramError(f"{name} must be true or false, got {value[:40]!r}")


def _int(query: Mapping[str, Sequence[str]], name: str, low: int, high: int) -> int | None:
    value = _one(query, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise DeepgramError(f"{name} must be an integer from {low} to {high}, got {value[:40]!r}") from None
    if not low <= number <= high:
        raise DeepgramError(f"{name} must be an integer from {low} to {high}, got {number}")
    return number


def _keywords(values: Sequence[str]) -> tuple[tuple[str, float | None], ...]:
    out: list[tuple[str, float | None]] = []
    for value in values:
        word, sep, boost = value.rpartition(":") if ":" in value else (value, "", "")
        weight: float | None = None
        if sep:
            try:
                weight = float(boost)
            except ValueError:
                raise DeepgramError(f"keywords {value[:60]!r}: the intensifier after ':' must be a number") from None
            if not math.isfinite(weight) or weight <= 0:
                raise DeepgramError(f"keywords {value[:60]!r}: only a positive intensifier is supported here (a "
                                    "hotword is boosted, never suppressed); leave the word out instead")
        word = " ".join(word.split())
        if not word or len(word) > MAX_KEYWORD_CHARS:
            raise DeepgramError(f"keywords {value[:60]!r}: a keyword has 1 to {MAX_KEYWORD_CHARS} characters")
        out.append((word, weight))
    return tuple(out)


def parse_query(query: Mapping[str, Sequence[str]], *, live: bool, min_rate: int = 8000, max_rate: int = 192000,
                max_channels: int = 8) -> ListenOptions:
    """The options of a listen request (``parse_qs`` of its query string), or :class:`DeepgramError`.

    ``live``: a websocket, whose audio is raw (``encoding`` and ``sample_rate`` needed); else a ``POST``, whose
    body may be a file in a container (no ``encoding``) or raw audio (``encoding`` and ``sample_rate``).
    """
    encoding = _one(query, "encoding")
    if encoding is not None:
        encoding = encoding.lower()
        if encoding not in ENCODINGS:
            known = encoding in OTHER_ENCODINGS
            raise DeepgramError(f"encoding {encoding[:40]!r} is {'not supported here' if known else 'unknown'}; "
                                f"use {', '.join(ENCODINGS)}" + ("" if live else ", or leave it out for a file "
                                                                  "(wav, flac, ogg, mp3)"))
    elif live:
        raise DeepgramError("encoding is needed for live audio: use encoding=linear16 (or mulaw, alaw) with "
                            "sample_rate; audio in a container (webm, ogg, mp4) is not decoded live here")
    sample_rate = _int(query, "sample_rate", min_rate, max_rate)
    if encoding is not None and sample_rate is None:
        raise DeepgramError(f"sample_rate is needed with encoding={encoding}: the rate of the raw audio in Hz")
    channels = _int(query, "channels", 1, max_channels) or 1
    endpointing_ms: int | None = None
    endpointing = True
    raw = _one(query, "endpointing")
    if raw is not None and raw.lower() in ("false", "true"):
        endpointing = raw.lower() == "true"
    elif raw is not None:
        endpointing_ms = _int(query, "endpointing", 0, MAX_ENDPOINTING_MS)
        endpointing = endpointing_ms != 0
        endpointing_ms = endpointing_ms or None
    utterance_end_ms = _int(query, "utterance_end_ms", 1, MAX_UTTERANCE_END_MS)
    keywords = _keywords(query.get("keywords", []))
    keyterms = tuple(" ".join(k.split()) for k in query.get("keyterm", []))
    if any(not k or len(k) > MAX_KEYWORD_CHARS for k in keyterms):
        raise DeepgramError(f"keyterm: a key term has 1 to {MAX_KEYWORD_CHARS} characters")
    if len(keywords) + len(keyterms) > MAX_KEYWORDS:
        raise DeepgramError(f"{len(keywords) + len(keyterms)} keywords and key terms; at most {MAX_KEYWORDS}")
    tags = tuple(query.get("tag", []))
    if len(tags) > MAX_TAGS or any(len(t) > MAX_PARAM_CHARS for t in tags):
        raise DeepgramError(f"tag: at most {MAX_TAGS} tags of at most {MAX_PARAM_CHARS} characters each")
    for name in ("punctuate", "smart_format"):
        _bool(query, name)  # accepted, and must still be a boolean
    return ListenOptions(
        encoding=encoding, sample_rate=sample_rate, channels=channels, multichannel=_bool(query, "multichannel"),
        interim_results=_bool(query, "interim_results"), endpointing=endpointing, endpointing_ms=endpointing_ms,
        utterance_end_ms=utterance_end_ms, vad_events=_bool(query, "vad_events"), keywords=keywords,
        keyterms=keyterms, language=_one(query, "language") or "", model=_one(query, "model") or "", tags=tags,
        ignored=tuple(name for name in NO_OPS if name in query))


def model_uuid(name: str) -> str:
    """A stable UUID for the model named ``name`` (Deepgram names models by UUID in results and metadata)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"streamer:{name}"))


def model_info(name: str, version: str) -> dict[str, Any]:
    return {"name": name, "version": version, "arch": "ctc"}


def _r(x: float) -> float:
    return round(x, 3)


def _words(words: Sequence[Word]) -> list[dict[str, Any]]:
    return [{"word": w.word, "start": _r(w.start), "end": _r(w.end), "confidence": _r(w.conf),
             "punctuated_word": w.word} for w in words]


def _confidence(words: Sequence[Word]) -> float:
    return _r(sum(w.conf for w in words) / len(words)) if words else 0.0


def alternative(text: str, words: Sequence[Word]) -> dict[str, Any]:
    """One ``channel.alternatives[]`` entry: the transcript, its confidence (the words' mean), its words."""
    return {"transcript": text, "confidence": _confidence(words), "words": _words(words)}


def results(event: Event | None, *, channel: int = 0, channels: int = 1, request_id: str, model: str,
            version: str, from_finalize: bool = False, at: float = 0.0, endpointing: bool = True) -> dict[str, Any]:
    """A ``Results`` message for a partial or a final; ``event`` None: an empty final at ``at`` seconds (what a
    ``Finalize`` gets when no text was pending). ``endpointing`` false: never ``speech_final``."""
    is_final = event is None or isinstance(event, Final)
    text, words = (event.text, event.words) if event is not None else ("", ())
    start = event.start if event is not None else at
    end = event.end if event is not None else at
    return {
        "type": "Results",
        "channel_index": [channel, channels],
        "duration": _r(max(0.0, end - start)),
        "start": _r(start),
        "is_final": is_final,
        "speech_final": endpointing and isinstance(event, Final) and event.reason == "silence",
        "from_finalize": from_finalize and is_final,
        "channel": {"alternatives": [alternative(text, words)]},
        "metadata": {"request_id": request_id, "model_info": model_info(model, version),
                     "model_uuid": model_uuid(model)},
    }


def speech_started(timestamp: float, *, channel: int = 0, channels: int = 1) -> dict[str, Any]:
    """A ``SpeechStarted`` message: the detector heard speech begin at ``timestamp`` seconds."""
    return {"type": "SpeechStarted", "channel": [channel, channels], "timestamp": _r(timestamp)}


def utterance_end(last_word_end: float, *, channel: int = 0, channels: int = 1) -> dict[str, Any]:
    """An ``UtteranceEnd`` message: no word came for ``utterance_end_ms`` after ``last_word_end``."""
    return {"type": "UtteranceEnd", "channel": [channel, channels], "last_word_end": _r(last_word_end)}


def metadata(*, request_id: str, sha256: str, created: str, duration: float, channels: int, model: str,
             version: str) -> dict[str, Any]:
    """The ``Metadata`` message a live stream ends with (and a pre-recorded answer's ``metadata``, less ``type``)."""
    uid = model_uuid(model)
    return {"type": "Metadata", "transaction_key": "deprecated", "request_id": request_id, "sha256": sha256,
            "created": created, "duration": _r(duration), "channels": channels, "models": [uid],
            "model_info": {uid: model_info(model, version)}}


def prerecorded(channel_finals: Sequence[Sequence[Final]], meta: dict[str, Any]) -> dict[str, Any]:
    """A pre-recorded answer: ``metadata`` and ``results.channels[].alternatives[]``, each channel's finals joined."""
    channels = []
    for finals in channel_finals:
        said = [f for f in finals if f.text]
        words = tuple(w for f in said for w in f.words)
        channels.append({"alternatives": [alternative(" ".join(f.text for f in said), words)]})
    return {"metadata": {k: v for k, v in meta.items() if k != "type"}, "results": {"channels": channels}}


def parse_control(text: str) -> str:
    """The type of a client's text message (one of :data:`CONTROL_TYPES`), or :class:`DeepgramError`."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        raise DeepgramError("the message is not JSON: text messages are {\"type\": \"KeepAlive\"}, "
                            "{\"type\": \"Finalize\"} or {\"type\": \"CloseStream\"}; audio goes in binary messages",
                            code="SchemaError") from None
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind not in CONTROL_TYPES:
        raise DeepgramError(f"unknown message type {str(kind)[:40]!r}; use one of {', '.join(CONTROL_TYPES)}",
                            code="SchemaError")
    return str(kind)
