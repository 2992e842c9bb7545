"""Fair service under load: streams are served in turn, a flood cannot starve a real-time stream, the windows
of clients that left are dropped, and SIGTERM delivers every stream's finals. Real daemon, demo model."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import time

import numpy as np
import pytest
import soxr
from conftest import pcm16
from test_server import TIMEOUT, finals_of, native_session, reference_finals
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.fair import FairQueue

# -- the pure scheduler -----------------------------------------------------------------------------


def test_fair_queue_serves_keys_in_turn_with_a_bound_per_key():
    q: FairQueue[str, int] = FairQueue()
    for i in range(100):
        q.put("flood", i)
    q.put("live", 0)
    q.put("other", 0)
    batch = q.take(8, per_key=2)
    assert [k for k, _ in batch].count("flood") == 2 and ("live", 0) in batch and ("other", 0) in batch
    assert [v for k, v in batch if k == "flood"] == [0, 1]  # each key's items stay in order
    assert len(q) == 98 and q.keys() == ["flood"]
    q.put("live", 1)
    assert q.take(1, per_key=2) == [("live", 1)] or q.pending("live") == 1  # one slot: whoever's turn it is
    assert q.drop("flood") == list(range(2, 100)) or q.pending("flood") == 0
    assert len(q) == q.pending("live")


def test_fair_queue_rotates_the_first_key():
    q: FairQueue[str, int] = FairQueue()
    for key in "abc":
        for i in range(10):
            q.put(key, i)
    firsts = [q.take(1, per_key=1)[0][0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_fair_queue_against_a_brute_force_model():
    rng = random.Random(7)
    q: FairQueue[int, int] = FairQueue()
    model: dict[int, list[int]] = {}
    n = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.6:
            key = rng.randrange(5)
            q.put(key, n)
            model.setdefault(key, []).append(n)
            n += 1
        elif op < 0.9:
            limit, per_key = rng.randrange(1, 9), rng.randrange(1, 4)
            batch = q.take(limit, per_key)
            assert len(batch) == min(limit, sum(min(per_key, len(v)) for v in model.values()))
            for key, value in batch:
                assert model[key].pop(0) == value  # FIFO within a key
                if not model[key]:
                    del model[key]
            counts = {k: sum(1 for kk, _ in batch if kk == k) for k, _ in batch}
            assert max(counts.values(), default=0) <= per_key
        else:
            key = rng.randrange(5)
            assert q.drop(key) == model.pop(key, [])
        assert len(q) == sum(len(v) for v in model.values())


def test_fair_queue_serves_the_earliest_deadline_first():
    """However many windows of audio sent ahead of real time wait, a window due now goes first; windows due by a
    time go before the others, and a key's items keep their order."""
    q: FairQueue[str, int] = FairQueue()
    for b in range(20):
        for i in range(50):
            q.put(f"burst{b}", i, due=101.0 + i)
    q.put("live", 0, due=99.5)
    assert q.take(1, per_key=2) == [("live", 0)]
    q.put("live", 1, due=100.4)
    assert q.take(32, per_key=2, due_by=100.5) == [("live", 1)]  # the bursts are due later
    assert q.take(32, per_key=2, due_by=101.5) == [(f"burst{b}", 0) for b in range(20)]
    assert q.take(32, per_key=2, due_by=101.5) == []
    q.put("late", 0, due=50.0)
    q.put("late", 1, due=10.0)  # never before the item ahead of it
    assert q.take(2, per_key=2) == [("late", 0), ("late", 1)]


def test_pace_makes_audio_sent_ahead_due_later_and_follows_the_client():
    from streamer.fair import Pace

    p = Pace(speed=0.0, burst_s=0.0, now=0.0)
    assert p.end(5.0) == 5.0
    assert p.due(0.1, now=10.0) == 10.0 and p.due(0.1, now=10.1) == pytest.approx(10.1)  # real time: due as it comes
    assert p.due(55.0, now=10.2) == pytest.approx(10.2)  # a burst: its sample at t is due t later
    assert p.end(10.3) == pytest.approx(65.2)
    assert p.due(1.0, now=11.0) == pytest.approx(65.2)  # more audio waits behind the burst
    assert p.due(1.0, now=100.0) == 100.0  # a pause earns no credit


# -- the daemon -------------------------------------------------------------------------------------


def _flood_audio(speech: np.ndarray, nbytes: int = 1_000_000) -> bytes:
    """About a minute of 8 kHz s16le speech in one message of ``nbytes``."""
    audio8 = soxr.resample(speech, 16000, 8000).astype(np.float32)
    reps = nbytes // (2 * len(audio8)) + 1
    return pcm16(np.tile(audio8, reps))[:nbytes]


async def _flooder(port: int, message: bytes, *, stay: bool) -> float:
    """Send one huge 8 kHz message; stay for its finals (return when the end came) or leave at once."""
    loop = asyncio.get_running_loop()
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "start", "sample_rate": 8000}))
        await ws.send(message)
        if not stay:
            return loop.time()
        await ws.send(json.dumps({"type": "stop"}))
        try:
            async for msg in ws:
                if json.loads(msg)["type"] == "end":
                    break
        except ConnectionClosed:
            pass
    return loop.time()


async def test_a_flood_cannot_starve_a_real_time_stream(daemon_factory, model_runner, speech):
    """Three clients each send a minute of audio in one message; a real-time stream beside them gets all its
    finals, equal to `streamer transcribe`'s, and its end long before the flood is computed."""
    d = await daemon_factory("server.idle_timeout_s=120")
    loop = asyncio.get_running_loop()
    message = _flood_audio(speech)

    async def healthy() -> tuple[list, int | None, float]:
        msgs, code = await native_session(d.port, pcm16(speech), chunk=3200, pace=0.1)
        return msgs, code, loop.time()

    async with asyncio.timeout(4 * TIMEOUT):
        flood = [asyncio.create_task(_flooder(d.port, message, stay=True)) for _ in range(3)]
        await asyncio.sleep(0.3)  # the flood is queued first
        (msgs, code, healthy_end), ends = await asyncio.gather(healthy(), asyncio.gather(*flood))
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(model_runner, speech)]
    assert healthy_end < min(ends), "the real-time stream waited for the whole flood"


async def _burst(port: int, message: bytes, sessions: dict[str, float], leave: asyncio.Event, piece: int = 0) -> None:
    """Send 8 kHz audio at once, in one message (or messages of ``piece`` bytes, as fast as the connection takes
    them) and stay (its windows stay queued) until ``leave``; note the session and when its audio was sent."""
    loop = asyncio.get_running_loop()
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
        session = json.loads(await ws.recv())["session"]
        await ws.send(json.dumps({"type": "start", "sample_rate": 8000}))
        sessions[session] = loop.time()
        for i in range(0, len(message), piece or len(message)):
            await ws.send(message[i : i + (piece or len(message))])
        await leave.wait()


async def test_a_burst_uses_only_spare_model_time(daemon_factory, model_runner, speech):
    """Three clients each send 55 s at once (within max_burst_s) before a real-time stream starts: no batch that
    runs a window of the real-time stream also runs a burst window of audio ahead of real time (those wait for
    spare model time), and the real-time stream's finals are `streamer transcribe`'s."""
    d = await daemon_factory("server.idle_timeout_s=120")
    loop = asyncio.get_running_loop()
    batches: list[tuple[float, list]] = []
    take = d.worker._queue.take

    def recorded(*args, **kwargs):  # the worker's own choice, noted as it takes each batch
        out = take(*args, **kwargs)
        if out:
            batches.append((loop.time(), [(key, item.window) for key, item in out]))
        return out

    d.worker._queue.take = recorded
    bursts: dict[str, float] = {}
    leave = asyncio.Event()
    message = _flood_audio(speech, 55 * 8000 * 2)
    async with asyncio.timeout(4 * TIMEOUT):
        tasks = [asyncio.create_task(_burst(d.port, message, bursts, leave)) for _ in range(3)]
        for _ in range(400):  # the bursts are queued first
            if len(bursts) == 3 and d.worker.queued >= 3:
                break
            await asyncio.sleep(0.05)
        msgs, code = await native_session(d.port, pcm16(speech), chunk=3200, pace=0.1)
        leave.set()
        await asyncio.gather(*tasks)
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(model_runner, speech)]
    healthy = msgs[0]["session"]
    shared = [(at, [(key, w) for key, w in batch if key in bursts]) for at, batch in batches
              if any(key == healthy for key, _ in batch)]
    assert shared, "the real-time stream's windows were never run"
    ahead = [(key, w.end_sample / 16000 - (at - bursts[key]))
             for at, batch in shared for key, w in batch]
    ahead = [(key, round(s, 1)) for key, s in ahead if s > 2.0]  # a burst window's audio ahead of real time
    assert not ahead, f"burst windows ahead of real time shared the real-time stream's batches: {ahead[:5]}"


async def test_windows_of_clients_that_left_are_not_computed(daemon_factory, model_runner, speech):
    d = await daemon_factory()
    message = _flood_audio(speech)
    half_a_flood = int(len(message) / 2 / 8000 / 0.4) // 2  # half the 400 ms hops of one client's minute: 78
    async with asyncio.timeout(4 * TIMEOUT):
        await asyncio.gather(*(_flooder(d.port, message, stay=False) for _ in range(4)))
        msgs, code = await native_session(d.port, pcm16(speech))  # a stream after them is served at once
    assert code == 1000 and finals_of(msgs)
    for _ in range(100):
        if not d.active_streams and not d.worker.queued:
            break
        await asyncio.sleep(0.05)
    computed = d.metrics.windows._value.get()
    assert computed < half_a_flood, f"{computed} windows computed for clients that had left"
    assert d.worker.queued == 0


async def test_stream_lag_is_reported_per_stream_and_released(daemon_factory, speech):
    d = await daemon_factory()
    message = _flood_audio(speech, 400_000)
    task = asyncio.create_task(_flooder(d.port, message, stay=True))
    seen = set()
    async with asyncio.timeout(4 * TIMEOUT):
        while not task.done():
            text = d.metrics.render().decode()
            seen |= {line.split("}")[0] for line in text.splitlines()
                     if line.startswith("streamer_stream_lag_seconds{")}
            await asyncio.sleep(0.05)
        await task
    assert len(seen) == 1  # one stream was lagging, under its session id
    assert "streamer_stream_lag_seconds{" not in d.metrics.render().decode()  # gone with the stream


@pytest.mark.parametrize("protocol", ["native", "vosk"])
async def test_sigterm_under_load_delivers_every_final(daemon_factory, model_runner, speech, protocol):
    """SIGTERM (shutdown) while a flood keeps the worker busy: every healthy stream gets its finals and a clean
    close (1001), and gets them before the flood's remaining minutes of audio are computed, not after."""
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0", "vosk.sample_rate=16000",
                             "server.shutdown_timeout_s=120")
    loop = asyncio.get_running_loop()
    message = _flood_audio(speech)
    flood = [asyncio.create_task(_flooder(d.port, message, stay=True)) for _ in range(4)]
    expected = " ".join(f["text"] for f in reference_finals(model_runner, speech))
    audio = pcm16(speech)

    async def healthy() -> tuple[str, int | None, float]:
        url = (f"ws://127.0.0.1:{d.port}/v1/stream" if protocol == "native"
               else f"ws://127.0.0.1:{d.vosk_port}")
        texts = []
        async with connect(url) as ws:
            if protocol == "native":
                await ws.recv()
            for i in range(0, len(audio), 3200):
                await ws.send(audio[i : i + 3200])
                if protocol == "vosk":
                    reply = json.loads(await ws.recv())
                    if reply.get("text"):
                        texts.append(reply["text"])
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            shutdown.set()
            try:
                async for msg in ws:
                    m = json.loads(msg)
                    if m.get("type") == "final" or (protocol == "vosk" and m.get("text")):
                        texts.append(m["text"])
            except ConnectionClosed:
                pass
            return " ".join(t for t in texts if t), ws.close_code, loop.time()

    shutdown = asyncio.Event()
    async with asyncio.timeout(6 * TIMEOUT):
        streams = [asyncio.create_task(healthy()) for _ in range(3)]
        await shutdown.wait()
        stopping = asyncio.create_task(d.shutdown())
        results = await asyncio.gather(*streams)
        ends = await asyncio.gather(*flood)
        await stopping
    for text, code, _ in results:
        assert code == 1001
        assert text == expected
    assert max(t for _, _, t in results) < min(ends), "the healthy streams' finals waited for the flood"


def test_audio_budget_allows_a_burst_then_real_time_times_speed():
    from streamer.fair import AudioBudget

    b = AudioBudget(speed=2.0, burst_s=10.0, now=0.0)
    assert b.take(10.0, now=0.0) == 0.0  # the burst
    assert b.take(4.0, now=0.0) == pytest.approx(2.0)  # 4 s more at 2x real time: wait 2 s
    assert b.take(3.0, now=3.0) == pytest.approx(0.5)  # 3 s later 6 s were earned, 4 owed: 1 s short
    assert b.take(1.0, now=100.0) == 0.0  # a long pause refills up to the burst, not beyond
    assert b.take(9.0, now=100.0) == 0.0 and b.take(1.0, now=100.0) == pytest.approx(0.5)
    assert AudioBudget(speed=0.0, burst_s=0.0, now=0.0).take(1e6, now=0.0) == 0.0  # off


async def test_a_client_faster_than_allowed_is_slowed_down(daemon_factory, speech):
    """With max_speed = 2 and a 1 s burst, 6 s of audio sent at once takes at least (6 - 1) / 2 s to go in."""
    d = await daemon_factory("server.max_speed=2.0", "server.max_burst_s=1.0")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    msgs, code = await native_session(d.port, pcm16(speech), chunk=len(speech) * 2)  # one message
    assert code == 1000 and finals_of(msgs)
    assert loop.time() - t0 >= (len(speech) / 16000 - 1.0) / 2 * 0.95


# -- partial refreshes: spare model time only ---------------------------------------------------------------


def test_load_meter_counts_busy_time_within_its_horizon():
    from streamer.fair import LoadMeter

    m = LoadMeter(2.0)
    assert m.load(0.0) == 0.0
    m.add(1.0, 0.5)  # busy 0.5 .. 1.0
    m.add(2.0, 0.5)  # busy 1.5 .. 2.0
    assert m.load(2.0) == pytest.approx(0.5)
    assert m.load(2.9) == pytest.approx(0.3)  # the horizon 0.9 .. 2.9 holds 0.1 s of the first span
    assert m.load(3.5) == pytest.approx(0.25)
    assert m.load(4.1) == 0.0  # everything left the horizon
    m.add(5.0, 3.0)  # a call longer than the horizon counts the horizon's share only
    assert m.load(5.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        LoadMeter(0)


def _refresh_windows(runner, speech):
    """A full window and the partial refresh after it, as a live session plans them (default schedule)."""
    from streamer.config import StreamConfig
    from streamer.engine import StreamSession

    session = StreamSession(StreamConfig().schedule(), runner.vocab)
    session.accept_audio(speech[: 16000 * 2])  # the first full window ends at 1.4 s, a refresh at 1.6 s
    windows = [w for w in session.windows_to_run() if not (w.provisional and not w.optional)]
    full, refresh = windows[-2:]
    assert (full.optional, refresh.optional) == (False, True)
    return full, refresh


async def test_worker_runs_refreshes_only_on_spare_model_time(model_runner, speech):
    """An idle worker runs a refresh; behind other windows, above refresh_max_load or with it 0 it answers None at
    once; the load is the model time of the other windows in the last 2 s, so it frees up again."""
    from streamer.aio.worker import BatchWorker
    from streamer.config import WorkerConfig

    full, refresh = _refresh_windows(model_runner, speech)

    def outcomes(worker):
        c = worker.metrics.refresh_windows
        return c.labels("run")._value.get(), c.labels("skipped")._value.get()

    async with asyncio.timeout(TIMEOUT):
        idle = BatchWorker(model_runner, WorkerConfig())
        idle.start()
        try:
            out = await idle.submit(refresh, "a")
            assert out is not None and out.shape[0] == refresh.n_frames
            assert outcomes(idle) == (1, 0)
            # the refreshes of streams in step wait for each other and share a batch
            batches = idle.batches
            both = await asyncio.gather(idle.submit(refresh, "a"), idle.submit(refresh, "b"))
            assert all(x is not None for x in both) and idle.batches == batches + 1
            assert outcomes(idle) == (3, 0)
            # behind other windows (one window per batch here): skipped at once, the others all run
            busy = BatchWorker(model_runner, WorkerConfig(max_batch=1))
            busy.start()
            try:
                got = await asyncio.gather(busy.submit(full, "a"), busy.submit(refresh, "b"),
                                           busy.submit(full, "c"))
                assert got[1] is None and got[0] is not None and got[2] is not None
                assert outcomes(busy) == (0, 1)
            finally:
                await busy.stop()
            # load: a burst of full windows (about 1.6 s of model time) keeps the model busy most of the last 2 s
            t0 = time.perf_counter()
            model_runner([full.samples] * 4)
            burst = [full] * max(8, math.ceil(1.6 / ((time.perf_counter() - t0) / 4)))
            t0 = time.perf_counter()
            await idle.run_many(burst, "flood")
            took = time.perf_counter() - t0
            load = idle.load.load(time.perf_counter())
            assert load == pytest.approx(min(took, 2.0) / 2.0, abs=0.15) and load >= 0.5
            assert await idle.submit(refresh, "a") is None
            assert outcomes(idle) == (3, 1)
            await asyncio.sleep(2.1)  # the burst leaves the horizon
            assert await idle.submit(refresh, "a") is not None
        finally:
            await idle.stop()
        never = BatchWorker(model_runner, WorkerConfig(refresh_max_load=0.0))
        never.start()
        try:
            assert await never.submit(refresh, "a") is None
            assert outcomes(never) == (0, 1)
        finally:
            await never.stop()


async def test_a_refresh_holds_its_stream_back_briefly_at_most(model_runner, speech):
    """A refresh alone does not wait worker.max_wait_ms for company, and one stuck behind a long batch is given up
    (None, counted as skipped) while that batch still runs: the stream goes on without it."""
    from streamer.aio.worker import REFRESH_WAIT_S, BatchWorker
    from streamer.config import WorkerConfig

    full, refresh = _refresh_windows(model_runner, speech)
    alone = BatchWorker(model_runner, WorkerConfig(max_wait_ms=5000))
    alone.start()
    try:
        async with asyncio.timeout(TIMEOUT):
            t0 = time.perf_counter()
            assert await alone.submit(refresh, "a") is not None
            assert time.perf_counter() - t0 < 2.5  # not the 5 s a full window waits for company
    finally:
        await alone.stop()
    model_runner([full.samples] * 4)  # warm
    t0 = time.perf_counter()
    model_runner([full.samples] * 4)
    n = max(8, math.ceil(5 * REFRESH_WAIT_S / ((time.perf_counter() - t0) / 4)))  # a batch of ~5x the refresh wait
    worker = BatchWorker(model_runner, WorkerConfig(max_wait_ms=0, max_batch=n, max_windows_per_stream=n))
    worker.start()
    try:
        async with asyncio.timeout(TIMEOUT):
            long = asyncio.create_task(worker.run_many([full] * n, "flood"))
            for _ in range(1000):  # queued, then taken: the batch is in the model thread
                await asyncio.sleep(0.001)
                if worker.queued == 0 and worker.metrics.queue_wait._sum.get() > 0:
                    break
            assert worker.queued == 0 and not long.done()  # the long batch is in the model thread, nothing queued
            assert await worker.submit(refresh, "a") is None
            assert not long.done()  # given up while the batch still ran
            assert worker.metrics.refresh_windows.labels("skipped")._value.get() == 1
            assert all(x is not None for x in await long)
            assert worker.metrics.refresh_windows.labels("run")._value.get() == 0
    finally:
        await worker.stop()


@pytest.mark.parametrize("protocol", ["native", "vosk", "realtime"])
async def test_sigterm_ends_a_stream_whose_client_keeps_sending(daemon_factory, model_runner, speech, protocol):
    """SIGTERM while a client streams a minute at 5x real time and never stops sending: the daemon stops reading it,
    sends the finals of the audio it accepted (the first sentence's, at least) and closes it cleanly (1001) while
    the client still has most of its audio to send; before, a queued message went before the shutdown, so such a
    client was served until it stopped sending."""
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0", "vosk.sample_rate=16000",
                             "server.shutdown_timeout_s=120")
    audio = pcm16(np.tile(speech, int(60 * 16000 / len(speech)) + 1)[: 60 * 16000])
    first = reference_finals(model_runner, speech)[0]["text"]
    chunk, texts, sent = 3200, [], 0
    url = {"native": f"ws://127.0.0.1:{d.port}/v1/stream", "vosk": f"ws://127.0.0.1:{d.vosk_port}",
           "realtime": f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription"}[protocol]

    def message(pcm: bytes) -> bytes | str:
        if protocol != "realtime":
            return pcm
        pcm24 = pcm16(soxr.resample(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, 16000, 24000))
        return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm24).decode()})

    async def read(ws) -> None:
        async for raw in ws:
            m = json.loads(raw)
            text = m.get("transcript") if protocol == "realtime" and m.get("type", "").endswith(".completed") \
                else m.get("text") if m.get("type") in ("final", None) else None
            if text:
                texts.append(text)

    async with asyncio.timeout(4 * TIMEOUT), connect(url, max_size=None) as ws:
        reader = asyncio.create_task(read(ws))
        try:
            for sent in range(0, len(audio), chunk):
                if sent == 6 * 32000:  # 6 s in: the first sentence was sent
                    stopping = asyncio.create_task(d.shutdown())
                await ws.send(message(audio[sent : sent + chunk]))
                await asyncio.sleep(0.02)
        except ConnectionClosed:
            pass
        await reader
        await stopping
    assert ws.close_code == 1001, ws.close_reason
    total = len(audio)
    assert sent < total // 2, f"the client could send {sent / 32000:.1f} s of its {total / 32000:.0f} s"
    assert texts and texts[0] == first, texts
