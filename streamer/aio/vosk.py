"""vosk-server's websocket protocol on ``[vosk] port``: one JSON reply per audio frame (``docs/protocol.md``)."""

from __future__ import annotations

import json
from typing import Any

from websockets.exceptions import ConnectionClosed

from streamer.aio.handler import IDLE, StreamHandler
from streamer.aio.stream import LiveStream
from streamer.engine import WordDecoder
from streamer.events import CLOSE_BAD_DATA, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, Error, Event, Final, Partial
from streamer.exceptions import ProtocolError
from streamer.protocol import parse_vosk_text, vosk_final, vosk_partial

__all__ = ["VoskHandler"]


class VoskHandler(StreamHandler):
    """A Vosk client: config, binary s16le frames each answered with a partial or a result, eof or reset."""

    protocol = "vosk"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rate: float = self.daemon.cfg.vosk.sample_rate
        self.words = True
        self.alternatives = 0
        self.word_decoder: WordDecoder | None = None  # from the config's phrase_list
        self.partial: Partial | None = None

    async def report(self, error: Error) -> None:
        try:
            await self.ws.send(json.dumps({"error": error.message}))
            await self.ws.close(error.close_code, error.message[:120])
        except ConnectionClosed:
            pass

    async def send(self, reply: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(reply, ensure_ascii=False))

    def reply(self, events: list[Event]) -> dict[str, Any]:
        """The answer to one audio frame: a result when a final came, else the current partial."""
        finals = [e for e in events if isinstance(e, Final)]
        for e in events:
            self.partial = e if isinstance(e, Partial) else None
        if finals:
            return vosk_final(finals, words=self.words, max_alternatives=self.alternatives)
        return vosk_partial(self.partial)

    async def final_reply(self, events: list[Event]) -> None:
        self.partial = None
        await self.send(vosk_final([e for e in events if isinstance(e, Final)], words=self.words,
                                   max_alternatives=self.alternatives))

    async def send_last(self, events: list[Event]) -> None:
        if any(isinstance(e, Final) for e in events):
            await self.final_reply(events)

    def ensure_stream(self) -> LiveStream:
        if self.stream is None:
            rate = int(round(self.rate))
            srv = self.daemon.cfg.server
            if not srv.min_sample_rate <= rate <= srv.max_sample_rate:
                raise ProtocolError(f"unsupported sample_rate {rate}; use {srv.min_sample_rate} to "
                                    f"{srv.max_sample_rate}", kind="unsupported_rate", code=CLOSE_POLICY)
            self.stream = self.open_stream(rate, words=self.word_decoder)
        return self.stream

    async def serve(self) -> None:
        while True:
            msg = await self.recv()
            if isinstance(msg, bytes):
                stream = self.ensure_stream()
                await self.send(self.reply(await stream.feed_bytes(msg)))
                continue
            if not isinstance(msg, str):  # idle, or the daemon shuts down
                if self.stream is not None:
                    await self.final_reply(await self.stream.finish())
                await self.ws.close(*((CLOSE_NORMAL, "idle timeout") if msg is IDLE
                                      else (CLOSE_GOING_AWAY, "server shutting down")))
                return
            if not msg.lstrip().startswith("{"):
                raise ProtocolError("text message is not JSON; send audio as binary s16le frames",
                                    kind="text_not_audio", code=CLOSE_BAD_DATA)
            cmd = parse_vosk_text(msg)
            if cmd.kind == "config":
                assert cmd.config is not None
                if cmd.config.sample_rate is not None and self.stream is None:
                    self.rate = cmd.config.sample_rate
                if cmd.config.words is not None:
                    self.words = cmd.config.words
                if cmd.config.max_alternatives is not None:
                    self.alternatives = cmd.config.max_alternatives
                if cmd.config.phrase_list is not None:
                    if self.stream is not None:
                        raise ProtocolError("phrase_list must come before the first audio", kind="late_config",
                                            code=CLOSE_POLICY)
                    self.word_decoder = await self.word_list(cmd.config.phrase_list)
            elif cmd.kind == "reset":
                await self.final_reply(await self.stream.flush() if self.stream is not None else [])
            else:  # eof
                await self.final_reply(await self.stream.finish() if self.stream is not None else [])
                await self.ws.close(CLOSE_NORMAL, "eof")
                return
