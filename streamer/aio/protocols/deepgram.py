"""Deepgram's live API at ``/v1/listen`` (``docs/deepgram.md``): its query parameters, its messages, its errors.

A client (the Deepgram SDK, Pipecat's ``DeepgramSTTService``, LiveKit's Deepgram plugin, given the
daemon's URL) opens the websocket with its options in the query string, already checked before the
upgrade (:class:`DeepgramFront`: a bad one gets Deepgram's 400). It sends raw audio in binary
messages, cut anywhere (a sample split across two messages is joined), and ``KeepAlive``,
``Finalize`` and ``CloseStream`` as text. With ``multichannel=true`` each channel is a stream of its
own (``NAME-0``, ``NAME-1``, ...), and its messages carry its ``channel_index``; else the channels
are mixed into one stream. Every stream publishes its events to viewers and MQTT like any other.

The messages are written by :mod:`streamer.deepgram`. A client's unreadable text message gets an
``Error`` (``SchemaError``) and the stream goes on, up to :data:`MAX_ERRORS`; audio the daemon
cannot take, or the model's failure, gets an ``Error`` and the close, after the finals of what came
before. ``KeepAlive`` keeps the connection open without audio (the idle timeout counts from it), as
Deepgram's does.

A pre-recorded request, ``POST /v1/listen`` with the audio as its body, is answered by
:meth:`DeepgramFront.serve_upload`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import streamer
from streamer.aio.host import StreamHost, close_named, open_named
from streamer.aio.http.connection import HttpConnection, Upload, UploadProblem, respond
from streamer.aio.protocols.base import Quiet, StreamHandler
from streamer.aio.protocols.endpointing import own_endpointing, with_voice_events
from streamer.aio.protocols.words import tuned_decoder
from streamer.aio.stream import LiveStream
from streamer.audio import bad_samples, decode_pcm
from streamer.audiofile import READ_BLOCK_S, FileAudio, FileAudioError
from streamer.deepgram import (
    DeepgramError,
    ListenOptions,
    error_message,
    metadata,
    parse_control,
    parse_query,
    prerecorded,
    results,
    speech_started,
    utterance_end,
)
from streamer.engine import SAMPLE_RATE, WordDecoder
from streamer.events import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, Error, Event, Final, Partial
from streamer.events import SpeechStarted as EngineSpeechStarted
from streamer.events import UtteranceEnd as EngineUtteranceEnd
from streamer.exceptions import AudioError, InferenceError, ProtocolError

logger = logging.getLogger("streamer.server")

Authorize = Callable[[Request, dict[str, list[str]], int], bool]
"""whether a request carries the token: the request, its query, the port it came to"""

__all__ = ["DEEPGRAM_PATH", "MAX_ERRORS", "DeepgramFront", "DeepgramHandler", "subprotocol_token"]

DEEPGRAM_PATH = "/v1/listen"
"""Deepgram's listen path; ``/v1/listen/NAME`` (with a name) is the native viewer"""
MAX_ERRORS = 32
"""unreadable text messages one stream may send; the next closes it (1008)"""
MAX_CONTROL_CHARS = 4096
"""the longest text message read: a control message is a few dozen characters"""


def subprotocol_token(headers: Headers) -> str | None:
    """The key of ``Sec-WebSocket-Protocol: token, KEY`` (how browsers, which cannot set headers, authenticate to
    Deepgram), else None."""
    offered = [p.strip() for value in headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",")]
    if len(offered) >= 2 and offered[0].lower() == "token" and offered[1]:
        return offered[1]
    return None


def _query(request: Request | None) -> dict[str, list[str]]:
    return parse_qs(urlsplit(request.path if request is not None else "").query)


def options_of(host: StreamHost, query: dict[str, list[str]], *, live: bool) -> ListenOptions:
    """The request's options within the daemon's limits (:func:`streamer.deepgram.parse_query`)."""
    srv = host.cfg.server
    return parse_query(query, live=live, min_rate=srv.min_sample_rate, max_rate=srv.max_sample_rate)


_CODES = {"repeated_header": "Bad Request", "host": "FORBIDDEN", "origin": "FORBIDDEN", "auth": "INVALID_AUTH",
          "too_large": "PAYLOAD_TOO_LARGE", "ambiguous": "Bad Request", "length_required": "LENGTH_REQUIRED",
          "timeout": "REQUEST_TIMEOUT", "idle": "REQUEST_TIMEOUT", "malformed": "Bad Request"}
"""Deepgram's ``err_code`` of each :data:`~streamer.aio.http.connection.Problem`"""


def _deepgram_error(problem: UploadProblem) -> DeepgramError:
    """An upload's problem in Deepgram's shape."""
    if problem.problem == "auth":
        return DeepgramError("Invalid credentials: send 'Authorization: Token KEY' (or Bearer)", status=401,
                             code="INVALID_AUTH")
    return DeepgramError(str(problem), status=problem.status, code=_CODES[problem.problem])


def _header_text(text: str) -> str:
    """``text`` as a header value: printable ASCII, cut to 200 characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:200])


class DeepgramFront:
    """The HTTP side of ``/v1/listen``: Deepgram's answers before the websocket opens, and pre-recorded requests.

    ``authorized`` and ``known_host`` are the HTTP front's checks of the token and of the ``Host`` header.
    """

    def __init__(self, host: StreamHost, authorized: Authorize = lambda request, query, port: True,
                 known_host: Callable[[Request], bool] = lambda request: True) -> None:
        self.host = host
        self.authorized = authorized
        self.known_host = known_host

    @staticmethod
    def answer(conn: ServerConnection, error: DeepgramError) -> Response:
        """Deepgram's error answer: its JSON body, and ``dg-error`` / ``dg-request-id`` (which clients read from a
        refused websocket upgrade)."""
        request_id = str(uuid.uuid4())
        response = respond(conn, error.status, json.dumps(error.body(request_id)), "application/json")
        response.headers["dg-request-id"] = request_id
        response.headers["dg-error"] = _header_text(str(error))
        return response

    def unauthorized(self, conn: ServerConnection) -> Response:
        """401 in Deepgram's shape."""
        return self.answer(conn, DeepgramError("Invalid credentials: send 'Authorization: Token KEY' (or Bearer), "
                                               "or the websocket subprotocols 'token' and KEY", status=401,
                                               code="INVALID_AUTH"))

    def check_upgrade(self, conn: ServerConnection, request: Request) -> Response | None:
        """A live request's options: None when they are good (the upgrade goes on), else Deepgram's 400."""
        try:
            options_of(self.host, _query(request), live=True)
        except DeepgramError as exc:
            self.host.metrics.streams_rejected.labels("bad_request").inc()
            return self.answer(conn, exc)
        return None


    # -- pre-recorded: POST /v1/listen --------------------------------------------------------------------

    @property
    def max_upload_bytes(self) -> int:
        return self.host.cfg.deepgram.max_upload_bytes

    def serves_post(self, path: str) -> bool:
        return self.host.cfg.deepgram.enabled and path == DEEPGRAM_PATH

    async def serve_upload(self, conn: HttpConnection, upload: Upload) -> None:
        """Answer one pre-recorded request (the audio as the body) with Deepgram's JSON, and close the connection."""
        request_id = str(uuid.uuid4())

        async def answer_error(exc: DeepgramError) -> None:
            headers = [("Content-Type", "application/json"), ("dg-request-id", request_id),
                       ("dg-error", _header_text(str(exc)))]
            if exc.status in (429, 503):
                headers.append(("Retry-After", "1"))
            await conn.answer(exc.status, headers, json.dumps(exc.body(request_id)).encode())

        await conn.serve_upload(self._answer(conn, upload, request_id), host=self.host,
                                request=f"deepgram request {request_id}", error=DeepgramError,
                                reason=lambda e: (e.status, f"http_{e.status}"), answer_error=answer_error)

    async def _answer(self, conn: HttpConnection, upload: Upload, request_id: str) -> None:
        t0 = time.perf_counter()
        body = await self._serve(conn, upload, request_id)
        await conn.answer(200, [("Content-Type", "application/json"), ("dg-request-id", request_id)],
                          json.dumps(body, ensure_ascii=False).encode())
        logger.info("deepgram request %s: %.1f s of audio in %.2f s", request_id, body["metadata"]["duration"],
                    time.perf_counter() - t0)

    async def _serve(self, conn: HttpConnection, upload: Upload, request_id: str) -> dict[str, Any]:
        host, request = self.host, upload.request
        query = _query(request)
        try:
            upload.check(conn, host, known_host=self.known_host, limit_key="deepgram.max_upload_bytes",
                         authorized=lambda r: self.authorized(r, query, conn.local_address[1]))
        except UploadProblem as exc:
            raise _deepgram_error(exc) from None
        options = options_of(host, query, live=False)
        async with host.admission("deepgram") as refused:  # one of the streams counted against server.max_streams
            if refused is not None and refused.close_code == CLOSE_GOING_AWAY:
                raise DeepgramError("the server is shutting down; try again later", status=503,
                                    code="SERVICE_UNAVAILABLE")
            if refused is not None:
                raise DeepgramError(f"server busy: {host.cfg.server.max_streams} streams at most, try again later",
                                    status=429, code="TOO_MANY_REQUESTS")
            limits = host.cfg.deepgram
            try:
                data = await upload.read(conn, timeout_s=limits.upload_timeout_s, idle_s=host.cfg.server.idle_timeout_s,
                                         timeout_key="deepgram.upload_timeout_s", limit_key="deepgram.max_upload_bytes")
            except UploadProblem as exc:
                raise _deepgram_error(exc) from None
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype == "application/json" or ctype.endswith("+json"):
                raise remote_url(data)
            return await conn.unless_left(self._transcribe(data, options, request_id))

    async def _transcribe(self, data: bytes, options: ListenOptions, request_id: str) -> dict[str, Any]:
        """Feed the audio through a stream per channel (one, mixed, without ``multichannel``); Deepgram's answer."""
        host, cfg = self.host, self.host.cfg
        source = await asyncio.to_thread(_Source, data, options, cfg.deepgram.max_audio_s,
                                         cfg.server.min_sample_rate, cfg.server.max_sample_rate)
        hotwords = options.hotwords()
        words: WordDecoder | None = None
        try:
            words = await tuned_decoder(host, None, hotwords=hotwords) if hotwords else None
        except ProtocolError as exc:
            raise DeepgramError(str(exc)) from None
        n = source.channels if options.multichannel else 1
        base = request_id.replace("-", "")[:12]
        streams: list[tuple[str, LiveStream]] = []
        finals: list[list[Final]] = [[] for _ in range(n)]
        try:
            for i in range(n):
                session = base if n == 1 else f"{base}-{i}"
                stream = open_named(host, session, sample_rate=source.rate, channels=source.channels if n == 1 else 1,
                                    words=words, live=False)
                stream.wants_partials = False  # (a file's answer has its finals only)
                streams.append((session, stream))
                rules = options.rules(cfg.endpoint.rules())
                if rules != cfg.endpoint.rules():
                    own_endpointing(stream, rules)
            done = False
            while not done and not host.stopping.is_set():
                block, done = await asyncio.to_thread(source.read)
                if not len(block):
                    continue
                fed = await asyncio.gather(*(s.feed(block if n == 1 else block[:, i : i + 1])
                                             for i, (_, s) in enumerate(streams)))
                for i, events in enumerate(fed):
                    finals[i] += [e for e in events if isinstance(e, Final)]
            for i, (_, stream) in enumerate(streams):
                finals[i] += [e for e in await stream.finish() if isinstance(e, Final)]
            if not done:
                raise DeepgramError("the server is shutting down; send the audio again", status=503,
                                    code="SERVICE_UNAVAILABLE")
        except AudioError as exc:
            raise DeepgramError(f"failed to process audio: {exc}", code="Bad Request") from None
        except InferenceError as exc:
            raise DeepgramError(f"the model failed: {exc}", status=500, code="INTERNAL_SERVER_ERROR") from None
        except ProtocolError as exc:
            raise DeepgramError(str(exc), status=500, code="INTERNAL_SERVER_ERROR") from None
        finally:
            for session, stream in streams:
                close_named(host, stream, session)
        meta = metadata(request_id=request_id, sha256=hashlib.sha256(data).hexdigest(),
                        created=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                        duration=source.seconds, channels=n, model=host.model.name, version=streamer.__version__)
        return prerecorded(finals, meta)


class _Channel:
    """One stream of the connection: a channel of the audio (all of them mixed, without ``multichannel``)."""

    def __init__(self, index: int, session: str, stream: LiveStream) -> None:
        self.index = index
        self.session = session
        self.stream = stream
        self.fed_s = 0.0
        """seconds of audio fed"""


class DeepgramHandler(StreamHandler):
    """One live Deepgram connection: raw audio and control messages in, Deepgram's messages out."""

    protocol: ClassVar[str] = "deepgram"
    label: ClassVar[str] = "deepgram stream"

    def __init__(self, host: StreamHost, ws: ServerConnection) -> None:
        super().__init__(host, ws)
        self.request_id = str(uuid.uuid4())
        self.created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.options = ListenOptions(encoding="linear16", sample_rate=16000)
        self.channels: list[_Channel] = []
        self.rest = b""
        """the bytes of a frame cut across two messages"""
        self.sha256 = hashlib.sha256()
        self.errors = 0
        self.model = host.model.name
        self.version = streamer.__version__

    # -- sending -------------------------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message, ensure_ascii=False))

    async def send_results(self, channel: _Channel, events: list[Event], *, from_finalize: bool = False) -> None:
        """A stream call's events as Deepgram's messages: SpeechStarted first (read off the audio ahead of the
        windows over it), then the Results (partials only with ``interim_results``), then UtteranceEnd (after
        the final it follows). Call it right after the stream call: none of its engine calls runs then."""
        opts, n = self.options, len(self.channels) if self.options.multichannel else 1
        finals = 0
        for e in with_voice_events(channel.stream, events):
            if isinstance(e, EngineSpeechStarted) and opts.vad_events:
                await self.send(speech_started(e.time, channel=channel.index, channels=n))
            elif isinstance(e, EngineUtteranceEnd):
                await self.send(utterance_end(e.time, channel=channel.index, channels=n))
            elif isinstance(e, Final) or (isinstance(e, Partial) and opts.interim_results):
                finals += isinstance(e, Final)
                await self.send(results(e, channel=channel.index, channels=n, request_id=self.request_id,
                                        model=self.model, version=self.version, from_finalize=from_finalize,
                                        endpointing=opts.endpointing))
        if from_finalize and not finals:  # a Finalize always gets its final, empty when nothing was pending
            await self.send(results(None, channel=channel.index, channels=n, request_id=self.request_id,
                                    model=self.model, version=self.version, from_finalize=True, at=channel.fed_s))

    async def send_metadata(self) -> None:
        duration = max((c.fed_s for c in self.channels), default=0.0)
        await self.send(metadata(request_id=self.request_id, sha256=self.sha256.hexdigest(), created=self.created,
                                 duration=duration, channels=self.options.channels, model=self.model,
                                 version=self.version))

    async def report(self, error: Error) -> None:
        variant = "NET-0000" if error.close_code == 1011 else "DATA-0000"
        try:
            await self.send(error_message(error.message, variant))
            await self.ws.close(error.close_code, f"{variant}: {error.message}"[:120])
        except ConnectionClosed:
            pass

    async def send_busy(self, error: Error) -> None:
        await self.send(error_message(error.message, "TOO_MANY_REQUESTS" if error.code == "busy" else "NET-0000"))

    # -- the streams ---------------------------------------------------------------------------------------

    async def open_channels(self) -> None:
        """One stream, or one per channel with ``multichannel``, each with the request's endpointing and words."""
        host, opts = self.host, self.options
        hotwords = opts.hotwords()
        words: WordDecoder | None = await tuned_decoder(host, None, hotwords=hotwords) if hotwords else None
        base = host.cfg.endpoint.rules()
        rules = opts.rules(base)
        n = opts.streams
        for i in range(n):
            session = self.id if n == 1 else f"{self.id}-{i}"
            stream = open_named(host, session, sample_rate=opts.sample_rate or 16000,
                                channels=1 if n > 1 else opts.channels, encoding=opts.daemon_encoding, words=words)
            stream.wants_partials = opts.interim_results  # (Deepgram's default: finals only)
            self.channels.append(_Channel(i, session, stream))
            if rules != base or opts.vad_events:  # (the daemon's rules may run the detector already)
                own_endpointing(stream, rules, voice_events=opts.vad_events)
        self.stream = self.channels[0].stream

    async def feed(self, data: bytes) -> None:
        """Audio as it came: cut at whole frames (the rest waits for the next message), fed to every channel."""
        self.sha256.update(data)
        opts = self.options
        data = self.rest + data
        cut = len(data) - len(data) % opts.frame_bytes
        data, self.rest = data[:cut], data[cut:]
        if not data:
            return
        block = decode_pcm(data, opts.daemon_encoding, opts.channels)
        seconds = len(block) / (opts.sample_rate or 16000)
        if len(self.channels) == 1:
            done = [await self.channels[0].stream.feed(block)]
        else:  # the channels' windows reach the worker together, and are batched together
            done = await asyncio.gather(*(c.stream.feed(block[:, c.index : c.index + 1]) for c in self.channels))
        for channel, events in zip(self.channels, done, strict=True):
            channel.fed_s += seconds
            await self.send_results(channel, events)

    async def finalize(self) -> None:
        """``Finalize``: every channel's audio so far becomes final, marked ``from_finalize``."""
        done = await asyncio.gather(*(c.stream.flush() for c in self.channels))
        for channel, events in zip(self.channels, done, strict=True):
            await self.send_results(channel, events, from_finalize=True)

    async def finish(self) -> None:
        """The end of the audio: every channel's last finals."""
        for channel in self.channels:
            await self.send_results(channel, await channel.stream.finish())

    async def last_finals(self, exc: BaseException) -> list[Event]:
        """Before an error ends the connection: every channel's last finals, sent here (none to return)."""
        if not self.channels or isinstance(exc, InferenceError):
            return []
        try:
            await self.finish()
        except Exception as err:  # the finals are a courtesy: the error reply still goes out
            self.log.info("%s %s: its last finals failed: %s", self.label, self.id, err)
        return []

    async def send_last(self, events: list[Event]) -> None:
        """Nothing: :meth:`last_finals` sent them with their channels."""

    def close_stream(self) -> None:
        for channel in self.channels:
            close_named(self.host, channel.stream, channel.session)
        self.channels = []
        self.stream = None
        self.host.release_names(self.id)

    # -- the connection ------------------------------------------------------------------------------------

    async def end(self, code: int, reason: str) -> None:
        """The last finals, ``Metadata``, and the close."""
        await self.finish()
        await self.send_metadata()
        await self.ws.close(code, reason)

    async def serve(self) -> None:
        try:
            self.options = options_of(self.host, _query(self.ws.request), live=True)
        except DeepgramError as exc:  # checked before the upgrade; a reload may have changed the limits since
            raise ProtocolError(str(exc), kind="bad_request", code=CLOSE_POLICY) from None
        await self.open_channels()
        while True:
            msg = await self.recv()
            if isinstance(msg, Quiet):  # the client idled, or the daemon stops
                await self.end(CLOSE_NORMAL if msg is Quiet.IDLE else CLOSE_GOING_AWAY, msg.value)
                return
            if isinstance(msg, bytes):
                await self.feed(msg)
                continue
            try:
                if len(msg) > MAX_CONTROL_CHARS:
                    raise DeepgramError(f"a text message of {len(msg)} characters; control messages have at most "
                                        f"{MAX_CONTROL_CHARS}", code="SchemaError")
                kind = parse_control(msg)
            except DeepgramError as exc:
                self.errors += 1
                if self.errors > MAX_ERRORS:
                    raise ProtocolError(f"more than {MAX_ERRORS} unreadable messages; the last: {exc}",
                                        kind="too_many_errors", code=CLOSE_POLICY) from None
                await self.send(error_message(str(exc), "SchemaError", msg[:200]))
                continue
            if kind == "KeepAlive":
                self.receiver.heard_audio()
            elif kind == "Finalize":
                await self.finalize()
            else:
                await self.end(CLOSE_NORMAL, "CloseStream")
                return


def remote_url(data: bytes) -> DeepgramError:
    """The refusal of a JSON body: ``{"url": ...}`` asks the server to fetch the audio, which this one never does."""
    try:
        asks = isinstance(json.loads(data), dict) and "url" in json.loads(data)
    except (ValueError, RecursionError):
        asks = False
    if asks:
        return DeepgramError("a JSON body with a url asks the server to fetch the audio from that address; this server "
                             "does not fetch URLs for clients (anyone could make it call any host): send the audio "
                             "itself as the body, with its Content-Type (audio/wav, ...)", code="Bad Request")
    return DeepgramError("a JSON body is a {\"url\": ...} request, which this server does not serve: send the audio "
                         "itself as the body", code="Bad Request")


class _Source:
    """A pre-recorded request's audio: raw (``encoding``) or a file in a container, read a block at a time at its
    own rate and channels (each stream converts its own)."""

    def __init__(self, data: bytes, options: ListenOptions, max_audio_s: float, min_rate: int,
                 max_rate: int) -> None:
        self.raw: np.ndarray | None = None
        self.file: FileAudio | None = None
        if options.encoding is not None:
            rate = options.sample_rate or SAMPLE_RATE
            if len(data) % options.frame_bytes:
                raise DeepgramError(f"the body has {len(data)} bytes, not a whole number of {options.encoding} "
                                    f"frames of {options.channels} channel(s)", code="Bad Request")
            if len(data) // options.frame_bytes > max_audio_s * rate:
                raise DeepgramError(f"the audio is longer than {max_audio_s:g} s (deepgram.max_audio_s)",
                                    code="Bad Request")
            try:
                self.raw = decode_pcm(data, options.daemon_encoding, options.channels)
            except AudioError as exc:
                raise DeepgramError(f"failed to process audio: {exc}", code="Bad Request") from None
            if not len(self.raw):
                raise DeepgramError("the body holds no audio", code="Bad Request")
            self.rate, self.channels = rate, options.channels
        else:
            try:
                self.file = FileAudio(data, "the body", max_audio_s, min_rate, max_rate,
                                      max_audio_key="deepgram.max_audio_s")
            except FileAudioError as exc:
                raise DeepgramError(f"failed to process audio: {exc}", code="Bad Request") from None
            self.rate, self.channels = self.file.rate, self.file.channels
        self.frames = 0

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    def read(self) -> tuple[np.ndarray, bool]:
        """The next block (``[frames, channels]`` float32 at the audio's rate) and whether the audio has ended."""
        step = max(1, int(self.rate * READ_BLOCK_S))
        if self.raw is not None:
            block = self.raw[self.frames : self.frames + step]
        else:
            assert self.file is not None
            try:
                block = self.file.file.read(step, dtype="float32", always_2d=True)
            except Exception as exc:  # libsndfile's errors, whatever their class
                raise DeepgramError(f"failed to process audio after {self.seconds:.1f} s ({exc})",
                                    code="Bad Request") from None
            if (bad := bad_samples(block)):
                raise DeepgramError(f"failed to process audio: it contains {bad} samples", code="Bad Request")
        self.frames += len(block)
        if not len(block) and not self.frames:
            raise DeepgramError("failed to process audio: it holds no samples", code="Bad Request")
        return np.asarray(block, dtype=np.float32), len(block) < step
