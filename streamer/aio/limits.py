"""What one connection may cost the daemon: its unsent outgoing data, and how long it may not read.

websockets answers each ping with a pong written straight to the transport: ``write_limit`` only
makes :meth:`~websockets.asyncio.connection.Connection.send` wait, pongs never wait. A client that
floods pings and never reads made the daemon buffer pongs without bound (+18-28 MB/s), and its
keepalive ping waited behind them in ``drain()``, so the keepalive never closed it.
:class:`BoundedConnection` closes such a client: when its unsent data passes
``server.max_unsent_bytes``, or when it has taken none of the data waiting for it for
``server.ping_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from streamer.config import ServerConfig
from streamer.events import CLOSE_POLICY

__all__ = ["BoundedConnection"]

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
