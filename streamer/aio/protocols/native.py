"""The native protocol at ``/v1/stream`` (``docs/protocol.md``): JSON control in, binary audio in, typed events out."""

from __future__ import annotations

import asyncio
import os
import weakref

from streamer.aio.protocols.base import IDLE, STOP, StreamHandler
from streamer.audio import ENCODINGS
from streamer.decoder import hotword_letters, stream_decoder
from streamer.engine import SAMPLE_RATE, WordDecoder
from streamer.events import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    End,
    Error,
    Event,
    Ready,
    to_json,
)
from streamer.exceptions import ConfigError, ProtocolError
from streamer.lexicon import Lexicon, OpenVocabulary
from streamer.protocol import Start, parse_control
from streamer.runner import geometry_of

__all__ = ["NativeHandler"]


class NativeHandler(StreamHandler):
    """``/v1/stream``: a ``ready``, then events as audio comes, then ``end`` and the close."""

    protocol = "native"

    async def send_busy(self, error: Error) -> None:
        await self.ws.send(to_json(error))

    async def send_events(self, events: list[Event]) -> None:
        for e in events:
            await self.ws.send(to_json(e))

    send_last = send_events

    async def close_stream(self, code: int, reason: str) -> None:
        """The stream's last finals, ``end``, and the close."""
        if self.stream is not None:
            await self.send_events(await self.stream.finish())
        await self.ws.send(to_json(End(self.id, reason)))
        await self.ws.close(code, reason)

    def ready(self) -> Ready:
        d = self.daemon
        st, ep = d.cfg.stream, d.cfg.endpoint
        sched = geometry_of(d.runner).schedule(st)  # in the model's frames (20 ms, or 40 ms for some models)
        ms = sched.frame_samples * 1000 // SAMPLE_RATE
        return Ready(
            self.id, d.runner.name, SAMPLE_RATE, ENCODINGS,
            {"left_context_ms": sched.left * ms, "hop_ms": sched.hop * ms,
             "lookahead_ms": sched.lookahead * ms, "window_samples": sched.window_samples},
            {"enabled": ep.enabled, "silence_after_speech_s": ep.silence_after_speech_s},
            server_pid=os.getpid() if d.cluster is not None else None,  # which of several front-end processes
        )

    async def serve(self) -> None:
        await self.ws.send(to_json(self.ready()))
        srv = self.daemon.cfg.server
        while True:
            msg = await self.recv()
            if msg is IDLE:
                await self.close_stream(CLOSE_NORMAL, "idle timeout")
                return
            if msg is STOP:
                await self.close_stream(CLOSE_GOING_AWAY, "server shutting down")
                return
            if isinstance(msg, bytes):
                if self.stream is None:
                    self.stream = self.open_stream()
                await self.send_events(await self.stream.feed_bytes(msg))
                continue
            ctrl = parse_control(msg, min_rate=srv.min_sample_rate, max_rate=srv.max_sample_rate)
            if ctrl.type == "start":
                if self.stream is not None:
                    raise ProtocolError("start must be the first message of a stream", kind="late_start",
                                        code=CLOSE_POLICY)
                assert ctrl.start is not None
                s = ctrl.start
                await self.claim(s.name)  # before the word list is built: a refusal costs nothing
                words = await self.word_list(s.words) if s.words is not None else None
                words = await self.tuned_decoder(words, s)
                self.stream = self.open_stream(s.sample_rate, s.channels, s.encoding, s.name, words)
            elif ctrl.type == "flush":
                if self.stream is not None:
                    await self.send_events(await self.stream.flush())
            else:  # stop
                await self.close_stream(CLOSE_NORMAL, "stopped by client")
                return

    async def tuned_decoder(self, words: WordDecoder | None, start: Start) -> WordDecoder | None:
        """The stream's decoder with the start message's ``hotwords`` and ``alternatives`` (issue 18).

        Hotwords with a word list rebuild its search trie for this stream (in a thread), counted like a
        stream's own word list; bad hotwords are the client's error (``bad_hotwords``).
        """
        if start.hotwords is None and start.alternatives is None:
            return words
        d, srv = self.daemon, self.daemon.cfg.server
        base = words if words is not None else d.words
        if not isinstance(base, (Lexicon, OpenVocabulary)) and base is not None:
            return words
        letters = hotword_letters(base, start.hotwords)
        if letters > srv.max_word_list_letters:
            raise ProtocolError(f"hotwords rebuild the word list's search trie for this stream: {letters} letters, "
                                f"the limit is {srv.max_word_list_letters}; send a shorter word list",
                                kind="bad_hotwords", code=CLOSE_POLICY)
        if letters and not d.word_lists.reserve(letters, srv.max_word_list_letters_total):
            raise ProtocolError("server busy: the word lists of other streams hold their letters; try again later",
                                kind="busy", code=CLOSE_TRY_AGAIN)
        try:
            tuned = await asyncio.to_thread(stream_decoder, base, d.runner.vocab, d.cfg.decoder, start.hotwords,
                                            start.alternatives)
        except ConfigError as exc:
            if letters:
                d.word_lists.release(letters)
            raise ProtocolError(str(exc), kind="bad_hotwords", code=CLOSE_POLICY) from None
        if letters:
            weakref.finalize(tuned, d.word_lists.release, letters)
        return tuned
