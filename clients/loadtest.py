#!/usr/bin/env python3
"""Load test a streamer daemon over loopback: latency, capacity and memory.

Starts ``streamer serve`` (or uses --url), then for N = 1, 2, 4, ... clients that each feed
speech at 1x real time, measures per word:

* partial latency: from sending the audio that completes a word to receiving the first event that shows it
* final latency:   from sending the audio that completes a final's last word to receiving that final
                   (finals close at an endpoint, so this is end of speech -> final; the earlier words of
                   an utterance were already shown by partials)

and reports median/p95, the largest N whose p95 final latency is <= --max-p95 (2 s), the
daemon's RSS per stream, and its RSS after --cycles connect/disconnect cycles.

    python clients/loadtest.py                                   # demo model, CPU
    python clients/loadtest.py --random-model xlsr-large --set model.dtype=bfloat16 --clients 8,16,32,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

from streamer.testing import RANDOM_SIZES, save_random_model, speech_audio

CHUNK_S = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running daemon (default: start one)")
    p.add_argument("--model", default="demo", help="model for the started daemon (default: demo)")
    p.add_argument("--random-model", choices=sorted(RANDOM_SIZES),
                   help="start the daemon with a random model of this size instead")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for the daemon")
    p.add_argument("--audio", help="speech file (default: generated with espeak-ng, --seconds long)")
    p.add_argument("--seconds", type=float, default=20.0, help="audio per client (default: 20)")
    p.add_argument("--clients", default="1,2,4,8,16,32,64",
                   help="client counts to try, in order; stops after the first over --max-p95 (default: %(default)s)")
    p.add_argument("--max-p95", type=float, default=2.0, help="p95 final latency limit in seconds (default: 2)")
    p.add_argument("--cycles", type=int, default=1000, help="connect/disconnect cycles for the leak check")
    p.add_argument("--json", help="write all figures here as JSON")
    return p.parse_args(argv)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class ClientResult:
    partial: list[float] = field(default_factory=list)
    final: list[float] = field(default_factory=list)
    words: int = 0
    ok: bool = True


async def one_client(url: str, pcm: bytes, delay: float) -> ClientResult:
    res = ClientResult()
    await asyncio.sleep(delay)
    step = int(16000 * CHUNK_S) * 2
    sent: list[tuple[float, float]] = []  # (audio seconds sent so far, wall time)

    def sent_at(t: float) -> float | None:
        for end, wall in sent:
            if end >= t - 1e-6:
                return wall
        return None

    async with connect(url, max_size=None) as ws:
        await ws.recv()

        async def sender() -> None:
            t0 = time.perf_counter()
            for i in range(0, len(pcm), step):
                await ws.send(pcm[i : i + step])
                sent.append(((i + len(pcm[i : i + step])) / 32000, time.perf_counter()))
                await asyncio.sleep(max(0.0, t0 + len(sent) * CHUNK_S - time.perf_counter()))
            await ws.send(json.dumps({"type": "stop"}))

        task = asyncio.create_task(sender())
        seen_partial_end = -1.0
        async for raw in ws:
            now = time.perf_counter()
            ev = json.loads(raw)
            if ev["type"] == "partial" and ev["words"]:
                for w in ev["words"]:
                    if w["end"] > seen_partial_end + 1e-6 and (s := sent_at(w["end"])) is not None:
                        res.partial.append(now - s)
                        seen_partial_end = w["end"]
            elif ev["type"] == "final" and ev["words"]:
                if (s := sent_at(ev["words"][-1]["end"])) is not None:
                    res.final.append(now - s)
                res.words += len(ev["words"])
                for w in ev["words"]:
                    if w["end"] > seen_partial_end:  # a word first shown in its final
                        if (s := sent_at(w["end"])) is not None:
                            res.partial.append(now - s)
                        seen_partial_end = w["end"]
            elif ev["type"] == "error":
                res.ok = False
        await task
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


async def run_level(url: str, pcm: bytes, n: int, pid: int | None) -> dict:
    peak = [rss_mb(pid) if pid else float("nan")]

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.25)
            if pid:
                peak.append(rss_mb(pid))

    sampler = asyncio.create_task(sample())
    rng = np.random.default_rng(n)
    results = await asyncio.gather(*(one_client(url, pcm, float(rng.uniform(0, 1.0))) for _ in range(n)))
    sampler.cancel()
    partial = [x for r in results for x in r.partial]
    final = [x for r in results for x in r.final]
    return {
        "clients": n, "ok": all(r.ok for r in results), "words": sum(r.words for r in results),
        "partial_median": pct(partial, 50), "partial_p95": pct(partial, 95),
        "final_median": pct(final, 50), "final_p95": pct(final, 95), "peak_rss_mb": max(peak),
    }


async def cycles(url: str, pcm: bytes, count: int) -> None:
    sem = asyncio.Semaphore(16)

    async def once(i: int) -> None:
        async with sem, connect(url, max_size=None) as ws:
            await ws.recv()
            await ws.send(pcm[: 16000 * 2 // 2])  # 0.5 s
            if i % 2:
                await ws.send(json.dumps({"type": "stop"}))
                async for _ in ws:
                    pass
            # else: drop the connection with audio in flight

    await asyncio.gather(*(once(i) for i in range(count)))


async def start_daemon(args: argparse.Namespace, model: str) -> tuple[asyncio.subprocess.Process, str]:
    cmd = [sys.executable, "-m", "streamer", "serve", "--model", model, "--port", "0",
           "--set", "server.max_streams=1024", "--set", "server.idle_timeout_s=120"]
    for o in args.overrides:
        cmd += ["--set", o]
    proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    while True:
        line = (await proc.stderr.readline()).decode()
        if not line:
            raise SystemExit("loadtest: the daemon exited before listening")
        if line.startswith("streamer: listening on "):
            url = line.split()[3].rstrip(",")
            break

    async def drain() -> None:
        assert proc.stderr is not None
        while await proc.stderr.readline():
            pass

    asyncio.get_running_loop().create_task(drain())
    return proc, url


def load_audio(args: argparse.Namespace) -> np.ndarray:
    if args.audio:
        import soundfile as sf
        import soxr

        data, rate = sf.read(args.audio, dtype="float32", always_2d=True)
        return soxr.resample(data.mean(axis=1), rate, 16000)[: int(args.seconds * 16000)]
    return speech_audio(args.seconds)


async def main_async(args: argparse.Namespace) -> int:
    audio = load_audio(args)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    proc = None
    tmp = None
    try:
        if args.url:
            url, pid = args.url, None
        else:
            model = args.model
            if args.random_model:
                tmp = tempfile.TemporaryDirectory()
                model = str(save_random_model(args.random_model, tmp.name))
            proc, url = await start_daemon(args, model)
            pid = proc.pid
        idle = rss_mb(pid) if pid else float("nan")
        print(f"daemon {url}  idle RSS {idle:.0f} MB; {len(audio) / 16000:.1f} s of speech per client at 1x real time")
        print(f"{'clients':>8}{'partial p50':>13}{'p95':>8}{'final p50':>11}{'p95':>8}{'words':>8}{'RSS MB':>9}")
        levels = []
        for n in [int(x) for x in args.clients.split(",")]:
            lv = await run_level(url, pcm, n, pid)
            levels.append(lv)
            print(f"{n:>8}{lv['partial_median']:>13.3f}{lv['partial_p95']:>8.3f}{lv['final_median']:>11.3f}"
                  f"{lv['final_p95']:>8.3f}{lv['words']:>8}{lv['peak_rss_mb']:>9.0f}", flush=True)
            if not lv["ok"] or not lv["final_p95"] <= args.max_p95:
                break
        good = [lv for lv in levels if lv["ok"] and lv["final_p95"] <= args.max_p95]
        best = good[-1]["clients"] if good else 0
        summary: dict = {"levels": levels, "max_clients_p95_ok": best, "idle_rss_mb": idle}
        print(f"\nlargest N with p95 final latency <= {args.max_p95:.1f} s: {best}"
              + ("" if len(good) < len(levels) else " (limit not reached: try more clients)"))
        if pid and good:
            per = (good[-1]["peak_rss_mb"] - idle) / max(1, best)
            summary["rss_per_stream_mb"] = per
            print(f"RSS per stream: {per:.1f} MB (peak at N={best} minus idle, divided by N)")
        if args.cycles:
            before = rss_mb(pid) if pid else float("nan")
            t0 = time.perf_counter()
            await cycles(url, pcm, args.cycles)
            await asyncio.sleep(1.0)
            after = rss_mb(pid) if pid else float("nan")
            summary.update(cycles=args.cycles, rss_before_cycles_mb=before, rss_after_cycles_mb=after)
            print(f"{args.cycles} connect/disconnect cycles in {time.perf_counter() - t0:.1f} s: "
                  f"RSS {before:.0f} MB -> {after:.0f} MB")
        if args.json:
            await asyncio.to_thread(Path(args.json).write_text, json.dumps(summary, indent=2))
        return 0
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
