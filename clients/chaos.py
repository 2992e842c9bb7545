#!/usr/bin/env python3
"""Attack a streamer daemon as a hostile client would, next to healthy real-time streams, and tabulate the harm.

A benchmark, not a test: it starts ``python -m streamer serve`` (the demo model unless --model) on a free
loopback port, and for each attack runs the attack for --seconds beside --healthy streams of espeak-ng speech
sent at 1x real time. Per attack it prints the daemon's RSS before / at its peak / after, the p95 lag of the
healthy streams' finals (from sending the audio that completes a final's last word to receiving the final),
the finals they lost against ``streamer transcribe`` of the same audio (and over MQTT, when mosquitto is
installed), whether ``/healthz`` stayed ok, what the daemon logged, and the attack's own check. Everything
is on loopback and bounded: every attack has a timeout, the daemon is restarted when an attack killed or
wedged it, and it is killed at the end.

    python clients/chaos.py                                  # every attack, 20 s each (about 10 minutes)
    python clients/chaos.py --attacks ping-flood,viewers --seconds 10
    python clients/chaos.py --list                           # the attacks, one line each

The exit status is 0 when every row passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import difflib
import itertools
import json
import math
import os
import resource
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from streamer.audio import encode_g711
from streamer.telephony import KIND_AUDIO, KIND_ERROR, KIND_UUID, frame
from streamer.testing import speech_audio

CHUNK_S = 0.1
HOST = "127.0.0.1"
SETTLE_S = 2.0
"""pause after an attack before the 'after' RSS and the last health check"""
GRACE_S = 30.0
"""how long an attack or a healthy stream may run past --seconds before it is cancelled"""
CAPTION = Path(__file__).resolve().parent / "caption.py"
PROBE_S = 15.0
"""after an attack, a 2-second stream must get its end within this, or the daemon is restarted"""


# ---------------------------------------------------------------------------------------------------------
# small tools
# ---------------------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` in MB (/proc/PID/status VmRSS); nan once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pcm16(audio: np.ndarray) -> bytes:
    return bytes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


async def http(port: int, request: bytes, limit: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send a raw HTTP request; (status, headers, body read until close or 1 s of quiet). Status 0: no answer."""
    writer = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = b""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(1.0):
                while chunk := await reader.read(65536):
                    body += chunk
        return status, headers, body
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
        return 0, {}, b""
    finally:
        if writer is not None:
            writer.close()


def get(path: str, method: str = "GET", extra: str = "", body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n{extra}\r\n").encode() + body


async def healthz(port: int) -> bool:
    status, _, body = await http(port, get("/healthz"), limit=3.0)
    try:
        return status == 200 and json.loads(body or b"{}").get("status") == "ok"
    except ValueError:
        return False


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (final fragment) with a payload shorter than 64 KiB."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    else:
        head += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_upgrade(port: int, path: str, extra: str = ""
                      ) -> tuple[int, asyncio.StreamReader | None, asyncio.StreamWriter | None]:
    """A websocket handshake by hand: (HTTP status, reader, writer); 0 when nothing answered."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()
    writer = None
    try:
        async with asyncio.timeout(10.0):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split()[1]), reader, writer
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
        if writer is not None:
            writer.close()
        return 0, None, None


# ---------------------------------------------------------------------------------------------------------
# the daemon and the broker
# ---------------------------------------------------------------------------------------------------------


class Daemon:
    """``python -m streamer serve --port 0`` in a subprocess: its ports, pid and how much it logged."""

    def __init__(self, args: argparse.Namespace, overrides: list[str]) -> None:
        self.args = args
        self.overrides = overrides
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.vosk_port = 0
        self.log_bytes = 0
        self.log_tail: list[str] = []
        self._drain: asyncio.Task[None] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/v1/stream"

    async def start(self) -> None:
        cmd = [sys.executable, "-m", "streamer", "serve", "--model", self.args.model, "--host", HOST, "--port", "0"]
        for o in self.overrides:
            cmd += ["--set", o]
        nofile = self.args.nofile

        def limit_descriptors() -> None:  # as systemd's default soft limit, unless the unit sets LimitNOFILE
            if nofile:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

        self.proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.PIPE, preexec_fn=limit_descriptors)
        self.starts += 1
        assert self.proc.stderr is not None
        try:
            async with asyncio.timeout(self.args.start_timeout):
                while True:
                    raw = await self.proc.stderr.readline()
                    if not raw:
                        raise SystemExit("chaos: the daemon exited before listening:\n" + "".join(self.log_tail[-20:]))
                    line = raw.decode(errors="replace")
                    self._keep(line)
                    if line.startswith("streamer: listening on "):
                        self.port = int(line.split()[3].rstrip(",").rsplit(":", 1)[1].split("/")[0])
                        if "vosk on ws://" in line:
                            self.vosk_port = int(line.rsplit(":", 1)[1].strip().split("/")[0])
                        break
        except TimeoutError:
            await self.stop()
            raise SystemExit(f"chaos: the daemon did not listen within {self.args.start_timeout:g} s") from None
        self._drain = asyncio.create_task(self._read_log())

    def _keep(self, line: str) -> None:
        self.log_bytes += len(line)
        self.log_tail.append(line)
        del self.log_tail[:-200]

    async def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self._keep(raw.decode(errors="replace"))

    async def wait(self, limit: float) -> int | None:
        """The exit status, or None if it is still running after ``limit`` seconds."""
        assert self.proc is not None
        try:
            async with asyncio.timeout(limit):
                return await self.proc.wait()
        except TimeoutError:
            return None

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; waits for the process and its log."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            if await self.wait(15.0) is None:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(5.0):
                    await self._drain


class Broker:
    """mosquitto on a free loopback port (as tests/test_mqtt.py starts it), and a subscriber to the finals."""

    def __init__(self, exe: str, root: Path) -> None:
        self.exe = exe
        self.root = root
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        lines = [f"listener {self.port} {HOST}", "allow_anonymous true", "log_dest stderr"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto switches to user mosquitto
        conf = self.root / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = await asyncio.create_subprocess_exec(self.exe, "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
        async with asyncio.timeout(10):
            while True:
                try:
                    _, w = await asyncio.open_connection(HOST, self.port)
                    w.close()
                    return
                except OSError:
                    if self.proc.returncode is not None:
                        raise SystemExit("chaos: mosquitto exited at start") from None
                    await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def count_finals(self, prefix: str, counts: Counter[str], ready: asyncio.Event) -> None:
        """Count the finals published under ``P/<stream>/final`` until cancelled."""
        import aiomqtt

        async with aiomqtt.Client(HOST, self.port, identifier=f"chaos-{os.getpid()}-{time.monotonic_ns()}") as client:
            await client.subscribe(f"{prefix}/+/final", qos=1)
            ready.set()
            async for message in client.messages:
                counts[str(message.topic).split("/")[-2]] += 1


# ---------------------------------------------------------------------------------------------------------
# healthy streams
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Expected:
    """What ``streamer transcribe`` makes of the healthy audio: final texts and their last words' ends."""

    texts: list[str]
    ends: list[float]


@dataclass
class Healthy:
    """One healthy stream's result."""

    name: str
    finals: list[str] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    started: float = float("nan")
    close: str = ""
    error: str = ""

    def lost(self, expected: list[str]) -> tuple[int, int]:
        """(expected finals not received, received finals that differ), in order."""
        matched = sum(b.size for b in difflib.SequenceMatcher(None, expected, self.finals).get_matching_blocks())
        return len(expected) - matched, len(self.finals) - matched


async def healthy_stream(url: str, pcm: bytes, name: str, seconds: float) -> Healthy:
    """Send ``pcm`` at 1x real time in 100 ms messages with ``name``; collect the finals and their lag."""
    res = Healthy(name)
    step = int(16000 * CHUNK_S) * 2
    sent: list[tuple[float, float]] = []  # (audio seconds sent, wall time)

    def sent_at(t: float) -> float | None:
        for end, wall in sent:
            if end >= t - 1e-6:
                return wall
        return None

    try:
        async with asyncio.timeout(seconds + GRACE_S):
            async with connect(url, max_size=None, open_timeout=10, close_timeout=2) as ws:
                ready = json.loads(await ws.recv())
                if ready.get("type") != "ready":
                    res.error = f"refused: {ready.get('message', ready)}"
                    return res
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "encoding": "s16le", "name": name}))

                async def send() -> None:
                    t0 = res.started = time.monotonic()
                    for i in range(0, len(pcm), step):
                        await ws.send(pcm[i:i + step])
                        sent.append(((i + len(pcm[i:i + step])) / 32000, time.monotonic()))
                        await asyncio.sleep(max(0.0, t0 + len(sent) * CHUNK_S - time.monotonic()))
                    await ws.send(json.dumps({"type": "stop"}))

                sender = asyncio.create_task(send())
                try:
                    async for raw in ws:
                        ev = json.loads(raw)
                        if ev["type"] == "final":
                            res.finals.append(ev["text"])
                            end = ev["words"][-1]["end"] if ev.get("words") else ev["end"]
                            if (s := sent_at(end)) is not None:
                                res.lags.append(time.monotonic() - s)
                        elif ev["type"] == "error":
                            res.error = f"{ev.get('code')}: {ev.get('message')}"
                finally:
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
                res.close = str(ws.close_code)
    except ConnectionClosed as exc:
        res.close = str(exc.rcvd.code if exc.rcvd else exc.sent.code if exc.sent else 1006)
    except TimeoutError:
        res.error = res.error or "timed out"
    except (OSError, InvalidHandshake) as exc:
        res.error = f"cannot connect: {exc}"
    return res


# ---------------------------------------------------------------------------------------------------------
# the attacks
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What an attack may use. ``deadline`` is when it should stop (loop.time()); it returns a note and
    whether its own check passed."""

    args: argparse.Namespace
    daemon: Daemon
    pcm: bytes
    """the healthy speech, s16le 16 kHz"""
    audio: np.ndarray
    expected: Expected
    names: list[str]
    deadline: float = 0.0
    broker: Broker | None = None
    sigterm_expected: int = 0
    """sigterm: finals the healthy streams must still get"""
    sigterm_at: float = 0.0

    def left(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()


Result = tuple[bool, str]


def native(ctx: Context) -> str:
    return ctx.daemon.url


async def hold_until(ctx: Context, ws: ClientConnection) -> None:
    """Read (and drop) what the daemon sends until the deadline or the close."""
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        async with asyncio.timeout(max(0.0, ctx.left())):
            async for _ in ws:
                pass


async def attack_none(ctx: Context) -> Result:
    await asyncio.sleep(max(0.0, ctx.left()))
    return True, "the healthy streams alone, for comparison"


async def attack_mqtt_name(ctx: Context) -> Result:
    """A stream named "x\\n" (a control character in its MQTT topic), again and again."""
    if ctx.broker is None:
        await asyncio.sleep(max(0.0, ctx.left()))
        return True, "skipped: mosquitto is not installed (apt-get install mosquitto)"
    refused = accepted = 0
    while ctx.left() > 1:
        try:
            async with asyncio.timeout(min(10.0, ctx.left())):
                async with connect(native(ctx), max_size=None, open_timeout=5, close_timeout=2) as ws:
                    await ws.recv()
                    await ws.send(json.dumps({"type": "start", "name": "x\n"}))
                    await ws.send(ctx.pcm[: 32000 * 2])
                    await ws.send(json.dumps({"type": "stop"}))
                    async for raw in ws:
                        ev = json.loads(raw)
                        if ev["type"] == "error":
                            refused += 1
                        elif ev["type"] == "end":
                            accepted += 1
        except (TimeoutError, ConnectionClosed, OSError, InvalidHandshake):
            pass
    return refused > 0 and accepted == 0, f"name 'x\\n': {accepted} accepted, {refused} refused"


async def attack_ping_flood(ctx: Context) -> Result:
    """Clients that flood ping frames and never read a byte."""
    closed_after: list[float] = []

    async def flood() -> None:
        status, _, writer = await raw_upgrade(ctx.daemon.port, "/v1/stream")
        if status != 101 or writer is None:
            return
        t0 = time.monotonic()
        ping = ws_frame(0x9, b"p" * 125)
        try:
            async with asyncio.timeout(max(0.0, ctx.left())):
                while True:
                    writer.write(ping * 64)
                    await writer.drain()
                    if writer.transport.is_closing():
                        break
        except (TimeoutError, OSError):
            pass
        if writer.transport.is_closing() or ctx.left() > 0.5:
            closed_after.append(time.monotonic() - t0)
        writer.close()

    await asyncio.gather(*(flood() for _ in range(ctx.args.flooders)))
    note = f"{ctx.args.flooders} flooders, {len(closed_after)} closed by the daemon"
    if closed_after:
        note += f" after {max(closed_after):.1f} s"
    return len(closed_after) == ctx.args.flooders, note


async def attack_big_words(ctx: Context) -> Result:
    """Start messages with a word list of about 1 MB (20,000 words of 48 letters)."""
    rng = np.random.default_rng(0)
    codes: Counter[str] = Counter()

    async def one(i: int) -> None:
        words = [row.tobytes().decode() for row in rng.integers(97, 123, (20_000, 48), dtype=np.uint8)]
        start = json.dumps({"type": "start", "name": f"words-{i}", "words": words})
        try:
            async with asyncio.timeout(max(1.0, ctx.left())):
                async with connect(native(ctx), max_size=None, open_timeout=5, close_timeout=2) as ws:
                    await ws.recv()
                    await ws.send(start)
                    await ws.send(ctx.pcm[: 32000 * 2])
                    await ws.send(json.dumps({"type": "stop"}))
                    async for _ in ws:
                        pass
                    codes[str(ws.close_code)] += 1
        except ConnectionClosed as exc:
            codes[str(exc.rcvd.code if exc.rcvd else 1006)] += 1
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            codes[type(exc).__name__] += 1

    await asyncio.gather(*(one(i) for i in range(ctx.args.word_clients)))
    await asyncio.sleep(max(0.0, ctx.left()))
    return True, f"{ctx.args.word_clients} lists of 1 MB, closes {dict(codes)} (see RSS after)"


def audio_8k(ctx: Context, seconds: float) -> bytes:
    """The healthy speech at 8 kHz, repeated to ``seconds``."""
    import soxr

    a = np.asarray(soxr.resample(ctx.audio, 16000, 8000), dtype=np.float32)
    return pcm16(np.tile(a, math.ceil(seconds * 8000 / len(a)))[: int(seconds * 8000)])


async def flood_8k(ctx: Context, clients: int, deadline: Callable[[], float]) -> int:
    """``clients`` that each send big messages of 8 kHz audio as fast as they can, then leave; returns how many."""
    msg = audio_8k(ctx, (ctx.args.message_bytes // 2) / 8000)
    left = 0

    async def one() -> None:
        nonlocal left
        while deadline() > 1:
            try:
                async with asyncio.timeout(max(1.0, deadline())):
                    async with connect(native(ctx), max_size=None, open_timeout=5, close_timeout=1) as ws:
                        if json.loads(await ws.recv()).get("type") != "ready":
                            await asyncio.sleep(0.5)
                            continue
                        await ws.send(json.dumps({"type": "start", "sample_rate": 8000, "encoding": "s16le"}))
                        for _ in range(ctx.args.messages):
                            await ws.send(msg)
                        left += 1  # and leave, with the audio in flight
            except (TimeoutError, ConnectionClosed, OSError, InvalidHandshake):
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one() for _ in range(clients)))
    return left


async def attack_flood_8k(ctx: Context) -> Result:
    """Many clients that send big 8 kHz messages as fast as they can, then leave."""
    left = await flood_8k(ctx, ctx.args.flood_clients, ctx.left)
    mb = ctx.args.message_bytes / 2**20
    return True, f"{ctx.args.flood_clients} clients, {left} left after {ctx.args.messages} x {mb:.1f} MiB"


async def attack_fast_sender(ctx: Context) -> Result:
    """``clients/caption.py --fast`` on the healthy audio, several at once, again and again."""
    runs: list[tuple[int, int]] = []  # (exit code, finals lost)
    wav = Path(ctx.args.workdir) / "healthy.wav"

    async def one() -> None:
        while ctx.left() > 2:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(CAPTION), "--fast", "--url", native(ctx), str(wav),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            try:
                async with asyncio.timeout(ctx.left() + GRACE_S / 2):
                    out, _ = await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                runs.append((-1, len(ctx.expected.texts)))
                continue
            got = Healthy("fast", finals=[line.split("] ", 1)[-1] for line in out.decode().splitlines()])
            runs.append((proc.returncode or 0, got.lost(ctx.expected.texts)[0]))

    await asyncio.gather(*(one() for _ in range(ctx.args.fast_clients)))
    bad = [r for r in runs if r != (0, 0)]
    lost = sum(lost for _, lost in runs)
    return not bad, f"{len(runs)} caption.py --fast runs, {len(bad)} failed, {lost} of their finals lost"


async def attack_viewers(ctx: Context) -> Result:
    """Over a thousand viewers (of the healthy streams and of other names), all holding on and reading."""
    sem = asyncio.Semaphore(100)
    outcome: Counter[str] = Counter()

    async def one(j: int) -> None:
        # every fifth one follows a healthy stream, the others 16 names of streams that may come
        name = ctx.names[j % len(ctx.names)] if j % 5 == 0 else f"crowd-{j % 16}"
        async with sem:
            try:
                ws = await connect(f"ws://{HOST}:{ctx.daemon.port}/v1/listen/{name}", open_timeout=10,
                                   close_timeout=1)
            except InvalidStatus as exc:
                outcome[f"HTTP {exc.response.status_code}"] += 1
                return
            except (TimeoutError, OSError, InvalidHandshake) as exc:
                outcome[type(exc).__name__] += 1
                return
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            outcome["accepted" if first.get("type") == "ready" else f"refused {first.get('code')}"] += 1
            await hold_until(ctx, ws)
        except (TimeoutError, ConnectionClosed) as exc:
            outcome[type(exc).__name__] += 1
        finally:
            await ws.close()

    await asyncio.gather(*(one(j) for j in range(ctx.args.viewers)))
    return True, f"{ctx.args.viewers} viewers: {dict(outcome)}"


BURST_S = 55.0
"""seconds of speech each bursts client sends at once (server.max_burst_s is 60 by default)"""


async def attack_bursts(ctx: Context) -> Result:
    """Native clients that each send 55 s of speech in one message (within server.max_burst_s) and stay reading
    their finals: audio ahead of real time, which may only use the model and engine time the healthy streams
    leave."""
    msg = audio_8k(ctx, BURST_S)
    finals: Counter[str] = Counter()

    async def one(i: int) -> None:
        with contextlib.suppress(TimeoutError, ConnectionClosed, OSError, InvalidHandshake):
            async with asyncio.timeout(max(1.0, ctx.left())):
                async with connect(native(ctx), max_size=None, open_timeout=5, close_timeout=1) as ws:
                    if json.loads(await ws.recv()).get("type") != "ready":
                        finals["refused"] += 1
                        return
                    await ws.send(json.dumps({"type": "start", "sample_rate": 8000, "encoding": "s16le"}))
                    await ws.send(msg)
                    async for raw in ws:
                        finals[json.loads(raw).get("type", "?")] += 1

    await asyncio.gather(*(one(i) for i in range(ctx.args.burst_clients)))
    return not finals["refused"], (f"{ctx.args.burst_clients} clients sent {BURST_S:g} s each at once; they got "
                                   f"{finals['final']} finals meanwhile, {finals['refused']} refused")


async def attack_ghost_viewers(ctx: Context) -> Result:
    """Viewers of names that never exist, as many as server.max_viewers: they must be closed after
    server.idle_timeout_s (viewer_idle), and a viewer of a healthy stream must then get in."""
    closes: Counter[str] = Counter()
    opened: list[ClientConnection] = []

    async def ghost(j: int) -> None:
        try:
            ws = await connect(f"ws://{HOST}:{ctx.daemon.port}/v1/listen/ghost-{uuid.uuid4().hex[:8]}-{j}",
                               open_timeout=10, close_timeout=1)
        except InvalidStatus as exc:
            closes[f"HTTP {exc.response.status_code}"] += 1
            return
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            closes[type(exc).__name__] += 1
            return
        opened.append(ws)
        last: dict[str, Any] = {}
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(max(1.0, ctx.left())):
                async for raw in ws:
                    last = json.loads(raw)
        closes[f"{ws.close_code} {last.get('code', '')}".strip() if ws.close_code else "still open"] += 1
        await ws.close()

    ghosts = asyncio.gather(*(ghost(j) for j in range(ctx.args.ghosts)))
    await asyncio.sleep(ctx.args.idle_timeout + 4.0)  # the idle timeout, and the few seconds between looks
    viewer = "not tried"
    try:
        async with connect(f"ws://{HOST}:{ctx.daemon.port}/v1/listen/{ctx.names[0]}", open_timeout=5,
                           close_timeout=1) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 5))
            viewer = "accepted" if first.get("type") == "ready" else f"refused {first.get('code')}"
    except InvalidStatus as exc:
        viewer = f"refused HTTP {exc.response.status_code}"
    except (TimeoutError, OSError, InvalidHandshake, ConnectionClosed) as exc:
        viewer = f"failed: {type(exc).__name__}"
    await ghosts
    return viewer == "accepted", (f"{ctx.args.ghosts} ghost viewers: {dict(closes)}; a healthy stream's viewer "
                                  f"after {ctx.args.idle_timeout + 4:g} s: {viewer}")


async def side_daemon(ctx: Context, overrides: list[str]) -> Daemon:
    """Another daemon, with the main one's server settings, --set and ``overrides`` (not its other listeners, whose
    ports the main one holds), for a row that breaks its processes. RuntimeError if it does not start."""
    base = [o for o in ctx.daemon.overrides if o.startswith("server.") or o in ctx.args.overrides]
    d = Daemon(ctx.args, [*base, *overrides])
    try:
        await d.start()
    except SystemExit as exc:  # the row fails, the other rows go on
        raise RuntimeError(str(exc)[-600:]) from None
    return d


def logged_pid(d: Daemon, pattern: str) -> int | None:
    """The pid the last log line matching ``pattern`` (a group) names."""
    import re

    for line in reversed(d.log_tail):
        if m := re.search(pattern, line):
            return int(m.group(1))
    return None


async def health_status(port: int, limit: float = 3.0) -> str:
    """/healthz's status ("ok", "degraded", ...), "no answer", or the HTTP status."""
    status, _, body = await http(port, get("/healthz"), limit=limit)
    if not status:
        return "no answer"
    try:
        return str(json.loads(body or b"{}").get("status", status))
    except ValueError:
        return f"HTTP {status}"


async def beside(ctx: Context, d: Daemon, harm: Callable[[], Coroutine[Any, Any, str]]) -> Result:
    """Healthy streams on ``d`` while ``harm`` runs (its note); they must lose no final, and /healthz must be ok
    once it is over."""
    audio_s = len(ctx.pcm) / 32000
    streams = asyncio.gather(*(healthy_stream(d.url, ctx.pcm, f"{n}-side", audio_s) for n in ctx.names))
    note = await harm()
    results: list[Healthy] = await streams
    lost = sum(r.lost(ctx.expected.texts)[0] + r.lost(ctx.expected.texts)[1] for r in results)
    lags = [x for r in results for x in r.lags]
    bad = [f"{r.name}: {r.error or 'closed ' + r.close}, {len(r.finals)} finals" for r in results
           if r.error or r.close != "1000" or r.lost(ctx.expected.texts) != (0, 0)]
    status = "?"
    for _ in range(20):  # a replaced process or model server may take a few seconds to be counted again
        if (status := await health_status(d.port)) == "ok":
            break
        await asyncio.sleep(1.0)
    ok = not lost and not bad and status == "ok"
    return ok, (f"{note}; its own healthy streams: {lost} finals lost or changed, lag p95 {pct(lags, 95):.2f} s"
                f"{', ' + '; '.join(bad) if bad else ''}; /healthz after: {status}")


async def attack_hung_process(ctx: Context) -> Result:
    """A daemon of two front-end processes (server.processes = 2) with healthy streams of its own: one process is
    stopped (SIGSTOP, as a stuck event loop) for --hang seconds, then continued. /healthz must say degraded
    meanwhile, no healthy final may be lost (a stream on the stopped process waits for it), and the daemon
    must be ok after."""
    d = await side_daemon(ctx, ["server.processes=2", "server.idle_timeout_s=30"])  # the default: over --hang
    try:
        victim = logged_pid(d, r"started front-end process 1 \(pid (\d+)\)")
        if victim is None:
            return False, "no front-end process 1 in the log"

        seen: Counter[str] = Counter()

        async def hang() -> str:
            await asyncio.sleep(1.0)
            os.kill(victim, signal.SIGSTOP)
            try:
                end = time.monotonic() + ctx.args.hang
                while time.monotonic() < end:  # a request the stopped process took gets no answer
                    seen[await health_status(d.port, limit=min(1.0, max(0.1, end - time.monotonic())))] += 1
                    await asyncio.sleep(0.2)
            finally:
                os.kill(victim, signal.SIGCONT)
            return f"process 1 stopped {ctx.args.hang:g} s, /healthz meanwhile {dict(seen)}"

        ok, note = await beside(ctx, d, hang)
        return ok and seen["degraded"] > 0, note
    finally:
        await d.stop()


def triton_python() -> str | None:
    """A Python with PyTriton for the model server: STREAMER_TRITON_PYTHON, else the checkout's .venv-triton."""
    for python in (os.environ.get("STREAMER_TRITON_PYTHON"),
                   Path(__file__).resolve().parents[1] / ".venv-triton" / "bin" / "python"):
        if python and os.access(python, os.X_OK):
            return str(python)
    return None


async def attack_model_server_kill(ctx: Context) -> Result:
    """A daemon of two front-end processes on a model server it started itself (model_server.kind = "triton"),
    with healthy streams of its own: SIGKILL of the model server's process group. serve must start it again
    and the streams' windows wait for it (model_server.retry_s): no healthy final lost, /healthz ok after."""
    python = triton_python()
    if python is None:
        return True, "skipped: no Python with PyTriton (set STREAMER_TRITON_PYTHON)"
    d = await side_daemon(ctx, ["server.processes=2", "model_server.kind='triton'", f"model_server.python='{python}'",
                                "model_server.http_port=0", "model_server.metrics_port=0"])
    try:
        victim = logged_pid(d, r"model server ready at \S+ \(pid (\d+)\)")
        if victim is None:
            return False, "no model server pid in the log"

        async def kill() -> str:
            await asyncio.sleep(2.0)
            os.killpg(victim, signal.SIGKILL)
            t0 = time.monotonic()
            for _ in range(300):  # the log has no event to await: look every 0.2 s, a minute at most
                if logged_pid(d, r"model server ready at \S+ \(pid (\d+)\)") != victim:
                    break
                await asyncio.sleep(0.2)
            again = logged_pid(d, r"model server ready at \S+ \(pid (\d+)\)")
            return (f"model server (pid {victim}) killed; "
                    + (f"ready again after {time.monotonic() - t0:.1f} s" if again != victim else "not started again"))

        return await beside(ctx, d, kill)
    finally:
        await d.stop()


async def attack_flush_flood(ctx: Context) -> Result:
    """Real-time clients that flush after every 100 ms message: each flush asks for a final at once, whose window
    the worker runs ahead of the others. Those must not hold up the healthy streams' finals."""
    finals: list[int] = []
    problems: list[str] = []
    piece = 3200  # 100 ms of the healthy speech, s16le 16 kHz

    async def one(k: int) -> None:
        got = 0
        try:
            async with connect(native(ctx), open_timeout=10, close_timeout=1) as ws:
                await ws.recv()  # ready
                await ws.send(json.dumps({"type": "start"}))

                async def read() -> None:
                    nonlocal got
                    async for msg in ws:
                        got += json.loads(msg).get("type") == "final"

                reader = asyncio.create_task(read())
                i, t0 = k * piece * 7, asyncio.get_running_loop().time()
                for n in itertools.count(1):
                    if ctx.left() < 1:
                        break
                    await ws.send(ctx.pcm[i % len(ctx.pcm) : i % len(ctx.pcm) + piece])
                    await ws.send(json.dumps({"type": "flush"}))
                    i += piece
                    await asyncio.sleep(max(0.0, t0 + n * 0.1 - asyncio.get_running_loop().time()))
                reader.cancel()
        except (ConnectionClosed, OSError, InvalidHandshake, TimeoutError) as exc:
            problems.append(f"{type(exc).__name__}: {str(exc)[:60]}")
        finals.append(got)

    await asyncio.gather(*(one(k) for k in range(ctx.args.flush_clients)))
    note = f"{ctx.args.flush_clients} clients flushing every 100 ms, {sum(finals)} finals"
    return not problems, note + (f"; {', '.join(problems[:3])}" if problems else "")


async def attack_idle_bypass(ctx: Context) -> Result:
    """Streams that send no audio, only a flush every few seconds, to hold their slots."""
    idle = ctx.args.idle_timeout
    closed: list[float] = []
    hold = max(ctx.left(), idle + 3)  # long enough to see the idle timeout, whatever --seconds says

    async def one() -> None:
        try:
            async with connect(native(ctx), open_timeout=5, close_timeout=1) as ws:
                if json.loads(await ws.recv()).get("type") != "ready":
                    return
                t0 = time.monotonic()
                await ws.send(json.dumps({"type": "start"}))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(hold):
                        while True:
                            await ws.send(json.dumps({"type": "flush"}))
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(idle * 0.6):
                                    async for _ in ws:
                                        pass
                                    closed.append(time.monotonic() - t0)
                                    return
        except (ConnectionClosed, OSError, InvalidHandshake):
            closed.append(float("nan"))

    n = ctx.args.idle_clients
    await asyncio.gather(*(one() for _ in range(n)))
    in_time = [c for c in closed if c <= idle + 3]
    note = f"{n} streams flushing every {idle * 0.6:.1f} s: {len(in_time)} closed by the idle timeout ({idle:g} s)"
    return len(in_time) == n, note


async def attack_refused_storm(ctx: Context) -> Result:
    """All stream slots taken, then thousands of connections that are refused (1013)."""
    holders: list[ClientConnection] = []
    keep = asyncio.Event()

    async def hold() -> None:
        try:
            ws = await connect(native(ctx), open_timeout=5, close_timeout=1)
        except (TimeoutError, OSError, InvalidHandshake):
            return
        try:
            if json.loads(await asyncio.wait_for(ws.recv(), 5)).get("type") != "ready":
                return
            holders.append(ws)
            silence = bytes(3200)
            while not keep.is_set():  # audio keeps the slot (the idle timeout counts audio)
                await ws.send(silence)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(keep.wait(), 1.0)
        except (TimeoutError, ConnectionClosed):
            pass
        finally:
            await ws.close()

    hold_tasks = [asyncio.create_task(hold()) for _ in range(ctx.args.max_streams - len(ctx.names))]
    await asyncio.sleep(2.0)
    codes: Counter[str] = Counter()
    sem = asyncio.Semaphore(50)
    t0 = time.monotonic()

    async def knock() -> None:
        async with sem:
            if ctx.left() <= 0:
                codes["not tried"] += 1
                return
            try:
                async with asyncio.timeout(10):
                    async with connect(native(ctx), open_timeout=5, close_timeout=1) as ws:
                        async for _ in ws:
                            pass
                        codes[str(ws.close_code)] += 1
            except ConnectionClosed as exc:
                codes[str(exc.rcvd.code if exc.rcvd else 1006)] += 1
            except InvalidStatus as exc:
                codes[f"HTTP {exc.response.status_code}"] += 1
            except (TimeoutError, OSError, InvalidHandshake) as exc:
                codes[type(exc).__name__] += 1

    await asyncio.gather(*(knock() for _ in range(ctx.args.refusals)))
    rate = sum(v for k, v in codes.items() if k != "not tried") / max(1e-3, time.monotonic() - t0)
    await asyncio.sleep(max(0.0, ctx.left()))
    keep.set()
    await asyncio.gather(*hold_tasks, return_exceptions=True)
    ok = codes.get("1013", 0) == sum(v for k, v in codes.items() if k != "not tried")
    return ok, f"{len(holders)} slots held; {ctx.args.refusals} knocks at {rate:.0f}/s: {dict(codes)}"


async def bad_input_checks(ctx: Context) -> list[tuple[str, bool, str]]:
    """Each bad input once: (name, passed, what happened). Passing: an error event and no 1011."""

    async def exchange(url: str, messages: list[str | bytes], need_final: bool = False) -> tuple[bool, str]:
        error = False
        final = False
        code: Any = None
        try:
            async with asyncio.timeout(20):
                async with connect(url, max_size=None, open_timeout=5, close_timeout=2) as ws:
                    for m in messages:
                        await ws.send(m)
                    async for raw in ws:
                        if isinstance(raw, str):
                            ev = json.loads(raw)
                            error |= ev.get("type") == "error" or "error" in ev  # native or Vosk
                            final |= ev.get("type") == "final" and bool(ev.get("text"))
                    code = ws.close_code
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            code = type(exc).__name__
        passed = error and code not in (1011, 1006, None) and (final or not need_final)
        return passed, f"close {code}, error event {'yes' if error else 'no'}" + (
            f", final before it {'yes' if final else 'no'}" if need_final else "")

    checks: list[tuple[str, bool, str]] = []
    deep = '{"type": "start", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    checks.append(("deep-json", *await exchange(native(ctx), [deep])))
    f32 = np.frombuffer(ctx.pcm[: 32000 * 3], "<i2").astype("<f4") / 32768
    chunks: list[str | bytes] = [json.dumps({"type": "start", "encoding": "f32le"})]
    chunks += [f32[i:i + 1600].tobytes() for i in range(0, len(f32), 1600)]
    chunks += [np.full(1600, 3e38, "<f4").tobytes(), json.dumps({"type": "stop"})]
    checks.append(("f32-3e38", *await exchange(native(ctx), chunks, need_final=True)))
    if ctx.daemon.vosk_port:
        vosk = f"ws://{HOST}:{ctx.daemon.vosk_port}"
        for name, value in (("vosk-nan", "NaN"), ("vosk-inf", "Infinity")):
            checks.append((name, *await exchange(vosk, ['{"config": {"sample_rate": ' + value + "}}",
                                                        ctx.pcm[:3200], '{"eof": 1}'])))
    return checks


async def attack_bad_input(ctx: Context) -> Result:
    """Deeply nested JSON, a Vosk sample rate of NaN / Infinity, f32 samples of 3e38 after speech."""
    first = await bad_input_checks(ctx)
    rounds = 1
    while ctx.left() > 5:
        await bad_input_checks(ctx)
        rounds += 1
    note = "; ".join(f"{name} {'ok' if ok else 'FAIL'} ({what})" for name, ok, what in first)
    return all(ok for _, ok, _ in first), f"{rounds} rounds: {note}"


async def attack_http_edges(ctx: Context) -> Result:
    """A path component over 255 bytes, HEAD, POST with a body; repeated (how much does each one log?)."""
    port = ctx.daemon.port
    long = "a" * 300
    cases: dict[str, tuple[bytes, Callable[[int, dict[str, str], bytes], bool]]] = {
        "long-path": (get(f"/{long}"), lambda s, h, b: 400 <= s < 500),
        "long-viewer": (get(f"/v1/listen/{long}"), lambda s, h, b: 400 <= s < 500),
        "HEAD": (get("/", "HEAD"), lambda s, h, b: s != 0 and s < 500 and not b),
        "POST": (get("/", "POST", "Content-Length: 1000\r\nContent-Type: text/plain\r\n", b"x" * 1000),
                 lambda s, h, b: 400 <= s < 500),
    }
    seen: dict[str, Counter[int]] = {k: Counter() for k in cases}
    ok = {k: True for k in cases}
    n = 0
    while ctx.left() > 0 and n < ctx.args.http_requests:
        for name, (request, check) in cases.items():
            status, headers, body = await http(port, request)
            seen[name][status] += 1
            ok[name] &= check(status, headers, body)
            n += 1
    note = ", ".join(f"{k} {'ok' if ok[k] else 'FAIL'} {dict(v)}" for k, v in seen.items())
    await asyncio.sleep(max(0.0, ctx.left()))
    return all(ok.values()), f"{n} requests (status: count): {note}"


async def attack_slowloris(ctx: Context) -> Result:
    """Connections that send their request head a byte a second and never end it, each reopened when the daemon
    closes it (slowloris), from the address the healthy clients use: new clients must still get through."""
    port = ctx.daemon.port
    head = f"GET /v1/stream HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nX-Slow: ".encode()
    closed: Counter[str] = Counter()
    served: Counter[str] = Counter()

    async def dribble() -> None:
        while ctx.left() > 0:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                closed["could not connect"] += 1
                await asyncio.sleep(1.0)
                continue
            try:
                writer.write(head)
                while ctx.left() > 0:
                    try:
                        if not await asyncio.wait_for(reader.read(1), 1.0):
                            break
                    except TimeoutError:
                        writer.write(b"a")  # one more byte of a header that never ends
                closed["by the daemon" if ctx.left() > 0 else "at the end"] += 1
            except OSError:
                closed["by the daemon"] += 1
            finally:
                writer.close()

    async def newcomers() -> None:
        while ctx.left() > 0:
            try:
                async with connect(native(ctx), open_timeout=10, close_timeout=1) as ws:
                    ready = json.loads(await asyncio.wait_for(ws.recv(), 10)).get("type") == "ready"
                served["websocket ok" if ready else "websocket refused"] += 1
            except (TimeoutError, OSError, InvalidHandshake, ConnectionClosed) as exc:
                served[f"websocket {type(exc).__name__}"] += 1
            status, _, _ = await http(port, get("/healthz"), limit=10.0)
            served["healthz ok" if status == 200 else f"healthz {status or 'no answer'}"] += 1
            await asyncio.sleep(0.5)

    peak = 0

    async def count() -> None:  # the daemon's open descriptors
        nonlocal peak
        assert ctx.daemon.proc is not None
        while ctx.left() > 0:
            with contextlib.suppress(OSError):
                peak = max(peak, len(os.listdir(f"/proc/{ctx.daemon.proc.pid}/fd")))
            await asyncio.sleep(0.2)

    await asyncio.gather(*(dribble() for _ in range(ctx.args.dribblers)), newcomers(), count())
    ok = set(served) <= {"websocket ok", "healthz ok"} and bool(served)
    return ok, f"{ctx.args.dribblers} dribblers, closed: {dict(closed)}; the daemon's descriptors at most {peak}; " \
               f"new clients: {dict(served)}"


async def attack_cross_origin(ctx: Context) -> Result:
    """Websocket upgrades from another site's page (Origin: https://evil.example)."""
    origin = "Origin: https://evil.example\r\n"
    results = []
    for path in ("/v1/stream", f"/v1/listen/{ctx.names[0]}"):
        status, _, writer = await raw_upgrade(ctx.daemon.port, path, origin)
        if writer is not None:
            writer.close()
        results.append((path, status))
    await asyncio.sleep(max(0.0, ctx.left()))
    note = ", ".join(f"{p}: {'accepted (101)' if s == 101 else f'refused ({s})'}" for p, s in results)
    return all(s not in (101, 0) for _, s in results), note


def upload_request(port: int, audio: bytes, extra: str = "", host: str = "", boundary: str = "chaosboundary") -> bytes:
    """A raw ``POST /v1/audio/transcriptions`` of ``audio`` as a multipart form, with ``extra`` header lines."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n").encode() + \
        audio + f"\r\n--{boundary}--\r\n".encode()
    return (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host or f'{HOST}:{port}'}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def wav_bytes(audio: np.ndarray, rate: int = 16000) -> bytes:
    import io

    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, audio, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def status_is(status: int) -> Callable[[int, dict[str, str], bytes], bool]:
    """A check of :func:`rounds_of`: the answer has ``status``."""
    return lambda s, h, b: s == status


async def rounds_of(ctx: Context, cases: dict[str, tuple[bytes, Callable[[int, dict[str, str], bytes], bool]]]
                    ) -> Result:
    """Send each raw request of ``cases`` again and again until the deadline; each answer must pass its check."""
    seen: dict[str, Counter[int]] = {k: Counter() for k in cases}
    ok = {k: True for k in cases}
    while ctx.left() > 1:
        for name, (request, check) in cases.items():
            status, headers, body = await http(ctx.daemon.port, request, limit=30.0)
            seen[name][status] += 1
            ok[name] &= check(status, headers, body)
    await asyncio.sleep(max(0.0, ctx.left()))
    return all(ok.values()), ", ".join(f"{k} {'ok' if ok[k] else 'FAIL'} {dict(v)}" for k, v in seen.items())


async def attack_rest_cross_site(ctx: Context) -> Result:
    """Uploads from another site's page (a form needs no preflight): Origin or Sec-Fetch-Site, refused 403."""
    audio = wav_bytes(ctx.audio[:16000])
    port = ctx.daemon.port
    refused = status_is(403)
    return await rounds_of(ctx, {
        "evil-origin": (upload_request(port, audio, "Origin: https://evil.example\r\n"), refused),
        "null-origin": (upload_request(port, audio, "Origin: null\r\n"), refused),
        "cross-site": (upload_request(port, audio, "Sec-Fetch-Site: cross-site\r\n"), refused),
    })


async def attack_rebinding(ctx: Context) -> Result:
    """DNS rebinding: Host and Origin both evil.example, on every path (no token set): refused 403."""
    port, evil = ctx.daemon.port, "evil.example"
    audio = wav_bytes(ctx.audio[:16000])
    refused = status_is(403)
    upgrade = (f"GET /v1/listen/{ctx.names[0]} HTTP/1.1\r\nHost: {evil}\r\nOrigin: http://{evil}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    return await rounds_of(ctx, {
        "healthz": (f"GET /healthz HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n".encode(), refused),
        "metrics": (f"GET /metrics HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n".encode(), refused),
        "viewer": (upgrade, refused),
        "upload": (upload_request(port, audio, f"Origin: http://{evil}\r\n", host=evil), refused),
    })


async def attack_rest_malformed(ctx: Context) -> Result:
    """Uploads a parser or decoder chokes on: a 300-character boundary, 255 channels of Ogg Vorbis at 192 kHz
    (4 KB that decode to ~200 MB a second), repeated single headers on POST, GET and upgrades: 400s."""
    import io

    import soundfile as sf

    port = ctx.daemon.port
    bomb = io.BytesIO()
    sf.write(bomb, np.zeros((8000, 255), np.float32), 192000, format="OGG", subtype="VORBIS")
    audio = wav_bytes(ctx.audio[:16000])
    bad = status_is(400)
    upgrade = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n")
    cases = {
        "boundary": (upload_request(port, audio, boundary="b" * 300), bad),
        "255-channels": (upload_request(port, bomb.getvalue()), bad),
        "models-2-auth": (get("/v1/models", extra="Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"), bad),
        "upgrade-2-origin": (get("/v1/stream", extra=upgrade + "Origin: http://a\r\nOrigin: http://b\r\n"), bad),
        "realtime-2-beta": (get("/v1/realtime?intent=transcription",
                                extra=upgrade + "OpenAI-Beta: realtime=v1\r\nOpenAI-Beta: x\r\n"), bad),
    }
    for header in ("Content-Type: text/plain", "Authorization: Bearer x", "Expect: 100-continue"):
        cases[f"post-2-{header.split(':')[0].lower()}"] = (upload_request(port, audio, f"{header}\r\n" * 2), bad)
    return await rounds_of(ctx, cases)


async def attack_rest_bodies(ctx: Context) -> Result:
    """Uploads of 24 MiB answered before their body came (404: translations), sent whole and left open: the
    daemon must drop their bodies as they come, not keep them (the RSS column)."""
    body = memoryview(b"x" * (24 << 20))
    head = (f"POST /v1/audio/translations HTTP/1.1\r\nHost: {HOST}:{ctx.daemon.port}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {len(body)}\r\n\r\n").encode()

    def one() -> tuple[int, socket.socket | None]:
        try:
            s = socket.create_connection((HOST, ctx.daemon.port), timeout=30)
            s.sendall(head)
            s.sendall(body)
            return int(s.recv(64).split()[1]), s
        except (OSError, ValueError, IndexError):
            return 0, None

    statuses: Counter[int] = Counter()
    while ctx.left() > 3:
        sent = await asyncio.gather(*(asyncio.to_thread(one) for _ in range(ctx.args.body_clients)))
        for status, s in sent:
            statuses[status] += 1
            if s is not None:
                s.close()
    await asyncio.sleep(max(0.0, ctx.left()))
    return set(statuses) == {404}, f"{ctx.args.body_clients} at once, 24 MiB each: status {dict(statuses)}"


async def attack_rest_silent(ctx: Context) -> Result:
    """Uploads that send their head and a little of their body, then nothing, each holding a stream: the idle
    timeout must answer them 408 (upload_idle) and free the stream."""
    idle = ctx.args.idle_timeout
    hold = max(ctx.left(), idle + 5)
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {HOST}:{ctx.daemon.port}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n").encode()
    answers: list[tuple[int, float]] = []

    async def one() -> None:
        t0 = time.monotonic()
        status, _, _ = await http(ctx.daemon.port, head, limit=hold)
        answers.append((status, time.monotonic() - t0))

    n = ctx.args.idle_clients
    await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(max(0.0, ctx.left()))
    in_time = [t for status, t in answers if status == 408 and t <= idle + 3]
    return len(in_time) == n, f"{n} silent uploads: {len(in_time)} answered 408 by the idle timeout ({idle:g} s)"


async def attack_realtime_hostile(ctx: Context) -> Result:
    """Realtime sessions sending NaN, 977-deep turn_detection and 190 KB session updates: error events, never
    1011, and no NaN in what comes back."""
    url = f"ws://{HOST}:{ctx.daemon.port}/v1/realtime?intent=transcription"

    def update(turn_detection: str) -> str:
        return ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": '
                '{"turn_detection": ' + turn_detection + "}}}}")

    events = [update('{"type": "server_vad", "threshold": NaN}'),
              update('{"type": "server_vad", "x": ' + "[" * 977 + "]" * 977 + "}"),
              json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                  "transcription": {"prompt": "turn on the lights " * 10_000}}}}})]
    codes: Counter[str] = Counter()
    problems: list[str] = []

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} sent")

    async def session() -> None:  # after 32 errors the daemon closes the session (1008): open another
        while ctx.left() > 1:
            try:
                async with connect(url, max_size=None, open_timeout=10) as ws:
                    await ws.recv()
                    while ctx.left() > 1:
                        for event in events:
                            await ws.send(event)
                            while (msg := json.loads(await ws.recv(), parse_constant=no_constant))["type"] != "error":
                                pass
                            codes[msg["error"]["code"]] += 1
            except ConnectionClosed as exc:
                if exc.rcvd is None or exc.rcvd.code != 1008:
                    problems.append(f"closed {exc.rcvd.code if exc.rcvd else 'without a close frame'}")
                    return
            except (ValueError, OSError, InvalidHandshake) as exc:
                problems.append(str(exc)[:80])
                return

    await asyncio.gather(session(), session())
    await asyncio.sleep(max(0.0, ctx.left()))
    return not problems and set(codes) <= {"invalid_json", "update_too_large", "too_many_errors"} and \
        codes["invalid_json"] > 0 and codes["update_too_large"] > 0, \
        f"error events {dict(codes)}" + (f"; {', '.join(problems)}" if problems else "")


async def attack_deepgram_hostile(ctx: Context) -> Result:
    """Deepgram clients with bad options (400 in Deepgram's shape), unreadable control messages (an Error each,
    1008 after 32) and an odd number of bytes in every audio message: never 1011, the healthy streams untouched."""
    base = f"ws://{HOST}:{ctx.daemon.port}/v1/listen"
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    problems: list[str] = []

    async def refused(query: str) -> None:
        try:
            async with connect(f"{base}?{query}", open_timeout=5):
                problems.append(f"{query[:40]} was accepted")
        except InvalidStatus as exc:
            body = json.loads(exc.response.body or b"{}")
            statuses[f"{exc.response.status_code} {body.get('err_code', '?')}"] += 1

    async def session() -> None:
        while ctx.left() > 1:
            for query in ("encoding=opus&sample_rate=48000", "encoding=linear16", "encoding=linear16&sample_rate=1",
                          "encoding=linear16&sample_rate=16000&channels=99&keywords=x:-1"):
                await refused(query)
            try:
                async with connect(f"{base}?encoding=linear16&sample_rate=16000", open_timeout=5) as ws:
                    for i in range(40):
                        await ws.send(ctx.pcm[i * 3201 : (i + 1) * 3201])  # odd sizes: samples cut in two
                        await ws.send("{" * (i + 1))
                    async for raw in ws:
                        msg = json.loads(raw)
                        if msg.get("type") == "Error":
                            errors[msg["variant"]] += 1
            except ConnectionClosed as exc:
                if exc.rcvd is None or exc.rcvd.code != 1008:
                    problems.append(f"closed {exc.rcvd.code if exc.rcvd else 'without a close frame'}")
                    return
            except (ValueError, OSError, InvalidHandshake) as exc:
                problems.append(str(exc)[:80])
                return

    await asyncio.gather(session(), session())
    await asyncio.sleep(max(0.0, ctx.left()))
    ok = not problems and errors["SchemaError"] > 0 and set(statuses) == {"400 INVALID_QUERY_PARAMETER"}
    return ok, f"refused {dict(statuses)}; errors {dict(errors)}" + (f"; {', '.join(problems)}" if problems else "")


async def attack_deepgram_flood(ctx: Context) -> Result:
    """Deepgram clients that send 8 kHz mu-law in 1 MiB messages as fast as they can, with a Finalize after each
    and two channels each (multichannel), then leave without CloseStream."""
    url = (f"ws://{HOST}:{ctx.daemon.port}/v1/listen?encoding=mulaw&sample_rate=8000&channels=2&multichannel=true"
           "&interim_results=true")
    ulaw = np.frombuffer(encode_g711(np.frombuffer(audio_8k(ctx, 70.0), "<i2"), "mulaw"), np.uint8)
    block = np.stack([ulaw, ulaw], axis=1).tobytes()[: 1 << 20]  # the speech on both channels
    sent = results = 0
    problems: list[str] = []

    async def one() -> None:
        nonlocal sent, results
        try:
            async with connect(url, max_size=None, open_timeout=5, close_timeout=1) as ws:
                for _ in range(3):
                    await ws.send(block)
                    await ws.send(json.dumps({"type": "Finalize"}))
                    sent += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(2.0, max(0.0, ctx.left()))):
                        async for raw in ws:
                            results += '"Results"' in raw
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 1011:
                problems.append("1011")
        except (OSError, InvalidHandshake) as exc:
            problems.append(str(exc)[:60])

    while ctx.left() > 3:
        await asyncio.gather(*(one() for _ in range(4)))
    return not problems, f"{sent} MiB messages sent, {results} Results read" + (
        f"; {', '.join(sorted(set(problems)))}" if problems else "")


async def attack_twilio_hostile(ctx: Context) -> Result:
    """Twilio streams sending 512 KB of base64 in one media message, a payload that is not base64, media before
    start and media of a track start did not list: each closed with its own code and reason, never 1011."""
    url = f"ws://{HOST}:{ctx.daemon.port}/v1/twilio"

    def start() -> str:
        return json.dumps({"event": "start", "start": {
            "callSid": f"CA{uuid.uuid4().hex}", "streamSid": f"MZ{uuid.uuid4().hex}", "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})

    def media(payload: str, track: str = "inbound") -> str:
        return json.dumps({"event": "media", "media": {"track": track, "chunk": "1", "timestamp": "0",
                                                       "payload": payload}})

    silence = base64.b64encode(b"\xff" * 160).decode()
    big = media("A" * (512 << 10))
    closes: Counter[str] = Counter()
    problems: list[str] = []

    async def caller() -> None:
        while ctx.left() > 1:
            cases = {"too_big": [start(), big], "bad_audio": [start(), media("!!" * 80)],  # a call SID each
                     "bad_order": [media(silence)], "bad_track": [start(), media(silence, "outbound")]}
            for want, messages in cases.items():
                try:
                    async with connect(url, max_size=None, open_timeout=5, close_timeout=2) as ws:
                        with contextlib.suppress(ConnectionClosed):
                            for message in messages:
                                await ws.send(message)
                        async with asyncio.timeout(10):
                            await ws.wait_closed()
                        got = f"{ws.close_code} {(ws.close_reason or '').split(':')[0]}"
                        closes[got] += 1
                        if not got.endswith(want):
                            problems.append(f"{want}: closed {got}")
                except (TimeoutError, OSError, InvalidHandshake) as exc:
                    problems.append(f"{want}: {str(exc)[:60] or type(exc).__name__}")

    await asyncio.gather(caller(), caller())
    await asyncio.sleep(max(0.0, ctx.left()))
    ok = not problems and set(closes) == {"1009 too_big", "1007 bad_audio", "1008 bad_order", "1008 bad_track"}
    return ok, f"closes {dict(closes)}" + (f"; {', '.join(sorted(set(problems))[:4])}" if problems else "")


async def attack_audiosocket_hostile(ctx: Context) -> Result:
    """AudioSocket calls with an unknown frame kind, a 64 KiB audio header with nothing behind it, audio before the
    uuid and a half sample: an error frame each (read before the payload is), the healthy streams untouched."""
    port = ctx.args.audiosocket_port
    answers: Counter[str] = Counter()
    problems: list[str] = []

    async def caller() -> None:
        while ctx.left() > 1:
            call = frame(KIND_UUID, uuid.uuid4().bytes)  # a UUID each: two live calls cannot share one
            cases = {"unknown frame kind": b"\x42\x00\x00",
                     "is over 16000 bytes": struct.pack(">BH", KIND_AUDIO, 0xFFFF),
                     "audio before the call's uuid": frame(KIND_AUDIO, bytes(320)),
                     "not whole 16-bit samples": call + frame(KIND_AUDIO, bytes(321))}
            for want, data in cases.items():
                writer = None
                try:
                    async with asyncio.timeout(10):
                        reader, writer = await asyncio.open_connection(HOST, port)
                        writer.write(data)
                        await writer.drain()
                        got = await reader.read()
                    if got[:1] == bytes([KIND_ERROR]) and want in got[3:].decode(errors="replace"):
                        answers[want] += 1
                    else:
                        problems.append(f"{want}: {got[:40]!r}")
                except (TimeoutError, OSError) as exc:
                    problems.append(f"{want}: {str(exc)[:60] or type(exc).__name__}")
                finally:
                    if writer is not None:
                        writer.close()

    await asyncio.gather(caller(), caller())
    await asyncio.sleep(max(0.0, ctx.left()))
    ok = not problems and len(answers) == 4
    return ok, f"error frames {dict(answers)}" + (f"; {', '.join(sorted(set(problems))[:4])}" if problems else "")


async def attack_sigterm(ctx: Context) -> Result:
    """SIGTERM while the worker is busy: every healthy stream must still get its finals before the close."""
    load = asyncio.create_task(flood_8k(ctx, ctx.args.sigterm_load, ctx.left))
    await asyncio.sleep(max(0.0, ctx.sigterm_at - asyncio.get_running_loop().time()))
    t0 = time.monotonic()
    ctx.daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    limit = ctx.args.shutdown_timeout + 20
    code = await ctx.daemon.wait(limit)
    load.cancel()
    await asyncio.gather(load, return_exceptions=True)
    if code is None:
        return False, f"still running {limit:g} s after SIGTERM"
    return code == 0, f"exit {code} {time.monotonic() - t0:.1f} s after SIGTERM"


async def attack_drain(ctx: Context) -> Result:
    """SIGTERM with the drain on (server.drain_timeout_s), while the worker is busy: a new stream is refused (503)
    and the healthy streams go on to their own end with every final, closed normally; then the daemon exits 0."""
    load = asyncio.create_task(flood_8k(ctx, ctx.args.sigterm_load, ctx.left))
    await asyncio.sleep(max(0.0, ctx.sigterm_at - asyncio.get_running_loop().time()))
    t0 = time.monotonic()
    ctx.daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    await asyncio.sleep(0.5)
    try:
        async with connect(native(ctx), open_timeout=5):
            refused = "a new stream was taken while draining"
    except InvalidStatus as exc:
        refused = "" if exc.response.status_code == 503 else f"a new stream got {exc.response.status_code}"
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        refused = f"a new stream failed: {type(exc).__name__}"
    limit = ctx.args.drain_timeout + ctx.args.shutdown_timeout + 20
    code = await ctx.daemon.wait(limit)
    load.cancel()
    await asyncio.gather(load, return_exceptions=True)
    if code is None:
        return False, f"still running {limit:g} s after SIGTERM"
    return code == 0 and not refused, (f"exit {code} {time.monotonic() - t0:.1f} s after SIGTERM, once the healthy "
                                       f"streams ended; {refused or 'a new stream refused 503'}")


@dataclass(frozen=True)
class Attack:
    run: Callable[[Context], Coroutine[Any, Any, Result]]
    about: str
    setup_s: float = 0.0
    """seconds the attack may take beyond --seconds to set up (a daemon of its own)"""


ATTACKS: dict[str, Attack] = {
    "none": Attack(attack_none, "no attack: the healthy streams alone (a baseline)"),
    "mqtt-name": Attack(attack_mqtt_name, "streams named 'x\\n' with MQTT on: must be refused, MQTT must go on"),
    "ping-flood": Attack(attack_ping_flood, "clients flood ping frames and never read: must be closed"),
    "big-words": Attack(attack_big_words, "start messages with a 1 MB word list: bounded memory, given back"),
    "flood-8k": Attack(attack_flood_8k, "clients send 1 MiB messages of 8 kHz audio as fast as they can, leave"),
    "fast-sender": Attack(attack_fast_sender, "clients/caption.py --fast on the healthy audio: no final lost"),
    "flush-flood": Attack(attack_flush_flood, "100 ms of speech and a flush, again and again: finals asked for"),
    "viewers": Attack(attack_viewers, "over a thousand viewers: /healthz and the streams must go on"),
    "bursts": Attack(attack_bursts, "clients send 55 s of speech at once and stay: spare model time only"),
    "ghost-viewers": Attack(attack_ghost_viewers, "viewers of names that never exist fill the slots: closed when idle"),
    "hung-process": Attack(attack_hung_process, "2 processes, one SIGSTOPped --hang s: degraded, no final lost",
                           setup_s=90.0),
    "model-server-kill": Attack(attack_model_server_kill, "SIGKILL of serve's own Triton model server: restarted",
                                setup_s=240.0),
    "idle-bypass": Attack(attack_idle_bypass, "streams that only send flush: the idle timeout must close them"),
    "refused-storm": Attack(attack_refused_storm, "slots full, thousands of connections refused with 1013"),
    "bad-input": Attack(attack_bad_input, "deep JSON, Vosk NaN/Infinity rate, 3e38 f32 samples: error events"),
    "http-edges": Attack(attack_http_edges, "a 300-byte path component, HEAD, POST with a body: 4xx, one line"),
    "slowloris": Attack(attack_slowloris, "request heads sent a byte a second, reopened as closed: new clients in"),
    "cross-origin": Attack(attack_cross_origin, "websocket upgrades with another site's Origin: refused"),
    "rest-cross-site": Attack(attack_rest_cross_site, "uploads with another site's Origin or Sec-Fetch-Site: 403"),
    "rebinding": Attack(attack_rebinding, "Host: evil.example on /healthz, /metrics, viewers, uploads: 403"),
    "rest-malformed": Attack(attack_rest_malformed, "long boundary, 255-channel Ogg, repeated headers: 400"),
    "rest-bodies": Attack(attack_rest_bodies, "24 MiB uploads answered 404 before their body: dropped, not kept"),
    "rest-silent": Attack(attack_rest_silent, "uploads that stop sending, holding a stream: 408 at the idle timeout"),
    "realtime-hostile": Attack(attack_realtime_hostile, "Realtime NaN, deep nesting, 190 KB updates: error events"),
    "deepgram-hostile": Attack(attack_deepgram_hostile, "Deepgram: bad options 400, unreadable messages, odd bytes"),
    "deepgram-flood": Attack(attack_deepgram_flood, "Deepgram: 1 MiB mu-law messages, Finalize, 2 channels, leave"),
    "twilio-hostile": Attack(attack_twilio_hostile, "Twilio: 512 KB payloads, bad base64, media before start"),
    "audiosocket-hostile": Attack(attack_audiosocket_hostile, "AudioSocket: unknown kinds, 64 KB headers, no uuid"),
    "drain": Attack(attack_drain, "SIGTERM, drain on: healthy streams end whole, a new one gets 503 (near last)"),
    "sigterm": Attack(attack_sigterm, "SIGTERM under load, drain off: every healthy final before the close (last)"),
}


# ---------------------------------------------------------------------------------------------------------
# running an attack
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    attack: str
    rss: tuple[float, float, float] = (float("nan"),) * 3
    lag_p95: float = float("nan")
    lost: int = 0
    changed: int = 0
    mqtt_lost: int | None = None
    healthy: str = ""
    log_kb: float = 0.0
    passed: bool = True
    check: bool = True
    note: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(short tag for the table, what happened)"""

    def fail(self, tag: str, detail: str) -> None:
        self.problems.append((tag, detail))
        self.passed = False


async def run_attack(name: str, ctx: Context, index: int) -> Row:
    """One attack beside the healthy streams, with its RSS, health and log watched."""
    args, daemon = ctx.args, ctx.daemon
    loop = asyncio.get_running_loop()
    row = Row(name)
    ctx.names = [f"healthy-{index}-{i}" for i in range(args.healthy)]
    before, log0 = rss_mb(daemon.pid), daemon.log_bytes
    peak = [before]
    polls: list[bool] = []
    sigterm = name == "sigterm"
    ending = name in ("sigterm", "drain")  # the daemon exits: no polls, no MQTT count, no memory kept

    async def watch() -> None:
        next_poll = loop.time()
        while True:
            await asyncio.sleep(0.2)
            peak.append(rss_mb(daemon.pid))
            if peak[-1] > args.rss_limit_mb and not attack.done():
                attack.cancel()
                row.fail("rss limit", f"stopped at RSS {peak[-1]:.0f} MB (--rss-limit-mb)")
            if loop.time() >= next_poll and not ending:
                next_poll = loop.time() + 1.0
                polls.append(await healthz(daemon.port))

    mqtt: Counter[str] = Counter()
    subscriber = None
    if ctx.broker is not None and not ending:
        ready = asyncio.Event()
        subscriber = asyncio.create_task(ctx.broker.count_finals("streamer", mqtt, ready))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), 10)
    audio_s = len(ctx.pcm) / 32000
    ctx.deadline = loop.time() + args.seconds
    if ending:
        ctx.sigterm_at = loop.time() + sigterm_offset(ctx.expected, audio_s, ctx)
    streams = asyncio.gather(*(healthy_stream(daemon.url, ctx.pcm, n, audio_s) for n in ctx.names))
    attack = asyncio.create_task(ATTACKS[name].run(ctx))
    watcher = asyncio.create_task(watch())
    limit = args.seconds + GRACE_S + ATTACKS[name].setup_s
    try:
        async with asyncio.timeout(limit):
            row.check, row.note = await attack
    except TimeoutError:
        row.check, row.note = False, f"the attack did not end within {limit:g} s"
    except asyncio.CancelledError:
        if not row.problems:
            raise
        row.check, row.note = False, "cancelled"
    except Exception as exc:  # an attack's own bug must not end the benchmark
        row.check, row.note = False, f"the attack failed: {type(exc).__name__}: {exc}"
    results: list[Healthy] = await streams
    if not ending:
        await asyncio.sleep(SETTLE_S)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    if subscriber is not None:
        await asyncio.sleep(1.0)
        subscriber.cancel()
        await asyncio.gather(subscriber, return_exceptions=True)
        row.mqtt_lost = sum(max(0, len(ctx.expected.texts) - mqtt[n]) for n in ctx.names)
    after = rss_mb(daemon.pid)
    row.rss = (before, max(p for p in peak if not math.isnan(p)), after)
    row.log_kb = (daemon.log_bytes - log0) / 1024
    expected = ctx.expected.texts[: ctx.sigterm_expected] if sigterm else ctx.expected.texts
    for r in results:
        lost, changed = r.lost(expected)
        row.lost += lost
        row.changed += 0 if sigterm else changed  # after SIGTERM the streams may get a final of later audio
        if r.error:
            row.fail("stream error", f"{r.name}: {r.error}")
        elif r.close not in ("1000", "1001" if sigterm else "1000"):
            row.fail(f"closed {r.close or '?'}", f"{r.name}: closed {r.close or 'abnormally'}")
    row.lag_p95 = pct([x for r in results for x in r.lags], 95)
    if ending:
        row.healthy = "exit 0" if row.check else "no"
    else:
        final_ok = daemon.alive and await healthz(daemon.port)
        failed = polls.count(False)
        row.healthy = "yes" if final_ok and not failed else (
            "died" if not daemon.alive else f"no ({failed}/{len(polls)} polls failed{'' if final_ok else ', still'})")
    kept = after - before
    if row.lost or row.changed:
        row.fail("finals lost", f"healthy streams: {row.lost} finals lost, {row.changed} changed")
    if row.mqtt_lost:
        row.fail("mqtt lost", f"{row.mqtt_lost} healthy finals missing on MQTT")
    if not ending and row.healthy != "yes":
        row.fail("unhealthy", f"/healthz: {row.healthy}")
    if not ending and kept > args.max_kept_mb:
        row.fail("memory kept", f"kept +{kept:.0f} MB after the attack (--max-kept-mb)")
    if row.lag_p95 > args.max_lag:
        row.fail("lag", f"healthy final lag p95 {row.lag_p95:.1f} s (--max-lag)")
    if not row.check:
        row.fail("attack succeeded", "the attack's own check failed (its note)")
    return row


async def settled(ctx: Context) -> str:
    """Whether the daemon is itself again after an attack: alive, /healthz ok, and a 2-second stream sent at
    once gets its end within PROBE_S. '' when it is, else what is wrong (then it is restarted)."""
    if not ctx.daemon.alive:
        return "the daemon died"
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(PROBE_S):
            async with connect(native(ctx), max_size=None, open_timeout=5, close_timeout=2) as ws:
                await ws.recv()
                await ws.send(ctx.pcm[: 32000 * 2])
                await ws.send(json.dumps({"type": "stop"}))
                async for _ in ws:
                    pass
    except (TimeoutError, ConnectionClosed, OSError, InvalidHandshake) as exc:
        return f"a probe stream {type(exc).__name__} after {time.monotonic() - t0:.0f} s: the daemon is still busy"
    return "" if await healthz(ctx.daemon.port) else "/healthz not ok after the attack"


def sigterm_offset(expected: Expected, audio_s: float, ctx: Context) -> float:
    """When to send SIGTERM (seconds after the healthy streams start): 0.3 s after the last word of a final
    that ends past the middle, before its endpoint: the daemon must finalise that segment itself."""
    late = [i for i, end in enumerate(expected.ends) if end + 0.3 < min(audio_s, ctx.args.seconds) * 0.8]
    k = late[-1] if late else 0
    ctx.sigterm_expected = k + 1 if expected.ends else 0
    return (expected.ends[k] + 0.3) if expected.ends else ctx.args.seconds / 2


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    epilog = "attacks (--attacks, in this order; sigterm always runs last):\n" + "\n".join(
        f"  {name:<14} {a.about}" for name, a in ATTACKS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(ATTACKS), metavar="A,B",
                   help="which attacks, comma-separated (default: all)")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")
    p.add_argument("--seconds", type=float, default=20.0, help="how long each attack runs (default: 20)")
    p.add_argument("--healthy", type=int, default=2, help="healthy real-time streams beside each attack (default: 2)")
    p.add_argument("--model", default="demo", help="the daemon's model (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for the daemon and for the reference transcription (repeatable)")
    p.add_argument("--max-streams", type=int, default=24, help="the daemon's server.max_streams (default: 24)")
    p.add_argument("--body-clients", type=int, default=8,
                   help="rest-bodies: uploads of 24 MiB sent at once (default: 8)")
    p.add_argument("--idle-timeout", type=float, default=5.0,
                   help="the daemon's server.idle_timeout_s, short so that idle-bypass shows (default: 5)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="the daemon's server.shutdown_timeout_s (default: 10)")
    p.add_argument("--nofile", type=int, default=1024,
                   help="the daemon's soft descriptor limit, as systemd's default; 0 keeps ours (default: 1024)")
    p.add_argument("--flooders", type=int, default=2, help="ping-flood clients (default: 2)")
    p.add_argument("--word-clients", type=int, default=4, help="big-words clients, in all (default: 4)")
    p.add_argument("--flood-clients", type=int, default=8, help="flood-8k clients (default: 8)")
    p.add_argument("--messages", type=int, default=2, help="messages each flood-8k client sends (default: 2)")
    p.add_argument("--message-bytes", type=int, default=1_000_000,
                   help="bytes per flood-8k message, under server.max_message_bytes (default: 1000000)")
    p.add_argument("--fast-clients", type=int, default=2, help="caption.py --fast runs at a time (default: 2)")
    p.add_argument("--flush-clients", type=int, default=4, help="flush-flood clients (default: 4)")
    p.add_argument("--viewers", type=int, default=1200, help="viewers, more than --nofile (default: 1200)")
    p.add_argument("--burst-clients", type=int, default=8, help="bursts clients (default: 8)")
    p.add_argument("--ghosts", type=int, default=256,
                   help="ghost-viewers: viewers of names that never exist, server.max_viewers (default: 256)")
    p.add_argument("--hang", type=float, default=10.0,
                   help="hung-process: seconds one process stays stopped, under its heartbeat limit (default: 10)")
    p.add_argument("--idle-clients", type=int, default=4, help="idle-bypass streams (default: 4)")
    p.add_argument("--refusals", type=int, default=5000, help="refused-storm connections (default: 5000)")
    p.add_argument("--dribblers", type=int, default=1100, help="slowloris connections, more than --nofile "
                   "(default: 1100)")
    p.add_argument("--http-requests", type=int, default=2000, help="most http-edges requests (default: 2000)")
    p.add_argument("--sigterm-load", type=int, default=4, help="flood-8k clients during sigterm (default: 4)")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="the daemon's server.drain_timeout_s in the drain row; the other rows run without a drain, "
                   "as sigterm checks (default: 120)")
    p.add_argument("--max-lag", type=float, default=4.0,
                   help="a healthy final lag p95 above this fails the row (default: 4 s)")
    p.add_argument("--max-kept-mb", type=float, default=200.0,
                   help="RSS kept after an attack above this fails the row (default: 200)")
    p.add_argument("--rss-limit-mb", type=float, default=8000.0,
                   help="stop an attack when the daemon's RSS passes this (default: 8000)")
    p.add_argument("--start-timeout", type=float, default=120.0, help="for the daemon to listen (default: 120 s)")
    p.add_argument("--json", metavar="FILE", help="also write the rows here as JSON")
    args = p.parse_args(argv)
    if args.list:
        print(epilog)
        raise SystemExit(0)
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        p.error(f"unknown attack {', '.join(unknown)}; choose from {', '.join(ATTACKS)}" if unknown
                else "--attacks names none")
    args.attacks = sorted(set(names), key=list(ATTACKS).index)  # sigterm last
    if args.seconds <= 0 or args.healthy < 1:
        p.error("--seconds must be positive and --healthy at least 1")
    if args.max_streams <= args.healthy + max(args.flood_clients, args.word_clients, args.idle_clients,
                                              args.fast_clients, args.sigterm_load):
        p.error("--max-streams leaves no room for the attack's clients beside the healthy streams")
    return args


async def reference(args: argparse.Namespace, wav: Path) -> Expected:
    """``streamer transcribe --format jsonl`` of the healthy audio, with the same model and overrides."""
    cmd = [sys.executable, "-m", "streamer", "transcribe", "--format", "jsonl", "--model", args.model, str(wav)]
    for o in args.overrides:
        cmd += ["--set", o]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(600):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        raise SystemExit("chaos: streamer transcribe of the healthy audio took over 600 s") from None
    if proc.returncode != 0:
        raise SystemExit(f"chaos: streamer transcribe failed: {err.decode(errors='replace')[-2000:]}")
    finals = [e for e in map(json.loads, out.decode().splitlines()) if e.get("type") == "final"]
    return Expected([e["text"] for e in finals], [e["words"][-1]["end"] if e["words"] else e["end"] for e in finals])


def table(rows: list[Row], args: argparse.Namespace) -> str:
    head = ("attack", "RSS MB before/peak/after", "lag p95 s", "lost", "mqtt lost", "healthy", "log KB", "result")
    body = []
    for r in rows:
        rss = "/".join("-" if math.isnan(x) else f"{x:.0f}" for x in r.rss)
        lost = f"{r.lost}" + (f" (+{r.changed} changed)" if r.changed else "")
        body.append((r.attack, rss, "-" if math.isnan(r.lag_p95) else f"{r.lag_p95:.2f}", lost,
                     "-" if r.mqtt_lost is None else str(r.mqtt_lost), r.healthy, f"{r.log_kb:.0f}",
                     "pass" if r.passed else "FAIL: " + ", ".join(dict.fromkeys(tag for tag, _ in r.problems))))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in (head, tuple("-" * w for w in widths), *body)]
    notes = []
    for r in rows:
        notes.append(f"  {r.attack}: {r.note}")
        notes += [f"    {tag}: {detail}" for tag, detail in r.problems]
    return "\n".join(lines + ["", "what each attack saw, and what failed:", *notes])


async def main_async(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # our own viewers and knocks need descriptors
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        args.workdir = tmp
        import soundfile as sf

        audio = speech_audio(args.seconds)
        wav = Path(tmp) / "healthy.wav"
        sf.write(wav, audio, 16000, subtype="PCM_16")
        audio = sf.read(wav, dtype="float32")[0]  # exactly what the file holds
        broker = None
        overrides = [f"server.max_streams={args.max_streams}", f"server.idle_timeout_s={args.idle_timeout}",
                     f"server.shutdown_timeout_s={args.shutdown_timeout}", "server.drain_timeout_s=0",
                     "vosk.enabled=true", "vosk.port=0"]
        args.audiosocket_port = free_port()  # the phone calls' TCP listener (audiosocket-hostile)
        overrides += ["audiosocket.enabled=true", f"audiosocket.uri='tcp://{HOST}:{args.audiosocket_port}'"]
        sbin = "/usr/sbin/mosquitto"  # not on a user's PATH on Debian
        exe = shutil.which("mosquitto") or (sbin if os.access(sbin, os.X_OK) else None)
        if exe and "mqtt-name" in args.attacks:
            broker = Broker(exe, Path(tmp))
            await broker.start()
            overrides += ["mqtt.enabled=true", f"mqtt.host='{HOST}'", f"mqtt.port={broker.port}"]
        daemon = Daemon(args, overrides + args.overrides)
        rows: list[Row] = []
        try:
            print(f"chaos: starting the daemon ({args.model}) and transcribing {args.seconds:g} s of healthy speech",
                  file=sys.stderr)
            expected, _ = await asyncio.gather(reference(args, wav), daemon.start())
            print(f"chaos: daemon on port {daemon.port} (pid {daemon.pid}); the healthy audio has "
                  f"{len(expected.texts)} finals", file=sys.stderr)
            ctx = Context(args, daemon, pcm16(audio), audio, expected, [], broker=broker)
            restart = False
            for i, name in enumerate(args.attacks):
                if name == "drain":  # the only row with the drain on; the daemon exits at its end
                    restart, base = True, daemon.overrides
                    daemon.overrides = [*base, f"server.drain_timeout_s={args.drain_timeout}"]
                if restart:
                    print("chaos: restarting the daemon", file=sys.stderr)
                    await daemon.stop()
                    await daemon.start()
                    restart = False
                print(f"chaos: {name} ({args.seconds:g} s)", file=sys.stderr)
                row = await run_attack(name, ctx, i)
                if name == "drain":
                    restart, daemon.overrides = True, base
                elif name != "sigterm" and (trouble := await settled(ctx)):
                    row.fail("busy after", trouble)
                    restart = True  # the next attack gets a fresh daemon
                rows.append(row)
                print(f"chaos: {name}: {'pass' if row.passed else 'FAIL'} ({row.note})", file=sys.stderr)
        finally:
            await daemon.stop()
            if broker is not None:
                await broker.stop()
    print(table(rows, args))
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps([r.__dict__ for r in rows], indent=1,
                                                                         default=str))
    return 0 if all(r.passed for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(main_async(parse_args(argv)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
