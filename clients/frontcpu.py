#!/usr/bin/env python3
"""The front end's CPU per audio second per stream, apart from the model's, per component.

Runs the demo model once over espeak-ng speech (``--seconds``, fed in 100 ms chunks as a client sends them)
and keeps each window's log-probabilities; then replays them to N sans-I/O :class:`StreamSession` s at a
time (1, 8, 32, 64), chunk by chunk in turn as the daemon's engine thread would take them, so the model's
time is left out and what is measured is the front end's alone: per stream and audio second, the CPU of

* ``audio``: the client's 16-bit bytes into float32 (``decode_pcm``, the stream's ``AudioConverter``),
* ``vad``: the voice-activity detector (``[endpoint] vad``, on by default), as the daemon's engine thread runs it
  when the streams' calls wait together: one batch over the streams of a round, or over ``--vad-batch`` streams
  at a time (live, the thread gathers a few streams' calls at once: 2-8 at 32 streams); a revision whose
  detector does not batch, with ``--compare``: each stream alone,
* ``windows``: the session taking the audio and the speech probabilities, and cutting windows,
* ``merge``: the CTC merge, endpoints and partials (a result's handling minus the word search),
* ``search``: flashlight's word search (its steps, partials and finishes, the LM's callbacks excepted),
* ``lm``: the LM the search calls back (KenLM lookups, hotword bonuses, their memo),
* ``events``: the events read and serialised as the native protocol sends them (``to_json``).

Components are timed with ``time.thread_time`` around the calls, which costs a little itself; ``total`` is
the process CPU of the same replay untimed, run just before it. The default decoder is the one
``streamer serve`` builds for the demo model (its word list and LM); ``greedy`` is ``decoder.words = ""``
and ``decoder.lm = ""``. Figures, not assertions: this machine is shared, so compare runs made side by side.

``--compare REV`` replays the same log-probabilities with the ``streamer`` package of git revision REV too,
level by level in turn with this tree's, says whether every final is the same, and for how much of the audio the
first stream's partials showed another text (``--show-partials`` prints those texts)::

    python clients/frontcpu.py                       # 20 s of speech at 1, 8, 32, 64 streams
    python clients/frontcpu.py --compare HEAD~3      # before/after, side by side
    python clients/frontcpu.py --refresh             # with the partial refreshes a live stream plans
    python clients/frontcpu.py --without-partials    # each level also with sessions that show no partials

``--without-partials`` replays each level a second time to sessions that show no partials
(:attr:`streamer.engine.StreamSession.partials` off, as for a file, a phone call or a Deepgram client without
``interim_results``): no provisional or refresh window, no partial's search; their finals must be the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

CHUNK = 1600
"""samples per client message (100 ms)"""
COMPONENTS = ("audio", "vad", "windows", "merge", "search", "lm", "events")
DECODERS = {"default": [], "greedy": ["decoder.words=''", "decoder.lm=''"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="speech per stream (default: 20)")
    p.add_argument("--streams", default="1,8,32,64", help="streams replayed at a time (default: %(default)s)")
    p.add_argument("--decoders", default="default,greedy",
                   help="comma-separated: default (word list + LM), greedy (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override (SECTION.KEY=VALUE)")
    p.add_argument("--refresh", action="store_true", help="plan and replay a live stream's partial refreshes")
    p.add_argument("--vad-batch", type=int, default=0, metavar="K",
                   help="score the detectors of K streams at a time, as a live engine thread gathers a few "
                        "(default: all the streams of a round)")
    p.add_argument("--compare", metavar="REV", help="also replay with the streamer package of git revision REV")
    p.add_argument("--without-partials", action="store_true",
                   help="replay each level again to sessions that show no partials (their finals must be the same)")
    p.add_argument("--show-partials", action="store_true",
                   help="with --compare: print the first stream's partial texts where the two differ")
    p.add_argument("--replay", help=argparse.SUPPRESS)  # a child: the recorded run to replay (an .npz)
    args = p.parse_args(argv)
    if unknown := [d for d in args.decoders.split(",") if d not in DECODERS]:
        p.error(f"--decoders: no decoder {', '.join(unknown)} (choose from {', '.join(DECODERS)})")
    return args


# -- recording the model's outputs -------------------------------------------------------------


def session_for(overrides: list[str], refresh: bool, runner: Any) -> tuple[Any, Any]:
    """A fresh session factory's inputs: the config and the word decoder ``streamer serve`` would build."""
    from streamer.config import load_config
    from streamer.decoder import build_decoder

    cfg = load_config(None, overrides)
    return cfg, build_decoder(cfg.decoder, runner)


def new_session(cfg: Any, runner: Any, words: Any, refresh: bool) -> Any:
    from streamer.runner import geometry_of
    from streamer.transcribe import new_session as make

    return make(cfg, runner.vocab, words, geometry=geometry_of(runner), refresh=refresh)


class WindowKey(NamedTuple):
    """What tells a stream's windows apart: where it starts, its frames, which of them it makes final, its kind."""

    start_frame: int
    frames: int
    final_from: int
    final_to: int
    provisional: int
    optional: int

    @classmethod
    def of(cls, w: Any) -> WindowKey:
        return cls(w.start_frame, w.n_frames, w.final_from, w.final_to, int(w.provisional), int(w.optional))


Recorded = list[tuple[WindowKey, np.ndarray]]
"""every window's key and log-probabilities, in the order a stream hands them out"""


def record(args: argparse.Namespace, runner: Any, audio: np.ndarray) -> Recorded:
    """Every window's log-probabilities, in the order a stream fed in 100 ms chunks hands them out."""
    from streamer.transcribe import feed_audio, speech_detector

    cfg, _ = session_for(args.overrides, args.refresh, runner)
    session = new_session(cfg, runner, None, args.refresh)
    detector = speech_detector(session)
    outputs: Recorded = []

    def run() -> None:
        windows = session.windows_to_run()
        if windows:
            for w, lp in zip(windows, runner.run([w.samples for w in windows]), strict=True):
                outputs.append((WindowKey.of(w), np.asarray(lp, np.float32)))
                session.accept_result(w, lp)

    for i in range(0, len(audio), CHUNK):
        feed_audio(session, audio[i : i + CHUNK], detector)
        run()
    session.finish()
    run()
    return outputs


# -- replaying them ----------------------------------------------------------------------------


class Clock:
    """CPU seconds per component, from ``time.thread_time`` around calls (off: the calls run bare)."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.spent = dict.fromkeys(COMPONENTS, 0.0)
        self.lm_calls = 0

    def overhead(self) -> float:
        """Seconds the timing of one LM callback adds (they are many and short: this is subtracted)."""
        spent = [0.0]

        def noop() -> None:
            pass

        def timed() -> None:
            t = time.thread_time()
            try:
                noop()
            finally:
                spent[0] += time.thread_time() - t

        n = 20_000
        t0 = time.thread_time()
        for _ in range(n):
            noop()
        t1 = time.thread_time()
        for _ in range(n):
            timed()
        t2 = time.thread_time()
        return max(0.0, (t2 - t1) - (t1 - t0)) / n

    def timed(self, name: str, fn: Callable[..., Any], *a: Any) -> Any:
        if not self.on:
            return fn(*a)
        t = time.thread_time()
        try:
            return fn(*a)
        finally:
            self.spent[name] += time.thread_time() - t


def instrument(clock: Clock, words: Any) -> Any:
    """``words`` whose searches and LM callbacks add their time to ``clock`` (search and lm), or ``words`` as is."""
    if words is None or not clock.on:
        return words
    import streamer.lexicon as lexicon

    made: dict[type, type] = {}
    original = lexicon.make_search_lm  # type: ignore[attr-defined]  # (lexicon's own name for it, which it calls)

    def timed_lm(*a: Any, **kw: Any) -> Any:
        lm = original(*a, **kw)
        cls = type(lm)
        if cls not in made:
            def wrap(name: str) -> Callable[..., Any]:
                base = getattr(cls, name)

                def call(self: Any, *x: Any) -> Any:
                    clock.lm_calls += 1
                    t = time.thread_time()
                    try:
                        return base(self, *x)
                    finally:
                        clock.spent["lm"] += time.thread_time() - t
                return call
            made[cls] = type("TimedLM", (cls,), {n: wrap(n) for n in ("start", "score", "finish")})
        lm.__class__ = made[cls]
        return lm

    lexicon.make_search_lm = timed_lm  # type: ignore[attr-defined]  # (this process only replays: nothing else searches)

    class Search:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def step(self, rows: np.ndarray) -> None:
            clock.timed("search", self.inner.step, rows)

        def partial(self, lookahead: np.ndarray) -> Any:
            return clock.timed("search", self.inner.partial, lookahead)

        def finish(self) -> Any:
            return clock.timed("search", self.inner.finish)

    class Words:
        def search(self, start_frame: int = 0) -> Search:
            return Search(clock.timed("search", words.search, start_frame))

    return Words()


def replay(cfg: Any, runner: Any, words: Any, refresh: bool, audio: np.ndarray, outputs: Recorded,
           n: int, timed: bool, vad_batch: int = 0, partials: bool = True
           ) -> tuple[float, dict[str, float], str, dict[str, float]]:
    """Replay to ``n`` sessions at a time: process CPU seconds, per-component seconds, a digest of the finals and
    the first stream's partial figures (:func:`partial_figures`). ``vad_batch``: the detectors are scored that
    many streams at a time (0: all at once). ``partials`` off: the sessions show none (the recorded provisional and
    refresh windows are passed over)."""
    from streamer.audio import AudioConverter, decode_pcm
    from streamer.events import Final, Partial, to_json
    from streamer.transcribe import speech_detector

    clock = Clock(timed)
    words = instrument(clock, words)
    sessions = [new_session(cfg, runner, words, refresh) for _ in range(n)]
    for s in sessions:
        s.partials = partials  # (a revision compared with may not have it: then it shows them anyway)
    detectors = [speech_detector(s) for s in sessions]
    converters = [AudioConverter(16000, 1) for _ in range(n)]
    taken = [0] * n
    fed = [0.0] * n  # audio seconds each stream was given
    shown: list[list[tuple[float, bool, list[tuple[str, float, float]]]]] = [[] for _ in range(n)]
    finals: list[list[str]] = [[] for _ in range(n)]
    pcm = np.round(audio * 32768).astype("<i2").tobytes()

    def answer(i: int) -> None:
        s = sessions[i]
        windows = clock.timed("windows", s.windows_to_run)
        for w in windows:
            key = WindowKey.of(w)
            while taken[i] < len(outputs) and outputs[taken[i]][0] != key and outputs[taken[i]][0].provisional:
                taken[i] += 1  # a provisional window (or refresh) this session did not plan
            if taken[i] >= len(outputs) or outputs[taken[i]][0] != key:
                raise SystemExit("the replay's windows differ from the recorded ones: record again")
            lp = outputs[taken[i]][1]
            taken[i] += 1
            clock.timed("merge", s.accept_result, w, lp)
        events = clock.timed("events", s.events_received)
        events += clock.timed("events", s.voice_events)
        for e in events:
            clock.timed("events", to_json, e)
            if isinstance(e, Final):
                finals[i].append(e.text)
            if isinstance(e, (Partial, Final)):
                shown[i].append((fed[i], isinstance(e, Final), [(w.word, w.start, w.end) for w in e.words]))

    def convert(converter: AudioConverter, chunk: bytes) -> np.ndarray:
        return converter.convert(decode_pcm(chunk, "s16le", 1))

    import streamer.vad

    batched = hasattr(streamer.vad, "score")  # (a revision compared with may score each stream alone)
    heard = [d for d in detectors if d is not None]

    cpu = time.process_time()
    for at in range(0, len(pcm), 2 * CHUNK):
        chunk = pcm[at : at + 2 * CHUNK]
        xs = [clock.timed("audio", convert, converters[i], chunk) for i in range(n)]
        if batched and heard:  # each call's first step, then one batch, as the engine thread runs them
            for d, x in zip(detectors, xs, strict=True):
                if d is not None:
                    clock.timed("vad", d.add, x)
            group = vad_batch or len(heard)
            for g in range(0, len(heard), group):
                clock.timed("vad", streamer.vad.score, heard[g : g + group])
        for i, x in enumerate(xs):
            clock.timed("windows", sessions[i].accept_audio, x)
            fed[i] += len(x) / 16000
            d = detectors[i]
            if d is not None:
                probs = clock.timed("vad", d.take) if batched else clock.timed("vad", d.accept, x)
                clock.timed("windows", sessions[i].accept_speech, probs)
            answer(i)
    for i in range(n):
        clock.timed("windows", sessions[i].finish)
        answer(i)
    cpu = time.process_time() - cpu
    spent = dict(clock.spent)
    if words is not None and timed:
        # The LM is called from within the search, and the search from within the merge. Half a timed call's
        # cost falls inside the LM's own time, all of it inside the search's.
        half = clock.lm_calls * clock.overhead() / 2
        spent["search"] -= spent["lm"] + half
        spent["lm"] = max(0.0, spent["lm"] - half)
        spent["merge"] -= spent["search"] + spent["lm"] + 2 * half
    digest = hashlib.sha1(json.dumps(finals).encode()).hexdigest()[:10]
    return cpu, spent, digest, partial_figures(shown[0])


def partial_figures(events: list[tuple[float, bool, list[tuple[str, float, float]]]]) -> dict[str, Any]:
    """How soon partials showed the finals' words (seconds after a word's end, p50 and p95) and the share of the
    words partials showed that no final has (misread or dropped later), for one stream."""
    from streamer.scoring import words_shown

    lags = sorted(max(0.0, first - end) for end, first in words_shown(events))
    finals = [w for _, is_final, words in events if is_final for w in words]
    shown = [w for _, is_final, words in events if not is_final for w in words]
    wrong = sum(1 for text, start, end in shown
                if not any(t == text and s <= end and e >= start for t, s, e in finals))

    def pick(q: float) -> float:
        return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else float("nan")

    texts = [(at, " ".join(w[0] for w in words)) for at, is_final, words in events if not is_final]
    return {"p50": pick(0.5), "p95": pick(0.95), "wrong": wrong / max(1, len(shown)), "texts": texts}


def partials_differ(base: list[list[Any]], this: list[list[Any]], name: str = "base", show: bool = False) -> str:
    """For how much of the audio two replays showed another partial text (a partial may change, a final not): the
    text on screen after each partial of either, until the next. ``show``: print the texts where they differ."""
    times = sorted({at for at, _ in base} | {at for at, _ in this})
    if not times:
        return "no partials"

    def showing(partials: list[list[Any]]) -> list[str]:
        out, k, text = [], 0, ""
        for t in times:
            while k < len(partials) and partials[k][0] <= t:
                text = partials[k][1]
                k += 1
            out.append(text)
        return out

    ends = [*times[1:], times[-1]]
    shown = list(zip(times, ends, showing(base), showing(this), strict=True))
    if show:
        for t, _, a, b in shown:
            if a != b:
                print(f"  at {t:6.1f} s   {name:>8}: ...{a[-70:]}\n              this    : ...{b[-70:]}")
    differ = sum(e - t for t, e, a, b in shown if a != b)
    return f"{len(base)} and {len(this)} partials, another text shown for {differ:.1f} s of {ends[-1] - times[0]:.1f} s"


# -- the runs ----------------------------------------------------------------------------------


def load_runner() -> Any:
    from streamer.config import ModelConfig
    from streamer.model import load_model

    return load_model(ModelConfig(id="demo", device="cpu"))


def child(args: argparse.Namespace) -> int:
    """Replay a recorded run at each level, both decoders; one JSON line per level and decoder."""
    data = np.load(args.replay)
    audio = data["audio"]
    outputs = [(WindowKey(*(int(k) for k in data[f"k{i}"])), data[f"w{i}"]) for i in range(int(data["n"]))]
    runner = load_runner()
    for decoder in args.decoders.split(","):
        cfg, words = session_for([*args.overrides, *DECODERS[decoder]], args.refresh, runner)
        for k, n in enumerate(int(x) for x in args.streams.split(",")):
            sys.stdin.readline()  # the parent's turn: two replays never run at once
            if not k:
                replay(cfg, runner, words, args.refresh, audio, outputs, 1, False)  # warm up: first searches
            for shown in (True, False) if args.without_partials else (True,):
                total, _, digest, partials = replay(cfg, runner, words, args.refresh, audio, outputs, n, False,
                                                    args.vad_batch, partials=shown)
                _, spent, _, _ = replay(cfg, runner, words, args.refresh, audio, outputs, n, True, args.vad_batch,
                                        partials=shown)
                print(json.dumps({"decoder": decoder, "streams": n, "total": total, "spent": spent,
                                  "finals": digest, "partials": partials, "audio_s": len(audio) / 16000}),
                      flush=True)
    return 0


def children(args: argparse.Namespace, path: Path, tree: Path | None) -> Iterator[dict[str, Any]]:
    """Figures of a child replaying ``path`` (with the package in ``tree``, or this one), one level per turn (with
    ``--without-partials``, two: with partials, then without)."""
    cmd = [sys.executable, __file__, "--replay", str(path), "--streams", args.streams, "--decoders", args.decoders,
           *(["--refresh"] if args.refresh else []), *(a for o in args.overrides for a in ("--set", o)),
           *(["--without-partials"] if args.without_partials else []),
           "--vad-batch", str(args.vad_batch)]
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    with subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for _ in range(len(args.decoders.split(",")) * len(args.streams.split(","))):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            lines = [proc.stdout.readline() for _ in range(2 if args.without_partials else 1)]
            if not all(lines):
                break
            yield from (json.loads(line) for line in lines)
    if proc.returncode:
        raise SystemExit(f"the replay failed ({proc.returncode})")


def row(name: str, r: dict[str, Any]) -> str:
    per = r["streams"] * r["audio_s"]
    spent = r["spent"]
    timed = sum(spent.values()) or 1.0
    shares = "  ".join(f"{spent[c] / per * 1000:6.2f} {spent[c] / timed:4.0%}" for c in COMPONENTS)
    p = r["partials"]
    return (f"{name:>8} {r['decoder']:>8} {r['streams']:>4}  {r['total'] / per * 1000:7.2f}  {shares}  {r['finals']}"
            f"  {p['p50']:.2f} {p['p95']:.2f} {p['wrong']:4.0%}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replay:
        return child(args)
    if args.compare and args.without_partials:
        raise SystemExit("--without-partials replays this tree only: leave out --compare")
    from streamer.testing import speech_audio

    # as a client sends it: 16-bit samples (the replay's detector must hear what the recording's did)
    audio = (np.clip(speech_audio(args.seconds), -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768
    runner = load_runner()
    cfg, _ = session_for(args.overrides, args.refresh, runner)
    # the voice-activity rule plans windows: a revision compared with must plan the same ones
    args.overrides.append(f"endpoint.vad={str(cfg.endpoint.vad).lower()}")
    outputs = record(args, runner, audio)
    print(f"{len(audio) / 16000:.1f} s of espeak-ng speech, {len(outputs)} windows of the demo model "
          f"({'with' if args.refresh else 'without'} partial refreshes, voice-activity rule "
          f"{'on' if cfg.endpoint.vad else 'off'}) replayed to N sessions at a time; "
          "CPU milliseconds per audio second per stream (total: untimed replay; each component: ms and share)")
    header = "  ".join(f"{c:>11}" for c in COMPONENTS)
    print(f"{'code':>8} {'decoder':>8} {'N':>4}  {'total':>7}  {header}  {'finals':>10}  partials (p50 p95 wrong)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.npz"
        arrays: dict[str, Any] = {f"w{i}": lp for i, (_, lp) in enumerate(outputs)}
        arrays |= {f"k{i}": np.array(key) for i, (key, _) in enumerate(outputs)}
        np.savez(path, audio=audio, n=len(outputs), **arrays)
        del runner
        if not args.compare:
            same = True
            rows = children(args, path, None)
            for r in rows:
                print(row("this", r), flush=True)
                if args.without_partials:
                    off = next(rows)
                    print(row("no-part", off), flush=True)
                    same = same and off["finals"] == r["finals"]
            if args.without_partials:
                print("finals without partials: " + ("the same at every level" if same else "DIFFER"))
            return 0
        tree = Path(tmp) / "base"
        tree.mkdir()
        root = Path(__file__).resolve().parent.parent
        archive = subprocess.run(["git", "-C", str(root), "archive", args.compare, "streamer"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        same = True
        differ: list[str] = []
        base, this = children(args, path, tree), children(args, path, None)
        for k in range(len(args.decoders.split(",")) * len(args.streams.split(","))):
            # level by level in turn, so both see the same load, and each goes first every other level
            if k % 2:
                t, b = next(this), next(base)
            else:
                b, t = next(base), next(this)
            print(row(args.compare[:8], b), flush=True)
            print(row("this", t), flush=True)
            same = same and b["finals"] == t["finals"]
            differ.append(partials_differ(b["partials"]["texts"], t["partials"]["texts"], args.compare[:8],
                                          args.show_partials and k == 0))
        print("finals: " + ("the same at every level" if same else "DIFFER"))
        print("partials (the first stream's, in order): " + "; ".join(differ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
