"""Asterisk AudioSocket on ``[audiosocket] uri`` (``docs/telephony.md``): phone calls over TCP, one stream a call.

Asterisk's ``AudioSocket(UUID,HOST:PORT)`` application (or its ``AudioSocket`` channel driver)
connects and sends frames (:mod:`streamer.telephony` reads them): the call's UUID, then signed-linear
audio every 20 ms, and a hangup at the end. The call is a stream named by its UUID, so its partials
and finals go to viewers at ``/v1/listen/UUID`` and to MQTT like any stream's; no audio is sent back
to the call. Each connection is admitted like a websocket stream (it counts
against ``server.max_streams`` and shutdown waits for its finals), with the same idle timeout.

Bad input (an unknown frame kind, a frame over its kind's bound, audio before the UUID) gets an
error frame (kind ``0xff``) whose payload says what was wrong, in UTF-8, and the connection closes;
Asterisk logs it and the dialplan goes on. Other calls are untouched. With several front-end
processes (``server.processes``) each listens on the port (``SO_REUSEPORT``), as Wyoming's listener does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from streamer.aio.host import StreamHost
from streamer.aio.protocols.base import Connection, Quiet, Receiver, linger
from streamer.events import CLOSE_POLICY
from streamer.exceptions import AudioError, InferenceError, ProtocolError, StreamerError
from streamer.telephony import (
    HEADER_BYTES,
    KIND_ERROR,
    CallAudio,
    CallDtmf,
    CallError,
    CallFrame,
    CallHangup,
    CallId,
    frame,
    parse_frame,
    parse_header,
)

__all__ = ["AudioSocketHandler", "AudioSocketServer"]

logger = logging.getLogger("streamer.audiosocket")

PROTOCOL = "audiosocket"
MAX_ERROR_TEXT = 240
"""the most bytes of an error frame's message"""


class AudioSocketServer:
    """The AudioSocket listener, a daemon service: started after the websocket listeners, it stops accepting as
    soon as the daemon stops, and closes what is left once the calls have their finals."""

    is_source = False

    def __init__(self, host: StreamHost, *, shared: bool = False) -> None:
        self.host = host
        self.uri = host.cfg.audiosocket.uri
        self.shared = shared
        """one of several front-end processes: listen with SO_REUSEPORT on the same port as the others"""
        self.listener: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None

    @property
    def port(self) -> int | None:
        """The TCP port listened on (the one the system chose for port 0)."""
        if self.listener is None or not self.listener.sockets:
            return None
        return int(self.listener.sockets[0].getsockname()[1])

    @property
    def listening(self) -> dict[str, str]:
        """What a sibling front-end process sets to share this listener: the port the system chose for port 0."""
        if self.port is None:
            return {}
        return {"audiosocket.uri": f"tcp://{urlsplit(self.uri).hostname}:{self.port}"}

    async def start(self) -> None:
        where = urlsplit(self.uri)
        try:
            self.listener = await asyncio.start_server(self._accept, host=where.hostname, port=where.port or 0,
                                                       reuse_port=self.shared or None)
        except OSError as exc:
            raise StreamerError(f"cannot listen on audiosocket.uri {self.uri!r} ({exc.strerror or exc}); another "
                                "program may use it: choose another with audiosocket.uri, or stop that program"
                                ) from None
        self._watch = asyncio.ensure_future(self._close_on_stop())
        logger.info("audiosocket listening on tcp://%s:%s", where.hostname, self.port)
        if where.hostname not in ("127.0.0.1", "::1", "localhost"):
            # AudioSocket has no authentication (Asterisk sends none): whoever reaches the port can send a call
            logger.warning("audiosocket on %s takes calls from any host that reaches it (AudioSocket has no "
                           "authentication%s): bind it to 127.0.0.1 when Asterisk runs on this machine, or to an "
                           "address only Asterisk reaches (audiosocket.uri)", self.uri,
                           "; server.auth_token does not guard it" if self.host.cfg.server.auth_token else "")

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(AudioSocketHandler(self.host, reader, writer).run(), name="audiosocket call")
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

    async def _close_on_stop(self) -> None:
        await self.host.stopping.wait()
        if self.listener is not None:
            self.listener.close()  # accept no more; calls being served get their finals

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.listener is not None:
            self.listener.close()
        if self.handlers:  # the daemon waited for them (admission); what is left is cut
            _, pending = await asyncio.wait(set(self.handlers), timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)


class AudioSocketHandler(Connection):
    """One call: its UUID, its audio, its hangup."""

    protocol = PROTOCOL
    label = "audiosocket"
    log = logger

    def __init__(self, host: StreamHost, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(host)
        self.reader = reader
        self.writer = writer
        self.name: str | None = None
        """the call's UUID, once it came"""
        self.receiver: Receiver[CallFrame | None] = Receiver(host, self.read_frame, _is_audio)

    async def run(self) -> None:
        """Admit the call (or refuse it with an error frame), then serve its frames until it ends."""
        try:
            async with self.host.admission(PROTOCOL) as refused:
                if refused is not None:
                    await self.send_error(refused.message)
                    return
                try:
                    await self.serve()
                except (ProtocolError, AudioError, InferenceError) as exc:
                    self.failed(exc)
                    await self.last_finals(exc)
                    await self.send_error(str(exc))
                finally:
                    self.receiver.close()
                    self.close_stream()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the call's connection went away
        finally:
            await linger(self.reader, self.writer)

    async def read_frame(self) -> CallFrame | None:
        """The next frame, its size checked before its payload is read; None when the connection ends."""
        try:
            header = await self.reader.readexactly(HEADER_BYTES)
            kind, length = parse_header(header)
            payload = await self.reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError:
            return None
        return parse_frame(kind, payload)

    async def serve(self) -> None:
        while True:
            msg = await self.receiver.next()
            if msg is None or isinstance(msg, Quiet | CallHangup):  # the call ended, idled, or the daemon stops
                if self.stream is not None:
                    await self.stream.finish()  # the last finals, published
                return
            if isinstance(msg, CallId):
                if self.name is not None:
                    raise ProtocolError(f"a second uuid frame ({msg.name}) in call {self.name}", kind="bad_order",
                                        code=CLOSE_POLICY)
                await self.claim(msg.name)  # the whole daemon's: a UUID another call has is refused
                self.name = msg.name
                logger.info("audiosocket %s: call %s", self.id, self.name)
            elif isinstance(msg, CallAudio):
                await self.audio(msg)
            elif isinstance(msg, CallDtmf):
                logger.info("audiosocket %s: the caller pressed %s", self.id, msg.digit)
            elif isinstance(msg, CallError):
                logger.info("audiosocket %s: Asterisk reports an error%s", self.id,
                            f" (code 0x{msg.code:02x})" if msg.code is not None else "")

    async def audio(self, msg: CallAudio) -> None:
        if self.name is None:
            raise ProtocolError("audio before the call's uuid; AudioSocket sends the uuid frame first",
                                kind="bad_order", code=CLOSE_POLICY)
        if self.stream is None:
            self.stream = self.open_stream(msg.sample_rate, name=self.name)
            self.stream.wants_partials = False  # (Asterisk is sent no transcript: viewers and MQTT may take partials)
        elif msg.sample_rate != self.stream.sample_rate:
            raise ProtocolError(f"audio at {msg.sample_rate} Hz in a call that began at {self.stream.sample_rate} Hz",
                                kind="bad_audio_format", code=CLOSE_POLICY)
        if msg.pcm:
            await self.stream.feed_bytes(msg.pcm)  # its events go to viewers and MQTT

    async def send_error(self, message: str) -> None:
        """An error frame: what was wrong, in UTF-8 (Asterisk logs that it got one and ends the call's socket)."""
        limit = self.host.cfg.server.ping_timeout_s or None
        try:
            async with asyncio.timeout(limit):
                self.writer.write(frame(KIND_ERROR, message.encode()[:MAX_ERROR_TEXT]))
                await self.writer.drain()
        except (ConnectionError, TimeoutError):
            pass


def _is_audio(msg: Any) -> bool:
    return isinstance(msg, CallAudio) and bool(msg.pcm)
