"""OpenAI-compatible transcription over plain HTTP: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``.

An upload (multipart, as the OpenAI SDK and ``curl -F`` send it) is read by
:class:`streamer.aio.http.front.HttpConnection`, bounded by ``openai.max_upload_bytes`` and
``openai.upload_timeout_s``; :meth:`OpenAIFront.serve_upload` answers it. The file is decoded and
resampled a second at a time in a thread and fed to a live stream like any client's, so its windows
share the model worker fairly with the real-time streams and its text is ``streamer transcribe``'s.
Each request counts against ``server.max_streams`` while it runs. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the HTTP status its SDK maps to an exception.
``docs/openai.md`` shows the requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from streamer.aio.host import StreamHost, close_named, open_named
from streamer.aio.http.access import page_allowed, repeated_header
from streamer.aio.http.connection import HttpConnection, Upload, is_tls, respond
from streamer.audio import MAX_CHANNELS, AudioConverter, bad_samples
from streamer.events import CLOSE_GOING_AWAY, Event, Final
from streamer.exceptions import AudioError, InferenceError, ProtocolError
from streamer.formats import cue_lines

__all__ = ["MODELS_PATH", "TRANSCRIPTIONS_PATH", "ApiError", "OpenAIFront", "TranscriptionForm", "parse_form"]

logger = logging.getLogger("streamer.server")

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
MODELS_PATH = "/v1/models"
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
READ_BLOCK_S = 1.0
"""audio decoded (and resampled) per step in the thread, then fed to the stream"""
MAX_PARTS = 64
"""parts of a multipart form (OpenAI's form has about ten fields)"""
MAX_BOUNDARY = 256
"""the longest multipart boundary accepted, whatever python-multipart's own limit (recent releases refuse longer
ones as the parser is made, older ones take any)"""
MAX_FIELD_BYTES = 64 << 10
"""the largest form field other than ``file`` (a ``prompt`` is at most a few KiB)"""
STATUS_TEXT = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
               408: "Request Timeout", 411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests",
               500: "Internal Server Error", 503: "Service Unavailable"}


class ApiError(Exception):
    """An answer in OpenAI's error shape: HTTP ``status``, ``type``, the ``param`` at fault and a ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, text: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.text = text
        """what was transcribed before the error, when some audio was (a shutdown)"""

    def body(self) -> dict[str, Any]:
        error = {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}
        return error if self.text is None else {**error, "text": self.text}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- the form --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscriptionForm:
    """The fields of a transcription request that change the answer (``prompt``, ``temperature``... are ignored)."""

    file: bytes
    filename: str
    model: str = ""
    language: str = ""
    response_format: str = "json"
    granularities: tuple[str, ...] = ()
    stream: bool = False


def _multipart_parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/form-data body: (their Content-Disposition parameters, their data)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise _bad(f"the request body must be multipart/form-data with a boundary (got Content-Type "
                   f"{content_type[:80]!r}); send the audio as the form field 'file'", "file")
    if len(boundary) > MAX_BOUNDARY:
        raise _bad(f"the multipart boundary is {len(boundary)} characters long; at most {MAX_BOUNDARY} are "
                   "accepted (RFC 2046 allows 70)")
    parts: list[tuple[dict[str, str], bytes]] = []
    field, value, data = bytearray(), bytearray(), bytearray()
    disposition = ""
    ended = False

    def on_part_begin() -> None:
        nonlocal disposition
        if len(parts) >= MAX_PARTS:
            raise _bad(f"the form has more than {MAX_PARTS} fields")
        disposition = ""
        data.clear()

    def on_header_field(chunk: bytes, start: int, end: int) -> None:
        field.extend(chunk[start:end])

    def on_header_value(chunk: bytes, start: int, end: int) -> None:
        value.extend(chunk[start:end])

    def on_header_end() -> None:
        nonlocal disposition
        if field.strip().lower() == b"content-disposition":
            disposition = value.decode("utf-8", "replace")
        field.clear()
        value.clear()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        data.extend(chunk[start:end])

    def on_part_end() -> None:
        _, params = parse_options_header(disposition)
        parts.append(({k.decode("latin-1"): v.decode("utf-8", "replace") for k, v in params.items()}, bytes(data)))

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks: Any = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                      "on_header_value": on_header_value, "on_header_end": on_header_end,
                      "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end}
    try:  # the parser refuses a boundary over 256 bytes as it is made
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise _bad(f"malformed multipart/form-data body: {exc}") from None
    if not ended:
        raise _bad("the multipart/form-data body ends before its closing boundary")
    return parts


def parse_form(content_type: str, body: bytes) -> TranscriptionForm:
    """Read a transcription request's form; :class:`ApiError` (400) names the field at fault."""
    fields: dict[str, str] = {}
    granularities: list[str] = []
    file: tuple[bytes, str] | None = None
    for params, data in _multipart_parts(content_type, body):
        name = params.get("name", "")
        if name == "file":
            file = (data, params.get("filename", "file"))
            continue
        if len(data) > MAX_FIELD_BYTES:
            raise _bad(f"form field {name[:40]!r} has {len(data)} bytes; at most {MAX_FIELD_BYTES}", name[:40])
        text = data.decode("utf-8", "replace").strip()
        if name in ("timestamp_granularities[]", "timestamp_granularities"):
            granularities.append(text)
        else:
            fields[name] = text
    if file is None:
        raise _bad("the form has no 'file' field: send the audio as the form field 'file' "
                   "(curl -F file=@audio.wav)", "file")
    fmt = fields.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise _bad(f"response_format {fmt[:40]!r} is not supported; use one of {', '.join(RESPONSE_FORMATS)}",
                   "response_format")
    for g in granularities:
        if g not in GRANULARITIES:
            raise _bad(f"timestamp_granularities[] {g[:40]!r} is not supported; use word and/or segment",
                       "timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise _bad("timestamp_granularities[] needs response_format verbose_json", "timestamp_granularities")
    stream = fields.get("stream", "false").lower()
    if stream not in ("true", "false", "1", "0", ""):
        raise _bad(f"stream {stream[:20]!r} is not a boolean; use true or false", "stream")
    return TranscriptionForm(file[0], file[1], fields.get("model", ""), fields.get("language", ""), fmt,
                             tuple(dict.fromkeys(granularities)), stream in ("true", "1"))


# -- the audio ---------------------------------------------------------------------------------------------------


class FileAudio:
    """A sound file held in memory (any format libsndfile reads), decoded a block at a time into 16 kHz mono.

    Make it and call :meth:`read` in a thread (``asyncio.to_thread``): both decode and resample.
    """

    def __init__(self, data: bytes, filename: str, max_audio_s: float, min_rate: int, max_rate: int) -> None:
        import soundfile as sf

        if not data:
            raise _bad(f"the file {filename[:80]!r} is empty", "file", "invalid_value")
        try:
            self.file = sf.SoundFile(io.BytesIO(data))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
            reason = str(exc).split(">: ", 1)[-1]  # without "Error opening <_io.BytesIO object at 0x...>"
            raise _bad(f"cannot read the audio of {filename[:80]!r} ({reason}); use a format libsndfile reads: wav, "
                       "flac, ogg, mp3", "file", "invalid_value") from None
        self.rate, self.channels = int(self.file.samplerate), int(self.file.channels)
        if not min_rate <= self.rate <= max_rate:
            raise _bad(f"the audio's sample rate is {self.rate} Hz; this server takes {min_rate} to {max_rate} Hz "
                       "(server.min_sample_rate, server.max_sample_rate)", "file", "invalid_value")
        if self.channels > MAX_CHANNELS:
            self.file.close()
            raise _bad(f"the audio has {self.channels} channels; this server takes at most {MAX_CHANNELS}", "file",
                       "invalid_value")
        self.max_frames = int(max_audio_s * self.rate)
        if self.file.frames > self.max_frames:
            raise _bad(f"the audio is {self.file.frames / self.rate:.0f} s long; at most {max_audio_s:g} s "
                       "(openai.max_audio_s)", "file", "audio_too_long")
        self.converter = AudioConverter(self.rate, self.channels)
        self.frames = 0
        """frames read so far (at the file's rate)"""

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    def read(self) -> tuple[np.ndarray, bool]:
        """The next block as 16 kHz mono float32, and whether the file has ended (then it is the resampler's rest)."""
        import soundfile as sf

        try:
            block = self.file.read(max(1, int(self.rate * READ_BLOCK_S)), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise _bad(f"the audio cannot be decoded after {self.seconds:.1f} s ({exc})", "file",
                       "invalid_value") from None
        if not len(block):
            if not self.frames:
                raise _bad("the file holds no audio samples", "file", "invalid_value")
            self.file.close()
            return self.converter.convert(np.zeros((0, self.channels), np.float32), last=True), True
        self.frames += len(block)
        if self.frames > self.max_frames:
            raise _bad(f"the audio is longer than openai.max_audio_s = {self.max_frames / self.rate:g} s", "file",
                       "audio_too_long")
        if bad := bad_samples(block):
            raise _bad(f"the audio contains {bad} samples", "file", "invalid_value")
        return self.converter.convert(block), False


# -- the answers -------------------------------------------------------------------------------------------------


def _r(x: float) -> float:
    return round(x, 3)


def transcript_text(finals: list[Final]) -> str:
    """The whole text, as ``streamer transcribe`` prints it (:func:`streamer.transcribe.text_of`)."""
    return " ".join(f.text for f in finals if f.text).strip()


def verbose_json(finals: list[Final], form: TranscriptionForm, seconds: float) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: segments (one per final) unless only words were asked for, words when asked.

    Whisper's decoding statistics have no CTC counterpart: ``avg_logprob`` is the mean log of the words'
    confidences, ``compression_ratio`` 1 and ``no_speech_prob`` 0; ``tokens`` is empty.
    """
    spoken = [f for f in finals if f.text]
    out: dict[str, Any] = {"task": "transcribe", "language": form.language or "", "duration": _r(seconds),
                           "text": transcript_text(spoken)}
    if "segment" in form.granularities or not form.granularities:
        out["segments"] = [{
            "id": i, "seek": 0, "start": _r(f.start), "end": _r(f.end), "text": f.text, "tokens": [],
            "temperature": 0.0, "compression_ratio": 1.0, "no_speech_prob": 0.0,
            "avg_logprob": _r(float(np.mean([math.log(max(w.conf, 1e-6)) for w in f.words]))) if f.words else 0.0,
        } for i, f in enumerate(spoken)]
    if "word" in form.granularities:
        out["words"] = [{"word": w.word, "start": _r(w.start), "end": _r(w.end)} for f in spoken for w in f.words]
    out["usage"] = {"type": "duration", "seconds": math.ceil(seconds)}
    return out


def answer(finals: list[Final], form: TranscriptionForm, seconds: float) -> tuple[str, str]:
    """The body of a non-streamed answer and its content type."""
    fmt = form.response_format
    if fmt == "text":
        return transcript_text(finals) + "\n", "text/plain; charset=utf-8"
    if fmt in ("srt", "vtt"):
        cues = cue_lines([f for f in finals if f.text], fmt)
        return "\n".join(cues), ("text/vtt" if fmt == "vtt" else "application/x-subrip") + "; charset=utf-8"
    if fmt == "verbose_json":
        body: dict[str, Any] = verbose_json(finals, form, seconds)
    else:
        body = {"text": transcript_text(finals), "usage": {"type": "duration", "seconds": math.ceil(seconds)}}
    return json.dumps(body, ensure_ascii=False), "application/json"


def head(status: int, headers: dict[str, str]) -> bytes:
    """An HTTP/1.1 response head (the connection closes after the answer)."""
    lines = [f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}", "Server: streamer", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def sse_chunk(event: dict[str, Any]) -> bytes:
    """One server-sent event as one chunk of a chunked body."""
    data = f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


Authorize = Callable[[Request, dict[str, list[str]], int], bool]
"""whether a request carries the token: the request, its query, the port it came to"""


class OpenAIFront:
    """The daemon's OpenAI-compatible HTTP endpoints (``[openai]``); :class:`~streamer.aio.http.front.HttpFront`
    routes requests here, :class:`~streamer.aio.http.connection.HttpConnection` uploads."""

    def __init__(self, host: StreamHost, authorized: Authorize, started_at: float,
                 known_host: Callable[[Request], bool] = lambda request: True) -> None:
        self.host = host
        self.authorized = authorized
        self.known_host = known_host
        """whether a request names this daemon in its ``Host`` (DNS rebinding)"""
        self.started_at = started_at

    @property
    def enabled(self) -> bool:
        return self.host.cfg.openai.enabled

    @property
    def max_upload_bytes(self) -> int:
        return self.host.cfg.openai.max_upload_bytes

    def serves_get(self, path: str) -> bool:
        return self.enabled and (path == MODELS_PATH or path.startswith(MODELS_PATH + "/"))

    def serves_post(self, path: str) -> bool:
        """POSTs answered here (the others get 405): transcriptions, and 404 in OpenAI's shape for other audio APIs."""
        return self.enabled and path.startswith("/v1/audio/")

    # -- GET ---------------------------------------------------------------------------------------------

    def model_entry(self) -> dict[str, Any]:
        return {"id": self.host.model.name, "object": "model", "created": int(self.started_at),
                "owned_by": "streamer"}

    def get(self, conn: ServerConnection, request: Request, path: str, query: dict[str, list[str]]) -> Response:
        """``GET /v1/models`` (the loaded model) and ``GET /v1/models/ID``."""
        if not self.authorized(request, query, conn.local_address[1]):
            self.host.metrics.streams_rejected.labels("auth").inc()
            return self.unauthorized(conn)
        model = self.model_entry()
        if path == MODELS_PATH:
            return self._json(conn, 200, {"object": "list", "data": [model]})
        if path[len(MODELS_PATH) + 1:] == model["id"]:
            return self._json(conn, 200, model)
        return self._json(conn, 404, ApiError(404, f"the model {path[len(MODELS_PATH) + 1:][:80]!r} does not exist; "
                                              f"this server has {model['id']!r}", code="model_not_found").body())

    def unauthorized(self, conn: ServerConnection) -> Response:
        response = self._json(conn, 401, self._unauthorized().body())
        response.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
        return response

    @staticmethod
    def _unauthorized() -> ApiError:
        return ApiError(401, "missing or wrong token: send 'Authorization: Bearer TOKEN' (the OpenAI SDK's api_key) "
                        "with the daemon's server.auth_token", code="invalid_api_key")

    @staticmethod
    def _json(conn: ServerConnection, status: int, body: dict[str, Any]) -> Response:
        return respond(conn, status, json.dumps(body), "application/json")

    # -- POST --------------------------------------------------------------------------------------------

    async def serve_upload(self, conn: HttpConnection, upload: Upload) -> None:
        """Answer one upload and close the connection (every answer closes it)."""
        sid = uuid.uuid4().hex[:12]
        state = _Answer(conn)
        try:
            await self._serve(conn, upload, sid, state)
        except ApiError as exc:
            self.host.metrics.errors.labels(exc.code or f"http_{exc.status}").inc()
            logger.info("openai request %s: %d %s", sid, exc.status, exc)
            try:
                await state.error(exc)
            except ConnectionError:
                pass
        except ConnectionError:
            logger.info("openai request %s: the client left", sid)
        finally:
            upload.unwanted = True  # what still comes of the body is dropped as it comes
            await conn.finish()

    async def _serve(self, conn: HttpConnection, upload: Upload, sid: str, state: _Answer) -> None:
        host, url = self.host, urlsplit(upload.request.path)
        if (name := repeated_header(upload.request.headers)) is not None:
            raise _bad(f"the header {name} came more than once; send it once", code="repeated_header")
        if url.path != TRANSCRIPTIONS_PATH:
            raise ApiError(404, f"no endpoint POST {url.path[:80]}; this server transcribes at POST "
                           f"{TRANSCRIPTIONS_PATH} (translations are not supported)", code="unknown_url")
        if not self.known_host(upload.request):
            host.metrics.streams_rejected.labels("host").inc()
            raise ApiError(403, "this server does not answer to that host name without a token: add it to "
                           "server.allowed_hosts, or use an IP address or localhost", code="host_not_allowed")
        if not page_allowed(upload.request.headers, host.cfg.server.allowed_origins, is_tls(conn)):
            # a form needs no preflight: any page could make a visitor's daemon transcribe and publish
            host.metrics.streams_rejected.labels("origin").inc()
            origin = (upload.request.headers.get_all("Origin") or ["another site"])[0]
            raise ApiError(403, f"a page of {origin[:80]} may not upload here: only this server's own pages and "
                           "the origins in server.allowed_origins may", code="origin_not_allowed")
        if not self.authorized(upload.request, parse_qs(url.query), conn.local_address[1]):
            host.metrics.streams_rejected.labels("auth").inc()
            raise self._unauthorized()
        limit = host.cfg.openai.max_upload_bytes
        if upload.too_large:
            raise ApiError(413, f"the upload has {upload.length} bytes; at most {limit} (openai.max_upload_bytes)",
                           code="upload_too_large")
        if upload.framing == "none":
            raise ApiError(411, "the request has no Content-Length (nor Transfer-Encoding: chunked)",
                           code="length_required")
        async with host.admission("openai") as refused:  # one of the streams counted against server.max_streams
            if refused is not None and refused.close_code == CLOSE_GOING_AWAY:
                raise ApiError(503, "the server is shutting down; try again later", type="server_error",
                               code="shutting_down")
            if refused is not None:
                raise ApiError(429, f"server busy: {host.cfg.server.max_streams} streams at most, try again later",
                               type="server_error", code="busy")
            await self._transcribe(conn, upload, sid, state)

    async def _transcribe(self, conn: HttpConnection, upload: Upload, sid: str, state: _Answer) -> None:
        cfg = self.host.cfg
        t0 = time.perf_counter()
        if upload.expects_continue and not upload.body.done():
            await conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await self._body(conn, upload)
        except EOFError:
            raise ConnectionResetError("the client left during its upload") from None
        except ValueError as exc:
            if upload.too_large:
                raise ApiError(413, f"the upload has more than {upload.limit} bytes (openai.max_upload_bytes)",
                               code="upload_too_large") from None
            raise _bad(f"malformed request body: {exc}") from None
        form = await asyncio.to_thread(parse_form, upload.request.headers.get("Content-Type", ""), body)
        del body
        srv = cfg.server
        audio = await asyncio.to_thread(FileAudio, form.file, form.filename, cfg.openai.max_audio_s,
                                        srv.min_sample_rate, srv.max_sample_rate)
        work = asyncio.ensure_future(self._decode(audio, form, sid, state))
        left: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(conn.connection_lost_waiter))
        try:  # a client that leaves stops the work: its windows are dropped before they reach the model
            await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                await asyncio.wait({work})
                raise ConnectionResetError("the client left")
            finals = work.result()
        finally:
            left.cancel()
        logger.info("openai request %s: %.1f s of %s (%d bytes) in %.2f s, %s%s", sid, audio.seconds,
                    form.filename[:60], len(form.file), time.perf_counter() - t0, form.response_format,
                    " streamed" if form.stream else "")
        if not form.stream:
            text, ctype = answer(finals, form, audio.seconds)
            await state.whole(200, text.encode(), ctype)

    async def _body(self, conn: HttpConnection, upload: Upload) -> bytes:
        """The upload's body, once it has all come: within ``openai.upload_timeout_s``, and with no pause longer
        than ``server.idle_timeout_s`` (as a silent websocket stream), since the request holds a stream meanwhile."""
        loop, cfg = asyncio.get_running_loop(), self.host.cfg
        timeout, idle = cfg.openai.upload_timeout_s, cfg.server.idle_timeout_s
        deadline = loop.time() + timeout
        seen, heard = -1, loop.time()
        while not upload.body.done():
            now = loop.time()
            came = upload.received + len(conn.protocol.reader.buffer)  # the body read, and what waits to be
            if came != seen:
                seen, heard = came, now
            if now >= deadline:
                raise ApiError(408, f"the upload did not arrive within {timeout:g} s (openai.upload_timeout_s); "
                               f"{upload.received} bytes came", code="upload_timeout")
            if now - heard >= idle:
                raise ApiError(408, f"nothing of the upload came for {idle:g} s (server.idle_timeout_s); "
                               f"{upload.received} bytes came", code="upload_idle")
            await asyncio.wait({upload.body}, timeout=min(deadline, heard + idle, now + 1.0) - now)
        return upload.body.result()

    async def _decode(self, audio: FileAudio, form: TranscriptionForm, sid: str, state: _Answer) -> list[Final]:
        """Feed the file through a live stream; the finals (streamed as deltas when asked)."""
        try:  # a file: no partial refreshes (only its finals are sent)
            stream = open_named(self.host, sid, live=False)
        except ProtocolError as exc:  # a session id is unique; a source could have the same name, though
            raise ApiError(500, str(exc), type="server_error") from None
        finals: list[Final] = []
        sent = ""

        async def take(events: list[Event]) -> None:
            nonlocal sent
            for e in events:
                if isinstance(e, Final) and e.text:
                    finals.append(e)
                    if form.stream:
                        delta = (" " if sent else "") + e.text
                        sent += delta
                        await state.event({"type": "transcript.text.delta", "delta": delta})

        try:
            if form.stream:
                await state.start_events()
            done = False
            while not done and not self.host.stopping.is_set():
                block, done = await asyncio.to_thread(audio.read)
                await take(await stream.feed(block))
            await take(await stream.finish())  # the finals of the audio fed, also when the daemon stops
            if not done:
                raise ApiError(503, f"the server is shutting down: only the first {audio.seconds:.1f} s of the audio "
                               "were transcribed ('text'); send the file again to transcribe it whole",
                               type="server_error", code="shutting_down", text=transcript_text(finals))
            if form.stream:
                await state.event({"type": "transcript.text.done", "text": transcript_text(finals)})
                await state.end_events()
        except AudioError as exc:
            raise _bad(str(exc), "file", "invalid_value") from None
        except InferenceError as exc:
            raise ApiError(500, f"the model failed: {exc}", type="server_error", code="inference_failed") from None
        finally:
            close_named(self.host, stream, sid)
        return finals


class _Answer:
    """What has been written to the client: nothing yet, a whole answer, or a stream of events."""

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.started = False
        self.events = False

    async def whole(self, status: int, body: bytes, ctype: str) -> None:
        self.started = True
        await self.conn.write(head(status, {"Content-Type": ctype, "Content-Length": str(len(body))}) + body)

    async def start_events(self) -> None:
        self.started = self.events = True
        await self.conn.write(head(200, {"Content-Type": "text/event-stream; charset=utf-8",
                                         "Cache-Control": "no-cache", "Transfer-Encoding": "chunked"}))

    async def event(self, event: dict[str, Any]) -> None:
        await self.conn.write(sse_chunk(event))

    async def end_events(self) -> None:
        await self.conn.write(b"0\r\n\r\n")

    async def error(self, exc: ApiError) -> None:
        """The error as the answer, or as the last event of a stream already under way (the SDK raises it)."""
        if self.events:
            await self.event(exc.body())
            await self.end_events()
        elif not self.started:
            headers = {"WWW-Authenticate": 'Bearer realm="streamer"'} if exc.status == 401 else {}
            if exc.status in (429, 503):
                headers["Retry-After"] = "1"
            body = json.dumps(exc.body()).encode()
            await self.conn.write(head(exc.status, {"Content-Type": "application/json",
                                                    "Content-Length": str(len(body)), **headers}) + body)
