"""The MQTT outbox: what waits to be published, without any I/O.

:class:`Outbox` holds the messages of an MQTT publisher from the moment an event arrives until
the broker acknowledged them: a bounded queue with its drop policy, and the window of messages
in flight. It never touches a socket, a clock or an event loop, so every rule of delivery can be
tested as plain code (``tests/test_outbox.py``). The same split as websockets' sans-I/O
``protocol.py`` under its ``asyncio/`` layer: :mod:`streamer.aio.mqtt` owns the aiomqtt client,
the reconnect loop, the metrics and the log, and drives the outbox like this::

    drop = outbox.put(message)          # for every event, connected or not; never blocks
    for message in outbox.take():       # while connected: at most `window` in flight
        ...send it...
    outbox.ack(message)                 # the broker acknowledged it (QoS 0: it was written)
    drop = outbox.fail(message, why)    # it can never be sent (a bad topic): dropped, not retried
    drops = outbox.requeue()            # the connection broke: in flight goes back to the front,
                                        # except what broke it too often (a message the broker refuses)
    drops = outbox.clear(why)           # giving up at shutdown: everything left is dropped

Each :class:`Drop` returned is the caller's to count and log; :attr:`Outbox.dropped` keeps the
totals by kind.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

__all__ = ["BREAKS_TO_DROP", "PARTIAL", "QUEUE_FULL", "WINDOW", "Drop", "Message", "Outbox"]

PARTIAL = "partial"
"""The kind of message that the drop policy sacrifices first: a later partial or the final replaces it."""
QUEUE_FULL = "the queue is full"
"""The reason of a :class:`Drop` made by :meth:`Outbox.put`."""
WINDOW = 8
"""Messages in flight at once: pipelining hides the broker's round trip behind QoS 1 acks."""
BREAKS_TO_DROP = 3
"""A message in flight each of this many times the connection broke is dropped: the broker refuses it.

mosquitto, for one, closes the connection on a topic with a control character or a packet over its
``max_packet_size``; sent again after every reconnect, such a message would block everything queued behind it.
After the first break the suspects are sent one at a time, so an innocent message is acknowledged alone and
only the one that breaks the connection by itself reaches the count."""


@dataclass(frozen=True, slots=True, eq=False)
class Message:
    """One MQTT message to publish.

    Compared by identity (``eq=False``): two partials can carry the same bytes, and
    :meth:`Outbox.ack` must remove the one that was sent, not an equal one.
    """

    kind: str
    """partial, final or hermes (the ``kind`` label of the metrics)"""
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Drop:
    """A message that will never be published, and why (lowercase, for the log)."""

    message: Message
    reason: str


class Outbox:
    """Messages waiting for the broker: at most ``size`` queued, at most ``window`` in flight.

    Order is kept: :meth:`take` hands out the oldest queued messages first, and :meth:`requeue`
    puts those not acknowledged back in front of everything queued after them. When the queue
    is full, :meth:`put` makes room by dropping, in this order: the incoming message if it is a
    partial; else the oldest queued partial; else the oldest queued message. Messages in flight
    do not count against ``size`` and are never dropped to make room.

    A message that was in flight when the connection broke is a suspect: :meth:`take` sends it alone
    (nothing else in flight), and :meth:`requeue` drops it once it was in flight at ``breaks_to_drop``
    breaks, so a message the broker refuses cannot hold back the others for long.
    """

    def __init__(self, size: int, window: int = WINDOW, breaks_to_drop: int = BREAKS_TO_DROP) -> None:
        if size < 1 or window < 1 or breaks_to_drop < 1:
            raise ValueError(f"outbox size, window and breaks_to_drop must be at least 1, got {size}, {window} "
                             f"and {breaks_to_drop}")
        self.size = size
        self.window = window
        self.breaks_to_drop = breaks_to_drop
        self.dropped: Counter[str] = Counter()
        """Messages dropped since the outbox was made, by kind."""
        self._queue: deque[Message] = deque()
        self._partials = 0  # partials in _queue, so that an overflow finds one without a scan
        self._in_flight: list[Message] = []  # oldest first
        self._breaks: dict[Message, int] = {}  # suspects: how many broken connections each was in flight for

    @property
    def queued(self) -> int:
        """Messages waiting to be taken."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Messages taken and neither acknowledged nor failed yet."""
        return len(self._in_flight)

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged: queued plus in flight."""
        return len(self._queue) + len(self._in_flight)

    @property
    def partials(self) -> int:
        """Partials among the queued messages."""
        return self._partials

    @property
    def sending(self) -> tuple[Message, ...]:
        """The messages in flight, oldest first: acknowledge the first one before reporting later ones."""
        return tuple(self._in_flight)

    @property
    def waiting(self) -> tuple[Message, ...]:
        """The queued messages in the order :meth:`take` will hand them out."""
        return tuple(self._queue)

    def put(self, msg: Message) -> Drop | None:
        """Queue ``msg``; when the queue is full, return the message dropped to make room (maybe ``msg``).

        The caller counts and logs the drop, and wakes its sender when something was queued.
        """
        drop: Drop | None = None
        if len(self._queue) >= self.size:
            if msg.kind == PARTIAL:
                return self._dropped(msg, QUEUE_FULL)
            if self._partials:
                for i, queued in enumerate(self._queue):
                    if queued.kind == PARTIAL:
                        del self._queue[i]
                        self._partials -= 1
                        drop = self._dropped(queued, QUEUE_FULL)
                        break
            else:
                drop = self._dropped(self._pop(), QUEUE_FULL)
        self._queue.append(msg)
        self._partials += msg.kind == PARTIAL
        return drop

    @property
    def suspects(self) -> int:
        """Messages not acknowledged that were in flight when the connection broke."""
        return len(self._breaks)

    def take(self) -> list[Message]:
        """Move the oldest queued messages into flight, as many as the window has room for, and return them.

        A suspect goes alone: it waits until nothing else is in flight, and nothing follows it until it is
        acknowledged. Send each, in order; then :meth:`ack` or :meth:`fail` each one, or :meth:`requeue`
        them all when the connection breaks.
        """
        out: list[Message] = []
        while self._queue and len(self._in_flight) < self.window:
            if self._in_flight and (self._queue[0] in self._breaks or self._in_flight[-1] in self._breaks):
                break
            msg = self._pop()
            self._in_flight.append(msg)
            out.append(msg)
        return out

    def ack(self, msg: Message) -> None:
        """The broker acknowledged ``msg`` (QoS 1 and 2) or it was written (QoS 0): it is done."""
        self._remove_in_flight(msg)
        self._breaks.pop(msg, None)

    def fail(self, msg: Message, reason: str) -> Drop:
        """Publishing ``msg`` failed in a way that a retry would repeat (a bad topic): drop it."""
        self._remove_in_flight(msg)
        return self._dropped(msg, reason)

    def requeue(self) -> list[Drop]:
        """After a broken connection: put every message in flight back at the front of the queue, in order.

        Acknowledge first what the broker did acknowledge. Each message put back is a suspect; one that was
        in flight at ``breaks_to_drop`` breaks is dropped instead, and returned. The queue may then hold up
        to ``size + window`` messages; it shrinks back as they are sent.
        """
        back: list[Message] = []
        drops: list[Drop] = []
        for msg in self._in_flight:
            breaks = self._breaks[msg] = self._breaks.get(msg, 0) + 1
            if breaks >= self.breaks_to_drop:
                drops.append(self._dropped(msg, f"the broker closed the connection each of the {breaks} times it "
                                                "was sent (a topic or a size it refuses?)"))
            else:
                back.append(msg)
        self._in_flight = []
        self._queue.extendleft(reversed(back))
        self._partials += sum(m.kind == PARTIAL for m in back)
        return drops

    def clear(self, reason: str) -> list[Drop]:
        """Drop every message, those in flight first, then the queued ones, in order (giving up at shutdown)."""
        self._queue.extendleft(reversed(self._in_flight))  # not a broken connection: nothing is a suspect for it
        self._in_flight = []
        drops = [self._dropped(msg, reason) for msg in self._queue]
        self._queue.clear()
        self._partials = 0
        return drops

    def _pop(self) -> Message:
        msg = self._queue.popleft()
        self._partials -= msg.kind == PARTIAL
        return msg

    def _remove_in_flight(self, msg: Message) -> None:
        try:
            self._in_flight.remove(msg)  # by identity: Message has eq=False
        except ValueError:
            raise ValueError(f"{msg.kind} message to {msg.topic} is not in flight") from None

    def _dropped(self, msg: Message, reason: str) -> Drop:
        self.dropped[msg.kind] += 1
        self._breaks.pop(msg, None)
        return Drop(msg, reason)
