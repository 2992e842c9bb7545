"""The Wyoming protocol's speech-to-text side without I/O: event headers, audio formats, transcript chunks.

Wyoming (Home Assistant's voice protocol, the ``wyoming`` package) frames each event as one JSON
header line ``{"type", "data"?, "data_length"?, "payload_length"?}``, then ``data_length`` bytes of
extra JSON data, then ``payload_length`` bytes of payload (PCM for ``audio-chunk``). A speech-to-text
request is ``transcribe``, ``audio-start``, ``audio-chunk``..., ``audio-stop``; the answer is
``transcript-start``, ``transcript-chunk``... while audio arrives, ``transcript`` and
``transcript-stop`` (``docs/wyoming.md``). :mod:`streamer.aio.protocols.wyoming` moves the bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamer.events import CLOSE_INVALID, CLOSE_POLICY, Event, Final, Partial
from streamer.exceptions import AudioError, ProtocolError

__all__ = [
    "MAX_DATA_BYTES",
    "MAX_HEADER_BYTES",
    "AudioFormat",
    "Header",
    "TranscriptChunks",
    "audio_format",
    "decode_samples",
    "optional_str",
    "parse_data",
    "parse_header",
]

MAX_HEADER_BYTES = 1 << 16
"""the longest header line (the ``wyoming`` package's reader, an asyncio StreamReader, has the same limit)"""
MAX_DATA_BYTES = 1 << 16
"""the most extra JSON data one event may carry (a ``transcribe`` with context needs a few hundred bytes)"""
MAX_CHANNELS = 8


def _bad(message: str, kind: str = "bad_event") -> ProtocolError:
    return ProtocolError(message, kind=kind, code=CLOSE_POLICY)


@dataclass(frozen=True)
class Header:
    """An event's header line: its type, its inline data, and how many bytes of data and payload follow."""

    type: str
    data: dict[str, Any]
    data_length: int = 0
    payload_length: int = 0


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(f"'{key}' must be a non-negative integer, got {value!r}")
    if value > limit:
        raise _bad(f"'{key}' of {value} bytes is over the limit of {limit} bytes", kind="too_big")
    return value


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"{what} is not JSON: {exc}", kind="malformed_json", code=CLOSE_INVALID) from None
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_header(line: bytes, max_payload: int) -> Header:
    """Read one header line; raises :class:`ProtocolError` naming what is wrong and the limits."""
    header = _json_object(line, "event header")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise _bad("event header needs a string 'type' (describe, transcribe, audio-start, audio-chunk, audio-stop)")
    data = header.get("data")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise _bad(f"'data' of {kind} must be an object")
    return Header(kind, data, _length(header, "data_length", MAX_DATA_BYTES),
                  _length(header, "payload_length", max_payload))


def parse_data(header: Header, raw: bytes) -> dict[str, Any]:
    """The event's data: the header's inline ``data`` updated with the extra data bytes (as the package does)."""
    return {**header.data, **_json_object(raw, f"data of {header.type}")} if raw else header.data


def optional_str(data: dict[str, Any], key: str, event: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(f"'{key}' of {event} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class AudioFormat:
    """PCM as Wyoming describes it: signed little-endian integers of ``width`` bytes, interleaved channels."""

    rate: int
    width: int
    channels: int

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels


def audio_format(data: dict[str, Any], event: str, min_rate: int, max_rate: int) -> AudioFormat:
    """The ``rate``, ``width`` and ``channels`` of an ``audio-start`` or ``audio-chunk``, checked."""
    values = {}
    for key, lo, hi in (("rate", min_rate, max_rate), ("width", 1, 4), ("channels", 1, MAX_CHANNELS)):
        v = data.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise _bad(f"unsupported {key} {v!r} in {event}; use an integer from {lo} to {hi}",
                       kind=f"unsupported_{key}")
        values[key] = v
    return AudioFormat(**values)


def decode_samples(payload: bytes, fmt: AudioFormat) -> np.ndarray:
    """PCM bytes → float32 ``[frames, channels]`` in [-1, 1]; a partial last frame is an :class:`AudioError`.

    Width 1 is signed 8-bit, as the ``wyoming`` package's converter (``audioop``) reads it.
    """
    if len(payload) % fmt.frame_bytes:
        raise AudioError(f"audio-chunk of {len(payload)} bytes is not a whole number of frames ({fmt.frame_bytes} "
                         f"bytes each: width {fmt.width} x {fmt.channels} channel(s))")
    if fmt.width == 3:  # 24-bit: widen each sample to 32 bits, the low byte zero
        raw = np.frombuffer(payload, np.uint8).reshape(-1, 3)
        wide = np.zeros((len(raw), 4), np.uint8)
        wide[:, 1:] = raw
        ints = wide.view("<i4").reshape(-1)
        scale = float(1 << 31)
    else:
        ints = np.frombuffer(payload, {1: "i1", 2: "<i2", 4: "<i4"}[fmt.width])
        scale = float(1 << (8 * fmt.width - 1))
    return (ints.astype(np.float32) / np.float32(scale)).reshape(-1, fmt.channels)


class TranscriptChunks:
    """The ``transcript-chunk`` texts of one transcription: what is new since the last chunk, never retracted.

    Wyoming clients join the chunks into the transcript, so each chunk is appended text (with its
    leading space). A final's text is sent as soon as it comes. Of partials, only the words two in a row
    agree on (the longest common word prefix of the previous partial and the new one without its last
    word, which is often still being spoken: "kit" before "kitchen"), and only where they extend the
    text sent at a word boundary. A first partial's words are often wrong ("ten no" before "turn on
    the"), a second one agreeing with it rarely. When a final differs from words already sent, nothing
    is retracted: later text is appended after it, and the ``transcript`` event, sent after the last
    chunk, holds the finals' text (clients take that one).
    """

    def __init__(self) -> None:
        self.finals: list[str] = []
        self.sent = ""
        """what the chunks sent so far add up to"""
        self._base = ""  # the reading the client's text stands for (the finals', after a difference)
        self._previous: list[str] | None = None  # the words of the open segment's last partial

    @property
    def text(self) -> str:
        """The transcript so far: the finals' texts joined by spaces."""
        return " ".join(self.finals)

    def feed(self, events: list[Event]) -> list[str]:
        """The chunks to send for ``events`` (the engine's, in order)."""
        out: list[str] = []
        for e in events:
            if isinstance(e, Final):
                if e.text:
                    self.finals.append(e.text)
                seen, self._previous = self.text, None
            elif isinstance(e, Partial):
                words, previous = e.text.split(), self._previous
                self._previous = words
                if previous is None:
                    continue
                agreed = []
                for a, b in zip(previous, words[:-1], strict=False):
                    if a != b:
                        break
                    agreed.append(a)
                seen = " ".join([*self.finals, *agreed])
            else:
                continue
            base = self._base
            if len(seen) > len(base) and seen.startswith(base) and (not base or seen[len(base)] == " "):
                out.append(seen[len(base):])
                self.sent += out[-1]
                self._base = seen
            elif isinstance(e, Final) and not seen.startswith(base):
                self._base = seen
        return out
