"""What every protocol shares: admission, the receive loop with its idle timeout, errors, stream names.

:class:`Receiver` is the one receive loop, whatever the transport: it waits for the next message
with the idle timeout (``server.idle_timeout_s``, counted since the last audio) that shutdown
interrupts, and says which ended the wait with a typed :class:`Quiet`. :class:`Connection` is a
client's connection that streams audio, whatever its transport: its stream under its name, a
client's error counted and logged (:meth:`~Connection.failed`) after the finals of the audio it
sent (:meth:`~Connection.last_finals`). The Wyoming handler is one; :class:`StreamHandler` is
the websocket one.

A websocket protocol (:mod:`~streamer.aio.protocols.native`, :mod:`~streamer.aio.protocols.vosk`,
:mod:`~streamer.aio.protocols.realtime`) subclasses :class:`StreamHandler` and writes
:meth:`StreamHandler.serve`: it reads messages with :meth:`~StreamHandler.recv`, feeds the
:class:`~streamer.aio.stream.LiveStream` made by :meth:`~Connection.open_stream`, and serialises
the typed events its own way. A :class:`~streamer.exceptions.StreamerError` that escapes ``serve``
becomes that protocol's error reply and close code (:meth:`~StreamHandler.report`, from
:func:`streamer.events.error_for`).
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import logging
import struct
import termios
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.typing import Data

from streamer.aio.host import StreamHost, close_named, name_in_use, open_named
from streamer.aio.http.limits import RefusalLog
from streamer.aio.stream import Arrival, LiveStream
from streamer.engine import SAMPLE_RATE, WordDecoder
from streamer.events import CLOSE_GOING_AWAY, Error, Event, error_for, to_json
from streamer.exceptions import AudioError, InferenceError, ProtocolError
from streamer.fair import Pace

__all__ = ["Connection", "Quiet", "Receiver", "RefusalLog", "StreamHandler", "linger", "send_error"]

logger = logging.getLogger("streamer.server")

M = TypeVar("M")


class Quiet(enum.Enum):
    """Why :meth:`Receiver.next` returned without a message."""

    IDLE = "idle timeout"
    """the client sent no audio for ``server.idle_timeout_s``"""
    STOP = "server shutting down"
    """the daemon shuts down"""


DRAIN_MESSAGES = 16
"""messages a websocket connection reads ahead of its handler (websockets' ``max_queue``): at the shutdown they
were sent before it"""
DRAIN_WAIT_S = 0.1
"""at the shutdown, how long a message the client sent before it may take to be read"""
QUEUED_S = 0.002
"""a message that came within this long of being asked for was already there: read behind the one before"""
LINGER_S = 1.0
"""at the close of a TCP protocol's connection, how long what the peer still sends is read and dropped"""


def unread_bytes(ws: ServerConnection) -> int:
    """Bytes the client sent that wait in the kernel, unread (0 when unknown)."""
    sock = ws.transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


class Receiver(Generic[M]):
    """A connection's receive loop: the next message, or :class:`Quiet` when the client idles or the daemon stops.

    Idle means no audio: the time spent waiting in :meth:`next` since the last audio message
    (``is_audio``) adds up, whatever came in between (control messages keep no stream open), and at
    ``server.idle_timeout_s`` the stream is idle. Time the server spends on the stream's audio does
    not count. Call :meth:`close` when the connection ends.
    """

    def __init__(self, host: StreamHost, receive: Callable[[], Awaitable[M]], is_audio: Callable[[M], bool],
                 unread: Callable[[], int] | None = None) -> None:
        self.host = host
        self.receive = receive
        self.is_audio = is_audio
        self.unread = unread
        """bytes the client sent that wait unread (in the kernel); None: a message that comes with the shutdown is
        served, and then the next ones until none comes at once"""
        self._waited_s = 0.0
        self._queued = False  # the last message was there when asked for
        self._stop: asyncio.Future[Any] | None = None
        self._waiting: asyncio.Timeout | None = None  # the wait for the next message, which the shutdown ends
        self._largest = 0  # the largest message so far
        self._drain: int | None = None  # after the shutdown: bytes still to serve of what the client had sent

    def heard_audio(self) -> None:
        """Audio came some other way (as text): the idle timeout starts again."""
        self._waited_s = 0.0

    async def next(self) -> M | Quiet:
        """The next message, or why none.

        At the shutdown (with ``unread``) the client's messages sent before it are still served: what waited
        unread then, and up to ``DRAIN_MESSAGES`` messages the connection had already read, each as long as it
        comes at once; then :attr:`Quiet.STOP`. A client that keeps sending is not served past that.
        """
        if self._drain is not None:
            return await self._drained()
        left = self.host.cfg.server.idle_timeout_s - self._waited_s
        if left <= 0:
            return Quiet.IDLE
        if self._stop is None:
            self._stop = asyncio.ensure_future(self.host.stopping.wait())
            self._stop.add_done_callback(self._stopped)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # The message is awaited in this task, not in a task of its own beside the shutdown's (less work per
        # message; loadtest saw no change in the loop's CPU at 32 streams). The shutdown ends the wait early.
        msg: M
        try:
            async with asyncio.timeout(left if not self._stop.done() else 0) as self._waiting:
                msg = await self.receive()  # (websockets' recv() loses nothing when cancelled)
        except TimeoutError:
            if not self._stop.done():
                return Quiet.IDLE
            if self.unread is None:
                return Quiet.STOP
            self._begin_drain()
            return await self._drained()
        finally:
            self._waiting = None
        if self._stop.done() and self.unread is not None and self._drain is None:
            self._begin_drain()  # (the message came with the shutdown: it counts against what is drained)
        msg = self._took(msg)
        waited = loop.time() - t0
        self._queued = waited < QUEUED_S
        self._waited_s = 0.0 if self.is_audio(msg) else self._waited_s + waited
        return msg

    def _begin_drain(self) -> None:
        """At the shutdown: serve what the client had sent, unread in the kernel and read ahead by websockets."""
        assert self.unread is not None
        self._drain = self.unread() + DRAIN_MESSAGES * self._largest

    def _stopped(self, _: asyncio.Future[Any]) -> None:
        """The shutdown: a wait for the next message ends now."""
        if self._waiting is not None:
            self._waiting.reschedule(asyncio.get_running_loop().time())

    def _took(self, msg: M) -> M:
        size = len(msg) if isinstance(msg, bytes | str) else 0
        self._largest = max(self._largest, size)
        if self._drain is not None:
            self._drain -= size
        return msg

    async def _drained(self) -> M | Quiet:
        """After the shutdown: the next message the client had sent before it, or :attr:`Quiet.STOP`."""
        if self._drain is None or self._drain <= 0:
            return Quiet.STOP
        receive: asyncio.Future[Any] = asyncio.ensure_future(self.receive())
        done, _ = await asyncio.wait({receive}, timeout=DRAIN_WAIT_S)
        if receive not in done:
            await _cancel(receive)
            self._drain = 0
            return Quiet.STOP
        return self._took(receive.result())

    def arrival(self) -> Arrival:
        """How the last message came: whether it was there when asked for, and what waits unread behind it."""
        return Arrival(self._queued, self.unread() if self.unread is not None else 0)

    def close(self) -> None:
        if self._stop is not None:
            self._stop.cancel()


class Connection:
    """A client's connection that streams audio (any transport): its stream, its name, its errors."""

    protocol: ClassVar[str] = "native"
    """what the metrics call its streams"""
    label: ClassVar[str] = "stream"
    """what its log lines call it"""
    log: ClassVar[logging.Logger] = logger
    receiver: Receiver[Any]
    """the connection's receive loop (each transport makes its own)"""

    def __init__(self, host: StreamHost) -> None:
        self.host = host
        self.id = uuid.uuid4().hex[:12]
        self.stream: LiveStream | None = None
        self.pace: Pace | None = None
        """the client's pace (its sending budget, when its audio is due): its first stream's, kept by the next ones"""

    def open_stream(self, rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
                    name: str | None = None, words: WordDecoder | None = None) -> LiveStream:
        """The connection's stream, under ``name`` (else its session id) unless another stream or a source has it.

        Every stream of the connection keeps the client's pace: a client that ends its stream and starts another
        (a Realtime ``clear``) neither gets a new burst budget nor has its audio due again from now.
        """
        stream = open_named(self.host, self.id, name=name, sample_rate=rate, channels=channels, encoding=encoding,
                            words=words)
        if self.pace is None:
            self.pace = stream.pace
        else:
            stream.pace = self.pace
        stream.arrival = self.receiver.arrival
        return stream

    async def claim(self, name: str | None) -> None:
        """Hold ``name`` (else the session id) in the whole daemon: with several front-end processes, a name one
        process's stream has is refused by the others too. Call it before :meth:`open_stream` with a client's
        chosen name. Raises ``name_in_use`` (1008)."""
        wanted = name or self.id
        holder = await self.host.claim_name_everywhere(wanted, self.id)
        if holder is not None:
            raise name_in_use(wanted, holder)

    def close_stream(self) -> None:
        """Drop the stream (its queued windows and lag gauge go) and free its name."""
        close_named(self.host, self.stream, self.id)
        self.stream = None

    def failed(self, exc: ProtocolError | AudioError | InferenceError) -> Error:
        """A client's or the model's error ends the connection: counted, logged (one line, and not a flood of
        them: :meth:`RefusalLog.ended_by_error`), and the error to report."""
        error = error_for(exc)
        self.host.metrics.errors.labels(error.code).inc()
        # the model's failures apart from clients' mistakes: a flood of bad input never hides them
        kind = "failure" if isinstance(exc, InferenceError) else "error"
        note = RefusalLog.install().ended_by_error(self.host, kind, error.code, self.websocket)
        if note is not None:
            self.log.info("%s %s: %s%s", self.label, self.id, exc, note)
        return error

    @property
    def websocket(self) -> ServerConnection | None:
        """The connection's websocket, if it is one (its lines are websockets')."""
        return None

    async def last_finals(self, exc: BaseException) -> list[Event]:
        """Before a client's error ends the stream: the finals of the audio it accepted (published, as for any
        stream); none after the model's error, which left the stream nothing more to say."""
        if self.stream is None or isinstance(exc, InferenceError):
            return []
        try:
            return await self.stream.finish()
        except InferenceError as err:
            self.log.info("%s %s: its last finals failed: %s", self.label, self.id, err)
            return []


async def _cancel(receive: asyncio.Future[Any]) -> None:
    """Cancel a pending read and wait until it has ended: a stream reader takes one reader at a time, and the
    connection's last read (:func:`linger`) must not find this one still waiting."""
    receive.cancel()
    await asyncio.wait({receive})


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection so that what was sent arrives: half-close, then drop what the peer still sends, for
    ``LINGER_S`` at most (closing with unread data resets the connection, and the peer may lose the last of it)."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(1 << 16):
                pass
    except (ConnectionError, TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def send_error(ws: ServerConnection, error: Error) -> None:
    """Send a native error event and close with its code."""
    try:
        await ws.send(to_json(error))
        await ws.close(error.close_code, error.close_reason)
    except ConnectionClosed:
        pass


def _is_audio(msg: Data) -> bool:
    return isinstance(msg, bytes) and bool(msg)


class StreamHandler(Connection):
    """One websocket client that streams audio; the daemon calls :meth:`serve_connection`."""

    def __init__(self, host: StreamHost, ws: ServerConnection) -> None:
        super().__init__(host)
        self.ws = ws
        self.receiver: Receiver[Data] = Receiver(host, ws.recv, _is_audio, lambda: unread_bytes(ws))

    @property
    def websocket(self) -> ServerConnection | None:
        return self.ws

    async def recv(self) -> Data | Quiet:
        """The next message (bytes or str), or :class:`Quiet` (:meth:`Receiver.next`)."""
        return await self.receiver.next()

    async def serve_connection(self) -> None:
        """Admit the connection (or refuse it: shutting down 1001, over max_streams 1013), then serve it."""
        log = RefusalLog.install()
        async with self.host.admission(self.protocol) as refused:
            if refused is not None:
                log.refused(self.ws, refused)
                await self.refuse(refused)
                return
            log.admitted(self.ws)
            try:
                await self.run()
            except ConnectionClosed:
                pass

    async def refuse(self, error: Error) -> None:
        if error.close_code == CLOSE_GOING_AWAY:
            await self.ws.close(CLOSE_GOING_AWAY, error.message)
            return
        try:
            await self.send_busy(error)
            await self.ws.close(error.close_code, error.message[:120])
        except ConnectionClosed:
            pass

    async def run(self) -> None:
        """Serve the connection until it ends; a client's or the model's error becomes the error reply.

        A client that leaves while its audio is still being computed (it sent a minute at once and
        closed) stops the computing: its windows are dropped before they reach the model.
        """
        serving = asyncio.ensure_future(self.serve())
        left = asyncio.ensure_future(self.ws.wait_closed())
        try:
            await asyncio.wait({serving, left}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():
                logger.info("stream %s: the client left; its remaining windows are dropped", self.id)
                serving.cancel()
                await asyncio.wait({serving})
                if not serving.cancelled():
                    serving.exception()  # retrieved: nobody is left to tell
                return
            serving.result()
        except (ProtocolError, AudioError, InferenceError) as exc:
            error = self.failed(exc)
            events = await self.last_finals(exc)  # the client's error: what it sent before still counts
            if events:
                await self.send_last(events)
            await self.report(error)
        finally:
            for task in (serving, left):
                task.cancel()
            self.receiver.close()
            self.close_stream()  # free everything of this stream at once

    async def serve(self) -> None:
        raise NotImplementedError

    async def send_last(self, events: list[Event]) -> None:
        """Send the stream's last events before the error reply (each protocol its own way)."""
        raise NotImplementedError

    async def report(self, error: Error) -> None:
        """Tell the client what went wrong and close (the native form by default)."""
        await send_error(self.ws, error)

    async def send_busy(self, error: Error) -> None:
        """Tell a refused client why, before it is closed (nothing, by default)."""
