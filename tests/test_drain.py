"""Draining (SIGTERM): no new stream, upload or viewer is taken, and every live stream goes on to its own end.

The daemon keeps listening while it drains: ``/livez`` answers 200, ``/readyz`` 503 ``draining`` (and 503 ``full``
at ``server.max_streams``), a new websocket 503 with ``Retry-After``, an upload 503; a native, Vosk or Wyoming
stream that was live goes on until its client stops it, with the finals ``streamer transcribe`` makes. A stream
still live when ``server.drain_timeout_s`` passes, after a second SIGTERM, or with ``drain_timeout_s = 0`` gets
today's shutdown: its finals, ``end`` and 1001. In-process daemons on port 0, and ``streamer serve --processes 2``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request

import openai
import pytest
from conftest import pcm16
from test_mqtt import brokers, start_daemon, subscribers  # noqa: F401  (fixtures)
from test_processes import Client, as_float, open_client, served, spread, texts  # noqa: F401  (served: a fixture)
from test_server import finals_of, reference_finals
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

TIMEOUT = 60


def get(port: int, path: str) -> tuple[int, dict]:
    """A GET on the daemon's port: its status and JSON body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def probe(port: int, path: str) -> tuple[int, dict]:
    return await asyncio.to_thread(get, port, path)


@pytest.fixture(scope="module")
def expected(model_runner, speech) -> list[str]:
    """The texts of what ``streamer transcribe`` makes of the test speech."""
    return texts(reference_finals(model_runner, as_float(pcm16(speech))))


async def draining(d) -> asyncio.Task[None]:
    """SIGTERM's action on an in-process daemon: the drain begins (its task runs on)."""
    task = d.request_shutdown(drain=True)
    await asyncio.sleep(0)
    assert d.draining.is_set()
    return task


async def test_live_streams_go_on_to_their_end_while_nothing_new_is_taken(daemon_factory, speech, expected):
    d = await daemon_factory("server.drain_timeout_s=120", "vosk.enabled=true", "vosk.port=0",
                             "server.auth_token='secret'")
    auth = {"Authorization": "Bearer secret"}
    audio = pcm16(speech)
    half = len(audio) // 4 * 2
    assert (await probe(d.port, "/readyz")) == (200, {"status": "ready", "streams": 0, "max_streams": 64})
    assert (await probe(d.port, "/livez"))[0] == 200
    async with asyncio.timeout(TIMEOUT * 2):
        native = Client(ws := await connect(f"ws://127.0.0.1:{d.port}/v1/stream", additional_headers=auth),
                        json.loads(await ws.recv()))
        vosk = await connect(f"ws://127.0.0.1:{d.vosk_port}/", additional_headers=auth)
        await vosk.send(json.dumps({"config": {"sample_rate": 16000}}))
        await native.send(audio[:half])
        await vosk.send(audio[:half])
        await native.heard()
        drain = await draining(d)

        status, body = await probe(d.port, "/readyz")
        assert (status, body["status"], body["streams"]) == (503, "draining", 2)
        status, body = await probe(d.port, "/livez")
        assert (status, body["status"]) == (200, "alive")
        status, body = await probe(d.port, "/healthz")  # as before for its users: 503 while shutting down
        assert (status, body["status"], body["draining"]) == (503, "unavailable", True)
        for url in (f"ws://127.0.0.1:{d.port}/v1/stream", f"ws://127.0.0.1:{d.port}/v1/listen/someone",
                    f"ws://127.0.0.1:{d.vosk_port}/"):
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, additional_headers=auth)
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers["Retry-After"] == "1"
        upload = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="secret", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            await upload.audio.transcriptions.create(model="x", file=("a.wav", b"RIFF"))
        assert info.value.status_code == 503 and "shutting down" in info.value.message

        # the live streams go on as before, to the end their clients choose
        await native.send(audio[half:])
        await vosk.send(audio[half:])
        messages = await native.finish()
        await vosk.send('{"eof": 1}')
        replies = [json.loads(m) async for m in vosk]
        await drain
    assert native.code == 1000 and messages[-1]["type"] == "end"
    assert messages[-1].get("reason") != "server shutting down"
    assert [t for t in texts(finals_of(messages)) if t] == expected
    assert vosk.close_code == 1000
    assert [r["text"] for r in replies if r.get("text")] == expected
    assert d.closed.is_set()


async def test_a_wyoming_transcription_goes_on_and_a_new_one_is_refused(daemon_factory, speech, expected):
    d = await daemon_factory("server.drain_timeout_s=120", "wyoming.enabled=true", "wyoming.uri='tcp://127.0.0.1:0'")
    audio = pcm16(speech)
    fmt = {"rate": 16000, "width": 2, "channels": 1}
    async with asyncio.timeout(TIMEOUT), AsyncTcpClient("127.0.0.1", d.wyoming.port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(**fmt).event())
        await client.write_event(AudioChunk(audio=audio[:32000], **fmt).event())
        await asyncio.sleep(0.2)  # admitted and streaming
        drain = await draining(d)
        async with AsyncTcpClient("127.0.0.1", d.wyoming.port) as late:
            await late.write_event(Transcribe(language="en").event())
            refusal = await late.read_event()
        assert refusal is not None and refusal.type == "error" and "shutting down" in refusal.data["text"]
        for i in range(32000, len(audio), 3200):
            await client.write_event(AudioChunk(audio=audio[i : i + 3200], **fmt).event())
        await client.write_event(AudioStop().event())
        while (event := await client.read_event()) is not None and event.type != "transcript":
            pass
    await drain
    assert event is not None and event.data["text"] == " ".join(expected)


async def test_a_stream_live_at_drain_timeout_gets_its_finals_end_and_1001(daemon_factory, speech):
    d = await daemon_factory("server.drain_timeout_s=1")
    async with asyncio.timeout(TIMEOUT):
        client = await open_client(d.port)
        await client.send(pcm16(speech[: 3 * 16000]))
        await client.heard()
        drain = await draining(d)
        messages = await client.closed()  # the client never stops: the drain's second passes
        await drain
    assert client.code == 1001
    assert messages[-1] == {"type": "end", "session": client.ready["session"], "reason": "server shutting down"}
    assert any(f["text"] for f in finals_of(messages))


@pytest.mark.parametrize("how", ["second SIGTERM", "drain_timeout_s = 0"])
async def test_a_second_sigterm_or_no_drain_finalises_at_once(daemon_factory, speech, how):
    d = await daemon_factory("server.drain_timeout_s=" + ("600" if how == "second SIGTERM" else "0"))
    async with asyncio.timeout(TIMEOUT):  # far below the drain's 600 s
        client = await open_client(d.port)
        await client.send(pcm16(speech[: 3 * 16000]))
        await client.heard()
        drain = await draining(d)
        if how == "second SIGTERM":
            await asyncio.sleep(0.5)
            assert not drain.done() and client.code is None  # draining, the stream untouched
            d.request_shutdown()
        messages = await client.closed()
        await drain
    assert client.code == 1001 and messages[-1]["reason"] == "server shutting down"
    assert any(f["text"] for f in finals_of(messages))


async def test_mqtt_status_says_draining_then_offline(brokers, subscribers, daemon_factory, speech):  # noqa: F811
    broker = await brokers()
    sub = await subscribers(broker.port, "streamer/status")
    d, publisher = await start_daemon(daemon_factory, broker.port, "server.drain_timeout_s=120")
    d.on_drain.append(publisher.draining)  # as streamer serve wires it
    await sub.wait_for(lambda s: s.status() == ["online"])
    async with asyncio.timeout(TIMEOUT):
        client = await open_client(d.port)
        await client.send(pcm16(speech[:16000]))
        await client.heard()
        drain = await draining(d)
        await sub.wait_for(lambda s: s.status() == ["online", "draining"])
        await client.finish()
        await drain
    await sub.wait_for(lambda s: s.status() == ["online", "draining", "offline"])
    assert client.code == 1000


async def test_a_full_daemon_is_live_but_not_ready(daemon_factory, speech):
    d = await daemon_factory("server.max_streams=1")
    async with asyncio.timeout(TIMEOUT):
        client = await open_client(d.port)
        await client.send(pcm16(speech[:16000]))
        await client.heard()
        assert (await probe(d.port, "/readyz")) == (503, {"status": "full", "streams": 1, "max_streams": 1})
        assert (await probe(d.port, "/livez"))[0] == 200
        assert (await probe(d.port, "/healthz"))[0] == 200  # as before: serving
        await client.finish()
        for _ in range(100):
            if d.active_streams == 0:
                break
            await asyncio.sleep(0.05)
        assert (await probe(d.port, "/readyz"))[0] == 200


async def test_every_process_drains_and_a_second_sigterm_finalises(served, speech, expected):  # noqa: F811
    """``--processes 2``: SIGTERM to the supervisor; each process's live streams go on to their clients' stop and get
    transcribe's finals; a new connection gets 503 from whichever process takes it; a second SIGTERM finalises a
    stream that was still live (1001); the supervisor exits 0."""
    s = await served("server.drain_timeout_s=600")
    audio = pcm16(speech)
    half = len(audio) // 4 * 2
    clients = await spread(s.port, 1)
    lingering = await open_client(s.port)
    await asyncio.gather(*(c.send(audio[:half]) for c in [*clients, lingering]))
    await asyncio.gather(*(c.heard() for c in clients))
    mark = len(s.lines)
    s.signal(signal.SIGTERM)
    for slot in (0, 1):
        await s.wait_log(rf"\[p{slot}\].*draining: \d+ live stream", since=mark)
    for _ in range(4):  # wherever a new one lands, it is refused
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{s.port}/v1/stream")
        assert refused.value.response.status_code == 503
    status, body = await asyncio.to_thread(s.get, "/readyz")
    assert status == 503 and json.loads(body)["status"] == "draining"
    for c in clients:
        await c.send(audio[half:])
        messages = await c.finish()
        assert c.code == 1000 and messages[-1]["type"] == "end"
        assert [t for t in texts(finals_of(messages)) if t] == expected
    assert lingering.code is None  # still live, still draining
    s.signal(signal.SIGTERM)
    messages = await lingering.closed()
    assert lingering.code == 1001 and messages[-1]["reason"] == "server shutting down"
    assert await s.wait() == 0
