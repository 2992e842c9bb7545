"""Attacks on the HTTP side and on Realtime sessions, each on a real daemon on port 0, with raw sockets where the
request is malformed and the official ``openai`` package where it is not: cross-site uploads, DNS rebinding (a
``Host`` that is not the daemon's), a multipart boundary too long for the parser, a decompression bomb by channels,
repeated headers that must be single, NaN and deep nesting in Realtime events. Where an attack is about other
clients, a healthy stream runs beside it and must get the finals ``streamer transcribe`` gives."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import socket
import struct
import sys

import numpy as np
import openai
import pytest
import soundfile as sf
from test_hostile import healthy_finals_match, raw_http
from test_server import TIMEOUT
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

BOUNDARY = "streamerboundary"


def wav(seconds: float = 0.5, channels: int = 1, rate: int = 16000) -> bytes:
    """A short WAV of quiet noise."""
    out = io.BytesIO()
    noise = np.random.default_rng(0).normal(0, 0.01, (int(seconds * rate), channels)).astype(np.float32)
    sf.write(out, noise, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def form(audio: bytes, boundary: str = BOUNDARY, filename: str = "a.wav") -> bytes:
    """A multipart form as the OpenAI SDK sends it: the file and the model."""
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nstreamer\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()


def upload(port: int, body: bytes, *headers: str, host: str | None = None, boundary: str = BOUNDARY) -> bytes:
    """A raw ``POST /v1/audio/transcriptions`` with ``headers`` ("Name: value") added."""
    lines = ["POST /v1/audio/transcriptions HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}",
             f"Content-Type: multipart/form-data; boundary={boundary}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def openai_error(status: int, body: bytes) -> dict:
    """The ``error`` of an answer in OpenAI's shape."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, (status, body)
    return error


# --- cross-site uploads ------------------------------------------------------------------------------------------


async def test_uploads_from_other_sites_pages_are_refused(daemon_factory):
    d = await daemon_factory("server.allowed_origins=['https://captions.example.org']")
    body = form(wav())
    for foreign in ("Origin: https://evil.example", "Origin: null", "Sec-Fetch-Site: cross-site",
                    f"Origin: http://127.0.0.1:{d.port + 1}"):
        status, _, answer = await raw_http(d.port, upload(d.port, body, foreign))
        assert status == 403, (foreign, answer)
        assert openai_error(status, answer)["code"] == "origin_not_allowed"
    for own in ("", f"Origin: http://127.0.0.1:{d.port}", f"Origin: http://localhost:{d.port}",
                "Sec-Fetch-Site: same-origin", "Origin: https://captions.example.org"):
        status, _, answer = await raw_http(d.port, upload(d.port, body, *([own] if own else [])))
        assert status == 200 and "text" in json.loads(answer), (own, answer)


async def test_the_sdk_still_uploads(daemon_factory):
    d = await daemon_factory()
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    got = await c.audio.transcriptions.create(model="streamer", file=("a.wav", wav()))
    assert isinstance(got.text, str)


# --- repeated headers that must be single -------------------------------------------------------------------------

SINGLE = ["Content-Type: multipart/form-data; boundary=x", "Authorization: Bearer s3cret", "Expect: 100-continue",
          "Origin: http://127.0.0.1"]


async def test_a_repeated_single_header_gets_400(daemon_factory, caplog):
    d = await daemon_factory("server.auth_token='s3cret'")
    body = form(wav())
    auth = "Authorization: Bearer s3cret"
    ws = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
          "Sec-WebSocket-Version: 13", auth)
    cases = [upload(d.port, body, auth, *[extra.format(n=len(body))] * 2) for extra in SINGLE]
    cases.append(upload(d.port, body, auth, f"Host: 127.0.0.1:{d.port}"))
    for path, extra in [("/v1/models", [auth, auth]), ("/v1/stream", [*ws, "Origin: http://a", "Origin: http://b"]),
                        ("/v1/realtime?intent=transcription", [*ws, "OpenAI-Beta: realtime=v1", "OpenAI-Beta: x"]),
                        ("/healthz", [f"Host: 127.0.0.1:{d.port}"])]:
        cases.append("\r\n".join([f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{d.port}", *extra, "", ""]).encode())
    for request in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            status, _, answer = await raw_http(d.port, request)
        # (two Host headers: h11 refuses the head itself, in its words)
        assert status == 400 and (b"more than once" in answer or b"multiple Host" in answer), \
            (request.split(b"\r\n\r\n")[0], status, answer)
        assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records)
    status, _, _ = await raw_http(d.port, upload(d.port, body, auth))
    assert status == 200  # and the daemon serves on


async def test_two_differing_lengths_get_400(daemon_factory):
    # two Content-Length headers of one value are one length (RFC 9110, 8.6: h11 takes them as one); two that
    # differ are the framing difference request smuggling needs, and so is a length beside chunked framing
    d = await daemon_factory("server.auth_token='s3cret'")
    body = form(wav())
    for extra in (f"Content-Length: {len(body) + 10}", "Transfer-Encoding: chunked"):
        status, _, answer = await raw_http(d.port, upload(d.port, body, "Authorization: Bearer s3cret", extra))
        assert status == 400 and (b"Content-Length" in answer or b"content-length" in answer), (extra, status, answer)
    status, _, _ = await raw_http(d.port, upload(d.port, body, "Authorization: Bearer s3cret",
                                                 f"Content-Length: {len(body)}"))
    assert status == 200




# --- DNS rebinding -------------------------------------------------------------------------------------------------


async def test_a_host_that_is_not_the_daemons_is_refused(daemon_factory):
    d = await daemon_factory("server.allowed_hosts=['asr.example.org']")
    rebound = f"evil.example:{d.port}"
    for path in ("/healthz", "/metrics", "/", "/v1/models"):
        status, _, answer = await raw_http(d.port, f"GET {path} HTTP/1.1\r\nHost: {rebound}\r\n\r\n".encode())
        assert status == 403 and b"server.allowed_hosts" in answer, (path, status, answer)
    upgrade = (f"GET /v1/listen/kitchen HTTP/1.1\r\nHost: {rebound}\r\nOrigin: http://{rebound}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
    status, _, _ = await raw_http(d.port, upgrade.encode())
    assert status == 403  # was 101: the page of evil.example followed the kitchen's captions
    status, _, answer = await raw_http(d.port, upload(d.port, form(wav()), f"Origin: http://{rebound}", host=rebound))
    assert status == 403 and openai_error(status, answer)["code"] == "host_not_allowed"
    for own in (f"127.0.0.1:{d.port}", f"localhost:{d.port}", f"[::1]:{d.port}", "localhost", "myhost",
                f"192.168.1.20:{d.port}", "asr.example.org", "app.localhost"):
        status, _, answer = await raw_http(d.port, f"GET /healthz HTTP/1.1\r\nHost: {own}\r\n\r\n".encode())
        assert status == 200, (own, answer)


async def test_with_a_token_other_host_names_are_allowed(daemon_factory):
    d = await daemon_factory("server.auth_token='s3cret'")  # behind a proxy with its public name: the token guards
    status, _, _ = await raw_http(d.port, b"GET /healthz HTTP/1.1\r\nHost: asr.example.org\r\n\r\n")
    assert status == 200




# --- a multipart boundary the parser refuses ----------------------------------------------------------------------


async def test_a_boundary_over_256_characters_gets_400(daemon_factory):
    d = await daemon_factory()
    long = "b" * 300
    status, _, answer = await raw_http(d.port, upload(d.port, form(wav(), long), boundary=long))
    assert status == 400 and "boundary" in openai_error(status, answer)["message"].lower()




# --- a decompression bomb by channels -----------------------------------------------------------------------------


async def test_audio_with_more_than_8_channels_is_refused(daemon_factory, model_runner, speech):
    d = await daemon_factory()
    bomb = io.BytesIO()  # 4 KB that decodes to 255 x 192,000 samples a second
    sf.write(bomb, np.zeros((8000, 255), np.float32), 192000, format="OGG", subtype="VORBIS")

    async def attack() -> None:
        for data in (bomb.getvalue(), wav(channels=9)):
            status, _, answer = await raw_http(d.port, upload(d.port, form(data, filename="bomb.ogg")))
            assert status == 400 and "channels" in openai_error(status, answer)["message"], answer

    await asyncio.gather(attack(), healthy_finals_match(d, model_runner, speech))
    status, _, answer = await raw_http(d.port, upload(d.port, form(wav(channels=8))))
    assert status == 200, answer




# --- Realtime: NaN and Infinity, deep nesting ---------------------------------------------------------------------


def strict_json(text: str) -> dict:
    """``text`` parsed as a browser would: NaN and Infinity are no JSON."""

    def refuse(constant: str) -> None:
        pytest.fail(f"{constant} sent: {text[:200]}")

    return json.loads(text, parse_constant=refuse)


async def realtime_error(ws, event: str) -> dict:
    """Send ``event``; the error event it gets (nothing sent in between may hold NaN or Infinity)."""
    await ws.send(event)
    async with asyncio.timeout(TIMEOUT):
        while True:
            msg = strict_json(await ws.recv())
            if msg["type"] == "error":
                return msg["error"]


def vad_update(turn_detection: str) -> str:
    return ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": '
            '{"turn_detection": ' + turn_detection + "}}}}")


async def test_realtime_refuses_nan_and_infinity(daemon_factory):
    d = await daemon_factory()
    async with connect(f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription") as ws:
        await ws.recv()  # session.created
        for value in ("NaN", "Infinity", "-Infinity"):
            error = await realtime_error(ws, vad_update('{"type": "server_vad", "threshold": ' + value + "}"))
            assert error["code"] == "invalid_json" and value.lstrip("-") in error["message"]


async def test_realtime_bounds_nesting_and_echoes_only_its_keys(daemon_factory, model_runner, speech):
    d = await daemon_factory()

    async def attack() -> None:
        async with connect(f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription") as ws:
            await ws.recv()  # session.created
            for depth in (977, 20):  # parsed, then echoed (977: 1011 where json.dumps ran out of stack)
                deep = '{"type": "server_vad", "x": ' + "[" * depth + "]" * depth + "}"
                error = await realtime_error(ws, vad_update(deep))
                assert error["code"] == "invalid_json" and "at most 16" in error["message"], error
            await ws.send(vad_update('{"type": "server_vad", "threshold": 0.6, "x": [[[1]]], "y": "z"}'))
            async with asyncio.timeout(TIMEOUT):
                while (msg := strict_json(await ws.recv()))["type"] != "session.updated":
                    pass
            vad = msg["session"]["audio"]["input"]["turn_detection"]
            assert vad["threshold"] == 0.6 and "x" not in vad and "y" not in vad

    await asyncio.gather(attack(), healthy_finals_match(d, model_runner, speech))


# --- an upload that holds a stream and sends nothing --------------------------------------------------------------


async def test_an_upload_that_sends_nothing_is_closed_after_the_idle_timeout(daemon_factory, model_runner, speech):
    d = await daemon_factory("server.max_streams=1", "server.idle_timeout_s=1", "openai.upload_timeout_s=30")
    body = form(wav())
    head = upload(d.port, body)[: -len(body)]
    status, _, answer = await raw_http(d.port, head + body[:100])  # and then nothing: it held the stream 30 s
    assert status == 408 and openai_error(status, answer)["code"] == "upload_idle", answer
    await healthy_finals_match(d, model_runner, speech)  # the stream it held is free again


# --- a shutdown while uploads are transcribed ---------------------------------------------------------------------


async def test_uploads_under_way_at_shutdown_end_with_what_was_transcribed(daemon_factory, speech, tmp_path):
    d = await daemon_factory()
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(speech, 40), 16000, subtype="PCM_16")  # minutes of audio: still decoding at the stop
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    deltas: list[str] = []
    heard = asyncio.Event()

    async def streamed() -> openai.APIError:
        events = await c.audio.transcriptions.create(model="streamer", file=long, stream=True)
        with pytest.raises(openai.APIError) as stopped:
            async for event in events:
                assert event.type == "transcript.text.delta", event  # never done: the file is not done
                deltas.append(event.delta)
                heard.set()
        return stopped.value

    async def whole() -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as stopped:
            await c.audio.transcriptions.create(model="streamer", file=long)
        return stopped.value

    streaming, answering = asyncio.create_task(streamed()), asyncio.create_task(whole())
    async with asyncio.timeout(TIMEOUT):
        await heard.wait()
    await d.shutdown()
    stopped, refused = await streaming, await answering
    assert "shutting down" in stopped.message and "".join(deltas).strip()
    assert refused.status_code == 503 and refused.body["code"] == "shutting_down"
    assert isinstance(refused.response.json()["text"], str)


# --- Realtime: session updates of any size ------------------------------------------------------------------------


async def test_realtime_refuses_large_session_updates(daemon_factory, model_runner, speech):
    d = await daemon_factory()
    big = json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"prompt": "turn on the lights " * 10_000}}}}})  # 190 KB, parsed and echoed whole

    async def flood() -> None:
        async with connect(f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription", max_size=None) as ws:
            await ws.recv()  # session.created
            for _ in range(5):
                error = await realtime_error(ws, big)
                assert error["code"] == "update_too_large" and "at most 16384" in error["message"], error

    await asyncio.gather(flood(), flood(), healthy_finals_match(d, model_runner, speech))


# --- chunk sizes that are not hex digits --------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0x{n:x}", "0_{n:x}", "+{n:x}", " {n:x}"])
async def test_a_chunk_size_that_is_not_hex_digits_gets_400(daemon_factory, size):
    d = await daemon_factory()
    body = form(wav(1.0))
    request = upload(d.port, body)[: -len(body)].replace(f"Content-Length: {len(body)}".encode(),
                                                         b"Transfer-Encoding: chunked")
    n = len(body)
    request += f"{size.format(n=n)}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    status, _, answer = await raw_http(d.port, request)
    assert status == 400 and "chunk size" in openai_error(status, answer)["message"], answer
    status, _, _ = await raw_http(d.port, request.replace(f"{size.format(n=n)}\r\n".encode(), f"{n:X}\r\n".encode()))
    assert status == 200


# --- bodies of uploads refused before they came -------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident memory (the daemon runs in it), in MB."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def send_refused(port: int, head: bytes, body: memoryview) -> tuple[int, socket.socket]:
    """Send ``head`` and all of ``body`` without reading (a blocking socket, no copy); the status of the answer,
    and the connection, left open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.sendall(head)
    s.sendall(body)
    return int(s.recv(64).split()[1]), s


async def test_bodies_of_refused_uploads_are_dropped_not_kept(daemon_factory, model_runner, speech):
    d = await daemon_factory("server.auth_token='s3cret'", "openai.max_upload_bytes=30000000")
    body = memoryview(b"x" * (24 << 20))  # resident before the first measure
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()  # and no token
    token = {"Authorization": "Bearer s3cret"}
    await healthy_finals_match(d, model_runner, speech, headers=token)  # what a first stream allocates, before
    before = rss_mb()
    *sent, _ = await asyncio.gather(*(asyncio.to_thread(send_refused, d.port, head, body) for _ in range(8)),
                                    healthy_finals_match(d, model_runner, speech, headers=token))
    grown = rss_mb() - before  # every body sent, its connection still open (the daemon lingers for the close)
    for _, s in sent:
        s.close()
    assert [status for status, _ in sent] == [401] * 8
    assert grown < 64, f"{grown:.0f} MB kept for 8 refused bodies of 24 MiB"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_dropped_body_is_read_once_a_turn_of_the_event_loop(model_runner, monkeypatch, loop):
    """What comes of a refused upload's body is read and dropped one read each turn of the event loop, on either
    loop: libuv reads a readable socket up to 32 times over before it runs anything else, and eight 24 MiB bodies
    at once held healthy streams' events back for seconds on uvloop (``clients/chaos.py``'s ``rest-bodies``: their
    lag p95 3.1 s, against 0.7 s on asyncio's loop, which reads each ready socket once a turn)."""
    from streamer.aio import loop as event_loop
    from streamer.aio.http.connection import HttpConnection
    from streamer.aio.server import Daemon
    from streamer.config import load_config

    reads: dict[int, int] = {}
    data_received = HttpConnection.data_received

    def counted(self: HttpConnection, data: bytes) -> None:
        if self.reading in ("body", "dropped"):  # (the answer comes first: the body is dropped as it comes)
            reads[id(self)] = reads.get(id(self), 0) + 1
        data_received(self, data)

    monkeypatch.setattr(HttpConnection, "data_received", counted)

    async def flood() -> tuple[list[int], int, int]:
        d = Daemon(load_config(None, ["server.port=0", "server.host='127.0.0.1'"]), model_runner)
        await d.start()
        try:
            body = memoryview(b"x" * (24 << 20))
            head = (f"POST /v1/audio/translations HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nContent-Length: "
                    f"{len(body)}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
            sending = asyncio.gather(*(asyncio.to_thread(send_refused, d.port, head, body) for _ in range(4)))
            most = turns = 0
            while not sending.done():  # each pass one turn of the loop
                reads.clear()
                await asyncio.sleep(0)
                most, turns = max(most, *reads.values(), 0), turns + 1
            sent = await sending
            for _, s in sent:
                s.close()
            return [status for status, _ in sent], most, turns
        finally:
            await d.shutdown()

    statuses, most, turns = event_loop.run(flood(), loop)
    assert statuses == [404] * 4
    assert most == 1, f"{most} reads of one connection's body in one turn of the loop ({turns} turns)"


# --- Realtime without turn detection: the text held for a commit at the end -------------------------------------


async def test_realtime_without_turn_detection_sends_held_text_when_it_ends(daemon_factory, speech):
    import soxr

    d = await daemon_factory("server.idle_timeout_s=2")
    pcm = (np.clip(soxr.resample(speech, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()
    async with connect(f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription") as ws:
        await ws.recv()  # session.created
        await ws.send(vad_update("null"))
        for i in range(0, len(pcm), 9600):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[i:i + 9600]).decode()}))
        events = []  # and no commit: the idle timeout ends the session
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionClosed):
                async for text in ws:
                    events.append(json.loads(text))
        assert ws.close_code == 1000
    completed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(completed) == 1 and completed[0]["transcript"].strip(), events  # was none: the speech never sent


# --- refusals in the log -----------------------------------------------------------------------------------------


async def test_refused_http_requests_write_one_line_each_and_no_flood(daemon_factory, caplog):
    """A refused request wrote two or three lines (the reason, websockets' HTTP response sent, connection closed),
    and a script repeating one wrote megabytes a minute: now each writes one line, at most RefusalLog.burst per
    interval, and the next one that goes out counts those held back."""
    from streamer.aio.http.limits import RefusalLog

    d = await daemon_factory("server.allowed_hosts=['asr.example.org']")
    body = form(wav(0.1))
    requests = {
        "cross-site upload": upload(d.port, body, "Origin: https://evil.example"),
        "rebinding": f"GET /healthz HTTP/1.1\r\nHost: evil.example:{d.port}\r\n\r\n".encode(),
        "malformed": b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2"
                     b"\r\n\r\n",
        "not found": f"GET /nothing/here HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n\r\n".encode(),
    }
    with caplog.at_level(logging.INFO):
        for what, request in requests.items():  # one at a time: each its one line
            caplog.clear()
            status, _, _ = await raw_http(d.port, request)
            lines = [r.getMessage() for r in caplog.records if r.name in ("streamer.server", "websockets.server")]
            assert status in (400, 403, 404) and len(lines) == 1, (what, status, lines)
        caplog.clear()
        n = 3 * RefusalLog.burst
        for request in list(requests.values()) * (n // len(requests)):
            await raw_http(d.port, request)
        lines = [r.getMessage() for r in caplog.records if r.name in ("streamer.server", "websockets.server")]
        assert len(lines) <= RefusalLog.burst, lines  # the rest were held back
        status, _, answer = await raw_http(d.port, upload(d.port, body))
        assert status == 200 and "text" in json.loads(answer)  # and the daemon serves on


async def test_refusals_under_a_warning_log_level_leave_no_marks_behind(daemon_factory):
    """The refusal log marks a refused connection so that websockets' connection closed line is dropped, and
    forgets the mark at that line. Under [logging] level = "warning" websockets never writes it, so each mark
    stayed for good: a flood of refused requests grew the daemon without bound. Now it marks nothing then."""
    from streamer.aio.http.limits import RefusalLog

    d = await daemon_factory("server.allowed_hosts=['asr.example.org']")
    log = RefusalLog.install()
    websockets_log = logging.getLogger("websockets.server")
    level = websockets_log.level
    websockets_log.setLevel(logging.WARNING)  # as the daemon's root level "warning" makes it
    try:
        before = len(log._refused) + len(log._explained)
        for _ in range(40):
            status, _, _ = await raw_http(d.port, f"GET /healthz HTTP/1.1\r\nHost: evil.example:{d.port}\r\n\r\n"
                                          .encode())  # DNS rebinding: refused with the daemon's reason
            assert status == 403
        async with connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:  # a stream its bad input ends
            await ws.send(json.dumps({"type": "start", "sample_rate": -1}))
            await ws.wait_closed()
        assert ws.close_code == 1008
        assert len(log._refused) + len(log._explained) <= before  # 82 marks before the fix (41 each)
    finally:
        websockets_log.setLevel(level)


# --- slow request heads (slowloris) -------------------------------------------------------------------------------

DRIBBLERS = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()
held = []
for _ in range(n):  # in order: each one's head begun, never ended
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upg")
    held.append(s)
print("held", flush=True)
sys.stdin.readline()
closed = []
for i, s in enumerate(held):
    s.setblocking(False)
    try:
        gone = s.recv(1) == b""
    except BlockingIOError:
        gone = False
    except OSError:
        gone = True
    if gone:
        closed.append(i)
print(" ".join(map(str, closed)), flush=True)
"""


async def test_slow_request_heads_are_bounded_and_the_oldest_closed_first(daemon_factory, model_runner, speech):
    """Three times server.max_pending_handshakes connections, all from this machine's one address, each with a
    request head begun and never ended (slowloris): the daemon keeps at most max_pending_handshakes of them once
    they have waited a second, each new connection closing the oldest, so a healthy native stream and a healthy
    upload from the same address are both served beside them, and the connections closed are the oldest ones.
    Before, every such connection held a descriptor until its head timed out, and once they were used up new
    clients waited in the listen queue."""
    from streamer.aio.http.connection import HEAD_GRACE_S

    cap = 16
    d = await daemon_factory(f"server.max_pending_handshakes={cap}")
    attacker = await asyncio.create_subprocess_exec(sys.executable, "-c", DRIBBLERS, str(d.port), str(3 * cap),
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert attacker.stdin is not None and attacker.stdout is not None
    try:
        descriptors = len(os.listdir("/proc/self/fd"))
        attacker.stdin.write(b"go\n")
        async with asyncio.timeout(TIMEOUT):
            assert (await attacker.stdout.readline()).strip() == b"held"
            await asyncio.sleep(HEAD_GRACE_S)  # a connection is not closed for a newer one in its first second
            status, _, _ = await raw_http(d.port, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n\r\n".encode())
        assert status == 200  # answered after every dribbler was taken (connections are taken in order)
        for _ in range(50):  # the /healthz connection's two ends close; the heads' own timeout is 10 s away
            held = len(os.listdir("/proc/self/fd")) - descriptors
            if held <= cap:
                break
            await asyncio.sleep(0.1)
        assert held <= cap, f"{held} descriptors held for {3 * cap} slow heads"
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
        got, _ = await asyncio.gather(c.audio.transcriptions.create(model="streamer", file=("a.wav", wav())),
                                      healthy_finals_match(d, model_runner, speech))
        assert isinstance(got.text, str)
        await c.close()
        attacker.stdin.write(b"go\n")
        await attacker.stdin.drain()
        async with asyncio.timeout(TIMEOUT):
            closed = [int(i) for i in (await attacker.stdout.readline()).split()]
    finally:
        with contextlib.suppress(ProcessLookupError):
            attacker.kill()
        await attacker.wait()
    assert closed == list(range(len(closed))), closed  # the oldest first
    assert 2 * cap <= len(closed) < 3 * cap, closed  # and the newest are still waiting for their heads


async def test_connections_that_end_before_their_request_head_write_few_lines(daemon_factory, caplog):
    """100 connections that send part of a request head and leave (closing, or resetting the connection): each
    wrote websockets' connection closed, so a slow-head attack wrote a line per connection it cycled; now at most
    RefusalLog.burst lines go out per interval, and the daemon serves on."""
    from streamer.aio.http.limits import RefusalLog

    d = await daemon_factory()
    caplog.set_level(logging.INFO)
    before, t0 = len(caplog.records), asyncio.get_running_loop().time()
    for i in range(100):
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
        await writer.drain()
        if i % 2:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
        writer.close()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the daemon has it closed too
    status, _, _ = await raw_http(d.port, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n\r\n".encode())
    assert status == 200
    intervals = 1 + int((asyncio.get_running_loop().time() - t0) / RefusalLog.install().interval_s)
    lines = [r.getMessage() for r in caplog.records[before:] if r.name in ("streamer.server", "websockets.server")]
    assert len(lines) <= intervals * RefusalLog.burst + 2, lines  # (and /healthz's own two)


# --- memory after large uploads -------------------------------------------------------------------------------


async def test_memory_comes_back_after_large_uploads(daemon_factory):
    """Five uploads of 22 MB (15 s of 8-channel 96 kHz audio, 46 MB decoded each), OpenAI's and Deepgram's: once
    they are answered the daemon's memory comes back to within 175 MB of where it was before them (90-130 MB
    here, most of it the model's memory for the larger batches an upload brings). It stayed 283-285 MB above:
    each upload's connection kept its body until the garbage collector found it (websockets' connection and
    protocol refer to each other), and glibc kept what was freed in its arenas."""
    d = await daemon_factory()
    out = io.BytesIO()
    sf.write(out, np.random.default_rng(0).normal(0, 0.05, (96000 * 15, 8)).astype(np.float32), 96000,
             format="WAV", subtype="PCM_16")
    audio = out.getvalue()
    del out
    to_openai = upload(d.port, form(audio))
    to_deepgram = (f"POST /v1/listen HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nContent-Type: audio/wav\r\n"
                   f"Content-Length: {len(audio)}\r\n\r\n").encode() + audio
    status, _, _ = await raw_http(d.port, upload(d.port, form(wav())))  # the upload path, with a small one
    assert status == 200
    await asyncio.sleep(1.0)
    before = rss_mb()
    for request in (to_openai, to_deepgram, to_openai, to_deepgram, to_openai):
        status, _, answer = await raw_http(d.port, request)
        assert status == 200, answer[:300]
    for _ in range(50):  # memory is handed back a second after the last upload, in a thread
        await asyncio.sleep(0.1)
        if rss_mb() - before <= 175:
            break
    assert rss_mb() - before <= 175, f"{rss_mb() - before:.0f} MB more than before the uploads"
