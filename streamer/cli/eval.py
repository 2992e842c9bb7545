"""``streamer eval``: word and character error rates of the offline pass and of the streaming engine.

A manifest lists ``(audio, text)`` pairs, either as JSON lines (``{"audio": "a.wav", "text": "..."}``; the
keys ``audio_filepath``/``path`` and ``transcript``/``sentence`` work too) or as tab-separated lines
(``a.wav<TAB>text``). Relative paths are read relative to the manifest's directory. Generate one with
``python -m recipes.demo.data --split test -n 500 --manifest --out DIR`` (from a source checkout).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamer.cli import add_config_args, load_cli_config
from streamer.exceptions import ConfigError

if TYPE_CHECKING:
    from streamer.lexicon import Lexicon
    from streamer.runner import Runner

__all__ = ["ManifestItem", "offline_text", "read_manifest", "register"]

TEXT_KEYS = ("text", "transcript", "sentence")
AUDIO_KEYS = ("audio", "audio_filepath", "path", "file")


@dataclass(frozen=True)
class ManifestItem:
    audio: Path
    text: str
    extra: dict[str, Any] = field(default_factory=dict)
    """the JSON line's other keys (voice, speaker, ...), for ``--group-by``"""


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
    add_config_args(p)
    p.set_defaults(func=run)


def read_manifest(path: str | Path) -> list[ManifestItem]:
    """Parse a JSONL or TSV manifest; audio paths are resolved against the manifest's directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such manifest file")
    root = path.parent
    items = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not valid JSON ({exc})") from None
            audio = next((rec[k] for k in AUDIO_KEYS if k in rec), None)
            text = next((rec[k] for k in TEXT_KEYS if k in rec), None)
            if not isinstance(audio, str) or not isinstance(text, str):
                raise ConfigError(f"{path}:{n}: a JSON line needs string 'audio' and 'text' keys")
            extra = {k: v for k, v in rec.items() if k not in AUDIO_KEYS and k not in TEXT_KEYS}
        else:
            extra = {}
            audio, sep, text = raw.partition("\t")
            if not sep:
                raise ConfigError(f"{path}:{n}: expected 'path<TAB>text' or a JSON object")
            if n == 1 and audio.strip().lower() in AUDIO_KEYS and text.strip().lower() in TEXT_KEYS:
                continue  # header
        p = Path(audio.strip()).expanduser()
        items.append(ManifestItem(p if p.is_absolute() else root / p, text.strip(), extra))
    if not items:
        raise ConfigError(f"{path}: the manifest lists no utterances")
    return items


def load_16k(path: Path) -> np.ndarray:
    """A whole file as 16 kHz mono float32 (the same conversion the streaming edge applies)."""
    from streamer.audio import AudioConverter, read_audio

    data, rate = read_audio(path)
    conv = AudioConverter(rate, data.shape[1])
    return np.concatenate([conv.convert(data), conv.convert(np.zeros((0, data.shape[1]), np.float32), last=True)])


def offline_text(runner: Runner, audio: np.ndarray, words: Lexicon | None) -> str:
    """One full-utterance pass, decoded as the engine decodes: with the word list ``words``, or greedy CTC."""
    from streamer.ctc import CtcSegment

    lp = runner.run([audio])[0]
    if words is not None:
        return " ".join(w.word for w in words.decode(lp))
    seg = CtcSegment(runner.vocab)
    if len(lp):
        ids = lp.argmax(axis=1)
        seg.push(0, ids, np.exp(lp[np.arange(len(ids)), ids]))
    return " ".join(seg.text().split())


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from streamer.decoder import build_decoder
    from streamer.model import load_model
    from streamer.scoring import ErrorRate, normalise_text
    from streamer.transcribe import new_session, stream_array, text_of

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
    runner = load_model(cfg.model, max_batch=cfg.worker.max_batch)
    lex = build_decoder(cfg.decoder, runner)
    chunk = max(1, int(round(16 * args.chunk_ms)))
    off, strm = ErrorRate(), ErrorRate()
    groups: dict[str, tuple[ErrorRate, ErrorRate]] = {}
    t_off = t_str = audio_s = 0.0
    bad: list[tuple[str, str, str]] = []
    out = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None  # noqa: SIM115
    try:
        for item in tqdm(items, desc="eval", unit="utt", file=sys.stderr, disable=not sys.stderr.isatty()):
            audio = load_16k(item.audio)
            audio_s += len(audio) / 16000
            s0 = runner.stats.seconds
            hyp_off = offline_text(runner, audio, lex)
            s1 = runner.stats.seconds
            t_off += s1 - s0
            off.add(item.text, hyp_off)
            hyp_str = None
            if not args.no_streaming:
                session = new_session(cfg, runner.vocab, lex)
                hyp_str = " ".join(text_of(stream_array(session, runner.run, audio, chunk)).split())
                t_str += runner.stats.seconds - s1
                strm.add(item.text, hyp_str)
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
                                      "streaming": hyp_str, **item.extra}) + "\n")
    finally:
        if out:
            out.close()

    decoding = f"the word list {lex.source} ({len(lex)} words)" if lex else "greedy CTC (no word list)"
    print(f"model {runner.name} on {runner.device}, decoding with {decoding}: {len(items)} utterances, "
          f"{audio_s:.1f} s of audio")
    print(f"{'':10s} {'WER':>8s} {'CER':>8s} {'exact':>8s} {'RTF':>8s}")

    def row(name: str, e: ErrorRate, secs: float) -> None:
        print(f"{name:10s} {100 * e.wer:7.2f}% {100 * e.cer:7.2f}% {100 * e.sentence_accuracy:7.1f}% "
              f"{secs / max(audio_s, 1e-9):8.4f}")

    row("offline", off, t_off)
    if not args.no_streaming:
        row("streaming", strm, t_str)
        print(f"{'difference':10s} {100 * (strm.wer - off.wer):+7.2f}  {100 * (strm.cer - off.cer):+7.2f}   "
              "(streaming - offline, points)")
    if groups:
        print(f"\n{args.group_by:24s} {'utts':>5s} {'offline WER':>12s} {'streaming WER':>14s}")
        for name, (g_off, g_str) in sorted(groups.items(), key=lambda kv: (-kv[1][0].wer, kv[0])):
            streaming = "" if args.no_streaming else f"{100 * g_str.wer:13.2f}%"
            print(f"{name:24s} {g_off.utterances:5d} {100 * g_off.wer:11.2f}% {streaming}")
    for ref, h_off, h_str in bad[: args.errors]:
        print(f"\n  ref:       {ref}\n  offline:   {h_off}" + ("" if args.no_streaming else f"\n  streaming: {h_str}"))
    return 0
