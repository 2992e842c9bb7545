"""Publishing events to an MQTT broker with aiomqtt (see ``docs/mqtt.md``).

:class:`MqttPublisher` is an event sink and a daemon service. ``publish()`` is called
synchronously for every event and only appends to a bounded in-memory queue; one task
drains that queue into ``async with aiomqtt.Client(...)``, so a websocket client never
waits on the broker. Topics, with ``P`` = ``mqtt.topic_prefix``::

    P/<stream>/partial       the websocket event JSON, plus "stream" and "session"
    P/<stream>/final         idem; QoS mqtt.qos_final (1)
    P/status                 retained "online"; "draining" once the daemon drains (SIGTERM); "offline" on exit
                             and as the last will
    hermes/asr/textCaptured  finals in Rhasspy Hermes form, with mqtt.hermes = true

Delivery: a message leaves the queue only when the broker acknowledged it (QoS 1/2) or
it was written (QoS 0). When the connection breaks, every message not acknowledged goes
back to the front of the queue, in order, and is sent again after the reconnect; with
QoS 1 a subscriber may therefore see a final twice and de-duplicates by
``(session, segment)``. Those messages are suspects and go one at a time; one that was in
flight each of ``BREAKS_TO_DROP`` (3) times the connection broke is one the broker refuses,
and is dropped so that the rest goes through. When the queue is full, partials are dropped
first (an arriving one, else the oldest queued one), then the oldest finals; drops are
counted in ``streamer_mqtt_dropped_total`` and logged. :meth:`MqttPublisher.health` says
``degraded`` while finals do not get through (``/healthz``).

For code without an event loop (``streamer transcribe``, a capture loop) use
:class:`PublisherThread`; for asyncio code, :func:`running_publisher`.

The queue and its rules are :class:`streamer.outbox.Outbox`, plain code without I/O; this
module connects, sends what the outbox hands out and tells it what the broker acknowledged.
Reading the password and TLS files and explaining failed connections is
:mod:`streamer.aio.mqtt.settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import unicodedata
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
from aiomqtt import MqttError

from streamer.aio.metrics import Metrics, MqttMetrics
from streamer.aio.mqtt.settings import check_settings, client_id_for, explain_failure, password, tls_context
from streamer.config import MqttConfig
from streamer.events import Event, Final
from streamer.exceptions import ConfigError, StreamerError
from streamer.outbox import PARTIAL, QUEUE_FULL, Drop, Message, Outbox

__all__ = [
    "HERMES_TEXT_CAPTURED",
    "MqttPublisher",
    "PublisherThread",
    "check_settings",
    "client_id_for",
    "hermes_text_captured",
    "running_publisher",
    "topic_level",
]

logger = logging.getLogger("streamer.mqtt")

HERMES_TEXT_CAPTURED = "hermes/asr/textCaptured"
BACKOFF_START_S = 0.25
CONNECT_TIMEOUT_S = 10.0
"""How long aiomqtt waits for CONNACK, PUBACK or a clean disconnect."""
START_WAIT_S = 12.0
"""``start()`` waits this long for the first connection attempt, then serves anyway."""
STOP_GRACE_S = 3.0
"""After ``flush_timeout_s``, time left to say ``offline`` and disconnect before the task is cancelled."""
DROP_LOG_INTERVAL_S = 10.0
DEGRADED_AFTER_S = 10.0
"""``health()`` says degraded once the publisher has not been connected for this long ..."""
DROPS_DEGRADE_S = 60.0
"""... or for this long after a final (or Hermes message) was dropped."""

_PAHO_LOGGER = logging.getLogger("streamer.mqtt.paho")


class _FlushTimeout(Exception):
    """flush_timeout_s passed while messages were still queued."""


class _ConnectionLost(MqttError):
    """The broker closed the connection or it broke (aiomqtt only says "unspecified error")."""


def topic_level(name: str) -> str:
    """Make a name usable as one topic level: ``/``, ``+``, ``#``, control characters and surrogates become ``_``.

    The daemon's stream and source names are validated already; this keeps any other caller from building a
    topic that the broker refuses (mosquitto closes the connection on a control character).
    """
    out = "".join("_" if c in "/+#" or unicodedata.category(c) in ("Cc", "Cs") else c for c in name)
    return out or "_"


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


class MqttPublisher:
    """Event sink and daemon service that publishes events to MQTT.

    Call :meth:`start` once inside the event loop (it raises :class:`ConfigError` when the
    settings are wrong: unknown host, login refused, TLS rejected), then :meth:`publish` for
    every event, then :meth:`stop`. Errors in the password or TLS files are raised here, by
    the constructor. ``status=False`` leaves ``<prefix>/status`` alone (no will either): for
    a one-shot command that shares the daemon's prefix.
    """

    def __init__(self, cfg: MqttConfig, metrics: MqttMetrics | None = None, *, status: bool = True,
                 client_id: str | None = None) -> None:
        self.cfg = cfg
        self.metrics: MqttMetrics = metrics if metrics is not None else Metrics()
        self.status = status
        self.client_id = client_id or client_id_for(cfg)
        self.prefix = cfg.topic_prefix.rstrip("/")
        self.status_topic = f"{self.prefix}/status"
        self._password = password(cfg)
        self._tls = tls_context(cfg)
        self._outbox = Outbox(cfg.queue_size)
        self._sends: dict[Message, asyncio.Future[None]] = {}  # the publish call of each message in flight
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = False
        self._closed = False
        self._deadline = 0.0
        self._first: asyncio.Future[None] | None = None
        self._session_up = False
        self._task: asyncio.Task[None] | None = None
        self._drops_logged = 0  # of the outbox's drops, those that a log line reported
        self._drop_logged_at = -DROP_LOG_INTERVAL_S
        self.degraded_after_s = DEGRADED_AFTER_S
        self._down_since = time.monotonic()  # not connected since (the start counts)
        self._final_dropped_at = -DROPS_DEGRADE_S
        self._announce = b"online"  # what <prefix>/status says while connected

    # -- the sink side: synchronous, never waits ---------------------------------------

    def wants_partials(self, stream: str) -> bool:
        return self.cfg.publish_partials

    def publish(self, stream: str, session: str, event: Event) -> None:
        """Queue one event and return at once."""
        if self._closed:
            return
        final = isinstance(event, Final)
        if not final and not self.cfg.publish_partials:
            return
        cfg = self.cfg
        payload = json.dumps({**event.to_dict(), "stream": stream, "session": session}, ensure_ascii=False).encode()
        self._put(Message(event.type, f"{self.prefix}/{topic_level(stream or session)}/{event.type}", payload,
                          cfg.qos_final if final else cfg.qos_partial,
                          cfg.retain_final if final else cfg.retain_partial))
        if isinstance(event, Final) and cfg.hermes and event.text:
            body = json.dumps(hermes_text_captured(event, session, cfg.site_id), ensure_ascii=False).encode()
            self._put(Message("hermes", HERMES_TEXT_CAPTURED, body, cfg.qos_final, False))

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged by the broker: queued plus in flight."""
        return self._outbox.pending

    @property
    def in_flight(self) -> int:
        """Messages sent and waiting for the broker's acknowledgement."""
        return self._outbox.in_flight

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def health(self) -> dict[str, Any]:
        """For ``/healthz``: ``{"mqtt": "ok"}``, or ``"degraded"`` with ``mqtt_reason`` while finals do not get
        through: not connected for ``degraded_after_s`` (10 s), or a final dropped in the last 60 s."""
        now = time.monotonic()
        where = f"{self.cfg.host}:{self.cfg.port}"
        if not self.connected and now - self._down_since >= self.degraded_after_s:
            reason = f"not connected to {where} for {now - self._down_since:.0f} s; {self.pending} message(s) waiting"
        elif now - self._final_dropped_at < DROPS_DEGRADE_S:
            lost = self._outbox.dropped.total() - self._outbox.dropped[PARTIAL]
            reason = (f"a final was dropped {now - self._final_dropped_at:.0f} s ago ({lost} since start; see the "
                      "log and streamer_mqtt_dropped_total)")
        else:
            return {"mqtt": "ok"}
        return {"mqtt": "degraded", "mqtt_reason": reason}

    async def wait_connected(self) -> None:
        """Return once the broker accepted the connection (at once when it already has)."""
        await self._connected.wait()

    def draining(self) -> None:
        """The daemon drains (SIGTERM: it takes no new stream, its live ones go on): ``<prefix>/status`` says
        ``draining`` (retained) from now on, until ``offline``."""
        if not self.status or self._closed or self._announce == b"draining":
            return
        self._announce = b"draining"
        self._put(Message("status", self.status_topic, self._announce, 1, True))

    def _put(self, msg: Message) -> None:
        drop = self._outbox.put(msg)
        if drop is not None:
            self._drop(drop)
        self._wake.set()

    def _drop(self, drop: Drop, *, always: bool = False) -> None:
        """Count a message that will never be published; log it, at most once per interval in a long outage."""
        msg = drop.message
        self.metrics.mqtt_dropped.labels(msg.kind).inc()
        now = time.monotonic()
        if msg.kind != PARTIAL:
            self._final_dropped_at = now
        if always or now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
            full = ""
            if drop.reason == QUEUE_FULL:
                full = f" (mqtt.queue_size = {self.cfg.queue_size}, {self.pending} waiting)"
            logger.warning("mqtt: dropped %d message(s) (latest: %s to %s): %s%s", self._unlogged_drops(), msg.kind,
                           msg.topic, drop.reason, full)
            self._drop_logged_at = now

    def _log_drops(self) -> None:
        """Report the drops that the rate limit of :meth:`_drop` kept quiet."""
        if unlogged := self._unlogged_drops():
            logger.warning("mqtt: dropped %d more message(s) because the queue was full", unlogged)

    def _unlogged_drops(self) -> int:
        """Drops since the last log line that reported drops; the caller reports them now."""
        total = self._outbox.dropped.total()
        unlogged, self._drops_logged = total - self._drops_logged, total
        return unlogged

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
            logger.warning("mqtt broker %s:%d has not answered in %.0f s; serving anyway, still trying",
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
        """At shutdown, once the flush timeout passed or the task was cancelled: count what is left as dropped."""
        self._log_drops()
        self._requeue_inflight()  # counts what the broker acknowledged
        lost = self._outbox.clear("not published within mqtt.flush_timeout_s")
        if lost:
            for drop in lost:
                self.metrics.mqtt_dropped.labels(drop.message.kind).inc()
            logger.warning("mqtt: %d message(s) not published within mqtt.flush_timeout_s = %.1f s",
                           len(lost), self.cfg.flush_timeout_s)

    def _resolve_first(self, error: StreamerError | None = None) -> None:
        if self._first is not None and not self._first.done():
            if error is None:
                self._first.set_result(None)
            else:
                self._first.set_exception(error)

    async def _run(self) -> None:
        """The publishing task: one session after another, with backoff, until stopped."""
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
                fatal, reason = explain_failure(exc, self.cfg, self.client_id)
                if self._first is not None and not self._first.done():
                    if fatal:
                        self._resolve_first(ConfigError(reason))
                        return
                    self._resolve_first()
                    logger.warning("%s; serving anyway, retrying in the background", reason)
                elif self._session_up:
                    delay, failures = BACKOFF_START_S, 0
                    why = "" if isinstance(exc, _ConnectionLost) else f" ({exc})"
                    logger.warning("mqtt: lost the connection to %s:%d%s; %d message(s) kept for the "
                                   "reconnect", self.cfg.host, self.cfg.port, why, self.pending)
                elif failures == 0 or fatal:
                    logger.log(logging.ERROR if fatal else logging.WARNING, "mqtt: %s; retrying", reason)
                else:
                    logger.debug("mqtt: %s; retrying in %.1f s", reason, delay)
                if not isinstance(exc, MqttError):
                    logger.error("mqtt: unexpected error", exc_info=exc)
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
        elif self._connected.is_set():
            self._connected.clear()
            self._down_since = time.monotonic()
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
        client.pending_calls_threshold = self._outbox.window + 2
        async with client:
            self._session_up = True
            self._set_connected(True)
            self._resolve_first()
            logger.info("mqtt: connected to %s:%d as %s; %d message(s) waiting", cfg.host, cfg.port,
                        self.client_id, self.pending)
            self._log_drops()
            lost = asyncio.ensure_future(self._watch(client))
            try:
                if self.status:
                    await self._guarded(client.publish(self.status_topic, self._announce, qos=1, retain=True), lost)
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
        """Publish queued messages, up to the outbox's window at once, in order; return once stopped and empty."""
        loop = asyncio.get_running_loop()
        outbox, sends = self._outbox, self._sends
        while True:
            for msg in outbox.take():
                sends[msg] = asyncio.ensure_future(client.publish(msg.topic, msg.payload, qos=msg.qos,
                                                                  retain=msg.retain))
            head = next(iter(outbox.sending), None)  # results are taken in the order of sending
            if head is not None and sends[head].done():
                exc = sends[head].exception()
                if isinstance(exc, MqttError):
                    raise exc  # the message stays in flight: _requeue_inflight puts it back
                del sends[head]
                if exc is None:
                    outbox.ack(head)
                    self.metrics.mqtt_published.labels(head.kind).inc()
                else:  # e.g. ValueError from paho for a bad topic: sending it again would fail again
                    logger.error("mqtt: cannot publish to %s: %s", head.topic, exc)
                    self._drop(outbox.fail(head, str(exc)))
                continue
            if head is None and self._closing:
                return
            self._wake.clear()
            wake = asyncio.ensure_future(self._wake.wait())
            waits: set[asyncio.Future[Any]] = {lost, wake}
            if head is not None:
                waits.add(sends[head])
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
        for msg in self._outbox.sending:
            send = self._sends.pop(msg)
            if send.done() and not send.cancelled() and send.exception() is None:
                self._outbox.ack(msg)
                self.metrics.mqtt_published.labels(msg.kind).inc()
            else:
                send.cancel()
        for drop in self._outbox.requeue():  # a message the broker refuses
            self._drop(drop, always=True)


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
        """Start the loop thread and the publisher in it; raises what :meth:`MqttPublisher.start` raises."""
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="streamer-mqtt", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.publisher.start(), loop).result()
        except BaseException:
            self._halt()
            raise

    def publish(self, stream: str, session: str, event: Event) -> None:
        """Hand one event to the publisher's loop, from any thread; ignored before start and after close."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.publisher.publish, stream, session, event)

    def close(self) -> None:
        """Flush (at most ``mqtt.flush_timeout_s``), disconnect and end the thread. Idempotent."""
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
