"""Bounded cost per client: hostile clients are closed or refused, the daemon's memory stays bounded, and a
healthy stream beside them gets the finals ``streamer transcribe`` gives."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import random
import resource
import ssl
import string
import sys

import numpy as np
import pytest
from conftest import pcm16
from test_server import TIMEOUT, finals_of, http_get, native_session, reference_finals
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from streamer.aio.http.limits import ACCEPT_ERROR
from streamer.decoder import trie_letters
from streamer.exceptions import ConfigError

PING_FLOOD = r"""
import base64, os, socket, sys, time
port, secs = int(sys.argv[1]), float(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:  # the handshake's answer: the last thing this client reads
    head += s.recv(1)
assert head.startswith(b"HTTP/1.1 101"), head
frame = bytes([0x89, 0x80 | 125]) + bytes(4) + b"x" * 125  # a masked ping with the largest control payload
t0 = time.monotonic()
try:
    while time.monotonic() - t0 < secs:
        s.sendall(frame * 512)
    print(f"open {secs}")
except OSError:
    print(f"closed {time.monotonic() - t0:.2f}")
"""


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


async def ping_flood(port: int, seconds: float) -> str:
    """A raw websocket client in its own process that floods pings for ``seconds`` and never reads."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PING_FLOOD, str(port), str(seconds),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


async def peak_rss_while(task: asyncio.Future[object]) -> float:
    """The largest RSS of this process (the daemon runs in it) until ``task`` is done."""
    peak = rss_mb()
    while not task.done():
        peak = max(peak, rss_mb())
        await asyncio.sleep(0.05)
    return peak


async def peak_letters_while(d, task: asyncio.Future[object]) -> int:
    """The most word-list letters the daemon held until ``task`` is done."""
    peak = 0
    while not task.done():
        peak = max(peak, d.word_lists.used)
        await asyncio.sleep(0.01)
    return peak


def expected_finals(runner, speech):
    return [f["text"] for f in reference_finals(runner, np.frombuffer(pcm16(speech), "<i2").astype(np.float32) / 32768)]


async def test_ping_flood_is_closed_and_memory_stays_bounded(daemon_factory, model_runner, speech, caplog):
    """Two clients flood pings and never read: each is closed 1008 within a second or so (it never gets
    near the 20 s the flood lasts), the daemon's RSS does not grow with the flood, and a healthy stream
    beside them gets its finals. Before the bound, pongs piled up at ~20 MB/s per client."""
    d = await daemon_factory()
    caplog.set_level(logging.WARNING, "streamer.server")
    await native_session(d.port, pcm16(speech))  # what a stream costs is in `before`
    before = rss_mb()
    floods = asyncio.ensure_future(asyncio.gather(ping_flood(d.port, 20), ping_flood(d.port, 20)))
    healthy = asyncio.ensure_future(native_session(d.port, pcm16(speech), chunk=1600, pace=0.01))
    async with asyncio.timeout(TIMEOUT):
        peak = await peak_rss_while(asyncio.gather(floods, healthy))
    print(f"RSS {before:.0f} MB before the ping flood, {peak:.0f} MB at most during it; {floods.result()}")
    assert peak - before < 100, f"RSS grew by {peak - before:.0f} MB under the ping flood"
    msgs, code = healthy.result()
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == expected_finals(model_runner, speech)
    for outcome in floods.result():
        assert outcome.startswith("closed"), outcome
        assert float(outcome.split()[1]) < 15
    assert sum("server.max_unsent_bytes" in r.getMessage() for r in caplog.records) == 2


async def test_a_client_that_reads_nothing_is_closed_by_the_keepalive(daemon_factory):
    """With no bound on unsent data, a client that never reads is still closed: after ping_timeout_s
    without taking any of the data that waits for it. Before, the keepalive ping itself waited behind the
    unsent pongs (in drain()) and its timeout never started."""
    d = await daemon_factory("server.max_unsent_bytes=1000000000", "server.ping_interval_s=1",
                             "server.ping_timeout_s=1")
    async with asyncio.timeout(TIMEOUT):
        outcome = await ping_flood(d.port, 20)
    assert outcome.startswith("closed"), outcome
    assert float(outcome.split()[1]) < 15


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A client's websocket frame, written by hand (a zero mask leaves the payload as it is)."""
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return bytes([0x80 | opcode]) + size + bytes(4) + payload


async def server_frames(reader: asyncio.StreamReader, into: list[tuple[float, int, bytes]]) -> None:
    """Read the server's frames (unmasked, unfragmented) into ``into`` as (time, opcode, payload), to its close."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            head = await reader.readexactly(2)
            n = head[1] & 0x7F
            if n >= 126:
                n = int.from_bytes(await reader.readexactly(2 if n == 126 else 8), "big")
            into.append((loop.time(), head[0] & 0x0F, await reader.readexactly(n)))
            if into[-1][1] == 0x8:
                return
    except asyncio.IncompleteReadError:
        return


async def test_the_keepalive_takes_data_for_an_answer_and_closes_a_client_gone_silent(daemon_factory, speech):
    """A client that streams audio and answers no ping is alive: its pong may wait behind audio the daemon has not
    read yet (``caption.py --fast`` against a daemon that was behind was closed 1011 on a busy machine). Once it
    sends nothing at all, the keepalive closes it 1011 after ``server.ping_timeout_s``."""
    d = await daemon_factory("server.ping_interval_s=0.2", "server.ping_timeout_s=0.5", "server.idle_timeout_s=60")
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    frames: list[tuple[float, int, bytes]] = []
    reading = asyncio.create_task(server_frames(reader, frames))
    loop = asyncio.get_running_loop()
    writer.write(client_frame(0x1, b'{"type": "start"}'))
    audio, t0 = pcm16(speech), loop.time()
    while loop.time() - t0 < 3:  # 100 ms of audio every 50 ms, pings unanswered
        for i in range(0, len(audio), 3200):
            writer.write(client_frame(0x2, audio[i:i + 3200]))
            await writer.drain()
            await asyncio.sleep(0.05)
    last_sent = loop.time()
    assert not reading.done() and not [f for f in frames if f[1] == 0x8], frames[-1:]
    assert [f[1] for f in frames].count(0x9) == 1  # its one ping, never answered: no other is sent
    async with asyncio.timeout(TIMEOUT):
        await reading
    at, opcode, payload = frames[-1]
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1011, frames[-1]
    assert payload[2:] == b"keepalive ping timeout"
    assert 0.5 <= at - last_sent < 5  # after ping_timeout_s of silence
    writer.close()


# --- word lists: bounded per stream and across streams, memory returned when the stream ends ----------------


def random_words(count: int, letters: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(letters)) for _ in range(count)]


async def start_with_words(port: int, words: list[str]):
    """A native connection whose start message brings ``words``; its ``ready`` is read."""
    ws = await connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None)
    assert json.loads(await ws.recv())["type"] == "ready"
    await ws.send(json.dumps({"type": "start", "words": words}))
    return ws


async def refused(ws) -> tuple[dict, int]:
    """The error event a refused connection gets, and its close code."""
    msgs = []
    with pytest.raises(ConnectionClosed):
        while True:
            msgs.append(json.loads(await ws.recv()))
    errors = [m for m in msgs if m["type"] == "error"]
    assert len(errors) == 1, msgs
    return errors[0], ws.close_code


async def stop(ws) -> int:
    await ws.send(json.dumps({"type": "stop"}))
    _ = [m async for m in ws]
    return ws.close_code


async def budget_is(d, letters: int) -> None:
    async with asyncio.timeout(10):
        while d.word_lists.used != letters:  # noqa: ASYNC110 (polling a counter, bounded by the timeout)
            await asyncio.sleep(0.01)


async def test_word_lists_are_bounded_per_stream_and_across_streams(daemon_factory, model_runner, speech):
    """A list over server.max_word_list_letters is refused bad_words (1008); a list that would take all lists
    past server.max_word_list_letters_total is refused busy (1013) until another stream ends; every list's
    letters come back when its stream ends. Before, a 1 MB start message of long words cost ~310 MB."""
    d = await daemon_factory("server.max_word_list_letters=30000", "server.max_word_list_letters_total=50000")
    lists = [random_words(1000, 20, seed) for seed in range(3)]
    sizes = [trie_letters(w) for w in lists]
    assert all(15_000 < n < 25_000 for n in sizes)  # two fit into the total, three do not
    healthy = asyncio.ensure_future(native_session(d.port, pcm16(speech), chunk=1600, pace=0.01))
    async with asyncio.timeout(TIMEOUT):
        error, code = await refused(await start_with_words(d.port, random_words(2000, 20, 9)))
        assert (error["code"], code) == ("bad_words", 1008)
        assert "letters" in error["message"] and "30000" in error["message"], error
        assert d.word_lists.used == 0

        first, second = await start_with_words(d.port, lists[0]), await start_with_words(d.port, lists[1])
        await budget_is(d, sizes[0] + sizes[1])
        error, code = await refused(await start_with_words(d.port, lists[2]))
        assert (error["code"], code) == ("busy", 1013)
        assert "50000" in error["message"], error

        assert await stop(first) == 1000
        await budget_is(d, sizes[1])  # the first list is freed with its stream
        third = await start_with_words(d.port, lists[2])
        await budget_is(d, sizes[1] + sizes[2])
        assert [await stop(second), await stop(third)] == [1000, 1000]
        await budget_is(d, 0)
        msgs, code = await healthy
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == expected_finals(model_runner, speech)


async def test_a_word_lists_memory_returns_when_its_stream_ends(daemon_factory, speech):
    """A list of 20,000 words of 15 letters (~280,000 trie letters, ~100 MB) is built, used and freed; the
    daemon's RSS comes back near where it was. Before, the allocator kept the freed trie's memory."""
    d = await daemon_factory("server.max_word_list_letters=400000", "server.max_word_list_letters_total=400000")
    words = random_words(20_000, 15, 0)

    async def session(words: list[str]) -> int:
        ws = await start_with_words(d.port, words)
        await ws.send(pcm16(speech[:32000]))
        return await stop(ws)

    async with asyncio.timeout(TIMEOUT):
        await session(random_words(100, 5, 1))  # what any stream costs is in `before`
        await budget_is(d, 0)
        before = rss_mb()
        task = asyncio.ensure_future(session(words))
        counted = asyncio.ensure_future(peak_letters_while(d, task))
        built = await peak_rss_while(task)
        assert task.result() == 1000 and await counted > 200_000  # the list was built and held
        await budget_is(d, 0)  # the list is freed
        after = rss_mb()
        for _ in range(200):  # its memory goes back to the system in a thread, a second later
            if after - before < 30:
                break
            await asyncio.sleep(0.05)
            after = rss_mb()
    print(f"RSS {before:.0f} MB, {built:.0f} MB with the word list, {after:.0f} MB after its stream")
    # (RSS need not grow while it is built: free heap left by earlier tests in this process can hold it)
    assert after - before < 30, f"{after - before:.0f} MB of the freed word list stayed"


# --- viewers and descriptors -----------------------------------------------------------------------------


async def test_viewers_over_max_viewers_are_refused_1013(daemon_factory, model_runner, speech):
    """server.max_viewers viewers at once; one more gets a busy error and 1013, while the stream it wanted to
    follow goes on and its admitted viewers get its finals. Before, viewers were unlimited (~1,000 used up the
    1,024 descriptors, and /healthz and new streams timed out)."""
    d = await daemon_factory("server.max_viewers=2")
    url = f"ws://127.0.0.1:{d.port}/v1/listen/desk"
    expected = expected_finals(model_runner, speech)
    async with asyncio.timeout(TIMEOUT), connect(url) as first, connect(url) as second:
        for viewer in (first, second):
            assert json.loads(await viewer.recv())["type"] == "ready"
        error, code = await refused(await connect(url))
        assert (error["code"], code) == ("busy", 1013) and "2 viewers" in error["message"], error
        msgs, code = await native_session(d.port, pcm16(speech), chunk=1600, pace=0.01,
                                          start={"type": "start", "name": "desk"})
        assert code == 1000 and [f["text"] for f in finals_of(msgs)] == expected
        for viewer in (first, second):
            seen: list[str] = []
            while len(seen) < len(expected):
                event = json.loads(await viewer.recv())
                seen += [event["text"]] if event["type"] == "final" else []
            assert seen == expected
    async with asyncio.timeout(TIMEOUT), connect(url) as again:  # the slots are free again
        assert json.loads(await again.recv())["type"] == "ready"
    assert d.metrics.streams_rejected.labels("viewers")._value.get() == 1


async def test_the_open_file_limit_is_raised_to_fit_or_a_warning_says_it_does_not(daemon_factory, caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    caplog.set_level(logging.INFO, "streamer.server")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (500, hard))
        await daemon_factory()  # 64 streams + 256 viewers + 256 slow heads + 256 headroom: 832 descriptors
        raised = hard if hard != resource.RLIM_INFINITY else 1 << 20  # the hard limit, as servers take
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert any(f"raised the open-file limit from 500 to {raised}" in r.getMessage() for r in caplog.records)
        if hard != resource.RLIM_INFINITY:  # more than the hard limit allows: a warning, and the daemon serves
            d = await daemon_factory(f"server.max_viewers={hard}")
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("open-file limit" in w and "LimitNOFILE" in w for w in warnings), warnings
            assert d.health().status == "ok"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


HOLD_CONNECTIONS = r"""
import socket, sys, time
sys.stdin.readline()
held = []
for _ in range(200):
    try:
        held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2))
    except OSError:
        pass
time.sleep(2)
print(len(held))
"""


async def test_failed_accepts_are_logged_once_per_interval(daemon_factory, caplog):
    """With the daemon's descriptors used up, asyncio fails accept() and logged each attempt with a traceback
    (26,000 records in 10 s); now one record per 10 s passes, saying what is wrong. The daemon serves again
    once descriptors are free."""
    d = await daemon_factory()
    caplog.set_level(logging.ERROR, "asyncio")
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLD_CONNECTIONS, str(d.port),
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 10, hard))
        assert client.stdin is not None
        client.stdin.write(b"go\n")
        await client.stdin.drain()
        await asyncio.sleep(3)  # 200 connections come, about 10 are accepted; the loop keeps failing the rest
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    out, _ = await client.communicate()
    assert int(out) > 20  # the connections reached the listen queue
    failed = [r.getMessage() for r in caplog.records if r.name == "asyncio" and ACCEPT_ERROR in r.getMessage()]
    assert len(failed) == 1, f"{len(failed)} records: {failed[:3]}"
    assert "out of file descriptors?" in failed[0] and "max_viewers" in failed[0]
    status, _, _ = await asyncio.to_thread(http_get, d.port, "/healthz")
    assert status == 200


# --- browsers: other sites' pages are refused, the page's token lives in a cookie -----------------------------


async def upgrade_status(url: str, **kwargs) -> int:
    """101 when the upgrade succeeds (then the connection is closed), else the HTTP status of the refusal."""
    try:
        async with connect(url, **kwargs) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_pages_of_other_sites_cannot_open_websockets(daemon_factory):
    """With no allowed_origins, a browser page of another origin gets 403 (any site could stream or follow
    viewers from a visitor's browser before); the daemon's own pages and clients without Origin are served."""
    d = await daemon_factory()
    stream, viewer = f"ws://127.0.0.1:{d.port}/v1/stream", f"ws://127.0.0.1:{d.port}/v1/listen/desk"
    async with asyncio.timeout(TIMEOUT):
        for origin in ("https://evil.example", f"http://127.0.0.1:{d.port + 1}", "null", f"http://evil.example:{d.port}"):
            assert await upgrade_status(stream, origin=origin) == 403, origin
            assert await upgrade_status(viewer, origin=origin) == 403, origin
        for origin in (None, f"http://127.0.0.1:{d.port}", f"http://localhost:{d.port}", f"http://[::1]:{d.port}"):
            assert await upgrade_status(stream, origin=origin) == 101, origin
    assert d.metrics.streams_rejected.labels("origin")._value.get() == 8
    listed = await daemon_factory("server.allowed_origins=['https://captions.example']")
    url = f"ws://127.0.0.1:{listed.port}/v1/stream"
    assert await upgrade_status(url, origin="https://captions.example") == 101
    assert await upgrade_status(url, origin=f"http://127.0.0.1:{listed.port}") == 101  # its own page, still
    assert await upgrade_status(url, origin="https://evil.example") == 403
    anyone = await daemon_factory("server.allowed_origins=['*']")
    assert await upgrade_status(f"ws://127.0.0.1:{anyone.port}/v1/stream", origin="https://evil.example") == 101


def page_request(port: int, target: str, tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, str]]:
    """GET ``target`` (over https with ``tls``) without following redirects: the status and headers."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls) if tls is not None
            else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        conn.close()


async def test_the_page_keeps_its_token_in_a_cookie_not_in_its_address(daemon_factory):
    """/?token=TOKEN with the right token sets an HttpOnly, SameSite=Strict cookie and sends the page again
    without the token (303); a websocket upgrade that carries the cookie is authorised."""
    d = await daemon_factory("server.auth_token='s3 cret'")
    status, headers = await asyncio.to_thread(page_request, d.port, "/?token=s3%20cret&name=desk")
    assert status == 303 and headers["Location"] == "/?name=desk"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"streamer_token_{d.port}=s3%20cret;")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    assert "Secure" not in cookie  # plain http
    status, headers = await asyncio.to_thread(page_request, d.port, "/?token=wrong")
    assert status == 200 and "Set-Cookie" not in headers  # the page itself says the token is wrong
    url = f"ws://127.0.0.1:{d.port}/v1/stream"
    async with asyncio.timeout(TIMEOUT):
        assert await upgrade_status(url, additional_headers={"Cookie": f"a=b; {cookie.split(';')[0]}"}) == 101
        assert await upgrade_status(url, additional_headers={"Cookie": f"streamer_token_{d.port}=wrong"}) == 401
        assert await upgrade_status(url, additional_headers={"Cookie": "streamer_token_1=s3%20cret"}) == 401
        assert await upgrade_status(url) == 401


# --- TLS: both ports over wss://, the page over https:// ---------------------------------------------------


def tls_overrides(files, key: str = "key") -> list[str]:
    return [f"server.tls_cert='{files['cert']}'", f"server.tls_key='{files[key]}'"]


async def test_native_vosk_and_http_over_tls(daemon_factory, model_runner, speech, tls_files, caplog):
    """server.tls_cert/tls_key: the native and the Vosk port speak wss://, /healthz and the page https:// (the
    page's token cookie is Secure); transcripts are the same as without TLS. A plain ws:// client to the TLS
    port has its connection closed in the TLS handshake: it gets no HTTP answer (InvalidMessage)."""
    d = await daemon_factory(*tls_overrides(tls_files), "vosk.enabled=true", "vosk.port=0",
                             "vosk.sample_rate=16000", "server.auth_token='s3cret'")
    trust = ssl.create_default_context(cafile=str(tls_files["cert"]))
    audio = pcm16(speech)
    expected = expected_finals(model_runner, speech)
    async with asyncio.timeout(TIMEOUT):
        async with connect(f"wss://127.0.0.1:{d.port}/v1/stream?token=s3cret", ssl=trust) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            for i in range(0, len(audio), 3200):
                await ws.send(audio[i : i + 3200])
            await ws.send(json.dumps({"type": "stop"}))
            msgs = [json.loads(m) async for m in ws]
        assert ws.close_code == 1000 and [f["text"] for f in finals_of(msgs)] == expected

        async with connect(f"wss://127.0.0.1:{d.vosk_port}/", ssl=trust,
                           additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            replies = []
            for i in range(0, len(audio), 6400):
                await ws.send(audio[i : i + 6400])
                replies.append(json.loads(await ws.recv()))
            await ws.send('{"eof" : 1}')
            replies.append(json.loads(await ws.recv()))
        assert " ".join(r["text"] for r in replies if r.get("text")) == " ".join(expected)

        caplog.set_level(logging.INFO)
        for port in (d.port, d.vosk_port):
            with pytest.raises(InvalidMessage):
                async with connect(f"ws://127.0.0.1:{port}/v1/stream?token=s3cret", open_timeout=10):
                    pass
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # nothing to log

    status, _ = await asyncio.to_thread(page_request, d.port, "/healthz", trust)
    assert status == 200
    status, headers = await asyncio.to_thread(page_request, d.port, "/?token=s3cret", trust)
    assert status == 303 and "Secure" in {p.strip() for p in headers["Set-Cookie"].split(";")}


async def test_tls_files_that_do_not_work_are_a_clear_error_at_start(daemon_factory, tls_files, tmp_path):
    with pytest.raises(ConfigError, match="tls_cert and server.tls_key go together"):
        await daemon_factory(f"server.tls_cert='{tls_files['cert']}'")
    cases = [
        (tls_overrides(tls_files, "other_key"), "is not the key of server.tls_cert"),
        ([f"server.tls_cert='{tmp_path / 'missing.pem'}'", f"server.tls_key='{tls_files['key']}'"],
         "tls_cert = .*missing.pem.* cannot be read"),
        ([f"server.tls_cert='{tls_files['key']}'", f"server.tls_key='{tls_files['key']}'"],
         "holds no PEM certificate"),
        ([f"server.tls_cert='{tls_files['cert']}'", f"server.tls_key='{tls_files['cert']}'"],
         "holds no PEM private key"),
        (tls_overrides(tls_files, "encrypted_key"), "is encrypted"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            await daemon_factory(*overrides)


async def test_refusals_are_logged_once_per_interval(daemon_factory, model_runner, speech, caplog):
    """Every stream slot taken by a healthy real-time stream, then 30 connections refused (1013): the log gets one
    line for the first refusal and none for the rest within the interval, instead of websockets' two lines per
    connection (5,000 refusals wrote 650 KB); the admitted stream's own lines and its finals are unchanged."""
    caplog.set_level(logging.INFO)
    d = await daemon_factory("server.max_streams=1")
    expected = expected_finals(model_runner, speech)
    healthy = asyncio.create_task(native_session(d.port, pcm16(speech), chunk=3200, pace=0.1))
    async with asyncio.timeout(2 * TIMEOUT):
        for _ in range(500):  # the healthy stream holds the one slot
            if d.active_streams:
                break
            await asyncio.sleep(0.02)
        before = len(caplog.records)
        for _ in range(30):
            error, code = await refused(await connect(f"ws://127.0.0.1:{d.port}/v1/stream"))
            assert (error["code"], code) == ("busy", 1013)
        during = [r.getMessage() for r in caplog.records[before:]]
        msgs, code = await healthy
    assert code == 1000 and [f["text"] for f in finals_of(msgs)] == expected
    assert len(during) <= 2, during
    assert any("refused" in line and "busy" in line for line in during), during
    lines = [r.getMessage() for r in caplog.records if r.name == "websockets.server"]
    assert lines.count("connection open") == 1 and lines.count("connection closed") == 1, lines  # the healthy one's


async def test_viewers_of_names_that_are_not_live_are_closed_after_the_idle_timeout(daemon_factory, model_runner,
                                                                                      speech):
    """Every viewer slot but one taken by viewers of names that never exist: they are closed (1000) once their
    name has not been live for server.idle_timeout_s, and a viewer admitted after them follows a healthy stream
    to its end, as does the viewer that followed it all along (a live name's viewer stays, pauses and all).
    Before, 256 such viewers held every slot for good."""
    d = await daemon_factory("server.max_viewers=4", "server.idle_timeout_s=1")
    expected = expected_finals(model_runner, speech)
    url = f"ws://127.0.0.1:{d.port}/v1/listen"
    async with asyncio.timeout(2 * TIMEOUT):
        ghosts = [await connect(f"{url}/ghost{i}") for i in range(3)]
        async with connect(f"{url}/desk") as follower:
            assert json.loads(await follower.recv())["type"] == "ready"
            healthy = asyncio.create_task(native_session(d.port, pcm16(speech), chunk=3200, pace=0.1,
                                                         start={"type": "start", "name": "desk"}))
            for ghost in ghosts:
                msgs = []
                with pytest.raises(ConnectionClosed):
                    while True:
                        msgs.append(json.loads(await ghost.recv()))
                assert ghost.close_code == 1000 and msgs[-1]["code"] == "viewer_idle", msgs
            async with connect(f"{url}/desk") as late:  # a slot is free again
                assert json.loads(await late.recv())["type"] == "ready"
                msgs, code = await healthy
                assert code == 1000 and [f["text"] for f in finals_of(msgs)] == expected
                for viewer in (follower, late):
                    seen: list[str] = []
                    while not seen or seen[-1] != expected[-1]:
                        event = json.loads(await viewer.recv())
                        seen += [event["text"]] if event["type"] == "final" else []
                    assert seen[-len(expected):] == expected if viewer is follower else seen[-1] == expected[-1]


@pytest.mark.parametrize("compression", [True, False])
async def test_compression_is_taken_only_when_the_config_allows_it(daemon_factory, model_runner, speech, compression):
    """A websockets client offers permessage-deflate: the daemon takes it by default, and with
    ``server.compression = false`` answers without it (less CPU per message); the stream's finals are the same."""
    d = await daemon_factory(f"server.compression={str(compression).lower()}")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
        taken = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ("permessage-deflate" in taken) == compression, taken
    msgs, code = await native_session(d.port, pcm16(speech), chunk=1600, pace=0.01)
    assert code == 1000 and [f["text"] for f in finals_of(msgs)] == expected_finals(model_runner, speech)
