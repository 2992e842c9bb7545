"""The event loop the daemon runs on: uvloop's where it is installed (``server.loop = "auto"``, the default), else
asyncio's.

uvloop (libuv under asyncio's API) runs the same code for less CPU per message: the websocket reads and writes,
the wake-ups from the engine thread and the model server's gRPC answers. Two daemons side by side on one core
(``deploy/side_by_side.sh``, ``docs/scaling.md``), greedy decoding, 32 live streams each: 0.957-0.990 of the CPU
on uvloop in six repetitions over two days, its event loop 4-10 % less, the finals as soon and the same. uvicorn
picks its loop the same way (``--loop auto``). uvloop is not made for Windows; there (or with ``server.loop =
"asyncio"``) the standard loop runs.

libuv reads a readable socket up to 32 times over before it runs anything else, where asyncio's loop reads each
ready socket once a turn: what a connection is not paused for has to be read a turn at a time, or one client's
flood delays everyone's events (an upload's body, ``HttpConnection._one_read_a_turn``: eight refused 24 MiB bodies
at once had the healthy streams at a lag p95 of 3.1 s on uvloop before it, 0.7 s after). websockets pauses reading
a connection whose messages wait, and asyncio's streams theirs, whichever the loop.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from streamer.exceptions import ConfigError

__all__ = ["loop_factory", "loop_name", "run"]

T = TypeVar("T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the event loop ``server.loop = choice`` names (None: asyncio's own); ConfigError when ``uvloop``
    is asked for and not installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "auto":  # (not installed, or not usable here: the standard loop)
            return None
        raise ConfigError(f"server.loop = 'uvloop' needs the uvloop package ({exc}): pip install uvloop, or set "
                          "server.loop = 'auto' (uvloop when installed, else asyncio's loop)") from None
    new: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """``asyncio.run(main)`` on the loop ``server.loop = choice`` names (:func:`loop_factory`)."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.21.0`` or ``asyncio``: what the daemon's log says it runs on."""
    if type(loop).__module__.partition(".")[0] == "uvloop":
        return f"uvloop {importlib.metadata.version('uvloop')}"
    return "asyncio"
