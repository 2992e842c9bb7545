"""OpenAI-compatible transcription over plain HTTP: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``.

The form, the errors and the answers are :mod:`streamer.openai_asr`'s; this module moves their bytes. An
upload (multipart, as the OpenAI SDK and ``curl -F`` send it) is read by
:class:`streamer.aio.http.connection.HttpConnection`, bounded by ``openai.max_upload_bytes`` and
``openai.upload_timeout_s``; :meth:`OpenAIFront.serve_upload` answers it. The file is decoded and
resampled a second at a time in a thread and fed to a live stream like any client's, so its windows
share the model worker fairly with the real-time streams and its text is ``streamer transcribe``'s.
Each request counts against ``server.max_streams`` while it runs. ``docs/openai.md`` shows the requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from streamer.aio.host import StreamHost, close_named, open_named
from streamer.aio.http.connection import HttpConnection, Upload, UploadProblem, respond
from streamer.audiofile import FileAudio, FileAudioError
from streamer.events import CLOSE_GOING_AWAY, Event, Final
from streamer.exceptions import AudioError, InferenceError, ProtocolError
from streamer.openai_asr import (
    MODELS_PATH,
    TRANSCRIPTIONS_PATH,
    ApiError,
    TranscriptionForm,
    answer,
    parse_form,
    transcript_text,
)

__all__ = ["OpenAIFront"]

logger = logging.getLogger("streamer.server")

def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


_CODES = {"repeated_header": "repeated_header", "host": "host_not_allowed", "origin": "origin_not_allowed",
          "auth": "invalid_api_key", "too_large": "upload_too_large", "ambiguous": "ambiguous_length",
          "length_required": "length_required", "timeout": "upload_timeout", "idle": "upload_idle"}
"""OpenAI's ``code`` of each :data:`~streamer.aio.http.connection.Problem` (a malformed body has none)"""


def _api_error(problem: UploadProblem) -> ApiError:
    """An upload's problem in OpenAI's shape."""
    if problem.problem == "auth":
        return OpenAIFront._unauthorized()
    return ApiError(problem.status, str(problem), code=_CODES.get(problem.problem))


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
        await conn.serve_upload(self._serve(conn, upload, sid, state), host=self.host, request=f"openai request {sid}",
                                error=ApiError, reason=lambda e: (e.status, e.code or f"http_{e.status}"),
                                answer_error=state.error)

    async def _serve(self, conn: HttpConnection, upload: Upload, sid: str, state: _Answer) -> None:
        host, url = self.host, urlsplit(upload.request.path)
        if url.path != TRANSCRIPTIONS_PATH:
            raise ApiError(404, f"no endpoint POST {url.path[:80]}; this server transcribes at POST "
                           f"{TRANSCRIPTIONS_PATH} (translations are not supported)", code="unknown_url")
        try:
            upload.check(conn, host, known_host=self.known_host, limit_key="openai.max_upload_bytes",
                         authorized=lambda r: self.authorized(r, parse_qs(url.query), conn.local_address[1]))
        except UploadProblem as exc:
            raise _api_error(exc) from None
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
        try:
            body = await upload.read(conn, timeout_s=cfg.openai.upload_timeout_s, idle_s=cfg.server.idle_timeout_s,
                                     timeout_key="openai.upload_timeout_s", limit_key="openai.max_upload_bytes")
        except UploadProblem as exc:
            raise _api_error(exc) from None
        form = await asyncio.to_thread(parse_form, upload.request.headers.get("Content-Type", ""), body)
        del body
        srv = cfg.server
        try:
            audio = await asyncio.to_thread(FileAudio, form.file, form.filename, cfg.openai.max_audio_s,
                                            srv.min_sample_rate, srv.max_sample_rate)
        except FileAudioError as exc:
            raise _bad(str(exc), "file", exc.code) from None
        finals = await conn.unless_left(self._decode(audio, form, sid, state))
        logger.info("openai request %s: %.1f s of %s (%d bytes) in %.2f s, %s%s", sid, audio.seconds,
                    form.filename[:60], len(form.file), time.perf_counter() - t0, form.response_format,
                    " streamed" if form.stream else "")
        if not form.stream:
            text, ctype = answer(finals, form, audio.seconds)
            await state.whole(200, text.encode(), ctype)

    async def _decode(self, audio: FileAudio, form: TranscriptionForm, sid: str, state: _Answer) -> list[Final]:
        """Feed the file through a live stream; the finals (streamed as deltas when asked)."""
        try:  # a file: no partial refreshes, no partials (only its finals are sent)
            stream = open_named(self.host, sid, live=False)
            stream.wants_partials = False
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
        except FileAudioError as exc:
            raise _bad(str(exc), "file", exc.code) from None
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
        await self.conn.answer(status, [("Content-Type", ctype)], body)

    async def start_events(self) -> None:
        self.started = self.events = True  # no length: h11 sends the events as chunks
        await self.conn.answer_head(200, [("Content-Type", "text/event-stream; charset=utf-8"),
                                        ("Cache-Control", "no-cache")])

    async def event(self, event: dict[str, Any]) -> None:
        await self.conn.answer_body(f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode())

    async def end_events(self) -> None:
        await self.conn.answer_end()

    async def error(self, exc: ApiError) -> None:
        """The error as the answer, or as the last event of a stream already under way (the SDK raises it)."""
        if self.events:
            await self.event(exc.body())
            await self.end_events()
        elif not self.started:
            headers = [("WWW-Authenticate", 'Bearer realm="streamer"')] if exc.status == 401 else []
            if exc.status in (429, 503):
                headers.append(("Retry-After", "1"))
            await self.conn.answer(exc.status, [("Content-Type", "application/json"), *headers],
                                 json.dumps(exc.body()).encode())
