"""Compare the plain-HTTP side of two (or more) daemons side by side: uploads, health checks, websocket handshakes.

Each ``--tree`` is a checkout of streamer (``git worktree add /tmp/old REV``); a daemon is started from each,
and the same requests go to them in turns, round after round, so that a noisy machine weighs on all alike.
Per kind of request it prints the latency (p50, p95) and the daemon's CPU time per request, and the ratio of
each tree's figures to the first tree's::

    git worktree add /tmp/before 9963727
    python clients/httpbench.py --tree /tmp/before --tree . --rounds 5

The uploads are WAV files of noise (``--upload-mb``) whose form asks for a response format the daemon refuses
after reading the whole body and form: what they cost is the HTTP side's alone, not the model's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect

from streamer.testing import proc_cpu_seconds

BOUNDARY = "httpbenchboundary"


@dataclass
class Daemon:
    tree: Path
    proc: asyncio.subprocess.Process
    port: int
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def cpu_s(self) -> float:
        """User + system CPU seconds of the daemon process so far (``/proc/PID/stat``)."""
        return proc_cpu_seconds(f"/proc/{self.proc.pid}/stat")


async def start(tree: Path, model: str) -> Daemon:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "serve", "--model", model, "--port", "0", "--set",
        "server.max_streams=256", "--set", "openai.max_upload_bytes=67108864", cwd=tree, env=env,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    while True:
        line = (await proc.stderr.readline()).decode()
        if not line:
            raise SystemExit(f"httpbench: the daemon of {tree} exited before listening")
        if line.startswith("streamer: listening on "):
            port = int(line.split()[3].rstrip(",").rsplit(":", 1)[1].split("/")[0])
            break

    async def drain() -> None:
        assert proc.stderr is not None
        while await proc.stderr.readline():
            pass

    asyncio.get_running_loop().create_task(drain())
    return Daemon(tree, proc, port)


def wav(megabytes: float) -> bytes:
    frames = int(megabytes * (1 << 20) / 2)
    out = io.BytesIO()
    noise = np.random.default_rng(0).normal(0, 0.01, frames).astype(np.float32)
    sf.write(out, noise, 16000, format="WAV", subtype="PCM_16")
    return out.getvalue()


def upload_request(port: int, audio: bytes, chunked: bool) -> list[bytes]:
    """A multipart upload as the OpenAI SDK sends it, as the pieces written (64 KiB chunks when chunked); its
    response format is one the daemon refuses (400) once it has read the body and parsed the form."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\nxml\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + audio + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n")
    if not chunked:
        return [(head + f"Content-Length: {len(body)}\r\n\r\n").encode(), body]
    pieces = [(head + "Transfer-Encoding: chunked\r\n\r\n").encode()]
    for i in range(0, len(body), 1 << 16):
        piece = body[i : i + (1 << 16)]
        pieces.append(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    return [*pieces, b"0\r\n\r\n"]


async def exchange(port: int, pieces: list[bytes]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        answer = await reader.read()
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    finally:
        writer.close()


async def handshake(port: int) -> int:
    async with connect(f"ws://127.0.0.1:{port}/v1/listen/httpbench") as ws:
        await ws.recv()
    return 101


async def measure(d: Daemon, kind: str, n: int, one: object, expected: int) -> None:
    cpu0 = d.cpu_s()
    for _ in range(n):
        t0 = time.perf_counter()
        status = await one()  # type: ignore[operator]
        if status != expected:
            raise SystemExit(f"httpbench: {kind} on {d.tree} answered {status}")
        d.times.setdefault(kind, []).append(time.perf_counter() - t0)
    d.cpu[kind] = d.cpu.get(kind, 0.0) + d.cpu_s() - cpu0
    d.count[kind] = d.count.get(kind, 0) + n


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", type=Path, required=True, help="a streamer checkout (repeatable)")
    ap.add_argument("--model", default="demo", help="model for the daemons (default: demo)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every kind of request on every daemon")
    ap.add_argument("--upload-mb", type=float, default=4.0, help="size of each uploaded WAV (default: 4 MiB)")
    ap.add_argument("--uploads", type=int, default=3, help="uploads per kind per round (default: 3)")
    ap.add_argument("--light", type=int, default=100, help="health checks and handshakes per round (default: 100)")
    args = ap.parse_args()
    daemons = [await start(t.resolve(), args.model) for t in args.tree]
    audio = wav(args.upload_mb)
    try:
        for r in range(args.rounds):
            for d in daemons:
                health = [f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nConnection: close\r\n\r\n".encode()]
                await measure(d, "GET /healthz", args.light, lambda d=d, h=health: exchange(d.port, h), 200)
                await measure(d, "websocket handshake", args.light, lambda d=d: handshake(d.port), 101)
                for chunked in (False, True):
                    pieces = upload_request(d.port, audio, chunked)
                    kind = f"upload {args.upload_mb:g} MiB {'chunked' if chunked else 'length'}"
                    await measure(d, kind, args.uploads, lambda d=d, p=pieces: exchange(d.port, p), 400)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for d in daemons:
            d.proc.terminate()
            await d.proc.wait()
    base = daemons[0]
    print(f"{'request':<28}{'tree':<24}{'p50 ms':>9}{'p95 ms':>9}{'CPU ms/req':>12}{'p50 ratio':>11}{'CPU ratio':>11}")
    for kind in base.times:
        for d in daemons:
            t = sorted(d.times[kind])
            p50, p95 = statistics.median(t) * 1e3, t[min(len(t) - 1, int(0.95 * len(t)))] * 1e3
            cpu = d.cpu[kind] / d.count[kind] * 1e3
            b50 = statistics.median(base.times[kind]) * 1e3
            bcpu = base.cpu[kind] / base.count[kind] * 1e3
            print(f"{kind:<28}{str(d.tree)[-23:]:<24}{p50:>9.1f}{p95:>9.1f}{cpu:>12.2f}{p50 / b50:>11.2f}"
                  f"{cpu / bcpu if bcpu else float('nan'):>11.2f}")


if __name__ == "__main__":
    asyncio.run(main())
