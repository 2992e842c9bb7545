"""The MQTT outbox as plain code: drop policy, in-flight window, requeue order, acks, failures, suspects, counts.

No broker and no event loop: :class:`streamer.outbox.Outbox` does no I/O. ``tests/test_mqtt.py``
checks the same rules end to end against mosquitto.
"""

from __future__ import annotations

import random

import pytest

from streamer.outbox import BREAKS_TO_DROP, QUEUE_FULL, WINDOW, Drop, Message, Outbox


def msg(name: str) -> Message:
    """A message named like ``p3`` (partial 3), ``f0`` (final 0) or ``h1`` (hermes 1); the payload is the name."""
    kind = {"p": "partial", "f": "final", "h": "hermes"}[name[0]]
    return Message(kind, f"s/{kind}", name.encode(), 0 if kind == "partial" else 1, False)


def names(messages: tuple[Message, ...] | list[Message]) -> list[str]:
    return [m.payload.decode() for m in messages]


def dropped(drop: Drop | None) -> str | None:
    return None if drop is None else drop.message.payload.decode()


def filled(size: int, *items: str, window: int = WINDOW, breaks_to_drop: int = BREAKS_TO_DROP) -> Outbox:
    outbox = Outbox(size, window, breaks_to_drop)
    for name in items:
        assert outbox.put(msg(name)) is None
    return outbox


def recount(outbox: Outbox) -> int:
    return sum(m.kind == "partial" for m in outbox.waiting)


# --- the drop policy ------------------------------------------------------------------------


def test_no_drop_below_size():
    outbox = filled(3, "p0", "f0", "h0")
    assert names(outbox.waiting) == ["p0", "f0", "h0"]
    assert (outbox.queued, outbox.in_flight, outbox.pending, outbox.partials) == (3, 0, 3, 1)
    assert not outbox.dropped


def test_full_drops_an_incoming_partial_even_when_partials_are_queued():
    outbox = filled(3, "p0", "f0", "p1")
    drop = outbox.put(msg("p2"))
    assert drop is not None and dropped(drop) == "p2" and drop.reason == QUEUE_FULL
    assert names(outbox.waiting) == ["p0", "f0", "p1"]
    assert outbox.partials == 2 and outbox.dropped == {"partial": 1}


def test_full_drops_the_oldest_queued_partial_for_a_final():
    outbox = filled(4, "f0", "p1", "f1", "p2")
    assert dropped(outbox.put(msg("f2"))) == "p1"
    assert names(outbox.waiting) == ["f0", "f1", "p2", "f2"]
    assert outbox.partials == 1
    assert dropped(outbox.put(msg("h2"))) == "p2"  # a hermes message is no partial: it makes room too
    assert names(outbox.waiting) == ["f0", "f1", "f2", "h2"]
    assert outbox.partials == 0 and outbox.dropped == {"partial": 2}


def test_full_of_finals_drops_the_oldest_message_whatever_its_kind():
    outbox = filled(3, "h0", "f0", "f1")
    assert dropped(outbox.put(msg("f2"))) == "h0"
    assert dropped(outbox.put(msg("h1"))) == "f0"
    assert names(outbox.waiting) == ["f1", "f2", "h1"]
    assert outbox.dropped == {"hermes": 1, "final": 1}


def test_overflow_sequence_of_the_broker_test():
    """The sequence of test_mqtt's overflow test, drop by drop."""
    outbox = Outbox(4)
    drops = [dropped(outbox.put(msg(n))) for n in ["p0", "f0", "p1", "f1", "f2", "p2", "f3", "f4"]]
    assert drops == [None, None, None, None, "p0", "p2", "p1", "f0"]
    assert names(outbox.waiting) == ["f1", "f2", "f3", "f4"]
    assert outbox.dropped == {"partial": 3, "final": 1}


def test_messages_in_flight_do_not_count_against_the_size_and_are_never_dropped_for_room():
    outbox = filled(2, "p0", "f0", window=2)
    assert names(outbox.take()) == ["p0", "f0"]
    outbox.put(msg("f1"))
    outbox.put(msg("f2"))
    assert not outbox.dropped and outbox.pending == 4
    assert dropped(outbox.put(msg("f3"))) == "f1"  # not p0, which is in flight
    assert names(outbox.sending) == ["p0", "f0"]


# --- the in-flight window ---------------------------------------------------------------------


def test_take_fills_the_window_in_order_and_acks_free_it():
    outbox = filled(20, *(f"f{i}" for i in range(10)), window=4)
    assert names(outbox.take()) == ["f0", "f1", "f2", "f3"]
    assert outbox.take() == []  # the window is full
    assert (outbox.queued, outbox.in_flight, outbox.pending) == (6, 4, 10)
    first, second = outbox.sending[:2]
    outbox.ack(second)  # out of order: what the broker acknowledged before a break
    outbox.ack(first)
    assert names(outbox.sending) == ["f2", "f3"]
    assert names(outbox.take()) == ["f4", "f5"]
    assert names(outbox.sending) == ["f2", "f3", "f4", "f5"]
    assert outbox.pending == 8 and not outbox.dropped


def test_ack_is_by_identity_and_only_for_messages_in_flight():
    outbox = Outbox(5, window=2)
    a, b = msg("p0"), msg("p0")  # same topic, same bytes
    outbox.put(a)
    outbox.put(b)
    outbox.take()
    outbox.ack(b)
    assert outbox.sending == (a,) and outbox.sending[0] is a
    with pytest.raises(ValueError, match="partial message to s/partial is not in flight"):
        outbox.ack(b)  # twice
    c = msg("f0")
    outbox.put(c)
    outbox.take()
    outbox.requeue()
    with pytest.raises(ValueError, match="not in flight"):
        outbox.ack(c)  # queued again, not in flight


def test_a_failed_message_is_dropped_with_its_reason_and_never_retried():
    outbox = filled(10, "f0", "f1", "f2")
    bad = outbox.take()[1]
    drop = outbox.fail(bad, "invalid topic")
    assert drop.message is bad and drop.reason == "invalid topic"
    assert outbox.dropped == {"final": 1}
    assert outbox.requeue() == []  # the connection broke: f1 does not come back
    assert names(outbox.waiting) == ["f0", "f2"]
    assert names(outbox.take()) == ["f0"]  # a suspect now: alone
    assert outbox.pending == 2


def test_requeue_puts_what_is_not_acknowledged_back_in_front_in_order():
    outbox = filled(20, "p0", "f0", "h0", "f1", "p1", "f2", window=4)
    sent = outbox.take()
    assert names(sent) == ["p0", "f0", "h0", "f1"]
    outbox.ack(sent[0])
    outbox.ack(sent[2])
    outbox.put(msg("f3"))  # an event while the connection breaks
    assert outbox.requeue() == []
    assert names(outbox.waiting) == ["f0", "f1", "p1", "f2", "f3"]
    assert outbox.in_flight == 0 and outbox.partials == recount(outbox) == 1
    assert outbox.requeue() == [] and outbox.suspects == 2  # twice is harmless: nothing was in flight
    # after the reconnect: the same order, the suspects one at a time
    assert names(outbox.take()) == ["f0"] and outbox.take() == []
    outbox.ack(outbox.sending[0])
    assert names(outbox.take()) == ["f1"] and outbox.take() == []
    outbox.ack(outbox.sending[0])
    assert names(outbox.take()) == ["p1", "f2", "f3"] and outbox.suspects == 0


def test_requeued_partials_are_counted_and_dropped_first():
    outbox = filled(3, "p0", "f0", window=2)
    outbox.take()
    for name in ("f1", "f2", "f3"):
        assert outbox.put(msg(name)) is None
    assert outbox.requeue() == []
    # size + window: the queue shrinks back as messages are sent, a put drops one to add one
    assert names(outbox.waiting) == ["p0", "f0", "f1", "f2", "f3"]
    assert outbox.partials == 1
    assert dropped(outbox.put(msg("f4"))) == "p0"
    assert outbox.partials == 0
    assert dropped(outbox.put(msg("f5"))) == "f0"
    assert outbox.queued == 5


def test_clear_drops_in_flight_first_then_queued_in_order():
    outbox = filled(10, "p0", "f0", "h0", "f1", "p1", window=2)
    sent = outbox.take()
    outbox.ack(sent[1])
    drops = outbox.clear("not published in time")
    assert [dropped(d) for d in drops] == ["p0", "h0", "f1", "p1"]
    assert {d.reason for d in drops} == {"not published in time"}
    assert (outbox.pending, outbox.partials, outbox.waiting, outbox.sending) == (0, 0, (), ())
    assert outbox.dropped == {"partial": 2, "hermes": 1, "final": 1}


def test_size_and_window_must_be_positive():
    with pytest.raises(ValueError, match="at least 1, got 0, 8 and 3"):
        Outbox(0)
    with pytest.raises(ValueError, match="at least 1, got 5, 0 and 3"):
        Outbox(5, window=0)


# --- a message the broker refuses --------------------------------------------------------------


def test_a_message_that_breaks_the_connection_is_isolated_then_dropped():
    """mosquitto closes the connection on some messages; sent again after every reconnect, one such message
    blocked every later one. Suspects go alone; one in flight at BREAKS_TO_DROP breaks is dropped."""
    assert BREAKS_TO_DROP == 3
    outbox = filled(20, "f0", "f1", "f2", "f3", window=4)
    poison = outbox.waiting[2]
    outbox.take()
    outbox.ack(outbox.sending[0])  # f0 acknowledged before the break
    assert outbox.requeue() == []  # break 1: f1, f2 and f3 are suspects
    assert outbox.suspects == 3
    assert names(outbox.take()) == ["f1"]
    outbox.ack(outbox.sending[0])  # innocent: acknowledged alone
    assert names(outbox.take()) == ["f2"]
    assert outbox.requeue() == []  # break 2, f2 alone in flight
    outbox.put(msg("f4"))
    assert names(outbox.take()) == ["f2"]
    drops = outbox.requeue()  # break 3: dropped
    assert [(d.message, "closed the connection each of the 3 times" in d.reason) for d in drops] == [(poison, True)]
    assert outbox.dropped == {"final": 1} and outbox.suspects == 1  # f3
    assert names(outbox.take()) == ["f3"]
    outbox.ack(outbox.sending[0])
    assert names(outbox.take()) == ["f4"] and outbox.suspects == 0


def test_a_message_in_flight_at_two_outages_is_kept():
    outbox = filled(20, "f0", "f1", breaks_to_drop=3)
    for _ in range(2):
        outbox.take()
        assert outbox.requeue() == []
    assert names(outbox.waiting) == ["f0", "f1"] and not outbox.dropped
    assert Outbox(5, breaks_to_drop=1).requeue() == []


# --- randomized: the outbox against a brute-force model -------------------------------------


class Model:
    """The rules of the outbox written the slow, obvious way: lists, scans, no counters."""

    def __init__(self, size: int, window: int, breaks_to_drop: int) -> None:
        self.size, self.window, self.breaks_to_drop = size, window, breaks_to_drop
        self.queue: list[Message] = []
        self.flight: list[Message] = []
        self.drops: list[Message] = []
        self.breaks: list[tuple[Message, int]] = []

    def suspect(self, m: Message) -> bool:
        return any(s is m for s, _ in self.breaks)

    def put(self, m: Message) -> Message | None:
        victim = None
        if len(self.queue) >= self.size:
            if m.kind == "partial":
                self.drops.append(m)
                return m
            partials = [q for q in self.queue if q.kind == "partial"]
            victim = partials[0] if partials else self.queue[0]
            self.queue = [q for q in self.queue if q is not victim]
            self.breaks = [(s, n) for s, n in self.breaks if s is not victim]
            self.drops.append(victim)
        self.queue.append(m)
        return victim

    def take(self) -> list[Message]:
        out = []
        while self.queue and len(self.flight) < self.window:
            if self.flight and (self.suspect(self.queue[0]) or self.suspect(self.flight[-1])):
                break
            out.append(self.queue.pop(0))
            self.flight.append(out[-1])
        return out

    def done(self, m: Message, failed: bool) -> None:
        self.flight = [f for f in self.flight if f is not m]
        self.breaks = [(s, n) for s, n in self.breaks if s is not m]
        if failed:
            self.drops.append(m)

    def requeue(self) -> list[Message]:
        back, dropped = [], []
        for m in self.flight:
            n = 1 + sum(k for s, k in self.breaks if s is m)
            self.breaks = [(s, k) for s, k in self.breaks if s is not m]
            if n >= self.breaks_to_drop:
                dropped.append(m)
            else:
                self.breaks.append((m, n))
                back.append(m)
        self.drops += dropped
        self.queue, self.flight = back + self.queue, []
        return dropped


@pytest.mark.parametrize("seed", range(20))
def test_random_operations_match_the_model(seed):
    rng = random.Random(seed)
    size, window, breaks_to_drop = rng.randint(1, 6), rng.randint(1, 4), rng.randint(1, 3)
    outbox, model = Outbox(size, window, breaks_to_drop), Model(size, window, breaks_to_drop)
    counter = 0
    for _ in range(400):
        op = rng.choices(["put", "take", "ack", "fail", "requeue"], weights=[8, 3, 3, 1, 1])[0]
        if op == "put":
            counter += 1
            m = msg(f"{rng.choice('ppppffh')}{counter}")
            drop, victim = outbox.put(m), model.put(m)
            assert (drop and drop.message) is victim
        elif op == "take":
            assert outbox.take() == model.take()
        elif op in ("ack", "fail") and model.flight:
            m = rng.choice(model.flight)
            if op == "ack":
                outbox.ack(m)
            else:
                assert outbox.fail(m, "bad topic").message is m
            model.done(m, failed=op == "fail")
        elif op == "requeue":
            assert [d.message for d in outbox.requeue()] == model.requeue()
        assert list(outbox.waiting) == model.queue
        assert list(outbox.sending) == model.flight
        assert outbox.partials == recount(outbox)
        assert outbox.pending == len(model.queue) + len(model.flight)
        assert outbox.suspects == len(model.breaks)
        kinds: dict[str, int] = {}
        for d in model.drops:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        assert outbox.dropped == kinds
    assert outbox.dropped  # the sizes are small: every seed overflows
