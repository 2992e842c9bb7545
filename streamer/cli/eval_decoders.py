"""``streamer eval --decoders``: greedy, word list, LM and LM + word list on one manifest, side by side.

The model runs once per utterance offline and once per streaming window (its outputs are reused by every
decoder: the windows do not depend on the decoder), so the figures compare decoders on the same
log-probabilities. Decoding CPU time is the process's CPU time outside the model calls (all threads),
per second of audio: what one stream's decoding costs, next to greedy decoding's engine overhead.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from streamer.exceptions import ConfigError

if TYPE_CHECKING:
    from streamer.cli.eval import ManifestItem
    from streamer.config import Config
    from streamer.decoder import Decoder
    from streamer.runner import Runner
    from streamer.scoring import ErrorRate

__all__ = ["DECODERS", "build_decoders", "compare_decoders", "describe", "parse_decoders"]

DECODERS = ("greedy", "words", "lm", "lm+words")


def parse_decoders(text: str) -> list[str]:
    """``--decoders``: ``all`` or a comma-separated subset of :data:`DECODERS`."""
    names = list(DECODERS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in DECODERS]
    if bad or not names:
        raise ConfigError(f"--decoders {text}: unknown decoder(s) {', '.join(bad) or '(none)'}; use 'all' or a "
                          f"comma-separated list of {', '.join(DECODERS)}")
    return names


def build_decoders(cfg: Config, runner: Runner, names: Sequence[str]) -> dict[str, Decoder | None]:
    """Each named decoder from ``cfg.decoder`` (its word list and its LM, each alone or together)."""
    from streamer.decoder import build_decoder

    d = cfg.decoder
    variants = {"greedy": dataclasses.replace(d, words="", lm="", hotwords=""),
                "words": dataclasses.replace(d, lm=""),
                "lm": dataclasses.replace(d, words=""),
                "lm+words": d}
    out: dict[str, Decoder | None] = {}
    for name in names:
        dec = build_decoder(variants[name], runner)
        if name in ("words", "lm+words") and not hasattr(dec, "words"):
            raise ConfigError(f"--decoders {name}: no word list (decoder.words = {d.words!r} finds none)")
        if name in ("lm", "lm+words") and getattr(dec, "lm", None) is None:
            raise ConfigError(f"--decoders {name}: no language model (decoder.lm = {d.lm!r} finds none)")
        out[name] = dec
    return out


class _CachedRun:
    """The runner's ``run`` with each window's output kept for the utterance (every decoder sees the same
    windows), and the process CPU time spent in model calls."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.cache: dict[tuple[int, int], np.ndarray] = {}
        self.cpu = 0.0

    def __call__(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        keys = [(len(w), hash(np.ascontiguousarray(w).tobytes())) for w in windows]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            c0 = time.process_time()
            outs = self.runner.run([windows[i] for i in todo])
            self.cpu += time.process_time() - c0
            for i, lp in zip(todo, outs, strict=True):
                self.cache[keys[i]] = np.asarray(lp)
        return [self.cache[k] for k in keys]


@dataclass
class _Row:
    offline: ErrorRate
    streaming: ErrorRate
    offline_cpu: float = 0.0
    streaming_cpu: float = 0.0
    hypotheses: list[tuple[str, str | None]] = field(default_factory=list)


def compare_decoders(args: Any, cfg: Config, items: list[ManifestItem], chunk: int) -> int:
    """Run the manifest through every decoder of ``--decoders``; print one row per decoder."""
    from tqdm import tqdm

    from streamer.cli.eval import decode_offline, load_16k
    from streamer.model import load_model
    from streamer.scoring import ErrorRate
    from streamer.transcribe import new_session, stream_array, text_of

    names = parse_decoders(args.decoders)
    runner = load_model(cfg.model, max_batch=cfg.worker.max_batch)
    decoders = build_decoders(cfg, runner, names)
    import streamer.runner as runner_module

    geometry_of = getattr(runner_module, "geometry_of", None)  # models with another frame grid
    session_kw: dict[str, Any] = {"geometry": geometry_of(runner)} if geometry_of else {}
    rows = {n: _Row(ErrorRate(), ErrorRate()) for n in names}
    streaming = not args.no_streaming
    audio_s = 0.0
    model_cpu = 0.0
    cached = _CachedRun(runner)
    for item in tqdm(items, desc="eval", unit="utt", file=sys.stderr, disable=not sys.stderr.isatty()):
        audio = load_16k(item.audio)
        audio_s += len(audio) / 16000
        c0 = time.process_time()
        lp = runner.run([audio])[0]
        model_cpu += time.process_time() - c0
        cached.cache.clear()
        for name, dec in decoders.items():
            row = rows[name]
            c0 = time.process_time()
            hyp_off = decode_offline(runner, lp, dec)
            row.offline_cpu += time.process_time() - c0
            row.offline.add(item.text, hyp_off)
            hyp_str = None
            if streaming:
                session = new_session(cfg, runner.vocab, dec, **session_kw)
                c0, m0 = time.process_time(), cached.cpu
                hyp_str = " ".join(text_of(stream_array(session, cached, audio, chunk)).split())
                row.streaming_cpu += time.process_time() - c0 - (cached.cpu - m0)
                row.streaming.add(item.text, hyp_str)
            row.hypotheses.append((hyp_off, hyp_str))
    print(f"model {runner.name}: {len(items)} utterances, {audio_s:.1f} s of audio; model CPU per audio second "
          f"{model_cpu / max(audio_s, 1e-9):.4f} offline, {cached.cpu / max(audio_s, 1e-9):.4f} streaming")
    for name, dec in decoders.items():
        print(f"  {name:9s} {describe(dec)}")
    head = f"{'decoder':10s} {'offline WER':>12s} {'CER':>7s} {'exact':>7s} {'decode ms/s':>12s}"
    if streaming:
        head += f" {'streaming WER':>14s} {'CER':>7s} {'exact':>7s} {'decode ms/s':>12s}"
    print(head)
    for name, row in rows.items():
        line = (f"{name:10s} {100 * row.offline.wer:11.2f}% {100 * row.offline.cer:6.2f}% "
                f"{100 * row.offline.sentence_accuracy:6.1f}% {1000 * row.offline_cpu / max(audio_s, 1e-9):12.2f}")
        if streaming:
            line += (f" {100 * row.streaming.wer:13.2f}% {100 * row.streaming.cer:6.2f}% "
                     f"{100 * row.streaming.sentence_accuracy:6.1f}% "
                     f"{1000 * row.streaming_cpu / max(audio_s, 1e-9):12.2f}")
        print(line)
    print("decode ms/s: CPU milliseconds (all threads) of decoding per second of audio, one stream; streaming "
          "includes the engine's window planning, partials every hop and finals (greedy: the engine alone)")
    if args.jsonl:
        import json

        with open(args.jsonl, "w", encoding="utf-8") as out:
            for i, item in enumerate(items):
                rec = {"audio": str(item.audio), "text": item.text, **item.extra}
                for name, row in rows.items():
                    rec[f"{name}_offline"], rec[f"{name}_streaming"] = row.hypotheses[i]
                out.write(json.dumps(rec) + "\n")
    return 0


def describe(dec: Any) -> str:
    """What decodes: greedy CTC, a word list, the lexicon-free search, and the LM."""
    if dec is None:
        return "greedy CTC (no word list)"
    parts = []
    if getattr(dec, "words", None):
        parts.append(f"the word list {dec.source} ({len(dec.words)} words)")
    else:
        parts.append(f"lexicon-free search (beam {dec._settings['beam_size']}, "
                     f"{dec._settings['beam_size_token']} letters per frame)")
    if getattr(dec, "lm", None) is not None:
        parts.append(f"the LM {dec.lm.source} (alpha {dec.lm.alpha:g}, beta {dec.lm.beta:g})")
    return " + ".join(parts)
