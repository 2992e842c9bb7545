"""OpenAI Realtime transcription sessions at ``/v1/realtime?intent=transcription`` (``docs/openai.md``).

The client configures the session (GA ``session.update`` with ``type: transcription``, or the beta
``transcription_session.update``), appends base64 PCM16 audio (24 kHz by default) with
``input_audio_buffer.append`` and may ``commit`` or ``clear`` it. The daemon's endpointing is the
server VAD: with ``[endpoint] vad`` the voice-activity detector sends ``input_audio_buffer.speech_started`` and
``speech_stopped`` as it hears speech start and stop (the session's ``silence_duration_ms`` is the stream's
silence that ends an utterance); without it the first text of an utterance sends ``speech_started`` and its final
``speech_stopped``. Partials send ``conversation.item.input_audio_transcription.delta`` and the final sends
``committed`` and ``...completed`` with the final's text. An item runs from its first speech to its final: should
the detector hear a pause that the model does not end the utterance at (a word it still spells), the item gets
another ``speech_started`` and ``speech_stopped``, so a client that stops talking when the user does (barge-in)
hears every start.

Deltas carry only what was appended, and a delta cannot take text back, so they carry only the words
that two partials in a row agree on (:func:`stable_delta`): the first partials of an utterance, from
little audio, are often rewritten ("ten no" before "turn on the"). The final's text then adds what it
appends to the text sent. Should a final or a later partial still rewrite words already sent, nothing
more is sent for them; ``completed`` always holds the final text, and clients that show deltas replace
them with it. Client mistakes get a Realtime ``error`` event and the session goes on
(as OpenAI's); :data:`MAX_ERRORS` of them close it (1008).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.aio.host import StreamHost
from streamer.aio.protocols.base import Quiet, StreamHandler
from streamer.aio.protocols.endpointing import own_endpointing, with_voice_events
from streamer.aio.stream import LiveStream
from streamer.endpoint import stream_rules
from streamer.events import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    Error,
    Event,
    Final,
    Partial,
    SpeechStarted,
    SpeechStopped,
)
from streamer.exceptions import AudioError, ProtocolError
from streamer.protocol import ENDPOINTING_MS, MAX_JSON_DEPTH, json_depth

__all__ = ["DEFAULT_RATE", "MAX_ERRORS", "RealtimeError", "RealtimeHandler", "stable_delta"]

DEFAULT_RATE = 24000
"""the Realtime API's PCM rate (``audio/pcm`` at 24 kHz, beta ``pcm16``)"""
MAX_ERRORS = 32
"""error events one session may cause; the next closes it (1008): a client that keeps sending wrong events"""
CLIENT_EVENTS = ("session.update", "transcription_session.update", "input_audio_buffer.append",
                 "input_audio_buffer.commit", "input_audio_buffer.clear")
MAX_UPDATE_BYTES = 16 << 10
"""the largest session update: a whole session with a long prompt is a few KiB; each update is parsed, applied
and echoed whole on the event loop, so 200 KB ones from two clients delayed every stream's finals by seconds"""
NOT_TRANSCRIPTION = ("response.create", "response.cancel", "conversation.item.create", "conversation.item.delete",
                     "conversation.item.truncate", "conversation.item.retrieve", "output_audio_buffer.clear")
"""client events of conversation sessions: a transcription session has no responses or conversation to change"""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def stable_delta(sent: str, previous: list[str], words: list[str]) -> str:
    """What to send as a delta after ``sent``: the words of a partial (``words``) that the one before it
    (``previous``) agrees on, from the first word on, less what was sent; '' when that rewrote sent text."""
    agreed: list[str] = []
    for a, b in zip(previous, words, strict=False):
        if a != b:
            break
        agreed.append(a)
    text = " ".join(agreed)
    return text[len(sent):] if text.startswith(sent) else ""


class RealtimeError(Exception):
    """A client mistake answered with an ``error`` event; the session goes on."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


Setting = str | int | float | bool | None
"""a value of an OpenAI detector's setting that the session keeps only to echo it"""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnDetection:
    """A session's ``turn_detection`` (OpenAI's ``server_vad`` or ``semantic_vad``), as it is kept and echoed.

    Only ``silence_duration_ms`` changes what the daemon does (the silence that ends the stream's utterances);
    the other settings are OpenAI's detectors', kept so that ``session.updated`` shows what the client set."""

    type: str = "server_vad"
    threshold: Setting = 0.5
    prefix_padding_ms: Setting = 300
    silence_duration_ms: int | float
    eagerness: Setting = None
    idle_timeout_ms: Setting = None
    create_response: Setting = None
    interrupt_response: Setting = None

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("eagerness", "idle_timeout_ms", "create_response", "interrupt_response")

    def given(self, value: Mapping[str, Any]) -> TurnDetection:
        """These defaults with the settings of a client's ``turn_detection`` object; :class:`RealtimeError` for a
        type or a silence the daemon cannot do. Keys it does not know, and values that are not scalars, are
        dropped: the session echoes only its own keys (a nested value could be deep enough to break the echo)."""
        kind = value.get("type", "server_vad")
        if kind not in ("server_vad", "semantic_vad"):
            raise RealtimeError(f"turn_detection {dict(value)!r} is not supported; use {{'type': 'server_vad'}} or "
                                "null", param="session.turn_detection")
        settings = {f.name: value[f.name] for f in dataclasses.fields(self)
                    if f.name in value and isinstance(value[f.name], Setting)}
        if (silence := settings.pop("silence_duration_ms", None)) is not None:  # (null: the daemon's)
            lo, hi = ENDPOINTING_MS
            if isinstance(silence, bool) or not isinstance(silence, int | float) or not lo <= silence <= hi:
                raise RealtimeError(f"silence_duration_ms must be a number from {lo} to {hi}, got {silence!r}",
                                    param="session.turn_detection.silence_duration_ms")
            settings["silence_duration_ms"] = silence
        return dataclasses.replace(self, **settings)

    def to_json(self) -> dict[str, Any]:
        """The object ``session.created`` / ``updated`` echo: OpenAI's optional settings only where set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k not in self._OPTIONAL}


@dataclass(slots=True)
class Transcription:
    """A session's ``transcription`` (beta ``input_audio_transcription``): kept and echoed; the model is the
    daemon's whatever a client names."""

    model: str
    language: str = ""
    prompt: str = ""

    def update(self, value: Mapping[str, Any]) -> None:
        """Take the string settings of a client's ``transcription`` object."""
        for f in dataclasses.fields(self):
            if isinstance(v := value.get(f.name), str):
                setattr(self, f.name, v)


class RealtimeHandler(StreamHandler):
    """One Realtime transcription session: JSON events in (audio as base64), JSON events out."""

    protocol: ClassVar[str] = "openai-realtime"

    def __init__(self, host: StreamHost, ws: ServerConnection) -> None:
        super().__init__(host, ws)
        request = ws.request
        url = urlsplit(request.path if request is not None else "")
        self.beta = request is not None and "realtime=v1" in request.headers.get("OpenAI-Beta", "")
        """a beta client (``OpenAI-Beta: realtime=v1``): ``transcription_session.*`` events and ``pcm16``"""
        self.configured = parse_qs(url.query).get("intent", [""])[0] == "transcription"
        """a transcription session: asked for by ``?intent=transcription`` or a transcription session update"""
        self.rate = DEFAULT_RATE
        self.transcription = Transcription(host.model.name)
        self.turn_detection: TurnDetection | None = self.vad_defaults()
        """utterances end at the daemon's endpoints; None (the client's null): only at a client's commit"""
        self.errors = 0
        self.offset_s = 0.0
        """session time of the audio before the current stream (a clear starts a new one)"""
        self.stream_s = 0.0
        """audio seconds of the current stream"""
        self.item: str | None = None
        """the item of the utterance under way (from its first speech or text to its final)"""
        self.speaking = False
        """a speech_started of the item was sent and no speech_stopped after it"""
        self.previous: str | None = None
        self.sent = ""
        """text of the current item sent as deltas"""
        self.partial_words: list[str] = []
        """the words of the current item's last partial"""
        self.held: list[str] = []
        """finals' texts waiting for a commit (turn_detection off)"""
        self.appended = False
        """audio came since the last commit or clear"""

    # -- sending -------------------------------------------------------------------------------------------

    async def send(self, type: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"event_id": f"event_{uuid.uuid4().hex[:20]}", "type": type, **fields},
                                      ensure_ascii=False))

    async def send_error(self, message: str, code: str, param: str | None = None, event_id: str | None = None,
                         type: str = "invalid_request_error") -> None:
        await self.send("error", error={"type": type, "code": code, "message": message, "param": param,
                                        "event_id": event_id})

    async def report(self, error: Error) -> None:
        try:
            await self.send_error(error.message, error.code, type="server_error" if error.close_code == 1011
                                  else "invalid_request_error")
            await self.ws.close(error.close_code, error.close_reason)
        except ConnectionClosed:
            pass

    async def send_busy(self, error: Error) -> None:
        await self.send_error(error.message, error.code, type="server_error")

    # -- the session ---------------------------------------------------------------------------------------

    @property
    def server_vad(self) -> bool:
        """turn detection on: utterances end at the daemon's endpoints"""
        return self.turn_detection is not None

    def vad_defaults(self) -> TurnDetection:
        ep = self.host.cfg.endpoint
        return TurnDetection(silence_duration_ms=ep.vad_silence_ms if ep.rules().vad
                             else int(ep.silence_after_speech_s * 1000))

    def session(self) -> dict[str, Any]:
        """The session as ``session.created`` / ``session.updated`` describe it (GA or beta shape)."""
        sid = f"sess_{self.id}"
        transcription = dataclasses.asdict(self.transcription)
        vad = self.turn_detection.to_json() if self.turn_detection is not None else None
        if self.beta:
            return {"id": sid, "object": "realtime.transcription_session", "input_audio_format": "pcm16",
                    "input_audio_transcription": transcription, "turn_detection": vad,
                    "input_audio_noise_reduction": None, "include": None}
        return {"type": "transcription", "object": "realtime.transcription_session", "id": sid,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.rate},
                                    "transcription": transcription, "turn_detection": vad,
                                    "noise_reduction": None}},
                "include": None}

    async def send_session(self, verb: str) -> None:
        await self.send(f"{'transcription_session' if self.beta else 'session'}.{verb}", session=self.session())

    def update(self, session: Any, beta: bool) -> None:
        """Apply a session update (GA or beta); :class:`RealtimeError` names the field at fault."""
        if not isinstance(session, dict):
            raise RealtimeError("'session' must be an object", param="session")
        if beta:
            fmt, tr = session.get("input_audio_format"), session.get("input_audio_transcription")
            if fmt is not None and fmt != "pcm16":
                raise RealtimeError(f"input_audio_format {fmt!r} is not supported; use 'pcm16' (24 kHz)",
                                    param="session.input_audio_format")
            rate = DEFAULT_RATE
            has_vad, vad = "turn_detection" in session, session.get("turn_detection")
        else:
            kind = session.get("type", "transcription")
            if kind != "transcription":
                raise RealtimeError(f"session type {kind!r} is not supported: this server only transcribes; use "
                                    "'transcription' (connect with ?intent=transcription)", param="session.type")
            audio = session.get("audio", {})
            inp = audio.get("input", {}) if isinstance(audio, dict) else None
            if not isinstance(inp, dict):
                raise RealtimeError("'session.audio.input' must be an object", param="session.audio.input")
            fmt, tr = inp.get("format"), inp.get("transcription")
            rate = self.rate
            if fmt is not None:
                if not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm":
                    raise RealtimeError(f"audio format {fmt!r} is not supported; use {{'type': 'audio/pcm', 'rate': "
                                        "24000}", param="session.audio.input.format")
                rate = fmt.get("rate", DEFAULT_RATE)
                srv = self.host.cfg.server
                if not isinstance(rate, int) or isinstance(rate, bool) or not srv.min_sample_rate <= rate <= \
                        srv.max_sample_rate:
                    raise RealtimeError(f"audio rate {rate!r} is not supported; use 24000 (or an integer from "
                                        f"{srv.min_sample_rate} to {srv.max_sample_rate})",
                                        param="session.audio.input.format.rate")
            has_vad, vad = "turn_detection" in inp, inp.get("turn_detection")
        if tr is not None and not isinstance(tr, dict):
            raise RealtimeError("'transcription' must be an object with model, language, prompt",
                                param="session.audio.input.transcription")
        if has_vad and vad is not None and not isinstance(vad, dict):
            raise RealtimeError(f"turn_detection {vad!r} is not supported; use {{'type': 'server_vad'}} or null",
                                param="session.turn_detection")
        turn_detection = self.vad_defaults().given(vad) if has_vad and vad is not None else None
        if rate != self.rate and self.stream is not None:
            raise RealtimeError("the audio rate cannot change after audio was appended; clear the buffer first",
                                param="session.audio.input.format.rate")
        # all checked: apply
        self.configured, self.rate = True, rate
        if isinstance(tr, dict):
            self.transcription.update(tr)
        if has_vad:
            self.turn_detection = turn_detection

    # -- events of the stream ------------------------------------------------------------------------------

    async def begin_item(self, start_s: float) -> None:
        self.item, self.sent, self.partial_words = f"item_{uuid.uuid4().hex[:20]}", "", []
        await self.speech_started(start_s)

    async def speech_started(self, start_s: float) -> None:
        assert self.item is not None
        self.speaking = True
        await self.send("input_audio_buffer.speech_started", audio_start_ms=int((self.offset_s + start_s) * 1000),
                        item_id=self.item)

    async def speech_stopped(self, end_s: float) -> None:
        assert self.item is not None
        self.speaking = False
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=int((self.offset_s + end_s) * 1000),
                        item_id=self.item)

    async def delta(self, delta: str) -> None:
        if self.item is not None and delta:
            self.sent += delta
            await self.send("conversation.item.input_audio_transcription.delta", item_id=self.item,
                            content_index=0, delta=delta)

    async def complete(self, text: str, end_s: float | None) -> None:
        """The utterance ends: speech_stopped (at an endpoint), committed, the last delta and completed."""
        assert self.item is not None
        if end_s is not None and self.speaking:  # (the detector's speech_stopped may have come already)
            await self.speech_stopped(end_s)
        self.speaking = False
        await self.send("input_audio_buffer.committed", item_id=self.item, previous_item_id=self.previous)
        await self.delta(text[len(self.sent):] if text.startswith(self.sent) else "")
        await self.send("conversation.item.input_audio_transcription.completed", item_id=self.item,
                        content_index=0, transcript=text)
        self.previous, self.item, self.sent, self.partial_words = self.item, None, "", []

    async def voice(self, e: SpeechStarted | SpeechStopped) -> None:
        """The detector heard speech start or stop: the item's speech_started (the first begins it) or
        speech_stopped; nothing with turn detection off."""
        if not self.server_vad:
            return
        if isinstance(e, SpeechStarted):
            if self.item is None:
                await self.begin_item(e.time)
            elif not self.speaking:
                await self.speech_started(e.time)
        elif self.item is not None and self.speaking:
            await self.speech_stopped(e.time)

    async def take(self, events: Sequence[Event]) -> None:
        """Serialise the stream's events (server VAD); with turn detection off, finals wait for a commit.

        Call it right after the stream call that returned ``events``: the detector's events join them here."""
        for e in with_voice_events(self.stream, events):
            if isinstance(e, SpeechStarted | SpeechStopped):
                await self.voice(e)
                continue
            if not isinstance(e, Partial | Final):
                continue
            if not self.server_vad:
                if isinstance(e, Final) and e.text:
                    self.held.append(e.text)
                continue
            if e.text and self.item is None:
                await self.begin_item(e.start)
            if isinstance(e, Partial):
                words = e.text.split()
                await self.delta(stable_delta(self.sent, self.partial_words, words))
                self.partial_words = words
            elif self.item is not None:  # a final; one without text and without an item had no speech
                await self.complete(e.text, e.end if e.reason != "flush" else None)

    send_last = take

    def endpointing(self, stream: LiveStream) -> None:
        """With the detector on (``[endpoint] vad``) and turn detection: the stream sends the detector's speech
        events, and ends utterances after the session's ``silence_duration_ms`` of its silence."""
        rules = stream.session.endpointer.rules
        if self.turn_detection is None or not (rules.vad and rules.enabled):
            return
        ms = round(self.turn_detection.silence_duration_ms)
        own_endpointing(stream, stream_rules(rules, endpointing_ms=ms, speech_events=True), voice_events=True)

    # -- client events -------------------------------------------------------------------------------------

    async def append(self, msg: dict[str, Any]) -> None:
        audio = msg.get("audio")
        if not isinstance(audio, str):
            raise RealtimeError("'audio' must be a base64 string of PCM16 samples", param="audio")
        if not self.configured:
            raise RealtimeError("audio before the session was set up: connect with ?intent=transcription, or send "
                                "session.update with session.type 'transcription' first", code="session_not_configured",
                                param="audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("'audio' is not valid base64", code="invalid_base64", param="audio") from None
        if len(pcm) % 2:
            raise RealtimeError(f"'audio' holds {len(pcm)} bytes, not whole 16-bit samples", param="audio")
        if not pcm:
            return
        if self.stream is None:
            self.stream = self.open_stream(self.rate)
            self.endpointing(self.stream)
        self.receiver.heard_audio()  # audio came (as text): the idle timeout starts again
        self.appended = True
        self.stream_s += len(pcm) / 2 / self.rate
        await self.take(await self.stream.feed_bytes(pcm))

    async def commit(self) -> None:
        """The client ends the utterance: the audio so far becomes final and its item is committed."""
        if not self.appended or self.stream is None:
            raise RealtimeError("the input audio buffer is empty: append audio before committing",
                                code="input_audio_buffer_commit_empty")
        self.appended = False
        before = self.previous
        await self.take(await self.stream.flush())
        if self.server_vad and self.previous != before:
            return  # the flush's final completed the utterance
        await self.complete_held()

    async def complete_held(self) -> None:
        """Commit the finals held for a commit (turn detection off) as one item; an empty one when there are none."""
        if self.item is None:  # no speech since the last item: an empty one, as OpenAI transcribes silence
            self.item, self.sent = f"item_{uuid.uuid4().hex[:20]}", ""
        text, self.held = " ".join(self.held), []
        await self.complete(text, None)

    async def clear(self) -> None:
        """Drop the audio not yet final: the stream ends without its finals; the next audio starts a new one."""
        if self.stream is not None:
            self.close_stream()
        self.offset_s += self.stream_s
        self.stream_s = 0.0
        self.item, self.sent, self.partial_words, self.held, self.appended = None, "", [], [], False
        self.speaking = False
        await self.send("input_audio_buffer.cleared")

    async def handle(self, msg: dict[str, Any], size: int = 0) -> None:
        """One client event of ``size`` characters; :class:`RealtimeError` for a client mistake."""
        if not isinstance(msg.get("type"), str):
            raise RealtimeError("an event must have a string 'type'", code="invalid_event", param="type")
        kind = msg["type"]
        if kind in ("session.update", "transcription_session.update"):
            if size > MAX_UPDATE_BYTES:
                raise RealtimeError(f"the session update has {size} bytes; at most {MAX_UPDATE_BYTES}",
                                    code="update_too_large", param="session")
            self.update(msg.get("session"), beta=kind.startswith("transcription_session"))
            await self.send_session("updated")
        elif kind == "input_audio_buffer.append":
            await self.append(msg)
        elif kind == "input_audio_buffer.commit":
            await self.commit()
        elif kind == "input_audio_buffer.clear":
            await self.clear()
        elif kind in NOT_TRANSCRIPTION:
            raise RealtimeError(f"{kind} is not supported: this is a transcription session (no responses or "
                                f"conversation); events are {', '.join(CLIENT_EVENTS)}", code="unsupported_event",
                                param="type")
        else:
            raise RealtimeError(f"unknown event type {kind[:60]!r}; events are {', '.join(CLIENT_EVENTS)}",
                                code="invalid_event_type", param="type")

    async def serve(self) -> None:
        await self.send_session("created")
        while True:
            msg = await self.recv()
            if isinstance(msg, Quiet):
                if self.stream is not None:
                    await self.take(await self.stream.finish())
                if self.held:  # turn detection off and no commit came: the text is sent, not dropped
                    await self.complete_held()
                await self.ws.close(CLOSE_NORMAL if msg is Quiet.IDLE else CLOSE_GOING_AWAY, msg.value)
                return
            event_id = None
            try:
                if isinstance(msg, bytes):
                    raise RealtimeError("binary messages are not events: send JSON text events, audio as base64 "
                                        "in input_audio_buffer.append", code="invalid_event")
                if (depth := json_depth(msg)) > MAX_JSON_DEPTH:  # parsed, then too deep to echo (RecursionError)
                    raise RealtimeError(f"the event nests {depth} levels deep; at most {MAX_JSON_DEPTH}",
                                        code="invalid_json")
                try:  # NaN and Infinity are no JSON: echoed, a browser's parser would fail on them
                    event = json.loads(msg, parse_constant=_no_constant)
                except (ValueError, RecursionError) as exc:
                    raise RealtimeError(f"the message is not JSON ({exc})", code="invalid_json") from None
                if not isinstance(event, dict):
                    raise RealtimeError("an event must be a JSON object with a string 'type'", code="invalid_event")
                event_id = event["event_id"][:64] if isinstance(event.get("event_id"), str) else None
                await self.handle(event, len(msg))
            except (RealtimeError, AudioError) as exc:
                self.errors += 1
                if self.errors > MAX_ERRORS:
                    raise ProtocolError(f"more than {MAX_ERRORS} wrong events; the last: {exc}",
                                        kind="too_many_errors", code=CLOSE_POLICY) from None
                code = exc.code if isinstance(exc, RealtimeError) else "invalid_audio"
                param = exc.param if isinstance(exc, RealtimeError) else "audio"
                await self.send_error(str(exc), code, param, event_id)

