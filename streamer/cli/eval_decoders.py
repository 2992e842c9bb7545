"""``streamer eval --decoders``: greedy, word list, LM and LM + word list on one manifest, side by side.

:func:`streamer.evaluation.compare_decoders` decodes the same model outputs with each decoder; this module
parses ``--decoders`` and prints one row per decoder. Decoding CPU time is the process's CPU time outside the
model calls (all threads), per second of audio: what one stream's decoding costs, next to greedy decoding's
engine overhead.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from streamer.decoder import describe
from streamer.evaluation import DECODERS, compare_decoders
from streamer.exceptions import ConfigError

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.evaluation import ManifestItem

__all__ = ["parse_decoders", "print_decoders"]


def parse_decoders(text: str) -> list[str]:
    """``--decoders``: ``all`` or a comma-separated subset of :data:`streamer.evaluation.DECODERS`."""
    names = list(DECODERS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in DECODERS]
    if bad or not names:
        raise ConfigError(f"--decoders {text}: unknown decoder(s) {', '.join(bad) or '(none)'}; use 'all' or a "
                          f"comma-separated list of {', '.join(DECODERS)}")
    return names


def print_decoders(args: Any, cfg: Config, items: list[ManifestItem], chunk: int) -> int:
    """Run the manifest through every decoder of ``--decoders``; print one row per decoder."""
    names = parse_decoders(args.decoders)
    streaming = not args.no_streaming
    c = compare_decoders(cfg, items, names, chunk=chunk, streaming=streaming)
    audio_s = c.audio_seconds
    print(f"model {c.model}: {len(items)} utterances, {audio_s:.1f} s of audio; model CPU per audio second "
          f"{c.model_cpu_offline / max(audio_s, 1e-9):.4f} offline, "
          f"{c.model_cpu_streaming / max(audio_s, 1e-9):.4f} streaming")
    for name, dec in c.decoders.items():
        print(f"  {name:9s} {describe(dec)}")
    head = f"{'decoder':10s} {'offline WER':>12s} {'CER':>7s} {'exact':>7s} {'decode ms/s':>12s}"
    if streaming:
        head += f" {'streaming WER':>14s} {'CER':>7s} {'exact':>7s} {'decode ms/s':>12s}"
    print(head)
    for name, row in c.rows.items():
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
        with open(args.jsonl, "w", encoding="utf-8") as out:
            for i, item in enumerate(items):
                rec = {"audio": str(item.audio), "text": item.text, **item.extra}
                for name, row in c.rows.items():
                    rec[f"{name}_offline"], rec[f"{name}_streaming"] = row.hypotheses[i]
                out.write(json.dumps(rec) + "\n")
    return 0
