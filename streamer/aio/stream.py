"""A live stream: audio bytes in, events out, the model reached through the batching worker."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from streamer.aio.hub import Hub
from streamer.aio.metrics import Metrics
from streamer.aio.worker import BatchWorker
from streamer.audio import AudioConverter, decode_pcm
from streamer.config import Config
from streamer.engine import SAMPLE_RATE, WordDecoder
from streamer.events import Event, Final
from streamer.transcribe import new_session


class LiveStream:
    """Couples a :class:`StreamSession` to the worker, metrics and the event hub.

    Every method returns the events it produced, already published to the hub.
    """

    def __init__(self, cfg: Config, runner: Any, worker: BatchWorker, hub: Hub, metrics: Metrics, *,
                 sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
                 name: str | None = None, words: WordDecoder | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.name = name or self.id
        self.encoding = encoding
        self.channels = channels
        self.sample_rate = sample_rate
        self.converter = AudioConverter(sample_rate, channels)
        # ``words``: the word list this stream decodes with; None = greedy CTC
        self.session = new_session(cfg, runner.vocab, words)
        self.worker = worker
        self.hub = hub
        self.metrics = metrics
        self.closed = False

    async def feed_bytes(self, data: bytes) -> list[Event]:
        """Decode PCM bytes in this stream's encoding; raises AudioError on bad input."""
        return await self.feed(decode_pcm(data, self.encoding, self.channels))

    async def feed(self, block: np.ndarray) -> list[Event]:
        mono = self.converter.convert(block)
        self.metrics.add_audio(len(block) / self.sample_rate)
        self.session.accept_audio(mono)
        return await self._run()

    async def flush(self) -> list[Event]:
        self.session.accept_audio(self.converter.convert(np.zeros((0, self.channels), np.float32), last=True))
        self.converter = AudioConverter(self.sample_rate, self.channels)  # the resampler was drained
        self.session.flush()
        return await self._run()

    async def finish(self) -> list[Event]:
        if self.closed:
            return []
        self.closed = True
        self.session.accept_audio(self.converter.convert(np.zeros((0, self.channels), np.float32), last=True))
        self.session.finish()
        return await self._run()

    async def _run(self) -> list[Event]:
        t_ready = time.perf_counter()
        windows = self.session.windows_to_run()
        results = await self.worker.run_many(windows)
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
