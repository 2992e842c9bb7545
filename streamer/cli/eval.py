"""``streamer eval``: word and character error rates of the offline pass and of the streaming engine.

A manifest lists ``(audio, text)`` pairs, either as JSON lines (``{"audio": "a.wav", "text": "..."}``; the
keys ``audio_filepath``/``path`` and ``transcript``/``sentence`` work too) or as tab-separated lines
(``a.wav<TAB>text``). Relative paths are read relative to the manifest's directory. Generate one with
``python -m recipes.demo.data --split test -n 500 --manifest --out DIR`` (from a source checkout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamer.cli import add_config_args, load_cli_config
from streamer.exceptions import ConfigError

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.decoder import Decoder
    from streamer.runner import LocalRunner, Runner
    from streamer.scoring import ErrorRate

__all__ = ["Evaluation", "ManifestItem", "evaluate", "offline_text", "read_manifest", "register"]

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


def offline_text(runner: Runner, audio: np.ndarray, words: Decoder | None) -> str:
    """One full-utterance pass, decoded as the engine decodes: with the word list ``words``, or greedy CTC."""
    return decode_offline(runner, runner.run([audio])[0], words)


def decode_offline(runner: Runner, lp: np.ndarray, words: Decoder | None) -> str:
    """The log-probs of a full-utterance pass decoded as the engine decodes (word list or greedy CTC)."""
    from streamer.ctc import CtcSegment

    if words is not None:
        return " ".join(w.word for w in words.decode(lp))
    seg = CtcSegment(runner.vocab)
    if len(lp):
        ids = lp.argmax(axis=1)
        seg.push(0, ids, np.exp(lp[np.arange(len(ids)), ids]))
    return " ".join(seg.text().split())


@dataclass
class Evaluation:
    """One runner's results over a manifest (:func:`evaluate`)."""

    offline: ErrorRate
    streaming: ErrorRate
    offline_seconds: float = 0.0
    streaming_seconds: float = 0.0
    audio_seconds: float = 0.0
    hypotheses: list[tuple[str, str | None]] = field(default_factory=list)
    """per utterance: the offline text and the streaming text (None without streaming)"""
    frame_ids: list[np.ndarray] = field(default_factory=list)
    """per utterance: the argmax token of every frame of the offline pass"""


def evaluate(runner: LocalRunner, cfg: Config, lex: Decoder | None, items: list[ManifestItem], *, chunk: int,
             streaming: bool, desc: str = "eval") -> Evaluation:
    """Transcribe every item offline (one pass) and, with ``streaming``, through the engine in ``chunk`` samples."""
    from tqdm import tqdm

    from streamer.runner import geometry_of
    from streamer.scoring import ErrorRate
    from streamer.transcribe import new_session, stream_array, text_of

    ev = Evaluation(ErrorRate(), ErrorRate())
    for item in tqdm(items, desc=desc, unit="utt", file=sys.stderr, disable=not sys.stderr.isatty()):
        audio = load_16k(item.audio)
        ev.audio_seconds += len(audio) / 16000
        s0 = runner.stats.seconds
        lp = runner.run([audio])[0]
        hyp_off = decode_offline(runner, lp, lex)
        s1 = runner.stats.seconds
        ev.offline_seconds += s1 - s0
        ev.frame_ids.append(lp.argmax(-1) if len(lp) else np.zeros(0, np.int64))
        ev.offline.add(item.text, hyp_off)
        hyp_str = None
        if streaming:
            session = new_session(cfg, runner.vocab, lex, geometry=geometry_of(runner))
            hyp_str = " ".join(text_of(stream_array(session, runner.run, audio, chunk)).split())
            ev.streaming_seconds += runner.stats.seconds - s1
            ev.streaming.add(item.text, hyp_str)
        ev.hypotheses.append((hyp_off, hyp_str))
    return ev


def _load(cfg: Config) -> tuple[LocalRunner, Decoder | None]:
    from streamer.decoder import build_decoder
    from streamer.model import load_model

    runner = load_model(cfg.model, max_batch=cfg.worker.max_batch)
    return runner, build_decoder(cfg.decoder, runner)


def _describe(runner: LocalRunner) -> str:
    return f"{runner.backend} {runner.precision} on {runner.device}"


def run(args: argparse.Namespace) -> int:
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
        from streamer.cli.eval_decoders import compare_decoders

        return compare_decoders(args, cfg, items, chunk)
    runner, lex = _load(cfg)
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
                                      "streaming": hyp_str, **item.extra}) + "\n")
    finally:
        if out:
            out.close()

    print(f"model {runner.name} ({_describe(runner)}), decoding with {_decoding(lex)}: {len(items)} utterances, "
          f"{ev.audio_seconds:.1f} s of audio")
    print(f"{'':10s} {'WER':>8s} {'CER':>8s} {'exact':>8s} {'RTF':>8s}")

    def row(name: str, e: ErrorRate, secs: float) -> None:
        print(f"{name:10s} {100 * e.wer:7.2f}% {100 * e.cer:7.2f}% {100 * e.sentence_accuracy:7.1f}% "
              f"{secs / max(ev.audio_seconds, 1e-9):8.4f}")

    row("offline", off, ev.offline_seconds)
    if not args.no_streaming:
        row("streaming", strm, ev.streaming_seconds)
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


def _decoding(lex: Decoder | None) -> str:
    from streamer.cli.eval_decoders import describe

    return describe(lex)


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
    from streamer.model import resolve_model
    from streamer.onnx import check_export, is_export

    backend, dtype = parse_backend(args.compare_backend)
    ref_id = cfg.model.id
    if is_export(resolve_model(ref_id)):  # the reference is the torch checkpoint the export came from
        info = check_export(Path(resolve_model(ref_id)), files=())
        ref_id = "demo" if info.data.get("name") == "demo" else info.source
    ref_cfg = cfg.replace(model=dataclasses.replace(cfg.model, id=ref_id, backend="torch", dtype="float32"))
    new_cfg = cfg.replace(model=dataclasses.replace(cfg.model, backend=backend, dtype=dtype))
    streaming = not args.no_streaming
    ref_runner, ref_lex = _load(ref_cfg)
    ref = evaluate(ref_runner, ref_cfg, ref_lex, items, chunk=chunk, streaming=streaming, desc="torch float32")
    del ref_runner
    new_runner, new_lex = _load(new_cfg)
    new = evaluate(new_runner, new_cfg, new_lex, items, chunk=chunk, streaming=streaming,
                   desc=_describe(new_runner))
    frames = sum(len(a) for a in ref.frame_ids)
    agree = sum(int((a == b).sum()) for a, b in zip(ref.frame_ids, new.frame_ids, strict=True))
    same = sum(a[0] == b[0] for a, b in zip(ref.hypotheses, new.hypotheses, strict=True))
    print(f"model {cfg.model.id}, decoding with {_decoding(new_lex)}: {len(items)} utterances, "
          f"{ref.audio_seconds:.1f} s of audio")
    print(f"{'':24s} {'offline WER':>12s} {'CER':>8s} {'RTF':>8s}" + (
        f" {'streaming WER':>14s} {'CER':>8s} {'RTF':>8s}" if streaming else ""))
    for name, ev in (("torch float32", ref), (_describe(new_runner), new)):
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
