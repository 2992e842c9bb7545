"""``streamer bench``: offline pass vs streaming engine vs transformers pipeline, side by side."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamer.cli import add_config_args, load_cli_config
from streamer.exceptions import StreamerError
from streamer.scoring import cer, words_shown
from streamer.testing import RANDOM_SIZES, random_runner, speech_audio

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.decoder import Decoder
    from streamer.engine import Schedule
    from streamer.events import Event
    from streamer.runner import LocalRunner, Runner


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark offline vs streaming vs the transformers pipeline",
        description="On the same audio and model, time (a) one offline full-utterance pass, (b) the streaming "
        "engine at the configured schedule, (c) the transformers ASR pipeline at the equivalent chunking. "
        "Prints real-time factors, the compute ratio streaming/offline, frame-argmax agreement with the offline "
        "pass and the character error of the streaming text against the offline text.",
    )
    add_config_args(p)
    p.add_argument("--audio", nargs="*", metavar="FILE", help="audio files (default: espeak-ng speech, ~30 s)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the generated speech (default: 30)")
    p.add_argument("--random", choices=sorted(RANDOM_SIZES), metavar="SIZE",
                   help="use a randomly initialised model of this size instead of --model: "
                   + ", ".join(sorted(RANDOM_SIZES)) + " (with a model.backend or model.dtype set, it is written "
                   "once to $XDG_CACHE_HOME/streamer/random and loaded from there)")
    p.add_argument("--chunk-ms", type=float, default=100.0, help="arrival chunk for streaming (default: 100)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the transformers pipeline run")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also run several schedules and draw compute ratio and agreement against latency")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def measure(runner: Runner, cfg: Config, words: Decoder | None, audio: np.ndarray, chunk_ms: float,
            offline_ids: np.ndarray, offline_text: str) -> dict[str, float]:
    """Stream ``audio`` in ``chunk_ms`` chunks, every window run (partial refreshes too); time it, and the model
    calls on early windows and on refreshes apart.

    ``first_partial`` is the audio (seconds) received when the first partial with text came; ``delay_p50`` and
    ``delay_p95`` are the audio received past the end of each final word when an event first showed that word
    (:func:`streamer.scoring.words_shown`: what a live client waits for its words, less the compute).
    """
    from streamer.engine import Window
    from streamer.events import Final
    from streamer.runner import geometry_of
    from streamer.transcribe import feed_audio, new_session, speech_detector, text_of

    session = new_session(cfg, runner.vocab, words, record_frames=True, geometry=geometry_of(runner), refresh=True)
    cost = {"provisional_windows": 0.0, "provisional_seconds": 0.0, "refresh_windows": 0.0, "refresh_seconds": 0.0,
            "first_partial": float("nan")}
    events: list[Event] = []
    timeline: list[tuple[float, bool, list[tuple[str, float, float]]]] = []  # for words_shown

    def kind(w: Window) -> str:
        return "refresh" if w.optional else "provisional" if w.provisional else "full"

    def run_windows(received: int) -> None:
        windows = session.windows_to_run()
        outputs: dict[int, np.ndarray] = {}
        for k in ("provisional", "refresh", "full"):  # run apart to time them apart; each window's output is the same
            group: list[Window] = [w for w in windows if kind(w) == k]
            if not group:
                continue
            t = time.perf_counter()
            outputs.update(zip(map(id, group), runner.run([w.samples for w in group]), strict=True))
            if k != "full":
                cost[f"{k}_windows"] += len(group)
                cost[f"{k}_seconds"] += time.perf_counter() - t
        for w in windows:
            session.accept_result(w, outputs[id(w)])
        for e in session.events_received():
            if e.text and np.isnan(cost["first_partial"]):
                cost["first_partial"] = received / 16000
            timeline.append((received / 16000, isinstance(e, Final), [(w.word, w.start, w.end) for w in e.words]))
            events.append(e)

    chunk = max(1, int(16 * chunk_ms))
    detector = speech_detector(session)  # with [endpoint] vad, as the daemon's streams hear it
    t0 = time.perf_counter()
    for i in range(0, len(audio), chunk):
        feed_audio(session, audio[i : i + chunk], detector)
        run_windows(min(len(audio), i + chunk))
    session.finish()
    run_windows(len(audio))
    elapsed = time.perf_counter() - t0
    ids = np.asarray(session.frame_ids)
    n = min(len(ids), len(offline_ids))
    delays = [at - end for end, at in words_shown(timeline)]
    return {"seconds": elapsed, "agreement": float((ids[:n] == offline_ids[:n]).mean()),
            "cer": cer(text_of(events).replace("  ", " "), offline_text),
            "delay_p50": float(np.percentile(delays, 50)) if delays else float("nan"),
            "delay_p95": float(np.percentile(delays, 95)) if delays else float("nan"), **cost}


def run(args: argparse.Namespace) -> int:
    import torch

    from streamer.decoder import build_decoder
    from streamer.model import TorchRunner, load_model
    from streamer.runner import geometry_of

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_cli_config(args)
    if args.threads:  # the onnxruntime backend takes its threads from the config
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, threads=args.threads))
    if args.random and (cfg.model.backend, cfg.model.dtype) == ("auto", "auto"):
        runner: LocalRunner = random_runner(args.random, cfg.model.device)
    elif args.random:  # other backends and dtypes load it from a checkpoint on disk (cached)
        runner = load_model(dataclasses.replace(cfg.model, id=str(random_checkpoint(args.random))))
    else:
        runner = load_model(cfg.model)
    words = build_decoder(cfg.decoder, runner)
    if args.audio:
        from streamer.audio import AudioConverter, read_audio

        parts = []
        for path in args.audio:
            data, rate = read_audio(path)
            parts.append(AudioConverter(rate, data.shape[1]).convert(data, last=True))
        audio = np.concatenate(parts)
    else:
        try:
            audio = speech_audio(args.seconds)
        except StreamerError as exc:
            raise StreamerError(f"{exc}; or pass --audio FILE") from exc
    dur = len(audio) / 16000
    geometry = geometry_of(runner)
    sched = geometry.schedule(cfg.stream)  # on the model's grid: 20 ms frames, or 40 ms (Wav2Vec2-BERT's adapter)
    ms = sched.frame_samples * 1000 // 16000
    threads = cfg.model.threads or "default" if runner.backend == "onnxruntime" else torch.get_num_threads()
    print(f"model {runner.name}: {runner.n_parameters / 1e6:.1f} M parameters on {runner.device} "
          f"({runner.backend}, {runner.precision}), {runner.backend} threads {threads}")
    print(f"{geometry.describe()}")
    print(f"audio {dur:.1f} s; schedule left {sched.left * ms} ms, hop {sched.hop * ms} ms, "
          f"lookahead {sched.lookahead * ms} ms (window {sched.window_samples / 16000:.2f} s)")
    runner.warmup(sched.window_samples)
    runner.run([audio[: 16000 * 5]])

    t0 = time.perf_counter()
    offline_lp = runner.run([audio])[0]
    offline_s = time.perf_counter() - t0
    offline_ids = offline_lp.argmax(-1)
    greedy_text = str(runner.tokenizer.decode(offline_ids.tolist()))
    offline_text = greedy_text  # the engine decodes as the offline pass does: greedy, or the word list
    if words is not None:
        offline_text = " ".join(w.word for w in words.decode(offline_lp))
    st = measure(runner, cfg, words, audio, args.chunk_ms, offline_ids, offline_text)
    rows = [("offline (one pass)", offline_s, 1.0, 0.0),
            ("streaming engine", st["seconds"], st["agreement"], st["cer"])]
    late = None
    if sched.early:  # the same engine without early partials: what they cost, what they gain
        late = measure(runner, cfg.replace(stream=dataclasses.replace(cfg.stream, early_partials=False)), words,
                       audio, args.chunk_ms, offline_ids, offline_text)
        rows.append(("  no early partials", late["seconds"], late["agreement"], late["cer"]))
    stale = None
    if sched.refresh:  # without partial refreshes: what they cost (when the model has the time), what they gain
        stale = measure(runner, cfg.replace(stream=dataclasses.replace(cfg.stream, refresh_interval_ms=0)), words,
                        audio, args.chunk_ms, offline_ids, offline_text)
        rows.append(("  no partial refreshes", stale["seconds"], stale["agreement"], stale["cer"]))
    if not args.no_pipeline and isinstance(runner, TorchRunner):
        from transformers import pipeline

        pipe = pipeline("automatic-speech-recognition", model=runner.model, tokenizer=runner.tokenizer,
                        feature_extractor=runner.feature_extractor, device=runner.device)
        n = sched.left + sched.hop + sched.lookahead
        t0 = time.perf_counter()
        out: Any = pipe(audio.copy(), chunk_length_s=n * sched.frame_s,
                        stride_length_s=(sched.left * sched.frame_s, sched.lookahead * sched.frame_s), batch_size=8)
        text = str(out["text"])  # the pipeline decodes greedily: compare with greedy offline text
        rows.append(("transformers pipeline", time.perf_counter() - t0, float("nan"), cer(text, greedy_text)))
    elif not args.no_pipeline:
        print(f"(no transformers pipeline row: it runs torch models, not {runner.backend})")
    print(f"\n{'mode':<24}{'seconds':>9}{'RTF':>9}{'vs offline':>12}{'frame agree':>13}{'CER vs offline':>16}")
    for name, secs, agree, c in rows:
        agree_s = "-" if np.isnan(agree) else f"{agree * 100:.2f} %"
        print(f"{name:<24}{secs:>9.3f}{secs / dur:>9.4f}{secs / offline_s:>11.2f}x{agree_s:>13}{c * 100:>14.2f} %")
    without = f", {stale['seconds'] / offline_s:.2f} without partial refreshes" if stale is not None else ""
    print(f"\ncompute ratio streaming/offline: {st['seconds'] / offline_s:.2f}{without} "
          f"(the full windows' schedule predicts ~{(sched.left + sched.hop + sched.lookahead) / sched.hop:.2f})")
    full_s = (sched.plan(0)[2] * sched.frame_samples + sched.tail) / 16000
    if late is not None:
        print(f"early partials every {sched.early * ms} ms: {st['provisional_windows']:.0f} provisional windows, "
              f"{st['provisional_seconds']:.3f} model s ({st['provisional_seconds'] / st['seconds'] * 100:.1f} % "
              f"of the streaming time; they come once per stream start and flush); first partial after "
              f"{st['first_partial']:.2f} s of audio, {late['first_partial']:.2f} s without "
              f"(the first full window needs {full_s:.2f} s)")
    else:
        print(f"early partials off: first partial after {st['first_partial']:.2f} s of audio "
              f"(the first full window needs {full_s:.2f} s)")
    if stale is not None:
        print(f"partial refreshes every {sched.refresh * ms} ms: {st['refresh_windows']:.0f} refresh windows, "
              f"{st['refresh_seconds']:.3f} model s ({st['refresh_seconds'] / st['seconds'] * 100:.1f} % of the "
              f"streaming time; the daemon runs them only on spare model time); words show in partials "
              f"{st['delay_p50']:.2f} / {st['delay_p95']:.2f} s (p50 / p95) of audio after their end, "
              f"{stale['delay_p50']:.2f} / {stale['delay_p95']:.2f} s without")
    else:
        print(f"partial refreshes off: words show in partials {st['delay_p50']:.2f} / {st['delay_p95']:.2f} s "
              f"(p50 / p95) of audio after their end")
    capacity(runner, sched, audio)
    print(f"peak memory (max RSS of this process): {peak_rss_mb():.0f} MB")
    if args.plot:
        plot_tradeoff(runner, cfg, words, audio, args, offline_s, offline_ids, offline_text)
    return 0


def random_checkpoint(size: str) -> Path:
    """A random checkpoint of a real model's shape, written once to the cache (``streamer.testing``)."""
    from streamer.onnx import cache_dir
    from streamer.testing import save_random_model

    path = cache_dir().parent / "random" / size
    if not (path / "config.json").is_file():
        print(f"writing a random {size} checkpoint to {path} (once)", file=sys.stderr)
        save_random_model(size, path)
    return path


def capacity(runner: LocalRunner, sched: Schedule, audio: np.ndarray) -> None:
    """Throughput at full windows batched as the worker batches many streams: how many live streams fit."""
    n = 8
    windows = [audio[i * 3200 : i * 3200 + sched.window_samples] for i in range(n)]
    windows = [w for w in windows if len(w) == sched.window_samples]
    if not windows:
        return
    runner.run(windows)
    t0 = time.perf_counter()
    runner.run(windows)
    secs = time.perf_counter() - t0
    per_s = len(windows) / secs
    batching = "one window per call (int8)" if runner.per_window else f"batches of {len(windows)}"
    print(f"{len(windows)} full windows, {batching}: {per_s:.1f} windows/s; at one window per "
          f"{sched.hop * sched.frame_s * 1000:.0f} ms hop that is about {per_s * sched.hop * sched.frame_s:.1f} live "
          "streams on this machine "
          "(model time only)")


def peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def plot_tradeoff(runner: Runner, cfg: Config, words: Decoder | None, audio: np.ndarray, args: argparse.Namespace,
                  offline_s: float, offline_ids: np.ndarray, offline_text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from streamer.config import StreamConfig

    grid = [(800, 200, 320), (1600, 400, 640), (1600, 400, 1000), (1600, 400, 1280), (2000, 1000, 1280),
            (3200, 800, 1280), (4000, 2000, 2000)]
    points = []
    for left, hop, look in tqdm(grid, desc="schedules", file=sys.stderr, disable=not sys.stderr.isatty()):
        # the schedule's own cost: without partial refreshes (the daemon runs them on spare time only)
        c = cfg.replace(stream=StreamConfig(left_context_ms=left, hop_ms=hop, lookahead_ms=look, refresh_interval_ms=0))
        m = measure(runner, c, words, audio, args.chunk_ms, offline_ids, offline_text)
        points.append((left, hop, look, m["seconds"] / offline_s, m["agreement"], m["cer"]))
        print(f"  left {left:>5} hop {hop:>5} lookahead {look:>5} ms: compute x{m['seconds'] / offline_s:.2f}, "
              f"agreement {m['agreement'] * 100:.2f} %, CER {m['cer'] * 100:.2f} %")
    points.sort(key=lambda p: (p[1] + p[2], p[0]))
    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    lat = [(h + r) / 1000 for _, h, r, *_ in points]
    ax1.plot(lat, [p[3] for p in points], "o-", color="tab:blue", label="compute / offline")
    ax1.set_xlabel("final latency from schedule: hop + look-ahead (s)")
    ax1.set_ylabel("compute ratio streaming / offline", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(lat, [p[4] * 100 for p in points], "s--", color="tab:green", label="frame agreement")
    ax2.set_ylabel("frame-argmax agreement with offline (%)", color="tab:green")
    for (left, hop, look, ratio, *_), x in zip(points, lat, strict=True):
        ax1.annotate(f"{left}/{hop}/{look}", (x, ratio), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax1.set_title(f"Streaming trade-off, {runner.name} (labels: left/hop/look-ahead ms)")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot written to {args.plot}")
