"""Live streams: audio bytes in, events out, the model reached through the batching worker.

:class:`Streams` is the one factory of live streams (the daemon's handlers and capture sources,
``streamer mic``): it holds what every stream shares (the worker, the hub, the metrics, the
model's vocabulary) and what a reload may change (the config, the word decoder).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np

from streamer.aio.hub import Hub
from streamer.aio.metrics import Metrics
from streamer.aio.worker import BatchWorker
from streamer.audio import AudioConverter, decode_pcm
from streamer.config import Config
from streamer.engine import SAMPLE_RATE, StreamSession, WordDecoder
from streamer.events import Event, Final
from streamer.fair import AudioBudget
from streamer.runner import TokenVocabulary
from streamer.transcribe import new_session

FEED_PIECE = SAMPLE_RATE
"""samples (16 kHz) fed to the engine at a time: a second of audio, two to three hops"""


class LiveStream:
    """Couples a :class:`StreamSession` to the worker, metrics and the event hub.

    Every method returns the events it produced, already published to the hub. Make one with
    :meth:`Streams.open`.
    """

    def __init__(self, session: StreamSession, worker: BatchWorker, hub: Hub, metrics: Metrics, *, id: str,
                 name: str, sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
                 budget: AudioBudget | None = None) -> None:
        self.id = id
        self.name = name
        self.encoding = encoding
        self.channels = channels
        self.sample_rate = sample_rate
        self.converter = AudioConverter(sample_rate, channels)
        self.session = session
        self.worker = worker
        self.hub = hub
        self.metrics = metrics
        self.budget = budget
        """how fast the client may send (None: no limit); feeding waits when it sends faster"""
        self.closed = False

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
        if self.budget is not None:
            wait = self.budget.take(seconds, time.monotonic())
            if wait > 0:  # faster than allowed: hold the audio (and stop reading from the client) a while
                await asyncio.sleep(wait)
        mono = self.converter.convert(block)
        self.metrics.add_audio(seconds)
        events: list[Event] = []
        for i in range(0, max(len(mono), 1), FEED_PIECE):
            self.session.accept_audio(mono[i : i + FEED_PIECE])
            events += await self._run()
        return events

    async def flush(self) -> list[Event]:
        self.session.accept_audio(self.converter.convert(np.zeros((0, self.channels), np.float32), last=True))
        self.converter = AudioConverter(self.sample_rate, self.channels)  # the resampler was drained
        self.session.flush()
        return await self._run()

    async def finish(self) -> list[Event]:
        """End of audio: the last finals. Then :meth:`close`."""
        if self.closed:
            return []
        self.closed = True
        self.session.accept_audio(self.converter.convert(np.zeros((0, self.channels), np.float32), last=True))
        self.session.finish()
        try:
            return await self._run()
        finally:
            self.close()

    def close(self) -> None:
        """Release what the stream holds in the worker (queued windows, its lag gauge). Idempotent."""
        self.closed = True
        self.worker.forget(self.id)

    async def _run(self) -> list[Event]:
        t_ready = time.perf_counter()
        windows = self.session.windows_to_run()
        results = await self.worker.run_many(windows, self.id)
        for w, lp in zip(windows, results, strict=True):
            self.session.accept_result(w, lp)
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

    def open(self, *, sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
             name: str | None = None, id: str | None = None, words: WordDecoder | None = None) -> LiveStream:
        """A new stream; ``words`` is the stream's own word list (default: the daemon's)."""
        sid = id or uuid.uuid4().hex[:12]
        session = new_session(self.cfg, self.vocab, words or self.words)
        srv = self.cfg.server
        budget = AudioBudget(srv.max_speed, srv.max_burst_s, time.monotonic()) if srv.max_speed > 0 else None
        return LiveStream(session, self.worker, self.hub, self.metrics, id=sid, name=name or sid,
                          sample_rate=sample_rate, channels=channels, encoding=encoding, budget=budget)
