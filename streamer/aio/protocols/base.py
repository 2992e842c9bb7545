"""What every stream handler shares: receiving with an idle timeout that shutdown interrupts, errors, word lists.

A protocol handler (:mod:`streamer.aio.protocols.native`, :mod:`streamer.aio.protocols.vosk`) subclasses
:class:`StreamHandler` and writes :meth:`StreamHandler.serve`: it reads messages with
:meth:`~StreamHandler.recv`, feeds a :class:`~streamer.aio.stream.LiveStream` made by
:meth:`~StreamHandler.open_stream`, and serialises the typed events its own way. A
:class:`~streamer.exceptions.StreamerError` that escapes ``serve`` becomes that protocol's error
reply and close code (:meth:`~StreamHandler.report`, from :func:`streamer.events.error_for`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any, ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.aio.stream import LiveStream
from streamer.decoder import trie_letters
from streamer.engine import SAMPLE_RATE, WordDecoder
from streamer.events import CLOSE_POLICY, CLOSE_TRY_AGAIN, Error, Event, error_for, to_json
from streamer.exceptions import AudioError, ConfigError, InferenceError, ProtocolError

if TYPE_CHECKING:
    from streamer.aio.server import Daemon

__all__ = ["IDLE", "STOP", "StreamHandler", "send_error"]

logger = logging.getLogger("streamer.server")

IDLE = object()
"""what :meth:`StreamHandler.recv` returns when the client sent nothing for ``server.idle_timeout_s``"""
STOP = object()
"""what :meth:`StreamHandler.recv` returns when the daemon shuts down"""


async def send_error(ws: ServerConnection, error: Error) -> None:
    """Send a native error event and close with its code."""
    try:
        await ws.send(to_json(error))
        await ws.close(error.close_code, error.close_reason)
    except ConnectionClosed:
        pass


class StreamHandler:
    """One client connection that streams audio."""

    protocol: ClassVar[str] = "native"

    def __init__(self, daemon: Daemon, ws: ServerConnection) -> None:
        self.daemon = daemon
        self.ws = ws
        self.id = uuid.uuid4().hex[:12]
        self.stream: LiveStream | None = None
        self._stop: asyncio.Future[Any] | None = None  # made by run(): a refused connection leaves no task
        self._waited_s = 0.0  # waited for a message since the last audio (the idle timeout counts this)

    async def word_list(self, words: tuple[str, ...], *, unk: bool = False) -> WordDecoder:
        """A stream's own word list, spelled with the model's tokens; a bad one is the client's error.

        ``unk``: speech that fits no listed word reads as ``[unk]`` (a Vosk ``phrase_list`` with ``"[unk]"``).

        Built in a thread: a list of thousands of words takes a noticeable time, and other streams go on.
        """
        d, srv = self.daemon, self.daemon.cfg.server
        letters = trie_letters(words)  # what its search trie costs: about LETTER_BYTES each
        if letters > srv.max_word_list_letters:
            raise ProtocolError(f"the word list has {letters} letters (a prefix shared by several words counted "
                                f"once, plus one per word); the limit is {srv.max_word_list_letters}",
                                kind="bad_words", code=CLOSE_POLICY)
        if not d.word_lists.reserve(letters, srv.max_word_list_letters_total):
            raise ProtocolError(f"server busy: the word lists of other streams hold {d.word_lists.used} of "
                                f"{srv.max_word_list_letters_total} letters and this one has {letters}; try again "
                                "later or send a shorter list", kind="busy", code=CLOSE_TRY_AGAIN)
        try:  # the letters come back when the list is freed, or at once if it cannot be built
            return await asyncio.to_thread(d.word_lists.build, d.runner.vocab, words, d.cfg.decoder,
                                           "the stream's word list", letters, unk=unk)
        except ConfigError as exc:
            raise ProtocolError(str(exc), kind="bad_words", code=CLOSE_POLICY) from None

    def open_stream(self, rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
                    name: str | None = None, words: WordDecoder | None = None) -> LiveStream:
        """The connection's stream, under ``name`` (else its session id) unless another stream or a source has it."""
        self.claim_name(name)
        return self.daemon.open_stream(sample_rate=rate, channels=channels, encoding=encoding, name=name,
                                       id=self.id, words=words)

    def claim_name(self, name: str | None) -> None:
        """Hold ``name`` (else the session id) for this connection's stream until it ends; again is harmless.

        Raises ``name_in_use`` (1008) when another live stream or a capture source has it.
        """
        wanted = name or self.id
        self._refuse_name(wanted, self.daemon.claim_name(wanted, self.id))

    async def claim(self, name: str | None) -> None:
        """:meth:`claim_name` in the whole daemon: with several front-end processes, a name one process's stream
        has is refused by the others too. Call it before :meth:`open_stream` with a client's chosen name."""
        wanted = name or self.id
        self._refuse_name(wanted, await self.daemon.claim_name_everywhere(wanted, self.id))

    @staticmethod
    def _refuse_name(wanted: str, holder: str | None) -> None:
        if holder is not None:
            raise ProtocolError(f"stream name {wanted!r} is in use by {holder}; choose another name, or use "
                                f"{wanted!r} again once that stream has ended", kind="name_in_use", code=CLOSE_POLICY)

    async def recv(self) -> Any:
        """The next message (bytes or str), or :data:`IDLE` / :data:`STOP`.

        Idle means no audio: the time spent waiting here since the last non-empty binary message
        adds up, whatever came in between (control messages keep no stream open), and at
        ``server.idle_timeout_s`` the stream is idle. Time the server spends on the stream's
        audio does not count.
        """
        assert self._stop is not None, "call run()"
        left = self.daemon.cfg.server.idle_timeout_s - self._waited_s
        if left <= 0:
            return IDLE
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        recv = asyncio.ensure_future(self.ws.recv())
        done, _ = await asyncio.wait({recv, self._stop}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if recv in done:
            msg = recv.result()
            self._waited_s = 0.0 if isinstance(msg, bytes) and msg else self._waited_s + loop.time() - t0
            return msg
        recv.cancel()
        return STOP if self._stop in done else IDLE

    async def run(self) -> None:
        """Serve the connection until it ends; a client's or the model's error becomes the error reply.

        A client that leaves while its audio is still being computed (it sent a minute at once and
        closed) stops the computing: its windows are dropped before they reach the model.
        """
        self._stop = asyncio.ensure_future(self.daemon.stopping.wait())
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
            error = error_for(exc)
            self.daemon.metrics.errors.labels(error.code).inc()
            logger.info("stream %s: %s", self.id, exc)
            if not isinstance(exc, InferenceError):  # the client's error: what it sent before still counts
                await self.finish_before_error()
            await self.report(error)
        finally:
            for task in (serving, left, self._stop):
                task.cancel()
            if self.stream is not None:
                self.stream.close()  # its queued windows and lag gauge go
            self.daemon.release_names(self.id)
            self.stream = None  # free everything of this stream at once

    async def serve(self) -> None:
        raise NotImplementedError

    async def finish_before_error(self) -> None:
        """Before a client's error ends the stream: the finals of the audio it accepted, published and sent."""
        if self.stream is None:
            return
        try:
            events = await self.stream.finish()
        except InferenceError as exc:
            logger.info("stream %s: its last finals failed: %s", self.id, exc)
            return
        await self.send_last(events)

    async def send_last(self, events: list[Event]) -> None:
        """Send the stream's last events before the error reply (each protocol its own way)."""
        raise NotImplementedError

    async def report(self, error: Error) -> None:
        """Tell the client what went wrong and close (the native form by default)."""
        await send_error(self.ws, error)

    async def send_busy(self, error: Error) -> None:
        """Tell a refused client why, before the daemon closes it (nothing, by default)."""
