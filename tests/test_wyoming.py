"""The Wyoming speech-to-text server, driven by the ``wyoming`` package's own async client on loopback.

Home Assistant talks to speech-to-text servers the same way: ``describe`` → ``info``; ``transcribe``,
``audio-start``, ``audio-chunk``..., ``audio-stop`` → ``transcript-start``, ``transcript-chunk``...,
``transcript``, ``transcript-stop``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient, AsyncUnixClient
from wyoming.error import Error
from wyoming.event import async_read_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong

from streamer.audio import AudioConverter
from streamer.config import load_config
from streamer.decoder import build_decoder
from streamer.events import Final, Partial
from streamer.transcribe import new_session, stream_blocks, text_of
from streamer.wyoming_asr import AudioFormat, TranscriptChunks, decode_samples

TIMEOUT = 60
WYOMING = ("wyoming.enabled=true", "wyoming.uri='tcp://127.0.0.1:0'")


def reference_text(runner, audio: np.ndarray, rate: int = 16000) -> str:
    """What ``streamer transcribe`` prints for ``audio`` ([frames, channels] float32 at ``rate``)."""
    cfg = load_config(None)
    session = new_session(cfg, runner.vocab, build_decoder(cfg.decoder, runner))
    blocks = (audio[i : i + rate // 10] for i in range(0, len(audio), rate // 10))
    return text_of(stream_blocks(session, runner, blocks, AudioConverter(rate, audio.shape[1])))


def pcm(audio: np.ndarray, width: int = 2) -> bytes:
    """float32 [frames, channels] → interleaved little-endian signed PCM of ``width`` bytes."""
    scale = (1 << (8 * width - 1)) - 1
    ints = np.round(np.clip(audio, -1, 1) * scale).astype({2: "<i2", 4: "<i4"}[width])
    return ints.tobytes()


async def transcribe(port: int, audio: bytes, rate: int = 16000, width: int = 2, channels: int = 1,
                     chunk_s: float = 0.1) -> tuple[list, list]:
    """One transcription: (events before audio-stop was sent, events after), until transcript-stop."""
    before: list = []
    after: list = []
    stopped = False
    async with asyncio.timeout(TIMEOUT), AsyncTcpClient("127.0.0.1", port) as client:

        async def read() -> None:
            while True:
                event = await client.read_event()
                assert event is not None, "the server closed the connection before transcript-stop"
                (after if stopped else before).append(event)
                if event.type == "transcript-stop":
                    return

        reader = asyncio.ensure_future(read())
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        step = int(rate * chunk_s) * width * channels
        for i in range(0, len(audio), step):
            await client.write_event(AudioChunk(rate=rate, width=width, channels=channels,
                                                audio=audio[i : i + step]).event())
        # the first phrase's final comes while audio is still being sent (it ends in a pause)
        while not any(e.type == "transcript-chunk" for e in before) and not reader.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        stopped = True
        await client.write_event(AudioStop().event())
        await reader
    return before, after


def mono(speech: np.ndarray) -> np.ndarray:
    return speech.reshape(-1, 1)


async def test_describe_answers_info_with_the_model(daemon_factory, model_runner):
    d = await daemon_factory(*WYOMING, "wyoming.languages=['en', 'en-GB']")
    assert d.wyoming is not None and d.wyoming.port
    async with asyncio.timeout(TIMEOUT), AsyncTcpClient("127.0.0.1", d.wyoming.port) as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
        assert event is not None and Info.is_type(event.type)
        info = Info.from_event(event)
        await client.write_event(Ping(text="hi").event())
        pong = await client.read_event()
    assert pong is not None and Pong.is_type(pong.type) and Pong.from_event(pong).text == "hi"
    (asr,) = info.asr
    assert asr.supports_transcript_streaming and asr.installed
    (model,) = asr.models
    assert model.name == model_runner.name and model.languages == ["en", "en-GB"]


async def test_streamed_transcription_equals_transcribe(daemon_factory, model_runner, speech):
    d = await daemon_factory(*WYOMING)
    published: list = []

    class Sink:
        def publish(self, stream, session, event):
            published.append((stream, session, event))

        def wants_partials(self, stream):
            return True

    d.hub.sinks.append(Sink())
    before, after = await transcribe(d.wyoming.port, pcm(mono(speech)))
    expected = reference_text(model_runner, mono(speech))
    assert expected  # the demo model hears the speech
    types = [e.type for e in before + after]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"]
    assert set(types[1:-2]) == {"transcript-chunk"}
    chunks = [TranscriptChunk.from_event(e).text for e in before + after if e.type == "transcript-chunk"]
    assert any(e.type == "transcript-chunk" for e in before)  # streamed while the audio came
    transcript = Transcript.from_event(after[-2])
    assert transcript.text == expected and transcript.language == "en"
    assert "".join(chunks) == expected  # the chunks add up to the transcript (no partial was rewritten here)
    # a stream like any other: its finals were published (MQTT, viewers) under its session
    finals = [e.text for _, _, e in published if isinstance(e, Final) and e.text]
    assert " ".join(finals) == expected and len({s for s, _, _ in published}) == 1
    assert any(isinstance(e, Partial) for _, _, e in published)


@pytest.mark.parametrize(("rate", "channels", "width"), [(44100, 2, 2), (8000, 1, 4)])
async def test_any_rate_width_and_channels_are_converted(daemon_factory, model_runner, speech, rate, channels,
                                                         width):
    import soxr

    audio = soxr.resample(speech, 16000, rate).astype(np.float32)
    audio = np.stack([audio * 0.9, audio * 0.7], axis=1) if channels == 2 else audio.reshape(-1, 1)
    data = pcm(audio, width)
    d = await daemon_factory(*WYOMING)
    _, after = await transcribe(d.wyoming.port, data, rate=rate, width=width, channels=channels)
    # what `streamer transcribe` makes of the same samples (read back as the server reads them)
    expected = reference_text(model_runner, decode_samples(data, AudioFormat(rate, width, channels)), rate)
    assert Transcript.from_event(after[-2]).text == expected
    assert {"kitchen", "lights", "timer"} & set(expected.split())


async def test_two_clients_at_once_and_sequential_requests_on_one_connection(daemon_factory, model_runner, speech):
    d = await daemon_factory(*WYOMING)
    first, second = mono(speech[: len(speech) // 2]), mono(speech[len(speech) // 2 :])
    results = await asyncio.gather(transcribe(d.wyoming.port, pcm(first)), transcribe(d.wyoming.port, pcm(second)))
    texts = [Transcript.from_event(after[-2]).text for _, after in results]
    assert texts == [reference_text(model_runner, first), reference_text(model_runner, second)]
    assert texts[0] != texts[1]
    # one connection, two transcriptions in turn (each its own stream)
    async with asyncio.timeout(TIMEOUT), AsyncTcpClient("127.0.0.1", d.wyoming.port) as client:
        for audio, text in zip((first, second), texts, strict=True):
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm(audio)).event())
            await client.write_event(AudioStop().event())
            while (event := await client.read_event()) is not None and event.type != "transcript":
                pass
            assert event is not None and Transcript.from_event(event).text == text
            assert (await client.read_event()).type == "transcript-stop"


async def raw_exchange(port: int, data: bytes) -> list:
    """Send raw bytes; every event until the server closes."""
    events = []
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            while (event := await async_read_event(reader)) is not None:
                events.append(event)
        finally:
            writer.close()
    return events


def header(kind: str, data: dict | None = None, payload: bytes = b"", **extra) -> bytes:
    head = {"type": kind, **({"data": data} if data is not None else {}), **extra}
    if payload:
        head["payload_length"] = len(payload)
    return json.dumps(head).encode() + b"\n" + payload


START = header("audio-start", {"rate": 16000, "width": 2, "channels": 1})
BAD = {
    "not-json": (b"{not json\n", "malformed_json"),
    "no-type": (b'{"data": {}}\n', "bad_event"),
    "data-not-object": (b'{"type": "transcribe", "data": [1]}\n', "bad_event"),
    "data-empty-list": (b'{"type": "transcribe", "data": []}\n', "bad_event"),
    "data-length-not-int": (b'{"type": "transcribe", "data_length": "12"}\n', "bad_event"),
    "payload-too-big": (b'{"type": "audio-chunk", "payload_length": 99999999}\n', "too_big"),
    "header-line-too-long": (b'{"type": "' + b"x" * 70000 + b'"}\n', "too_big"),
    "chunk-before-start": (header("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\0\0"),
                           "bad_order"),
    "stop-before-start": (header("audio-stop"), "bad_order"),
    "rate-zero": (header("audio-start", {"rate": 0, "width": 2, "channels": 1}), "unsupported_rate"),
    "width-five": (header("audio-start", {"rate": 16000, "width": 5, "channels": 1}), "unsupported_width"),
    "channels-string": (header("audio-start", {"rate": 16000, "width": 2, "channels": "2"}), "unsupported_channels"),
    "language-number": (header("transcribe", {"language": 7}), "bad_event"),
    "half-frame": (START + header("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\0\0\0"),
                   "bad_audio"),
    "format-changes": (START + header("audio-chunk", {"rate": 22050, "width": 2, "channels": 1}, b"\0\0"),
                       "bad_audio_format"),
    "start-twice": (START + START, "bad_order"),
}


async def test_bad_input_gets_an_error_event_and_leaves_other_clients_alone(daemon_factory, model_runner, speech):
    d = await daemon_factory(*WYOMING)
    healthy = asyncio.ensure_future(transcribe(d.wyoming.port, pcm(mono(speech)), chunk_s=0.05))
    for name, (data, code) in BAD.items():
        events = await raw_exchange(d.wyoming.port, data)
        errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
        assert len(errors) == 1 and errors[0].code == code and errors[0].text, (name, events)
        assert events[-1].type == "error", name  # then the connection is closed
    _, after = await healthy
    assert Transcript.from_event(after[-2]).text == reference_text(model_runner, mono(speech))
    # an unknown event type is dropped, as Wyoming servers do: the connection goes on
    events = await raw_exchange(d.wyoming.port, header("select-program", {"name": "x"}) + header("describe")
                                + b"{broken\n")
    assert [e.type for e in events] == ["info", "error"]
    assert d.active_streams == 0  # every refused connection let go of its place


async def test_max_streams_idle_timeout_and_shutdown(daemon_factory, speech):
    d = await daemon_factory(*WYOMING, "server.max_streams=1", "server.idle_timeout_s=1.0")
    audio = pcm(mono(speech[:32000]))
    async with asyncio.timeout(TIMEOUT), AsyncTcpClient("127.0.0.1", d.wyoming.port) as client:
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=audio).event())
        assert (await client.read_event()).type == "transcript-start"
        # the only place is taken: another client is refused with an error
        busy = await raw_exchange(d.wyoming.port, header("describe"))
        assert [(e.type, e.data.get("code")) for e in busy] == [("error", "busy")]
        # nothing more comes for idle_timeout_s: the transcription ends with its transcript, then the connection
        types = []
        while (event := await client.read_event()) is not None:
            types.append(event.type)
        assert types[-2:] == ["transcript", "transcript-stop"]
    # on shutdown, a transcription in progress gets its transcript too
    async with asyncio.timeout(TIMEOUT), AsyncTcpClient("127.0.0.1", d.wyoming.port) as client:
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=audio).event())
        assert (await client.read_event()).type == "transcript-start"
        await d.shutdown()
        types = []
        while (event := await client.read_event()) is not None:
            types.append(event.type)
        assert types[-2:] == ["transcript", "transcript-stop"]
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", d.wyoming.port)


async def test_an_idle_connection_at_shutdown_closes_cleanly(daemon_factory):
    """A connection waiting for its next event when the daemon stops: its pending read is cancelled and ended
    before the connection's last read, which found it still waiting (RuntimeError: read() called while another
    coroutine is already waiting) and ended the handler with it."""
    d = await daemon_factory(*WYOMING)
    async with asyncio.timeout(TIMEOUT), AsyncTcpClient("127.0.0.1", d.wyoming.port) as client:
        await client.write_event(Describe().event())
        assert Info.is_type((await client.read_event()).type)
        (handler,) = d.wyoming.handlers
        await d.shutdown()
        assert await client.read_event() is None  # the daemon closed it
        await asyncio.wait({handler.task})
    assert handler.task.exception() is None
    assert handler not in d.wyoming.handlers


async def test_unix_socket(daemon_factory, tmp_path):
    path = tmp_path / "stt.sock"
    d = await daemon_factory("wyoming.enabled=true", f"wyoming.uri='unix://{path}'")
    assert d.wyoming.port is None
    async with asyncio.timeout(TIMEOUT), AsyncUnixClient(str(path)) as client:
        await client.write_event(Describe().event())
        assert Info.is_type((await client.read_event()).type)


async def test_zeroconf_advertises_wyoming_tcp(daemon_factory, caplog):
    """``[wyoming] zeroconf``: the server announces itself as ``_wyoming._tcp`` over mDNS, with its port and
    address (browsed on loopback with the ``zeroconf`` package, as Home Assistant's discovery does)."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

    caplog.set_level(logging.INFO, "streamer.wyoming")
    browser_zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    found: asyncio.Queue = asyncio.Queue()

    def on_change(zeroconf, service_type, name, state_change):
        found.put_nowait((name, state_change))

    browser = AsyncServiceBrowser(browser_zc.zeroconf, ["_wyoming._tcp.local."], handlers=[on_change])
    try:
        d = await daemon_factory(*WYOMING, "wyoming.zeroconf=true")
        async with asyncio.timeout(TIMEOUT):
            name, change = await found.get()
            assert change == ServiceStateChange.Added and name.startswith("streamer-")
            info = await browser_zc.async_get_service_info("_wyoming._tcp.local.", name, 5000)
        assert info is not None and info.port == d.wyoming.port
        assert info.parsed_addresses() == ["127.0.0.1"]
        assert info.properties == {b"model": d.runner.name.encode()}
        await d.shutdown()
        assert d.wyoming._zeroconf is None  # unregistered
        assert f"advertised over zeroconf as {name}" in caplog.text
    finally:
        await browser.async_cancel()
        await browser_zc.async_close()


def test_transcript_chunks_are_appended_text_never_retracted():
    chunks = TranscriptChunks()
    sent = [chunks.feed([Partial(0, "ten no", 0, 1)]), chunks.feed([Partial(0, "turn on the", 0, 1)]),
            chunks.feed([Partial(0, "turn on the kit", 0, 1)]), chunks.feed([Partial(0, "turn on the kitchen", 0, 1)]),
            chunks.feed([Final(0, "turn on the kitchen lights", 0, 2)]),
            chunks.feed([Partial(1, "set a", 2, 3), Partial(1, "set a timer", 2, 3), Final(1, "set a timer", 2, 3)])]
    # a word goes out once two partials in a row agree on it (the newest one's last word excepted), or with a final
    assert sent == [[], [], ["turn on the"], [], [" kitchen lights"], [" set a", " timer"]]
    assert chunks.sent == chunks.text == "turn on the kitchen lights set a timer"
    # a final that rewrote words already sent: nothing retracted, later text appended; `transcript` has the finals
    chunks = TranscriptChunks()
    assert chunks.feed([Partial(0, "turn on the", 0, 1), Partial(0, "turn on the kit", 0, 1),
                        Final(0, "turn on a kitchen", 0, 2)]) == ["turn on the"]
    assert chunks.feed([Final(1, "", 2, 3), Final(2, "lights", 3, 4)]) == [" lights"]
    assert chunks.text == "turn on a kitchen lights" and chunks.sent == "turn on the lights"


def test_pcm_of_every_width_decodes_to_the_same_samples():
    x = np.array([[0.5, -0.25], [-1.0, 0.0]], np.float32)
    for width in (2, 4):
        got = decode_samples(pcm(x, width), AudioFormat(16000, width, 2))
        assert np.allclose(got, x, atol=1 / (1 << (8 * width - 2)))
    s24 = b"".join(int(v * (1 << 23)).to_bytes(3, "little", signed=True) for v in (0.5, -0.25, -1.0, 0.0))
    assert np.allclose(decode_samples(s24, AudioFormat(16000, 3, 2)), x)
    assert np.allclose(decode_samples(bytes([64, 192]), AudioFormat(8000, 1, 1)).ravel(), [0.5, -0.5])


@pytest.mark.slow
async def test_several_front_end_processes_share_the_port(model_runner, speech):
    """``server.processes = 2``: both processes listen on the Wyoming port (SO_REUSEPORT; port 0 is picked by the
    first and shared), transcriptions work through it, and SIGTERM ends the daemon cleanly."""
    import os
    import re
    import signal
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "serve", "--model", "demo", "--port", "0", "--set", "server.processes=2",
        "--set", "wyoming.enabled=true", "--set", "wyoming.uri='tcp://127.0.0.1:0'",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    try:
        ports = []
        async with asyncio.timeout(240):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "streamer serve exited before listening"
                if m := re.search(r"wyoming listening on tcp://127\.0\.0\.1:(\d+)(?: \(port (\d+)\))?", line):
                    ports.append(int(m.group(2) or m.group(1)))
                if line.startswith("streamer: listening on "):
                    break
        assert len(ports) == 2 and ports[0] == ports[1] != 0
        log = asyncio.ensure_future(proc.stderr.read())  # the pipe never fills
        results = await asyncio.gather(*(transcribe(ports[0], pcm(mono(speech))) for _ in range(3)))
        expected = reference_text(model_runner, mono(speech))
        assert [Transcript.from_event(after[-2]).text for _, after in results] == [expected] * 3
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await proc.wait()
    assert proc.returncode == 0 and "Traceback" not in (await log).decode()


async def test_a_token_warns_that_wyoming_on_every_network_is_not_guarded_by_it(daemon_factory, caplog):
    """Wyoming has no authentication: a daemon given server.auth_token says at start that its Wyoming listener on
    every network takes connections without it, and says nothing when it listens on loopback only."""
    with caplog.at_level(logging.WARNING, "streamer"):
        await daemon_factory("server.auth_token='s3cret'", "wyoming.enabled=true", "wyoming.uri='tcp://0.0.0.0:0'")
    warned = [r.getMessage() for r in caplog.records if "without server.auth_token" in r.getMessage()]
    assert len(warned) == 1 and "127.0.0.1" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, "streamer"):
        await daemon_factory("server.auth_token='s3cret'", *WYOMING)
    assert not [r for r in caplog.records if "without server.auth_token" in r.getMessage()]
