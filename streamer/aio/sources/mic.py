"""Capture sources the daemon runs (``[[sources]]``): a microphone captioning a room or a stage.

A :class:`MicSource` feeds its device into a :class:`~streamer.aio.stream.LiveStream` named
after the source, so its events reach the hub: websocket viewers at ``/v1/listen/<name>`` and
the MQTT publisher. When the device is missing, fails to open or stops delivering audio, the
words heard so far are finalised and the source retries with exponential backoff, rescanning
PortAudio's device list so that a device plugged back in is found.
"""

from __future__ import annotations

import asyncio
import logging

from streamer.aio.sources.capture import Capture, find_device, pump
from streamer.aio.stream import Streams
from streamer.config import SourceConfig
from streamer.exceptions import StreamerError

__all__ = ["MicSource"]

logger = logging.getLogger("streamer.sources")


class MicSource:
    """A daemon service (``start`` / ``stop``) that captions one microphone."""

    is_source = True
    """the daemon stops sources with the client streams, before viewers and publishers"""

    def __init__(self, streams: Streams, cfg: SourceConfig, *, retry_min_s: float = 0.5, retry_max_s: float = 30.0,
                 stall_s: float = 5.0) -> None:
        self.streams = streams
        self.cfg = cfg
        self.name = cfg.name
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.stall_s = stall_s
        self.log = logging.LoggerAdapter(logger, {"source": cfg.name})
        self.attempts = 0
        self.heard = False
        """whether the last attempt captured any audio"""
        self._capture: Capture | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<MicSource {self.name!r} device={self.cfg.device or 'default'!r}>"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"streamer-source-{self.name}")

    async def stop(self) -> None:
        """Stop capturing, finalise the last words (published as usual), then return. Idempotent."""
        self._stopping.set()
        if self._capture is not None:
            self._capture.stop()
        if self._task is None:
            return
        _, pending = await asyncio.wait({self._task}, timeout=self.streams.cfg.server.shutdown_timeout_s)
        if pending:
            self.log.warning("source %s did not finish in time; cancelling it", self.name)
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        delay = self.retry_min_s
        while not self._stopping.is_set():
            self.attempts += 1
            self.heard = False
            try:
                await self._capture_once(rescan=self.attempts > 1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a source keeps trying: log, back off, retry
                self.log.warning("source %s: %s; retrying in %.1f s", self.name, exc, delay,
                                 exc_info=not isinstance(exc, StreamerError))
            else:
                if self._stopping.is_set():
                    break
                self.log.warning("source %s: capture ended; retrying in %.1f s", self.name, delay)
            if self.heard:  # the device worked: start backing off from the beginning
                delay = self.retry_min_s
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, self.retry_max_s)

    async def _capture_once(self, *, rescan: bool) -> None:
        """Capture until stopped or the device fails."""
        device = await asyncio.to_thread(find_device, self.cfg.device or None, rescan=rescan)
        capture = Capture(device, sample_rate=self.cfg.sample_rate, channels=self.cfg.channels,
                          stall_s=self.stall_s, logger=self.log)
        async with capture:
            self._capture = capture
            try:
                if self._stopping.is_set():
                    capture.stop()
                self.log.info("source %s: capturing from %s at %d Hz, %d ch", self.name, device.describe(),
                              capture.sample_rate, capture.channels)
                stream = self.streams.open(sample_rate=capture.sample_rate, channels=capture.channels,
                                           name=self.name)
                stream.wants_partials = False  # (a source's events go to viewers and MQTT, which say if they take them)
                await pump(capture, stream)
            finally:
                self._capture = None
                self.heard = capture.stats.blocks > 0

