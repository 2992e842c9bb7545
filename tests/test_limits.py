"""Bounded cost per client: hostile clients are closed or refused, the daemon's memory stays bounded, and a
healthy stream beside them gets the finals ``streamer transcribe`` gives."""

from __future__ import annotations

import asyncio
import logging
import sys

import numpy as np
from conftest import pcm16
from test_server import TIMEOUT, finals_of, native_session, reference_finals

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
