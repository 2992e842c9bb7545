"""Wire protocols, parsed without I/O: the native ``/v1/stream`` protocol and Vosk's.

Native (``docs/protocol.md``)::

    client → {"type": "start", "sample_rate": 16000, "encoding": "s16le", "channels": 1, "name": "x"}  (optional, first)
    client → binary PCM frames
    client → {"type": "flush"} | {"type": "stop"}
    server → ready | partial | final | error | end   (JSON text)

Vosk (vosk-server's websocket protocol)::

    client → {"config": {"sample_rate": 16000, "words": true, "max_alternatives": 0}}  (optional)
    client → binary s16le mono frames; each gets exactly one reply:
    server → {"partial": "..."}  or  {"text": "...", "result": [{"conf", "end", "start", "word"}, ...]}
    client → {"eof": 1} (final result, then close) | {"reset": 1} (final result, session continues)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from streamer.audio import ENCODINGS
from streamer.events import CLOSE_BAD_DATA, CLOSE_INVALID, CLOSE_POLICY, Final, Partial
from streamer.exceptions import ProtocolError
from streamer.text import join_words

__all__ = [
    "MAX_JSON_DEPTH",
    "Control",
    "Start",
    "alternatives_count",
    "hotword_list",
    "VOSK_UNK",
    "VoskConfig",
    "parse_control",
    "parse_vosk_text",
    "valid_name",
    "vosk_alternatives",
    "vosk_final",
    "vosk_number",
    "vosk_partial",
    "vosk_phrase_list",
]

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""a stream name, matched whole (:func:`valid_name`): it becomes an MQTT topic level and a viewer path"""
MAX_JSON_DEPTH = 16
"""the deepest nesting of arrays and objects a control message may have (they need 3)"""
MAX_STREAM_WORDS = 20_000
"""the most distinct words a stream's own word list (``words``, Vosk's ``phrase_list``) may have"""


@dataclass(frozen=True)
class Start:
    sample_rate: int = 16000
    encoding: str = "s16le"
    channels: int = 1
    name: str | None = None
    words: tuple[str, ...] | None = None
    hotwords: tuple[tuple[str, float | None], ...] | None = None
    """the stream's own hotwords: (word or phrase, weight or None for ``[decoder] hotword_weight``)"""
    alternatives: int | None = None
    """readings (n-best) each final should carry; None: ``[decoder] alternatives``"""
    endpointing_ms: int | bool | None = None
    """the stream's endpointing: milliseconds of the detector's silence after speech that end an utterance, or
    False: only the client's flush or stop does; None (or True): the daemon's ``[endpoint]``"""
    utterance_end_ms: int | None = None
    """send ``utterance_end`` once no word was heard for this long after a final's last word; None: never"""
    vad_events: bool = False
    """send the detector's ``speech_started`` and ``speech_stopped``"""
    partials: bool = True
    """send partials; False: finals only (the stream then forms none unless a viewer or MQTT takes them)"""


@dataclass(frozen=True)
class Control:
    type: str  # "start", "flush" or "stop"
    start: Start | None = None


# A string literal (an unterminated one runs to the end: never rescanned). Written as runs of plain characters
# between escapes, which the regex engine takes a run at a time: one alternation per character took 10 ms over a
# 190 KB Realtime event (4 ms over each second of base64 audio), on the event loop.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def valid_name(name: object) -> bool:
    """Whether ``name`` is a usable stream name: 1-64 of ``A-Za-z0-9_.-``, nothing before or after."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON ``text`` nest (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _load_json(text: str) -> Any:
    """Parse a control message: bounded nesting, no NaN or Infinity, numbers of sane length."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"JSON nested {depth} levels deep; control messages nest at most {MAX_JSON_DEPTH} "
                            "levels", kind="bad_message", code=CLOSE_INVALID)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON in text message: {exc.msg} at position {exc.pos}",
                            kind="malformed_json", code=CLOSE_INVALID) from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, an integer of thousands of digits
        raise ProtocolError(f"malformed JSON in text message: {exc}", kind="malformed_json",
                            code=CLOSE_INVALID) from None


def word_list(value: Any, field: str, kind: str) -> tuple[str, ...]:
    """A stream's word list: words or phrases (split into words); Vosk's ``[unk]`` entry is left out."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"'{field}' must be a list of strings (words or phrases)", kind=kind, code=CLOSE_POLICY)
    words = dict.fromkeys(w for phrase in value for w in phrase.split() if w != "[unk]")
    if len(words) > MAX_STREAM_WORDS:
        raise ProtocolError(f"'{field}' has {len(words)} distinct words; the limit is {MAX_STREAM_WORDS}",
                            kind=kind, code=CLOSE_POLICY)
    if not words:
        raise ProtocolError(f"'{field}' has no words; leave it out to decode without a word list",
                            kind=kind, code=CLOSE_POLICY)
    return tuple(words)


def parse_start(msg: dict[str, Any], min_rate: int, max_rate: int) -> Start:
    known = {"type", "sample_rate", "encoding", "channels", "name", "words", "hotwords", "alternatives",
             "endpointing_ms", "utterance_end_ms", "vad_events", "partials"}
    unknown = sorted(set(msg) - known)
    if unknown:
        raise ProtocolError(f"unknown field(s) in start message: {', '.join(unknown)}; "
                            f"fields are: {', '.join(sorted(known))}", kind="bad_start", code=CLOSE_POLICY)
    rate = msg.get("sample_rate", 16000)
    if not isinstance(rate, int) or isinstance(rate, bool) or not min_rate <= rate <= max_rate:
        raise ProtocolError(f"unsupported sample_rate {rate!r}; use an integer from {min_rate} to {max_rate}",
                            kind="unsupported_rate", code=CLOSE_POLICY)
    encoding = msg.get("encoding", "s16le")
    if encoding not in ENCODINGS:
        raise ProtocolError(f"unsupported encoding {encoding!r}; use one of {', '.join(ENCODINGS)}",
                            kind="unsupported_encoding", code=CLOSE_POLICY)
    channels = msg.get("channels", 1)
    if not isinstance(channels, int) or isinstance(channels, bool) or not 1 <= channels <= 8:
        raise ProtocolError(f"unsupported channels {channels!r}; use an integer from 1 to 8",
                            kind="unsupported_channels", code=CLOSE_POLICY)
    name = msg.get("name")
    if name is not None and not valid_name(name):
        raise ProtocolError(f"bad stream name {name!r}; use 1-64 letters, digits, '_', '-' or '.'",
                            kind="bad_start", code=CLOSE_POLICY)
    words = word_list(msg["words"], "words", "bad_words") if "words" in msg else None
    hotwords = hotword_list(msg["hotwords"]) if "hotwords" in msg else None
    alternatives = alternatives_count(msg["alternatives"]) if "alternatives" in msg else None
    endpointing = msg.get("endpointing_ms")
    if endpointing is not None and endpointing is not True and endpointing is not False and not _ms_in(
            endpointing, *ENDPOINTING_MS):
        raise ProtocolError(f"'endpointing_ms' must be false or an integer from {ENDPOINTING_MS[0]} to "
                            f"{ENDPOINTING_MS[1]}, got {endpointing!r}", kind="bad_start", code=CLOSE_POLICY)
    utterance_end = msg.get("utterance_end_ms")
    if utterance_end is not None and not _ms_in(utterance_end, *UTTERANCE_END_MS):
        raise ProtocolError(f"'utterance_end_ms' must be an integer from {UTTERANCE_END_MS[0]} to "
                            f"{UTTERANCE_END_MS[1]}, got {utterance_end!r}", kind="bad_start", code=CLOSE_POLICY)
    vad_events = msg.get("vad_events", False)
    if not isinstance(vad_events, bool):
        raise ProtocolError(f"'vad_events' must be true or false, got {vad_events!r}", kind="bad_start",
                            code=CLOSE_POLICY)
    partials = msg.get("partials", True)
    if not isinstance(partials, bool):
        raise ProtocolError(f"'partials' must be true or false, got {partials!r}", kind="bad_start",
                            code=CLOSE_POLICY)
    return Start(rate, encoding, channels, name, words, hotwords, alternatives,
                 None if endpointing is True else endpointing, utterance_end, vad_events, partials)


ENDPOINTING_MS = (10, 10_000)
"""the bounds of a start message's ``endpointing_ms`` (the detector hears in 32 ms frames: rounded up to them)"""
UTTERANCE_END_MS = (100, 60_000)
"""the bounds of a start message's ``utterance_end_ms``"""


def _ms_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


MAX_STREAM_HOTWORDS = 1000
"""the most hotwords (words or phrases) a stream's ``hotwords`` may list"""
MAX_HOTWORD_CHARS = 200
MAX_ALTERNATIVES = 10


def hotword_list(value: Any) -> tuple[tuple[str, float | None], ...]:
    """A start message's ``hotwords``: words or phrases, each a string or a ``[phrase, weight]`` pair."""
    def bad(why: str) -> ProtocolError:
        return ProtocolError(f"'hotwords' {why}; send a list of words or phrases, each a string or a "
                             "[phrase, weight] pair with a weight above 0", kind="bad_hotwords", code=CLOSE_POLICY)

    if not isinstance(value, list):
        raise bad("must be a list")
    if len(value) > MAX_STREAM_HOTWORDS:
        raise bad(f"has {len(value)} entries; the limit is {MAX_STREAM_HOTWORDS}")
    out: list[tuple[str, float | None]] = []
    for item in value:
        if isinstance(item, str):
            phrase, weight = item, None
        elif (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
            phrase, weight = item[0], float(item[1])
        else:
            raise bad(f"has an entry {str(item)[:40]!r}")
        if not phrase.split():
            raise bad("has an empty entry")
        if len(phrase) > MAX_HOTWORD_CHARS:
            raise bad(f"has an entry of {len(phrase)} characters; the limit is {MAX_HOTWORD_CHARS}")
        out.append((" ".join(phrase.split()), weight))
    if not out:
        raise bad("is empty; leave it out for none")
    return tuple(out)


def alternatives_count(value: Any) -> int:
    """A start message's ``alternatives``: how many readings each final carries (0-10)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ALTERNATIVES:
        raise ProtocolError(f"'alternatives' must be an integer from 0 to {MAX_ALTERNATIVES}, got {value!r}",
                            kind="bad_start", code=CLOSE_POLICY)
    return value


def parse_control(text: str, *, min_rate: int = 8000, max_rate: int = 192000) -> Control:
    """Parse a native text message; raise :class:`ProtocolError` with the close code to use."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        raise ProtocolError("text message is not a JSON control message; send audio as binary messages "
                            "and control messages as JSON objects with a 'type'", kind="text_not_audio",
                            code=CLOSE_BAD_DATA)
    msg = _load_json(text)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("control message must be a JSON object with a string 'type'",
                            kind="bad_message", code=CLOSE_INVALID)
    kind = msg["type"]
    if kind == "start":
        return Control("start", parse_start(msg, min_rate, max_rate))
    if kind in ("flush", "stop"):
        return Control(kind)
    raise ProtocolError(f"unknown message type {kind!r}; types are: start, flush, stop",
                        kind="unknown_type", code=CLOSE_POLICY)


@dataclass(frozen=True)
class VoskConfig:
    sample_rate: float | None = None
    words: bool | None = None
    max_alternatives: int | None = None
    phrase_list: tuple[str, ...] | None = None
    """the words of ``phrase_list`` without ``[unk]``; None: not sent; (): no restriction (``[]``, ``["[unk]"]``)"""
    unk: bool = False
    """``[unk]`` was in the list (with other words): speech outside the list comes out as ``[unk]``"""


@dataclass(frozen=True)
class VoskText:
    kind: str  # "config", "eof" or "reset"
    config: VoskConfig | None = None


VOSK_UNK = "[unk]"
"""Vosk's unknown-word token: in a ``phrase_list`` it lets speech outside the list come out as itself"""


def vosk_number(value: Any, field: str, convert: type[int] | type[float]) -> int | float:
    """A number of a Vosk config as vosk-server reads it: ``float(x)`` / ``int(x)``, so ``"16000"`` is 16000.

    vosk-server crashes the connection on what Python cannot convert; here that is a clear error.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
            isinstance(value, str) and len(value) > 64):
        raise ProtocolError(f"bad {field} {value!r}; send a number (or a string holding one)",
                            kind="unsupported_rate" if field == "sample_rate" else "bad_message", code=CLOSE_POLICY)
    try:
        number = convert(value)
    except (ValueError, OverflowError):  # int("2.5"), int(float("inf")), float("x")
        raise ProtocolError(f"bad {field} {value!r}; send a number (or a string holding one)",
                            kind="unsupported_rate" if field == "sample_rate" else "bad_message",
                            code=CLOSE_POLICY) from None
    return number


def vosk_phrase_list(value: Any) -> tuple[tuple[str, ...], bool]:
    """A ``phrase_list``: its words without ``[unk]`` (none: no restriction) and whether ``[unk]`` was in it.

    As vosk-server: an empty list means no grammar; so does a list of only ``[unk]`` here (Vosk
    would then hear nothing but ``[unk]``). Which words the model can spell is the daemon's check.
    """
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError("'phrase_list' must be a list of strings (words or phrases)", kind="bad_words",
                            code=CLOSE_POLICY)
    words = dict.fromkeys(w for phrase in value for w in phrase.split())
    unk = words.pop(VOSK_UNK, False) is None
    if len(words) > MAX_STREAM_WORDS:
        raise ProtocolError(f"'phrase_list' has {len(words)} distinct words; the limit is {MAX_STREAM_WORDS}",
                            kind="bad_words", code=CLOSE_POLICY)
    if not words:
        return (), False
    return tuple(words), unk


def parse_vosk_text(text: str) -> VoskText:
    """Parse a Vosk control message leniently as JSON (any spacing); numbers may come as strings."""
    msg = _load_json(text)
    if not isinstance(msg, dict):
        raise ProtocolError("vosk control message must be a JSON object", kind="bad_message", code=CLOSE_INVALID)
    if "config" in msg:
        cfg = msg["config"]
        if not isinstance(cfg, dict):
            raise ProtocolError("'config' must be an object", kind="bad_message", code=CLOSE_INVALID)
        rate = cfg.get("sample_rate")
        if rate is not None:
            rate = float(vosk_number(rate, "sample_rate", float))
            if not math.isfinite(rate) or rate <= 0:
                raise ProtocolError(f"unsupported sample_rate {cfg['sample_rate']!r}; use a positive number of "
                                    "samples per second", kind="unsupported_rate", code=CLOSE_POLICY)
        words = cfg.get("words")
        alts = cfg.get("max_alternatives")
        if alts is not None:
            alts = int(vosk_number(alts, "max_alternatives", int))
            if alts < 0:
                raise ProtocolError(f"bad max_alternatives {cfg['max_alternatives']!r}; use 0 or more",
                                    kind="bad_message", code=CLOSE_POLICY)
        phrases, unk = vosk_phrase_list(cfg["phrase_list"]) if "phrase_list" in cfg else (None, False)
        return VoskText("config", VoskConfig(rate, None if words is None else bool(words), alts, phrases, unk))
    if msg.get("eof"):
        return VoskText("eof")
    if msg.get("reset"):
        return VoskText("reset")
    raise ProtocolError(f"unknown vosk message {text[:80]!r}; use config, eof or reset",
                        kind="unknown_type", code=CLOSE_POLICY)


def vosk_partial(partial: Partial | None) -> dict[str, Any]:
    return {"partial": partial.text if partial else ""}


def vosk_final(finals: list[Final], *, words: bool = True, max_alternatives: int = 0) -> dict[str, Any]:
    """One Vosk result from the finals produced since the last reply (usually one)."""
    text = " ".join(f.text for f in finals if f.text)
    result = [{"conf": round(w.conf, 6), "end": round(w.end, 3), "start": round(w.start, 3), "word": w.word}
              for f in finals for w in f.words]
    if max_alternatives and any(f.alternatives for f in finals):
        return vosk_alternatives(finals, words=words, max_alternatives=max_alternatives)
    if max_alternatives:
        confs = [float(w.conf) for f in finals for w in f.words]
        alt: dict[str, Any] = {"text": text, "confidence": round(sum(confs) / len(confs), 6) if confs else 1.0}
        if words:
            alt["result"] = [{k: r[k] for k in ("word", "start", "end")} for r in result]
        return {"alternatives": [alt]}
    out: dict[str, Any] = {}
    if words and result:
        out["result"] = result
    out["text"] = text
    return out


def vosk_alternatives(finals: list[Final], *, words: bool, max_alternatives: int) -> dict[str, Any]:
    """Vosk's n-best result from finals that carry the search's alternatives.

    The last final with alternatives gives the readings; the finals before it contribute their best
    text. ``confidence`` is ours (0..1, the reading's share of the search's probability), not Vosk's
    lattice likelihood: it orders the readings the same way.
    """
    last = max(i for i, f in enumerate(finals) if f.alternatives)
    before = [w for f in finals[:last] for w in f.words]
    after = [w for f in finals[last + 1:] for w in f.words]
    out = []
    for alt in finals[last].alternatives[:max_alternatives]:
        ws = [*before, *alt.words, *after]
        item: dict[str, Any] = {"confidence": round(alt.confidence, 6)}
        if words:
            item["result"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in ws]
        item["text"] = join_words(w.word for w in ws)  # (no space beside a Han character: its words are characters)
        out.append(item)
    return {"alternatives": out}
