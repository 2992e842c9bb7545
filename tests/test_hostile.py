"""Hostile clients: bad input gets its error event and close code, never 1011; the idle timeout counts
audio; names cannot be taken from other streams; a message the MQTT broker refuses cannot block the others; the
HTTP side answers odd requests with a 4xx and one log line. Where a finding is about other clients, a healthy
stream runs beside the hostile one and must get the finals ``streamer transcribe`` gives."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from http import HTTPStatus

import numpy as np
import pytest
from conftest import pcm16
from test_mqtt import brokers, counter, start_daemon, subscribers, until, without_ids  # noqa: F401 (fixtures)
from test_server import TIMEOUT, finals_of, http_get, native_session, reference_finals, wait_for_no_streams
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.config import SourceConfig
from streamer.events import Final


def as_s16(audio: np.ndarray) -> np.ndarray:
    """The float audio a server decodes from ``pcm16(audio)``."""
    return np.frombuffer(pcm16(audio), "<i2").astype(np.float32) / 32768


async def until_closed(ws) -> list[dict]:
    """Every message until the server closes."""
    msgs = []
    async with asyncio.timeout(TIMEOUT):
        try:
            async for msg in ws:
                msgs.append(json.loads(msg))
        except ConnectionClosed:
            pass
    return msgs


async def healthy_finals_match(d, runner, speech, **kwargs) -> None:
    """A healthy native stream on ``d`` gets exactly the finals ``streamer transcribe`` gives."""
    msgs, code = await native_session(d.port, pcm16(speech), chunk=1600, pace=0.003, **kwargs)
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(runner, as_s16(speech))]


# --- finding 10: every bad input gets its error event and documented close code ------------------------------

DEEP = "[" * 100_000 + "]" * 100_000

HOSTILE_INPUTS = [
    ("bad_message", ['{"type": "start", "words": ' + DEEP + "}"], 1007),  # RecursionError in json
    ("bad_message", ['{"type": "start", "words": [[[[[[[[[[[[[[[[["turn"]]]]]]]]]]]]]]]]]}'], 1007),  # 18 deep
    ("malformed_json", ['{"type": "start", "sample_rate": 1' + "0" * 5000 + "}"], 1007),  # int over 4300 digits
    ("malformed_json", ['{"type": "start", "sample_rate": NaN}'], 1007),
    ("malformed_json", ['{"type": "start", "sample_rate": -Infinity}'], 1007),
    ("unsupported_rate", ['{"type": "start", "sample_rate": 1e400}'], 1008),  # json reads inf
    ("bad_audio", [{"type": "start", "encoding": "f32le"}, np.array([0.1, 3e38], "<f4").tobytes()], 1007),
    ("bad_audio", [{"type": "start", "encoding": "f32le"}, np.array([0.1, -65.0], "<f4").tobytes()], 1007),
    ("bad_start", [{"type": "start", "name": "x\n"}], 1008),  # '$' matched before the newline
    ("bad_start", [{"type": "start", "name": "a/b"}], 1008),
]


@pytest.mark.parametrize(("code_name", "sends", "close_code"), HOSTILE_INPUTS,
                         ids=[b[0] + str(i) for i, b in enumerate(HOSTILE_INPUTS)])
async def test_hostile_input_gets_its_error_and_close_code(daemon_factory, model_runner, speech, code_name, sends,
                                                           close_code):
    d = await daemon_factory()
    healthy = asyncio.create_task(healthy_finals_match(d, model_runner, speech))
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream", max_size=None) as ws:
        await ws.recv()
        for item in sends:
            await ws.send(json.dumps(item) if isinstance(item, dict) else item)
        msgs = await until_closed(ws)
    assert [(m["type"], m.get("code")) for m in msgs] == [("error", code_name)], msgs
    assert msgs[0]["message"] and ws.close_code == close_code
    await healthy


VOSK_RATES = [("NaN", 1007), ("Infinity", 1007), ("-Infinity", 1007), ("1e400", 1008), ("1e308", 1008)]


@pytest.mark.parametrize(("rate", "close_code"), VOSK_RATES, ids=[r for r, _ in VOSK_RATES])
async def test_vosk_sample_rate_that_is_no_number(daemon_factory, speech, rate, close_code):
    """JSON's NaN/Infinity literals (Python's json reads them) and 1e400 (read as inf) crashed at the first frame."""
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
        await ws.send('{"config": {"sample_rate": %s}}' % rate)  # noqa: UP031 (a JSON literal, not a Python value)
        try:
            await ws.send(pcm16(speech[:3200]))
        except ConnectionClosed:
            pass
        replies = await until_closed(ws)
    assert len(replies) == 1 and ("sample_rate" in replies[0]["error"] or "JSON" in replies[0]["error"]), replies
    assert ws.close_code == close_code


async def test_out_of_range_float_audio_after_speech_keeps_the_finals(daemon_factory, model_runner, speech):
    """Huge finite f32le samples (3e38) became NaN in the engine's normalisation and lost the finals of the speech
    before them; now the frame is refused, and the finals of what was accepted come first, then the error."""
    d = await daemon_factory("endpoint.vad=false")  # the CTC rule: the last sentence is still open at the bad frame
    audio = speech[:-8000].astype("<f4")  # without the last pause: the last final comes from the stream's end
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "start", "encoding": "f32le"}))
        for i in range(0, len(audio), 3200):
            await ws.send(audio[i : i + 3200].tobytes())
        await ws.send(np.full(1600, 3e38, "<f4").tobytes())
        msgs = await until_closed(ws)
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(model_runner, audio)]
    assert len(finals_of(msgs)) == 2 and finals_of(msgs)[-1]["reason"] == "end"
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "bad_audio" and "out-of-range" in msgs[-1]["message"]
    assert ws.close_code == 1007


# --- finding 8: the idle timeout counts audio, not control messages -------------------------------------------


async def test_control_messages_do_not_keep_a_stream_open(daemon_factory, speech):
    """A client that sends only {"type": "flush"} every few seconds held its slot forever."""
    d = await daemon_factory("server.idle_timeout_s=1.0")
    audio = pcm16(speech)
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        await ws.recv()
        for i in range(6):  # audio every 0.3 s for 1.8 s: longer than the idle timeout, still open
            await ws.send(audio[i * 3200 : (i + 1) * 3200])
            await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionClosed):
            for _ in range(20):  # 6 s of flushes at most
                await ws.send(json.dumps({"type": "flush"}))
                await asyncio.sleep(0.3)
        waited = loop.time() - t0
    assert ws.close_code == 1000 and ws.close_reason == "idle timeout"
    assert waited < 2.5


async def test_vosk_reset_does_not_keep_a_stream_open(daemon_factory, speech):
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0", "server.idle_timeout_s=1.0")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
        await ws.send(pcm16(speech[:6400]))
        await ws.recv()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionClosed):
            for _ in range(20):
                await ws.send(json.dumps({"reset": 1}))
                await ws.recv()
                await ws.send(json.dumps({"config": {"words": True}}))
                await asyncio.sleep(0.3)
        waited = loop.time() - t0
    assert ws.close_code == 1000 and ws.close_reason == "idle timeout"
    assert waited < 2.5


# --- finding 1 and 13: names and topics ------------------------------------------------------------------------


async def hostile_named(port: int, name: str, audio: bytes) -> tuple[list[dict], int | None]:
    """A client that starts a stream called ``name`` and speaks into it; every message it got, and the close code."""
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        await ws.recv()
        try:
            await ws.send(json.dumps({"type": "start", "name": name}))
            for i in range(0, len(audio), 6400):
                await ws.send(audio[i : i + 6400])
            await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass
        return await until_closed(ws), ws.close_code


async def test_a_name_in_use_is_refused_and_free_again_once_its_stream_ended(daemon_factory, model_runner, speech):
    """Any client could take another live stream's or a capture source's name and speak on its viewers and topic."""
    d = await daemon_factory()
    d.cfg = dataclasses.replace(d.cfg, sources=(SourceConfig(name="room"),))  # as [[sources]] would
    other = pcm16(speech[::-1].copy())
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/listen/desk") as viewer:
        await viewer.recv()
        healthy = asyncio.create_task(native_session(d.port, pcm16(speech), chunk=1600, pace=0.003,
                                                     start={"type": "start", "name": "desk"}))
        seen = [json.loads(await viewer.recv())]  # the healthy stream holds the name now
        async with connect(f"ws://127.0.0.1:{d.port}/v1/stream") as unnamed:  # named by its session id
            session = json.loads(await unnamed.recv())["session"]
            await unnamed.send(other[:3200])
            for name in ("desk", "room", session):
                msgs, code = await hostile_named(d.port, name, other)
                assert [(m["type"], m.get("code")) for m in msgs] == [("error", "name_in_use")], (name, msgs)
                assert code == 1008 and repr(name) in msgs[0]["message"]
            assert "capture source" in (await hostile_named(d.port, "room", b""))[0][0]["message"]
        msgs, code = await healthy
        assert code == 1000
        expected = reference_finals(model_runner, as_s16(speech))
        assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in expected]
        while len(finals_of(seen)) < len(expected):
            seen.append(json.loads(await viewer.recv()))
        assert finals_of(seen) == finals_of(msgs)  # nobody else spoke on "desk"
    msgs, code = await native_session(d.port, pcm16(speech[:16000]), start={"type": "start", "name": "desk"})
    assert code == 1000 and msgs[-1]["type"] == "end"  # free again
    await wait_for_no_streams(d)
    assert not d._names


async def test_a_message_the_broker_refuses_does_not_block_the_others(brokers, subscribers,  # noqa: F811
                                                                     daemon_factory, model_runner, speech, caplog):
    """mosquitto closes the connection on a topic with a control character or a packet over max_packet_size; such a
    message went back to the front of the queue after each reconnect, and no later final reached MQTT."""
    broker = await brokers(extra=("max_packet_size 4096",))
    sub = await subscribers(broker.port, "streamer/+/final")
    d, pub = await start_daemon(daemon_factory, broker.port)
    async with asyncio.timeout(TIMEOUT):
        await pub.wait_connected()
    with caplog.at_level(logging.WARNING, logger="streamer.mqtt"):
        d.hub.publish("x\n", "s1", Final(0, "a stream name with a newline", 0.0, 1.0))  # the topic level becomes x_
        d.hub.publish("room", "s2", Final(0, "so long " * 1000, 0.0, 60.0))  # 8 kB: over the broker's limit
        msgs, code = await native_session(d.port, pcm16(speech), chunk=1600, pace=0.003,
                                          start={"type": "start", "name": "desk"})
        expected = finals_of(msgs)
        assert code == 1000
        assert [f["text"] for f in expected] == [f["text"] for f in reference_finals(model_runner, as_s16(speech))]
        await sub.wait_for(lambda s: len(s.finals()) >= 1 + len(expected))
        await until(lambda: pub.pending == 0)
    assert [m.topic.value for m in sub.messages][:1] == ["streamer/x_/final"]
    assert [without_ids(p) for p in sub.finals()[1:]] == expected
    assert counter(pub.metrics.mqtt_dropped, "final") == 1
    assert "dropped 1 message(s) (latest: final to streamer/room/final): the broker closed the connection each of " \
           "the 3 times it was sent" in caplog.text
    status, _, body = await asyncio.to_thread(http_get, d.port, "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "degraded" and health["mqtt"] == "degraded"
    assert "a final was dropped" in health["mqtt_reason"]


async def test_healthz_says_mqtt_is_degraded_while_the_broker_is_away(brokers, daemon_factory):  # noqa: F811
    broker = await brokers()
    d, pub = await start_daemon(daemon_factory, broker.port)
    pub.degraded_after_s = 0.5

    async def health() -> tuple[int, dict]:
        status, _, body = await asyncio.to_thread(http_get, d.port, "/healthz")
        return status, json.loads(body)

    async with asyncio.timeout(TIMEOUT):
        await pub.wait_connected()
    assert await health() == (200, {**(await health())[1], "status": "ok", "mqtt": "ok"})
    await broker.kill()
    await until(lambda: not pub.connected)
    assert (await health())[1]["mqtt"] == "ok"  # a broker restart within the grace period is no news
    await asyncio.sleep(0.6)
    status, h = await health()
    assert status == 200 and h["status"] == "degraded" and h["mqtt"] == "degraded"
    assert h["mqtt_reason"].startswith(f"not connected to 127.0.0.1:{broker.port} for ")
    await broker.start()
    async with asyncio.timeout(TIMEOUT):
        await pub.wait_connected()
    status, h = await health()
    assert status == 200 and h["status"] == "ok" and h["mqtt"] == "ok" and "mqtt_reason" not in h


# --- finding 12: HTTP edges ---------------------------------------------------------------------------------------


async def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP request; the status, headers (lower-case names) and body of the answer."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.read()  # up to the server's end of stream
        finally:
            writer.close()
    assert data, f"no answer to {request[:60]!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), headers, body


HTTP_CASES = [
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 404),  # 500 and a traceback per request
    (b"GET /js/" + b"b" * 256 + b"/app.js HTTP/1.1\r\nHost: h\r\n\r\n", 404),
    (b"GET /index.html\x00.png HTTP/1.1\r\nHost: h\r\n\r\n", 404),
    (b"POST /healthz HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nx=1", 405),  # no answer at all
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nx=1\r\n0\r\n\r\n", 405),
    (b"GET /healthz HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi", 405),
    (b"PUT /healthz HTTP/1.1\r\nHost: h\r\n\r\n", 405),
    (b"DELETE /v1/stream HTTP/1.1\r\nHost: h\r\n\r\n", 405),
    (b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", 405),
]


async def test_odd_http_requests_get_a_4xx_and_one_log_line(daemon_factory, caplog):
    d = await daemon_factory()
    for request, expected in HTTP_CASES:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            status, headers, body = await raw_http(d.port, request)
        assert status == expected, (request[:40], status, body)
        assert body.endswith(b"\n") and len(body) == int(headers["content-length"])
        if status == 405:
            assert headers["allow"] == "GET, HEAD" and b"use GET, HEAD" in body
        sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP response sent")]
        assert sent == [f"HTTP response sent ({status} {HTTPStatus(status).phrase})"]  # websockets' line
        assert not any(r.exc_info or r.levelno >= logging.WARNING for r in caplog.records)
    status, _, body = await raw_http(d.port, b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"  # and the daemon serves on


async def test_head_gets_the_headers_without_the_body(daemon_factory):
    d = await daemon_factory()
    for path, status in [("/", 200), ("/healthz", 200), ("/metrics", 200), ("/nope.txt", 404)]:
        got, get_headers, get_body = await raw_http(d.port, f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert got == status and get_body
        got, headers, body = await raw_http(d.port, f"HEAD {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert (got, body) == (status, b""), path
        assert headers["content-type"] == get_headers["content-type"]
        if path in ("/", "/nope.txt"):  # the same bytes each time
            assert headers["content-length"] == get_headers["content-length"] == str(len(get_body))
