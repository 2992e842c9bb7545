"""Microphone capture: PortAudio input blocks handed to asyncio without ever blocking the audio thread.

PortAudio calls :meth:`Capture._callback` on its own real-time thread. The callback copies the
block and passes it to the event loop with ``loop.call_soon_threadsafe``: it takes no lock, waits
for no queue slot and does no I/O. On the loop the block goes into a bounded
:class:`asyncio.Queue`. When the consumer (the model) falls behind and the queue is full, new
blocks are dropped and counted instead of growing memory; the input overflows PortAudio reports
(``status.input_overflow``) are counted too, and both are logged (at most every few seconds)::

    device = find_device("USB")              # DeviceError names the device and lists the inputs
    async with Capture(device) as capture:
        async for block in capture:          # int16 [frames, channels] at capture.sample_rate
            ...
    print(capture.stats)

:func:`pump` feeds a capture into a :class:`~streamer.aio.stream.LiveStream`; ``streamer mic``
and the daemon's ``[[sources]]`` (:mod:`streamer.aio.sources.mic`) both use it.

PortAudio reads its device list once, when it is initialised: :func:`find_device` with
``rescan=True`` re-initialises it (only while no capture is open) so that a device plugged in
later, or plugged back in, is found.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streamer.events import Event
from streamer.exceptions import DeviceError

__all__ = ["Capture", "CaptureStats", "DeviceError", "InputDevice", "find_device", "input_devices", "pump"]

logger = logging.getLogger("streamer.capture")

# PortAudio's global calls (initialise, terminate, query, open) are not thread-safe.
_PA_LOCK = threading.Lock()
_open_streams = 0  # streams opened and not closed yet: re-initialising PortAudio would kill them
CLOSE_TIMEOUT_S = 3.0
REPORT_EVERY_S = 10.0


def _sd() -> Any:
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises OSError when libportaudio is missing
        raise DeviceError(f"cannot use audio input: {exc}; install PortAudio (Debian: libportaudio2)") from None
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    """A PortAudio device that can capture."""

    index: int
    name: str
    hostapi: str
    sample_rate: int
    """the device's default rate"""
    channels: int
    """the most input channels the device offers (ALSA plugin devices report up to 128)"""
    default: bool = False

    def describe(self) -> str:
        return f"{self.index} {self.name!r} ({self.sample_rate} Hz, {self.channels} ch)"


def input_devices() -> list[InputDevice]:
    """The input devices PortAudio knows, in its order."""
    sd = _sd()
    with _PA_LOCK:
        try:
            default = int(sd.default.device[0])
            apis = [a["name"] for a in sd.query_hostapis()]
            return [
                InputDevice(int(d["index"]), str(d["name"]), apis[d["hostapi"]], int(round(d["default_samplerate"])),
                            int(d["max_input_channels"]), int(d["index"]) == default)
                for d in sd.query_devices() if d["max_input_channels"] > 0
            ]
        except sd.PortAudioError as exc:
            raise DeviceError(f"cannot list audio devices: {exc}") from None


def describe_devices(devices: list[InputDevice]) -> str:
    if not devices:
        return "there are no input devices (check that the sound card is present, e.g. with `arecord -l`)"
    return "input devices: " + ", ".join(d.describe() for d in devices)


def rescan_devices() -> bool:
    """Re-initialise PortAudio so that its device list is current; skipped while a capture is open."""
    sd = _sd()
    with _PA_LOCK:
        if _open_streams:
            return False
        sd._terminate()
        sd._initialize()
        return True


def find_device(spec: str | int | None, *, rescan: bool = False) -> InputDevice:
    """The input device ``spec`` names: an index, a name, or part of one; empty or None: the default.

    Raises :class:`DeviceError` naming ``spec`` and listing the input devices.
    """
    if rescan:
        rescan_devices()
    devices = input_devices()
    if spec is None or str(spec).strip() == "":
        for d in devices:
            if d.default:
                return d
        raise DeviceError(f"there is no default input device; pass one by name or index; {describe_devices(devices)}")
    text = str(spec).strip()
    if text.isdigit():
        for d in devices:
            if d.index == int(text):
                return d
        raise DeviceError(f"no input device has index {text}; {describe_devices(devices)}")
    exact = [d for d in devices if d.name.casefold() == text.casefold()]
    matches = exact or [d for d in devices if text.casefold() in d.name.casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(d.describe() for d in matches)
        raise DeviceError(f"input device name {text!r} is ambiguous: it matches {names}; use the index or full name")
    raise DeviceError(f"no input device matches {text!r}; {describe_devices(devices)}")


@dataclass(frozen=True)
class CaptureStats:
    frames: int
    """frames PortAudio delivered (before any were dropped)"""
    blocks: int
    """blocks handed to the reader"""
    overflows: int
    """blocks PortAudio flagged with an input overflow: audio was lost before it reached us"""
    dropped: int
    """blocks dropped because the reader fell behind and the queue was full"""


def _in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run a PortAudio call in a daemon thread: a call that hangs then never blocks the loop or the exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if fut.cancelled():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="streamer-portaudio", daemon=True).start()
    return fut


class Capture:
    """One PortAudio input stream; iterate it for int16 ``[frames, channels]`` blocks.

    ``sample_rate`` and ``channels`` of 0 take the device's default rate and its channel count,
    at most 2 (the blocks are downmixed to mono anyway). ``duration`` stops the capture after
    that many seconds of audio. Iteration ends after :meth:`stop` (the blocks already captured
    come first) or at the end of ``duration``; it raises :class:`DeviceError` when the device
    stops, fails, or delivers nothing for ``stall_s`` seconds.
    """

    def __init__(self, device: InputDevice, *, sample_rate: int = 0, channels: int = 0, block_s: float = 0.05,
                 queue_blocks: int = 200, duration: float | None = None, stall_s: float = 5.0,
                 logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger) -> None:
        self.device = device
        self.sample_rate = sample_rate or device.sample_rate
        self.channels = channels or max(1, min(device.channels, 2))
        self.blocksize = max(1, round(self.sample_rate * block_s))
        self.queue_blocks = queue_blocks
        self.stall_s = stall_s
        self.logger = logger
        self._sd = _sd()
        self._max_frames = None if duration is None else round(duration * self.sample_rate)
        # One slot more than queue_blocks: the end marker always fits.
        self._queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue(queue_blocks + 1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None
        self._ended = False
        self._error: DeviceError | None = None
        self._stopping = False
        # Written by the audio thread only.
        self._frames = 0
        self._sent = 0
        self._overflows = 0
        self._dropped_early = 0
        # Written by the loop only.
        self._received = 0
        self._blocks = 0
        self._dropped = 0
        self._reported = (0, 0)
        self._report_at = 0.0

    def __repr__(self) -> str:
        return f"<Capture {self.device.describe()} at {self.sample_rate} Hz, {self.channels} ch>"

    @property
    def stats(self) -> CaptureStats:
        return CaptureStats(self._frames, self._blocks, self._overflows, self._dropped + self._dropped_early)

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Capture:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open and start the stream; raises :class:`DeviceError` naming the device and listing the inputs."""
        self._loop = asyncio.get_running_loop()
        opening = _in_thread(self._open_stream)
        try:
            self._stream = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)  # the thread may still open it: close it then
            raise

    def check(self) -> None:
        """Ask PortAudio whether the device takes this rate and channel count, without opening it."""
        sd = self._sd
        with _PA_LOCK:
            try:
                sd.check_input_settings(device=self.device.index, channels=self.channels, dtype="int16",
                                        samplerate=self.sample_rate)
                return
            except (sd.PortAudioError, ValueError) as exc:
                err = exc
        raise self._open_error(err)

    def _open_error(self, err: Exception) -> DeviceError:
        try:
            listing = describe_devices(input_devices())
        except DeviceError:
            listing = "the device list is unavailable"
        return DeviceError(f"cannot open input device {self.device.describe()} at {self.sample_rate} Hz, "
                           f"{self.channels} ch: {err}; {listing}")

    def _open_stream(self) -> Any:
        global _open_streams
        sd = self._sd
        with _PA_LOCK:
            try:
                stream = sd.InputStream(
                    device=self.device.index, samplerate=self.sample_rate, channels=self.channels,
                    dtype="int16", blocksize=self.blocksize, callback=self._callback,
                    finished_callback=self._finished,
                )
                _open_streams += 1
            except (sd.PortAudioError, ValueError) as exc:
                err = exc
            else:
                err = None
        if err is not None:
            raise self._open_error(err) from None
        try:
            stream.start()
        except sd.PortAudioError as exc:
            _close_stream(stream)
            raise DeviceError(f"cannot start input device {self.device.describe()}: {exc}") from None
        return stream

    def stop(self) -> None:
        """End the capture: iteration yields the blocks captured so far, then stops. Idempotent."""
        self._stopping = True
        self._end(None)

    async def close(self) -> None:
        """Stop (if needed) and close the stream. Idempotent."""
        self.stop()
        stream, self._stream = self._stream, None
        if stream is None:
            return
        closing = _in_thread(_close_stream, stream)
        try:
            await asyncio.wait_for(asyncio.shield(closing), CLOSE_TIMEOUT_S)
        except TimeoutError:
            # A device whose driver hangs: PortAudio would hang at exit too, so leave it to the OS.
            self.logger.warning("input device %s did not close within %.0f s; abandoning it",
                                self.device.describe(), CLOSE_TIMEOUT_S)
            atexit.unregister(self._sd._exit_handler)
        self._report(force=True)

    # -- reading ---------------------------------------------------------------

    def __aiter__(self) -> Capture:
        return self

    async def __anext__(self) -> np.ndarray:
        block = await self.read()
        if block is None:
            raise StopAsyncIteration
        return block

    async def read(self) -> np.ndarray | None:
        """The next block, or None once the capture has ended; raises :class:`DeviceError` on failure."""
        try:
            block = await asyncio.wait_for(self._queue.get(), self.stall_s)
        except TimeoutError:
            self._end(DeviceError(f"input device {self.device.describe()} delivered no audio for "
                                  f"{self.stall_s:g} s"))
            block = await self._queue.get()
        if block is None:
            self._queue.put_nowait(None)  # later reads see the end too
            if self._error is not None:
                raise self._error
            return None
        self._blocks += 1
        return block

    # -- the audio thread ----------------------------------------------------

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # PortAudio's real-time thread: no locks, no logging, no waiting.
        sd = self._sd
        if self._stopping:
            raise sd.CallbackStop
        overflow = bool(status.input_overflow)
        if overflow:
            self._overflows += 1
        block = indata.copy()
        last = False
        if self._max_frames is not None and self._frames + len(block) >= self._max_frames:
            block = block[: self._max_frames - self._frames]
            last = True
        self._frames += len(block)
        if self._sent - self._received >= self.queue_blocks:
            self._dropped_early += 1  # the loop itself is not keeping up: don't pile up callbacks
        else:
            self._sent += 1
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._put, block, overflow)
            except RuntimeError:  # the loop is closed
                raise sd.CallbackAbort from None
        if last:
            raise sd.CallbackStop

    def _finished(self) -> None:
        # PortAudio's thread, once the stream is inactive: after CallbackStop, abort(), or a device error.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_finished)
            except RuntimeError:
                pass

    # -- the loop ----------------------------------------------------------------

    def _put(self, block: np.ndarray, overflow: bool) -> None:
        self._received += 1
        if self._ended:
            return
        if self._queue.qsize() >= self.queue_blocks:
            self._dropped += 1
        else:
            self._queue.put_nowait(block)
        if overflow or self._dropped:
            self._report()

    def _on_finished(self) -> None:
        if self._stopping or (self._max_frames is not None and self._frames >= self._max_frames):
            self._end(None)
        else:
            self._end(DeviceError(f"input device {self.device.describe()} stopped delivering audio"))

    def _end(self, error: DeviceError | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._queue.put_nowait(None)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        counts = (self._overflows, self._dropped + self._dropped_early)
        if counts == self._reported or (not force and now < self._report_at):
            return
        self._reported, self._report_at = counts, now + REPORT_EVERY_S
        self.logger.warning("input device %s: %d input overflow(s), %d block(s) dropped so far (the model "
                            "or the system is not keeping up)", self.device.describe(), *counts)


def _close_opened(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        threading.Thread(target=_close_stream, args=(opening.result(),), name="streamer-portaudio", daemon=True).start()


def _close_stream(stream: Any) -> None:
    global _open_streams
    try:
        stream.abort()
        stream.close()
    finally:
        with _PA_LOCK:
            _open_streams -= 1


class _Stream(Protocol):
    async def feed(self, block: np.ndarray) -> list[Event]: ...

    async def finish(self) -> list[Event]: ...


async def pump(capture: Capture, stream: _Stream, show: Callable[[list[Event]], None] | None = None) -> None:
    """Feed every captured block to ``stream``; when the capture ends or fails, finish the stream.

    ``show`` receives the events of each step (the stream has published them already).
    A :class:`DeviceError` is raised again after the last words were finalised.
    """
    show = show or (lambda events: None)
    try:
        async for block in capture:
            show(await stream.feed(block))
    except DeviceError:
        show(await stream.finish())
        raise
    show(await stream.finish())
