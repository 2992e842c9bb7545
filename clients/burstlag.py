#!/usr/bin/env python3
"""How much clients that send audio ahead of real time delay a real-time stream's finals.

A benchmark, not a test: for each burst it starts ``python -m streamer serve`` (the demo model unless
--model) on a free loopback port, starts the burst, and a second later streams --seconds of espeak-ng
speech at 1x real time beside it (100 ms messages over the native protocol). It prints that healthy
stream's final lag (from sending the audio that completes a final's last word to receiving the final),
median and largest, and the finals it lost against the same stream alone (the baseline, first row):

    native 55 s       --clients (3) clients each send 55 s of speech in one message (within
                      server.max_burst_s) and stay for their finals
    native 55 s /     the same 55 s in 100 ms messages, as fast as the connection takes them
    100 ms
    upload 1 h        --clients REST uploads (/v1/audio/transcriptions) of a FLAC of an hour of silence
    realtime clear    --clients Realtime sessions that append 5 s and clear the buffer, again and again

    python clients/burstlag.py
    python clients/burstlag.py --seconds 30 --bursts native,upload --set worker.ahead_batch_ms=50
    python clients/burstlag.py --clients 8                 # more clients per burst

The daemon's scheduler should give audio sent ahead of real time spare model time only: each burst's
lag within half a second of the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import HOST, Daemon, Healthy, healthy_stream, pcm16  # noqa: E402

from streamer.testing import speech_audio  # noqa: E402

BURST_S = 55.0
"""seconds each native burst sends at once (the default server.max_burst_s is 60)"""
UPLOAD_S = 3600.0
"""seconds of silence in each uploaded FLAC"""
APPEND_S = 5.0
"""seconds each Realtime append carries before its clear"""
LEAD_S = 1.0
"""how long the bursts run before the healthy stream starts"""

Burst = Callable[[Daemon, np.ndarray, asyncio.Event], Coroutine[Any, Any, None]]


async def native_burst(d: Daemon, audio: np.ndarray, stop: asyncio.Event) -> None:
    """One client: 55 s of speech (8 kHz) in one message, then its finals until ``stop``."""
    audio8 = soxr.resample(np.tile(audio, int(BURST_S * 16000 / len(audio)) + 1)[: int(BURST_S * 16000)], 16000, 8000)
    async with connect(d.url, max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "start", "sample_rate": 8000}))
        await ws.send(pcm16(audio8))
        await ws.send(json.dumps({"type": "stop"}))
        reading = asyncio.ensure_future(ws.recv())
        while not stop.is_set():
            done, _ = await asyncio.wait({reading, asyncio.ensure_future(stop.wait())},
                                         return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                reading.result()
                reading = asyncio.ensure_future(ws.recv())
        reading.cancel()


async def messages_burst(d: Daemon, audio: np.ndarray, stop: asyncio.Event) -> None:
    """One client: 55 s of speech in 100 ms messages, sent as fast as the connection takes them (the daemon reads
    each when it has fed the one before), then its finals until ``stop``."""
    pcm = pcm16(np.tile(audio, int(BURST_S * 16000 / len(audio)) + 1)[: int(BURST_S * 16000)])
    async with connect(d.url, max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "start"}))

        async def drain() -> None:
            async for _ in ws:
                pass

        reader = asyncio.create_task(drain())
        try:
            for i in range(0, len(pcm), 3200):
                await ws.send(pcm[i : i + 3200])
            await ws.send(json.dumps({"type": "stop"}))
            await stop.wait()
        finally:
            reader.cancel()


def silent_flac(seconds: float) -> bytes:
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, np.zeros(int(seconds * 16000), np.int16), 16000, format="FLAC", subtype="PCM_16")
    return out.getvalue()


async def upload_burst(d: Daemon, audio: np.ndarray, stop: asyncio.Event, flac: list[bytes] = []) -> None:  # noqa: B006
    """One REST upload of an hour of silence as FLAC; the connection is dropped at ``stop``."""
    if not flac:
        flac.append(silent_flac(UPLOAD_S))
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.flac\"\r\n"
            "Content-Type: audio/flac\r\n\r\n").encode() + flac[0] + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {HOST}:{d.port}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(HOST, d.port)
    try:
        writer.write(head + body)
        await writer.drain()
        reading = asyncio.ensure_future(reader.read())
        await asyncio.wait({reading, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        reading.cancel()
    finally:
        writer.close()


async def realtime_burst(d: Daemon, audio: np.ndarray, stop: asyncio.Event) -> None:
    """One Realtime session: append 5 s (24 kHz), clear, again until ``stop``; the events are read and dropped."""
    audio24 = soxr.resample(np.tile(audio, int(APPEND_S * 16000 / len(audio)) + 1)[: int(APPEND_S * 16000)],
                            16000, 24000)
    append = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(audio24)).decode()})
    clear = json.dumps({"type": "input_audio_buffer.clear"})
    async with connect(f"ws://{HOST}:{d.port}/v1/realtime?intent=transcription", max_size=None) as ws:

        async def drain() -> None:
            async for _ in ws:
                pass

        reader = asyncio.create_task(drain())
        try:
            while not stop.is_set():
                await ws.send(append)
                await ws.send(clear)
                await asyncio.sleep(0)
        finally:
            reader.cancel()


BURSTS: dict[str, tuple[str, Burst]] = {
    "native": (f"native {BURST_S:.0f} s", native_burst),
    "messages": (f"native {BURST_S:.0f} s / 100 ms", messages_burst),
    "upload": (f"upload {UPLOAD_S / 3600:.0f} h", upload_burst),
    "realtime": ("realtime clear", realtime_burst),
}


async def run_one(args: argparse.Namespace, audio: np.ndarray, burst: Burst | None) -> Healthy:
    d = Daemon(args, ["server.idle_timeout_s=300", *args.overrides])
    await d.start()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        if burst is not None:
            tasks = [asyncio.create_task(burst(d, audio, stop)) for _ in range(args.clients)]
            await asyncio.sleep(LEAD_S)
        return await healthy_stream(d.url, pcm16(audio), "healthy", args.seconds)
    finally:
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(result, ConnectionClosed | OSError):
                print(f"burstlag: a burst failed: {result!r}", file=sys.stderr)
        await d.stop()


def row(name: str, h: Healthy, base: Healthy | None) -> str:
    lags = h.lags or [float("nan")]
    p50, top = statistics.median(lags), max(lags)
    lost = sum(h.lost(base.finals)) if base is not None else 0
    vs = f"{p50 - statistics.median(base.lags or [float('nan')]):+8.2f}" if base is not None else f"{'':>8}"
    return f"{name:<20}{p50:>9.2f}{top:>9.2f}{vs}{len(h.finals):>8}{lost:>6}  {h.error or h.close}"


async def main_async(args: argparse.Namespace) -> int:
    audio = speech_audio(args.seconds)
    names = [b for b in args.bursts.split(",") if b]
    for b in names:
        if b not in BURSTS:
            raise SystemExit(f"burstlag: no burst {b!r}; choose from {', '.join(BURSTS)}")
    print(f"healthy stream: {args.seconds:g} s at 1x real time; final lag in seconds", flush=True)
    print(f"{'':<20}{'p50':>9}{'max':>9}{'p50 +':>8}{'finals':>8}{'lost':>6}  close", flush=True)
    t0 = time.monotonic()
    base = await run_one(args, audio, None)
    print(row("alone (baseline)", base, None), flush=True)
    for b in names:
        label, burst = BURSTS[b]
        print(row(f"{label} x{args.clients}", await run_one(args, audio, burst), base), flush=True)
    print(f"({time.monotonic() - t0:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="model for the daemon (default: demo)")
    p.add_argument("--seconds", type=float, default=20.0, help="healthy speech in seconds (default: 20)")
    p.add_argument("--bursts", default=",".join(BURSTS), help=f"which bursts (default: {','.join(BURSTS)})")
    p.add_argument("--clients", type=int, default=3, help="clients per burst (default: 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for the daemon")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds the daemon may take to listen")
    args = p.parse_args(argv)
    args.nofile = 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
