"""The model worker: one thread owns the model; windows of all streams are batched into it, fairly.

Each stream's windows wait in their own queue (:class:`streamer.fair.FairQueue`) with a deadline, when
their audio would have arrived at real time (:class:`streamer.fair.Pace`), or none for audio that came well
ahead of real time (:func:`streamer.fair.deadline`: a client that sends a minute at once, an upload); a batch
takes them earliest deadline first, at most ``worker.max_windows_per_stream`` of one stream. Windows due
within ``DUE_AHEAD_S`` run first, in batches of their own; the others run only while none is due, in batches
kept to about ``worker.ahead_batch_ms`` of model time, so a window that falls due meanwhile waits little for
the model. However many streams send ahead, and even when the model cannot keep up with all the audio at
1x, a real-time stream's windows go first.
A stream's windows are dropped before they run once its caller stops waiting (cancelled: the
client left) or :meth:`BatchWorker.forget` is called.

A window that a final waits for (:attr:`streamer.engine.Window.closing`: the rest of the audio at a client's flush,
an endpoint window) of a real-time stream runs at once, before every other due window and in a batch of closing
windows only: it does not wait ``max_wait_ms`` for company, nor for the model time of other streams' windows in its
batch (on a CPU a batch costs about the sum of its windows). A flush used to wait 10 ms for company and then the
whole batch it joined; the final it waits for is what a voice agent acts on.

Partial refreshes (optional windows, :attr:`streamer.engine.Window.optional`) spend spare model time
only: one is queued only while no other window waits (refreshes may: they batch together) and the
other windows kept the model busy less than ``worker.refresh_max_load`` of the last 2 s, and a batch
runs it only if still no other window waits behind it. Otherwise it is answered with None (skipped)
at once: its stream does not wait for a busy model, and near capacity refreshes cost nothing.

With a remote model server (``[model_server] kind = "triton"``, :class:`streamer.triton.AsyncRunner`) the batches
are awaited on the event loop instead of run in the model thread, up to ``max_inflight`` of them at once, and the
runner's health check runs beside the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from streamer.aio.metrics import Metrics
from streamer.config import WorkerConfig
from streamer.engine import SAMPLE_RATE, Window
from streamer.exceptions import InferenceError
from streamer.fair import FairQueue, LoadMeter
from streamer.runner import Runner
from streamer.triton import AsyncRunner

logger = logging.getLogger("streamer.worker")

REFRESH_WAIT_S = 0.2
"""the longest a stream waits for a partial refresh (one refresh interval by default); later it is skipped"""
DUE_AHEAD_S = 1.0
"""a window due within this many seconds is due now: a real-time client's last message (up to a second of
audio, fed as one piece) is due when its last sample would have come"""
URGENT_EVERY_S = 1.0
"""audio seconds of a stream between two of its closing windows that run ahead of every other window: a final
asked for after each utterance goes first, a client flushing after every 100 ms message does not (four such
clients made the finals of the real-time streams beside them 3 s late; its closing windows then keep their
deadline, as every other window)"""
REFRESH_BATCH_WAIT_S = 0.01
"""the longest a batch of refreshes alone waits for more windows (``worker.max_wait_ms`` if shorter)"""
LAG_EVERY_S = 0.25
"""how often the streams' lag gauges (``streamer_stream_lag_seconds``) are set, at the batch that follows: each batch
set every stream's, so 64 streams' 40 batches a second set 2,500 gauges a second, and twice the streams four times
as many. A live stream's batches come every hop: a gauge is at most a hop and this late"""


@dataclass(eq=False)
class _Item:
    window: Window
    future: asyncio.Future[np.ndarray | None]
    queued_at: float
    urgent: bool = False


class BatchWorker:
    """Collects ready windows for up to ``max_wait_ms`` (or ``max_batch`` windows) and runs them.

    The model runs in a dedicated thread, so the event loop never blocks on it. A failed model
    call fails the futures of that batch only; the worker keeps serving.
    """

    def __init__(self, runner: Runner, cfg: WorkerConfig, metrics: Metrics | None = None) -> None:
        self.runner = runner
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self._queue: FairQueue[str, _Item] = FairQueue()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(cfg.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-model")
        self._task: asyncio.Task[None] | None = None
        self._lagging: set[str] = set()  # streams with a lag gauge to keep up to date
        self._lag_set = -math.inf  # when the lag gauges were last set (time.perf_counter)
        self.load = LoadMeter(2.0)
        """model time spent on mandatory windows (all but partial refreshes), as a share of the last 2 s"""
        self._optional = 0  # optional windows (partial refreshes) in the queue
        self._urgent = 0  # closing windows of real-time streams in the queue
        self._urgent_end: dict[str, int] = {}  # per stream, the audio sample where its last urgent window ended
        self.batches = 0
        self.remote = runner if isinstance(runner, AsyncRunner) else None
        """the model server the batches go to (awaited on the loop), or None: the model thread runs them"""
        self._inflight = asyncio.Semaphore(self.remote.max_inflight if self.remote is not None else 1)
        self._calls: set[asyncio.Task[None]] = set()  # batches on the model server
        self._watch: asyncio.Task[None] | None = None
        self._ahead = cfg.max_windows_per_stream
        """the most windows a batch of audio sent ahead of real time takes (adapted to ``ahead_batch_ms``)"""

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Windows waiting for the model (of every stream)."""
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="streamer-worker")
        if self.remote is not None:
            self._watch = asyncio.create_task(self.remote.watch(), name="streamer-model-server-health")
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
            if self.remote is not None:
                await self._stop_remote(self.remote)
            for key in self._queue.keys():
                for item in self._queue.drop(key):
                    if not item.future.done():
                        item.future.set_exception(InferenceError("the model worker stopped"))
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _stop_remote(self, remote: AsyncRunner) -> None:
        """Cancel the health check and the batches on the model server (their windows fail), close the connection."""
        tasks = [t for t in (self._watch, *self._calls) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await remote.aclose()

    async def submit(self, window: Window, stream: str = "", *, refresh: bool = True, due: float = 0.0
                     ) -> np.ndarray | None:
        """Queue one window of ``stream``, due at ``due`` (``time.monotonic()``; 0: due now; ``math.inf``: spare
        model time only); return its log-probabilities once the model ran it.

        None: an optional window (a partial refresh) the worker skipped (always with ``refresh = False``);
        answer it with ``session.skip``.
        """
        if not self.alive:
            raise InferenceError("the model worker is not running")
        if window.optional and self.skip_refreshes(1, refresh=refresh):
            return None
        urgent = window.closing and due != math.inf and self._may_go_first(stream, window)
        async with self._slots:
            fut: asyncio.Future[np.ndarray | None] = asyncio.get_running_loop().create_future()
            # due before every other window (a stream's own windows ahead of it still go first: the queue keeps
            # each stream's order)
            self._queue.put(stream, _Item(window, fut, time.perf_counter(), urgent), -math.inf if urgent else due)
            self._optional += window.optional
            self._urgent += urgent
            self._arrived.set()
            if not window.optional:
                return await fut
            try:  # a refresh holds its stream back a bounded while: by then the next one is due
                return await asyncio.wait_for(asyncio.shield(fut), REFRESH_WAIT_S)
            except TimeoutError:
                if fut.cancel():  # not run yet: dropped when a batch takes it
                    self._skipped(1)
                    return None
                return fut.result()  # it just came

    async def run_many(self, windows: list[Window], stream: str = "", *, refresh: bool = True, due: float = 0.0
                       ) -> list[np.ndarray | None]:
        """Submit the windows of ``stream`` together (they may share a batch), due at ``due``; results in the same
        order (None for a skipped optional window; ``refresh = False`` skips them all)."""
        if not windows:
            return []
        if stream:
            self._lagging.add(stream)
        return list(await asyncio.gather(*(self.submit(w, stream, refresh=refresh, due=due) for w in windows)))

    def skip_refreshes(self, n: int, *, refresh: bool = True) -> bool:
        """Whether ``n`` partial refreshes (optional windows) submitted now would be skipped at once (``refresh`` off,
        or no spare model time: :meth:`submit`); if so they count as skipped, and their stream answers them with
        ``session.skip`` without submitting them."""
        if refresh and self._spare():
            return False
        self._skipped(n)
        return True

    def _may_go_first(self, stream: str, window: Window) -> bool:
        """Whether a closing window of a real-time ``stream`` runs ahead of every other window: at most one per
        :data:`URGENT_EVERY_S` of the stream's audio. (Audio sent ahead of real time waits its turn all the same.)"""
        end = window.end_sample
        last = self._urgent_end.get(stream)
        if last is not None and end - last < URGENT_EVERY_S * SAMPLE_RATE:
            return False
        self._urgent_end[stream] = end
        return True

    def forget(self, stream: str) -> None:
        """``stream`` ended: drop its queued windows (their callers get CancelledError) and its lag gauge."""
        self._urgent_end.pop(stream, None)
        for item in self._queue.drop(stream):
            self._optional -= item.window.optional
            self._urgent -= item.urgent
            item.future.cancel()
        if stream in self._lagging:
            self._lagging.discard(stream)
            try:
                self.metrics.stream_lag.remove(stream)
            except KeyError:
                pass

    def lag(self, stream: str) -> float:
        """Seconds the oldest queued window of ``stream`` has waited (0 when none waits)."""
        item = self._queue.peek(stream)
        return time.perf_counter() - item.queued_at if item is not None else 0.0

    def _take(self) -> tuple[list[_Item], bool]:
        """The next batch, fairly across streams, without the windows nobody waits for any more; whether it holds
        audio sent ahead of real time (no window was due)."""
        batch: list[_Item] = []
        ahead = False
        while not batch and len(self._queue):
            per_key = self.cfg.max_windows_per_stream
            # closing windows first, in a batch of their own
            taken = self._queue.take(self.cfg.max_batch, per_key, -math.inf) if self._urgent else []
            if not taken:
                taken = self._queue.take(self.cfg.max_batch, per_key, time.monotonic() + DUE_AHEAD_S)
            ahead = not taken
            if ahead:  # nothing due: spare model time, in a batch short enough not to hold up what falls due
                taken = self._queue.take(self._ahead, per_key)
            self._optional -= sum(item.window.optional for _, item in taken)
            self._urgent -= sum(item.urgent for _, item in taken)
            batch = [item for _, item in taken if not item.future.done()]  # the stream's caller is gone
            if any(item.window.optional for item in batch) and not self._spare():
                batch = self._skip_optional(batch)
        return batch, ahead

    def _ran_ahead(self, size: int, model_s: float) -> None:
        """A batch of ``size`` windows sent ahead of real time took ``model_s``: the next such batch takes half as
        many windows if it took longer than ``worker.ahead_batch_ms``, one more if it took less than half."""
        target = self.cfg.ahead_batch_ms / 1000
        if model_s > target:
            self._ahead = max(1, min(self._ahead, size) // 2)
        elif model_s < target / 2 and size >= self._ahead:
            self._ahead = min(self.cfg.max_batch, self._ahead + 1)

    def _spare(self) -> bool:
        """Whether partial refreshes may run now: no other window waits (refreshes may: they batch together), and
        the model has spare time."""
        return (len(self._queue) == self._optional
                and self.load.load(time.perf_counter()) < self.cfg.refresh_max_load)

    def _skipped(self, n: int) -> None:
        self.metrics.refresh_windows.labels("skipped").inc(n)

    def _skip_optional(self, batch: list[_Item]) -> list[_Item]:
        """Answer the optional windows of ``batch`` with None (skipped); the rest of the batch."""
        keep = [item for item in batch if not item.window.optional]
        for item in batch:
            if item.window.optional:
                item.future.set_result(None)
        self._skipped(len(batch) - len(keep))
        return keep

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.cfg.max_wait_ms / 1000
        while True:
            while not len(self._queue):
                self._arrived.clear()
                await self._arrived.wait()
            start = time.perf_counter()
            deadline = start + max_wait
            while len(self._queue) < self.cfg.max_batch and not self._urgent:  # (a final waits: no company)
                # refreshes alone wait little for company: their streams wait for them, and they age
                limit = start + min(max_wait, REFRESH_BATCH_WAIT_S) if self._optional == len(self._queue) else deadline
                remaining = limit - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch, ahead = self._take()
            if not batch:
                continue
            now = time.perf_counter()
            for item in batch:
                self.metrics.queue_wait.observe(now - item.queued_at)
            if now - self._lag_set >= LAG_EVERY_S:
                self._lag_set = now
                for stream in self._lagging:
                    self.metrics.stream_lag.labels(stream).set(self.lag(stream))
            samples = [item.window.samples for item in batch]
            if self.remote is not None:
                await self._inflight.acquire()
                call = asyncio.create_task(self._run_remote(self.remote, batch, samples, ahead))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)
                continue
            t0 = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self.runner.run, samples)
            except Exception as exc:
                logger.error("model call failed on %d windows: %s", len(batch), exc, exc_info=True)
                err = exc if isinstance(exc, InferenceError) else InferenceError(f"model call failed: {exc}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            self._deliver(batch, samples, outputs, time.perf_counter() - t0, ahead)

    async def _run_remote(self, remote: AsyncRunner, batch: list[_Item], samples: list[np.ndarray],
                          ahead: bool) -> None:
        """One batch on the model server (several run at once); a failure fails this batch's windows only."""
        t0 = time.perf_counter()
        try:
            outputs = await remote.infer(samples)
        except Exception as exc:
            logger.error("model server call failed on %d windows: %s", len(batch), exc)
            err = exc if isinstance(exc, InferenceError) else InferenceError(f"model call failed: {exc}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceError("the model worker stopped"))
            raise
        finally:
            self._inflight.release()
        self._deliver(batch, samples, outputs, time.perf_counter() - t0, ahead)

    def _deliver(self, batch: list[_Item], samples: list[np.ndarray], outputs: list[np.ndarray],
                 model_s: float, ahead: bool = False) -> None:
        """Count a batch that ran and hand each window its output."""
        self.batches += 1
        if ahead:
            self._ran_ahead(len(batch), model_s)
        optional = sum(len(item.window.samples) for item in batch if item.window.optional)
        self.load.add(time.perf_counter(), model_s * (1 - optional / max(1, sum(len(x) for x in samples))))
        ran = sum(1 for item in batch if item.window.optional and not item.future.cancelled())  # (late: skipped)
        if ran:
            self.metrics.refresh_windows.labels("run").inc(ran)
        self.metrics.add_model_time(model_s)
        self.metrics.add_provisional([item.window for item in batch], model_s)  # early partials' share
        self.metrics.batch_size.observe(len(batch))
        self.metrics.windows.inc(len(batch))
        self.metrics.window_audio_seconds.inc(sum(len(s) for s in samples) / SAMPLE_RATE)
        for item, out in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(out)
