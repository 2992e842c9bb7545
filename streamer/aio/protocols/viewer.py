"""Viewers at ``/v1/listen/NAME``: the events of stream or source NAME, as they are published."""

from __future__ import annotations

import asyncio

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.aio.host import StreamHost
from streamer.aio.http.front import STREAM_PATH
from streamer.aio.protocols.base import RefusalLog, send_error
from streamer.events import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TRY_AGAIN, Error, ViewerReady, to_json

__all__ = ["serve_viewer"]

LIVE_CHECK_S = 5.0
"""how often a waiting viewer looks whether its name is live (a name that is not is closed after the idle timeout)"""


async def serve_viewer(host: StreamHost, ws: ServerConnection, name: str) -> None:
    """Admit a viewer of ``name`` (or refuse it: over ``server.max_viewers``, 1013), then serve it."""
    log = RefusalLog.install()
    async with host.admission("viewer", "viewer") as refused:
        if refused is not None:
            log.refused(ws, refused)
            await send_error(ws, refused)
            return
        log.admitted(ws)
        await _serve(host, ws, name)


async def _serve(host: StreamHost, ws: ServerConnection, name: str) -> None:
    """Send ``ready`` and then the events of ``name`` until the viewer leaves or the host's viewers stop.

    When they stop (the daemon shuts down, after its streams sent their last finals) the queued events
    are sent and the viewer closed with 1001. A viewer that sends anything is closed with 1008; one
    that falls so far behind that finals would be lost is closed with 1013. One whose name has not been
    live for ``server.idle_timeout_s`` (no stream or source of this process has it, and no event of it
    came from another process) is closed with 1000, so viewers of names that never exist cannot keep
    every viewer slot.
    """
    loop = asyncio.get_running_loop()
    queue = host.subscribe(name)
    stopped = asyncio.ensure_future(host.viewers_stop.wait())
    incoming = asyncio.ensure_future(ws.recv())
    live_at = loop.time()  # when the name was last seen live
    try:
        await ws.send(to_json(ViewerReady(name, host.server_pid, host.cfg.model.language)))
        while True:
            event = queue.get_nowait()
            if event is not None:
                live_at = loop.time()
                await ws.send(to_json(event))
                continue
            if queue.overflowed:
                await send_error(ws, Error("viewer_too_slow", f"this viewer fell more than {queue.size} events "
                                           f"behind stream {name!r}; reconnect", CLOSE_TRY_AGAIN))
                return
            if host.name_live(name):
                live_at = loop.time()
            idle_s = host.cfg.server.idle_timeout_s
            left = live_at + idle_s - loop.time()
            if left <= 0:
                await send_error(ws, Error("viewer_idle", f"no stream or source named {name!r} has been live for "
                                           f"{idle_s:g} s; reconnect when it is", CLOSE_NORMAL))
                return
            get = asyncio.ensure_future(queue.wait())
            done, _ = await asyncio.wait({get, stopped, incoming}, timeout=min(left, LIVE_CHECK_S),
                                         return_when=asyncio.FIRST_COMPLETED)
            if get in done or not done:
                get.cancel()
                continue
            get.cancel()
            if stopped in done:
                while (event := queue.get_nowait()) is not None:  # the last finals of streams that ended
                    await ws.send(to_json(event))
                await ws.close(CLOSE_GOING_AWAY, "server shutting down")
                return
            incoming.result()  # raises ConnectionClosed when the viewer left
            await send_error(ws, Error("viewer_sent_data", f"viewers send nothing; stream audio to {STREAM_PATH}",
                                       CLOSE_POLICY))
            return
    except ConnectionClosed:
        pass
    finally:
        stopped.cancel()
        incoming.cancel()
        if incoming.done() and not incoming.cancelled():
            incoming.exception()  # retrieved: the viewer's own disconnect
        host.unsubscribe(name, queue)
