"""Phone calls: G.711 decoding, Twilio Media Streams and Asterisk AudioSocket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from test_mqtt import MOSQUITTO, Broker, Subscriber, start_daemon  # noqa: F401  (MOSQUITTO: the skip check)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.audio import PCM_ENCODINGS, decode_pcm, encode_g711
from streamer.events import Final, parse_event
from streamer.exceptions import AudioError, ProtocolError
from streamer.telephony import (
    HEADER_BYTES,
    KIND_AUDIO,
    KIND_DTMF,
    KIND_ERROR,
    KIND_HANGUP,
    KIND_UUID,
    MAX_MEDIA_BYTES,
    MAX_MESSAGE_CHARS,
    CallAudio,
    CallDtmf,
    CallError,
    CallHangup,
    CallId,
    TwilioConnected,
    TwilioDtmf,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
    frame,
    parse_frame,
    parse_header,
    parse_twilio,
    track_names,
)
from streamer.testing import espeak_audio

# ---------------------------------------------------------------------------------------------------------- G.711


def sine(rate: int = 8000, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")


@pytest.mark.parametrize(("encoding", "silence"), [("mulaw", 0xFF), ("alaw", 0xD5)])
def test_g711_silence_decodes_to_nearly_zero(encoding: str, silence: int) -> None:
    x = decode_pcm(bytes([silence]) * 160, encoding, 1)
    assert x.shape == (160, 1) and x.dtype == np.float32
    assert np.abs(x).max() <= 8 / 32768


@pytest.mark.parametrize(("encoding", "data", "expected"), [
    # G.711's tables: the largest codes and the smallest steps either side of zero
    ("mulaw", b"\x00\x80\xff\x7f\xfe", [-32124, 32124, 0, 0, 8]),
    ("alaw", b"\x2a\xaa\xd5\x55", [-32256, 32256, 8, -8]),
])
def test_g711_known_codes(encoding: str, data: bytes, expected: list[int]) -> None:
    assert (decode_pcm(data, encoding, 1).ravel() * 32768).round().astype(int).tolist() == expected


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_g711_sine_round_trips_within_the_companding_error(encoding: str) -> None:
    x = sine()
    y = decode_pcm(encode_g711(x, encoding), encoding, 1).ravel()
    ref = x / 32768
    # G.711 keeps 4 bits of mantissa: an error of at most 1/32 of the sample, or half the smallest step near zero
    assert (np.abs(y - ref) <= np.abs(ref) / 32 + 16 / 32768).all()
    assert np.corrcoef(y, ref)[0, 1] > 0.999


def test_g711_channels_interleave() -> None:
    data = encode_g711(np.array([1000, -1000] * 80, np.int16), "mulaw")
    x = decode_pcm(data, "mulaw", 2)
    assert x.shape == (80, 2) and (x[:, 0] > 0).all() and (x[:, 1] < 0).all()
    with pytest.raises(AudioError, match="whole number of mulaw frames"):
        decode_pcm(data[:-1], "mulaw", 2)


def test_unknown_encoding_names_g711() -> None:
    assert {"mulaw", "alaw"} <= set(PCM_ENCODINGS)
    with pytest.raises(AudioError, match="mulaw, alaw"):
        decode_pcm(b"\0\0", "opus", 1)
    with pytest.raises(AudioError, match="use one of mulaw, alaw"):
        encode_g711(sine(), "s16le")


# --------------------------------------------------------------------------- the wire formats, without sockets


def test_twilio_messages_in_twilios_shapes_parse_to_typed_messages() -> None:
    start = parse_twilio(json.dumps(twilio_start(["inbound", "outbound"], {"name": "desk", "token": "t"})))
    assert isinstance(start, TwilioStart)
    assert (start.call_sid, start.tracks, start.encoding, start.sample_rate, start.channels) == (
        CALL_SID, ("inbound", "outbound"), "mulaw", 8000, 1)
    assert dict(start.parameters) == {"name": "desk", "token": "t"}
    assert track_names(start) == {"inbound": "desk/inbound", "outbound": "desk/outbound"}
    only = parse_twilio(json.dumps(twilio_start(["outbound"], {})))
    assert isinstance(only, TwilioStart) and track_names(only) == {"outbound": CALL_SID}
    media = parse_twilio(json.dumps(twilio_media("outbound", 7, b"\xff" * 160)))
    assert media == TwilioMedia("outbound", 7, 140, b"\xff" * 160)
    assert parse_twilio('{"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "#"}}') == TwilioDtmf(
        "inbound", "#")
    assert parse_twilio('{"event": "mark", "mark": {"name": "x"}}') == TwilioMark("x")
    assert parse_twilio('{"event": "stop", "stop": {"callSid": "CA1"}}') == TwilioStop("CA1")
    assert parse_twilio('{"event": "connected", "protocol": "Call", "version": "1.0.0"}') == TwilioConnected(
        "Call", "1.0.0")


@pytest.mark.parametrize(("message", "kind", "text"), [
    (b"\x00", "bad_message", "binary message"),
    ("[" * 5000 + "]" * 5000, "malformed_json", "not JSON"),
    ("{" * (MAX_MESSAGE_CHARS + 1), "too_big", "characters is over"),  # refused before it is parsed
    ('{"event": "media", "media": {"payload": "' + "A" * 10672 + '"}}', "too_big", "over 8000 bytes of audio"),
    ('{"event": "media", "media": {"payload": "!!!!"}}', "bad_audio", "not valid base64"),
    ('{"event": "media", "media": {"track": "both", "payload": ""}}', "bad_message", "unknown track 'both'"),
    ('{"event": "media", "media": {"chunk": "-1", "payload": ""}}', "bad_message", "'chunk' must be"),
    ('{"event": "start", "start": {"callSid": "CA1", "mediaFormat": {"encoding": "audio/x-l16"}}}',
     "unsupported_encoding", "audio/x-l16"),
    ('{"event": "start", "start": {"callSid": "CA1", "tracks": ["inbound", "inbound"], "mediaFormat": {}}}',
     "bad_message", "listed twice"),
    ('{"event": "dtmf", "dtmf": {"digit": "55"}}', "bad_message", "not a key"),
    ('{"event": "hello"}', "bad_message", "unknown event 'hello'"),
    ("[1]", "bad_message", "JSON object with a string 'event'"),
])
def test_bad_twilio_messages_say_what_is_wrong(message: str | bytes, kind: str, text: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(text)) as raised:
        parse_twilio(message)
    assert raised.value.kind == kind


def test_audiosocket_frames_are_checked_before_their_payload_is_read() -> None:
    call = uuid.uuid4()
    data = frame(KIND_UUID, call.bytes) + frame(KIND_AUDIO, bytes(320)) + frame(0x12, bytes(640)) + frame(
        KIND_DTMF, b"9") + frame(KIND_ERROR, b"\x02") + frame(KIND_HANGUP)
    frames = []
    while data:
        kind, length = parse_header(data[:HEADER_BYTES])
        frames.append(parse_frame(kind, data[HEADER_BYTES : HEADER_BYTES + length]))
        data = data[HEADER_BYTES + length :]
    assert frames == [CallId(call), CallAudio(bytes(320), 8000), CallAudio(bytes(640), 16000), CallDtmf("9"),
                      CallError(2), CallHangup()]
    assert frames[0].name == str(call)  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="unknown frame kind 0x42") as raised:
        parse_header(b"\x42\x00\x00")
    assert raised.value.kind == "bad_kind"
    with pytest.raises(ProtocolError, match="of 65535 bytes is over 16000 bytes") as raised:
        parse_header(struct.pack(">BH", KIND_AUDIO, 0xFFFF))
    assert raised.value.kind == "too_big"
    with pytest.raises(ProtocolError, match="a uuid frame of 17 bytes is over 16"):
        parse_header(struct.pack(">BH", KIND_UUID, 17))
    with pytest.raises(ProtocolError, match="a uuid frame of 5 bytes"):
        parse_frame(KIND_UUID, b"short")
    with pytest.raises(ProtocolError, match="not whole 16-bit samples"):
        parse_frame(KIND_AUDIO, bytes(3))


# ------------------------------------------------------------------------------------------- the calls' audio

TOKEN = "ph0ne"
TIMEOUT = 60.0
RATE = 8000
CALL_SID = "CA" + "5f" * 16
SENTENCES = {"inbound": "turn on the kitchen lights", "outbound": "set a timer for twenty minutes"}


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> dict[str, tuple[np.ndarray, Path]]:
    """Each track's espeak-ng speech at 8 kHz as 16-bit samples (what AudioSocket sends; μ-law encoded for
    Twilio), and a WAV of what the daemon hears of it: the μ-law decoded, the samples as they are."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("calls")
    out = {}
    for track, text in SENTENCES.items():
        audio = np.concatenate([espeak_audio(text, rate=RATE), np.zeros(RATE // 2, np.float32)])
        samples = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
        heard = decode_pcm(encode_g711(samples, "mulaw"), "mulaw", 1)
        sf.write(root / f"{track}.mulaw.wav", heard, RATE, subtype="PCM_16")  # exact: G.711 expands to 16 bits
        sf.write(root / f"{track}.slin.wav", samples, RATE, subtype="PCM_16")
        out[track] = samples, root
    return out


@pytest.fixture(scope="module")
def reference(calls) -> dict[str, str]:
    """``streamer transcribe`` (the command) of each WAV: ``{"inbound.mulaw": text, ...}``."""
    root = next(iter(calls.values()))[1]
    paths = sorted(root.glob("*.wav"))
    procs = {p.stem: subprocess.Popen([sys.executable, "-m", "streamer", "transcribe", "-f", "jsonl", str(p)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in paths}
    out = {}
    for stem, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        out[stem] = " ".join(e.text for e in map(parse_event, stdout.splitlines()) if isinstance(e, Final) and e.text)
    assert all(out.values()), out
    return out


class Viewer:
    """A viewer at ``/v1/listen/NAME`` collecting the stream's events."""

    def __init__(self, port: int, name: str) -> None:
        self.url = f"ws://127.0.0.1:{port}/v1/listen/{name}?token={TOKEN}"
        self.events: list[dict] = []
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def _read(self) -> None:
        async with connect(self.url) as ws:
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "ready":
                    self.ready.set()
                else:
                    self.events.append(msg)

    async def start(self) -> Viewer:
        self.task = asyncio.create_task(self._read())
        async with asyncio.timeout(TIMEOUT):
            await self.ready.wait()
        return self

    def text(self) -> str:
        return " ".join(e["text"] for e in self.events if e["type"] == "final" and e["text"])

    async def wait_text(self, expected: str) -> str:
        """The finals' text once it is ``expected`` (or what it was after the timeout)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TIMEOUT):
                while self.text() != expected:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        return self.text()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


# ----------------------------------------------------------------------------------------- Twilio Media Streams


def twilio_start(tracks: list[str], parameters: dict[str, str], call_sid: str = CALL_SID) -> dict:
    """Twilio's ``start`` message (its documented shape: numbers as strings, the SIDs' prefixes)."""
    return {"event": "start", "sequenceNumber": "1", "streamSid": "MZ" + "18ad" * 8,
            "start": {"accountSid": "AC" + "0e" * 16, "streamSid": "MZ" + "18ad" * 8, "callSid": call_sid,
                      "tracks": tracks, "customParameters": parameters,
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


def twilio_media(track: str, chunk: int, payload: bytes) -> dict:
    return {"event": "media", "sequenceNumber": str(chunk + 1), "streamSid": "MZ" + "18ad" * 8,
            "media": {"track": track, "chunk": str(chunk), "timestamp": str(chunk * 20),
                      "payload": base64.b64encode(payload).decode()}}


def twilio_call(tracks: dict[str, np.ndarray], parameters: dict[str, str], call_sid: str = CALL_SID) -> list[dict]:
    """A recorded call as Twilio sends it: connected, start, 20 ms of μ-law per track in turn (a mark and a key
    press on the way), stop."""
    ulaw = {track: encode_g711(samples, "mulaw") for track, samples in tracks.items()}
    messages = [{"event": "connected", "protocol": "Call", "version": "1.0.0"},
                twilio_start(list(tracks), parameters, call_sid)]
    n = max(len(a) for a in ulaw.values())
    for chunk, i in enumerate(range(0, n, 160), start=1):
        for track, audio in ulaw.items():
            if i < len(audio):
                messages.append(twilio_media(track, chunk, audio[i : i + 160]))
        if chunk == 50:
            messages.append({"event": "mark", "sequenceNumber": "0", "streamSid": "MZ" + "18ad" * 8,
                             "mark": {"name": "greeting played"}})
            messages.append({"event": "dtmf", "streamSid": "MZ" + "18ad" * 8, "sequenceNumber": "0",
                             "dtmf": {"track": "inbound_track", "digit": "5"}})
    messages.append({"event": "stop", "sequenceNumber": str(len(messages)), "streamSid": "MZ" + "18ad" * 8,
                     "stop": {"accountSid": "AC" + "0e" * 16, "callSid": call_sid}})
    return messages


async def play(port: int, messages: list[dict], query: str = "") -> tuple[int, str]:
    """Send the messages as Twilio does, each track's media at real time (20 ms a chunk); the close code and
    reason (the server closes at stop, or at the first bad message)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{port}/v1/twilio{query}") as ws:
        t0 = loop.time()
        with contextlib.suppress(ConnectionClosed):
            for msg in messages:
                if msg["event"] == "media":
                    await asyncio.sleep(max(0.0, t0 + int(msg["media"]["chunk"]) * 0.02 - loop.time()))
                await ws.send(json.dumps(msg))
        await ws.wait_closed()
        assert ws.close_code is not None
        return ws.close_code, ws.close_reason or ""


def mqtt_text(sub: Subscriber, topic_level: str) -> str:
    finals = [json.loads(m.payload) for m in sub.on(f"streamer/{topic_level}/final")]
    return " ".join(f["text"] for f in finals if f["text"])


@contextlib.asynccontextmanager
async def mosquitto(root: Path) -> AsyncIterator[tuple[Broker, Subscriber]]:
    """A real mosquitto on a free port, and a subscriber to ``streamer/#``."""
    broker = Broker(root)
    await broker.start()
    sub = Subscriber(broker.port, "streamer/#")
    try:
        await sub.connect()
        yield broker, sub
    finally:
        await sub.close()
        await broker.kill()


@pytest.mark.slow
async def test_a_twilio_call_with_both_tracks_reaches_viewers_and_mqtt(tmp_path, daemon_factory, calls, reference):
    async with mosquitto(tmp_path) as (broker, sub):
        await twilio_call_published(daemon_factory, broker, sub, calls, reference)


async def twilio_call_published(daemon_factory, broker: Broker, sub: Subscriber, calls, reference) -> None:
    d, pub = await start_daemon(daemon_factory, broker.port, f"server.auth_token='{TOKEN}'")
    async with asyncio.timeout(TIMEOUT):
        await pub.wait_connected()
    viewers = {track: await Viewer(d.port, f"desk/{track}").start() for track in SENTENCES}
    call = twilio_call({track: calls[track][0] for track in SENTENCES}, {"name": "desk", "token": TOKEN})
    assert await play(d.port, call) == (1000, "stream stopped")
    for track, viewer in viewers.items():
        expected = reference[f"{track}.mulaw"]
        assert await viewer.wait_text(expected) == expected
        assert any(e["type"] == "partial" for e in viewer.events)
        await viewer.close()
        # one MQTT topic level per stream: the name's '/' becomes '_'; the payload names the stream as it is
        await sub.wait_for(lambda s, t=track, x=expected: mqtt_text(s, f"desk_{t}") == x)
        payloads = [json.loads(m.payload) for m in sub.on(f"streamer/desk_{track}/final")]
        assert {p["stream"] for p in payloads} == {f"desk/{track}"}


@pytest.mark.slow
async def test_a_call_nobody_watches_forms_finals_and_no_partials(daemon_factory, calls):
    """Twilio is sent nothing back: with no viewer of the call's name and no MQTT, its stream forms its finals (for
    the log, the metrics, a viewer that comes later) but no partial, nor the model's windows that only make them."""
    d = await daemon_factory(f"server.auth_token='{TOKEN}'")
    call = twilio_call({"inbound": calls["inbound"][0]}, {"token": TOKEN})
    assert await play(d.port, call) == (1000, "stream stopped")
    counted = d.metrics.registry.get_sample_value
    assert counted("streamer_events_total", {"type": "final"}) >= 1
    assert not counted("streamer_events_total", {"type": "partial"})
    assert not counted("streamer_provisional_windows_total")


@pytest.mark.slow
async def test_bad_twilio_input_closes_with_a_clear_error_and_the_call_beside_goes_on(daemon_factory, calls,
                                                                                      reference):
    d = await daemon_factory(f"server.auth_token='{TOKEN}'")
    viewer = await Viewer(d.port, CALL_SID).start()  # no name: the call's SID names its one track
    healthy = asyncio.create_task(play(d.port, twilio_call({"inbound": calls["inbound"][0]}, {}), f"?token={TOKEN}"))
    async with asyncio.timeout(TIMEOUT):
        while not d.name_live(CALL_SID):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    other = "CA" + "77" * 16
    start = twilio_start(["inbound"], {"token": TOKEN}, other)
    cases = [
        ([start, {"event": "media", "media": {"track": "inbound", "chunk": "1", "payload": "!!not base64!!"}}],
         1007, "bad_audio: media message: 'payload' is not valid base64"),
        ([start, twilio_media("inbound", 1, bytes(MAX_MEDIA_BYTES + 3))], 1009, "too_big: media message: a payload"),
        ([twilio_media("inbound", 1, bytes(160))], 1008, "bad_order: media before start"),
        ([twilio_start(["inbound"], {"token": "wrong"}, other)], 1008, "unauthorized: missing or wrong token"),
        ([twilio_start(["inbound"], {}, other), twilio_media("inbound", 1, bytes(160))], 1008, "unauthorized"),
        ([start, twilio_media("outbound", 1, bytes(160))], 1008, "bad_track: media of the outbound track"),
        ([{"event": "hello"}], 1008, "bad_message: unknown event 'hello'"),
        ([twilio_start(["inbound"], {"token": TOKEN, "name": "a name"}, other)], 1008, "bad_name"),
        ([twilio_start(["inbound"], {"token": TOKEN, "name": CALL_SID}, other)], 1008, "name_in_use"),
    ]
    for messages, code, reason in cases:
        closed = await play(d.port, messages)
        assert closed[0] == code and closed[1].startswith(reason), (messages[-1], closed)
    with pytest.raises(InvalidStatus) as refused:  # a wrong ?token= is refused before the upgrade
        await play(d.port, [start], "?token=wrong")
    assert refused.value.response.status_code == 401
    assert await healthy == (1000, "stream stopped")
    expected = reference["inbound.mulaw"]
    assert await viewer.wait_text(expected) == expected
    await viewer.close()
    assert d.metrics.errors.labels("unauthorized")._value.get() == 2


# ---------------------------------------------------------------------------------------------- Asterisk AudioSocket

AUDIOSOCKET = ("audiosocket.enabled=true", "audiosocket.uri='tcp://127.0.0.1:0'")


async def asterisk(port: int, frames: list[bytes], *, real_time: bool = True) -> list[tuple[int, bytes]]:
    """Send frames as Asterisk's AudioSocket() does (audio every 20 ms); the frames the server sent back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(TIMEOUT):
            t0, audio = loop.time(), 0
            with contextlib.suppress(ConnectionError):
                for f in frames:
                    if real_time and f[0] == KIND_AUDIO:
                        audio += 1
                        await asyncio.sleep(max(0.0, t0 + audio * 0.02 - loop.time()))
                    writer.write(f)
                    await writer.drain()
            received = await reader.read()  # until the server closes
    finally:
        writer.close()
    out = []
    while received:
        kind, length = struct.unpack(">BH", received[:3])
        out.append((kind, received[3 : 3 + length]))
        received = received[3 + length :]
    return out


def call_frames(call: uuid.UUID, samples: np.ndarray) -> list[bytes]:
    """A call as Asterisk sends it: its UUID, 20 ms frames of 8 kHz signed linear, a key press, the hangup."""
    pcm = samples.astype("<i2").tobytes()
    audio = [frame(KIND_AUDIO, pcm[i : i + 320]) for i in range(0, len(pcm), 320)]
    return [frame(KIND_UUID, call.bytes), *audio[:25], frame(KIND_DTMF, b"7"), *audio[25:], frame(KIND_HANGUP)]


@pytest.mark.slow
async def test_an_audiosocket_call_reaches_viewers_and_mqtt_under_its_uuid(tmp_path, daemon_factory, calls, reference):
    async with mosquitto(tmp_path) as (broker, sub):
        d, pub = await start_daemon(daemon_factory, broker.port, f"server.auth_token='{TOKEN}'", *AUDIOSOCKET)
        async with asyncio.timeout(TIMEOUT):
            await pub.wait_connected()
        assert d.audiosocket is not None and d.audiosocket.port
        call = uuid.uuid4()
        viewer = await Viewer(d.port, str(call)).start()
        assert await asterisk(d.audiosocket.port, call_frames(call, calls["inbound"][0])) == []  # nothing sent back
        expected = reference["inbound.slin"]
        assert await viewer.wait_text(expected) == expected
        await viewer.close()
        await sub.wait_for(lambda s: mqtt_text(s, str(call)) == expected)
        assert d.metrics.streams_total.labels("audiosocket")._value.get() == 1


@pytest.mark.slow
async def test_bad_audiosocket_input_gets_an_error_frame_and_the_call_beside_goes_on(daemon_factory, calls,
                                                                                    reference):
    d = await daemon_factory(*AUDIOSOCKET)
    assert d.audiosocket is not None and d.audiosocket.port
    port = d.audiosocket.port
    call = uuid.uuid4()
    viewer = await Viewer(d.port, str(call)).start()
    healthy = asyncio.create_task(asterisk(port, call_frames(call, calls["outbound"][0])))
    async with asyncio.timeout(TIMEOUT):
        while not d.name_live(str(call)):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    other = frame(KIND_UUID, uuid.uuid4().bytes)
    cases = [
        ([other, b"\x42\x00\x02hi"], "unknown frame kind 0x42"),
        ([other, struct.pack(">BH", KIND_AUDIO, 20000)], "an audio frame at 8000 Hz of 20000 bytes is over 16000"),
        ([frame(KIND_AUDIO, bytes(320))], "audio before the call's uuid"),
        ([other, frame(KIND_AUDIO, bytes(321))], "an audio frame of 321 bytes is not whole 16-bit samples"),
        ([frame(KIND_UUID, b"short")], "a uuid frame of 5 bytes"),
        ([frame(KIND_UUID, call.bytes)], f"stream name '{call}' is in use"),  # the healthy call's
    ]
    for frames, message in cases:
        got = await asterisk(port, frames, real_time=False)
        assert [k for k, _ in got] == [KIND_ERROR] and got[0][1].decode().startswith(message), (frames, got)
    assert await healthy == []
    expected = reference["outbound.slin"]
    assert await viewer.wait_text(expected) == expected
    await viewer.close()


@pytest.mark.slow
async def test_streams_ended_by_bad_input_write_one_line_each_and_no_flood(daemon_factory, caplog):
    """A stream its client's bad input ended wrote its error line and, over websocket, websockets' connection
    closed besides; a script repeating bad calls wrote a line or two per call, 1.4-3.9 MB of log in 10 s
    (clients/chaos.py's twilio-hostile and audiosocket-hostile rows). Now the error is its one line after the
    call's own, at most RefusalLog.error_burst per interval per daemon, the rest counted."""
    from streamer.aio.http.limits import RefusalLog

    d = await daemon_factory(*AUDIOSOCKET)
    assert d.audiosocket is not None and d.audiosocket.port
    names = ("streamer.twilio", "streamer.audiosocket", "streamer.server", "websockets.server")
    with caplog.at_level(logging.INFO):
        closed = await play(d.port, [twilio_media("inbound", 1, bytes(160))])
        assert closed[0] == 1008
        lines = [r.getMessage() for r in caplog.records if r.name in names]
        assert lines == ["connection open", lines[1]] and "media before start" in lines[1], lines
        caplog.clear()
        n = 3 * RefusalLog.error_burst
        for _ in range(n):
            got = await asterisk(d.audiosocket.port, [b"\x42\x00\x00"], real_time=False)
            assert [k for k, _ in got] == [KIND_ERROR]  # every call still gets its error frame
        lines = [r.getMessage() for r in caplog.records if r.name in names]
        assert 0 < len(lines) <= RefusalLog.error_burst, len(lines)  # the rest were held back
        assert d.metrics.errors.labels("bad_kind")._value.get() == n  # and counted


def test_a_flood_of_bad_input_never_holds_back_the_models_failures() -> None:
    """Streams the model failed are counted apart from those a client's bad input ended: an attacker's flood of
    bad calls must not hide, in the log, that the model server is failing everyone."""
    from streamer.aio.http.limits import RefusalLog

    class Daemon:  # a key of the log's weak per-daemon intervals
        pass

    log, daemon = RefusalLog(), Daemon()
    notes = [log.ended_by_error(daemon, "error", "bad_kind") for _ in range(3 * RefusalLog.error_burst)]
    assert notes.count(None) == 2 * RefusalLog.error_burst  # the flood: the rest held back
    assert log.ended_by_error(daemon, "failure", "inference_failed") == ""  # the model's failure goes out
    assert log.ended_by_error(Daemon(), "error", "bad_kind") == ""  # as does another daemon's client error


@pytest.mark.slow
async def test_audiosocket_off_loopback_warns_that_nothing_guards_it(daemon_factory, caplog):
    """AudioSocket has no authentication: a listener on every network says so at start (and that the token does not
    guard it); one on loopback, the default, says nothing."""
    with caplog.at_level(logging.WARNING, "streamer"):
        await daemon_factory("server.auth_token='s3cret'", "audiosocket.enabled=true",
                             "audiosocket.uri='tcp://0.0.0.0:0'")
    warned = [r.getMessage() for r in caplog.records if "takes calls from any host" in r.getMessage()]
    assert len(warned) == 1 and "server.auth_token does not guard it" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, "streamer"):
        await daemon_factory("server.auth_token='s3cret'", *AUDIOSOCKET)
    assert not [r for r in caplog.records if "takes calls from any host" in r.getMessage()]


@pytest.mark.slow
async def test_audiosocket_shares_its_port_across_processes(calls, reference):
    """``serve --processes 2`` with the listener on port 0: the first process picks the port, the second listens
    on it too (SO_REUSEPORT), and a call's finals reach a viewer whichever process took the call."""
    from test_processes import Served

    served = await Served(*AUDIOSOCKET).start()
    try:
        match = await served.wait_log(r"audiosocket listening on tcp://127\.0\.0\.1:(\d+)")
        port = int(match.group(1))
        await served.wait_log(rf"audiosocket listening on tcp://127\.0\.0\.1:{port}",
                              since=served.lines.index(match.string) + 1)
        expected = reference["inbound.slin"]
        for _ in range(2):  # each call lands on either process
            call = uuid.uuid4()
            viewer = await Viewer(served.port, str(call)).start()
            assert await asterisk(port, call_frames(call, calls["inbound"][0])) == []
            assert await viewer.wait_text(expected) == expected
            await viewer.close()
    finally:
        await served.kill()
