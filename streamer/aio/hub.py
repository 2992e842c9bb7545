"""Fan-out of events by stream name: websocket viewers and sinks (MQTT) subscribe here."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any, Protocol

logger = logging.getLogger("streamer.hub")


class EventSink(Protocol):
    """Receives every event of every stream; must not block (queue and return)."""

    def publish(self, stream: str, session: str, event: dict[str, Any]) -> None: ...


class Hub:
    """Delivers ``(stream name, event dict)`` to sinks and to per-name viewer queues."""

    def __init__(self, viewer_queue: int = 256) -> None:
        self.sinks: list[EventSink] = []
        self._viewers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._viewer_queue = viewer_queue

    def publish(self, stream: str, session: str, event: dict[str, Any]) -> None:
        for sink in self.sinks:
            try:
                sink.publish(stream, session, event)
            except Exception:
                logger.exception("event sink %r failed", sink)
        for q in self._viewers.get(stream, ()):
            if q.full():
                if event.get("type") == "partial":
                    continue  # a slow viewer loses partials, never finals
                q.get_nowait()
            q.put_nowait(event)

    def subscribe(self, stream: str) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self._viewer_queue)
        self._viewers[stream].add(q)
        return q

    def unsubscribe(self, stream: str, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._viewers[stream].discard(q)
        if not self._viewers[stream]:
            del self._viewers[stream]
