"""The native protocol at ``/v1/stream`` (``docs/protocol.md``): JSON control in, binary audio in, typed events out.

A ``start`` may give the stream its own endpointing (``endpointing_ms``, ``utterance_end_ms``) and ask for the
detector's ``speech_started`` / ``speech_stopped`` (``vad_events``); a stream that asks for none of them gets
only the transcript's events, as before. ``"partials": false`` asks for finals only.
"""

from __future__ import annotations

from streamer.aio.protocols.base import Quiet, StreamHandler
from streamer.aio.protocols.endpointing import own_endpointing, with_voice_events
from streamer.aio.protocols.words import own_word_list, tuned_decoder
from streamer.aio.stream import LiveStream
from streamer.audio import ENCODINGS
from streamer.endpoint import stream_rules
from streamer.engine import SAMPLE_RATE
from streamer.events import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, End, Error, Event, Partial, Ready, to_json
from streamer.exceptions import ProtocolError
from streamer.protocol import Start, parse_control

__all__ = ["NativeHandler"]


class NativeHandler(StreamHandler):
    """``/v1/stream``: a ``ready``, then events as audio comes, then ``end`` and the close."""

    protocol = "native"

    async def send_busy(self, error: Error) -> None:
        await self.ws.send(to_json(error))

    async def send_events(self, events: list[Event]) -> None:
        finals_only = self.stream is not None and not self.stream.wants_partials
        for e in with_voice_events(self.stream, events):
            if not (finals_only and isinstance(e, Partial)):  # (formed for a viewer of its name)
                await self.ws.send(to_json(e))

    send_last = send_events

    async def end(self, code: int, reason: str) -> None:
        """The stream's last finals, ``end``, and the close."""
        if self.stream is not None:
            await self.send_events(await self.stream.finish())
        await self.ws.send(to_json(End(self.id, reason)))
        await self.ws.close(code, reason)

    def ready(self) -> Ready:
        host = self.host
        st, ep = host.cfg.stream, host.cfg.endpoint
        sched = host.model.geometry.schedule(st)  # in the model's frames (20 ms, or 40 ms for some models)
        ms = sched.frame_samples * 1000 // SAMPLE_RATE
        return Ready(
            self.id, host.model.name, SAMPLE_RATE, ENCODINGS,
            {"left_context_ms": sched.left * ms, "hop_ms": sched.hop * ms,
             "lookahead_ms": sched.lookahead * ms, "window_samples": sched.window_samples},
            {"enabled": ep.enabled, "silence_after_speech_s": ep.silence_after_speech_s},
            server_pid=host.server_pid,  # which of several front-end processes
            language=host.cfg.model.language,
        )

    def endpointing(self, stream: LiveStream, s: Start) -> None:
        """The stream's own endpointing and voice events, as its ``start`` asked."""
        rules = stream_rules(stream.session.endpointer.rules, endpointing_ms=s.endpointing_ms,
                             utterance_end_ms=s.utterance_end_ms, speech_events=s.vad_events)
        own_endpointing(stream, rules, voice_events=s.vad_events)

    async def serve(self) -> None:
        await self.ws.send(to_json(self.ready()))
        srv = self.host.cfg.server
        while True:
            msg = await self.recv()
            if msg is Quiet.IDLE:
                await self.end(CLOSE_NORMAL, "idle timeout")
                return
            if msg is Quiet.STOP:
                await self.end(CLOSE_GOING_AWAY, "server shutting down")
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
                words = await own_word_list(self.host, s.words) if s.words is not None else None
                words = await tuned_decoder(self.host, words, hotwords=s.hotwords, alternatives=s.alternatives)
                self.stream = self.open_stream(s.sample_rate, s.channels, s.encoding, s.name, words)
                self.stream.wants_partials = s.partials
                if s.endpointing_ms is not None or s.utterance_end_ms is not None or s.vad_events:
                    self.endpointing(self.stream, s)
            elif ctrl.type == "flush":
                if self.stream is not None:
                    await self.send_events(await self.stream.flush())
            else:  # stop
                await self.end(CLOSE_NORMAL, "stopped by client")
                return

