"""The daemon: websocket listeners (native and Vosk), health and metrics, graceful shutdown.

The handlers only move data: bytes and JSON in, :class:`LiveStream` calls, JSON out. All
decisions about windows, text and endpoints live in the sans-I/O engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import mimetypes
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamer.aio.hub import Hub
from streamer.aio.metrics import Metrics
from streamer.aio.stream import LiveStream
from streamer.aio.worker import BatchWorker
from streamer.config import Config
from streamer.engine import SAMPLE_RATE, Schedule
from streamer.events import (
    CLOSE_BAD_DATA,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    End,
    Error,
    Event,
    Final,
    Partial,
    Ready,
    ViewerReady,
    busy,
    error_for,
    to_json,
)
from streamer.exceptions import AudioError, ConfigError, InferenceError, ProtocolError, StreamerError
from streamer.lexicon import Lexicon
from streamer.model import load_lexicon, word_list_lexicon
from streamer.protocol import (
    parse_control,
    parse_vosk_text,
    vosk_final,
    vosk_partial,
)

logger = logging.getLogger("streamer.server")

STREAM_PATH = "/v1/stream"
LISTEN_PREFIX = "/v1/listen/"
_IDLE = object()
_STOP = object()


class Service(Protocol):
    """Something the daemon starts after its listeners and stops before its worker (MQTT, sources)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _web_root() -> Path:
    return Path(str(resources.files("streamer") / "web"))


class Daemon:
    """One loaded model, one batching worker, the listeners and the services around them."""

    def __init__(self, cfg: Config, runner: Any) -> None:
        self.cfg = cfg
        self.runner = runner
        self.metrics = Metrics()
        self.hub = Hub()
        self.worker = BatchWorker(runner, cfg.worker, self.metrics)
        self.lexicon = (runner.lexicon if runner.decoder == cfg.decoder  # built by load_model already
                        else load_lexicon(cfg.decoder, runner, runner.source, cfg.model.revision or None))
        """the word list new streams decode with (``[decoder]``; a reload re-reads it); None = greedy"""
        self.services: list[Service] = []
        self.servers: list[Server] = []
        self.stopping = asyncio.Event()
        self.closed = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._viewers: set[asyncio.Task[Any]] = set()
        self._viewers_stop = asyncio.Event()
        self._streams = 0
        self._token = cfg.server.token()
        self._shutdown_task: asyncio.Task[None] | None = None
        self.started_at = time.time()
        self.on_reload: list[Callable[[Config], Awaitable[None] | None]] = []

    # -- lifecycle -----------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self.servers[0].sockets[0].getsockname()[1])

    @property
    def vosk_port(self) -> int | None:
        if len(self.servers) < 2:
            return None
        return int(self.servers[1].sockets[0].getsockname()[1])

    @property
    def active_streams(self) -> int:
        return self._streams

    async def start(self) -> None:
        self.worker.start()
        s = self.cfg.server
        common: dict[str, Any] = {
            "max_size": s.max_message_bytes,
            "process_request": self._process_request,
            "server_header": "streamer",
        }
        if s.allowed_origins:
            common["origins"] = [*s.allowed_origins, None]
        self.servers.append(await self._listen(self._native, s.host, s.port, "server.port", common))
        if self.cfg.vosk.enabled:
            self.servers.append(await self._listen(self._vosk, s.host, self.cfg.vosk.port, "vosk.port", common))
        for service in self.services:
            await service.start()
        logger.info("listening on ws://%s:%d%s%s", s.host, self.port, STREAM_PATH,
                    f" and vosk ws://{s.host}:{self.vosk_port}" if self.vosk_port else "")

    async def _listen(self, handler: Any, host: str, port: int, key: str, kwargs: dict[str, Any]) -> Server:
        try:
            return await serve(handler, host, port, **kwargs)
        except OSError as exc:
            await self.worker.stop()
            for server in self.servers:
                server.close()
            raise StreamerError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); another program may use the port: "
                f"choose another with {key} (or --port), or stop that program"
            ) from None

    def request_shutdown(self) -> asyncio.Task[None]:
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self.shutdown())
        return self._shutdown_task

    async def shutdown(self) -> None:
        """Stop accepting, finalise every stream and send its finals, close 1001, stop services."""
        if self.stopping.is_set():
            await self.closed.wait()
            return
        logger.info("shutting down: finalising %d stream(s)", self._streams)
        self.stopping.set()
        for server in self.servers:
            server.close(close_connections=False)
        # Capture sources finalise alongside the clients' streams; viewers stay until both are done,
        # so they receive the last finals too; publishers (MQTT) stop last and flush what is queued.
        sources = [s for s in reversed(self.services) if getattr(s, "is_source", False)]
        await asyncio.gather(self._stop_services(sources), self._wait_handlers(self._handlers))
        self._viewers_stop.set()
        await self._wait_handlers(self._viewers, limit_s=2.0)
        for server in self.servers:
            server.close(close_connections=True)
            await server.wait_closed()
        await self._stop_services([s for s in reversed(self.services) if s not in sources])
        await self.worker.stop()
        self.closed.set()
        logger.info("stopped")

    async def _wait_handlers(self, tasks: set[asyncio.Task[Any]], limit_s: float | None = None) -> None:
        if not tasks:
            return
        limit = self.cfg.server.shutdown_timeout_s if limit_s is None else limit_s
        _, pending = await asyncio.wait(set(tasks), timeout=limit)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("%d connection(s) did not finish within %.1f s", len(pending), limit)

    async def _stop_services(self, services: list[Service]) -> None:
        for service in services:
            try:
                await service.stop()
            except Exception:
                logger.exception("stopping %r failed", service)

    # -- reload (SIGHUP, see streamer/aio/systemd.py) ---------------------------

    def apply_config(self, cfg: Config) -> None:
        """Run with a reloaded ``cfg`` from now on; :class:`~streamer.aio.systemd.Reloader` calls it.

        Handlers read their limits from ``self.cfg`` when they use them, and each new connection
        takes its message size and origins from it (:meth:`_connection_limits`). ``cfg`` must keep
        the running values of the keys that need a restart (``systemd.split_changes``).
        """
        token = cfg.server.token()  # raises ConfigError before anything changes
        # the word list is read again (its file may have changed); streams already open keep theirs
        lexicon = load_lexicon(cfg.decoder, self.runner, self.runner.source, cfg.model.revision or None)
        self.cfg, self._token, self.lexicon = cfg, token, lexicon

    def _connection_limits(self, conn: ServerConnection) -> None:
        s, protocol = self.cfg.server, conn.protocol
        # websockets renamed Protocol.max_size to max_message_size; serve() set it from the old config
        setattr(protocol, "max_message_size" if hasattr(protocol, "max_message_size") else "max_size",
                s.max_message_bytes)
        protocol.origins = [*s.allowed_origins, None] if s.allowed_origins else None  # type: ignore[list-item]

    # -- HTTP ------------------------------------------------------------------

    def _respond(self, conn: ServerConnection, status: int, body: bytes | str, ctype: str) -> Response:
        response = conn.respond(status, "")
        data = body.encode() if isinstance(body, str) else body
        response.body = data
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        response.headers["Content-Type"] = ctype
        response.headers["Content-Length"] = str(len(data))
        return response

    def _authorized(self, request: Request, query: dict[str, list[str]]) -> bool:
        if not self._token:
            return True
        given = ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif query.get("token"):
            given = query["token"][0]
        return hmac.compare_digest(given.encode(), self._token.encode())

    def health(self) -> dict[str, Any]:
        ok = self.worker.alive and not self.stopping.is_set()
        return {"status": "ok" if ok else "unavailable", "model": self.runner.name, "device": self.runner.device,
                "worker_alive": self.worker.alive, "streams": self._streams,
                "uptime_s": round(time.time() - self.started_at, 1)}

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self._connection_limits(conn)  # the limits of the config now in force (reload)
        url = urlsplit(request.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/healthz":
            h = self.health()
            return self._respond(conn, 200 if h["status"] == "ok" else 503, json.dumps(h), "application/json")
        if path == "/metrics":
            return self._respond(conn, 200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return self._static(conn, path)
        if conn.local_address[1] == self.port and not (path == STREAM_PATH or path.startswith(LISTEN_PREFIX)):
            return self._respond(conn, 404, f"no websocket endpoint at {path}; use {STREAM_PATH} or "
                                 f"{LISTEN_PREFIX}<name>\n", "text/plain")
        if not self._authorized(request, query):
            self.metrics.streams_rejected.labels("auth").inc()
            response = self._respond(conn, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                     "or ?token=TOKEN\n", "text/plain")
            response.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
            return response
        return None

    def _static(self, conn: ServerConnection, path: str) -> Response:
        root = _web_root()
        rel = "index.html" if path in ("/", "") else path.lstrip("/")
        target = (root / rel).resolve()
        if root.is_dir() and target.is_file() and root.resolve() in target.parents:
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            return self._respond(conn, 200, target.read_bytes(), ctype)
        return self._respond(conn, 404, f"not found: {path}\n", "text/plain")

    # -- websocket handlers ------------------------------------------------------

    async def _admit(self, ws: ServerConnection, protocol: str, busy: Callable[[str], Awaitable[None]]) -> bool:
        if self.stopping.is_set():
            await ws.close(1001, "server shutting down")
            return False
        if self._streams >= self.cfg.server.max_streams:
            self.metrics.streams_rejected.labels("busy").inc()
            reason = f"server busy: {self.cfg.server.max_streams} streams at most, try again later"
            try:
                await busy(reason)
                await ws.close(CLOSE_TRY_AGAIN, reason[:120])
            except ConnectionClosed:
                pass
            return False
        return True

    async def _track(self, protocol: str, run: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._streams += 1
        self.metrics.streams_active.labels(protocol).inc()
        self.metrics.streams_total.labels(protocol).inc()
        try:
            await run()
        except ConnectionClosed:
            pass
        finally:
            self._streams -= 1
            self.metrics.streams_active.labels(protocol).dec()
            self._handlers.discard(task)

    async def _native(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path if ws.request else "").path
        if path.startswith(LISTEN_PREFIX):
            await self._viewer(ws, path[len(LISTEN_PREFIX):])
            return
        handler = NativeHandler(self, ws)
        if await self._admit(ws, "native", handler.send_busy):
            await self._track("native", handler.run)

    async def _vosk(self, ws: ServerConnection) -> None:
        handler = VoskHandler(self, ws)
        if await self._admit(ws, "vosk", handler.send_busy):
            await self._track("vosk", handler.run)

    async def _viewer(self, ws: ServerConnection, name: str) -> None:
        """Send the events of stream/source ``name``; the viewer sends nothing."""
        task = asyncio.current_task()
        assert task is not None
        self._viewers.add(task)
        queue = self.hub.subscribe(name)
        stop = asyncio.ensure_future(self._viewers_stop.wait())
        incoming = asyncio.ensure_future(ws.recv())
        try:
            await ws.send(to_json(ViewerReady(name)))
            while True:
                event = queue.get_nowait()
                if event is not None:
                    await ws.send(to_json(event))
                    continue
                if queue.overflowed:
                    await send_error(ws, Error("viewer_too_slow", f"this viewer fell {queue.size} finals behind "
                                               "stream " + repr(name) + "; reconnect", CLOSE_TRY_AGAIN))
                    return
                get = asyncio.ensure_future(queue.wait())
                done, _ = await asyncio.wait({get, stop, incoming}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    continue
                get.cancel()
                if stop in done:
                    while (event := queue.get_nowait()) is not None:  # the last finals of streams that ended
                        await ws.send(to_json(event))
                    await ws.close(1001, "server shutting down")
                    return
                incoming.result()  # raises ConnectionClosed when the viewer left
                await send_error(ws, error_for(ProtocolError("viewers send nothing; stream audio to " + STREAM_PATH,
                                                             kind="viewer_sent_data", code=CLOSE_POLICY)))
                return
        except ConnectionClosed:
            pass
        finally:
            stop.cancel()
            incoming.cancel()
            if incoming.done() and not incoming.cancelled():
                incoming.exception()  # retrieved: the viewer's own disconnect
            self.hub.unsubscribe(name, queue)
            self._viewers.discard(task)


async def send_error(ws: ServerConnection, error: Error) -> None:
    """Send an error event and close with its code."""
    try:
        await ws.send(to_json(error))
        await ws.close(error.close_code, error.close_reason)
    except ConnectionClosed:
        pass


class _Handler:
    """Receiving with an idle timeout that the daemon's shutdown can interrupt."""

    protocol = "native"

    def __init__(self, daemon: Daemon, ws: ServerConnection) -> None:
        self.daemon = daemon
        self.ws = ws
        self.id = uuid.uuid4().hex[:12]
        self.stream: LiveStream | None = None
        self._stop = asyncio.ensure_future(daemon.stopping.wait())

    async def word_list(self, words: tuple[str, ...]) -> Lexicon:
        """A stream's own word list, spelled with the model's tokens; a bad one is the client's error.

        Built in a thread: a list of thousands of words takes a noticeable time, and other streams go on.
        """
        d = self.daemon
        try:
            return await asyncio.to_thread(word_list_lexicon, d.runner, words, d.cfg.decoder,
                                           "the stream's word list")
        except ConfigError as exc:
            raise ProtocolError(str(exc), kind="bad_words", code=CLOSE_POLICY) from None

    def new_stream(self, rate: int, channels: int = 1, encoding: str = "s16le", name: str | None = None,
                   lexicon: Lexicon | None = None) -> LiveStream:
        d = self.daemon
        stream = LiveStream(d.cfg, d.runner, d.worker, d.hub, d.metrics, sample_rate=rate, channels=channels,
                            encoding=encoding, name=name or self.id, words=lexicon or d.lexicon)
        stream.id = self.id
        return stream

    async def recv(self) -> Any:
        recv = asyncio.ensure_future(self.ws.recv())
        done, _ = await asyncio.wait({recv, self._stop}, timeout=self.daemon.cfg.server.idle_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if recv in done:
            return recv.result()
        recv.cancel()
        return _STOP if self._stop in done else _IDLE

    async def run(self) -> None:
        try:
            await self.serve()
        except (ProtocolError, AudioError, InferenceError) as exc:
            self.daemon.metrics.errors.labels(getattr(exc, "kind", type(exc).__name__)).inc()
            logger.info("stream %s: %s", self.id, exc)
            await self.report(error_for(exc))
        finally:
            self._stop.cancel()
            self.stream = None  # free everything of this stream at once

    async def serve(self) -> None:
        raise NotImplementedError

    async def report(self, error: Error) -> None:
        await send_error(self.ws, error)

    async def send_busy(self, reason: str) -> None:
        pass


class NativeHandler(_Handler):
    """``/v1/stream``: see ``docs/protocol.md``."""

    async def send_busy(self, reason: str) -> None:
        await self.ws.send(json.dumps({"type": "error", "code": "busy", "message": reason}))

    async def send_events(self, events: list[Partial]) -> None:
        for e in events:
            await self.ws.send(json.dumps(e.to_dict(), ensure_ascii=False))

    async def close_stream(self, code: int, reason: str) -> None:
        if self.stream is not None:
            await self.send_events(await self.stream.finish())
        await self.ws.send(json.dumps({"type": "end", "session": self.id, "reason": reason}))
        await self.ws.close(code, reason)

    async def serve(self) -> None:
        d = self.daemon
        st = d.cfg.stream
        await self.ws.send(json.dumps({
            "type": "ready", "session": self.id, "model": d.runner.name, "sample_rate": SAMPLE_RATE,
            "encodings": ["s16le", "f32le"],
            "schedule": {"left_context_ms": st.left_frames * 20, "hop_ms": st.hop_frames * 20,
                         "lookahead_ms": st.lookahead_frames * 20,
                         "window_samples": Schedule.from_config(st).window_samples},
            "endpoint": {"enabled": d.cfg.endpoint.enabled,
                         "silence_after_speech_s": d.cfg.endpoint.silence_after_speech_s},
        }))
        srv = d.cfg.server
        while True:
            msg = await self.recv()
            if msg is _IDLE:
                await self.close_stream(1000, "idle timeout")
                return
            if msg is _STOP:
                await self.close_stream(1001, "server shutting down")
                return
            if isinstance(msg, bytes):
                if self.stream is None:
                    self.stream = self.new_stream(SAMPLE_RATE)
                await self.send_events(await self.stream.feed_bytes(msg))
                continue
            ctrl = parse_control(msg, min_rate=srv.min_sample_rate, max_rate=srv.max_sample_rate)
            if ctrl.type == "start":
                if self.stream is not None:
                    raise ProtocolError("start must be the first message of a stream", kind="late_start",
                                        code=CLOSE_POLICY)
                assert ctrl.start is not None
                s = ctrl.start
                lexicon = await self.word_list(s.words) if s.words is not None else None
                self.stream = self.new_stream(s.sample_rate, s.channels, s.encoding, s.name, lexicon)
            elif ctrl.type == "flush":
                if self.stream is not None:
                    await self.send_events(await self.stream.flush())
            else:  # stop
                await self.close_stream(1000, "stopped by client")
                return


class VoskHandler(_Handler):
    """vosk-server's websocket protocol: one JSON reply per audio frame."""

    protocol = "vosk"

    def __init__(self, daemon: Daemon, ws: ServerConnection) -> None:
        super().__init__(daemon, ws)
        self.rate: float = daemon.cfg.vosk.sample_rate
        self.words = True
        self.alternatives = 0
        self.lexicon: Lexicon | None = None  # from the config's phrase_list
        self.partial: Partial | None = None

    async def report(self, error: Error) -> None:
        try:
            await self.ws.send(json.dumps({"error": error.message}))
            await self.ws.close(error.close_code, error.message[:120])
        except ConnectionClosed:
            pass

    def result(self, events: list[Partial]) -> dict[str, Any]:
        finals = [e for e in events if isinstance(e, Final)]
        for e in events:
            self.partial = None if isinstance(e, Final) else e
        if finals:
            return vosk_final(finals, words=self.words, max_alternatives=self.alternatives)
        return vosk_partial(self.partial)

    async def ensure_stream(self) -> LiveStream:
        if self.stream is None:
            rate = int(round(self.rate))
            srv = self.daemon.cfg.server
            if not srv.min_sample_rate <= rate <= srv.max_sample_rate:
                raise ProtocolError(f"unsupported sample_rate {rate}; use {srv.min_sample_rate} to "
                                    f"{srv.max_sample_rate}", kind="unsupported_rate", code=CLOSE_POLICY)
            self.stream = self.new_stream(rate, lexicon=self.lexicon)
        return self.stream

    async def final_reply(self, events: list[Partial]) -> None:
        finals = [e for e in events if isinstance(e, Final)]
        self.partial = None
        await self.ws.send(json.dumps(vosk_final(finals, words=self.words, max_alternatives=self.alternatives),
                                      ensure_ascii=False))

    async def serve(self) -> None:
        while True:
            msg = await self.recv()
            if msg is _IDLE or msg is _STOP:
                if self.stream is not None:
                    await self.final_reply(await self.stream.finish())
                await self.ws.close(1000 if msg is _IDLE else 1001,
                                    "idle timeout" if msg is _IDLE else "server shutting down")
                return
            if isinstance(msg, bytes):
                stream = await self.ensure_stream()
                reply = self.result(await stream.feed_bytes(msg))
                await self.ws.send(json.dumps(reply, ensure_ascii=False))
                continue
            if not msg.lstrip().startswith("{"):
                raise ProtocolError("text message is not JSON; send audio as binary s16le frames",
                                    kind="text_not_audio", code=CLOSE_BAD_DATA)
            cmd = parse_vosk_text(msg)
            if cmd.kind == "config":
                assert cmd.config is not None
                if cmd.config.sample_rate is not None and self.stream is None:
                    self.rate = cmd.config.sample_rate
                if cmd.config.words is not None:
                    self.words = cmd.config.words
                if cmd.config.max_alternatives is not None:
                    self.alternatives = cmd.config.max_alternatives
                if cmd.config.phrase_list is not None:
                    if self.stream is not None:
                        raise ProtocolError("phrase_list must come before the first audio", kind="late_config",
                                            code=CLOSE_POLICY)
                    self.lexicon = await self.word_list(cmd.config.phrase_list)
            elif cmd.kind == "reset":
                events = await self.stream.flush() if self.stream is not None else []
                await self.final_reply(events)
            else:  # eof
                events = await self.stream.finish() if self.stream is not None else []
                await self.final_reply(events)
                await self.ws.close(1000, "eof")
                return
