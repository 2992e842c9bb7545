"""Fan-out of events by stream name: websocket viewers and sinks (MQTT) subscribe here."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Protocol

from streamer.events import Event, Final

logger = logging.getLogger("streamer.hub")


class EventSink(Protocol):
    """Receives every event of every stream; must not block (queue and return)."""

    def publish(self, stream: str, session: str, event: Event) -> None: ...

    def wants_partials(self, stream: str) -> bool:
        """Whether the sink takes the partials of ``stream`` now (a stream whose partials nobody takes forms none)."""
        ...


class ViewerQueue:
    """The events waiting for one viewer, at most ``size``.

    A viewer that falls behind loses partials (a later one replaces them anyway), never finals:
    when the queue is full, a queued partial makes room; when only finals are queued, the queue
    :attr:`overflowed` and the viewer must be closed (it can no longer show the whole transcript).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()
        self.overflowed = False
        self.dropped_partials = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: Event) -> None:
        if self.overflowed:
            return
        if len(self._items) >= self.size:
            if not isinstance(event, Final):
                self.dropped_partials += 1
                return
            for i, queued in enumerate(self._items):
                if not isinstance(queued, Final):
                    del self._items[i]
                    self.dropped_partials += 1
                    break
            else:
                self.overflowed = True
                self._ready.set()  # wake the viewer so that it closes
                return
        self._items.append(event)
        self._ready.set()

    def get_nowait(self) -> Event | None:
        """The oldest queued event, or None."""
        if not self._items:
            self._ready.clear()
            return None
        return self._items.popleft()

    async def wait(self) -> None:
        """Return once an event is queued (or the queue overflowed)."""
        while not self._items and not self.overflowed:
            self._ready.clear()
            await self._ready.wait()


class Hub:
    """Delivers ``(stream name, session id, event)`` to sinks and to per-name viewer queues."""

    def __init__(self, viewer_queue: int = 256) -> None:
        self.sinks: list[EventSink] = []
        self._viewers: dict[str, set[ViewerQueue]] = defaultdict(set)
        self._viewer_queue = viewer_queue
        self.on_watch: Callable[[str, bool], None] | None = None
        """called when a name gets its first viewer here (True) or loses its last (False); a front-end process
        of several tells its supervisor, which relays other processes' events of that name (``deliver``)"""

    def publish(self, stream: str, session: str, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink.publish(stream, session, event)
            except Exception:
                logger.exception("event sink %r failed", sink)
        self.deliver(stream, session, event)

    def wants_partials(self, stream: str) -> bool:
        """Whether anyone here takes the partials of ``stream``: a viewer of its name, or a sink (MQTT with
        ``publish_partials``, viewers in other front-end processes). A stream whose own client shows none forms
        none while this is false (:attr:`streamer.aio.stream.LiveStream.wants_partials`)."""
        return stream in self._viewers or any(sink.wants_partials(stream) for sink in self.sinks)

    def deliver(self, stream: str, session: str, event: Event) -> None:
        """Hand an event to the viewers of ``stream`` only (the sinks had it where it was published)."""
        for q in self._viewers.get(stream, ()):
            q.put(event)

    def subscribe(self, stream: str) -> ViewerQueue:
        q = ViewerQueue(self._viewer_queue)
        first = stream not in self._viewers
        self._viewers[stream].add(q)
        if first and self.on_watch is not None:
            self.on_watch(stream, True)
        return q

    def unsubscribe(self, stream: str, q: ViewerQueue) -> None:
        self._viewers[stream].discard(q)
        if not self._viewers[stream]:
            del self._viewers[stream]
            if self.on_watch is not None:
                self.on_watch(stream, False)
