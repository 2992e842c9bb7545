"""Clients that send audio ahead of real time (bursts) wait behind real-time streams, in the model worker and in
the engine thread: the order, checked without the clock. Real daemon, demo model."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time

import pytest
from conftest import pcm16
from test_load import _burst, _flood_audio
from test_server import TIMEOUT, finals_of, native_session, reference_finals

from streamer.aio.stream import LIVE_AHEAD_S, EngineThread, LiveStream
from streamer.fair import deadline

# -- pure -------------------------------------------------------------------------------------------------


def test_audio_sent_well_ahead_of_real_time_has_no_deadline():
    assert deadline(10.1, received=10.0, slack=2.0) == 10.1  # a real-time message
    assert deadline(12.0, received=10.0, slack=2.0) == 12.0  # a 2 s message: still real time
    assert deadline(12.5, received=10.0, slack=2.0) == math.inf  # a burst's third second: spare time only
    assert deadline(5.0, received=10.0, slack=2.0) == 5.0  # late audio keeps its deadline


def test_engine_thread_runs_the_earliest_deadline_first():
    engine = EngineThread()
    gate = threading.Event()
    ran: list[str] = []
    try:
        busy = engine.submit("busy", 0.0, gate.wait, 10)  # holds the thread while the others queue
        later = [engine.submit(f"burst{i}", math.inf, ran.append, f"burst{i}") for i in range(8)]
        later.append(engine.submit("live", 100.0, ran.append, "live"))
        later.append(engine.submit("late", 50.0, ran.append, "late"))
        dropped = engine.submit("gone", 0.0, ran.append, "gone")
        assert dropped.cancel()  # its stream stopped waiting: never run
        gate.set()
        for fut in [busy, *later]:
            fut.result(10)
    finally:
        engine.shutdown()
    assert ran == ["late", "live", *(f"burst{i}" for i in range(8))]


def test_engine_thread_hands_a_call_its_exception_and_goes_on():
    engine = EngineThread()
    try:
        with pytest.raises(ZeroDivisionError):
            engine.submit("a", 0.0, lambda: 1 / 0).result(10)
        assert engine.submit("a", 0.0, lambda: 42).result(10) == 42
    finally:
        engine.shutdown()


class Wakes:
    """Counts the wake-ups of the running loop from other threads (``call_soon_threadsafe``) while counting."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.count = 0
        self._call_soon_threadsafe = self.loop.call_soon_threadsafe

    def _counted(self, *args, **kwargs):
        self.count += 1
        return self._call_soon_threadsafe(*args, **kwargs)

    def __enter__(self) -> Wakes:
        self.loop.call_soon_threadsafe = self._counted  # (an instance attribute: this loop only)
        return self

    def __exit__(self, *exc) -> None:
        del self.loop.call_soon_threadsafe


async def test_calls_awaited_on_the_loop_come_back_together_and_a_cancelled_one_is_dropped():
    """Calls that end while the loop is busy go back to it in one wake-up, not one each; a call whose stream
    stopped waiting before it began never runs; an exception reaches its caller, and the thread goes on."""
    engine = EngineThread()
    gate = threading.Event()
    ran: list[str] = []
    try:
        busy = engine.submit("busy", 0.0, gate.wait, 10)  # holds the thread while the calls queue
        calls = [asyncio.create_task(engine.call(f"s{i}", 1.0, ran.append, f"s{i}")) for i in range(16)]
        gone = asyncio.create_task(engine.call("gone", 0.5, ran.append, "gone"))
        failing = asyncio.create_task(engine.call("bad", 2.0, lambda: 1 / 0))
        await asyncio.sleep(0)  # every call queued
        gone.cancel()
        await asyncio.wait({gone})  # its stream stopped waiting
        with Wakes() as wakes:
            last = engine.submit("last", 3.0, lambda: None)  # due after all the others: runs once they all ended
            gate.set()
            last.result(10)  # (blocks the loop: it is busy while the thread runs the calls)
            assert busy.done()
            await asyncio.gather(*calls)
            with pytest.raises(ZeroDivisionError):
                await failing
        assert gone.cancelled()
        assert await engine.call("after", 0.0, lambda: 42) == 42
    finally:
        engine.shutdown()
    assert sorted(ran) == sorted(f"s{i}" for i in range(16))  # "gone" never ran
    assert wakes.count <= 2, f"{wakes.count} wake-ups of the loop for 17 calls that ended while it was busy"


async def test_results_of_calls_run_one_after_the_other_wake_the_loop_a_few_times_not_each():
    """Calls that free the GIL while they run (onnxruntime, numpy) let the loop take each result as it ends; the thread
    gathers those that end within HAND_BACK_S of each other instead, and wakes the loop for them together."""
    engine = EngineThread()
    gate = threading.Event()
    try:
        with Wakes() as wakes:
            busy = engine.submit("busy", 0.0, gate.wait, 10)
            calls = [asyncio.create_task(engine.call(f"s{i}", 1.0, time.sleep, 0.0002)) for i in range(32)]
            await asyncio.sleep(0)  # every call queued
            gate.set()
            await asyncio.gather(*calls)  # (the loop idles meanwhile: free to take each result as it ends)
            assert busy.done()
    finally:
        engine.shutdown()
    assert wakes.count <= 12, f"{wakes.count} wake-ups of the loop for 32 calls run one after the other"


# -- a real daemon ------------------------------------------------------------------------------------------

BURSTS = 8
AHEAD_S = LIVE_AHEAD_S + 0.5
"""a burst's audio past this many seconds of its message was sent ahead of real time by more than LIVE_AHEAD_S"""


@pytest.mark.parametrize("piece", [0, 1600], ids=["one-message", "100ms-messages"])
async def test_bursts_never_go_before_a_waiting_real_time_stream(daemon_factory, model_runner, speech, monkeypatch,
                                                                 piece):
    """Eight clients each send 55 s at once (in one message, or in 100 ms messages as fast as the daemon reads
    them), then a real-time stream starts beside them. Whenever the real-time
    stream has a window waiting for the model, no batch takes a burst window of audio sent ahead of real time;
    whenever it has an engine call waiting (audio to window, outputs to merge and search), no call of such
    burst audio begins, but the one the thread may have just taken. The order is checked, not the time: it
    holds on a loaded machine as on an idle one. The real-time stream's finals are `streamer transcribe`'s. (In 100
    ms messages, each read as the one before was fed, the bursts' audio seemed to come at real time once the model
    fell behind, and took deadlines: what waits unread behind a message, and a message already there when read,
    now keep a client ahead.)"""
    d = await daemon_factory("server.idle_timeout_s=120")
    bursts: dict[str, float] = {}  # every stream but the real-time one, which starts after them
    seq = itertools.count()  # one order of the loop's and the engine thread's notes

    # the worker: each batch it takes, and whether a window of the real-time stream was waiting then
    worker_faults: list[tuple[str, float]] = []
    take = d.worker._queue.take

    def recorded_take(*args, **kwargs):
        waiting = any(key not in bursts for key in d.worker._queue.keys())
        out = take(*args, **kwargs)
        if waiting:
            worker_faults.extend((key, end) for key, item in out if key in bursts
                                 and (end := item.window.end_sample / 16000) > AHEAD_S)
        return out

    monkeypatch.setattr(d.worker._queue, "take", recorded_take)

    # the engine thread: when each call of the real-time stream was queued and began (one at a time: it awaits
    # each before the next), and when each burst call began, on how much of its audio
    accepted: dict[str, int] = {}  # samples (16 kHz) each stream accepted so far
    queued: list[int] = []  # notes
    began: list[int] = []
    burst_began: list[tuple[int, str, float]] = []  # (note, stream, audio seconds)

    inside = threading.local()  # _take calls _accept: one call

    def noting(name: str):
        method = getattr(LiveStream, name)

        def run(self, *args):
            if name == "_accept":
                accepted[self.id] = accepted.get(self.id, 0) + len(args[0])
            if getattr(inside, "call", False):
                return method(self, *args)
            if self.id in bursts:
                burst_began.append((next(seq), self.id, accepted.get(self.id, 0) / 16000))
            else:
                began.append(next(seq))
            inside.call = True
            try:
                return method(self, *args)
            finally:
                inside.call = False

        return run

    for name in ("_take", "_accept", "_merge", "_end"):
        monkeypatch.setattr(LiveStream, name, noting(name))
    engine = d.streams.engine()
    assert engine is not None
    put = engine._put

    def recorded_put(key, call):
        put(key, call)
        if call.run.func.__self__.id not in bursts:
            queued.append(next(seq))  # noted once it is queued

    monkeypatch.setattr(engine, "_put", recorded_put)

    leave = asyncio.Event()
    message = _flood_audio(speech, 55 * 8000 * 2)
    async with asyncio.timeout(4 * TIMEOUT):
        tasks = [asyncio.create_task(_burst(d.port, message, bursts, leave, piece)) for _ in range(BURSTS)]
        for _ in range(400):  # the bursts are queued first
            if len(bursts) == BURSTS and d.worker.queued >= BURSTS:
                break
            await asyncio.sleep(0.05)
        msgs, code = await native_session(d.port, pcm16(speech), chunk=3200, pace=0.1)
        leave.set()
        await asyncio.gather(*tasks)
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(model_runner, speech)]
    assert not worker_faults, f"burst windows sent ahead of real time went first in the worker: {worker_faults[:5]}"

    assert queued and len(began) == len(queued), "the real-time stream's engine calls were not all seen"
    faults = []
    for at, start in zip(queued, began, strict=True):
        ahead = [(key, round(s, 1)) for note, key, s in burst_began if at < note < start and s > AHEAD_S]
        if len(ahead) > 1:  # one may have been taken just before the real-time call came (no preemption)
            faults.append(ahead)
    assert not faults, (f"{len(faults)} of {len(queued)} real-time engine calls waited for calls of burst audio "
                        f"sent ahead of real time, e.g. {faults[:3]}")


async def test_a_file_read_slower_than_real_time_still_has_no_deadline(daemon_factory, speech, monkeypatch):
    """An upload's audio is all there when the request comes, and the daemon reads it as the model takes it. Read
    slower than real time (the model busy elsewhere), its engine calls past its first LIVE_AHEAD_S seconds still
    have no deadline. Before, each block read counted as come at real time and took one: eight uploads starved of
    model time became as urgent as the real-time streams, whose finals came 12 s late (clients/burstlag.py)."""
    d = await daemon_factory()
    engine = d.streams.engine()
    assert engine is not None
    put = engine._put
    dues: list[tuple[float, float]] = []  # (when queued, due)

    def recorded_put(key, call):
        dues.append((time.monotonic(), call.due))
        put(key, call)

    monkeypatch.setattr(engine, "_put", recorded_put)
    opened = time.monotonic()
    stream = d.streams.open(live=False)
    block = pcm16(speech[:8000])  # 0.5 s, read every 0.7 s: behind real time
    try:
        while time.monotonic() - opened < LIVE_AHEAD_S + 2:
            await stream.feed_bytes(block)
            await asyncio.sleep(0.7)
        await stream.finish()
    finally:
        stream.close()
    late = [due for at, due in dues if at > opened + LIVE_AHEAD_S + 0.1]
    assert late and all(due == math.inf for due in late), late
