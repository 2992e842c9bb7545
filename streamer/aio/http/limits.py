"""What one connection may cost the daemon: its unsent outgoing data, how long it may not read, descriptors.

websockets answers each ping with a pong written straight to the transport: ``write_limit`` only
makes :meth:`~websockets.asyncio.connection.Connection.send` wait, pongs never wait. A client that
floods pings and never reads made the daemon buffer pongs without bound (+18-28 MB/s), and its
keepalive ping waited behind them in ``drain()``, so the keepalive never closed it.
:class:`BoundedConnection` closes such a client: when its unsent data passes
``server.max_unsent_bytes``, or when it has taken none of the data waiting for it for
``server.ping_timeout_s``.

Every connection holds a file descriptor: :func:`check_descriptors` makes sure that
``server.max_streams + server.max_viewers`` fit under ``RLIMIT_NOFILE`` with headroom, and
:class:`AcceptErrorFilter` keeps asyncio from logging every failed ``accept()`` when they do not
(~2,600 tracebacks a second, 12 MB of log in 10 s, with the descriptors used up).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
import weakref
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from streamer.config import ServerConfig
from streamer.events import CLOSE_POLICY

__all__ = ["AcceptErrorFilter", "BoundedConnection", "HttpRefusalLog", "check_descriptors", "descriptors_needed",
           "install_accept_error_filter"]

logger = logging.getLogger("streamer.server")


class BoundedConnection(ServerConnection):
    """A server connection whose outgoing data is bounded; :meth:`apply_limits` sets the bounds."""

    max_unsent = 1 << 20
    """unsent outgoing bytes beyond which the client is closed (``server.max_unsent_bytes``)"""

    _stalled: asyncio.TimerHandle | None = None

    def apply_limits(self, cfg: ServerConfig) -> None:
        """The keepalive, write buffer and unsent-data bounds of ``cfg`` (before the handshake ends)."""
        self.ping_interval = cfg.ping_interval_s or None
        self.ping_timeout = cfg.ping_timeout_s or None
        self.max_unsent = cfg.max_unsent_bytes
        self.write_limit_high, self.write_limit_low = cfg.write_limit_bytes, None
        self.transport.set_write_buffer_limits(cfg.write_limit_bytes)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # answers pings: pongs go to the transport, whatever the client reads
        unsent = self.transport.get_write_buffer_size()
        if unsent > self.max_unsent:
            self._drop(f"{unsent} bytes wait to be sent to it, more than server.max_unsent_bytes = {self.max_unsent}")

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
"""descriptors besides the admitted connections: listeners, model and log files, MQTT, the worker's and
torch's threads, and connections still in their handshake or being refused"""


def descriptors_needed(cfg: ServerConfig) -> int:
    """Descriptors the daemon may need at its limits: one per stream and viewer, plus :data:`FD_HEADROOM`."""
    return cfg.max_streams + cfg.max_viewers + FD_HEADROOM


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
                    "server.max_viewers = %d connections need %d", soft, target, need - FD_HEADROOM, need)
        soft = target
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    logger.warning("the open-file limit is %d (RLIMIT_NOFILE, hard %d), but server.max_streams + server.max_viewers "
                   "= %d connections need about %d descriptors: new connections will fail before those limits; "
                   "raise LimitNOFILE= in the unit (or ulimit -n), or lower max_streams or max_viewers",
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


class HttpRefusalLog(logging.Filter):
    """At most one line per refused HTTP request, and at most :attr:`burst` of them per ``interval_s`` per server.

    A refused request wrote two or three lines (the daemon's reason, websockets' ``HTTP response sent (403
    Forbidden)``, ``connection closed``): a page or a script that repeats a refused request wrote 2.6-3 MB of
    log in 10 s. Installed on the ``websockets.server`` and ``streamer.server`` loggers (:meth:`install`): a
    refusal the daemon explains (:meth:`refused`) is its one line; websockets' ``HTTP response sent`` line of a
    4xx or 5xx is the one line of a refusal the daemon did not explain; a refused connection's ``connection
    closed`` is dropped. Beyond :attr:`burst` lines in ``interval_s``, lines are counted instead, and the next
    line that goes out says how many were held back.
    """

    burst = 20

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._refused: set[object] = set()  # connection ids whose remaining websockets lines are dropped
        self._explained: set[object] = set()  # of those, the ones whose refusal the daemon logged itself
        self._window: weakref.WeakKeyDictionary[object, tuple[float, int, int]] = weakref.WeakKeyDictionary()

    @classmethod
    def install(cls) -> HttpRefusalLog:
        """The filter on the ``websockets.server`` logger (added once per process)."""
        log = logging.getLogger("websockets.server")
        for f in log.filters:
            if isinstance(f, cls):
                return f
        f = cls()
        log.addFilter(f)
        return f

    def _allowed(self, server: object) -> tuple[bool, int]:
        """Whether a line may go out for ``server`` now, and how many were held back before it."""
        now = time.monotonic()
        start, lines, held = self._window.get(server, (now, 0, 0))
        if now - start >= self.interval_s:
            start, lines = now, 0
        if lines >= self.burst:
            self._window[server] = (start, lines, held + 1)
            return False, 0
        self._window[server] = (start, lines + 1, 0)
        return True, held

    def refused(self, conn: ServerConnection, status: int, message: str, *args: object) -> None:
        """``conn`` was answered ``status`` (a refusal): log ``message % args`` as its one line, unless too many
        went out lately."""
        self._refused.add(conn.id)
        self._explained.add(conn.id)
        ok, held = self._allowed(conn.server)
        if ok:
            logger.info(message + (f" ({held} more refusals held back)" if held else ""), *args)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(("HTTP response sent (", "connection closed")):
            return True
        ws: Any = record.__dict__.get("websocket")  # websockets' connection adapter adds it (a weak proxy)
        try:
            key, server = ws.id, ws.server
        except (AttributeError, ReferenceError):
            return True
        if message == "connection closed":
            if key in self._refused:
                self._refused.discard(key)
                self._explained.discard(key)
                return False
            return True
        if message[20:21] not in ("4", "5"):
            return True
        self._refused.add(key)
        if key in self._explained:
            return False
        ok, held = self._allowed(server)
        if ok and held:
            record.msg, record.args = f"{message} ({held} more refusals held back)", None
        return ok
