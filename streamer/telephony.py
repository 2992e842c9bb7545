"""Phone calls' wire formats, parsed without I/O: Twilio Media Streams messages and Asterisk AudioSocket frames.

**Twilio Media Streams** (``<Start><Stream url="wss://HOST/v1/twilio">`` in TwiML): Twilio opens a
websocket and sends JSON text messages, its numbers as strings::

    {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    {"event": "start", "sequenceNumber": "1", "streamSid": "MZ...", "start": {"accountSid": "AC...",
     "streamSid": "MZ...", "callSid": "CA...", "tracks": ["inbound", "outbound"],
     "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
     "customParameters": {"name": "desk", "token": "..."}}}
    {"event": "media", "sequenceNumber": "2", "streamSid": "MZ...",
     "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": "<base64 mu-law, 20 ms>"}}
    {"event": "dtmf", "streamSid": "MZ...", "dtmf": {"track": "inbound_track", "digit": "1"}}
    {"event": "mark", "streamSid": "MZ...", "mark": {"name": "greeting"}}
    {"event": "stop", "sequenceNumber": "9", "streamSid": "MZ...", "stop": {"accountSid": "AC...",
     "callSid": "CA..."}}

:func:`parse_twilio` turns one message into a typed one (:class:`TwilioStart`, :class:`TwilioMedia`, ...)
or raises :class:`~streamer.exceptions.ProtocolError` saying what is wrong; a media payload is bounded
before it is decoded. :func:`track_names` names a call's streams.

**Asterisk AudioSocket** (``AudioSocket(UUID,HOST:PORT)`` in the dialplan): Asterisk connects over TCP
and sends frames of a kind byte, a 2-byte big-endian payload length and the payload: ``0x01`` the
call's UUID (16 bytes) first, then ``0x10`` audio (signed linear 16-bit little-endian, 8 kHz mono,
usually 320 bytes = 20 ms; ``0x11``-``0x18`` the same at higher rates in newer Asterisk), ``0x03`` a
DTMF digit, ``0xff`` an error on Asterisk's side, and ``0x00`` hangup. Read :data:`HEADER_BYTES`,
check them with :func:`parse_header` (which refuses an unknown kind or a payload over its kind's bound
before it is read), read the payload, and :func:`parse_frame` it. :func:`frame` writes one.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamer.events import CLOSE_BAD_DATA, CLOSE_POLICY
from streamer.exceptions import ProtocolError
from streamer.protocol import valid_name

__all__ = [
    "AUDIO_RATES",
    "HEADER_BYTES",
    "KIND_AUDIO",
    "KIND_DTMF",
    "KIND_ERROR",
    "KIND_HANGUP",
    "KIND_UUID",
    "MAX_MEDIA_BYTES",
    "MAX_MESSAGE_CHARS",
    "TWILIO_ENCODINGS",
    "TWILIO_TRACKS",
    "CallAudio",
    "CallDtmf",
    "CallError",
    "CallHangup",
    "CallId",
    "CallFrame",
    "TwilioConnected",
    "TwilioDtmf",
    "TwilioMark",
    "TwilioMedia",
    "TwilioMessage",
    "TwilioStart",
    "TwilioStop",
    "frame",
    "max_payload",
    "parse_frame",
    "parse_header",
    "parse_twilio",
    "track_names",
]

# -- Twilio Media Streams ----------------------------------------------------------------------------------------

TWILIO_TRACKS = ("inbound", "outbound")
"""the tracks of a call: what the caller says (inbound) and what is played or said to them (outbound)"""
TWILIO_ENCODINGS = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}
"""``mediaFormat.encoding`` -> the stream encoding (:data:`streamer.audio.G711_ENCODINGS`); Twilio sends μ-law"""
MAX_MEDIA_BYTES = 8000
"""the most audio one ``media`` message may carry: a second of 8 kHz G.711 (Twilio sends 160 bytes, 20 ms); its
base64 is checked against this before it is decoded"""
MAX_MESSAGE_CHARS = 16 << 10
"""the longest message: a media message with a second of audio is 11 KB, a start with its parameters a few hundred
bytes. It is checked before the message is parsed: a 512 KB message cost the event loop 80 ms to scan for its
nesting, so 36 of them in 10 s made the finals of every other stream seconds late"""
MAX_TEXT = 64
"""the most characters of a client's value quoted back in an error"""


@dataclass(frozen=True)
class TwilioConnected:
    """The first message: the websocket is Twilio's."""

    protocol: str
    version: str


@dataclass(frozen=True)
class TwilioStart:
    """The call's metadata, before any media."""

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    """the tracks that will come, each of :data:`TWILIO_TRACKS`, each its own stream"""
    encoding: str
    """the stream encoding of the payloads: ``mulaw`` (Twilio's) or ``alaw``"""
    sample_rate: int
    channels: int
    parameters: Mapping[str, str] = field(default_factory=dict)
    """the TwiML ``<Parameter>`` elements (``customParameters``): ``name`` names the streams, ``token`` is the
    daemon's token"""


@dataclass(frozen=True)
class TwilioMedia:
    """20 ms of one track."""

    track: str
    chunk: int
    timestamp: int
    """milliseconds since the stream started"""
    payload: bytes
    """G.711 bytes (decoded from base64)"""


@dataclass(frozen=True)
class TwilioMark:
    """A mark the application set on a bidirectional stream has been played."""

    name: str


@dataclass(frozen=True)
class TwilioDtmf:
    """A key the caller pressed."""

    track: str
    digit: str


@dataclass(frozen=True)
class TwilioStop:
    """The stream ended (the call hung up, or ``<Stop><Stream>``)."""

    call_sid: str


TwilioMessage = TwilioConnected | TwilioStart | TwilioMedia | TwilioMark | TwilioDtmf | TwilioStop


def _bad(message: str, kind: str = "bad_message", code: int = CLOSE_POLICY) -> ProtocolError:
    return ProtocolError(message, kind=kind, code=code)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _object(msg: Mapping[str, Any], key: str, event: str) -> Mapping[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise _bad(f"{event} message without a {key!r} object")
    return value


def _text(obj: Mapping[str, Any], key: str, event: str, *, required: bool = True) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str):
        raise _bad(f"{event} message: {key!r} must be a string")
    return value


def _number(obj: Mapping[str, Any], key: str, event: str, default: int | None = None) -> int:
    """A number Twilio may send as a string (``"8000"``) or a JSON integer."""
    value = obj.get(key, default)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _bad(f"{event} message: {key!r} must be a non-negative integer, got {str(value)[:MAX_TEXT]!r}")


def _track(value: Any, event: str) -> str:
    """``inbound`` or ``outbound`` (DTMF events say ``inbound_track``)."""
    track = value.removesuffix("_track") if isinstance(value, str) else value
    if track not in TWILIO_TRACKS:
        raise _bad(f"{event} message: unknown track {str(value)[:MAX_TEXT]!r}; tracks are {', '.join(TWILIO_TRACKS)}")
    return str(track)


def parse_twilio(data: str | bytes, *, min_rate: int = 8000, max_rate: int = 48000,
                 max_media_bytes: int = MAX_MEDIA_BYTES) -> TwilioMessage:
    """One Twilio Media Streams message; raises :class:`ProtocolError` (``bad_message``, ``bad_audio``, ...)."""
    if isinstance(data, bytes):
        raise _bad("binary message: Twilio Media Streams sends JSON text messages", code=CLOSE_BAD_DATA)
    if len(data) > MAX_MESSAGE_CHARS:
        raise _bad(f"a message of {len(data)} characters is over {MAX_MESSAGE_CHARS}; Twilio sends 20 ms of audio a "
                   "message", kind="too_big", code=1009)
    try:  # json's own recursion limit bounds the nesting: only known keys are read, nothing is echoed
        msg = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"the message is not JSON ({str(exc)[:MAX_TEXT]})", kind="malformed_json") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
        raise _bad("a message must be a JSON object with a string 'event'")
    event = msg["event"]
    if event == "connected":
        return TwilioConnected(_text(msg, "protocol", event, required=False), _text(msg, "version", event,
                                                                                      required=False))
    if event == "start":
        return _start(_object(msg, "start", event), min_rate, max_rate)
    if event == "media":
        return _media(_object(msg, "media", event), max_media_bytes)
    if event == "mark":
        return TwilioMark(_text(_object(msg, "mark", event), "name", event))
    if event == "dtmf":
        dtmf = _object(msg, "dtmf", event)
        digit = _text(dtmf, "digit", event)
        if len(digit) != 1 or digit not in "0123456789*#ABCD":
            raise _bad(f"dtmf message: {digit[:MAX_TEXT]!r} is not a key (0-9, *, #, A-D)")
        return TwilioDtmf(_track(dtmf.get("track", "inbound"), event), digit)
    if event == "stop":
        stop = msg.get("stop", {})
        return TwilioStop(_text(stop, "callSid", event, required=False) if isinstance(stop, dict) else "")
    raise _bad(f"unknown event {event[:MAX_TEXT]!r}; Twilio sends connected, start, media, mark, dtmf and stop")


def _start(start: Mapping[str, Any], min_rate: int, max_rate: int) -> TwilioStart:
    event = "start"
    tracks = start.get("tracks", ["inbound"])
    if not isinstance(tracks, list) or not tracks or len(tracks) > len(TWILIO_TRACKS):
        raise _bad("start message: 'tracks' must list 'inbound', 'outbound' or both")
    names = tuple(_track(t, event) for t in tracks)
    if len(set(names)) != len(names):
        raise _bad(f"start message: a track is listed twice in {names}")
    fmt = _object(start, "mediaFormat", event)
    given = fmt.get("encoding")
    if given not in TWILIO_ENCODINGS:
        raise _bad(f"start message: media encoding {str(given)[:MAX_TEXT]!r} is not supported; use "
                   f"{', '.join(TWILIO_ENCODINGS)}", kind="unsupported_encoding")
    rate = _number(fmt, "sampleRate", event, 8000)
    if not min_rate <= rate <= max_rate:
        raise _bad(f"start message: sample rate {rate} is outside {min_rate}-{max_rate}", kind="bad_sample_rate")
    channels = _number(fmt, "channels", event, 1)
    if channels != 1:
        raise _bad(f"start message: {channels} channels; each track is one channel", kind="bad_channels")
    custom = start.get("customParameters", {})
    if not isinstance(custom, dict) or not all(isinstance(v, str) for v in custom.values()):
        raise _bad("start message: 'customParameters' must map names to strings")
    return TwilioStart(_text(start, "streamSid", event, required=False), _text(start, "callSid", event),
                       _text(start, "accountSid", event, required=False), names, TWILIO_ENCODINGS[str(given)],
                       rate, channels, dict(custom))


def _media(media: Mapping[str, Any], max_bytes: int) -> TwilioMedia:
    event = "media"
    payload = media.get("payload")
    if not isinstance(payload, str):
        raise _bad("media message: 'payload' must be a base64 string of G.711 audio", kind="bad_audio",
                   code=1007)
    if len(payload) > 4 * ((max_bytes + 2) // 3):  # before decoding: the bound is on what is sent
        raise _bad(f"media message: a payload of {len(payload)} base64 characters is over {max_bytes} bytes of "
                   "audio; Twilio sends 20 ms (160 bytes) a message", kind="too_big", code=1009)
    try:
        audio = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("media message: 'payload' is not valid base64", kind="bad_audio", code=1007) from None
    return TwilioMedia(_track(media.get("track", "inbound"), event), _number(media, "chunk", event, 0),
                       _number(media, "timestamp", event, 0), audio)


def track_names(start: TwilioStart) -> dict[str, str]:
    """The stream name of each track: ``customParameters.name``, else the call's SID; with both tracks, each
    name ends in ``/inbound`` or ``/outbound``. Raises ``bad_name`` for a name a stream cannot have."""
    name = start.parameters.get("name") or start.call_sid
    if not valid_name(name):
        raise _bad(f"bad stream name {name[:MAX_TEXT]!r} (customParameters.name, else callSid); use 1-64 letters, "
                   "digits, '_', '-' or '.'", kind="bad_name")
    if len(start.tracks) == 1:
        return {start.tracks[0]: name}
    return {track: f"{name}/{track}" for track in start.tracks}


# -- Asterisk AudioSocket ----------------------------------------------------------------------------------------

HEADER_BYTES = 3
"""a frame's kind byte and 2-byte big-endian payload length"""
KIND_HANGUP = 0x00
KIND_UUID = 0x01
KIND_DTMF = 0x03
KIND_AUDIO = 0x10
KIND_ERROR = 0xFF
AUDIO_RATES = {0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000, 0x15: 44100, 0x16: 48000,
               0x17: 96000, 0x18: 192000}
"""the audio kinds and their rates: ``0x10`` 8 kHz (the ``AudioSocket()`` application's), the others in newer
Asterisk's channel driver (``slin12`` ... ``slin192``)"""
MAX_AUDIO_S = 1.0
"""the most audio one frame may carry (Asterisk sends 20 ms)"""
MAX_ERROR_BYTES = 256
"""the largest error (and hangup) payload: Asterisk sends none or one byte"""
_NAMES = {KIND_HANGUP: "hangup", KIND_UUID: "uuid", KIND_DTMF: "dtmf", KIND_ERROR: "error"}


@dataclass(frozen=True)
class CallId:
    """The call's UUID, Asterisk's first frame: it names the stream."""

    id: uuid.UUID

    @property
    def name(self) -> str:
        return str(self.id)


@dataclass(frozen=True)
class CallAudio:
    """Signed linear 16-bit little-endian mono PCM at ``sample_rate``."""

    pcm: bytes
    sample_rate: int


@dataclass(frozen=True)
class CallDtmf:
    digit: str


@dataclass(frozen=True)
class CallError:
    """Something went wrong on Asterisk's side (``code``: its error byte, when it sent one)."""

    code: int | None


@dataclass(frozen=True)
class CallHangup:
    """The call ended."""


CallFrame = CallId | CallAudio | CallDtmf | CallError | CallHangup


def max_payload(kind: int) -> int:
    """The largest payload a frame of ``kind`` may have."""
    if kind in AUDIO_RATES:
        return min(0xFFFF, int(AUDIO_RATES[kind] * 2 * MAX_AUDIO_S))
    return {KIND_HANGUP: MAX_ERROR_BYTES, KIND_UUID: 16, KIND_DTMF: 1, KIND_ERROR: MAX_ERROR_BYTES}[kind]


def parse_header(header: bytes) -> tuple[int, int]:
    """``(kind, payload length)`` of a frame's first :data:`HEADER_BYTES`; raises :class:`ProtocolError` for a kind
    AudioSocket does not have (``bad_kind``) or a payload over its kind's bound (``too_big``), before it is read."""
    if len(header) != HEADER_BYTES:
        raise ValueError(f"a frame header has {HEADER_BYTES} bytes, got {len(header)}")
    kind, length = struct.unpack(">BH", header)
    if kind not in AUDIO_RATES and kind not in _NAMES:
        raise _bad(f"unknown frame kind 0x{kind:02x}; AudioSocket sends 0x01 (uuid), 0x10-0x18 (audio), 0x03 (dtmf), "
                   "0xff (error), 0x00 (hangup)", kind="bad_kind", code=CLOSE_BAD_DATA)
    limit = max_payload(kind)
    if length > limit:
        what = f"an audio frame at {AUDIO_RATES[kind]} Hz" if kind in AUDIO_RATES else f"a {_NAMES[kind]} frame"
        raise _bad(f"{what} of {length} bytes is over {limit} bytes", kind="too_big", code=1009)
    return kind, length


def parse_frame(kind: int, payload: bytes) -> CallFrame:
    """The frame of ``kind`` (checked by :func:`parse_header`) with its payload; raises :class:`ProtocolError`."""
    if kind in AUDIO_RATES:
        if len(payload) % 2:
            raise _bad(f"an audio frame of {len(payload)} bytes is not whole 16-bit samples", kind="bad_audio",
                       code=1007)
        return CallAudio(payload, AUDIO_RATES[kind])
    if kind == KIND_UUID:
        if len(payload) != 16:
            raise _bad(f"a uuid frame of {len(payload)} bytes; a UUID has 16", kind="bad_uuid")
        return CallId(uuid.UUID(bytes=payload))
    if kind == KIND_DTMF:
        if len(payload) != 1:
            raise _bad("a dtmf frame must hold one digit", kind="bad_dtmf")
        return CallDtmf(payload.decode("latin-1"))
    if kind == KIND_ERROR:
        return CallError(payload[0] if payload else None)
    return CallHangup()


def frame(kind: int, payload: bytes = b"") -> bytes:
    """One AudioSocket frame (what Asterisk sends, and the error frame the daemon sends before it closes)."""
    if len(payload) > 0xFFFF:
        raise ValueError(f"a frame's payload holds at most 65535 bytes, got {len(payload)}")
    return struct.pack(">BH", kind, len(payload)) + payload
