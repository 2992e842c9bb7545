"""The native protocol at ``/v1/stream`` (``docs/protocol.md``): JSON control in, binary audio in, typed events out."""

from __future__ import annotations

import os

from streamer.aio.handler import IDLE, STOP, StreamHandler
from streamer.audio import ENCODINGS
from streamer.engine import SAMPLE_RATE
from streamer.events import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, End, Error, Event, Ready, to_json
from streamer.exceptions import ProtocolError
from streamer.protocol import parse_control

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
        return Ready(
            self.id, d.runner.name, SAMPLE_RATE, ENCODINGS,
            {"left_context_ms": st.left_frames * 20, "hop_ms": st.hop_frames * 20,
             "lookahead_ms": st.lookahead_frames * 20, "window_samples": st.schedule().window_samples},
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
                self.stream = self.open_stream(s.sample_rate, s.channels, s.encoding, s.name, words)
            elif ctrl.type == "flush":
                if self.stream is not None:
                    await self.send_events(await self.stream.flush())
            else:  # stop
                await self.close_stream(CLOSE_NORMAL, "stopped by client")
                return
