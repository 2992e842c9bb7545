"""Engine work off the event loop (``server.engine_thread``): same events, in order, and a loop that stays free.

The daemon runs each stream's engine calls (windowing, merging model outputs, the word-list search) in one
engine thread; these tests hold that work and check what the event loop still does meanwhile, and that the
events are exactly those of the in-loop path.
"""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
from conftest import pcm16
from test_server import http_get, metric, native_session
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 60


async def stream_events(port: int, pcm: bytes, *, flush_at: int | None = None) -> tuple[list, int]:
    """Send ``pcm`` in 100 ms messages (a flush after byte ``flush_at``), stop; every message after ``ready``, and
    the close code."""
    messages, code = await native_session(port, pcm, flush_at=flush_at)
    assert messages[0]["type"] == "ready" and code is not None
    return messages[1:], code


@pytest.mark.parametrize("words", ["auto", ""], ids=["word-list", "greedy"])
async def test_events_off_the_loop_equal_the_in_loop_path(daemon_factory, speech, words):
    """Every event, its order and its content are those of the in-loop path, word list or greedy, with a flush."""
    pcm = pcm16(speech)
    got = {}
    for thread in (True, False):
        d = await daemon_factory(f"server.engine_thread={str(thread).lower()}", f"decoder.words='{words}'")
        assert (d.streams.engine() is not None) is thread
        got[thread], code = await stream_events(d.port, pcm, flush_at=len(pcm) // 3)
        assert code == 1000
    events = got[True]
    assert [e["type"] for e in events][-1] == "end"
    strip = [{k: v for k, v in e.items() if k != "session"} for e in events]
    assert strip == [{k: v for k, v in e.items() if k != "session"} for e in got[False]]
    finals = [e for e in events if e["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(len(finals)))  # in order, none lost or repeated
    assert "kitchen lights" in " ".join(f["text"] for f in finals)


class GatedSearch:
    """A real word search whose first step waits for ``gate`` (the test's stand-in for a heavy search)."""

    def __init__(self, inner, gate: Gate) -> None:
        self.inner, self.gate = inner, gate

    def step(self, log_probs: np.ndarray) -> None:
        self.gate.hold()
        self.inner.step(log_probs)

    def partial(self, lookahead: np.ndarray):
        return self.inner.partial(lookahead)

    def finish(self):
        return self.inner.finish()


class Gate:
    """Holds the first word-search step of any stream until released (or until ``limit_s``: then ``timed_out``)."""

    def __init__(self, words, limit_s: float) -> None:
        self.words, self.limit_s = words, limit_s
        self.entered, self.released = threading.Event(), threading.Event()
        self.timed_out = False
        self.thread = ""

    def search(self, start_frame: int = 0) -> GatedSearch:
        return GatedSearch(self.words.search(start_frame), self)

    def hold(self) -> None:
        if self.entered.is_set():
            return
        self.thread = threading.current_thread().name
        self.entered.set()
        self.timed_out = not self.released.wait(self.limit_s)


@pytest.mark.parametrize("thread", [True, False], ids=["engine-thread", "on-the-loop"])
async def test_the_loop_answers_while_a_word_search_runs(daemon_factory, demo_words, speech, thread):
    """While one stream's word search is held, another client connects and its ping is answered.

    Off the loop the search waits for the test to release it, after the pong; on the loop nothing else
    can run while it is held (not the new connection's handshake, not its ping): it only ends by its
    time limit. That contrast is what the engine thread buys.
    """
    d = await daemon_factory(f"server.engine_thread={str(thread).lower()}")
    gate = Gate(demo_words, limit_s=30.0 if thread else 2.0)
    d.streams.words = gate
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as a:
        await a.recv()
        await a.send(pcm16(speech[: 16000 * 3]))  # three seconds: full windows, a word search
        assert await asyncio.to_thread(gate.entered.wait, TIMEOUT)
        async with connect(f"ws://127.0.0.1:{d.port}/v1/stream") as b:
            assert json.loads(await b.recv())["type"] == "ready"
            await (await b.ping())
            pong_while_held = not gate.released.is_set() and not gate.timed_out
            gate.released.set()
        await a.send(json.dumps({"type": "stop"}))
        events = [json.loads(m) async for m in a]
    assert pong_while_held is thread
    assert gate.timed_out is not thread
    assert gate.thread.startswith("streamer-engine") if thread else gate.thread == "MainThread"
    assert events[-1]["type"] == "end"
    assert any(e["type"] == "final" and e["text"] for e in events)  # the held stream still got its text


async def test_shutdown_finishes_every_stream_through_the_engine_thread(daemon_factory, speech):
    """Shutdown mid-stream: each stream's last finals come from the engine thread before ``end`` and 1001."""
    d = await daemon_factory()
    pcm = pcm16(speech)
    received: list[list[dict]] = [[], [], []]
    fed = [asyncio.Event() for _ in received]

    async def client(i: int) -> int | None:
        async with connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
            await ws.recv()
            await ws.send(pcm[: len(pcm) // 4 * 2 + 3200 * i])  # mid-sentence: the rest is the finals' job
            try:
                async for msg in ws:
                    received[i].append(json.loads(msg))
                    fed[i].set()  # a message's events come once all of it was fed: the daemon has the audio
            except ConnectionClosed:
                pass
        return ws.close_code

    async with asyncio.timeout(TIMEOUT):
        tasks = [asyncio.create_task(client(i)) for i in range(len(received))]
        for e in fed:
            await e.wait()
        await d.shutdown()
        codes = await asyncio.gather(*tasks)
    assert codes == [1001] * len(received)
    for events in received:
        assert events[-1]["type"] == "end"
        finals = [e for e in events if e["type"] == "final"]
        assert finals and "kitchen" in " ".join(f["text"] for f in finals)


async def test_a_refresh_the_busy_worker_skips_costs_no_trip(daemon_factory, speech):
    """With no spare model time (``worker.refresh_max_load = 0``) every partial refresh a stream plans is skipped
    without a trip of its own: it never reaches the worker, and it is answered in the stream's next engine call, not
    in a call of its own. The events are those of a stream that plans no refresh, a flush and the end included."""
    pcm = pcm16(speech)
    off = await daemon_factory("stream.refresh_interval_ms=0")
    expected, code = await stream_events(off.port, pcm, flush_at=len(pcm) // 3)
    assert code == 1000

    d = await daemon_factory("worker.refresh_max_load=0")
    worker, engine = d.streams.worker, d.streams.engine()
    assert engine is not None
    submitted: list = []  # the windows of each trip to the worker
    calls = 0
    run_many, call = worker.run_many, engine.call

    async def counting_run_many(windows, *args, **kwargs):
        submitted.append(list(windows))
        return await run_many(windows, *args, **kwargs)

    async def counting_call(*args, **kwargs):
        nonlocal calls
        calls += 1
        return await call(*args, **kwargs)

    worker.run_many, engine.call = counting_run_many, counting_call
    got, code = await stream_events(d.port, pcm, flush_at=len(pcm) // 3)
    assert code == 1000
    strip = [{k: v for k, v in e.items() if k != "session"} for e in got]
    assert strip == [{k: v for k, v in e.items() if k != "session"} for e in expected]
    _, _, metrics = await asyncio.to_thread(http_get, d.port, "/metrics")
    assert metric(metrics, 'streamer_refresh_windows_total{outcome="skipped"}') > 0  # planned, and skipped
    assert submitted and not [w for trip in submitted for w in trip if w.optional]
    messages = -(-len(pcm) // 3200)
    # an engine call per message, the flush and the end, and one merge per trip to the worker: none for a refresh
    assert calls == messages + 2 + len(submitted)
