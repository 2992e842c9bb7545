"""Twilio Media Streams at ``/v1/twilio`` (``docs/telephony.md``): a phone call's audio, each track its own stream.

Twilio opens the websocket that a TwiML ``<Stream url="wss://HOST/v1/twilio">`` names and sends JSON
messages (:mod:`streamer.telephony` parses them): ``start`` with the call's tracks, then ``media``
(base64 μ-law, 8 kHz, 20 ms) of each track, ``mark``, ``dtmf``, and ``stop`` at the end. Each track is
a stream of its own under the call's name (:func:`~streamer.telephony.track_names`): its partials and
finals go to viewers at ``/v1/listen/NAME`` and to MQTT like any stream's. Twilio is sent nothing.

Twilio sends no headers, and a ``<Stream>`` url takes no query string, so the token may come as a
``<Parameter name="token">`` in ``start``'s ``customParameters``: it is checked there, before any
audio is accepted (the HTTP front lets an upgrade here through without a token for that). Bad input
closes the connection with the error's code and a reason that says what was wrong; it touches no
other stream. The connection is one stream against ``server.max_streams``, whatever its tracks.
"""

from __future__ import annotations

import hmac
import logging
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.aio.host import StreamHost, name_in_use, open_named
from streamer.aio.protocols.base import Quiet, StreamHandler
from streamer.aio.stream import LiveStream
from streamer.events import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, Error, Event
from streamer.exceptions import InferenceError, ProtocolError
from streamer.telephony import (
    TwilioConnected,
    TwilioDtmf,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
    parse_twilio,
    track_names,
)

__all__ = ["TwilioHandler"]

logger = logging.getLogger("streamer.twilio")


class TwilioHandler(StreamHandler):
    """One Twilio Media Stream: ``start``, the tracks' ``media``, ``stop``; nothing is sent back."""

    protocol: ClassVar[str] = "twilio"
    label: ClassVar[str] = "twilio"
    log: ClassVar[logging.Logger] = logger

    def __init__(self, host: StreamHost, ws: ServerConnection, *, token: str = "") -> None:
        super().__init__(host, ws)
        self.token = token
        """the daemon's token in force ('' = none)"""
        self.tracks: dict[str, LiveStream] = {}
        """each track's stream, once ``start`` came"""
        self.started: TwilioStart | None = None

    def authorized(self, start: TwilioStart) -> bool:
        """The token, from ``?token=`` or ``customParameters.token`` (or a bearer header, which Twilio never sends)."""
        if not self.token:
            return True
        request = self.ws.request
        given = [start.parameters.get("token", "")]
        if request is not None:
            given += parse_qs(urlsplit(request.path).query).get("token", [])[:1]
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                given.append(auth[7:].strip())
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given if g)

    async def begin(self, start: TwilioStart) -> None:
        """The call's streams, one a track, each under its name; the token is checked first."""
        if self.started is not None:
            raise ProtocolError("a second start message; a stream starts once", kind="bad_order", code=CLOSE_POLICY)
        if not self.authorized(start):
            self.host.metrics.streams_rejected.labels("auth").inc()
            raise ProtocolError("missing or wrong token: add <Parameter name=\"token\" value=\"TOKEN\"/> to the "
                                "<Stream>", kind="unauthorized", code=CLOSE_POLICY)
        names = track_names(start)
        self.started = start
        for track, name in names.items():
            session = f"{self.id}-{track}"
            holder = await self.host.claim_name_everywhere(name, session)
            if holder is not None:
                raise name_in_use(name, holder)
            # each track keeps its own pace: two tracks are two real-time streams
            stream = open_named(self.host, session, name=name, sample_rate=start.sample_rate, encoding=start.encoding)
            stream.wants_partials = False  # (Twilio is sent no transcript: viewers and MQTT may take partials)
            self.tracks[track] = stream
        logger.info("twilio %s: call %s, stream %s, tracks %s", self.id, start.call_sid, start.stream_sid,
                    ", ".join(f"{t} as {n!r}" for t, n in names.items()))

    async def media(self, media: TwilioMedia) -> None:
        if self.started is None:
            raise ProtocolError("media before start; Twilio sends start first", kind="bad_order", code=CLOSE_POLICY)
        stream = self.tracks.get(media.track)
        if stream is None:
            raise ProtocolError(f"media of the {media.track} track, which start did not list "
                                f"({', '.join(self.tracks)})", kind="bad_track", code=CLOSE_POLICY)
        self.receiver.heard_audio()  # audio came (as text): the idle timeout starts again
        if media.payload:
            await stream.feed_bytes(media.payload)  # its events go to viewers and MQTT

    async def finish(self) -> list[Event]:
        """Every track's last finals (published)."""
        events: list[Event] = []
        for stream in self.tracks.values():
            events += await stream.finish()
        return events

    async def serve(self) -> None:
        srv = self.host.cfg.server
        while True:
            msg = await self.recv()
            if isinstance(msg, Quiet):
                await self.finish()
                await self.ws.close(CLOSE_NORMAL if msg is Quiet.IDLE else CLOSE_GOING_AWAY, msg.value)
                return
            event = parse_twilio(msg, min_rate=srv.min_sample_rate, max_rate=srv.max_sample_rate)
            if isinstance(event, TwilioMedia):
                await self.media(event)
            elif isinstance(event, TwilioStart):
                await self.begin(event)
            elif isinstance(event, TwilioStop):
                await self.finish()
                await self.ws.close(CLOSE_NORMAL, "stream stopped")
                return
            elif isinstance(event, TwilioDtmf | TwilioMark) and self.started is None:
                kind = "dtmf" if isinstance(event, TwilioDtmf) else "mark"
                raise ProtocolError(f"{kind} before start; Twilio sends start first", kind="bad_order",
                                    code=CLOSE_POLICY)
            elif isinstance(event, TwilioDtmf):
                logger.info("twilio %s: the caller pressed %s (%s track)", self.id, event.digit, event.track)
            elif isinstance(event, TwilioMark):
                logger.debug("twilio %s: mark %r played", self.id, event.name)
            elif isinstance(event, TwilioConnected) and self.started is not None:
                raise ProtocolError("connected after start; Twilio sends it first", kind="bad_order",
                                    code=CLOSE_POLICY)

    # -- the shared run loop's hooks: several streams, nothing sent to Twilio ------------------------------------

    async def last_finals(self, exc: BaseException) -> list[Event]:
        """Before a client's error ends the call: the finals of every track's audio so far (published)."""
        if isinstance(exc, InferenceError):
            return []
        try:
            return await self.finish()
        except InferenceError as err:
            self.log.info("%s %s: its last finals failed: %s", self.label, self.id, err)
            return []

    def close_stream(self) -> None:
        for track, stream in self.tracks.items():
            stream.close()
            self.host.release_names(f"{self.id}-{track}")
        self.tracks.clear()
        super().close_stream()

    async def send_last(self, events: list[Event]) -> None:
        """Nothing: Twilio reads no transcripts; viewers and MQTT had them."""

    async def report(self, error: Error) -> None:
        """Close with the error's code and a reason that says what was wrong (Twilio has no error message)."""
        try:
            await self.ws.close(error.close_code, error.close_reason)
        except ConnectionClosed:
            pass
