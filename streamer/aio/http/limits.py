"""What one connection may cost the daemon: its unsent outgoing data, how long it may not read, descriptors.

websockets answers each ping with a pong written straight to the transport: ``write_limit`` only
makes :meth:`~websockets.asyncio.connection.Connection.send` wait, pongs never wait. A client that
floods pings and never reads made the daemon buffer pongs without bound (+18-28 MB/s), and its
keepalive ping waited behind them in ``drain()``, so the keepalive never closed it.
:class:`BoundedConnection` closes such a client: when its unsent data passes
``server.max_unsent_bytes``, or when it has taken none of the data waiting for it for
``server.ping_timeout_s``.

Its keepalive counts any data from the client as an answer: a client that streams faster than the daemon takes
its audio waits behind it, its pong too (websockets stops reading a connection whose handler is behind), and a
daemon that is behind must not close the clients it keeps waiting (``caption.py --fast`` was closed 1011 on a
busy machine). The keepalive closes a client that sent nothing at all, no pong and no data, for
``server.ping_timeout_s`` while the daemon was reading it.

Every connection holds a file descriptor: :func:`check_descriptors` makes sure that
``server.max_streams + server.max_viewers`` fit under ``RLIMIT_NOFILE`` with headroom, and
:class:`AcceptErrorFilter` keeps asyncio from logging every failed ``accept()`` when they do not
(~2,600 tracebacks a second, 12 MB of log in 10 s, with the descriptors used up).

A refused connection or request costs the log one line at most, and a flood of them a few lines per
interval: :class:`RefusalLog`, which every protocol and HTTP answer reports its refusals to.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from streamer.config import ServerConfig
from streamer.events import CLOSE_POLICY, Error

__all__ = ["AcceptErrorFilter", "BoundedConnection", "RefusalLog", "check_descriptors", "descriptors_needed",
           "install_accept_error_filter"]

logger = logging.getLogger("streamer.server")


class BoundedConnection(ServerConnection):
    """A server connection whose outgoing data is bounded; :meth:`apply_limits` sets the bounds."""

    max_unsent = 1 << 20
    """unsent outgoing bytes beyond which the client is closed (``server.max_unsent_bytes``)"""

    _stalled: asyncio.TimerHandle | None = None
    _heard = 0
    """bytes received from the client so far: the keepalive's sign of life besides a pong"""

    def apply_limits(self, cfg: ServerConfig) -> None:
        """The keepalive, write buffer and unsent-data bounds of ``cfg`` (before the handshake ends)."""
        self.ping_interval = cfg.ping_interval_s or None
        self.ping_timeout = cfg.ping_timeout_s or None
        self.max_unsent = cfg.max_unsent_bytes
        self.write_limit_high, self.write_limit_low = cfg.write_limit_bytes, None
        self.transport.set_write_buffer_limits(cfg.write_limit_bytes)

    def data_received(self, data: bytes) -> None:
        self._heard += len(data)
        super().data_received(data)  # answers pings: pongs go to the transport, whatever the client reads
        unsent = self.transport.get_write_buffer_size()
        if unsent > self.max_unsent:
            self._drop(f"{unsent} bytes wait to be sent to it, more than server.max_unsent_bytes = {self.max_unsent}")

    async def keepalive(self) -> None:
        """websockets' keepalive (a ping every ``ping_interval``; its close 1011 when the client is silent), except
        that data received since the ping answers for the client, as does the daemon not reading it: the pong may
        wait behind audio the daemon has not read yet."""
        assert self.ping_interval is not None
        latency = 0.0
        try:
            while True:
                await asyncio.sleep(self.ping_interval - latency)
                pong = asyncio.ensure_future(await self.ping())
                if self.ping_timeout is None:
                    continue
                heard = self._heard
                while not (await asyncio.wait({pong}, timeout=self.ping_timeout))[0]:
                    if self._heard == heard and self.transport.is_reading():
                        await self.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                        return
                    heard = self._heard  # alive: it sends, or the daemon has not read what it sent
                latency = min(pong.result(), self.ping_interval)
        except ConnectionClosed:
            pass

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.ping_timeout is not None and self._stalled is None:
            self._stalled = self.loop.call_later(
                self.ping_timeout, self._drop,
                f"it took none of the data waiting for it for {self.ping_timeout:g} s (server.ping_timeout_s)")

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_stall()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall()
        super().connection_lost(exc)

    def _cancel_stall(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _drop(self, why: str) -> None:
        """Close the connection at once: the client reads nothing, so a closing handshake would wait forever."""
        self._stalled = None
        if self.protocol.state is State.CLOSED or self.transport.is_closing():
            return
        peer = self.transport.get_extra_info("peername")
        logger.warning("closing the connection of %s (1008): %s; it does not read what it is sent",
                       f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client", why)
        self.protocol.fail(CLOSE_POLICY, "client does not read")  # the code its handler sees
        self.transport.abort()  # drops the unsent data


FD_HEADROOM = 256
"""descriptors besides the connections the limits bound: listeners, model and log files, MQTT, the worker's and
torch's threads, and connections being refused"""


def descriptors_needed(cfg: ServerConfig) -> int:
    """Descriptors the daemon may need at its limits: one per stream, viewer and connection still sending its
    request head, plus :data:`FD_HEADROOM`."""
    return cfg.max_streams + cfg.max_viewers + cfg.max_pending_handshakes + FD_HEADROOM


MAX_SOFT_NOFILE = 1 << 20
"""the soft ``RLIMIT_NOFILE`` asked for where the hard limit is unlimited"""


def check_descriptors(cfg: ServerConfig) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, as servers do; warn when even that is not what ``cfg``
    needs.

    Connections that never become streams hold descriptors too (slow request heads, refused clients): the
    limits in ``cfg`` bound the admitted ones only, so the daemon takes every descriptor it may. (asyncio waits
    with epoll, so descriptors above 1024 are fine; systemd leaves the soft limit at 1024 for programs that
    still use select().)
    """
    need = descriptors_needed(cfg)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_SOFT_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        logger.info("raised the open-file limit from %d to %d (its hard limit): server.max_streams + "
                    "server.max_viewers + server.max_pending_handshakes = %d connections need %d", soft, target,
                    need - FD_HEADROOM, need)
        soft = target
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    logger.warning("the open-file limit is %d (RLIMIT_NOFILE, hard %d), but server.max_streams + server.max_viewers "
                   "+ server.max_pending_handshakes = %d connections need about %d descriptors: new connections will "
                   "fail before those limits; raise LimitNOFILE= in the unit (or ulimit -n), or lower those limits",
                   soft, hard, need - FD_HEADROOM, need)


ACCEPT_ERROR = "socket.accept() out of system resource"
"""how asyncio's event loop logs a failed accept() (EMFILE, ENFILE, ENOBUFS, ENOMEM)"""


class AcceptErrorFilter(logging.Filter):
    """Lets one failed-accept record of the ``asyncio`` logger through per ``interval_s``, with a count of those
    held back since. asyncio logs one per attempt, with a traceback, and retries many times a second."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._next = 0.0
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(ACCEPT_ERROR):
            return True
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return False
        self._next = now + self.interval_s
        first, _, rest = message.partition("\n")
        note = (f" ({self._held} more in the last {self.interval_s:g} s)" if self._held else "") + \
            " -- out of file descriptors? see server.max_streams, server.max_viewers and LimitNOFILE"
        record.msg, record.args = first + note + ("\n" + rest if rest else ""), None
        self._held = 0
        return True


def install_accept_error_filter(interval_s: float = 10.0) -> None:
    """Rate-limit asyncio's failed-accept log records (once per process)."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptErrorFilter) for f in log.filters):
        log.addFilter(AcceptErrorFilter(interval_s))


class RefusalLog(logging.Filter):
    """At most one line per refused connection or request, and per server at most a few per ``interval_s``.

    websockets logs two lines for every connection (``connection open``, ``connection closed``) and for a
    request it answers itself ``HTTP response sent (403 Forbidden)``, so a refusal wrote two or three lines
    besides the daemon's reason: 5,000 refused connections wrote 650 KB, and a page or a script repeating a
    refused request 2.6-3 MB in 10 s. Installed on the ``websockets.server`` logger (:meth:`install`), this
    filter

    - holds each connection's ``connection open`` back until the connection is admitted (:meth:`admitted`)
      or closes without being refused;
    - makes a refusal the daemon explains (:meth:`refused` for a websocket refused at admission,
      :meth:`refused_request` for an HTTP request) its one line, and websockets' ``HTTP response sent`` line
      of a 4xx or 5xx the one line of a refusal the daemon did not explain;
    - drops a refused connection's other lines;
    - lets :attr:`admission_burst` lines of refused websockets and :attr:`burst` lines of refused requests
      out per ``interval_s``: beyond, refusals are counted by reason, and the next line that goes out says
      how many were held back;
    - does the same for the lines of streams a client's bad input ended (:meth:`ended_by_error`, any
      protocol, :attr:`error_burst` per interval), and drops the ``connection closed`` of such a websocket:
      its error line says why it closed. A script repeating bad Twilio messages or AudioSocket frames wrote
      1.4-3.9 MB of log in 10 s this way.

    The interval is kept per server (a process may run several daemons, as the tests do), so one daemon's
    refusals never silence another's.
    """

    burst = 20
    """refused requests logged per interval: each is some client's own mistake (a token, a host name, a path)"""
    admission_burst = 1
    """websockets refused at admission logged per interval: they are all alike (the daemon is full, or stops)"""
    error_burst = 20
    """streams ended by an error logged per interval: by a client's bad input, and apart, by the model's failure"""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._held: dict[object, logging.LogRecord] = {}  # connection id -> its "connection open"
        self._refused: set[object] = set()  # connection ids whose remaining websockets lines are dropped
        self._explained: set[object] = set()  # of those, the ones whose refusal the daemon logged itself
        # per server (or daemon, for streams' errors): the interval of each kind of line
        self._windows: weakref.WeakKeyDictionary[object, dict[str, _Window]] = weakref.WeakKeyDictionary()

    @classmethod
    def install(cls) -> RefusalLog:
        """The filter on the ``websockets.server`` logger (added once per process)."""
        log = logging.getLogger("websockets.server")
        for f in log.filters:
            if isinstance(f, cls):
                return f
        f = cls()
        log.addFilter(f)
        return f

    def _allowed(self, server: object, kind: str, reason: str) -> str | None:
        """The note of the lines held back since the last line, when a line of ``kind`` (``request``,
        ``admission``, ``error`` or ``failure``) may go out for ``server`` now; None when it may not (it is
        counted under ``reason``)."""
        now = time.monotonic()
        windows = self._windows.setdefault(server, {})
        window = windows.get(kind)
        if window is None or now - window.start >= self.interval_s:
            window = windows[kind] = _Window(now, held=window.held if window is not None else {})
        burst = {"request": self.burst, "admission": self.admission_burst}.get(kind, self.error_burst)
        if window.lines >= burst:
            window.held[reason] = window.held.get(reason, 0) + 1
            return None
        window.lines += 1
        note = ", ".join(f"{n} {why}" for why, n in window.held.items())
        window.held.clear()
        return f" (held back since the last line: {note})" if note else ""

    def admitted(self, ws: ServerConnection) -> None:
        """``ws`` was admitted: its ``connection open`` line goes out now."""
        held = self._held.pop(ws.id, None)
        if held is not None:
            logging.getLogger(held.name).callHandlers(held)

    def refused(self, ws: ServerConnection, error: Error) -> None:
        """The websocket ``ws`` was refused at admission with ``error``: its lines are dropped; one line says so
        unless one for the same reason did lately."""
        self._held.pop(ws.id, None)
        if ws.protocol.state is not State.CLOSED:
            self._drop_lines(ws.id, explained=False)
        note = self._allowed(ws.server, "admission", error.code)
        if note is not None:
            logger.info("refused a connection from %s (%s: %s)%s", _peer(ws), error.code, error.message, note)

    def refused_request(self, conn: ServerConnection, reason: str, message: str, *args: object) -> None:
        """The HTTP request on ``conn`` was refused for ``reason`` (a short code): log ``message % args`` as its
        one line, unless one for the same reason did lately."""
        self._drop_lines(conn.id, explained=True)
        note = self._allowed(conn.server, "request", reason)
        if note is not None:
            logger.info(message + note, *args)

    def ended_by_error(self, daemon: object, kind: str, reason: str, ws: ServerConnection | None = None
                       ) -> str | None:
        """A stream of ``daemon`` ends with an error of ``kind`` (``error``: the client's; ``failure``: the
        model's, counted apart) and code ``reason``: the note for its one line, which the protocol writes itself,
        or None when it is held back (counted). A websocket's ``connection closed`` is dropped: the error line
        says why it closed."""
        if ws is not None:
            self._drop_lines(ws.id, explained=True)
        return self._allowed(daemon, kind, reason)

    def _drop_lines(self, key: object, *, explained: bool) -> None:
        """Mark connection ``key``: its remaining websockets lines are dropped (``explained``: its refusal's line
        too, the daemon wrote its own). The mark goes at its ``connection closed``, so none is made when websockets
        does not write those lines: under ``[logging] level = "warning"`` a mark would never go (a flood of
        refused requests grew the marks without bound)."""
        if logging.getLogger("websockets.server").isEnabledFor(logging.INFO):
            self._refused.add(key)
            if explained:
                self._explained.add(key)

    def closed_without_request(self, conn: ServerConnection) -> None:
        """``conn`` closed before its request head came: its ``connection closed`` is dropped, and one line says
        so unless one did lately (a connection refused for being slow has its line already)."""
        if conn.id not in self._explained:
            self.refused_request(conn, "no_request", "the connection of %s closed before its request head came",
                                 _peer(conn))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message not in ("connection open", "connection closed") and not message.startswith("HTTP response sent ("):
            return True
        ws: Any = record.__dict__.get("websocket")  # websockets' connection adapter adds it (a weak proxy)
        try:
            key, server = ws.id, ws.server
        except (AttributeError, ReferenceError):
            return True
        if message == "connection open":
            self._held[key] = record
            return False
        if message == "connection closed":
            opened = self._held.pop(key, None)
            if key in self._refused:
                self._refused.discard(key)
                self._explained.discard(key)
                return False
            if opened is not None:
                logging.getLogger(opened.name).callHandlers(opened)
            return True
        status = message[20:23]
        if status[:1] not in ("4", "5"):
            return True
        self._refused.add(key)
        if key in self._explained:
            return False
        note = self._allowed(server, "request", f"http_{status}")
        if note:
            record.msg, record.args = message + note, None
        return note is not None


@dataclass
class _Window:
    """One interval of :class:`RefusalLog`'s lines of a kind: when it started, the lines it let out, and the
    refusals held back since the last line, by reason."""

    start: float
    lines: int = 0
    held: dict[str, int] = field(default_factory=dict)


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else "?"
