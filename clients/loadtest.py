#!/usr/bin/env python3
"""Load test a streamer daemon over loopback: latency, capacity and memory.

Starts ``streamer serve`` (or uses --url), then for N = 1, 2, 4, ... clients that each feed
speech at 1x real time, measures per word:

* partial latency: from sending the audio that completes a word to receiving the first event that shows it
                   (the word of a final: the first partial or final with that word at that place,
                   ``streamer.scoring.words_shown``; a misread or a word not yet shown does not count),
                   also apart for the words that end in the first 1.5 s of a stream (before the first full
                   window, only early partials can show them) and for the rest
* final latency:   from sending the audio that completes a final's last word to receiving that final
                   (finals close at an endpoint, so this is end of speech -> final; the earlier words of
                   an utterance were already shown by partials)

and reports median/p95, the largest N whose p95 final latency is <= --max-p95 (2 s), the model seconds
per audio second (from the daemon's /metrics), the daemon's RSS per stream, and its RSS after --cycles
connect/disconnect cycles. Beside the clients, a probe connection pings the daemon every 100 ms: the
ping's round trip is how long the daemon's event loop took to get to it (its lag under that load).

--profile N samples the daemon (with py-spy, every process of it) during the level of N clients and prints a
profile summary per daemon: the share of samples of each thread (event loop, engine thread, model thread)
and, within it, of each kind of work (websocket frames, word-list search, CTC merge, model, ...).

--procs P spreads each level's clients over P client processes (one asyncio process caps out at a few
dozen streams, long before a daemon with several front-end processes); their figures are merged as if
one process had measured them. Each stream's ``ready`` names the server process that serves it
(``server_pid``), and each level reports how many streams each server process served.

--commands N then plays N voice-command streams (one espeak-ng command of 1-2 s, then ``stop``, as Home
Assistant or a push-to-talk client does), --command-clients at a time, and reports the time from stream
start to the first partial, from the end of the first word (the final's word time) to the first text and to
the first partial that has the right first word, and from ``stop`` to the final.

--compare SET starts a further daemon with one more --set (repeat it for more) and runs every level and the
commands on each, one after the other (never at the same time), for a side-by-side table:

    python clients/loadtest.py                                   # demo model, CPU
    python clients/loadtest.py --random-model xlsr-large --set model.dtype=bfloat16 --clients 8,16,32,64
    python clients/loadtest.py --clients 1,2,4 --seconds 15 --commands 20 --cycles 0 \
        --compare stream.early_partials=false                    # early partials on vs off
    python clients/loadtest.py --clients 1,2,8,16,24 --seconds 15 --cycles 0 \
        --compare stream.refresh_interval_ms=0                   # partial refreshes on vs off
    python clients/loadtest.py --url ws://lb:8765/v1/stream --procs 8 --clients 64,128,256 --cycles 0
    python clients/loadtest.py --clients 32,64 --cycles 0 --finals-only  # clients that ask for finals only
    python clients/loadtest.py --clients 32,64 --cycles 0 --message-ms 20  # 20 ms a message, as a phone call's

The front end's own CPU with a trained model's outputs (the demo model's word list and LM at work) on a machine
with no GPU: --model-server starts the model in a model server that answers windows it has seen from memory
(every client sends the same speech), on the CPUs the daemon does not use, and the daemons send their windows to
it (the ``CPU/audio``, ``loop`` and ``engine`` columns are the daemon's CPU seconds per audio second per stream:
all of it, its event loop's, its engine thread's):

    python clients/loadtest.py --model demo --model-server .venv-triton/bin/python --daemon-cpus 0 \
        --clients 1,8,32,64 --cycles 0 --compare "decoder.words='';decoder.lm=''"   # vs greedy

--rolling runs a rolling restart instead of the levels: two daemons behind HAProxy (deploy/haproxy.cfg, the
``haproxy`` command), --rolling-clients streams (16) through it, each streaming --seconds of speech at 1x, then
``stop``, then again, their starts spread over one stream's length; once they all run, each daemon in turn gets
SIGTERM, is waited for, started again on its ports and waited for until HAProxy has it up. It reports the streams
that ended whole (closed 1000 after their stop), those cut (closed otherwise, or failed, before their end), the
reconnects after a cut, the connections refused, HAProxy's retries and redispatches, and how long each daemon took
to stop. With --compare, each variant does the whole restart in turn:

    python clients/loadtest.py --rolling --seconds 20 --compare server.drain_timeout_s=0   # drain on vs off
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from streamer.scoring import words_shown
from streamer.testing import RANDOM_SIZES, espeak_audio, proc_cpu_seconds, save_random_model, speech_audio

ROOT = Path(__file__).resolve().parents[1]
"""the repository (its deploy/ files; a model server started here runs its package)"""
CHUNK_S = 0.1
EARLY_S = 1.5
"""words ending before this many seconds of a stream are reported apart (the first full window needs 1.4 s)"""
COMMANDS = ["turn on the kitchen lights", "what time is it", "set a timer for ten minutes", "play some music",
            "turn off the bedroom lights", "what is the weather like", "open the garage door", "stop the music"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running daemon (default: start one)")
    p.add_argument("--daemon-pid", type=int, metavar="PID",
                   help="with --url: the daemon's process, for its CPU (event loop, engine thread) and memory figures")
    p.add_argument("--model", default="demo", help="model for the started daemon (default: demo)")
    p.add_argument("--random-model", choices=sorted(RANDOM_SIZES),
                   help="start the daemon with a random model of this size instead")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for the daemon")
    p.add_argument("--audio", help="speech file (default: generated with espeak-ng, --seconds long)")
    p.add_argument("--seconds", type=float, default=20.0, help="audio per client (default: 20)")
    p.add_argument("--finals-only", action="store_true",
                   help='the clients ask for finals only ({"type": "start", "partials": false}), as a voice agent or '
                   "a transcript writer does: the daemon then forms no partials for them")
    p.add_argument("--message-ms", type=float, default=CHUNK_S * 1000, metavar="MS",
                   help="audio per message each client sends, in the levels, the voice commands and --rolling "
                   "(default: %(default)g; a phone call's media comes 20 ms a message)")
    p.add_argument("--clients", default="1,2,4,8,16,32,64",
                   help="client counts to try, in order; stops after the first over --max-p95 (default: %(default)s)")
    p.add_argument("--max-p95", type=float, default=2.0, help="p95 final latency limit in seconds (default: 2)")
    p.add_argument("--cycles", type=int, default=1000, help="connect/disconnect cycles for the leak check")
    p.add_argument("--commands", type=int, default=0, help="voice-command streams to play after the levels")
    p.add_argument("--command-clients", type=int, default=2,
                   help="command streams open at a time (default: %(default)s)")
    p.add_argument("--compare", metavar="SECTION.KEY=VALUE[;...]", action="append", default=[],
                   help="also run a daemon with this extra --set, or several joined by ';' (repeatable: one daemon "
                   "each), level by level, and print all side by side")
    p.add_argument("--procs", type=int, default=1,
                   help="client processes each level's clients are spread over (default: %(default)s)")
    p.add_argument("--profile", type=int, metavar="N",
                   help="sample the daemon's processes with py-spy during the level of N clients and print where "
                   "their CPU time went (needs py-spy: pip install py-spy; ptrace allowed)")
    p.add_argument("--rolling", action="store_true",
                   help="a rolling restart of two daemons behind HAProxy under load, instead of the levels")
    p.add_argument("--rolling-clients", type=int, default=16, help="streams at once during --rolling (default: 16)")
    p.add_argument("--daemon-cpus", metavar="LIST", type=cpu_list,
                   help="run the started daemons on these CPUs only (e.g. 0 or 0-3), and this process and its "
                   "client processes on the others, so that the clients' CPU is not the daemon's (a model server "
                   "the daemon starts shares its CPUs: start one apart, streamer model-server, to measure the "
                   "front end alone)")
    p.add_argument("--model-server", metavar="PYTHON",
                   help="start streamer model-server --memo with this interpreter (one with "
                   "streamer[triton-server]) on the CPUs the daemons do not use (--daemon-cpus), and send every "
                   "daemon's windows to it: the front end's own CPU with the model's real outputs, on a machine "
                   "that cannot compute them for many streams (every client sends the same speech, so after the "
                   "first stream each window is answered from memory)")
    p.add_argument("--json", help="write all figures here as JSON")
    args = p.parse_args(argv)
    if not args.message_ms > 0:
        p.error(f"--message-ms must be over 0 (got {args.message_ms:g})")
    return args


def compared(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The daemons of ``--compare``: each one's name (its keys without their sections) and its ``--set`` list."""
    out = []
    for extra in args.compare:
        sets = [s.strip() for s in extra.split(";") if s.strip()]
        out.append((" ".join(s.split(".", 1)[-1] for s in sets), [*args.overrides, *sets]))
    return out


def cpu_list(text: str) -> set[int]:
    """CPUs written as taskset writes them: ``0``, ``0,2``, ``0-3``."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list like 0 or 0,2 or 0-3") from None
    if not cpus <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"this process may run on CPUs {sorted(os.sched_getaffinity(0))} only")
    if cpus == os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError("leave at least one CPU for the clients")
    return cpus


def tree(pid: int, without: str = "") -> list[int]:
    """``pid`` and its descendants (a daemon with --processes N runs its front-ends as child processes); with
    ``without``, less the processes whose command line holds it and their descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if without:
            try:
                if without.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                    continue
            except OSError:
                continue
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_mb(pid: int) -> float:
    """The resident memory of ``pid`` and its descendants, MB."""
    total = 0.0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total or float("nan")


@dataclass
class ClientResult:
    partial: list[tuple[float, float]] = field(default_factory=list)
    """(word end in stream seconds, latency) per word"""
    final: list[float] = field(default_factory=list)
    words: int = 0
    ok: bool = True
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """(wall time received, event) of every partial and final"""
    started: float = float("nan")
    """wall time the first audio was sent"""
    stopped: float = float("nan")
    """wall time ``stop`` was sent"""
    sent: list[tuple[float, float]] = field(default_factory=list)
    """(audio seconds sent so far, wall time) after each chunk"""
    process: int = field(default_factory=os.getpid)
    """the client process that ran it (--procs)"""
    closed: str = ""
    """why its connection closed before the stream ended ('' if it did not)"""
    server: str = "?"
    """the server process that served the stream (``server_pid`` of its ``ready``, with the address it
    connected to when the daemon does not say)"""

    def sent_at(self, t: float) -> float | None:
        """Wall time the audio up to stream second ``t`` had been sent."""
        for end, wall in self.sent:
            if end >= t - 1e-6:
                return wall
        return None


def server_of(ready: dict[str, Any], headers: object) -> str:
    """Which server process a stream landed on: the ``ready`` message's ``server_pid``, else the handshake's
    ``X-Streamer-Pid`` header (a daemon with several front-end processes sends both), else unknown."""
    pid = ready.get("server_pid")
    if pid is not None:
        return f"pid {pid}"
    get = getattr(headers, "get", None)
    value = get("X-Streamer-Pid") if get is not None else None
    return f"pid {value}" if value else "?"


async def one_client(url: str, pcm: bytes, delay: float, start: dict[str, Any] | None = None,
                     chunk_s: float = CHUNK_S) -> ClientResult:
    """One client streaming ``pcm`` at real time in messages of ``chunk_s`` after ``delay`` s (``start``: its start
    message, if any)."""
    res = ClientResult()
    await asyncio.sleep(delay)
    step = int(16000 * chunk_s) * 2
    sent = res.sent
    sent_at = res.sent_at

    async with connect(url, max_size=None) as ws:
        res.server = server_of(json.loads(await ws.recv()), ws.response.headers if ws.response else {})
        if start is not None:
            await ws.send(json.dumps(start))

        async def sender() -> None:
            t0 = res.started = time.perf_counter()
            for i in range(0, len(pcm), step):
                await ws.send(pcm[i : i + step])
                sent.append(((i + len(pcm[i : i + step])) / 32000, time.perf_counter()))
                await asyncio.sleep(max(0.0, t0 + len(sent) * chunk_s - time.perf_counter()))
            res.stopped = time.perf_counter()
            await ws.send(json.dumps({"type": "stop"}))

        task = asyncio.create_task(sender())
        try:
            async for raw in ws:
                now = time.perf_counter()
                ev = json.loads(raw)
                if ev["type"] in ("partial", "final"):
                    res.events.append((now, ev))
                if ev["type"] == "final" and ev["words"]:
                    if (s := sent_at(ev["words"][-1]["end"])) is not None:
                        res.final.append(now - s)
                    res.words += len(ev["words"])
                elif ev["type"] == "error":
                    res.ok = False
            await task
        except ConnectionClosed as exc:  # (an overloaded daemon, or this process: the level fails, the run goes on)
            res.ok = False
            res.closed = str(exc)
            task.cancel()
    timeline = [(t, ev["type"] == "final", [(w["word"], w["start"], w["end"]) for w in ev["words"]])
                for t, ev in res.events]
    for end, at in words_shown(timeline):  # each final word: first shown (same word, same place) -> partial latency
        if (s := sent_at(end)) is not None:
            res.partial.append((end, at - s))
    return res


@dataclass
class CommandResult:
    """One command stream: seconds from start to the first partial, from the first word's end to the first
    text and to the first partial whose first word is the final's, and from ``stop`` to the final."""

    first_partial: float = float("nan")
    first_text: float = float("nan")
    right_word: float = float("nan")
    final: float = float("nan")
    ok: bool = True


def command_result(res: ClientResult) -> CommandResult:
    """Read a command stream's figures from its events (word times of the final are the truth)."""
    out = CommandResult(ok=res.ok)
    finals = [(t, ev) for t, ev in res.events if ev["type"] == "final" and ev["words"]]
    texts = [(t, ev) for t, ev in res.events if ev["text"]]
    if not finals or not texts:
        out.ok = False
        return out
    first_word = finals[0][1]["words"][0]
    word_sent = res.sent_at(first_word["end"])
    out.first_partial = texts[0][0] - res.started
    if word_sent is not None:
        out.first_text = texts[0][0] - word_sent
        right = [t for t, ev in texts if ev["words"] and ev["words"][0]["word"] == first_word["word"]]
        out.right_word = right[0] - word_sent
    # a final that came before stop (an endpoint in the command) waited for nothing: 0
    out.final = max(0.0, finals[-1][0] - res.stopped)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


def run_clients(url: str, pcm: bytes, delays: list[float], start: dict[str, Any] | None = None,
                chunk_s: float = CHUNK_S) -> list[ClientResult]:
    """A client process's share of a level: one streaming client per delay, in one event loop."""
    async def clients() -> list[ClientResult]:
        return list(await asyncio.gather(*(one_client(url, pcm, d, start, chunk_s) for d in delays)))

    return asyncio.run(clients())


def warm() -> int:
    """Nothing: makes a pool process start (and import this module) before the first level."""
    return os.getpid()


async def probe(url: str, out: list[float], interval: float = 0.1) -> None:
    """Ping the daemon every ``interval`` s on a stream connection that sends no audio; ``out`` gets each round
    trip. The daemon answers pings on its event loop, so a late answer is a busy loop (the lag a client sees)."""
    try:
        async with connect(url, max_size=None) as ws:
            await ws.recv()
            while True:
                t0 = time.perf_counter()
                await (await ws.ping())
                out.append(time.perf_counter() - t0)
                await asyncio.sleep(interval)
    except (OSError, ConnectionError, TimeoutError):  # the level is over or the daemon closed it: enough
        pass


async def run_level(url: str, pcm: bytes, n: int, pid: int | None, pool: ProcessPoolExecutor | None = None,
                    procs: int = 1, start: dict[str, Any] | None = None, chunk_s: float = CHUNK_S) -> dict[str, Any]:
    """``n`` clients (over ``procs`` processes of ``pool``), each starting after 0-1 s and sending ``chunk_s`` of
    audio a message (``start``: the start message each sends); their merged figures."""
    from websockets.exceptions import ConnectionClosed

    peak = [rss_mb(pid) if pid else float("nan")]

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.25)
            if pid:
                peak.append(rss_mb(pid))

    sampler = asyncio.create_task(sample())
    pings: list[float] = []
    pinger = asyncio.create_task(probe(url, pings))
    rng = np.random.default_rng(n)
    delays = [float(x) for x in rng.uniform(0, 1.0, n)]
    try:
        if pool is None or procs <= 1:
            results = list(await asyncio.gather(*(one_client(url, pcm, d, start, chunk_s) for d in delays)))
        else:
            loop = asyncio.get_running_loop()
            shares = [delays[i::procs] for i in range(procs) if delays[i::procs]]
            parts = await asyncio.gather(*(loop.run_in_executor(pool, run_clients, url, pcm, share, start, chunk_s)
                                           for share in shares))
            results = [r for part in parts for r in part]
    finally:
        sampler.cancel()
        pinger.cancel()
        try:
            await pinger
        except (asyncio.CancelledError, ConnectionClosed):
            pass
    return level_figures(n, results, pings, max(peak))


def level_figures(n: int, results: list[ClientResult], pings: list[float], peak_rss: float) -> dict[str, Any]:
    """The figures of one level from every client's result, wherever it ran."""
    partial = [x for r in results for _, x in r.partial]
    early = [x for r in results for end, x in r.partial if end <= EARLY_S]
    later = [x for r in results for end, x in r.partial if end > EARLY_S]
    final = [x for r in results for x in r.final]
    return {
        "clients": n, "ok": all(r.ok for r in results), "failed": sum(not r.ok for r in results),
        "closed": sorted({r.closed for r in results if r.closed}), "words": sum(r.words for r in results),
        "partial_median": pct(partial, 50), "partial_p95": pct(partial, 95),
        "partial_first_median": pct(early, 50), "partial_first_p95": pct(early, 95),
        "partial_rest_median": pct(later, 50), "partial_rest_p95": pct(later, 95),
        "final_median": pct(final, 50), "final_p95": pct(final, 95), "peak_rss_mb": peak_rss,
        "ping_median": pct(pings, 50), "ping_p95": pct(pings, 95), "ping_max": max(pings, default=float("nan")),
        "servers": dict(Counter(r.server for r in results)),
        "client_processes": len({r.process for r in results}),
    }


PROFILE_KINDS = [  # (label, path fragments); a sample counts for the kind of its innermost frame that has one
    ("word-list search (flashlight)", ("streamer/lexicon.py", "streamer/lm.py")),
    ("engine: CTC merge, endpoints, events", ("streamer/engine.py", "streamer/ctc.py", "streamer/endpoint.py")),
    ("model", ("streamer/onnx.py", "streamer/runner.py", "streamer/model.py", "streamer/triton", "torch/",
               "tritonclient/", "grpc/")),
    ("voice-activity detector", ("streamer/vad.py", "onnxruntime/")),
    ("audio decoding / resampling", ("streamer/audio.py",)),
    ("events to JSON, hub, MQTT", ("streamer/events.py", "streamer/aio/hub.py", "streamer/outbox.py",
                                   "streamer/aio/mqtt/", "json/", "aiomqtt/", "paho/")),
    ("metrics", ("streamer/aio/metrics.py", "prometheus_client/")),
    ("websocket frames and handshakes", ("websockets/",)),
    ("asyncio, sockets", ("asyncio/", "selectors.py", "socket.py")),
]


def profile_summary(raw: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """py-spy's raw (collapsed) samples: the share of each thread, and within it the share of each kind of work.

    Only samples of running threads count (py-spy leaves idle ones out): the shares say where the CPU went.
    The engine thread is ``streamer-engine``, the model thread ``streamer-model``, the event loop ``MainThread``.
    """
    threads: Counter[str] = Counter()
    kinds: dict[str, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")  # [process ...;] thread (ID): NAME; frames, outermost first
        at = next((i for i, f in enumerate(parts) if f.startswith("thread (")), -1)
        name = parts[at].split(": ", 1)[-1] if at >= 0 else "?"
        frames = ";".join(parts[at + 1 :])
        thread = "event loop" if "MainThread" in name else name.rstrip("_0123456789") or "?"
        n = int(count)
        threads[thread] += n
        kind = next((label for f in reversed(frames.split(";")) for label, keys in PROFILE_KINDS
                     if any(k in f for k in keys)), "other")
        kinds.setdefault(thread, Counter())[kind] += n
    total = sum(threads.values()) or 1
    return ({t: n / total for t, n in threads.most_common()},
            {t: {k: n / total for k, n in kinds[t].most_common()} for t in threads})


async def profile_daemon(pid: int, seconds: float) -> str:
    """Record the daemon (and its front-end processes) with py-spy for ``seconds``; the raw samples."""
    out = Path(tempfile.mkdtemp()) / "profile.txt"
    beside = Path(sys.executable).with_name("py-spy")  # a venv's, when it is not activated (not on PATH)
    py_spy = shutil.which("py-spy") or (str(beside) if beside.exists() else "py-spy")
    proc = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), "--subprocesses", "--threads", "--nonblocking", "--rate", "100",
        "--duration", str(max(1, int(seconds))), "--format", "raw", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        print(f"loadtest: py-spy failed: {err.decode().strip()[-300:]}", file=sys.stderr)
        return ""
    text = out.read_text()
    out.unlink()
    out.parent.rmdir()
    return text


def print_profile(name: str, n: int, raw: str) -> dict[str, Any]:
    threads, kinds = profile_summary(raw)
    print(f"\nprofile of {name} at {n} clients (share of the CPU samples of its processes):")
    for thread, share in threads.items():
        print(f"  {thread:<40}{share:7.1%}")
        for kind, k in kinds[thread].items():
            if k >= 0.005:
                print(f"      {kind:<36}{k:7.1%}")
    return {"threads": threads, "kinds": kinds}


def command_audio() -> list[bytes]:
    """:data:`COMMANDS` in three voices, as s16le PCM."""
    out = []
    for i, text in enumerate(COMMANDS):
        audio = espeak_audio(text, voice=["en-us", "en", "en-gb-x-rp"][i % 3], speed=160)
        out.append((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return out


async def run_commands(url: str, commands: list[bytes], n: int, clients: int, chunk_s: float = CHUNK_S
                       ) -> dict[str, Any]:
    """``n`` command streams, ``clients`` open at a time, each one command then ``stop``.

    Each command starts after 0-0.5 s of silence (the same for every daemon compared), so where its first
    word ends falls anywhere between two provisional windows, as it does for a real speaker.
    """
    sem = asyncio.Semaphore(clients)
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.5, n)
    leads = [bytes(2 * int(16000 * x)) for x in rng.uniform(0, 0.5, n)]

    async def once(i: int) -> CommandResult:
        async with sem:
            pcm = leads[i] + commands[i % len(commands)]
            return command_result(await one_client(url, pcm, float(delays[i]), chunk_s=chunk_s))

    results = await asyncio.gather(*(once(i) for i in range(n)))
    good = [r for r in results if r.ok]
    out: dict[str, Any] = {"commands": n, "ok": len(good)}
    for name in ("first_partial", "first_text", "right_word", "final"):
        values = [getattr(r, name) for r in good if not np.isnan(getattr(r, name))]
        out[f"{name}_median"], out[f"{name}_p95"] = pct(values, 50), pct(values, 95)
    return out


def cpu_seconds(pid: int | None) -> dict[str, float]:
    """CPU time the daemon process used so far (user + system): less disturbed by other load than wall time. In
    all, and its front end's alone: less a model server it started (``model_server.kind``) and its Triton."""
    if not pid:
        return {}

    def seconds(stat: Path) -> float:
        """user + system CPU of a process's or thread's ``stat`` file (0 once it is gone)"""
        try:
            return proc_cpu_seconds(stat)
        except OSError:
            return 0.0

    def ticks(pids: list[int]) -> float:
        return sum(seconds(Path(f"/proc/{p}/stat")) for p in pids)

    front = tree(pid, without="model-server")
    loop = engine = 0.0
    for p in front:  # by thread: each process's event loop is its main thread; the engine thread names itself
        loop += seconds(Path(f"/proc/{p}/task/{p}/stat"))
        for task in Path(f"/proc/{p}").glob("task/[0-9]*"):
            try:
                name = (task / "comm").read_text().strip()
            except OSError:
                continue
            if name == "streamer-engine":
                engine += seconds(task / "stat")
    return {"cpu_seconds": ticks(tree(pid)), "front_cpu_seconds": ticks(front), "loop_cpu_seconds": loop,
            "engine_cpu_seconds": engine}


def read_metrics(url: str, pid: int | None = None) -> dict[str, float]:
    """The daemon's counters that the figures need, from /metrics on the websocket's port (and /proc)."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    names = ("streamer_model_seconds_total", "streamer_audio_seconds_total", "streamer_provisional_windows_total",
             "streamer_provisional_model_seconds_total", "streamer_windows_total",
             'streamer_refresh_windows_total{outcome="run"}', 'streamer_refresh_windows_total{outcome="skipped"}')
    try:
        with urllib.request.urlopen(f"{scheme}://{parts.netloc}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            key = name.removeprefix("streamer_").replace('_total{outcome="', "_").removesuffix('"}')
            values[key.removesuffix("_total")] = float(value)
    return values | cpu_seconds(pid)


def cost(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Model (and daemon CPU) seconds per audio second, the provisional windows' share, between two readings."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    audio = d.get("audio_seconds", 0.0)
    return {
        "model_s_per_audio_s": d["model_seconds"] / audio if audio else float("nan"),
        "cpu_s_per_audio_s": d["cpu_seconds"] / audio if audio and "cpu_seconds" in d else float("nan"),
        "front_cpu_s_per_audio_s": (d["front_cpu_seconds"] / audio if audio and "front_cpu_seconds" in d
                                    else float("nan")),
        "loop_cpu_s_per_audio_s": d["loop_cpu_seconds"] / audio if audio and "loop_cpu_seconds" in d else float("nan"),
        "engine_cpu_s_per_audio_s": (d["engine_cpu_seconds"] / audio if audio and "engine_cpu_seconds" in d
                                     else float("nan")),
        "provisional_windows": d.get("provisional_windows", float("nan")),
        "provisional_model_s": d.get("provisional_model_seconds", float("nan")),
        "windows": d.get("windows", float("nan")), "audio_s": audio,
        "refresh_run": d.get("refresh_windows_run", 0.0), "refresh_skipped": d.get("refresh_windows_skipped", 0.0),
    } if "model_seconds" in d else {}


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


async def start_daemon(args: argparse.Namespace, model: str, overrides: list[str], port: int = 0
                       ) -> tuple[asyncio.subprocess.Process, str]:
    cmd = [sys.executable, "-m", "streamer", "serve", "--model", model, "--port", str(port),
           "--set", "server.max_streams=1024", "--set", "server.idle_timeout_s=120"]
    for o in overrides:
        cmd += ["--set", o]
    cpus = args.daemon_cpus
    proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE,
                                                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
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


MODEL_SERVER_START_S = 300.0
"""how long Triton may take to load the model and answer"""
MEMO_WINDOWS = 16384
"""windows the started model server keeps (minutes of one speech at every window length a stream cuts)"""


@dataclass
class ModelServer:
    """The model server ``--model-server`` started: its process, gRPC port, and the task that reads its log."""

    proc: asyncio.subprocess.Process
    port: int
    log: asyncio.Future[None] | None = None


async def start_model_server(python: str, model: str) -> ModelServer:
    """``streamer model-server --memo`` for ``model`` on this process's CPUs (not the daemons'), once it answers. It
    runs this checkout's package (the repository is its working directory)."""
    ports = [free_port() for _ in range(3)]
    cmd = [python, "-m", "streamer", "-v", "model-server", "--model", model, "--device", "cpu", "--memo",
           str(MEMO_WINDOWS), "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port",
           str(ports[2])]
    try:
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise SystemExit(f"loadtest: cannot run --model-server {python!r}: {exc.strerror or exc}") from None
    assert proc.stderr is not None
    tail: list[str] = []
    try:
        async with asyncio.timeout(MODEL_SERVER_START_S):
            while line := (await proc.stderr.readline()).decode(errors="replace"):
                tail = [*tail[-20:], line.rstrip()]
                if line.startswith("streamer model-server: "):  # its ready line
                    break
    except TimeoutError:
        pass
    server = ModelServer(proc, ports[0])
    if proc.returncode is not None or not tail or not tail[-1].startswith("streamer model-server: "):
        await stop_model_server(server)
        raise SystemExit("loadtest: the model server did not start (with a python that has "
                         "streamer[triton-server]?); its last lines:\n  " + "\n  ".join(tail))
    print(f"model server {tail[-1].split(': ', 1)[1]}, answering windows it has seen from memory")

    async def drain() -> None:  # its log, kept for the memo's figures at the end
        assert proc.stderr is not None
        while line := (await proc.stderr.readline()).decode(errors="replace"):
            if "the memo answered" in line:
                print(f"model server: {line.split(': ', 1)[-1].strip()}")

    server.log = asyncio.ensure_future(drain())
    return server


async def stop_model_server(server: ModelServer) -> None:
    """SIGTERM the model server's session (Triton and its proxies too); SIGKILL what is left after 30 s."""
    proc = server.proc
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    if server.log is not None:
        await asyncio.wait_for(server.log, 5)


def load_audio(args: argparse.Namespace) -> np.ndarray:
    if args.audio:
        import soundfile as sf
        import soxr

        data, rate = sf.read(args.audio, dtype="float32", always_2d=True)
        return np.asarray(soxr.resample(data.mean(axis=1), rate, 16000), dtype=np.float32)[: int(args.seconds * 16000)]
    return speech_audio(args.seconds)


@dataclass
class Target:
    """One daemon under test and its figures."""

    name: str
    url: str
    proc: asyncio.subprocess.Process | None = None
    idle: float = float("nan")
    levels: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    """the capacity search went over --max-p95 (or failed): no more levels"""
    summary: dict[str, Any] = field(default_factory=dict)
    profile: tuple[int, str] | None = None
    """(clients, py-spy's raw samples) of the level --profile asked for"""
    given_pid: int | None = None
    """a running daemon's process (``--daemon-pid``)"""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self.given_pid


LEVEL_HEAD = (f"{'':<22}{'clients':>8}{'partial p50':>13}{'p95':>7}{'first 1.5 s p50':>17}{'p95':>7}"
              f"{'rest p50':>10}{'p95':>7}{'final p50':>11}{'p95':>7}{'words':>7}{'RSS MB':>8}{'CPU/audio':>10}"
              f"{'loop':>8}{'engine':>8}{'ping p95':>10}{'refreshed':>11}")


def level_row(name: str, lv: dict[str, Any]) -> str:
    return (f"{name:<22}{lv['clients']:>8}{lv['partial_median']:>13.3f}{lv['partial_p95']:>7.3f}"
            f"{lv['partial_first_median']:>17.3f}{lv['partial_first_p95']:>7.3f}{lv['partial_rest_median']:>10.3f}"
            f"{lv['partial_rest_p95']:>7.3f}{lv['final_median']:>11.3f}{lv['final_p95']:>7.3f}{lv['words']:>7}"
            f"{lv['peak_rss_mb']:>8.0f}{lv.get('cost', {}).get('cpu_s_per_audio_s', float('nan')):>10.4f}"
            f"{lv.get('cost', {}).get('loop_cpu_s_per_audio_s', float('nan')):>8.4f}"
            f"{lv.get('cost', {}).get('engine_cpu_s_per_audio_s', float('nan')):>8.4f}"
            f"{lv.get('ping_p95', float('nan')):>10.3f}{refreshed(lv.get('cost', {})):>11}")


def refreshed(cost: dict[str, Any]) -> str:
    """The share of the partial refreshes planned that the daemon ran (it skips them when the model is busy)."""
    planned = cost.get("refresh_run", 0.0) + cost.get("refresh_skipped", 0.0)
    return f"{cost['refresh_run'] / planned * 100:.0f} %" if planned else "-"


def servers_row(lv: dict[str, Any]) -> str:
    """How many streams of a level each server process served."""
    counts = sorted(lv.get("servers", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    failed = f"; {lv['failed']} failed ({'; '.join(lv['closed'][:2]) or 'an error event'})" if lv.get("failed") else ""
    return f"{'':<22}served by: " + ", ".join(f"{name} x{n}" for name, n in counts) + failed


def side_by_side(targets: list[Target], args: argparse.Namespace) -> None:
    """The figures of every target in one table, a column each."""
    first = [next((lv for lv in t.levels if lv["clients"] == targets[0].levels[0]["clients"]), {}) for t in targets]
    rows: list[tuple[str, list[str]]] = []

    def pair(d: dict[str, Any], key: str) -> str:
        return f"{d.get(key + '_median', float('nan')):.3f} / {d.get(key + '_p95', float('nan')):.3f}"

    n1 = targets[0].levels[0]["clients"] if targets[0].levels else 0
    rows.append((f"partial p50 / p95, N={n1}", [pair(d, "partial") for d in first]))
    rows.append((f"  words in the first {EARLY_S} s", [pair(d, "partial_first") for d in first]))
    rows.append(("  the other words", [pair(d, "partial_rest") for d in first]))
    rows.append((f"final p50 / p95, N={n1}", [pair(d, "final") for d in first]))
    rows.append((f"ping round trip p50 / p95, N={n1}", [pair(d, "ping") for d in first]))
    last = [t.levels[-1] if t.levels else {} for t in targets]
    rows.append(("at the last level run: N", [str(d.get("clients", "")) for d in last]))
    rows.append(("  final p50 / p95", [pair(d, "final") for d in last]))
    rows.append(("  ping round trip p50 / p95", [pair(d, "ping") for d in last]))
    rows.append((f"most streams, p95 final <= {args.max_p95:.1f} s", [str(t.summary["max_clients_p95_ok"])
                                                                     for t in targets]))
    for key, label in [("levels_cost", "levels"), ("commands_cost", "commands")]:
        costs = [t.summary.get(key, {}) for t in targets]
        if any(costs):
            rows.append((f"model s per audio s, {label}", [f"{c.get('model_s_per_audio_s', float('nan')):.3f}"
                                                           for c in costs]))
            rows.append(("  daemon CPU s per audio s", [f"{c.get('cpu_s_per_audio_s', float('nan')):.4f}"
                                                        for c in costs]))
            if any(c.get("front_cpu_s_per_audio_s", 0) < c.get("cpu_s_per_audio_s", 0) for c in costs):
                rows.append(("    front end alone (no model server)",
                             [f"{c.get('front_cpu_s_per_audio_s', float('nan')):.4f}" for c in costs]))
            rows.append(("    event loop / engine thread", [f"{c.get('loop_cpu_s_per_audio_s', float('nan')):.4f} / "
                                                          f"{c.get('engine_cpu_s_per_audio_s', float('nan')):.4f}"
                                                          for c in costs]))
            rows.append(("  provisional windows / model s", [f"{c.get('provisional_windows', float('nan')):.0f} / "
                                                              f"{c.get('provisional_model_s', float('nan')):.2f}"
                                                              for c in costs]))
            rows.append(("  partial refreshes run", [refreshed(c) for c in costs]))
    cmds = [t.summary.get("commands", {}) for t in targets]
    if any(cmds):
        rows.append(("command: start -> first partial", [pair(c, "first_partial") for c in cmds]))
        rows.append(("command: first word end -> text", [pair(c, "first_text") for c in cmds]))
        rows.append(("  -> the right first word", [pair(c, "right_word") for c in cmds]))
        rows.append(("command: stop -> final", [pair(c, "final") for c in cmds]))
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'':<{width}}" + "".join(f"{t.name:>24}" for t in targets))
    for label, cells in rows:
        print(f"{label:<{width}}" + "".join(f"{c:>24}" for c in cells))


async def main_async(args: argparse.Namespace) -> int:
    audio = load_audio(args)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    if args.url and args.compare:
        raise SystemExit("loadtest: --compare starts its own daemons; leave out --url")
    if args.daemon_pid and not args.url:
        raise SystemExit("loadtest: --daemon-pid names the process of the daemon at --url; give --url too")
    targets: list[Target] = []
    tmp = None
    pool = None
    server = None
    if args.procs > 1:  # spawn: a fork of this process would copy its event loop
        pool = ProcessPoolExecutor(args.procs, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(pool, warm) for _ in range(args.procs)))
    try:
        if args.url:
            targets.append(Target("daemon", args.url, given_pid=args.daemon_pid,
                                  idle=rss_mb(args.daemon_pid) if args.daemon_pid else float("nan")))
        else:
            model = args.model
            if args.random_model:
                tmp = tempfile.TemporaryDirectory()
                model = str(save_random_model(args.random_model, tmp.name))
            served: list[str] = []
            if args.model_server:
                server = await start_model_server(args.model_server, model)
                served = ["model_server.kind='triton'", f"model_server.url='127.0.0.1:{server.port}'"]
            variants = [("as set", [*served, *args.overrides])]
            variants += [(name, [*served, *sets]) for name, sets in compared(args)]
            for name, overrides in variants:
                proc, url = await start_daemon(args, model, overrides)
                targets.append(Target(name, url, proc, rss_mb(proc.pid)))
        for t in targets:
            print(f"daemon {t.url} ({t.name}) idle RSS {t.idle:.0f} MB")
        print(f"{len(audio) / 16000:.1f} s of speech per client at 1x real time, clients spread over "
              f"{max(1, args.procs)} process(es)")
        print(LEVEL_HEAD)
        start = [read_metrics(t.url, t.pid) for t in targets]
        for n in [int(x) for x in args.clients.split(",")]:
            for t in targets:  # one after the other: the daemons never share the CPU
                if t.stopped:
                    continue
                before = read_metrics(t.url, t.pid)
                profiling = None
                if args.profile == n and t.pid:  # from 1.5 s in (every client started) for most of the audio
                    async def later(pid: int) -> str:
                        await asyncio.sleep(1.5)
                        return await profile_daemon(pid, max(1.0, len(audio) / 16000 - 2.0))
                    profiling = asyncio.ensure_future(later(t.pid))
                lv = await run_level(t.url, pcm, n, t.pid, pool, args.procs,
                                     {"type": "start", "partials": False} if args.finals_only else None,
                                     args.message_ms / 1000)
                if profiling is not None:
                    t.profile = (n, await profiling)
                lv["cost"] = cost(before, read_metrics(t.url, t.pid))
                t.levels.append(lv)
                print(level_row(t.name, lv), flush=True)
                print(servers_row(lv), flush=True)
                t.stopped = not lv["ok"] or not lv["final_p95"] <= args.max_p95
            if all(t.stopped for t in targets):
                break
        for t, before in zip(targets, start, strict=True):
            good = [lv for lv in t.levels if lv["ok"] and lv["final_p95"] <= args.max_p95]
            best = good[-1]["clients"] if good else 0
            t.summary = {"levels": t.levels, "max_clients_p95_ok": best, "idle_rss_mb": t.idle,
                         "levels_cost": cost(before, read_metrics(t.url, t.pid))}
            print(f"\n{t.name}: largest N with p95 final latency <= {args.max_p95:.1f} s: {best}"
                  + ("" if len(good) < len(t.levels) else " (limit not reached: try more clients)"))
            if t.pid and good:
                per = (good[-1]["peak_rss_mb"] - t.idle) / max(1, best)
                t.summary["rss_per_stream_mb"] = per
                print(f"RSS per stream: {per:.1f} MB (peak at N={best} minus idle, divided by N)")
        if args.commands:
            commands = command_audio()
            lengths = ", ".join(f"{len(c) / 32000:.1f}" for c in commands)
            print(f"\n{args.commands} command streams, {args.command_clients} at a time (commands of {lengths} s)")
            for t in targets:
                before = read_metrics(t.url, t.pid)
                t.summary["commands"] = await run_commands(t.url, commands, args.commands, args.command_clients,
                                                               args.message_ms / 1000)
                t.summary["commands_cost"] = cost(before, read_metrics(t.url, t.pid))
                c = t.summary["commands"]
                print(f"{t.name}: start -> first partial p50 {c['first_partial_median']:.3f} p95 "
                      f"{c['first_partial_p95']:.3f}; first word end -> text p50 {c['first_text_median']:.3f} p95 "
                      f"{c['first_text_p95']:.3f}; stop -> final p50 {c['final_median']:.3f} p95 "
                      f"{c['final_p95']:.3f} ({c['ok']}/{c['commands']} ok)", flush=True)
        if args.cycles:
            t = targets[0]
            before_mb = rss_mb(t.pid) if t.pid else float("nan")
            t0 = time.perf_counter()
            await cycles(t.url, pcm, args.cycles)
            await asyncio.sleep(1.0)
            after_mb = rss_mb(t.pid) if t.pid else float("nan")
            t.summary.update(cycles=args.cycles, rss_before_cycles_mb=before_mb, rss_after_cycles_mb=after_mb)
            print(f"{args.cycles} connect/disconnect cycles in {time.perf_counter() - t0:.1f} s: "
                  f"RSS {before_mb:.0f} MB -> {after_mb:.0f} MB")
        for t in targets:
            if t.profile is not None and t.profile[1]:
                t.summary["profile"] = print_profile(t.name, *t.profile)
        side_by_side(targets, args)
        if args.json:
            out = targets[0].summary if len(targets) == 1 else {t.name: t.summary for t in targets}
            await asyncio.to_thread(Path(args.json).write_text, json.dumps(out, indent=2))
        return 0
    finally:
        if pool is not None:
            pool.shutdown()
        for t in targets:
            if t.proc is not None and t.proc.returncode is None:
                t.proc.terminate()
                await t.proc.wait()
        if server is not None:
            await stop_model_server(server)
        if tmp is not None:
            tmp.cleanup()


# -- a rolling restart behind HAProxy ------------------------------------------------------------------------

HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"
NATIVE_BACKENDS = ("backend daemons", "backend daemons_upload")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def haproxy_config(template: str, *, listen: int, vosk: int, stats: int, daemons: list[tuple[int, int]]) -> str:
    """deploy/haproxy.cfg for daemons on loopback: its binds on ``listen``/``vosk``/``stats``, one server per daemon
    (native port, Vosk port; the rest of each ``server`` line kept), no runtime API socket. Everything else
    (maxconn, timeouts, balancing, checks, retries) is the shipped file's."""
    out: list[str] = []
    section = ""
    for line in template.splitlines():
        word = line.split()[0] if line.split() else ""
        if line and not line[0].isspace():
            section = line.strip()
        if word == "stats" and line.split()[1] == "socket":
            continue  # /run/haproxy is the package's
        if word == "bind":
            port = {"frontend streamer": listen, "frontend streamer_vosk": vosk, "listen stats": stats}[section]
            line = f"    bind 127.0.0.1:{port}"
        elif word == "server":
            _, name, _, *rest = line.split()
            i = int(name.removeprefix("daemon")) - 1
            if i >= len(daemons):
                continue
            port = daemons[i][0 if section in NATIVE_BACKENDS else 1]
            line = " ".join([f"    server {name} 127.0.0.1:{port}", *rest])
        out.append(line)
    return "\n".join(out) + "\n"


def haproxy_stats(port: int) -> dict[str, dict[str, str]]:
    """HAProxy's stats CSV by ``proxy/server``: ``{"daemons/daemon1": {"status": "UP", ...}, ...}`` ({} while it
    does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/;csv", timeout=5) as r:
            rows = r.read().decode().splitlines()
    except OSError:
        return {}
    head = rows[0].lstrip("# ").split(",")
    out = {}
    for row in rows[1:]:
        cells = dict(zip(head, row.split(","), strict=False))
        out[f"{cells.get('pxname')}/{cells.get('svname')}"] = cells
    return out


@dataclass
class Rolling:
    """What the clients of a rolling restart saw."""

    streams: int = 0
    """streams opened"""
    whole: int = 0
    """closed 1000 after their ``stop``, with their ``end``"""
    cut: int = 0
    """closed otherwise before their end (1001, a dropped connection, an error)"""
    reconnects: int = 0
    """streams opened again after a cut"""
    refused: int = 0
    """connection attempts that failed (HAProxy had no daemon for it, or a daemon refused it)"""
    codes: Counter[str] = field(default_factory=Counter)
    """close codes of the cut streams"""


async def rolling_stream(url: str, pcm: bytes, chunk_s: float = CHUNK_S) -> tuple[bool, str]:
    """One stream at 1x real time in messages of ``chunk_s``, then ``stop``: whether it ended whole, and its close
    code."""
    step = int(16000 * chunk_s) * 2
    # no keepalive pings of its own: a daemon that holds the audio back (it reads no faster than it decodes)
    # reads the pings late too, and the stream would be counted cut by the load generator's own timeout
    async with connect(url, max_size=None, open_timeout=15, ping_interval=None) as ws:
        await ws.recv()  # ready
        last: dict[str, Any] = {}

        async def read() -> None:
            nonlocal last
            async for raw in ws:
                last = json.loads(raw)

        reader = asyncio.ensure_future(read())
        stopped = False
        try:
            t0 = time.perf_counter()
            for k, i in enumerate(range(0, len(pcm), step)):
                await ws.send(pcm[i : i + step])
                await asyncio.sleep(max(0.0, t0 + (k + 1) * chunk_s - time.perf_counter()))
            await ws.send(json.dumps({"type": "stop"}))
            stopped = True
        except ConnectionClosed:
            pass
        with contextlib.suppress(ConnectionClosed):
            await reader
    return stopped and ws.close_code == 1000 and last.get("type") == "end", str(ws.close_code)


async def rolling_client(url: str, pcm: bytes, delay: float, done: asyncio.Event, out: Rolling,
                         chunk_s: float = CHUNK_S) -> None:
    """Stream after stream until ``done``; a stream that was cut is opened again at once (a reconnect)."""
    await asyncio.sleep(delay)
    after_cut = False
    while not done.is_set():
        try:
            whole, code = await rolling_stream(url, pcm, chunk_s)
        except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake):
            out.refused += 1
            await asyncio.sleep(0.5)
            continue
        out.streams += 1
        out.reconnects += after_cut
        if whole:
            out.whole += 1
        else:
            out.cut += 1
            out.codes[code] += 1
        after_cut = not whole


async def rolling_restart(args: argparse.Namespace, model: str, overrides: list[str], pcm: bytes) -> dict[str, Any]:
    """Two daemons behind HAProxy, ``--rolling-clients`` streams through it, each daemon restarted in turn."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise SystemExit("loadtest: --rolling needs HAProxy (apt-get install haproxy)")
    ports = [(free_port(), free_port()) for _ in range(2)]

    async def start(i: int) -> asyncio.subprocess.Process:
        proc, _ = await start_daemon(args, model, [*overrides, "vosk.enabled=true", f"vosk.port={ports[i][1]}"],
                                     port=ports[i][0])
        return proc

    procs = list(await asyncio.gather(start(0), start(1)))
    listen, vosk, stats = free_port(), free_port(), free_port()
    folder = tempfile.TemporaryDirectory()
    path = Path(folder.name) / "haproxy.cfg"
    path.write_text(haproxy_config(HAPROXY_CONFIG.read_text(), listen=listen, vosk=vosk, stats=stats, daemons=ports))
    lb = await asyncio.create_subprocess_exec(haproxy, "-db", "-f", str(path), stdout=asyncio.subprocess.DEVNULL,
                                              stderr=asyncio.subprocess.DEVNULL)

    async def up(i: int) -> None:
        while haproxy_stats(stats).get(f"daemons/daemon{i + 1}", {}).get("status") != "UP":  # noqa: ASYNC110
            await asyncio.sleep(0.25)

    out = Rolling()
    done = asyncio.Event()
    stopping: list[float] = []
    try:
        await asyncio.wait_for(asyncio.gather(up(0), up(1)), 60)
        url = f"ws://127.0.0.1:{listen}/v1/stream"
        n = args.rolling_clients
        length = len(pcm) / 32000
        clients = [asyncio.ensure_future(rolling_client(url, pcm, i * length / n, done, out, args.message_ms / 1000))
                   for i in range(n)]
        await asyncio.sleep(length + 1.0)  # every client streams
        t0 = time.monotonic()
        for i in (0, 1):
            t = time.monotonic()
            procs[i].send_signal(signal.SIGTERM)
            await procs[i].wait()
            stopping.append(time.monotonic() - t)
            procs[i] = await start(i)
            await asyncio.wait_for(up(i), 60)
        took = time.monotonic() - t0
        done.set()
        await asyncio.gather(*clients)
        backend = haproxy_stats(stats).get("daemons/BACKEND", {})
    finally:
        done.set()
        lb.terminate()
        await lb.wait()
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGTERM)  # the second: no drain
                await proc.wait()
        folder.cleanup()
    return {"streams": out.streams, "whole": out.whole, "cut": out.cut, "reconnects": out.reconnects,
            "refused": out.refused, "cut_codes": dict(out.codes), "stop_s": stopping, "restart_s": took,
            "haproxy_retries": int(backend.get("wretr") or 0), "haproxy_redispatches": int(backend.get("wredis") or 0)}


def rolling_table(figures: dict[str, dict[str, Any]]) -> list[str]:
    """The rolling restarts side by side, a column each."""
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("streams opened", lambda f: str(f["streams"])),
        ("  ended whole (1000 after stop)", lambda f: str(f["whole"])),
        ("  cut (by close code)", lambda f: f"{f['cut']} {f['cut_codes']}" if f["cut"] else "0"),
        ("reconnects after a cut", lambda f: str(f["reconnects"])),
        ("connections refused", lambda f: str(f["refused"])),
        ("HAProxy retries / redispatches", lambda f: f"{f['haproxy_retries']} / {f['haproxy_redispatches']}"),
        ("daemon 1 / 2: SIGTERM -> exit (s)", lambda f: " / ".join(f"{s:.1f}" for s in f["stop_s"])),
        ("whole rolling restart (s)", lambda f: f"{f['restart_s']:.1f}"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{name:>28}" for name in figures)]
    lines += [f"{label:<{width}}" + "".join(f"{cell(f):>28}" for f in figures.values()) for label, cell in rows]
    return lines


async def rolling_main(args: argparse.Namespace, pcm: bytes) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_random_model(args.random_model, tmp)) if args.random_model else args.model
        variants = [("as set", args.overrides)]
        variants += compared(args)
        figures = {}
        for name, overrides in variants:  # one after the other: they never share the CPU
            print(f"rolling restart: {name} ...", flush=True)
            figures[name] = await rolling_restart(args, model, overrides, pcm)
    print(f"\nrolling restart of 2 daemons behind HAProxy, {args.rolling_clients} streams of {len(pcm) / 32000:.1f} s "
          "at 1x: each daemon in turn stopped (SIGTERM), started again, up in HAProxy")
    print("\n".join(rolling_table(figures)))
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(figures, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model_server and (args.url or args.rolling):
        raise SystemExit("loadtest: --model-server serves the daemons the levels start: leave out "
                         + ("--url" if args.url else "--rolling"))
    if args.daemon_cpus:  # before the client processes are spawned: they keep this process's CPUs
        os.sched_setaffinity(0, os.sched_getaffinity(0) - args.daemon_cpus)
    if args.rolling:
        audio = load_audio(args)
        return asyncio.run(rolling_main(args, (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
