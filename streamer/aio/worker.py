"""The model worker: one thread owns the model; windows of all streams are batched into it."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from streamer.aio.metrics import Metrics
from streamer.config import WorkerConfig
from streamer.engine import SAMPLE_RATE, Window
from streamer.exceptions import InferenceError
from streamer.runner import Runner

logger = logging.getLogger("streamer.worker")


class BatchWorker:
    """Collects ready windows for up to ``max_wait_ms`` (or ``max_batch`` windows) and runs them.

    The model runs in a dedicated thread, so the event loop never blocks on it. A failed model
    call fails the futures of that batch only; the worker keeps serving.
    """

    def __init__(self, runner: Runner, cfg: WorkerConfig, metrics: Metrics | None = None) -> None:
        self.runner = runner
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self._items: collections.deque[tuple[Window, asyncio.Future[np.ndarray], float]] = collections.deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(cfg.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-model")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return len(self._items)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="streamer-worker")
        self.metrics.worker_alive.set(1)

    async def stop(self) -> None:
        """Stop the loop and fail what is still queued. A cancellation of the caller still propagates."""
        try:
            if self._task is not None:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # the caller was cancelled, not (only) the loop: let it know
        finally:
            self.metrics.worker_alive.set(0)
            for _, fut, _ in self._items:
                if not fut.done():
                    fut.set_exception(InferenceError("the model worker stopped"))
            self._items.clear()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, window: Window) -> np.ndarray:
        """Queue one window; return its log-probabilities once the model ran it."""
        if not self.alive:
            raise InferenceError("the model worker is not running")
        async with self._slots:
            fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
            self._items.append((window, fut, time.perf_counter()))
            self._arrived.set()
            return await fut

    async def run_many(self, windows: list[Window]) -> list[np.ndarray]:
        """Submit windows together (they may share a batch); results in the same order."""
        if not windows:
            return []
        return list(await asyncio.gather(*(self.submit(w) for w in windows)))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.cfg.max_wait_ms / 1000
        while True:
            while not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = time.perf_counter() + max_wait
            while len(self._items) < self.cfg.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._items.popleft() for _ in range(min(len(self._items), self.cfg.max_batch))]
            batch = [item for item in batch if not item[1].done()]  # drop those whose stream is gone
            if not batch:
                continue
            now = time.perf_counter()
            for _, _, t in batch:
                self.metrics.queue_wait.observe(now - t)
            samples = [w.samples for w, _, _ in batch]
            t0 = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self.runner.run, samples)
            except Exception as exc:
                logger.error("model call failed on %d windows: %s", len(batch), exc, exc_info=True)
                err = exc if isinstance(exc, InferenceError) else InferenceError(f"model call failed: {exc}")
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self.batches += 1
            self.metrics.add_model_time(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.windows.inc(len(batch))
            self.metrics.window_audio_seconds.inc(sum(len(s) for s in samples) / SAMPLE_RATE)
            for (_, fut, _), out in zip(batch, outputs, strict=True):
                if not fut.done():
                    fut.set_result(out)
