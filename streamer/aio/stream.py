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
its events keep their order. The thread (:class:`EngineThread`) takes the calls of all streams
earliest deadline first, as the model worker takes windows: a call's deadline is its audio's
(:func:`streamer.fair.deadline`), so the calls of clients that sent audio ahead of real time (a
burst, an upload) run only while no real-time stream's call waits. In the order the calls came,
eight clients sending 55 s at once kept a call each queued ahead of every call of a real-time
stream, each a word-list search of a second of audio.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from streamer.aio.hub import Hub
from streamer.aio.metrics import Metrics
from streamer.aio.worker import BatchWorker
from streamer.audio import AudioConverter, decode_pcm
from streamer.config import Config
from streamer.engine import SAMPLE_RATE, StreamSession, Window, WordDecoder
from streamer.events import Event, Final
from streamer.fair import FairQueue, Pace, deadline
from streamer.runner import TokenVocabulary, geometry_of
from streamer.transcribe import feed_audio, new_session, speech_detector
from streamer.vad import SpeechDetector, score

FEED_PIECE = SAMPLE_RATE
"""samples (16 kHz) fed to the engine at a time: a second of audio, two to three hops"""
LIVE_AHEAD_S = 2.0
"""a stream whose audio came more than this ahead of real time is not live: no partial refreshes for it
(its partials are overtaken at once by the audio behind them); audio that came more than this ahead has no
deadline in the model worker and the engine thread (spare time only)"""

GATHER_S = 0.01
"""how long the engine thread may hold a call that feeds audio, while many streams feed, for other streams' calls to
come and have their detectors scored in the same batch (:class:`EngineThread`)"""
GATHER_RATE = 100.0
"""feeding calls per second (about ten streams sending 100 ms messages) from which the engine thread holds them"""
GATHER_MAX = 32
"""feeding calls waiting that end the hold at once: a batch this large costs no less per stream and frame"""
HAND_BACK_S = 0.002
"""how long the results of calls that ended may wait while the engine thread runs further calls, to go back to the
event loop together (it hands them back at once whenever it has nothing left to run)"""

T = TypeVar("T")

_NO_AUDIO = np.zeros(0, dtype=np.float32)

logger = logging.getLogger("streamer.engine")


Hearing = Callable[[], SpeechDetector | None]
"""A call's first step, which the engine thread may run ahead of the call: give the stream's voice-activity
detector the call's audio (:meth:`streamer.vad.SpeechDetector.add`); the detector, or None without one."""


@dataclasses.dataclass(eq=False)
class _Call:
    """An engine call waiting in the thread's queue: a thread's (:attr:`future`) or a coroutine's (:attr:`waiter`)."""

    run: Callable[[], Any]
    due: float
    hear: Hearing | None
    """the call's first step (:data:`Hearing`), until it ran (None: the call feeds no detector)"""
    came: float
    """when it was submitted (``time.monotonic()``)"""
    future: Future[Any] | None = None
    """what a thread waits on (:meth:`EngineThread.submit`)"""
    waiter: asyncio.Future[Any] | None = None
    """what a coroutine awaits (:meth:`EngineThread.call`); set on its loop only"""
    dropped: bool = False
    """the coroutine stopped waiting (set on its loop): the call is dropped unless it began"""
    begun: bool | None = None
    """whether the call began (cancelling it no longer drops it); None until it was asked"""
    error: BaseException | None = None
    """what its first step raised, handed to the stream in place of the call's result"""

    def begin(self) -> bool:
        """Mark the call begun; False if its stream stopped waiting (the call is dropped)."""
        if self.begun is None:
            self.begun = self.future.set_running_or_notify_cancel() if self.future is not None else not self.dropped
        return self.begun


class EngineThread:
    """One thread that runs the engine calls of every stream, earliest deadline first.

    Each stream has at most one call waiting (it awaits each before the next); the thread takes the
    waiting call with the earliest deadline (:class:`streamer.fair.FairQueue`: streams in turn among equal
    deadlines), so a real-time stream's call runs before any call of audio sent ahead of real time, which
    has none, however many of those wait. A call that began runs to its end: a burst delays a real-time
    stream by one call at most, a second of audio.

    The voice-activity detector runs batched across streams: a call that feeds audio comes with its
    :data:`Hearing` (:meth:`submit`'s ``hear``), and before each call the thread runs the hearings of that call and
    of the other streams' waiting calls, then scores all their detectors' frames in one batch
    (:func:`streamer.vad.score`: 0.04 ms per stream and frame instead of 0.09 ms alone). The calls themselves
    still run earliest deadline first; each reads its stream's probabilities, which do not depend on the batch.
    A real-time call hears only the waiting calls that have a deadline, so a burst's audio never delays it;
    the more calls wait (the busier the thread), the larger the batch.

    An idle thread would take each stream's call as it comes, and score its frames alone: live streams send
    their messages at different times, so the calls seldom wait together (32 streams on one core: 6.5 ms of
    CPU per stream and audio second for the detector, against 1.9 ms in batches). So while feeding calls come
    more than ``GATHER_RATE`` times a second (about ten streams sending 100 ms messages), a feeding call is held
    at most ``gather_s`` after it came, or until ``GATHER_MAX`` wait, and the calls that feed no audio (merging
    the model's outputs) run meanwhile. Fewer streams are never held: what they would gain is small, and their
    finals and partials come as soon as before.
    """

    def __init__(self, gather_s: float = GATHER_S) -> None:
        self.gather_s = gather_s
        """the longest a feeding call is held for others to be heard with it (0: never held)"""
        self._queue: FairQueue[str, _Call] = FairQueue()
        self._ready = threading.Condition()
        self._closed = False
        self._unheard: dict[_Call, None] = {}  # calls waiting with their hearing to run, oldest first
        self._holding = False  # the thread waits for the hold to end (a feeding call need not wake it)
        self._rate = 0.0  # feeding calls per second, a decaying average over about a second ...
        self._rate_at = time.monotonic()  # ... as of this time
        self._settling = threading.Lock()
        self._settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        self._posted: set[asyncio.AbstractEventLoop] = set()  # loops woken to take their results, not yet taken
        self._settled_since = math.inf  # when the oldest result not yet handed back ended (time.monotonic())
        self._thread = threading.Thread(target=self._serve, name="streamer-engine", daemon=True)
        self._thread.start()

    def submit(self, key: str, due: float, fn: Callable[..., T], *args: object, hear: Hearing | None = None
               ) -> Future[T]:
        """Queue ``fn(*args)`` for stream ``key``, due at ``due`` (``time.monotonic()``, or ``math.inf``: only
        when nothing else waits); its future, for a thread to wait on. Cancelling the future before the call
        began drops it.

        ``hear``: the call feeds the stream's detector the audio ``hear()`` gives it. The thread runs ``hear()``
        before the call, maybe ahead of it with another stream's call (the detectors' frames are scored
        together); the call then reads the probabilities (:meth:`streamer.vad.SpeechDetector.take`). Once
        ``hear()`` ran, the call has begun: cancelling its future no longer drops it (the detector heard its
        audio).
        """
        fut: Future[T] = Future()
        self._put(key, _Call(functools.partial(fn, *args), due, hear, time.monotonic(), future=fut))
        return fut

    async def call(self, key: str, due: float, fn: Callable[..., T], *args: object, hear: Hearing | None = None
                   ) -> T:
        """:meth:`submit`, awaited on this event loop: ``fn(*args)``'s result. Cancelled before the call began,
        the call is dropped.

        The results of calls that end one after the other go back to the loop together, in one wake-up: when the
        thread has nothing left to run, or ``HAND_BACK_S`` after the first ended. With a concurrent future each
        (``asyncio.wrap_future``), each result woke the loop on its own, through a chain of callbacks on both
        sides, and on a busy core each wake-up made the two threads trade the GIL (64 greedy streams on one core:
        0.0098 -> 0.0093 CPU s per stream-second handed back together, and a further 6 % on average gathered for
        ``HAND_BACK_S``; ``docs/scaling.md``)."""
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        call = _Call(functools.partial(fn, *args), due, hear, time.monotonic(), waiter=waiter)
        self._put(key, call)
        try:
            return await waiter
        except asyncio.CancelledError:
            call.dropped = True
            raise

    def _put(self, key: str, call: _Call) -> None:
        with self._ready:
            if self._closed:
                raise RuntimeError("the engine thread was shut down")
            self._queue.put(key, call, call.due)
            if call.hear is not None:
                self._unheard[call] = None
                self._rate = self._rate_now(call.came) + 1.0
                self._rate_at = call.came
            if not (self._holding and call.hear is not None and len(self._unheard) < GATHER_MAX):
                self._ready.notify()  # (a held call joins the batch when the hold ends: no wake, no thread switch)

    def _rate_now(self, now: float) -> float:
        """Feeding calls per second lately (an exponentially decaying count, time constant one second)."""
        return self._rate * math.exp(self._rate_at - now)

    def _hold(self, now: float) -> float:
        """How much longer the feeding calls wait to be heard together (0 or less: not at all)."""
        if self._closed or not self._unheard or len(self._unheard) >= GATHER_MAX:
            return 0.0
        if self._rate_now(now) < GATHER_RATE:  # few streams: little to gain, and their calls run at once
            return 0.0
        return next(iter(self._unheard)).came + self.gather_s - now

    def shutdown(self) -> None:
        """Run the calls already queued, then let the thread end. Idempotent."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _serve(self) -> None:
        _name_os_thread(self._thread.name)
        while True:
            step = self._next_call()
            if step is None:
                return
            self._hear(step[1])
            self._run(step[0])
            # the thread must not hold the last calls (their sessions, decoders and word lists) while it waits
            del step
            self._hand_over(waiting=False)

    def _next_call(self) -> tuple[_Call, list[_Call]] | None:
        """The next call to run, and the calls to hear before it (waiting for one); None once shut down and done.
        (No call outlives this frame in the thread's: the thread must not hold one while it waits.)"""
        with self._ready:
            while True:
                while not len(self._queue) and not self._closed:
                    self._hand_over(waiting=True)
                    self._ready.wait()
                if not len(self._queue):
                    self._hand_over(waiting=True)
                    return None
                hold = self._hold(time.monotonic())
                if hold <= 0:
                    [(key, call)] = self._queue.take(1, 1)
                    heard = self._heard_with(key, call)
                    break
                # The feeding calls are held: a call that feeds no audio runs meanwhile, alone, if it has a
                # deadline (a call of audio sent ahead of real time never goes before a held real-time call).
                taken = self._queue.take(1, 1, where=lambda c: c.hear is None and c.due < math.inf)
                if taken:
                    [(key, call)] = taken
                    heard = []
                    break
                self._hand_over(waiting=True)
                self._holding = True
                self._ready.wait(hold)
                self._holding = False
            self._unheard.pop(call, None)
            for c in heard:
                self._unheard.pop(c, None)
            return call, heard

    def _heard_with(self, key: str, call: _Call) -> list[_Call]:
        """The calls whose audio is heard before ``call`` (of stream ``key``) runs, begun so that none is dropped
        once heard: ``call`` and each other stream's next waiting call with a hearing, those with a deadline only
        if ``call`` has one. (A stream's later call is never heard before its earlier one has run.)"""
        out = []
        for c in [call, *(self._queue.peek(k) for k in self._queue.keys() if k != key)]:
            if c is not None and c.hear is not None and (c is call or c.due < math.inf or call.due == math.inf):
                if c.begin():
                    out.append(c)
        return out

    @staticmethod
    def _hear(calls: list[_Call]) -> None:
        detectors = []
        for c in calls:
            hear, c.hear = c.hear, None
            assert hear is not None
            try:
                detector = hear()
            except BaseException as exc:  # the stream's own error: handed to it with its call
                c.error = exc
            else:
                if detector is not None:
                    detectors.append(detector)
        try:
            score(detectors)
        except Exception:  # each call scores what is left of its own frames, alone, and meets the error there
            logger.warning("scoring the detectors of %d streams together failed", len(detectors), exc_info=True)

    def _run(self, call: _Call) -> None:
        if not call.begin():  # its stream stopped waiting
            return
        if call.error is not None:
            self._settle(call, None, call.error)
            return
        try:
            result = call.run()
        except BaseException as exc:  # handed to the stream that awaits it, as an executor does
            self._settle(call, None, exc)
        else:
            self._settle(call, result, None)

    def _settle(self, call: _Call, result: Any, error: BaseException | None) -> None:
        """Hand a call's outcome to whoever waits: a thread at once; a coroutine with the others' that ended
        before its loop took them (one wake-up of the loop for them all)."""
        if call.future is not None:
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(result)
            return
        waiter = call.waiter
        assert waiter is not None
        with self._settling:
            self._settled.setdefault(waiter.get_loop(), []).append((waiter, result, error))
            self._settled_since = min(self._settled_since, time.monotonic())

    def _hand_over(self, waiting: bool) -> None:
        """Wake the loops whose calls' results wait, if the thread is about to wait (``waiting``) or the oldest
        result has waited ``HAND_BACK_S`` (in the engine thread)."""
        if self._settled_since == math.inf or not (waiting or time.monotonic() - self._settled_since >= HAND_BACK_S):
            return
        with self._settling:
            loops = [loop for loop in self._settled if loop not in self._posted]
            self._posted.update(loops)
            self._settled_since = math.inf
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._hand_back, loop)
            except RuntimeError:  # the loop was closed: nobody waits any more
                with self._settling:
                    self._settled.pop(loop, None)
                    self._posted.discard(loop)

    def _hand_back(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: the outcomes of its calls that ended (:meth:`_settle`)."""
        with self._settling:
            settled = self._settled.pop(loop, [])
            self._posted.discard(loop)
        for waiter, result, error in settled:
            if waiter.done():  # its stream stopped waiting after the call began
                continue
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)


def _name_os_thread(name: str) -> None:
    """Give the calling thread's OS thread ``name`` (at most 15 bytes), so that ``top -H``, ``/proc/PID/task/TID/comm``,
    ``perf`` and ``clients/loadtest.py`` tell the engine thread's CPU from the event loop's. Python names threads
    for the OS only from 3.14. Linux's ``prctl(PR_SET_NAME)``; elsewhere nothing."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass(frozen=True, slots=True)
class Arrival:
    """How the message being fed came off its client's connection."""

    queued: bool
    """it was there when read: the client sent it while the one before was being fed"""
    unread: int
    """bytes the client sent that wait unread behind it (in the kernel)"""


class LiveStream:
    """Couples a :class:`StreamSession` to the worker, metrics and the event hub.

    Every method returns the events it produced, already published to the hub. Make one with
    :meth:`Streams.open`.
    """

    def __init__(self, session: StreamSession, worker: BatchWorker, hub: Hub, metrics: Metrics, *, id: str,
                 name: str, sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
                 pace: Pace | None = None, engine: EngineThread | None = None, file_came: float | None = None) -> None:
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
        self.file_came = file_came
        """a file's: when all its audio came (``time.monotonic()``, the request); None: each block as it is fed.
        A file is read as the model takes its audio, so once the model fell behind, each block read would seem
        to come at real time and take a deadline: eight uploads of an hour starved of model time became as
        urgent as the real-time streams, and delayed their finals by 12 s"""
        self.arrival: Callable[[], Arrival] | None = None
        """how its client's messages come (its connection's receiver); None: each as if it came when fed.

        A connection is read as the model takes its audio, so a client that sends faster than real time has its
        messages read late, each as its windows are done, and they would seem to come at real time once the model
        falls behind: eight clients sending 55 s in 100 ms messages took deadlines, and made a real-time stream's
        finals 3-6 s late. What waits unread behind a message shows the client ahead; a message that was already
        there when read keeps it ahead (:attr:`Pace.ahead`)."""
        self.wants_partials = True
        """whether its client is shown partials. False (a phone call, a file, a Deepgram client without
        ``interim_results``): the stream forms partials only while someone else takes them (a viewer of its name,
        MQTT's ``publish_partials``: :meth:`Hub.wants_partials`), which saves their word searches and the model's
        provisional and refresh windows; its finals are the same"""
        self.closed = False
        self._converted = _NO_AUDIO  # 16 kHz mono audio a call's first step converted for the call
        self._skipped: list[Window] = []  # partial refreshes the worker skipped (_run), handed to the next engine call
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
        self._show_partials()
        seconds = len(block) / self.sample_rate
        now = time.monotonic()
        if self.pace is not None and (wait := self.pace.take(seconds, now)) > 0:
            # faster than allowed: hold the audio (and stop reading from the client) a while
            await asyncio.sleep(wait)
            now = time.monotonic()
        start = self.pace.due(seconds, now) if self.pace is not None else None  # when the block's start is due
        ahead = start is not None and self._sent_ahead(start + seconds, now)

        def due(end: float) -> float:
            """The deadline of the block's audio up to ``end`` seconds (0: due now, without a pace)."""
            if start is None:
                return 0.0
            return math.inf if ahead else deadline(start + end, self._received(now), LIVE_AHEAD_S)

        self.metrics.add_audio(seconds)
        if self._started is None:
            self._started = time.monotonic()
        self._fed_s += seconds
        mono, windows = await self._call(due(min(seconds, FEED_PIECE / SAMPLE_RATE)), self._take,
                                         hear=functools.partial(self._hear_block, block))
        events = await self._run(windows, due(min(len(mono), FEED_PIECE) / SAMPLE_RATE))
        for i in range(FEED_PIECE, len(mono), FEED_PIECE):
            end = due(min(len(mono), i + FEED_PIECE) / SAMPLE_RATE)
            piece = mono[i : i + FEED_PIECE]
            windows = await self._call(end, self._accept, piece, hear=functools.partial(self._hear, piece))
            events += await self._run(windows, end)
        return events

    def _received(self, now: float) -> float:
        """When the audio fed ``now`` came: now, or a file's request (:attr:`file_came`)."""
        return now if self.file_came is None else self.file_came

    def _sent_ahead(self, clock: float, now: float) -> bool:
        """Whether the client sends ahead of real time by more than what the block shows (its audio is due until
        ``clock``): the bytes waiting unread behind it reach more than ``LIVE_AHEAD_S`` ahead, or it was ahead and
        this message was already there when read (:attr:`arrival`). The answer is kept in :attr:`Pace.ahead`, for
        the client's next message and for its flush."""
        if self.arrival is None or self.pace is None:
            return False
        came = self.arrival()
        unread_s = came.unread / (self.sample_rate * self.channels * 2)
        self.pace.ahead = clock + unread_s - now > LIVE_AHEAD_S or (self.pace.ahead and came.queued)
        return self.pace.ahead

    def _show_partials(self) -> None:
        """Whether the session forms partials from now on: the client's wish, or someone else's (a viewer may
        come or go at any time). Set between the stream's engine calls, which never overlap."""
        self.session.partials = self.wants_partials or self.hub.wants_partials(self.name)

    async def flush(self) -> list[Event]:
        self._show_partials()
        due = self._due_end()
        return await self._run(await self._call(due, self._end, False), due)

    async def finish(self) -> list[Event]:
        """End of audio: the last finals. Then :meth:`close`."""
        if self.closed:
            return []
        self.closed = True
        self._show_partials()
        try:
            due = self._due_end()
            return await self._run(await self._call(due, self._end, True), due)
        finally:
            self.close()

    @property
    def live(self) -> bool:
        """Whether the audio comes at about real time (at most ``LIVE_AHEAD_S`` ahead of the clock since the
        first audio): only then do partial refreshes run for it."""
        return self._started is None or self._fed_s - (time.monotonic() - self._started) <= LIVE_AHEAD_S

    def _due_end(self) -> float:
        """The deadline of the last audio fed (windows of a flush or the end)."""
        if self.pace is None:
            return 0.0
        now = time.monotonic()
        if self.pace.ahead:  # (the end of audio sent ahead of real time is no more urgent than the audio)
            return math.inf
        return deadline(self.pace.end(now), self._received(now), LIVE_AHEAD_S)

    def close(self) -> None:
        """Release what the stream holds in the worker (queued windows, its lag gauge). Idempotent."""
        self.closed = True
        self.worker.forget(self.id)

    # -- the engine calls (in the engine thread, one at a time per stream) ----------------

    async def _call(self, due: float, fn: Callable[..., T], *args: object, hear: Hearing | None = None) -> T:
        """``fn(*args)`` in the engine thread (or here, without one), due at ``due``, after ``hear()`` (a call
        that feeds audio: :meth:`EngineThread.submit`); the stream's calls never overlap. The partial refreshes the
        worker skipped since the last call (:meth:`_run`) are answered first, in the same call."""
        if self._skipped:
            skipped, self._skipped = self._skipped, []
            args = (skipped, fn, *args)
            fn = self._answering
        if self.engine is None:
            if hear is not None:
                hear()
            return fn(*args)
        return await self.engine.call(self.id, due, fn, *args, hear=hear)

    def _answering(self, skipped: list[Window], fn: Callable[..., T], *args: object) -> T:
        """Answer the partial refreshes ``skipped`` (``session.skip``), then ``fn(*args)``."""
        for w in skipped:
            self.session.skip(w)
        return fn(*args)

    def _hear(self, piece: np.ndarray) -> SpeechDetector | None:
        """A feeding call's first step (:data:`Hearing`): give the detector the 16 kHz mono ``piece`` the call
        feeds the session."""
        if self.detector is not None:
            self.detector.add(piece)
        return self.detector

    def _hear_block(self, block: np.ndarray) -> SpeechDetector | None:
        """:meth:`_take`'s first step: convert ``block`` to 16 kHz mono (kept for the call) and hear its first
        piece."""
        self._converted = self.converter.convert(block)
        return self._hear(self._converted[:FEED_PIECE])

    def _take(self) -> tuple[np.ndarray, list[Window]]:
        """Accept the first piece of the block :meth:`_hear_block` converted: the mono audio, the piece's
        windows."""
        mono, self._converted = self._converted, _NO_AUDIO
        return mono, self._accept(mono[:FEED_PIECE])

    def _accept(self, piece: np.ndarray) -> list[Window]:
        """Feed the session ``piece``, which the detector has heard (:meth:`_hear`); the windows to run."""
        feed_audio(self.session, piece, self.detector, heard=True)
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
        if windows and all(w.optional for w in windows) and self.worker.skip_refreshes(len(windows), refresh=self.live):
            # Partial refreshes a busy worker skips (most of them, under load) are answered at the start of the
            # stream's next engine call (_call), not in a trip of their own through the worker and the engine
            # thread: the session is in the same state when that call begins (a skip shows nothing; no flush or end
            # was asked for in between, the stream's calls being one after the other).
            self._skipped += windows
            windows = []
        if windows:
            results = await self.worker.run_many(windows, self.id, refresh=self.live, due=due)
            events = await self._call(due, self._merge, windows, results)
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
        self._engine: EngineThread | None = None

    def engine(self) -> EngineThread | None:
        """The engine thread new streams use (made on first use); None with ``server.engine_thread = false``."""
        if not self.cfg.server.engine_thread:
            return None
        if self._engine is None:
            self._engine = EngineThread(gather_s=self.cfg.endpoint.vad_gather_ms / 1000)
        return self._engine

    def close(self) -> None:
        """Let the engine thread go once the streams are done (their last calls still run). Idempotent."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def open(self, *, sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
             name: str | None = None, id: str | None = None, words: WordDecoder | None = None,
             live: bool = True) -> LiveStream:
        """A new stream; ``words`` is the stream's own word list (default: the daemon's).

        ``live = False``: audio that is not real time (a file, all there now): its session plans no partial
        refreshes, and its audio past the first ``LIVE_AHEAD_S`` seconds runs in spare model time only.
        """
        sid = id or uuid.uuid4().hex[:12]
        session = new_session(self.cfg, self.vocab, words or self.words, geometry=geometry_of(self.worker.runner),
                              refresh=live)
        srv = self.cfg.server
        now = time.monotonic()
        return LiveStream(session, self.worker, self.hub, self.metrics, id=sid, name=name or sid,
                          sample_rate=sample_rate, channels=channels, encoding=encoding,
                          pace=Pace(srv.max_speed, srv.max_burst_s, now), engine=self.engine(),
                          file_came=None if live else now)
