"""OpenAI-compatible transcription (docs/openai.md) through the official ``openai`` package against the daemon.

REST (``/v1/audio/transcriptions`` in every response format, streamed, ``/v1/models``) and Realtime
transcription sessions (``/v1/realtime``) on loopback; the texts are ``streamer transcribe``'s on the
same audio, run as the command. Bad input gets OpenAI's errors and never touches a stream beside it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
import soxr
from conftest import pcm16
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.events import Final, parse_event
from streamer.formats import cue_lines

TIMEOUT = 90
TOKEN = "s3cret"
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


# -- audio and what `streamer transcribe` makes of it -------------------------------------------------------


@pytest.fixture(scope="module")
def files(speech, tmp_path_factory) -> dict[str, Path]:
    """The speech as a 44.1 kHz stereo FLAC (REST: decoded, downmixed, resampled) and a 24 kHz WAV (Realtime)."""
    root = tmp_path_factory.mktemp("openai")
    stereo = np.stack([speech, 0.5 * speech], axis=1)
    flac = root / "speech.flac"
    sf.write(flac, soxr.resample(stereo, 16000, 44100), 44100, subtype="PCM_16")
    wav24 = root / "speech24.wav"
    sf.write(wav24, soxr.resample(speech, 16000, 24000), 24000, subtype="PCM_16")
    return {"flac": flac, "wav24": wav24}


@pytest.fixture(scope="module")
def cli_finals(files) -> dict[str, list[Final]]:
    """The finals ``streamer transcribe -f jsonl`` prints for each file (the command itself, in parallel)."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "streamer", "transcribe", "-f", "jsonl", str(path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, path in files.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        out[name] = [e for e in map(parse_event, stdout.splitlines()) if isinstance(e, Final)]
    return out


def text_of(finals: list[Final]) -> str:
    return " ".join(f.text for f in finals if f.text)


@pytest.fixture
async def daemon(daemon_factory):
    return await daemon_factory(f"server.auth_token='{TOKEN}'")


def client(port: int, token: str = TOKEN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=TIMEOUT)


# -- REST -----------------------------------------------------------------------------------------------------


async def test_every_response_format_is_what_streamer_transcribe_prints(daemon, files, cli_finals):
    c, data = client(daemon.port), files["flac"].read_bytes()
    finals = [f for f in cli_finals["flac"] if f.text]
    expected = text_of(finals)
    assert expected.split()[:3] == ["turn", "on", "the"]

    def create(**kw):
        return c.audio.transcriptions.create(model="whisper-1", file=("speech.flac", data), **kw)

    got = await create()  # json
    assert got.text == expected
    assert got.usage is not None and got.usage.type == "duration" and got.usage.seconds >= 6
    assert (await create(response_format="text")).strip() == expected
    assert await create(response_format="srt") == "\n".join(cue_lines(finals, "srt"))
    assert await create(response_format="vtt") == "\n".join(cue_lines(finals, "vtt"))
    verbose = await create(response_format="verbose_json", timestamp_granularities=["word", "segment"],
                           language="en", prompt="kitchen")
    assert verbose.text == expected and verbose.language == "en"
    assert [s.text for s in verbose.segments] == [f.text for f in finals]
    assert [(s.start, s.end) for s in verbose.segments] == [(round(f.start, 3), round(f.end, 3)) for f in finals]
    assert " ".join(w.word for w in verbose.words) == expected
    assert all(a.end <= b.start + 1e-6 for a, b in zip(verbose.words, verbose.words[1:], strict=False))
    words_only = await create(response_format="verbose_json", timestamp_granularities=["word"])
    assert words_only.segments is None and len(words_only.words) == len(expected.split())


async def test_streamed_deltas_add_up_to_the_text(daemon, files, cli_finals):
    expected = text_of(cli_finals["flac"])
    stream = await client(daemon.port).audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("speech.flac", files["flac"].read_bytes()), stream=True)
    events = [e async for e in stream]
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2  # one per final, sent as each final comes
    assert events[-1].type == "transcript.text.done" and events[-1].text == expected
    assert "".join(deltas) == expected


async def test_models_lists_the_loaded_model(daemon, model_runner):
    c = client(daemon.port)
    models = [m async for m in c.models.list()]
    assert [m.id for m in models] == [model_runner.name]
    assert (await c.models.retrieve(model_runner.name)).id == model_runner.name
    with pytest.raises(openai.NotFoundError):
        await c.models.retrieve("whisper-1")


async def test_a_bad_token_is_the_sdks_authentication_error(daemon, files):
    c = client(daemon.port, "wrong")
    with pytest.raises(openai.AuthenticationError) as info:
        await c.audio.transcriptions.create(model="whisper-1", file=("a.flac", files["flac"].read_bytes()))
    assert info.value.status_code == 401 and "token" in info.value.message
    with pytest.raises(openai.AuthenticationError):
        await c.models.list()
    with pytest.raises(InvalidStatus) as refused:  # the Realtime upgrade is refused before it happens
        async with c.realtime.connect(extra_query={"intent": "transcription"}):
            pass
    assert refused.value.response.status_code == 401


async def test_an_oversized_upload_is_413_before_its_body_is_read(daemon_factory, files, speech):
    d = await daemon_factory("openai.max_upload_bytes=100000")
    c = client(d.port)
    with pytest.raises(openai.APIStatusError) as info:
        await c.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\0" * 400_000))
    assert info.value.status_code == 413 and "openai.max_upload_bytes" in info.value.message
    # chunked, without a length: cut off when it passes the limit
    status, body = await raw_post(d.port, b"x" * 200_000, chunked=True)
    assert status == 413 and json.loads(body)["error"]["code"] == "upload_too_large"
    # a small upload on the same daemon still works
    small = files["flac"].parent / "small.wav"
    sf.write(small, speech[:24000], 16000, subtype="PCM_16")
    got = await c.audio.transcriptions.create(model="whisper-1", file=("small.wav", small.read_bytes()))
    assert got.text.startswith("turn")


async def raw_post(port: int, payload: bytes, *, chunked: bool = False, expect: bool = False,
                   boundary: str = "XyZ", token: str = TOKEN, chunk: int = 7000) -> tuple[int, bytes]:
    """A multipart POST written by hand (chunked or with a length, with Expect: 100-continue); status, body."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + payload + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\ntext\r\n" \
        f"--{boundary}--\r\n".encode()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n")
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(body)}\r\n"
    head += "Expect: 100-continue\r\n\r\n" if expect else "\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode())
        if expect:
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT) == b"HTTP/1.1 100 Continue\r\n\r\n"
        if chunked:
            for i in range(0, len(body), chunk):
                piece = body[i : i + chunk]
                writer.write(f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n")
            writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        else:
            writer.write(body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


async def test_chunked_and_expect_continue_uploads(daemon, files, cli_finals):
    wav = files["wav24"].read_bytes()
    expected = text_of(cli_finals["wav24"])
    assert await raw_post(daemon.port, wav, chunked=True) == (200, (expected + "\n").encode())
    assert await raw_post(daemon.port, wav, expect=True) == (200, (expected + "\n").encode())
    status, body = await raw_post(daemon.port, wav[:20000], chunked=True, chunk=1)  # 20,000 one-byte chunks
    assert status == 400 and b"16384 chunks" in body


async def test_a_slow_or_abandoned_upload_is_bounded(daemon_factory):
    d = await daemon_factory("openai.upload_timeout_s=1")
    head = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b"
            b"\r\nContent-Length: 100000\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(head + b"--b\r\n" + b"x" * 1000)  # then nothing
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"openai.upload_timeout_s" in answer
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(head + b"x" * 1000)
    await writer.drain()
    writer.close()  # leaves during its upload: nothing to answer, its slot comes back
    assert await _drained(d)


async def test_uploads_and_realtime_over_tls(daemon_factory, files, cli_finals, tls_files):
    """With server.tls_cert/tls_key the SDK talks https:// and wss:// (the answer's close differs: no half-close)."""
    import ssl

    d = await daemon_factory(f"server.tls_cert='{tls_files['cert']}'", f"server.tls_key='{tls_files['key']}'",
                             f"server.auth_token='{TOKEN}'")
    trust = ssl.create_default_context(cafile=str(tls_files["cert"]))
    c = openai.AsyncOpenAI(base_url=f"https://127.0.0.1:{d.port}/v1", api_key=TOKEN, max_retries=0,
                           http_client=openai.DefaultAsyncHttpxClient(verify=trust))
    for _ in range(2):
        got = await c.audio.transcriptions.create(model="x", file=("a.wav", files["wav24"].read_bytes()))
        assert got.text == text_of(cli_finals["wav24"])
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"https://127.0.0.1:{d.port}/v1", api_key="bad", max_retries=0,
                                 http_client=openai.DefaultAsyncHttpxClient(verify=trust)).models.list()
    assert await _drained(d)
    async with connect(f"wss://127.0.0.1:{d.port}/v1/realtime?intent=transcription", ssl=trust,
                       additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert (await realtime_events(ws, "session.created"))[-1]["session"]["type"] == "transcription"


@pytest.mark.parametrize(("kwargs", "param", "words"), [
    ({"file": ("notes.txt", b"this is not audio at all " * 40)}, "file", "libsndfile"),
    ({"response_format": "diarized_json"}, "response_format", "json, text"),
    ({"response_format": "json", "timestamp_granularities": ["word"]}, "timestamp_granularities", "verbose_json"),
    ({"response_format": "verbose_json", "timestamp_granularities": ["sentence"]}, "timestamp_granularities",
     "word and/or segment"),
])
async def test_bad_requests_are_400_naming_the_field(daemon, files, kwargs, param, words):
    args = {"model": "whisper-1", "file": ("a.flac", files["flac"].read_bytes()), **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        await client(daemon.port).audio.transcriptions.create(**args)
    assert info.value.body["param"] == param and words in info.value.message


async def test_requests_without_a_form_or_a_file(daemon):
    http = client(daemon.port)
    with pytest.raises(openai.BadRequestError) as info:  # JSON instead of a form
        await http.post("/audio/transcriptions", body={"model": "x"}, cast_to=object)
    assert "multipart/form-data" in info.value.message
    status, body = await raw_post(daemon.port, b"")  # a form whose file is empty
    assert status == 400 and b"is empty" in body
    header_only = io.BytesIO()
    sf.write(header_only, np.zeros(0, np.float32), 16000, format="WAV")
    status, body = await raw_post(daemon.port, header_only.getvalue())
    assert status == 400 and b"no audio samples" in body
    status, body = await raw_post(daemon.port, b"garbage" * 100)
    assert status == 400 and b"libsndfile" in body and b"BytesIO" not in body
    with pytest.raises(openai.NotFoundError) as info:  # translations are not served
        await http.post("/audio/translations", body={"model": "x"}, cast_to=object)
    assert "/v1/audio/transcriptions" in info.value.message


async def test_requests_count_against_max_streams(daemon_factory, files, speech):
    d = await daemon_factory(f"server.auth_token='{TOKEN}'", "server.max_streams=1")
    async with connect(f"ws://127.0.0.1:{d.port}/v1/stream", additional_headers={"Authorization": f"Bearer {TOKEN}"}
                       ) as ws:
        await ws.recv()
        await ws.send(pcm16(speech[:8000]))
        with pytest.raises(openai.RateLimitError) as info:
            await client(d.port).audio.transcriptions.create(model="x", file=("a.flac", files["flac"].read_bytes()))
        assert "max_streams" in info.value.message or "busy" in info.value.message
    for _ in range(100):  # the websocket's slot comes back
        if d.active_streams == 0:
            break
        await asyncio.sleep(0.05)
    got = await client(d.port).audio.transcriptions.create(model="x", file=("a.flac", files["flac"].read_bytes()))
    assert got.text.startswith("turn on")


# -- Realtime -------------------------------------------------------------------------------------------------


def pcm24(files) -> bytes:
    audio, rate = sf.read(files["wav24"], dtype="int16")
    assert rate == 24000
    return audio.astype("<i2").tobytes()


async def test_realtime_session_through_the_sdk_equals_transcribe(daemon, files, cli_finals):
    expected = text_of(cli_finals["wav24"])
    pcm = pcm24(files)
    c = client(daemon.port)
    seen: list = []
    async with asyncio.timeout(TIMEOUT), c.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "gpt-4o-transcribe"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})

        async def send() -> None:
            for i in range(0, len(pcm), 9600):  # 200 ms a message
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
            await conn.input_audio_buffer.commit()  # the last utterance ends here (0.5 s of silence after it)
            await conn.input_audio_buffer.commit()  # nothing since: an error, after everything the first caused

        sender = asyncio.create_task(send())
        async for event in conn:
            if event.type == "error":
                assert event.error.code == "input_audio_buffer_commit_empty"
                break
            seen.append(event)
        await sender
    types = [e.type for e in seen]
    assert types[:2] == ["session.created", "session.updated"]
    assert seen[1].session.audio.input.format.rate == 24000
    completed = [e for e in seen if e.type == COMPLETED]
    assert " ".join(e.transcript for e in completed if e.transcript) == expected
    # each spoken item: speech_started, deltas, speech_stopped, committed, completed, in this order
    for item in {e.item_id for e in completed if e.transcript}:
        mine = [e.type for e in seen if getattr(e, "item_id", None) == item]
        assert mine[0] == "input_audio_buffer.speech_started" and mine[-1] == COMPLETED
        assert mine[-3:-1] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"] or \
            mine[-4:-2] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
        deltas = "".join(e.delta for e in seen if e.type == DELTA and e.item_id == item)
        final = next(e.transcript for e in completed if e.item_id == item)
        assert deltas and final.startswith(deltas)  # appended text only, none taken back
    starts = [e.audio_start_ms for e in seen if e.type == "input_audio_buffer.speech_started"]
    assert starts == sorted(starts) and starts[0] < 1000
    committed = [e for e in seen if e.type == "input_audio_buffer.committed"]
    assert [e.previous_item_id for e in committed[1:]] == [e.item_id for e in committed[:-1]]


@pytest.mark.parametrize(("sent", "previous", "words", "delta"), [
    ("", [], ["ten", "no"], ""),  # the first partial of an utterance: nothing agreed yet
    ("", ["ten", "no"], ["turn", "on", "the"], ""),  # rewritten: still nothing
    ("", ["turn", "on", "the"], ["turn", "on", "the", "kit"], "turn on the"),
    ("turn on the", ["turn", "on", "the", "kit"], ["turn", "on", "the", "kit", "lights"], " kit"),
    ("turn on the kit", ["turn", "on", "the", "kit"], ["turn", "on", "the", "kitchen"], ""),  # "kit" was wrong
    # the sent letters were the start of a longer word: the rest of it follows
    ("turn on the kit", ["turn", "on", "the", "kitchen"], ["turn", "on", "the", "kitchen", "lights"], "chen"),
    ("turn on the kit", ["turn", "on", "the", "kate"], ["turn", "on", "the", "kate"], ""),  # rewritten: nothing
    ("turn", ["turn", "on"], ["turn", "on"], " on"),
])
def test_deltas_carry_the_words_two_partials_agree_on(sent, previous, words, delta):
    from streamer.aio.protocols.realtime import stable_delta

    assert stable_delta(sent, previous, words) == delta


async def realtime_events(ws, until: str, limit: int = 200) -> list[dict]:
    out = []
    async with asyncio.timeout(TIMEOUT):
        while len(out) < limit:
            out.append(json.loads(await ws.recv()))
            if out[-1]["type"] == until:
                return out
    raise AssertionError(f"no {until} in {out}")


async def test_beta_transcription_session_and_manual_commit(daemon, files, cli_finals):
    """The beta events (``OpenAI-Beta: realtime=v1``): pcm16, turn detection off, one item per commit."""
    pcm = pcm24(files)
    headers = {"Authorization": f"Bearer {TOKEN}", "OpenAI-Beta": "realtime=v1"}
    async with connect(f"ws://127.0.0.1:{daemon.port}/v1/realtime?intent=transcription",
                       additional_headers=headers) as ws:
        assert (await realtime_events(ws, "transcription_session.created"))[-1]["session"]["input_audio_format"] == \
            "pcm16"
        await ws.send(json.dumps({"type": "transcription_session.update", "session": {
            "input_audio_format": "pcm16", "input_audio_transcription": {"model": "whisper-1", "language": "en"},
            "turn_detection": None}}))
        updated = (await realtime_events(ws, "transcription_session.updated"))[-1]["session"]
        assert updated["turn_detection"] is None and updated["input_audio_transcription"]["language"] == "en"
        for i in range(0, len(pcm), 48000):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[i : i + 48000]).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = await realtime_events(ws, COMPLETED)
    assert "input_audio_buffer.speech_started" not in [e["type"] for e in events]  # no server VAD
    assert events[-1]["transcript"] == text_of(cli_finals["wav24"])


async def healthy_native(port: int, audio: np.ndarray) -> str:
    """A native stream sent at 4x real time; its transcript."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    texts = []
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{port}/v1/stream", additional_headers=headers) as ws:
        await ws.recv()
        for i in range(0, len(audio), 3200):
            await ws.send(pcm16(audio[i : i + 3200]))
            await asyncio.sleep(0.05)
        await ws.send(json.dumps({"type": "stop"}))
        async for raw in ws:
            msg = json.loads(raw)
            assert msg["type"] != "error", msg
            if msg["type"] == "final" and msg["text"]:
                texts.append(msg["text"])
    return " ".join(texts)


BAD_EVENTS = [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_event"),
    ('{"event_id": "e1"}', "invalid_event"),
    ('{"type": 7}', "invalid_event"),
    ('{"type": "input_audio_buffer.append", "audio": 5}', "invalid_value"),
    ('{"type": "input_audio_buffer.append", "audio": "!!not base64!!"}', "invalid_base64"),
    ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "invalid_value"),  # 3 bytes: half a sample
    ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty"),
    ('{"type": "response.create"}', "unsupported_event"),
    ('{"type": "conversation.item.create", "item": {}}', "unsupported_event"),
    ('{"type": "no.such.event"}', "invalid_event_type"),
    ('{"type": "session.update", "session": {"type": "realtime"}}', "invalid_value"),
    ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}',
     "invalid_value"),
    ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": "24k"}}}}}',
     "invalid_value"),
    ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "magic"}}}}}',
     "invalid_value"),
    ('{"type": "transcription_session.update", "session": {"input_audio_format": "g711_ulaw"}}', "invalid_value"),
    ('{"type": "session.update", "session": []}', "invalid_value"),
]


async def test_bad_events_get_realtime_errors_and_leave_other_streams_alone(daemon, speech, cli_finals, files,
                                                                            model_runner, demo_words):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    healthy = asyncio.create_task(healthy_native(daemon.port, speech))
    url = f"ws://127.0.0.1:{daemon.port}/v1/realtime"
    async with connect(url, additional_headers=headers, max_size=None) as ws:  # no intent: not set up yet
        await realtime_events(ws, "session.created")
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "before"}))
        error = (await realtime_events(ws, "error"))[-1]["error"]
        assert error["code"] == "session_not_configured" and error["event_id"] == "before"
        assert "intent=transcription" in error["message"]
        await ws.send(b"\x00\x01")  # binary: not an event
        assert (await realtime_events(ws, "error"))[-1]["error"]["code"] == "invalid_event"
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))
        await realtime_events(ws, "session.updated")
        for text, code in BAD_EVENTS:
            await ws.send(text)
            error = (await realtime_events(ws, "error"))[-1]["error"]
            assert error["code"] == code, (text, error)
            assert error["message"] and error["type"] == "invalid_request_error"
        # still a working session: it transcribes after all that
        pcm = pcm24(files)
        for i in range(0, len(pcm), 96000):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[i : i + 96000]).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))  # an error after all the first caused
        events = await realtime_events(ws, "error")
        assert events[-1]["error"]["code"] == "input_audio_buffer_commit_empty"
        texts = [e["transcript"] for e in events if e["type"] == COMPLETED]
        assert " ".join(t for t in texts if t) == text_of(cli_finals["wav24"])
        # a message over server.max_message_bytes (1 MiB of base64) closes with 1009, as every websocket here
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (1 << 20)}))
        with pytest.raises(ConnectionClosed) as closed:
            await realtime_events(ws, "never")
        assert closed.value.rcvd.code == 1009
    from streamer.config import load_config
    from streamer.transcribe import new_session, stream_array

    session = new_session(load_config(None), model_runner.vocab, demo_words)
    assert await healthy == text_of([e for e in stream_array(session, model_runner, speech) if isinstance(e, Final)])


async def test_too_many_errors_close_the_session(daemon):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(f"ws://127.0.0.1:{daemon.port}/v1/realtime?intent=transcription",
                       additional_headers=headers) as ws:
        await realtime_events(ws, "session.created")
        from streamer.aio.protocols.realtime import MAX_ERRORS

        for _ in range(MAX_ERRORS):
            await ws.send("{}")
            await realtime_events(ws, "error")
        await ws.send("{}")
        last = (await realtime_events(ws, "error"))[-1]["error"]
        assert last["code"] == "too_many_errors"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008
    assert daemon.active_streams == 0 or await _drained(daemon)


async def _drained(daemon) -> bool:
    for _ in range(100):
        if daemon.active_streams == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_realtime_refused_when_busy_and_disabled(daemon_factory):
    d = await daemon_factory("server.max_streams=1")
    async with connect(f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription") as first:
        await realtime_events(first, "session.created")
        async with connect(f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription") as second:
            error = (await realtime_events(second, "error"))[-1]["error"]
            assert error["code"] == "busy"
            with pytest.raises(ConnectionClosed) as closed:
                await second.recv()
            assert closed.value.rcvd.code == 1013
    off = await daemon_factory("openai.enabled=false")
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"ws://127.0.0.1:{off.port}/v1/realtime"):
            pass
    assert refused.value.response.status_code == 404
    reader, writer = await asyncio.open_connection("127.0.0.1", off.port)
    writer.write(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert (await asyncio.wait_for(reader.read(), TIMEOUT)).startswith(b"HTTP/1.1 405")
    writer.close()
