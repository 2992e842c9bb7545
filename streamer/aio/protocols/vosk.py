"""vosk-server's websocket protocol on ``[vosk] port``: one JSON reply per audio frame (``docs/protocol.md``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.aio.host import StreamHost
from streamer.aio.protocols.base import Quiet, StreamHandler
from streamer.aio.protocols.words import own_word_list, tuned_decoder
from streamer.aio.stream import LiveStream
from streamer.decoder import speller
from streamer.engine import WordDecoder
from streamer.events import CLOSE_BAD_DATA, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, Error, Event, Final, Partial
from streamer.exceptions import ProtocolError
from streamer.lexicon import MAX_ALTERNATIVES, MAX_WORD_LETTERS
from streamer.protocol import VoskConfig, parse_vosk_text, vosk_final, vosk_partial
from streamer.runner import TokenVocabulary

__all__ = ["VoskHandler", "unspellable"]

logger = logging.getLogger("streamer.server")


def unspellable(words: Iterable[str], vocab: TokenVocabulary) -> list[str]:
    """The words the model cannot spell (the search's own rule, :func:`streamer.decoder.speller`: the word, Unicode-
    normalised as the vocabulary is, or its lower- or upper-case form): Vosk skips the words missing from its
    vocabulary."""
    spell = speller(vocab)
    return [w for w in words if len(w) > MAX_WORD_LETTERS or spell(w) is None]


class VoskHandler(StreamHandler):
    """A Vosk client: config, binary s16le frames each answered with a partial or a result, eof or reset."""

    protocol = "vosk"

    def __init__(self, host: StreamHost, ws: ServerConnection) -> None:
        super().__init__(host, ws)
        self.rate: float = host.cfg.vosk.sample_rate
        self.word_results = True
        """Vosk's ``words``: each result lists its words with their times and confidences"""
        self.alternatives = 0
        self.phrase_list: WordDecoder | None = None
        """the decoder of the config's ``phrase_list`` (None: the daemon's)"""
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
            return vosk_final(finals, words=self.word_results, max_alternatives=self.alternatives)
        return vosk_partial(self.partial)

    async def final_reply(self, events: list[Event]) -> None:
        self.partial = None
        await self.send(vosk_final([e for e in events if isinstance(e, Final)], words=self.word_results,
                                   max_alternatives=self.alternatives))

    async def send_last(self, events: list[Event]) -> None:
        if any(isinstance(e, Final) for e in events):
            await self.final_reply(events)

    async def ensure_stream(self) -> LiveStream:
        """The stream, made at the first audio (as vosk-server makes its recognizer): its decoder (the phrase
        list's, else the daemon's) reads ``max_alternatives`` readings per result from its search
        (``docs/decoding.md``); greedy decoding has none (one alternative, as before)."""
        if self.stream is None:
            rate = int(round(self.rate))
            srv = self.host.cfg.server
            if not srv.min_sample_rate <= rate <= srv.max_sample_rate:
                raise ProtocolError(f"unsupported sample_rate {rate}; use {srv.min_sample_rate} to "
                                    f"{srv.max_sample_rate}", kind="unsupported_rate", code=CLOSE_POLICY)
            n_best = min(self.alternatives, MAX_ALTERNATIVES) if self.alternatives else None
            words = await tuned_decoder(self.host, self.phrase_list, alternatives=n_best)
            self.stream = self.open_stream(rate, words=words)
        return self.stream

    async def serve(self) -> None:
        while True:
            msg = await self.recv()
            if isinstance(msg, bytes):
                stream = await self.ensure_stream()
                # vosk-api takes len // 2 samples: an odd frame's last byte is dropped, not refused
                await self.send(self.reply(await stream.feed_bytes(msg[: len(msg) & ~1])))
                continue
            if isinstance(msg, Quiet):  # idle, or the daemon shuts down
                if self.stream is not None:
                    await self.final_reply(await self.stream.finish())
                await self.ws.close(CLOSE_NORMAL if msg is Quiet.IDLE else CLOSE_GOING_AWAY, msg.value)
                return
            if not msg.lstrip().startswith("{"):
                raise ProtocolError("text message is not JSON; send audio as binary s16le frames",
                                    kind="text_not_audio", code=CLOSE_BAD_DATA)
            cmd = parse_vosk_text(msg)
            if cmd.kind == "config":
                assert cmd.config is not None
                await self.configure(cmd.config)
            elif cmd.kind == "reset":
                await self.final_reply(await self.stream.flush() if self.stream is not None else [])
            else:  # eof
                await self.final_reply(await self.stream.finish() if self.stream is not None else [])
                await self.ws.close(CLOSE_NORMAL, "eof")
                return

    async def configure(self, cfg: VoskConfig) -> None:
        """A config message, read as vosk-server does: the recognizer (our stream) is made at the first audio,
        so a later ``sample_rate`` or ``phrase_list`` is ignored (with a log line); ``words`` and
        ``max_alternatives`` apply from the next reply."""
        if cfg.words is not None:
            self.word_results = cfg.words
        if cfg.max_alternatives is not None:
            self.alternatives = cfg.max_alternatives
        if self.stream is not None:
            if cfg.sample_rate is not None:
                logger.info("stream %s: vosk sample_rate after audio is ignored (as vosk-server)", self.id)
            if cfg.phrase_list is not None:
                logger.info("stream %s: vosk phrase_list after audio is ignored (as vosk-server)", self.id)
            return
        if cfg.sample_rate is not None:
            self.rate = cfg.sample_rate
        if cfg.phrase_list is None:  # not sent: the list sent before (if any) stays
            return
        if not cfg.phrase_list:  # [] or ["[unk]"]: no restriction
            self.phrase_list = None
            return
        missing = unspellable(cfg.phrase_list, self.host.model.vocab)
        if missing:
            logger.info("stream %s: vosk phrase_list: ignoring %d word(s) the model cannot spell: %s", self.id,
                        len(missing), ", ".join(repr(w) for w in missing[:10]))
        skip = set(missing)
        words = tuple(w for w in cfg.phrase_list if w not in skip)
        if not words:
            logger.info("stream %s: vosk phrase_list has no word the model can spell: no restriction", self.id)
            self.phrase_list = None
            return
        # with [unk] in the list, speech outside it comes out as [unk] instead of the nearest listed words
        self.phrase_list = await own_word_list(self.host, words, unk=cfg.unk)
