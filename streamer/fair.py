"""Fair scheduling of work items across streams, as pure objects (no asyncio, no clock).

The batching worker keeps one :class:`FairQueue` of windows: each stream has its own FIFO, and
:meth:`FairQueue.take` fills a batch earliest deadline first, at most ``per_key`` items of one stream per
batch. A window's deadline is when its audio would have arrived had the client sent it at real time
(:class:`Pace`): a real-time stream's windows are due as they come, while a client that sends a minute of
audio at once has windows due up to a minute later, so they wait behind every real-time window, however
many there are, and run on the model time the real-time streams leave. Work on audio that came well ahead of
real time has no deadline at all (:func:`deadline`): it stays spare-time work even once the clock has caught
up with it, so that a server too slow for every client's audio at 1x delays the clients that sent ahead, not
the real-time streams. Items due at the same time are served round-robin, starting after the stream served
first last time. The windows of a stream that left are dropped with :meth:`FairQueue.drop` before they run.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["AudioBudget", "FairQueue", "LoadMeter", "Pace", "deadline"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def deadline(due: float, received: float, slack: float) -> float:
    """The deadline of work on audio due at ``due`` (:meth:`Pace.due`) that came at ``received``: ``due``, or
    ``math.inf`` (spare time only) when it came more than ``slack`` seconds ahead of real time.

    Without this, a burst's windows would come due one by one as the clock reached their audio, and on a
    server that cannot run every client's audio at 1x they would be older than a real-time stream's
    windows, so earliest deadline first would serve them first: the clients that sent ahead would share
    their delay with the real-time streams. ``slack`` lets a real-time client send its audio in messages of
    up to that length.
    """
    return due if due - received <= slack else math.inf


class FairQueue(Generic[K, T]):
    """Per-key FIFOs, served earliest deadline first, round-robin among equal deadlines."""

    def __init__(self) -> None:
        self._queues: OrderedDict[K, deque[tuple[float, T]]] = OrderedDict()  # in round-robin order
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: object) -> bool:
        return key in self._queues

    def put(self, key: K, item: T, due: float = 0.0) -> None:
        """Queue ``item`` behind the other items of ``key``, due at ``due`` (never before the item ahead of it:
        a key's items keep their order); a new key joins at the end of the round."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
        elif q[-1][0] > due:
            due = q[-1][0]
        q.append((due, item))
        self._len += 1

    def take(self, limit: int, per_key: int, due_by: float = math.inf,
             where: Callable[[T], bool] | None = None) -> list[tuple[K, T]]:
        """Up to ``limit`` items due by ``due_by``, at most ``per_key`` of each key, earliest deadline first.

        Among items due at the same time keys are visited in turn, one item at a time, so that a batch
        smaller than the number of waiting streams is spread over as many streams as possible; the next
        call starts with the key after the last one served. ``where``: only keys whose oldest item it accepts
        (a key's items keep their order: one behind a refused item waits with it).
        """
        out: list[tuple[K, T]] = []
        taken: dict[K, int] = {}
        while len(out) < limit:
            best: K | None = None
            best_due = due_by
            for key, q in self._queues.items():  # the first key in the round wins a tie
                if (q[0][0] <= best_due and (best is None or q[0][0] < best_due) and taken.get(key, 0) < per_key
                        and (where is None or where(q[0][1]))):
                    best, best_due = key, q[0][0]
            if best is None:
                break
            q = self._queues[best]
            out.append((best, q.popleft()[1]))
            self._len -= 1
            taken[best] = taken.get(best, 0) + 1
            if q:
                self._queues.move_to_end(best)  # served: go to the back of the round
            else:
                del self._queues[best]
        return out

    def drop(self, key: K) -> list[T]:
        """Remove and return every item of ``key`` (a stream that left)."""
        q = self._queues.pop(key, None)
        if q is None:
            return []
        self._len -= len(q)
        return [item for _, item in q]

    def pending(self, key: K) -> int:
        """Items of ``key`` waiting."""
        q = self._queues.get(key)
        return len(q) if q is not None else 0

    def peek(self, key: K) -> T | None:
        """The oldest item of ``key``, or None."""
        q = self._queues.get(key)
        return q[0][1] if q else None

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


class Pace:
    """A client's audio against the clock (pure; the caller keeps time): how fast it may send, and when it is due.

    One per client, not per stream: a client that ends its stream and starts another (a Realtime
    ``clear``, a second Wyoming transcript) keeps its budget and its place. :meth:`due` keeps a clock,
    when the audio received so far would all have arrived had it come at real time: audio that comes
    on time is due as it comes; audio sent ahead of real time is due later, by as much as it is ahead;
    a pause earns no credit (audio after it is due from when it came, not from when the pause began).
    """

    def __init__(self, speed: float, burst_s: float, now: float) -> None:
        self.budget = AudioBudget(speed, burst_s, now)
        """how fast the client may send (``speed = 0``: no limit)"""
        self.clock: float | None = None
        """when the audio received so far would have all arrived at real time (None: no audio yet)"""
        self.ahead = False
        """the client sends ahead of real time, and was waited for by nothing since: each message since it was
        seen ahead was already there when read (kept by the caller, who sees how messages come)"""

    def take(self, seconds: float, now: float) -> float:
        """:meth:`AudioBudget.take`: how long to wait before feeding ``seconds`` of audio that came at ``now``."""
        return self.budget.take(seconds, now)

    def due(self, seconds: float, now: float) -> float:
        """``seconds`` of audio came at ``now``: when its first sample is due (its sample at ``t`` seconds is due
        ``t`` seconds later)."""
        start = now if self.clock is None else max(self.clock, now)
        self.clock = start + seconds
        return start

    def end(self, now: float) -> float:
        """When the last audio received is due (``now`` before any audio)."""
        return now if self.clock is None else self.clock


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
