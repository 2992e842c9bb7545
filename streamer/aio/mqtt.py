"""Publishing events to an MQTT broker with aiomqtt (see ``docs/mqtt.md``).

:class:`MqttPublisher` is an event sink and a daemon service. ``publish()`` is called
synchronously for every event and only appends to a bounded in-memory queue; one task
drains that queue into ``async with aiomqtt.Client(...)``, so a websocket client never
waits on the broker. Topics, with ``P`` = ``mqtt.topic_prefix``::

    P/<stream>/partial       the websocket event JSON, plus "stream" and "session"
    P/<stream>/final         idem; QoS mqtt.qos_final (1)
    P/status                 retained "online"; "offline" on exit and as the last will
    hermes/asr/textCaptured  finals in Rhasspy Hermes form, with mqtt.hermes = true

Delivery: a message leaves the queue only when the broker acknowledged it (QoS 1/2) or
it was written (QoS 0). When the connection breaks, every message not acknowledged goes
back to the front of the queue, in order, and is sent again after the reconnect; with
QoS 1 a subscriber may therefore see a final twice and de-duplicates by
``(session, segment)``. When the queue is full, queued partials are dropped first, then
the oldest finals; drops are counted in ``streamer_mqtt_dropped_total`` and logged.

For code without an event loop (``streamer transcribe``, a capture loop) use
:class:`PublisherThread`; for asyncio code, :func:`running_publisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt import MqttError
from aiomqtt.exceptions import MqttConnectError

from streamer.aio.metrics import Metrics
from streamer.config import MqttConfig
from streamer.events import Event, Final
from streamer.exceptions import ConfigError, StreamerError

__all__ = [
    "HERMES_TEXT_CAPTURED",
    "MqttPublisher",
    "PublisherThread",
    "attach_publisher",
    "client_id_for",
    "hermes_text_captured",
    "running_publisher",
    "topic_level",
]

logger = logging.getLogger("streamer.mqtt")

HERMES_TEXT_CAPTURED = "hermes/asr/textCaptured"
WINDOW = 8
"""Messages in flight at once: pipelining hides the broker's round trip behind QoS 1 acks."""
BACKOFF_START_S = 0.25
CONNECT_TIMEOUT_S = 10.0
"""How long aiomqtt waits for CONNACK, PUBACK or a clean disconnect."""
START_WAIT_S = 12.0
"""``start()`` waits this long for the first connection attempt, then serves anyway."""
STOP_GRACE_S = 3.0
"""After ``flush_timeout_s``, time left to say ``offline`` and disconnect before the task is cancelled."""
DROP_LOG_INTERVAL_S = 10.0

_PAHO_LOGGER = logging.getLogger("streamer.mqtt.paho")
_LOGIN_REFUSED = {4, 5, 134, 135}  # MQTT 3.1.1 and 5 codes: bad user name or password, not authorised
_ID_REFUSED = {2, 133}
_BROKER_BUSY = {3, 136, 137}  # server unavailable, server busy: try again later


@dataclass(frozen=True, slots=True)
class _Message:
    kind: str
    """partial, final or hermes (the ``kind`` label of the metrics)"""
    topic: str
    payload: bytes
    qos: int
    retain: bool


class _FlushTimeout(Exception):
    """flush_timeout_s passed while messages were still queued."""


class _ConnectionLost(MqttError):
    """The broker closed the connection or it broke (aiomqtt only says "unspecified error")."""


def topic_level(name: str) -> str:
    """Make a stream name usable as one topic level: no ``/``, ``+``, ``#`` or NUL."""
    out = "".join("_" if c in "/+#\x00" else c for c in name)
    return out or "_"


def client_id_for(cfg: MqttConfig, role: str = "") -> str:
    """The client id: ``mqtt.client_id`` or ``streamer-<host>-<pid>``; a ``role`` makes it unique per process.

    The daemon uses no role. One-shot commands pass one (``transcribe``) so that they never take
    over the daemon's connection when both share a config file: a broker closes the older of two
    connections with the same id.
    """
    base = cfg.client_id or f"streamer-{socket.gethostname()}"
    if role:
        return f"{base}-{role}-{os.getpid()}"
    return cfg.client_id or f"{base}-{os.getpid()}"


def hermes_text_captured(final: Final, session: str, site_id: str) -> dict[str, Any]:
    """A final in Rhasspy Hermes form (``hermes/asr/textCaptured``).

    ``likelihood`` is the mean word confidence; ``seconds`` the segment's audio duration (Hermes
    calls it processing time, which in streaming overlaps the speech itself).
    """
    words = final.words
    likelihood = sum(w.conf for w in words) / len(words) if words else 1.0
    return {
        "text": final.text,
        "likelihood": round(likelihood, 3),
        "seconds": round(final.end - final.start, 3),
        "siteId": site_id,
        "sessionId": session,
    }


def check_settings(cfg: MqttConfig) -> None:
    """Raise ConfigError for MQTT settings that are wrong before any connection (password, TLS files)."""
    if cfg.enabled:
        _password(cfg)
        _tls_context(cfg)


def _password(cfg: MqttConfig) -> str | None:
    if not (cfg.password_env or cfg.password_file):
        return None
    if not cfg.username:
        key = "password_env" if cfg.password_env else "password_file"
        raise ConfigError(f"mqtt.{key} is set but mqtt.username is empty; set mqtt.username")
    if cfg.password_env:
        value = os.environ.get(cfg.password_env, "")
        if not value:
            raise ConfigError(f"mqtt.password_env names {cfg.password_env!r}, which is not set; "
                              "export it or use mqtt.password_file")
        return value
    try:
        lines = Path(cfg.password_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"mqtt.password_file {cfg.password_file!r} cannot be read: {exc.strerror}") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"mqtt.password_file {cfg.password_file!r} is empty; put the password on its first line")
    return lines[0].strip()


def _tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    files = {"tls_ca_file": cfg.tls_ca_file, "tls_cert_file": cfg.tls_cert_file, "tls_key_file": cfg.tls_key_file}
    if not cfg.tls:
        for key, value in files.items():
            if value:
                raise ConfigError(f"mqtt.{key} is set but mqtt.tls = false; set mqtt.tls = true or remove mqtt.{key}")
        return None
    if cfg.tls_key_file and not cfg.tls_cert_file:
        raise ConfigError("mqtt.tls_key_file is set without mqtt.tls_cert_file; set both for a client certificate")
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_file or None)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigError(f"mqtt.tls_ca_file {cfg.tls_ca_file!r} cannot be used: {_os_reason(exc)}") from None
    if cfg.tls_cert_file:
        try:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file or None)
        except OSError as exc:
            which = "mqtt.tls_cert_file" + (" / mqtt.tls_key_file" if cfg.tls_key_file else "")
            raise ConfigError(f"{which} {cfg.tls_cert_file!r} cannot be used: {_os_reason(exc)}") from None
    return ctx


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not a PEM certificate or key ({exc.reason or exc})"
    return str(exc.strerror or exc)


def _describe(exc: BaseException, cfg: MqttConfig, client_id: str) -> tuple[bool, str]:
    """Explain a failed connection: (is it a settings mistake, lowercase message saying what to fix)."""
    where = f"mqtt broker {cfg.host}:{cfg.port}"
    if isinstance(exc, MqttConnectError):
        rc = exc.rc
        code = rc if isinstance(rc, int) else getattr(rc, "value", -1)
        text = str(rc).lower() if not isinstance(rc, int) else str(exc).lower()
        if code in _LOGIN_REFUSED:
            return True, (f"{where} refused the login ({text}); check mqtt.username and the password "
                          "in mqtt.password_env or mqtt.password_file")
        if code in _ID_REFUSED:
            return True, f"{where} rejected the client id {client_id!r} ({text}); set another mqtt.client_id"
        if code in _BROKER_BUSY:
            return False, f"{where} is not available ({text})"
        return True, f"{where} refused the connection ({text})"
    if not isinstance(exc, MqttError):
        return True, f"cannot connect to {where}: {exc!r}"
    cause = exc.__cause__ or exc.__context__  # aiomqtt raises MqttError(str(oserror)) from None
    if isinstance(cause, socket.gaierror):
        transient = cause.errno == socket.EAI_AGAIN
        return not transient, (f"mqtt.host {cfg.host!r} cannot be resolved ({cause.strerror}); "
                               "fix mqtt.host or the DNS setup")
    if isinstance(cause, ssl.SSLCertVerificationError):
        return True, (f"{where} sent a TLS certificate that was not accepted ({cause.verify_message}); "
                      "check mqtt.tls_ca_file and that mqtt.host matches the certificate")
    if isinstance(cause, ssl.SSLError):
        return True, (f"TLS handshake with {where} failed ({cause.reason or cause}); "
                      "is mqtt.port a TLS listener? check the mqtt.tls settings")
    if isinstance(cause, ConnectionRefusedError):
        return False, f"{where} refused the connection (is the broker running?)"
    # A TLS client on a plain port is reset; a plain client on a TLS port gets no CONNACK.
    listener = "a TLS listener (mqtt.tls = true)" if cfg.tls else "a plain MQTT listener (mqtt.tls = false)"
    if isinstance(cause, TimeoutError) or str(exc) == "Operation timed out":
        return False, f"{where} did not answer in time; is mqtt.port {listener}?"
    if isinstance(cause, ConnectionResetError):
        return False, f"{where} reset the connection; is mqtt.port {listener}?"
    if isinstance(cause, OSError):
        return False, f"{where} is unreachable ({cause.strerror or cause})"
    return False, f"{where}: {exc}"


class MqttPublisher:
    """Event sink and daemon service that publishes events to MQTT.

    Call :meth:`start` once inside the event loop (it raises :class:`ConfigError` when the
    settings are wrong: unknown host, login refused, TLS rejected), then :meth:`publish` for
    every event, then :meth:`stop`. Errors in the password or TLS files are raised here, by
    the constructor. ``status=False`` leaves ``<prefix>/status`` alone (no will either): for
    a one-shot command that shares the daemon's prefix.
    """

    def __init__(self, cfg: MqttConfig, metrics: Metrics | None = None, *, status: bool = True,
                 client_id: str | None = None, logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
                 ) -> None:
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else Metrics()
        self.status = status
        self.client_id = client_id or client_id_for(cfg)
        self.logger = logger if logger is not None else logging.getLogger("streamer.mqtt")
        self.prefix = cfg.topic_prefix.rstrip("/")
        self.status_topic = f"{self.prefix}/status"
        self._password = _password(cfg)
        self._tls = _tls_context(cfg)
        self._queue: deque[_Message] = deque()
        self._partials = 0  # partials in _queue, so that an overflow finds one without a scan
        self._inflight: deque[tuple[_Message, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = False
        self._closed = False
        self._deadline = 0.0
        self._first: asyncio.Future[None] | None = None
        self._session_up = False
        self._task: asyncio.Task[None] | None = None
        self._dropped_unlogged = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL_S

    # -- the sink side: synchronous, never waits ---------------------------------------

    def publish(self, stream: str, session: str, event: Event) -> None:
        """Queue one event and return at once."""
        if self._closed:
            return
        final = isinstance(event, Final)
        if not final and not self.cfg.publish_partials:
            return
        cfg = self.cfg
        payload = json.dumps({**event.to_dict(), "stream": stream, "session": session}, ensure_ascii=False).encode()
        self._enqueue(_Message(event.type, f"{self.prefix}/{topic_level(stream or session)}/{event.type}", payload,
                               cfg.qos_final if final else cfg.qos_partial,
                               cfg.retain_final if final else cfg.retain_partial))
        if isinstance(event, Final) and cfg.hermes and event.text:
            body = json.dumps(hermes_text_captured(event, session, cfg.site_id), ensure_ascii=False).encode()
            self._enqueue(_Message("hermes", HERMES_TEXT_CAPTURED, body, cfg.qos_final, False))

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged by the broker: queued plus in flight."""
        return len(self._queue) + len(self._inflight)

    @property
    def in_flight(self) -> int:
        """Messages sent and waiting for the broker's acknowledgement."""
        return len(self._inflight)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Return once the broker accepted the connection (at once when it already has)."""
        await self._connected.wait()

    def _enqueue(self, msg: _Message) -> None:
        if len(self._queue) >= self.cfg.queue_size:
            if msg.kind == "partial":
                self._drop(msg)
                return
            if self._partials:
                for i, queued in enumerate(self._queue):
                    if queued.kind == "partial":
                        del self._queue[i]
                        self._partials -= 1
                        self._drop(queued)
                        break
            else:
                self._drop(self._pop())
        self._queue.append(msg)
        self._partials += msg.kind == "partial"
        self._wake.set()

    def _pop(self) -> _Message:
        msg = self._queue.popleft()
        self._partials -= msg.kind == "partial"
        return msg

    def _drop(self, msg: _Message, *, why: str = "the queue is full") -> None:
        self.metrics.mqtt_dropped.labels(msg.kind).inc()
        self._dropped_unlogged += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:  # one line per interval in a long outage
            self.logger.warning("mqtt: dropped %d message(s) (latest: %s to %s): %s (mqtt.queue_size = %d, "
                                "%d waiting)", self._dropped_unlogged, msg.kind, msg.topic, why,
                                self.cfg.queue_size, self.pending)
            self._dropped_unlogged = 0
            self._drop_logged_at = now

    def _log_drops(self) -> None:
        """Report the drops that the rate limit of :meth:`_drop` kept quiet."""
        if self._dropped_unlogged:
            self.logger.warning("mqtt: dropped %d more message(s) because the queue was full",
                                self._dropped_unlogged)
            self._dropped_unlogged = 0

    # -- the service side ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the publishing task and wait (a bounded time) for the first connection attempt.

        Raises :class:`ConfigError` when that attempt shows a settings mistake (the host name does
        not resolve, the login or client id is refused, TLS fails). When the broker is merely
        down or slow, logs a warning and returns: the task keeps retrying with exponential backoff
        up to ``mqtt.reconnect_max_s`` while the queue fills.
        """
        if self._task is not None:
            return
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="streamer-mqtt")
        try:
            await asyncio.wait_for(asyncio.shield(self._first), START_WAIT_S)
        except TimeoutError:
            self.logger.warning("mqtt broker %s:%d has not answered in %.0f s; serving anyway, still trying",
                                self.cfg.host, self.cfg.port, START_WAIT_S)
        except StreamerError:
            await self._task  # it has returned already
            self._task = None
            self._closed = True
            raise
        finally:
            self._first = None  # later failures are logged, never raised

    async def stop(self) -> None:
        """Publish what is queued (within ``mqtt.flush_timeout_s``), say ``offline``, disconnect.

        What cannot be published in time is counted as dropped. Idempotent.
        """
        if self._task is None:
            self._closed = True
            return
        if not self._closing:
            self._closing = True
            self._deadline = asyncio.get_running_loop().time() + self.cfg.flush_timeout_s
            self._stopping.set()
            self._wake.set()
        task = self._task
        try:
            await asyncio.wait_for(asyncio.shield(task), self.cfg.flush_timeout_s + STOP_GRACE_S)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._give_up()
        self._closed = True

    def _give_up(self) -> None:
        self._log_drops()
        self._requeue_inflight()  # counts what the broker acknowledged
        lost = list(self._queue)
        self._queue.clear()
        self._partials = 0
        if lost:
            for msg in lost:
                self.metrics.mqtt_dropped.labels(msg.kind).inc()
            self.logger.warning("mqtt: %d message(s) not published within mqtt.flush_timeout_s = %.1f s",
                                len(lost), self.cfg.flush_timeout_s)

    def _resolve_first(self, error: StreamerError | None = None) -> None:
        if self._first is not None and not self._first.done():
            if error is None:
                self._first.set_result(None)
            else:
                self._first.set_exception(error)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_START_S
        failures = 0
        while True:
            if self._closing and (not self.pending or loop.time() >= self._deadline):
                self._give_up()
                return
            self._session_up = False
            try:
                await self._session()
                return
            except _FlushTimeout:
                self._give_up()
                return
            except Exception as exc:  # MqttError, and anything else: the publisher must not die
                self._requeue_inflight()
                fatal, reason = _describe(exc, self.cfg, self.client_id)
                if self._first is not None and not self._first.done():
                    if fatal:
                        self._resolve_first(ConfigError(reason))
                        return
                    self._resolve_first()
                    self.logger.warning("%s; serving anyway, retrying in the background", reason)
                elif self._session_up:
                    delay, failures = BACKOFF_START_S, 0
                    why = "" if isinstance(exc, _ConnectionLost) else f" ({exc})"
                    self.logger.warning("mqtt: lost the connection to %s:%d%s; %d message(s) kept for the "
                                        "reconnect", self.cfg.host, self.cfg.port, why, self.pending)
                elif failures == 0 or fatal:
                    self.logger.log(logging.ERROR if fatal else logging.WARNING, "mqtt: %s; retrying", reason)
                else:
                    self.logger.debug("mqtt: %s; retrying in %.1f s", reason, delay)
                if not isinstance(exc, MqttError):
                    self.logger.error("mqtt: unexpected error", exc_info=exc)
                failures += 1
            if self._closing:
                await asyncio.sleep(max(0.0, min(delay, self._deadline - loop.time())))
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        self.metrics.mqtt_connected.set(1 if up else 0)

    async def _session(self) -> None:
        """One connection: say online, drain until stopped, say offline. Raises when the connection breaks."""
        cfg = self.cfg
        will = aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True) if self.status else None
        client = aiomqtt.Client(
            cfg.host, cfg.port, username=cfg.username or None, password=self._password, identifier=self.client_id,
            keepalive=cfg.keepalive_s, will=will, tls_context=self._tls, timeout=CONNECT_TIMEOUT_S,
            logger=_PAHO_LOGGER,
        )
        client.pending_calls_threshold = WINDOW + 2
        async with client:
            self._session_up = True
            self._set_connected(True)
            self._resolve_first()
            self.logger.info("mqtt: connected to %s:%d as %s; %d message(s) waiting", cfg.host, cfg.port,
                             self.client_id, self.pending)
            self._log_drops()
            lost = asyncio.ensure_future(self._watch(client))
            try:
                if self.status:
                    await self._guarded(client.publish(self.status_topic, b"online", qos=1, retain=True), lost)
                try:
                    await self._drain(client, lost)
                except (_FlushTimeout, asyncio.CancelledError):
                    await self._say_offline(client, lost)
                    raise
                await self._say_offline(client, lost)
            finally:
                lost.cancel()
                self._set_connected(False)

    async def _say_offline(self, client: aiomqtt.Client, lost: asyncio.Future[None]) -> None:
        # Also when cancelled: the clean DISCONNECT that follows discards the will.
        if not self.status or lost.done():
            return
        with contextlib.suppress(MqttError):
            await self._guarded(client.publish(self.status_topic, b"offline", qos=1, retain=True,
                                               timeout=min(2.0, CONNECT_TIMEOUT_S)), lost)

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        """Raise _ConnectionLost when the connection breaks (nothing is subscribed, so no message comes)."""
        try:
            async for _ in client.messages:
                pass
        except MqttError as exc:
            raise _ConnectionLost("connection lost") from exc

    @staticmethod
    async def _guarded(aw: Any, lost: asyncio.Future[None]) -> None:
        """Await ``aw`` unless the connection breaks first (a QoS 1 publish would wait its whole timeout)."""
        task = asyncio.ensure_future(aw)
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            task.result()
            return
        lost.result()
        raise _ConnectionLost("connection lost")

    async def _drain(self, client: aiomqtt.Client, lost: asyncio.Future[None]) -> None:
        """Publish queued messages, up to WINDOW at once, in order; return once stopped and empty."""
        loop = asyncio.get_running_loop()
        window = self._inflight
        while True:
            while self._queue and len(window) < WINDOW:
                msg = self._pop()
                window.append((msg, asyncio.ensure_future(
                    client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain))))
            if window and window[0][1].done():
                msg, fut = window[0]
                exc = fut.exception()
                if isinstance(exc, MqttError):
                    raise exc  # the message stays in the window: _requeue_inflight puts it back
                window.popleft()
                if exc is None:
                    self.metrics.mqtt_published.labels(msg.kind).inc()
                else:  # e.g. ValueError from paho for a bad topic: sending it again would fail again
                    self.logger.error("mqtt: cannot publish to %s: %s", msg.topic, exc)
                    self._drop(msg, why=str(exc))
                continue
            if not window and self._closing:
                return
            self._wake.clear()
            wake = asyncio.ensure_future(self._wake.wait())
            waits: set[asyncio.Future[Any]] = {lost, wake}
            if window:
                waits.add(window[0][1])
            timeout = max(0.0, self._deadline - loop.time()) if self._closing else None
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wake.cancel()
            if lost.done():
                lost.result()
                raise _ConnectionLost("connection lost")
            if self._closing and loop.time() >= self._deadline and self.pending:
                raise _FlushTimeout

    def _requeue_inflight(self) -> None:
        """Put every message not acknowledged back at the front of the queue, in order."""
        keep: list[_Message] = []
        for msg, fut in self._inflight:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.metrics.mqtt_published.labels(msg.kind).inc()
                continue
            fut.cancel()
            keep.append(msg)
        self._inflight.clear()
        self._queue.extendleft(reversed(keep))
        self._partials += sum(m.kind == "partial" for m in keep)


def attach_publisher(daemon: Any) -> MqttPublisher | None:
    """With ``mqtt.enabled``: add a publisher to the daemon's event sinks and services."""
    if not daemon.cfg.mqtt.enabled:
        return None
    publisher = MqttPublisher(daemon.cfg.mqtt, daemon.metrics)
    daemon.hub.sinks.append(publisher)
    daemon.services.append(publisher)
    return publisher


@contextlib.asynccontextmanager
async def running_publisher(cfg: MqttConfig, metrics: Metrics | None = None, *, status: bool = True,
                            role: str = "") -> AsyncIterator[MqttPublisher]:
    """``async with running_publisher(cfg.mqtt) as mqtt: mqtt.publish(name, session, event)``."""
    publisher = MqttPublisher(cfg, metrics, status=status, client_id=client_id_for(cfg, role))
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()


class PublisherThread:
    """An :class:`MqttPublisher` on its own event loop thread, for synchronous code.

    ::

        with PublisherThread(cfg.mqtt, role="transcribe") as mqtt:
            for event in events:
                mqtt.publish("talk", session_id, event)

    Entering raises what the publisher's constructor and :meth:`MqttPublisher.start` raise;
    :meth:`publish` is thread-safe and never blocks; leaving flushes (at most
    ``mqtt.flush_timeout_s``). By default it leaves ``<prefix>/status`` to the daemon.
    """

    def __init__(self, cfg: MqttConfig, *, role: str = "", status: bool = False,
                 metrics: Metrics | None = None) -> None:
        self.publisher = MqttPublisher(cfg, metrics, status=status, client_id=client_id_for(cfg, role))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def started(cls, cfg: MqttConfig, *, role: str = "", status: bool = False) -> PublisherThread:
        """Build and :meth:`start` one; the caller must :meth:`close` it."""
        thread = cls(cfg, role=role, status=status)
        thread.start()
        return thread

    def start(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="streamer-mqtt", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.publisher.start(), loop).result()
        except BaseException:
            self._halt()
            raise

    def publish(self, stream: str, session: str, event: Event) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.publisher.publish, stream, session, event)

    def close(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.publisher.stop(), self._loop).result()
        finally:
            self._halt()

    def _halt(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> PublisherThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
