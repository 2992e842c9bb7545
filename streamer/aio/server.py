"""The daemon's lifecycle: one model, one batching worker, the listeners and the services around them.

What happens on a connection lives elsewhere: the HTTP side in :mod:`streamer.aio.http`, the
protocols in :mod:`streamer.aio.protocols`. They see the daemon as a
:class:`~streamer.aio.host.StreamHost` (this module imports them, to route connections to them;
they never import it). The handlers only move data; every decision about windows, text and
endpoints is the sans-I/O engine's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from streamer.aio.host import Admission, Health, ModelInfo, Status
from streamer.aio.http.connection import OPEN_TIMEOUT_S
from streamer.aio.http.front import LISTEN_PREFIX, REALTIME_PATH, STREAM_PATH, TWILIO_PATH, HttpFront
from streamer.aio.http.limits import check_descriptors, install_accept_error_filter
from streamer.aio.http.tls import server_ssl_context
from streamer.aio.hub import Hub, ViewerQueue
from streamer.aio.metrics import Metrics
from streamer.aio.protocols.audiosocket import AudioSocketServer
from streamer.aio.protocols.deepgram import DEEPGRAM_PATH, DeepgramHandler
from streamer.aio.protocols.native import NativeHandler
from streamer.aio.protocols.realtime import RealtimeHandler
from streamer.aio.protocols.twilio import TwilioHandler
from streamer.aio.protocols.viewer import serve_viewer
from streamer.aio.protocols.vosk import VoskHandler
from streamer.aio.protocols.wyoming import WyomingServer
from streamer.aio.stream import LiveStream, Streams
from streamer.aio.worker import BatchWorker
from streamer.config import Config
from streamer.decoder import WordListBudget, build_decoder
from streamer.engine import SAMPLE_RATE, WordDecoder
from streamer.events import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN, Error, busy
from streamer.exceptions import StreamerError
from streamer.runner import Runner
from streamer.vad import load_vad

if TYPE_CHECKING:
    from streamer.aio.processes.cluster import ClusterLink

__all__ = ["Daemon", "Service"]

logger = logging.getLogger("streamer.server")


class Service(Protocol):
    """Something the daemon starts after its listeners and stops before its worker (MQTT, sources)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Daemon:
    """One loaded model, one batching worker, the listeners and the services around them.

    Build it, add :attr:`services`, ``await start()``; :meth:`request_shutdown` finalises every stream and
    closes; ``request_shutdown(drain=True)`` (SIGTERM) first drains: it takes no new stream and lets the live
    ones end by themselves, for ``server.drain_timeout_s`` at most. :meth:`apply_config` applies a reloaded
    config (SIGHUP).

    ``cluster``: the link to the supervisor when this is one of several front-end processes
    (``server.processes``): the daemon then listens with SO_REUSEPORT (its siblings listen on the same
    ports), counts streams and viewers and holds names in the whole daemon, and relays its events.
    """

    def __init__(self, cfg: Config, runner: Runner, *, cluster: ClusterLink | None = None) -> None:
        self.cfg = cfg
        self.runner = runner
        self.model = ModelInfo.of(runner)
        """the loaded model, as handlers describe it"""
        self.metrics = Metrics()
        self.hub = Hub()
        self.worker = BatchWorker(runner, cfg.worker, self.metrics)
        words = build_decoder(cfg.decoder, runner)  # raises ConfigError for a bad list, before anything starts
        self.streams = Streams(cfg, runner.vocab, self.worker, self.hub, self.metrics, words)
        """the factory of live streams: the config and ``[decoder]`` word list in force"""
        self.started_at = time.time()
        self.http = HttpFront(self, cfg.server.token(), health=self.health, stream_port=lambda: self.port,
                              started_at=self.started_at)
        self.word_lists = WordListBudget()
        """the letters of the word lists clients brought, alive now (``server.max_word_list_letters_total``)"""
        self.services: list[Service] = []
        self.servers: list[Server] = []
        self.draining = asyncio.Event()
        """set when the shutdown begins: no new stream, upload or viewer is taken; live streams go on (the drain)"""
        self.stopping = asyncio.Event()
        """set when the streams are finalised: after the drain, or at once (they send their finals, close 1001)"""
        self.closed = asyncio.Event()
        self.on_drain: list[Callable[[], None]] = []
        """called once when the drain begins (MQTT's status says ``draining``)"""
        self._hurry = asyncio.Event()
        self._drain_until: float | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._viewers: set[asyncio.Task[Any]] = set()
        self.viewers_stop = asyncio.Event()
        """set when viewers close: after every stream of the daemon sent its last finals"""
        self._shutdown_task: asyncio.Task[None] | None = None
        self._names: dict[str, str] = {}  # the name of every live stream (its own, else its session id) -> session
        self.on_reload: list[Callable[[Config], Awaitable[None] | None]] = []
        self.cluster = cluster
        self._listening: dict[str, Any] = {}
        if cluster is not None:
            self.hub.sinks.append(cluster)  # events to viewers on other processes, and to the supervisor's MQTT
            self.hub.on_watch = cluster.viewing
            cluster.deliver = self.hub.deliver
        self.wyoming: WyomingServer | None = None
        """the Wyoming listener (``[wyoming] enabled``), a service once started"""
        self.audiosocket: AudioSocketServer | None = None
        """the AudioSocket listener (``[audiosocket] enabled``), a service once started"""

    # -- what the handlers use (streamer.aio.host.StreamHost) ------------------------------

    @property
    def server_pid(self) -> int | None:
        """This process's pid when it is one of several front-end processes (``ready`` names it), else None."""
        return os.getpid() if self.cluster is not None else None

    @property
    def listening(self) -> dict[str, Any]:
        """Config key -> what a sibling process sets it to, to share this listener (``{"server.port": 41234}``)."""
        out = {**self._listening, **(self.wyoming.listening if self.wyoming is not None else {})}
        if self.audiosocket is not None:
            out.update(self.audiosocket.listening)
        return out

    def subscribe(self, name: str) -> ViewerQueue:
        return self.hub.subscribe(name)

    def unsubscribe(self, name: str, queue: ViewerQueue) -> None:
        self.hub.unsubscribe(name, queue)

    @property
    def words(self) -> WordDecoder | None:
        """The word list new streams decode with (``[decoder]``; a reload re-reads it); None = greedy."""
        return self.streams.words

    def open_stream(self, *, sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
                    name: str | None = None, id: str | None = None, words: WordDecoder | None = None,
                    live: bool = True) -> LiveStream:
        """A new live stream with the config in force; ``words``: the stream's own list (default: the daemon's);
        ``live = False`` for a file fed as fast as it decodes (no partial refreshes)."""
        return self.streams.open(sample_rate=sample_rate, channels=channels, encoding=encoding, name=name, id=id,
                                 words=words, live=live)

    def claim_name(self, name: str, session: str) -> str | None:
        """Give stream ``session`` the name ``name`` while it lives; or say who has it (and give nothing).

        A capture source's name (``[[sources]]``) is never given to a client, so no client speaks for another
        stream or source to its viewers and on its MQTT topic. :meth:`release_names` gives it back.
        """
        if any(source.name == name for source in self.cfg.sources):
            return "a capture source ([[sources]])"
        if self._names.setdefault(name, session) != session:
            return "another live stream"
        return None

    def release_names(self, session: str) -> None:
        """The stream ``session`` ended: its name is free again."""
        for name in [n for n, s in self._names.items() if s == session]:
            del self._names[name]
        if self.cluster is not None:
            self.cluster.unclaim(session)

    def name_live(self, name: str) -> bool:
        return name in self._names or any(source.name == name for source in self.cfg.sources)

    async def claim_name_everywhere(self, name: str, session: str) -> str | None:
        """:meth:`claim_name` in the whole daemon: with several front-end processes, the supervisor says
        whether another process's stream has ``name``. Then :meth:`claim_name` here holds it again, harmlessly."""
        holder = self.claim_name(name, session)
        if holder is not None or self.cluster is None:
            return holder
        holder = await self.cluster.claim(name, session)
        if holder is not None:
            self.release_names(session)
        return holder

    @property
    def port(self) -> int:
        return int(self.servers[0].sockets[0].getsockname()[1])

    @property
    def vosk_port(self) -> int | None:
        if len(self.servers) < 2:
            return None
        return int(self.servers[1].sockets[0].getsockname()[1])

    @asynccontextmanager
    async def admission(self, protocol: str, kind: Admission = "stream") -> AsyncIterator[Error | None]:
        """Serve the running task as one ``kind`` of ``protocol`` inside the ``async with``, or yield why not.

        A stream counts against ``server.max_streams`` (in the whole daemon, with several front-end
        processes) and shutdown waits for it; it is refused while draining or shutting down (1001) and
        when full (1013). A viewer counts against ``server.max_viewers``; it is not refused while shutting
        down (it waits for the last finals of the streams that end) and shutdown closes it last.
        """
        if kind == "stream":
            if self.draining.is_set():
                yield Error("shutting_down", "server shutting down", CLOSE_GOING_AWAY)
                return
            tasks, limit = self._handlers, self.cfg.server.max_streams
        else:
            tasks, limit = self._viewers, self.cfg.server.max_viewers
        key = uuid.uuid4().hex
        if not await self._admit(kind, key, len(tasks), limit):
            if kind == "stream":
                self.metrics.streams_rejected.labels("busy").inc()
                yield busy(limit)
            else:
                self.metrics.streams_rejected.labels("viewers").inc()
                yield Error("busy", f"server busy: {limit} viewers at most, try again later", CLOSE_TRY_AGAIN)
            return
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        if kind == "stream":
            self.metrics.streams_active.labels(protocol).inc()
            self.metrics.streams_total.labels(protocol).inc()
        try:
            yield None
        finally:
            if kind == "stream":
                self.metrics.streams_active.labels(protocol).dec()
            tasks.discard(task)
            if self.cluster is not None:
                self.cluster.release(kind, key)

    async def _admit(self, kind: str, key: str, here: int, limit: int) -> bool:
        """Whether one more stream or viewer fits under ``limit``: ``here`` counts this process's; with several
        front-end processes the supervisor counts the whole daemon's (and holds the place for ``key``)."""
        if self.cluster is None:
            return here < limit
        return await self.cluster.admit(kind, key, limit)

    @property
    def active_streams(self) -> int:
        """Streams being served now (native and Vosk connections past admission)."""
        return len(self._handlers)

    def health(self) -> Health:
        """``/healthz``, ``/livez``, ``/readyz``: ``status`` is ``unavailable`` (503) when not serving (draining or
        shutting down, the model worker or model server down), ``degraded`` when a service (MQTT) or a front-end
        process is not well, else ``ok``; a service's ``health()`` adds its own keys (``mqtt``, ``mqtt_reason``)."""
        ok = self.worker.alive and not self.draining.is_set()
        status: Status = "ok" if ok else "unavailable"
        services: dict[str, Any] = {}
        for service in self.services:
            report = getattr(service, "health", None)
            if callable(report):
                services.update(report())
        streams = self.active_streams
        process_streams = process = processes = None
        if self.cluster is not None:  # the whole daemon: every process's streams, the supervisor's MQTT
            process_streams, process = streams, (self.cluster.slot, self.cluster.pid)
            state = self.cluster.state
            if state is not None:
                streams, processes = state.streams, (state.configured, state.serving)
                services.update(state.health or {})
                if state.serving < state.configured and ok:
                    status = "degraded"
        if ok and "degraded" in services.values():
            status = "degraded"
        model_server: Literal["up", "unreachable"] | None = None
        if self.worker.remote is not None:  # [model_server] kind = "triton": unavailable (503) while unreachable
            model_server = "up" if self.worker.remote.available else "unreachable"
            if not self.worker.remote.available:
                status = "unavailable"
        return Health(status, self.runner.name, self.runner.device, self.worker.alive, streams,
                      round(time.time() - self.started_at, 1), draining=self.draining.is_set(),
                      max_streams=self.cfg.server.max_streams, model_server=model_server,
                      process_streams=process_streams, process=process, processes=processes, services=services)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        s = self.cfg.server
        tls = server_ssl_context(s)  # a ConfigError for unreadable or mismatched files, before anything runs
        check_descriptors(s)  # every stream and viewer holds one
        install_accept_error_filter()  # asyncio logs each failed accept() when they run out
        self.worker.start()
        # The voice-activity detector's model (0.5 s to load), now: no stream's first audio waits for it, whether
        # [endpoint] vad asks for it or a client's own endpointing does.
        await asyncio.to_thread(load_vad)
        common: dict[str, Any] = {
            "max_size": s.max_message_bytes,
            "process_request": self.http.process_request,
            "server_header": "streamer",
            # an HttpConnection: bounded outgoing data and a keepalive that closes a client that never reads
            # (http/limits.py), set again from the config in force for each connection; it answers odd requests
            # and uploads, and times the request head itself (OPEN_TIMEOUT_S), so that an upload's answer may
            # take longer than websockets' open_timeout
            "create_connection": self.http.connection,
            "open_timeout": None,
            "write_limit": s.write_limit_bytes,
            "ping_interval": s.ping_interval_s or None,
            "ping_timeout": s.ping_timeout_s or None,
            "select_subprotocol": self._select_subprotocol,
            "compression": "deflate" if s.compression else None,
        }
        if self.cluster is not None:  # which of several front-end processes answered (Vosk has no ready message)
            common["process_response"] = self._tag_process
        if tls is not None:
            common["ssl"] = tls  # both ports: https/wss
            common["ssl_handshake_timeout"] = OPEN_TIMEOUT_S
        self.servers.append(await self._listen(self._native, s.host, s.port, "server.port", common))
        if self.cfg.vosk.enabled:
            self.servers.append(await self._listen(self._vosk, s.host, self.cfg.vosk.port, "vosk.port", common))
        if self.cfg.wyoming.enabled:  # Home Assistant's protocol, a service: it stops after the streams end
            self.wyoming = WyomingServer(self, shared=self.cluster is not None,
                                         first=self.cluster is None or self.cluster.slot == 0)
            self.services.append(self.wyoming)
        if self.cfg.audiosocket.enabled:  # Asterisk's phone calls, a service as Wyoming's listener is
            self.audiosocket = AudioSocketServer(self, shared=self.cluster is not None)
            self.services.append(self.audiosocket)
        for service in self.services:
            await service.start()
        ws = "wss" if tls is not None else "ws"
        logger.info("listening on %s://%s:%d%s%s", ws, s.host, self.port, STREAM_PATH,
                    f" and vosk {ws}://{s.host}:{self.vosk_port}" if self.vosk_port else "")

    @staticmethod
    def _select_subprotocol(conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        """websockets' ``select_subprotocol``: a browser that sends its token as the subprotocols ``token`` and KEY
        (Deepgram's form, :func:`~streamer.aio.protocols.deepgram.subprotocol_token`) gets ``token`` back, which
        it needs to open the websocket; no other subprotocol is spoken."""
        return Subprotocol("token") if offered and offered[0] == "token" else None

    @staticmethod
    def _tag_process(conn: ServerConnection, request: Request, response: Response) -> None:
        """websockets' ``process_response`` with several front-end processes: ``X-Streamer-Pid`` names this one."""
        response.headers["X-Streamer-Pid"] = str(os.getpid())

    async def _listen(self, handler: Callable[[ServerConnection], Awaitable[None]], host: str, port: int, key: str,
                      kwargs: dict[str, Any]) -> Server:
        try:
            server = await serve(handler, host, port, reuse_port=self.cluster is not None or None, **kwargs)
            self._listening[key] = int(server.sockets[0].getsockname()[1])
            return server
        except OSError as exc:
            await self.worker.stop()
            for server in self.servers:
                server.close()
            raise StreamerError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); another program may use the port: "
                f"choose another with {key} (or --port), or stop that program"
            ) from None

    def request_shutdown(self, *, drain: bool = False) -> asyncio.Task[None]:
        """Begin the shutdown, once; the task that runs it. ``drain`` (SIGTERM): :meth:`drain` first. Without it
        (a second SIGTERM), a drain under way ends now and the live streams are finalised (:meth:`shutdown`)."""
        if not drain:
            self._hurry.set()
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self.drain() if drain else self.shutdown())
        return self._shutdown_task

    async def drain(self) -> None:
        """Take no new stream, upload or viewer; let the live streams go on until their clients end them, for
        ``server.drain_timeout_s`` at most (0: not at all), or until :meth:`request_shutdown` hurries it; then
        :meth:`shutdown` finalises the streams left.

        While draining the listeners stay open: ``/livez`` still answers 200, ``/readyz`` and ``/healthz`` 503, and a
        new websocket or upload 503 with ``Retry-After`` (a balancer tries another daemon, a client again later).
        """
        if self.draining.is_set():
            await self.closed.wait()
            return
        self.draining.set()
        limit = self.cfg.server.drain_timeout_s
        for hook in self.on_drain:
            try:
                hook()
            except Exception:
                logger.exception("drain hook %r failed", hook)
        if limit > 0 and self._handlers and not self._hurry.is_set():
            logger.info("draining: %d live stream(s) go on until their clients end them, for %.0f s at most "
                        "(server.drain_timeout_s); new ones are refused; a second SIGTERM finalises them now",
                        len(self._handlers), limit)
            loop = asyncio.get_running_loop()
            began = loop.time()
            self._drain_until = began + limit
            hurry = asyncio.ensure_future(self._hurry.wait())
            try:
                while self._handlers and not hurry.done() and (left := self._drain_until - loop.time()) > 0:
                    await asyncio.wait({*self._handlers, hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                hurry.cancel()
            if self._handlers:
                logger.info("drained for %.0f s: finalising the %d stream(s) still live", loop.time() - began,
                            len(self._handlers))
            else:
                logger.info("drained: every live stream ended")
        await self.shutdown()

    @property
    def drain_left_s(self) -> float | None:
        """While draining: the seconds left before the live streams are finalised; else None."""
        if self._drain_until is None or self.stopping.is_set():
            return None
        return max(0.0, self._drain_until - asyncio.get_running_loop().time())

    async def shutdown(self) -> None:
        """Stop accepting, finalise every stream and send its finals, close 1001, stop services."""
        if self.stopping.is_set():
            await self.closed.wait()
            return
        logger.info("shutting down: finalising %d stream(s)", self.active_streams)
        self.draining.set()
        self.stopping.set()
        for server in self.servers:
            server.close(close_connections=False)
        # Capture sources finalise alongside the clients' streams; viewers stay until both are done,
        # so they receive the last finals too; publishers (MQTT) stop last and flush what is queued.
        sources = [s for s in reversed(self.services) if getattr(s, "is_source", False)]
        await asyncio.gather(self._stop_services(sources), self._wait_handlers(self._handlers))
        if self.cluster is not None:  # other processes' streams send their last finals to viewers here too
            # (they may still be draining theirs, begun with this one's)
            drain = 0.0 if self._hurry.is_set() else self.cfg.server.drain_timeout_s
            await self.cluster.drained(self.cfg.server.shutdown_timeout_s + drain)
        self.viewers_stop.set()
        await self._wait_handlers(self._viewers, limit_s=2.0)
        for server in self.servers:
            server.close(close_connections=True)
            await server.wait_closed()
        await self._stop_services([s for s in reversed(self.services) if s not in sources])
        await self.worker.stop()
        self.streams.close()  # the engine thread ends once the calls it still has ran
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

    # -- reload (SIGHUP, streamer.aio.processes.systemd) ---------------------------

    def apply_config(self, cfg: Config) -> None:
        """Run with a reloaded ``cfg`` from now on; :class:`~streamer.aio.processes.systemd.Reloader` calls it.

        Handlers read their limits from ``self.cfg`` when they use them, and each new connection
        takes its message size and limits from it (:meth:`HttpFront.connection_limits`). ``cfg`` must keep
        the running values of the keys that need a restart (``systemd.split_changes``). Raises
        :class:`~streamer.exceptions.ConfigError` (and changes nothing) for a bad token or word list.
        """
        token = cfg.server.token()
        # the word list is read again (its file may have changed); streams already open keep theirs
        words = build_decoder(cfg.decoder, self.runner)
        self.cfg, self.http.token = cfg, token
        self.streams.cfg, self.streams.words = cfg, words
        check_descriptors(cfg.server)  # max_streams and max_viewers may have grown

    # -- connections: the routes ------------------------------------------------------

    async def _native(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path).path if ws.request else ""
        if path.startswith(LISTEN_PREFIX):
            await serve_viewer(self, ws, path[len(LISTEN_PREFIX):])
        elif path == REALTIME_PATH:
            await RealtimeHandler(self, ws).serve_connection()
        elif path == TWILIO_PATH:
            await TwilioHandler(self, ws, token=self.http.token).serve_connection()
        elif path == DEEPGRAM_PATH:
            await DeepgramHandler(self, ws).serve_connection()
        else:
            await NativeHandler(self, ws).serve_connection()

    async def _vosk(self, ws: ServerConnection) -> None:
        await VoskHandler(self, ws).serve_connection()
