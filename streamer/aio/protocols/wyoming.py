"""Wyoming speech-to-text server on ``[wyoming] uri``, for Home Assistant's voice pipeline (``docs/wyoming.md``).

A :class:`Listener` (asyncio's TCP or Unix server) accepts the connections; each is a
:class:`WyomingHandler` (an :class:`~wyoming.server.AsyncEventHandler`, and a
:class:`~streamer.aio.protocols.base.Connection` with the websocket handlers' receive loop and idle
timeout) admitted like a websocket stream: it counts against ``server.max_streams`` and shutdown
waits for it. Its audio goes
through the daemon's one stream factory, so it shares the worker fairly and publishes to MQTT and
viewers like any stream. Events are read with the limits of :mod:`streamer.wyoming_asr` (the package's
own reader has none on data and payload sizes); what is wrong gets a Wyoming ``error`` event, then the
connection closes. With ``[wyoming] zeroconf`` the server is advertised as ``_wyoming._tcp``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.error import Error as WyomingError
from wyoming.event import Event as WyomingEvent
from wyoming.event import async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Info
from wyoming.ping import Pong
from wyoming.server import AsyncEventHandler

from streamer import __version__
from streamer.aio.host import StreamHost
from streamer.aio.protocols.base import Connection, Quiet, Receiver, linger
from streamer.events import CLOSE_POLICY, Event
from streamer.exceptions import AudioError, InferenceError, ProtocolError, StreamerError
from streamer.wyoming_asr import (
    MAX_HEADER_BYTES,
    AudioFormat,
    TranscriptChunks,
    audio_format,
    decode_samples,
    optional_str,
    parse_data,
    parse_header,
)

__all__ = ["WyomingHandler", "WyomingServer"]

logger = logging.getLogger("streamer.wyoming")

PROTOCOL = "wyoming"
SERVICE_TYPE = "_wyoming._tcp.local."


class WyomingServer:
    """The Wyoming listener, a daemon service: started after the websocket listeners, it stops accepting as
    soon as the daemon stops, and closes what is left once the streams have their finals."""

    is_source = False

    def __init__(self, host: StreamHost, *, shared: bool = False, first: bool = True) -> None:
        self.host = host
        self.uri = host.cfg.wyoming.uri
        # with several front-end processes (server.processes) each listens on the port too (``shared``:
        # SO_REUSEPORT); one of them (the ``first``) announces it over zeroconf, and alone listens on a Unix socket
        self.first = first
        self.shared = shared
        self.server = Listener(self.uri, reuse_port=shared)
        self.handlers: set[WyomingHandler] = set()
        self._zeroconf: Any = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def listener(self) -> asyncio.Server | None:
        """The asyncio server accepting the connections (None before :meth:`start`)."""
        return self.server.server

    @property
    def port(self) -> int | None:
        """The TCP port listened on (the one the system chose for port 0); None for a Unix socket."""
        server = self.listener
        if server is None or not server.sockets or server.sockets[0].family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return int(server.sockets[0].getsockname()[1])

    def info(self) -> Info:
        """The ``info`` answer to ``describe``: one ASR program with the loaded model."""
        name = self.host.model.name
        attribution = Attribution(name="streamer", url="")
        hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
        made_by = Attribution(name=name.split("/")[0] if hub_id else name,
                              url=f"https://huggingface.co/{name}" if hub_id else "")
        model = AsrModel(name=name, attribution=made_by, installed=True,
                         description=f"{name} (streaming CTC)", version=__version__,
                         languages=list(self.host.cfg.wyoming.languages))
        return Info(asr=[AsrProgram(name="streamer", attribution=attribution, installed=True,
                                    description="streamer: real-time streaming speech recognition",
                                    version=__version__, models=[model], supports_transcript_streaming=True)])

    @property
    def listening(self) -> dict[str, str]:
        """What a sibling front-end process sets to share this listener: the port the system chose for port 0."""
        if self.port is None:
            return {}
        return {"wyoming.uri": f"tcp://{urlsplit(self.uri).hostname}:{self.port}"}

    async def start(self) -> None:
        if self.shared and not self.first and urlsplit(self.uri).scheme != "tcp":
            logger.info("wyoming on %s is served by the first front-end process", self.uri)
            return
        try:
            await self.server.start(self._handler)
        except OSError as exc:
            raise StreamerError(f"cannot listen on wyoming.uri {self.uri!r} ({exc.strerror or exc}); another "
                                "program may use it: choose another with wyoming.uri, or stop that program") from None
        self._watch = asyncio.ensure_future(self._close_on_stop())
        if self.host.cfg.wyoming.zeroconf and self.first:
            await self._advertise()
        logger.info("wyoming listening on %s%s", self.uri,
                    f" (port {self.port})" if self.port is not None and self.uri.endswith(":0") else "")
        open_to = urlsplit(self.uri).hostname if urlsplit(self.uri).scheme == "tcp" else None
        if self.host.cfg.server.auth_token and open_to not in (None, "127.0.0.1", "::1", "localhost"):
            # Wyoming has no authentication of its own (Home Assistant sends none): the token guards the
            # websocket port only, and a user who set one may believe the whole daemon is guarded
            logger.warning("wyoming on %s takes connections without server.auth_token (Wyoming has no "
                           "authentication): bind it to a trusted network's address, or to 127.0.0.1 when Home "
                           "Assistant runs on this machine (wyoming.uri)", self.uri)

    def _handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> WyomingHandler:
        return WyomingHandler(self, reader, writer)

    async def _close_on_stop(self) -> None:
        await self.host.stopping.wait()
        if self.listener is not None:
            self.listener.close()  # accept no more; connections being served get their transcripts

    async def _advertise(self) -> None:
        """Register ``_wyoming._tcp`` over mDNS (what Home Assistant's Wyoming integration discovers).

        A listener on one address is advertised there (and mDNS runs on that interface only); a
        wildcard listener with every IPv4 address of the machine's interfaces.
        """
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        if self.port is None:
            logger.warning("wyoming.zeroconf needs a tcp:// uri; %s is not advertised", self.uri)
            return
        host = urlsplit(self.uri).hostname or ""
        if host in ("", "0.0.0.0", "::"):
            interfaces: Any = InterfaceChoice.All
            addresses = _local_addresses()
        else:
            addresses = [socket.gethostbyname(host)]
            interfaces = addresses
        name = f"streamer-{socket.gethostname().split('.')[0]}-{self.port}"[:63]
        info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=self.port, server=f"{name}.local.",
                                properties={"model": self.host.model.name}, parsed_addresses=addresses)
        zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        try:
            await zc.async_register_service(info, allow_name_change=True)
        except BaseException:
            await zc.async_close()
            raise
        self._zeroconf = (zc, info)
        logger.info("wyoming advertised over zeroconf as %s at %s port %d", info.name, ", ".join(addresses),
                    self.port)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._zeroconf is not None:
            zc, info = self._zeroconf
            self._zeroconf = None
            try:
                await zc.async_unregister_service(info)
            finally:
                await zc.async_close()
        await self.server.stop()  # closes the listener and any connection still open
        if self.handlers:
            await asyncio.wait([h.task for h in self.handlers if h.task is not None], timeout=2.0)


class Listener:
    """Accepts connections on ``tcp://HOST:PORT`` or ``unix://PATH``, each served by a handler in a task of its own.

    ``reuse_port``: listen with ``SO_REUSEPORT``: the daemon's front-end processes (``server.processes``) share
    the port, and the kernel spreads the connections over them. :meth:`stop` stops every handler and closes.
    """

    def __init__(self, uri: str, *, reuse_port: bool = False) -> None:
        where = urlsplit(uri)
        self.unix = Path(where.path) if where.scheme == "unix" else None
        self.host = where.hostname or "0.0.0.0"
        self.port = where.port or 0
        self.reuse_port = reuse_port
        self.server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[None], AsyncEventHandler] = {}

    async def start(self, factory: Callable[[asyncio.StreamReader, asyncio.StreamWriter], AsyncEventHandler]) -> None:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handler = factory(reader, writer)
            task = asyncio.create_task(handler.run(), name="wyoming event handler")
            self._handlers[task] = handler
            task.add_done_callback(lambda t: self._handlers.pop(t, None))

        if self.unix is not None:
            self.unix.unlink(missing_ok=True)
            self.server = await asyncio.start_unix_server(accept, path=self.unix)
        else:
            self.server = await asyncio.start_server(accept, host=self.host, port=self.port,
                                                      reuse_port=self.reuse_port or None)

    async def stop(self) -> None:
        await asyncio.gather(*(h.stop() for h in self._handlers.values()))
        if self.server is not None:
            self.server.close()
        if self.unix is not None:
            self.unix.unlink(missing_ok=True)


def _local_addresses() -> list[str]:
    """The IPv4 addresses of this machine's interfaces (what a wildcard listener is reachable on)."""
    import ifaddr

    found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if isinstance(ip.ip, str) and not ip.ip.startswith("169.254.")]
    return found or ["127.0.0.1"]


class WyomingHandler(Connection, AsyncEventHandler):
    """One Wyoming connection: ``describe`` answered with ``info``, any number of transcriptions in turn."""

    protocol = PROTOCOL
    label = "wyoming"
    log = logger

    def __init__(self, server: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        Connection.__init__(self, server.host)
        AsyncEventHandler.__init__(self, reader, writer)
        self.server = server
        self.task: asyncio.Task[Any] | None = None
        self.format: AudioFormat | None = None
        self.language: str | None = None
        self.chunks = TranscriptChunks()
        self.audio_s = 0.0
        self.receiver: Receiver[WyomingEvent | None] = Receiver(server.host, self.read_event, _is_audio)

    # -- the connection ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Admit the connection (or refuse it with an ``error``), then serve events until it ends."""
        self.task = asyncio.current_task()
        self.server.handlers.add(self)
        try:
            async with self.host.admission(PROTOCOL) as refused:
                if refused is not None:
                    await self.write_event(WyomingError(refused.message, refused.code).event())
                    return
                try:
                    await self._serve()
                except (ProtocolError, AudioError, InferenceError) as exc:
                    error = self.failed(exc)
                    await self.last_finals(exc)
                    await self._write_quietly(WyomingError(str(exc), error.code).event())
                finally:
                    self.receiver.close()
                    self.close_stream()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client left, or takes nothing of what is sent
        finally:
            await linger(self.reader, self.writer)
            self.server.handlers.discard(self)

    async def _serve(self) -> None:
        while True:
            event = await self.receiver.next()
            if event is None:  # the client closed the connection
                return
            if isinstance(event, Quiet):
                if self.stream is not None:  # a transcription in progress gets its transcript
                    await self.audio_stop()
                return
            if not await self.handle_event(event):
                return

    async def read_event(self) -> WyomingEvent | None:
        """One event, read within the limits; None when the connection ends (also in the middle of an event)."""
        try:
            line = await self.reader.readline()
        except ValueError:  # asyncio's StreamReader: a line over its limit
            raise ProtocolError(f"event header line over {MAX_HEADER_BYTES} bytes", kind="too_big",
                                code=CLOSE_POLICY) from None
        if not line:
            return None
        if not line.endswith(b"\n"):
            return None  # the connection ended in the middle of a header
        header = parse_header(line, self.host.cfg.server.max_message_bytes)
        try:
            raw = await self.reader.readexactly(header.data_length) if header.data_length else b""
            payload = await self.reader.readexactly(header.payload_length) if header.payload_length else None
        except asyncio.IncompleteReadError:
            return None
        return WyomingEvent(header.type, parse_data(header, raw), payload)

    async def write_event(self, event: WyomingEvent) -> None:
        """Send an event; a client that takes nothing for ``server.ping_timeout_s`` is dropped (TimeoutError)."""
        limit = self.host.cfg.server.ping_timeout_s or None
        async with asyncio.timeout(limit):
            await async_write_event(event, self.writer)

    async def _write_quietly(self, event: WyomingEvent) -> None:
        try:
            await self.write_event(event)
        except (ConnectionError, TimeoutError):
            pass

    # -- events -----------------------------------------------------------------------------------

    async def handle_event(self, event: WyomingEvent) -> bool:
        """Answer one event; False ends the connection. Unknown events are dropped, as Wyoming servers do."""
        kind, data = event.type, event.data
        if kind == "describe":
            await self.write_event(self.server.info().event())
        elif kind == "ping":
            await self.write_event(Pong(text=optional_str(data, "text", kind)).event())
        elif kind == "transcribe":
            if self.stream is not None:
                raise ProtocolError("transcribe during a transcription; send audio-stop first", kind="bad_order",
                                    code=CLOSE_POLICY)
            optional_str(data, "name", kind)  # one model: any name gets it
            self.language = optional_str(data, "language", kind)
        elif kind == "audio-start":
            await self.audio_start(data)
        elif kind == "audio-chunk":
            await self.audio_chunk(data, event.payload or b"")
        elif kind == "audio-stop":
            if self.stream is None:
                raise ProtocolError("audio-stop without audio-start", kind="bad_order", code=CLOSE_POLICY)
            await self.audio_stop()
        else:
            logger.debug("wyoming %s: dropped %s event", self.id, kind)
        return True

    async def audio_start(self, data: dict[str, Any]) -> None:
        if self.stream is not None:
            raise ProtocolError("audio-start during a transcription; send audio-stop first", kind="bad_order",
                                code=CLOSE_POLICY)
        srv = self.host.cfg.server
        fmt = audio_format(data, "audio-start", srv.min_sample_rate, srv.max_sample_rate)
        self.stream = self.open_stream(fmt.rate, fmt.channels)
        self.format, self.chunks, self.audio_s = fmt, TranscriptChunks(), 0.0
        await self.write_event(TranscriptStart(language=self.language).event())

    async def audio_chunk(self, data: dict[str, Any], payload: bytes) -> None:
        if self.stream is None or self.format is None:
            raise ProtocolError("audio-chunk before audio-start; send transcribe and audio-start first",
                                kind="bad_order", code=CLOSE_POLICY)
        srv = self.host.cfg.server
        fmt = audio_format(data, "audio-chunk", srv.min_sample_rate, srv.max_sample_rate)
        if fmt != self.format:
            raise ProtocolError(f"audio-chunk format {fmt.rate} Hz, width {fmt.width}, {fmt.channels} channel(s) "
                                f"differs from audio-start's {self.format.rate} Hz, width {self.format.width}, "
                                f"{self.format.channels} channel(s)", kind="bad_audio_format", code=CLOSE_POLICY)
        block = decode_samples(payload, fmt)
        self.audio_s += len(block) / fmt.rate
        limit = self.host.cfg.wyoming.max_audio_s
        if self.audio_s > limit:
            raise ProtocolError(f"transcription longer than wyoming.max_audio_s = {limit:g} s; send audio-stop "
                                "sooner", kind="too_long", code=CLOSE_POLICY)
        await self.send_chunks(await self.stream.feed(block))

    async def audio_stop(self) -> None:
        """The end of the audio: the last chunks, ``transcript`` (the whole text), ``transcript-stop``."""
        assert self.stream is not None
        stream, self.stream = self.stream, None
        await self.send_chunks(await stream.finish())
        self.host.release_names(self.id)
        await self.write_event(Transcript(text=self.chunks.text, language=self.language).event())
        await self.write_event(TranscriptStop().event())
        self.format, self.language = None, None

    async def send_chunks(self, events: list[Event]) -> None:
        for text in self.chunks.feed(events):
            await self.write_event(TranscriptChunk(text=text).event())


def _is_audio(event: WyomingEvent | None) -> bool:
    return event is not None and event.type == "audio-chunk" and bool(event.payload)
