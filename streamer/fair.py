"""Fair scheduling of work items across streams, as a pure object (no asyncio, no clock).

The batching worker keeps one :class:`FairQueue` of windows: each stream has its own FIFO, and
:meth:`FairQueue.take` fills a batch round-robin, at most ``per_key`` items of one stream per
batch, starting after the stream served first last time. A stream that sends a minute of audio
at once therefore shares every batch with the real-time streams instead of going before them,
and the windows of a stream that left are dropped with :meth:`FairQueue.drop` before they run.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["AudioBudget", "FairQueue", "LoadMeter"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class FairQueue(Generic[K, T]):
    """Per-key FIFOs served round-robin."""

    def __init__(self) -> None:
        self._queues: OrderedDict[K, deque[T]] = OrderedDict()  # in round-robin order
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: object) -> bool:
        return key in self._queues

    def put(self, key: K, item: T) -> None:
        """Queue ``item`` behind the other items of ``key``; a new key joins at the end of the round."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
        q.append(item)
        self._len += 1

    def take(self, limit: int, per_key: int) -> list[tuple[K, T]]:
        """Up to ``limit`` items, at most ``per_key`` of each key, in round-robin order.

        Keys are visited in turn, one item at a time, so that a batch smaller than the number of
        waiting streams is spread over as many streams as possible; the next call starts with the
        key after the last one served.
        """
        out: list[tuple[K, T]] = []
        taken: dict[K, int] = {}
        while len(out) < limit and self._queues:
            progressed = False
            for key in list(self._queues):
                if len(out) >= limit:
                    break
                if taken.get(key, 0) >= per_key:
                    continue
                q = self._queues[key]
                out.append((key, q.popleft()))
                self._len -= 1
                taken[key] = taken.get(key, 0) + 1
                progressed = True
                if q:
                    self._queues.move_to_end(key)  # served: go to the back of the round
                else:
                    del self._queues[key]
            if not progressed:
                break
        return out

    def drop(self, key: K) -> list[T]:
        """Remove and return every item of ``key`` (a stream that left)."""
        q = self._queues.pop(key, None)
        if q is None:
            return []
        self._len -= len(q)
        return list(q)

    def pending(self, key: K) -> int:
        """Items of ``key`` waiting."""
        q = self._queues.get(key)
        return len(q) if q is not None else 0

    def peek(self, key: K) -> T | None:
        """The oldest item of ``key``, or None."""
        q = self._queues.get(key)
        return q[0] if q else None

    def keys(self) -> list[K]:
        return list(self._queues)


class AudioBudget:
    """How fast one stream may send audio: a token bucket in audio seconds (pure; the caller keeps time).

    A stream may run ``burst_s`` seconds ahead of real time at once (a client that uploads a file, or
    catches up after a network hiccup), and beyond that at most ``speed`` times real time. The
    asyncio layer asks :meth:`take` before feeding audio and waits the seconds it returns without
    reading from the client, so a client that sends faster is slowed down by TCP backpressure
    instead of costing memory or more than its share of the model. ``speed = 0`` turns it off.
    """

    def __init__(self, speed: float, burst_s: float, now: float) -> None:
        self.speed = speed
        self.burst_s = burst_s
        self._tokens = burst_s
        self._at = now

    def take(self, seconds: float, now: float) -> float:
        """Spend ``seconds`` of audio at time ``now``; return how long to wait before feeding it (0: at once)."""
        if self.speed <= 0:
            return 0.0
        self._tokens = min(self.burst_s, self._tokens + (now - self._at) * self.speed)
        self._at = now
        self._tokens -= seconds
        return max(0.0, -self._tokens / self.speed)


class LoadMeter:
    """The share of the last ``horizon`` seconds a resource was busy (pure; the caller keeps time).

    The worker adds the model time of each batch's mandatory windows when the batch ends; :meth:`load` is
    that time within the horizon divided by the horizon (above 1 when calls overlap, as several batches
    on a model server do).
    """

    def __init__(self, horizon: float = 2.0) -> None:
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.horizon = horizon
        self._spans: deque[tuple[float, float]] = deque()  # (end time, busy seconds) per addition
        self._busy = 0.0

    def add(self, now: float, seconds: float) -> None:
        """``seconds`` of work that ended at ``now``."""
        if seconds > 0:
            self._spans.append((now, seconds))
            self._busy += seconds

    def load(self, now: float) -> float:
        """Busy share of the ``horizon`` seconds before ``now``."""
        start = now - self.horizon
        spans = self._spans
        while spans and spans[0][0] <= start:
            self._busy -= spans.popleft()[1]
        if not spans:
            self._busy = 0.0  # no float drift once everything left the horizon
            return 0.0
        # work that began before the horizon counts only for its part inside it
        end, seconds = spans[0]
        outside = max(0.0, seconds - (end - start))
        return max(0.0, self._busy - outside) / self.horizon
