"""``streamer eval``: word and character error rates of the offline pass and of the streaming engine.

The measuring is :mod:`streamer.evaluation` (manifests, the offline pass, backends and decoders compared);
this module parses the command line and prints the tables.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from streamer.cli import add_config_args, load_cli_config
from streamer.exceptions import ConfigError

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.evaluation import ManifestItem

__all__ = ["parse_backend", "register"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="WER and CER of the offline pass and of the streaming engine on a manifest",
        description="For every (audio, text) pair of MANIFEST, transcribe the audio with one offline "
        "full-utterance pass and with the streaming engine (arrival chunks of --chunk-ms, the configured "
        "schedule and endpointing), and print the word and character error rates of both and their "
        "difference. MANIFEST: JSON lines with 'audio' and 'text' keys, or 'path<TAB>text' lines; relative "
        "paths are relative to the manifest.",
    )
    p.add_argument("manifest", metavar="MANIFEST", help="JSONL or TSV manifest of (audio, text)")
    p.add_argument("--chunk-ms", type=float, default=100.0, metavar="N",
                   help="streaming arrival chunk in milliseconds (default: 100)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N items (default: all)")
    p.add_argument("--errors", type=int, default=0, metavar="N",
                   help="also print the first N utterances whose streaming or offline text is wrong")
    p.add_argument("--no-streaming", action="store_true", help="offline pass only")
    p.add_argument("--jsonl", metavar="FILE", help="write per-utterance results (references, hypotheses)")
    p.add_argument("--group-by", metavar="KEY",
                   help="also print WER per value of this manifest key (e.g. voice, speaker), worst first")
    p.add_argument("--compare-backend", metavar="BACKEND[:DTYPE]",
                   help="accuracy gate: run the manifest through torch float32 and through this backend (e.g. "
                   "onnxruntime:int8, torch:int8, torch:bfloat16) and print frame agreement and the WER and CER "
                   "differences; run it before using int8 with a checkpoint")
    p.add_argument("--max-wer-increase", type=float, metavar="POINTS",
                   help="with --compare-backend: exit 1 when the backend's WER (offline or streaming) is more than "
                   "POINTS above torch float32's")
    p.add_argument("--decoders", metavar="LIST",
                   help="compare decoders on the same model outputs: 'all' or a comma-separated subset of greedy, "
                   "words, lm, lm+words (the configured word list and LM, alone and together); prints WER, CER and "
                   "decoding CPU per audio second of each, offline and streaming")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamer.decoder import describe
    from streamer.evaluation import describe_runner, evaluate, load_runner, read_manifest
    from streamer.scoring import ErrorRate, normalise_text

    if args.chunk_ms <= 0:
        raise ConfigError(f"--chunk-ms must be positive, got {args.chunk_ms}")
    items = read_manifest(args.manifest)
    if args.limit > 0:
        items = items[: args.limit]
    if args.group_by and not any(args.group_by in i.extra for i in items):
        keys = sorted({k for i in items for k in i.extra})
        raise ConfigError(f"--group-by {args.group_by}: no manifest line has that key; "
                          f"keys present: {', '.join(keys) or 'none (a TSV manifest has no extra keys)'}")
    cfg = load_cli_config(args)
    chunk = max(1, int(round(16 * args.chunk_ms)))
    if args.compare_backend:
        return compare(args, cfg, items, chunk)
    if args.decoders:
        from streamer.cli.eval_decoders import print_decoders

        return print_decoders(args, cfg, items, chunk)
    runner, lex = load_runner(cfg)
    ev = evaluate(runner, cfg, lex, items, chunk=chunk, streaming=not args.no_streaming)
    off, strm = ev.offline, ev.streaming
    groups: dict[str, tuple[ErrorRate, ErrorRate]] = {}
    bad: list[tuple[str, str, str]] = []
    out = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None  # noqa: SIM115
    try:
        for item, (hyp_off, hyp_str) in zip(items, ev.hypotheses, strict=True):
            if args.group_by:
                g_off, g_str = groups.setdefault(str(item.extra.get(args.group_by, "-")), (ErrorRate(), ErrorRate()))
                g_off.add(item.text, hyp_off)
                if hyp_str is not None:
                    g_str.add(item.text, hyp_str)
            ref = normalise_text(item.text)
            if ref != normalise_text(hyp_off) or (hyp_str is not None and ref != normalise_text(hyp_str)):
                bad.append((ref, hyp_off, hyp_str or ""))
            if out:
                out.write(json.dumps({"audio": str(item.audio), "text": item.text, "offline": hyp_off,
                                      "streaming": hyp_str, **item.extra}, ensure_ascii=False) + "\n")
    finally:
        if out:
            out.close()

    print(f"model {runner.name} ({describe_runner(runner)}), decoding with {describe(lex)}: {len(items)} utterances, "
          f"{ev.audio_seconds:.1f} s of audio")
    # A script written without spaces (Chinese, Japanese): a word is a character, and the CER is what to read.
    rates = ("CER", "WER") if ev.by_characters else ("WER", "CER")
    if ev.by_characters:
        print("the model writes a script without spaces: CER first (WER counts each character as a word)")
    print(f"{'':10s} {rates[0]:>8s} {rates[1]:>8s} {'exact':>8s} {'RTF':>8s}")

    def pair(e: ErrorRate) -> tuple[float, float]:
        return (e.cer, e.wer) if ev.by_characters else (e.wer, e.cer)

    def row(name: str, e: ErrorRate, secs: float) -> None:
        first, second = pair(e)
        print(f"{name:10s} {100 * first:7.2f}% {100 * second:7.2f}% {100 * e.sentence_accuracy:7.1f}% "
              f"{secs / max(ev.audio_seconds, 1e-9):8.4f}")

    row("offline", off, ev.offline_seconds)
    if not args.no_streaming:
        row("streaming", strm, ev.streaming_seconds)
        (s1, s2), (o1, o2) = pair(strm), pair(off)
        print(f"{'difference':10s} {100 * (s1 - o1):+7.2f}  {100 * (s2 - o2):+7.2f}   (streaming - offline, points)")
    if groups:
        print(f"\n{args.group_by:24s} {'utts':>5s} {'offline ' + rates[0]:>12s} {'streaming ' + rates[0]:>14s}")
        for name, (g_off, g_str) in sorted(groups.items(), key=lambda kv: (-pair(kv[1][0])[0], kv[0])):
            streaming = "" if args.no_streaming else f"{100 * pair(g_str)[0]:13.2f}%"
            print(f"{name:24s} {g_off.utterances:5d} {100 * pair(g_off)[0]:11.2f}% {streaming}")
    for ref, h_off, h_str in bad[: args.errors]:
        print(f"\n  ref:       {ref}\n  offline:   {h_off}" + ("" if args.no_streaming else f"\n  streaming: {h_str}"))
    return 0


def parse_backend(text: str) -> tuple[str, str]:
    """``BACKEND[:DTYPE]`` of ``--compare-backend``: ``onnxruntime:int8``, ``torch:bfloat16``, ``onnxruntime``."""
    from streamer.config import ModelConfig

    backend, _, dtype = text.partition(":")
    try:
        ModelConfig(backend=backend, dtype=dtype or "auto")
    except ConfigError as exc:
        raise ConfigError(f"--compare-backend {text}: {exc}; e.g. onnxruntime:int8, torch:int8, torch:bfloat16"
                          ) from None
    return backend, dtype or "auto"


def compare(args: argparse.Namespace, cfg: Config, items: list[ManifestItem], chunk: int) -> int:
    """``--compare-backend``: the manifest through torch float32 and through the chosen backend, side by side."""
    from streamer.decoder import describe
    from streamer.evaluation import compare_backends

    backend, dtype = parse_backend(args.compare_backend)
    streaming = not args.no_streaming
    c = compare_backends(cfg, items, backend, dtype, chunk=chunk, streaming=streaming)
    ref, new, frames, agree, same = c.reference, c.other, c.frames, c.agreeing_frames, c.same_texts
    print(f"model {cfg.model.id}, decoding with {describe(c.other_decoder)}: {len(items)} utterances, "
          f"{ref.audio_seconds:.1f} s of audio")
    print(f"{'':24s} {'offline WER':>12s} {'CER':>8s} {'RTF':>8s}" + (
        f" {'streaming WER':>14s} {'CER':>8s} {'RTF':>8s}" if streaming else ""))
    for name, ev in (("torch float32", ref), (c.other_name, new)):
        line = (f"{name:24s} {100 * ev.offline.wer:11.2f}% {100 * ev.offline.cer:7.2f}% "
                f"{ev.offline_seconds / max(ev.audio_seconds, 1e-9):8.4f}")
        if streaming:
            line += (f" {100 * ev.streaming.wer:13.2f}% {100 * ev.streaming.cer:7.2f}% "
                     f"{ev.streaming_seconds / max(ev.audio_seconds, 1e-9):8.4f}")
        print(line)
    d_wer = 100 * (new.offline.wer - ref.offline.wer)
    line = f"{'difference (points)':24s} {d_wer:+11.2f}  {100 * (new.offline.cer - ref.offline.cer):+7.2f}  {'':8s}"
    if streaming:
        d_wer = max(d_wer, 100 * (new.streaming.wer - ref.streaming.wer))
        line += (f" {100 * (new.streaming.wer - ref.streaming.wer):+13.2f}  "
                 f"{100 * (new.streaming.cer - ref.streaming.cer):+7.2f}")
    print(line)
    print(f"frame agreement with torch float32 (offline argmax): {100 * agree / max(frames, 1):.2f} % of {frames} "
          f"frames; same offline text: {same}/{len(items)} utterances")
    if args.max_wer_increase is None:
        return 0
    ok = d_wer <= args.max_wer_increase
    print(f"gate: WER {d_wer:+.2f} points against torch float32, at most {args.max_wer_increase:+.2f} allowed: "
          + ("passed" if ok else "FAILED: keep float32 for this checkpoint"))
    return 0 if ok else 1
