"""Deepgram's listen API (docs/deepgram.md) through the clients that speak it, against the daemon on loopback.

The official ``deepgram-sdk`` (live: interim results, KeepAlive, Finalize, CloseStream), Pipecat's
``DeepgramSTTService`` in a minimal pipeline and LiveKit Agents' Deepgram STT, each pointed at the daemon by its
documented option (the SDK's environment, ``base_url``) and otherwise unmodified: each gets the text
``streamer transcribe`` prints for the same audio (16 kHz linear16; and 8 kHz mu-law against the transcript of the
decoded audio). Bad input gets Deepgram's error shapes and never touches a stream beside it. The sans-I/O side
(:mod:`streamer.deepgram`) is tested first, without sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import pcm16
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from streamer.audio import decode_pcm, encode_g711
from streamer.deepgram import DeepgramError, parse_control, parse_query, results
from streamer.endpoint import EndpointRules
from streamer.events import Final, Partial, Word, parse_event

TIMEOUT = 90
TOKEN = "s3cret"
LIVE = "encoding=linear16&sample_rate=16000"


# -- the sans-I/O side ----------------------------------------------------------------------------------------


def q(text: str) -> dict[str, list[str]]:
    from urllib.parse import parse_qs

    return parse_qs(text, keep_blank_values=True)


def test_query_parameters_become_options():
    o = parse_query(q("model=nova-3&encoding=linear16&sample_rate=8000&channels=2&multichannel=true"
                      "&interim_results=true&endpointing=300&utterance_end_ms=1000&vad_events=true"
                      "&keywords=kitchen:2&keywords=timer&keyterm=twenty%20minutes&language=en-US&punctuate=true"
                      "&smart_format=false&tag=a&tag=b&filler_words=true"), live=True)
    assert (o.encoding, o.sample_rate, o.channels, o.multichannel, o.streams) == ("linear16", 8000, 2, True, 2)
    assert (o.interim_results, o.endpointing, o.endpointing_ms, o.utterance_end_ms, o.vad_events) == \
        (True, True, 300, 1000, True)
    assert o.hotwords() == (("kitchen", 2.0), ("timer", None), ("twenty minutes", None))
    assert (o.language, o.model, o.tags, o.ignored) == ("en-US", "nova-3", ("a", "b"),
                                                       ("punctuate", "smart_format", "filler_words"))
    assert (o.daemon_encoding, o.frame_bytes) == ("s16le", 4)
    assert parse_query(q("encoding=mulaw&sample_rate=8000"), live=True).frame_bytes == 1
    off = parse_query(q(f"{LIVE}&endpointing=false"), live=True)
    assert not off.endpointing and parse_query(q(f"{LIVE}&endpointing=0"), live=True).endpointing is False
    base = EndpointRules()
    assert off.rules(base) == base  # the daemon's segments; none of them speech_final
    ms = parse_query(q(f"{LIVE}&endpointing=300&utterance_end_ms=1000&vad_events=true"), live=True).rules(base)
    assert (ms.vad, ms.vad_silence_s, ms.silence_after_speech_s, ms.utterance_end_s) == (True, 0.3, 0.8, 1.0)
    assert parse_query(q(""), live=False).encoding is None  # a file in a container: pre-recorded only


@pytest.mark.parametrize(("query", "says"), [
    ("encoding=opus&sample_rate=16000", "'opus' is not supported here; use linear16, mulaw, alaw"),
    ("encoding=wav&sample_rate=16000", "encoding 'wav' is unknown"),
    ("sample_rate=16000", "encoding is needed for live audio"),
    ("encoding=linear16", "sample_rate is needed with encoding=linear16"),
    ("encoding=linear16&sample_rate=fast", "sample_rate must be an integer from 8000 to 192000, got 'fast'"),
    (f"{LIVE}&channels=0", "channels must be an integer from 1 to 8, got 0"),
    (f"{LIVE}&interim_results=yes", "interim_results must be true or false, got 'yes'"),
    (f"{LIVE}&endpointing=soon", "endpointing must be an integer from 0 to 60000"),
    (f"{LIVE}&keywords=kitchen:-3", "only a positive intensifier"),
    (f"{LIVE}&keywords=kitchen:lots", "the intensifier after ':' must be a number"),
    (f"{LIVE}&sample_rate=8000", "sample_rate was given 2 times with different values"),
])
def test_bad_query_parameters_say_what_is_accepted(query, says):
    with pytest.raises(DeepgramError) as err:
        parse_query(q(query), live=True)
    assert says in str(err.value) and err.value.status == 400
    body = err.value.body("r1")
    assert body["err_code"] == "INVALID_QUERY_PARAMETER" and body["err_msg"] == str(err.value) and body["request_id"]


def test_control_messages_and_results_shape():
    assert [parse_control(json.dumps({"type": t})) for t in ("KeepAlive", "Finalize", "CloseStream")] == \
        ["KeepAlive", "Finalize", "CloseStream"]
    for bad in ("{", "[1]", '{"type": "Configure"}', '"KeepAlive"'):
        with pytest.raises(DeepgramError) as err:
            parse_control(bad)
        assert err.value.code == "SchemaError"
    words = (Word("set", 1.0, 1.2, 0.9), Word("timer", 1.3, 1.6, 0.7))
    r = results(Final(0, "set timer", 1.0, 1.6, words, "silence"), channel=1, channels=2, request_id="r",
                model="demo", version="1")
    assert (r["type"], r["channel_index"], r["start"], r["duration"]) == ("Results", [1, 2], 1.0, 0.6)
    assert (r["is_final"], r["speech_final"], r["from_finalize"]) == (True, True, False)
    alt = r["channel"]["alternatives"][0]
    assert alt["transcript"] == "set timer" and alt["confidence"] == 0.8
    assert alt["words"][1] == {"word": "timer", "start": 1.3, "end": 1.6, "confidence": 0.7, "punctuated_word": "timer"}
    assert r["metadata"]["model_info"]["name"] == "demo" and r["metadata"]["request_id"] == "r"
    interim = results(Partial(0, "set", 1.0, 1.2, words[:1]), request_id="r", model="demo", version="1")
    assert (interim["is_final"], interim["speech_final"]) == (False, False)
    unmarked = results(Final(0, "set", 1.0, 1.2, words[:1], "silence"), request_id="r", model="demo", version="1",
                       endpointing=False)
    assert (unmarked["is_final"], unmarked["speech_final"]) == (True, False)
    flushed = results(Final(0, "set", 1.0, 1.2, words[:1], "flush"), request_id="r", model="demo", version="1",
                      from_finalize=True)
    assert (flushed["is_final"], flushed["speech_final"], flushed["from_finalize"]) == (True, False, True)


# -- audio and what `streamer transcribe` makes of it -------------------------------------------------------


@pytest.fixture(scope="module")
def audio(speech, tmp_path_factory) -> dict[str, tuple[bytes, Path]]:
    """The speech as 16 kHz linear16, and as 8 kHz mu-law (with a WAV of what the mu-law decodes to)."""
    root = tmp_path_factory.mktemp("deepgram")
    wav16 = root / "speech16.wav"
    sf.write(wav16, speech, 16000, subtype="PCM_16")
    s8 = (np.clip(soxr.resample(speech, 16000, 8000), -1, 1) * 32767).astype(np.int16)
    ulaw = encode_g711(s8, "mulaw")
    wav8 = root / "speech8.wav"
    sf.write(wav8, decode_pcm(ulaw, "mulaw", 1)[:, 0], 8000, subtype="PCM_16")
    return {"linear16": (pcm16(speech), wav16), "mulaw": (ulaw, wav8)}


@pytest.fixture(scope="module")
def expected(audio) -> dict[str, str]:
    """The text ``streamer transcribe -f jsonl`` prints for each audio (the command itself, in parallel)."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "streamer", "transcribe", "-f", "jsonl", str(path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (_, path) in audio.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        finals = [e for e in map(parse_event, stdout.splitlines()) if isinstance(e, Final)]
        out[name] = " ".join(f.text for f in finals if f.text)
    assert out["linear16"].split()[:3] == ["turn", "on", "the"]
    return out


@pytest.fixture
async def daemon(daemon_factory):
    return await daemon_factory(f"server.auth_token='{TOKEN}'")


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def sdk(port: int, token: str = TOKEN):
    """The official SDK pointed at the daemon: its documented environment (REST base and websocket URL)."""
    from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment

    env = DeepgramClientEnvironment(base=f"http://127.0.0.1:{port}", production=f"ws://127.0.0.1:{port}",
                                    agent=f"ws://127.0.0.1:{port}", agent_rest=f"http://127.0.0.1:{port}")
    return AsyncDeepgramClient(api_key=token, environment=env)


def final_text(messages) -> str:
    return " ".join(m.channel.alternatives[0].transcript for m in messages
                    if getattr(m, "type", "") == "Results" and m.is_final and m.channel.alternatives[0].transcript)


# -- the official SDK -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["linear16", "mulaw"])
async def test_sdk_live_gets_the_text_of_streamer_transcribe(daemon, audio, expected, encoding):
    data, _ = audio[encoding]
    rate, piece = (16000, 3200) if encoding == "linear16" else (8000, 160)  # 100 ms; 20 ms as a phone sends
    messages: list = []
    async with sdk(daemon.port).listen.v1.connect(
            model="nova-3", encoding=encoding, sample_rate=str(rate), interim_results="true", utterance_end_ms="1000",
            punctuate="true", smart_format="true", tag="test") as conn:
        half = len(data) // 2 - 1  # an odd cut: a sample split across two messages
        for part in chunks(data[:half], piece * 3 + 1):
            await conn.send_media(part)
        await conn.send_keep_alive()
        for part in chunks(data[half:], piece * 3 + 1):
            await conn.send_media(part)
        await conn.send_finalize()
        await conn.send_close_stream()
        async with asyncio.timeout(TIMEOUT):
            async for message in conn:
                messages.append(message)
    kinds = [m.type for m in messages]
    assert kinds[-1] == "Metadata" and "UtteranceEnd" in kinds
    assert final_text(messages) == expected[encoding]
    res = [m for m in messages if m.type == "Results"]
    assert any(not m.is_final and m.channel.alternatives[0].transcript for m in res)  # interim results came
    assert daemon.metrics.registry.get_sample_value("streamer_provisional_windows_total") > 0  # (early ones too)
    assert any(m.is_final and m.speech_final for m in res)  # an endpoint within the speech
    assert any(m.from_finalize for m in res)  # the Finalize's answer
    assert all(m.channel_index == [0, 1] and m.metadata.model_info.name == "demo" for m in res)
    meta = messages[-1]
    assert meta.channels == 1 and meta.duration == pytest.approx(len(data) / (2 if encoding == "linear16" else 1)
                                                                  / rate, abs=0.01)
    assert meta.request_id == res[0].metadata.request_id


@pytest.mark.slow
async def test_sdk_prerecorded_file_raw_audio_and_a_url_refused(daemon, audio, expected):
    from deepgram.core.api_error import ApiError

    media = sdk(daemon.port).listen.v1.media
    answer = await media.transcribe_file(request=audio["linear16"][1].read_bytes(), model="nova-3", punctuate=True)
    alt = answer.results.channels[0].alternatives[0]
    assert alt.transcript == expected["linear16"] and len(alt.words) == len(expected["linear16"].split())
    seconds = len(audio["linear16"][0]) / 32000
    assert answer.metadata.channels == 1 and answer.metadata.duration == pytest.approx(seconds, abs=0.01)
    raw = await media.transcribe_file(request=audio["mulaw"][0], model="nova-3",
                                      request_options={"additional_query_parameters": {
                                          "encoding": "mulaw", "sample_rate": "8000"}})
    assert raw.results.channels[0].alternatives[0].transcript == expected["mulaw"]
    mono = np.frombuffer(audio["linear16"][0], dtype="<i2")
    stereo = np.stack([np.zeros_like(mono), mono], axis=1).astype("<i2").tobytes()
    both = await media.transcribe_file(request=stereo, model="nova-3", request_options={
        "additional_query_parameters": {"encoding": "linear16", "sample_rate": "16000", "channels": "2",
                                        "multichannel": "true"}})
    assert [c.alternatives[0].transcript for c in both.results.channels] == ["", expected["linear16"]]
    with pytest.raises(ApiError) as err:
        await media.transcribe_url(url="http://169.254.169.254/latest/meta-data", model="nova-3")
    assert err.value.status_code == 400 and "does not fetch URLs" in err.value.body["err_msg"]
    with pytest.raises(ApiError) as err:
        await sdk(daemon.port, token="wrong").listen.v1.media.transcribe_file(request=b"RIFF", model="nova-3")
    assert err.value.status_code == 401 and err.value.body["err_code"] == "INVALID_AUTH"
    with pytest.raises(ApiError) as err:
        await media.transcribe_file(request=b"not audio at all", model="nova-3")
    assert err.value.status_code == 400 and "failed to process audio" in err.value.body["err_msg"]


@pytest.mark.slow
async def test_multichannel_streams_each_channel(daemon, audio, expected):
    """Two channels, one speaking and one silent: the speech's results carry channel 0 of 2, the silence none."""
    mono = np.frombuffer(audio["linear16"][0], dtype="<i2")
    stereo = np.stack([mono, np.zeros_like(mono)], axis=1).astype("<i2").tobytes()
    messages: list = []
    async with sdk(daemon.port).listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000",
                                                   channels="2", multichannel="true") as conn:
        for part in chunks(stereo, 12800):
            await conn.send_media(part)
        await conn.send_close_stream()
        async with asyncio.timeout(TIMEOUT):
            async for message in conn:
                messages.append(message)
    res = [m for m in messages if m.type == "Results"]
    assert final_text([m for m in res if m.channel_index == [0, 2]]) == expected["linear16"]
    assert final_text([m for m in res if m.channel_index == [1, 2]]) == ""
    assert messages[-1].type == "Metadata" and messages[-1].channels == 2
    # no interim_results (Deepgram's default) and nobody else taking them: the streams formed no partial at all
    counted = daemon.metrics.registry.get_sample_value
    assert counted("streamer_events_total", {"type": "final"}) >= 1
    assert not counted("streamer_events_total", {"type": "partial"})
    assert not counted("streamer_provisional_windows_total")


@pytest.mark.slow
@pytest.mark.parametrize("daemon_vad", [False, True])
async def test_vad_events_and_endpointing(daemon_factory, audio, daemon_vad):
    """``vad_events`` and ``endpointing=300``: SpeechStarted as each sentence begins, before its first text, and
    an endpoint (speech_final) in the pause after each of the two sentences; the same from a daemon whose own
    endpointing runs the detector already (``[endpoint] vad``, 300 ms), asked for ``vad_events`` alone."""
    overrides = ["endpoint.vad=true", "endpoint.vad_silence_ms=300"] if daemon_vad else []
    daemon = await daemon_factory(f"server.auth_token='{TOKEN}'", *overrides)
    query = "vad_events=true" if daemon_vad else "vad_events=true&endpointing=300"
    said = []
    async with connect(f"ws://127.0.0.1:{daemon.port}/v1/listen?{LIVE}&{query}&interim_results=true",
                       additional_headers={"Authorization": f"Token {TOKEN}"}) as ws:
        for part in chunks(audio["linear16"][0], 3200):
            await ws.send(part)
        await ws.send(json.dumps({"type": "CloseStream"}))
        async with asyncio.timeout(TIMEOUT):
            said = [json.loads(m) async for m in ws]
    kinds = [m["type"] for m in said]
    assert kinds.count("SpeechStarted") == 2 and kinds[0] == "SpeechStarted"
    endpoints = [m for m in said if m["type"] == "Results" and m["speech_final"]]
    assert len(endpoints) == 2
    assert [m["channel"]["alternatives"][0]["transcript"].split()[0] for m in endpoints] == ["turn", "set"]
    started = [m["timestamp"] for m in said if m["type"] == "SpeechStarted"]
    assert started[0] < endpoints[0]["start"] + 0.3 and endpoints[0]["start"] + endpoints[0]["duration"] < started[1]


# -- Pipecat and LiveKit Agents -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_pipecat_deepgram_service_with_base_url(daemon, audio, expected):
    from pipecat.frames.frames import EndFrame, InputAudioRawFrame, TranscriptionFrame, VADUserStoppedSpeakingFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.workers.runner import WorkerRunner

    texts: list[str] = []
    want = len(expected["linear16"].split())
    done = asyncio.Event()

    class Collect(FrameProcessor):
        async def process_frame(self, frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TranscriptionFrame):
                texts.append(frame.text)
                if len(" ".join(texts).split()) >= want:
                    done.set()
            await self.push_frame(frame, direction)

    stt = DeepgramSTTService(api_key=TOKEN, base_url=f"ws://127.0.0.1:{daemon.port}", sample_rate=16000)
    task = PipelineWorker(Pipeline([stt, Collect()]), params=PipelineParams(audio_in_sample_rate=16000))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(task)
    running = asyncio.ensure_future(runner.run())
    await task.queue_frames([InputAudioRawFrame(audio=part, sample_rate=16000, num_channels=1)
                             for part in chunks(audio["linear16"][0], 640)])  # 20 ms frames
    await task.queue_frame(VADUserStoppedSpeakingFrame())  # the service sends Finalize
    try:
        await asyncio.wait_for(done.wait(), TIMEOUT)
    finally:
        await task.queue_frame(EndFrame())
        await asyncio.wait_for(running, TIMEOUT)
    assert " ".join(texts) == expected["linear16"]


@pytest.mark.slow
async def test_livekit_deepgram_stt_with_base_url_and_endpointing_off(daemon, audio, expected):
    import aiohttp
    from livekit import rtc
    from livekit.agents import stt as agents_stt
    from livekit.plugins import deepgram

    data = audio["linear16"][0]
    async with aiohttp.ClientSession() as session:
        recognizer = deepgram.STT(api_key=TOKEN, http_session=session, sample_rate=16000,
                                  base_url=f"http://127.0.0.1:{daemon.port}/v1/listen", endpointing_ms=0)
        stream = recognizer.stream()
        for part in chunks(data, 640):
            stream.push_frame(rtc.AudioFrame(part, 16000, 1, len(part) // 2))
        stream.flush()  # the plugin sends Finalize
        stream.end_input()  # and CloseStream
        finals: list[str] = []
        kinds = set()
        async with asyncio.timeout(TIMEOUT):
            async for event in stream:
                kinds.add(event.type)
                if event.type == agents_stt.SpeechEventType.FINAL_TRANSCRIPT:
                    finals.append(event.alternatives[0].text)
        await stream.aclose()
    assert " ".join(finals) == expected["linear16"]
    # endpointing_ms=0 is the plugin's "off" (endpointing=false): finals where the daemon closes its segments,
    # none of them an endpoint (speech_final), so the plugin never ends the speech itself
    assert agents_stt.SpeechEventType.END_OF_SPEECH not in kinds


# -- bad input, and a healthy stream beside it ----------------------------------------------------------------


async def healthy(port: int, data: bytes) -> str:
    """A well-behaved raw client: its final text."""
    texts = []
    async with connect(f"ws://127.0.0.1:{port}/v1/listen?{LIVE}",
                       additional_headers={"Authorization": f"Token {TOKEN}"}) as ws:
        for part in chunks(data, 3200):
            await ws.send(part)
            await asyncio.sleep(0.005)
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for raw in ws:
            m = json.loads(raw)
            if m["type"] == "Results" and m["is_final"] and m["channel"]["alternatives"][0]["transcript"]:
                texts.append(m["channel"]["alternatives"][0]["transcript"])
    return " ".join(texts)


async def refused(port: int, query: str, headers: dict[str, str] | None = None) -> tuple[int, dict, str]:
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"ws://127.0.0.1:{port}/v1/listen?{query}",
                           additional_headers={"Authorization": f"Token {TOKEN}"} if headers is None else headers):
            pass
    response = err.value.response
    return response.status_code, json.loads(response.body), response.headers.get("dg-error", "")


@pytest.mark.slow
async def test_bad_input_gets_deepgrams_errors_and_the_stream_beside_is_untouched(daemon, audio, expected):
    data = audio["linear16"][0]
    beside = asyncio.ensure_future(healthy(daemon.port, data))

    status, body, header = await refused(daemon.port, "encoding=opus&sample_rate=48000")
    assert status == 400 and body["err_code"] == "INVALID_QUERY_PARAMETER" and "opus" in body["err_msg"]
    assert header == body["err_msg"] and body["request_id"]
    status, body, _ = await refused(daemon.port, "encoding=linear16&sample_rate=16000&channels=99")
    assert status == 400 and "channels must be an integer from 1 to 8" in body["err_msg"]
    status, body, _ = await refused(daemon.port, LIVE, headers={"Authorization": "Token wrong"})
    assert status == 401 and body["err_code"] == "INVALID_AUTH"

    # unreadable control messages: an Error each (SchemaError, the text echoed), and the stream goes on
    async with connect(f"ws://127.0.0.1:{daemon.port}/v1/listen?{LIVE}&interim_results=false",
                       subprotocols=["token", TOKEN]) as ws:  # the browsers' form of the key
        assert ws.subprotocol == "token"
        await ws.send("{not json")
        error = json.loads(await ws.recv())
        assert (error["type"], error["variant"], error["message"]) == ("Error", "SchemaError", "{not json")
        await ws.send(json.dumps({"type": "Configure", "features": {}}))
        assert "unknown message type 'Configure'" in json.loads(await ws.recv())["description"]
        await ws.send(data[: len(data) // 2])
        await ws.send(json.dumps({"type": "CloseStream"}))
        said = [json.loads(m) async for m in ws]
        assert said[-1]["type"] == "Metadata" and ws.close_code == 1000
        assert any(m["type"] == "Results" and m["channel"]["alternatives"][0]["transcript"] for m in said)

    # a flood of unreadable messages: closed (1008), the last error in Deepgram's shape
    async with connect(f"ws://127.0.0.1:{daemon.port}/v1/listen?{LIVE}",
                       additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        for _ in range(40):
            await ws.send("x")
        said = []
        with pytest.raises(ConnectionClosedError):
            async for m in ws:
                said.append(json.loads(m))
        assert said[-1]["type"] == "Error" and "more than 32 unreadable messages" in said[-1]["description"]
        assert ws.close_code == 1008 and ws.close_reason.startswith("DATA-0000")

    assert await asyncio.wait_for(beside, TIMEOUT) == expected["linear16"]


async def test_bad_prerecorded_requests_are_logged_at_most_the_refusal_logs_lines(daemon, audio, expected, caplog):
    """100 bad pre-recorded requests (a wrong key, an encoding Deepgram has but the daemon does not, a body that is
    not audio) each get Deepgram's error, but the log gets at most RefusalLog.burst lines for all of them, as the
    OpenAI uploads' refusals do: each wrote two lines before (its reason, and websockets' connection closed), so a
    script repeating a bad request filled the log. A good request is answered after them."""
    from test_hostile import raw_http

    from streamer.aio.http.limits import RefusalLog

    def post(query: str, body: bytes, key: str = TOKEN, ctype: str = "audio/wav") -> bytes:
        return (f"POST /v1/listen?{query} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nAuthorization: Token {key}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    wav = audio["linear16"][1].read_bytes()
    bad = [(post("model=nova-3", wav, key="wrong"), 401), (post("encoding=opus&sample_rate=48000", wav), 400),
           (post("model=nova-3", b"not audio at all"), 400)]
    caplog.set_level(logging.INFO)
    before, t0 = len(caplog.records), time.monotonic()
    for i in range(100):
        request, status = bad[i % len(bad)]
        got, _, body = await raw_http(daemon.port, request)
        assert got == status and json.loads(body)["err_code"], (got, body)
    intervals = 1 + int((time.monotonic() - t0) / RefusalLog.install().interval_s)  # one, unless the machine crawls
    lines = [r.getMessage() for r in caplog.records[before:] if r.name in ("streamer.server", "websockets.server")]
    assert len(lines) <= intervals * RefusalLog.burst, lines
    got, _, body = await raw_http(daemon.port, post("model=nova-3", wav))
    assert got == 200 and json.loads(body)["results"]["channels"][0]["alternatives"][0]["transcript"] == \
        expected["linear16"]
