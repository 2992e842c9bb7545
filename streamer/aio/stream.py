"""Live streams: audio bytes in, events out, the model reached through the batching worker.

:class:`Streams` is the one factory of live streams (the daemon's handlers and capture sources,
``streamer mic``): it holds what every stream shares (the worker, the hub, the metrics, the
model's vocabulary, the engine thread) and what a reload may change (the config, the word decoder).

Engine work off the event loop: with ``server.engine_thread`` (the default) a stream's engine calls
(converting and windowing its audio, merging the model's outputs, the word-list search that makes
its text) run in one engine thread per process, so the event loop only moves bytes: websocket
reads, writes and pings of other clients are served while a word list is searched. One thread,
not a pool: flashlight-text's search holds the GIL (two threads decode no faster than one,
measured in ``docs/scaling.md``), so more threads would only contend; more cores are used with
more processes (``serve --processes N``). A stream awaits each engine call before the next, so
its events keep their order; the calls of all streams queue in the thread in the order they
came, as the event loop ran them before.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from streamer.aio.hub import Hub
from streamer.aio.metrics import Metrics
from streamer.aio.worker import BatchWorker
from streamer.audio import AudioConverter, decode_pcm
from streamer.config import Config
from streamer.engine import SAMPLE_RATE, StreamSession, Window, WordDecoder
from streamer.events import Event, Final
from streamer.fair import Pace
from streamer.runner import TokenVocabulary, geometry_of
from streamer.transcribe import feed_audio, new_session, speech_detector

FEED_PIECE = SAMPLE_RATE
"""samples (16 kHz) fed to the engine at a time: a second of audio, two to three hops"""
LIVE_AHEAD_S = 2.0
"""a stream whose audio came more than this ahead of real time is not live: no partial refreshes for it
(its partials are overtaken at once by the audio behind them)"""

T = TypeVar("T")


class LiveStream:
    """Couples a :class:`StreamSession` to the worker, metrics and the event hub.

    Every method returns the events it produced, already published to the hub. Make one with
    :meth:`Streams.open`.
    """

    def __init__(self, session: StreamSession, worker: BatchWorker, hub: Hub, metrics: Metrics, *, id: str,
                 name: str, sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
                 pace: Pace | None = None, engine: ThreadPoolExecutor | None = None) -> None:
        self.id = id
        self.name = name
        self.encoding = encoding
        self.channels = channels
        self.sample_rate = sample_rate
        self.converter = AudioConverter(sample_rate, channels)
        self.session = session
        self.detector = speech_detector(session)
        """the stream's voice-activity detector (``[endpoint] vad``; None without it), run with the engine calls"""
        self.worker = worker
        self.hub = hub
        self.metrics = metrics
        self.pace = pace
        """how fast the client may send, feeding waits when it sends faster, and when its audio is due (None: no
        limit, always due); a connection gives each of its streams the same"""
        self.engine = engine
        """the thread the session's engine calls run in (None: on the event loop)"""
        self.closed = False
        self._started: float | None = None  # when the first audio came (time.monotonic)
        self._fed_s = 0.0  # audio seconds fed

    async def feed_bytes(self, data: bytes) -> list[Event]:
        """Decode PCM bytes in this stream's encoding; raises AudioError on bad input."""
        return await self.feed(decode_pcm(data, self.encoding, self.channels))

    async def feed(self, block: np.ndarray) -> list[Event]:
        """Feed a block at the stream's rate and channels; the events it produced.

        A long block (a client may send a minute of audio in one message) goes into the engine one
        piece at a time, each piece's windows run before the next is fed: the stream never has more
        than a few windows waiting (memory), and the worker can serve other streams in between.
        """
        seconds = len(block) / self.sample_rate
        now = time.monotonic()
        if self.pace is not None and (wait := self.pace.take(seconds, now)) > 0:
            # faster than allowed: hold the audio (and stop reading from the client) a while
            await asyncio.sleep(wait)
            now = time.monotonic()
        due = self.pace.due(seconds, now) if self.pace is not None else 0.0  # when the block's start is due
        self.metrics.add_audio(seconds)
        if self._started is None:
            self._started = time.monotonic()
        self._fed_s += seconds
        mono, windows = await self._call(self._take, block)
        events = await self._run(windows, due + min(len(mono), FEED_PIECE) / SAMPLE_RATE)
        for i in range(FEED_PIECE, len(mono), FEED_PIECE):
            windows = await self._call(self._accept, mono[i : i + FEED_PIECE])
            events += await self._run(windows, due + min(len(mono), i + FEED_PIECE) / SAMPLE_RATE)
        return events

    async def flush(self) -> list[Event]:
        return await self._run(await self._call(self._end, False), self._due_end())

    async def finish(self) -> list[Event]:
        """End of audio: the last finals. Then :meth:`close`."""
        if self.closed:
            return []
        self.closed = True
        try:
            return await self._run(await self._call(self._end, True), self._due_end())
        finally:
            self.close()

    @property
    def live(self) -> bool:
        """Whether the audio comes at about real time (at most ``LIVE_AHEAD_S`` ahead of the clock since the
        first audio): only then do partial refreshes run for it."""
        return self._started is None or self._fed_s - (time.monotonic() - self._started) <= LIVE_AHEAD_S

    def _due_end(self) -> float:
        """When the last audio fed is due (windows of a flush or the end)."""
        return self.pace.end(time.monotonic()) if self.pace is not None else 0.0

    def close(self) -> None:
        """Release what the stream holds in the worker (queued windows, its lag gauge). Idempotent."""
        self.closed = True
        self.worker.forget(self.id)

    # -- the engine calls (in the engine thread, one at a time per stream) ----------------

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the engine thread (or here, without one); the stream's calls never overlap."""
        if self.engine is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.engine, fn, *args)

    def _take(self, block: np.ndarray) -> tuple[np.ndarray, list[Window]]:
        """Convert a block to 16 kHz mono and accept its first piece: the mono audio, the piece's windows."""
        mono = self.converter.convert(block)
        return mono, self._accept(mono[:FEED_PIECE])

    def _accept(self, piece: np.ndarray) -> list[Window]:
        feed_audio(self.session, piece, self.detector)
        return self.session.windows_to_run()

    def _end(self, last: bool) -> list[Window]:
        """Drain the resampler, then flush (``last``: finish) the session; the windows that remain."""
        feed_audio(self.session, self.converter.convert(np.zeros((0, self.channels), np.float32), last=True),
                   self.detector)
        self.converter = AudioConverter(self.sample_rate, self.channels)  # the resampler was drained
        if last:
            self.session.finish()
        else:
            self.session.flush()
        return self.session.windows_to_run()

    def _merge(self, windows: list[Window], results: list[np.ndarray | None]) -> list[Event]:
        for w, lp in zip(windows, results, strict=True):
            if lp is None:  # a partial refresh the worker skipped (the model was busy)
                self.session.skip(w)
            else:
                self.session.accept_result(w, lp)
        return self.session.events_received()

    async def _run(self, windows: list[Window], due: float) -> list[Event]:
        """Run ``windows`` (due at ``due``) through the worker, merge their outputs, publish the events (on the
        loop)."""
        t_ready = time.perf_counter()
        if windows:
            results = await self.worker.run_many(windows, self.id, refresh=self.live, due=due)
            events = await self._call(self._merge, windows, results)
        else:  # nothing to merge (a flush or the end may have closed a segment): no trip to the engine thread
            events = self.session.events_received()
        if events:
            latency = time.perf_counter() - t_ready
            for e in events:
                (self.metrics.final_latency if isinstance(e, Final) else self.metrics.partial_latency).observe(latency)
                self.metrics.events.labels(e.type).inc()
                self.hub.publish(self.name, self.id, e)
        return events


class Streams:
    """Makes live streams with the config and word decoder in force (a reload replaces both)."""

    def __init__(self, cfg: Config, vocab: TokenVocabulary, worker: BatchWorker, hub: Hub, metrics: Metrics,
                 words: WordDecoder | None = None) -> None:
        self.cfg = cfg
        self.vocab = vocab
        self.worker = worker
        self.hub = hub
        self.metrics = metrics
        self.words = words
        """the word decoder of ``[decoder]`` (None: greedy CTC)"""
        self._engine: ThreadPoolExecutor | None = None

    def engine(self) -> ThreadPoolExecutor | None:
        """The engine thread new streams use (made on first use); None with ``server.engine_thread = false``."""
        if not self.cfg.server.engine_thread:
            return None
        if self._engine is None:
            self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-engine")
        return self._engine

    def close(self) -> None:
        """Let the engine thread go once the streams are done (their last calls still run). Idempotent."""
        if self._engine is not None:
            self._engine.shutdown(wait=False)
            self._engine = None

    def open(self, *, sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
             name: str | None = None, id: str | None = None, words: WordDecoder | None = None,
             live: bool = True) -> LiveStream:
        """A new stream; ``words`` is the stream's own word list (default: the daemon's).

        ``live = False``: audio that is not real time (a file); its session plans no partial refreshes.
        """
        sid = id or uuid.uuid4().hex[:12]
        session = new_session(self.cfg, self.vocab, words or self.words, geometry=geometry_of(self.worker.runner),
                              refresh=live)
        srv = self.cfg.server
        pace = Pace(srv.max_speed, srv.max_burst_s, time.monotonic())
        return LiveStream(session, self.worker, self.hub, self.metrics, id=sid, name=name or sid,
                          sample_rate=sample_rate, channels=channels, encoding=encoding, pace=pace,
                          engine=self.engine())
