"""Measuring accuracy on a manifest: the offline pass and the streaming engine, backends and decoders side by side.

A manifest lists ``(audio, text)`` pairs, either as JSON lines (``{"audio": "a.wav", "text": "..."}``; the
keys ``audio_filepath``/``path`` and ``transcript``/``sentence`` work too) or as tab-separated lines
(``a.wav<TAB>text``). Relative paths are read relative to the manifest's directory. Generate one with
``python -m recipes.demo.data --split test -n 500 --manifest --out DIR`` (from a source checkout).

:func:`evaluate` transcribes every item with one offline full-utterance pass and, optionally, through the
streaming engine; :func:`compare_backends` runs a manifest through torch float32 and another backend;
:func:`compare_decoders` decodes the same model outputs with several decoders. They return the figures;
``streamer eval`` (:mod:`streamer.cli.eval`) prints them, and the demo recipe tunes its LM with them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamer.exceptions import ConfigError

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.decoder import Decoder
    from streamer.runner import LocalRunner, Runner
    from streamer.scoring import ErrorRate

__all__ = ["DECODERS", "BackendComparison", "CachedRun", "DecoderComparison", "DecoderRow", "Evaluation",
           "ManifestItem", "build_decoders", "compare_backends", "compare_decoders", "decode_offline",
           "describe_runner", "evaluate", "load_16k", "load_runner", "offline_text", "read_manifest",
           "reads_by_characters"]

TEXT_KEYS = ("text", "transcript", "sentence")
AUDIO_KEYS = ("audio", "audio_filepath", "path", "file")


@dataclass(frozen=True)
class ManifestItem:
    audio: Path
    text: str
    extra: dict[str, Any] = field(default_factory=dict)
    """the JSON line's other keys (voice, speaker, ...), for ``--group-by``"""


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
    from streamer.text import join_words

    if words is not None:
        return join_words(w.word for w in words.decode(lp))
    seg = CtcSegment(runner.vocab)
    if len(lp):
        ids = lp.argmax(axis=1)
        seg.push(0, ids, np.exp(lp[np.arange(len(ids)), ids]))
    return " ".join(seg.text().split())


def load_runner(cfg: Config) -> tuple[LocalRunner, Decoder | None]:
    """The model of ``cfg.model`` in this process, and the decoder of ``cfg.decoder`` spelled with its tokens."""
    from streamer.decoder import build_decoder
    from streamer.model import load_model

    runner = load_model(cfg.model, max_batch=cfg.worker.max_batch)
    return runner, build_decoder(cfg.decoder, runner)


def _progress(items: list[ManifestItem], desc: str) -> Any:
    """``items`` with a progress bar on stderr when it is a terminal."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="utt", file=sys.stderr, disable=not sys.stderr.isatty())


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
    by_characters: bool = False
    """the model writes a script without spaces (:func:`reads_by_characters`): its CER is the figure to read"""


def reads_by_characters(runner: Runner) -> bool:
    """Whether the model's letters are mostly of a script written without spaces (Chinese, Japanese): a word of
    such text is one character (:func:`streamer.text.split_words`), so ``streamer eval`` leads with the CER."""
    from streamer.text import spaceless

    return spaceless(runner.vocab.token_ids)


def evaluate(runner: LocalRunner, cfg: Config, lex: Decoder | None, items: list[ManifestItem], *, chunk: int,
             streaming: bool, desc: str = "eval") -> Evaluation:
    """Transcribe every item offline (one pass) and, with ``streaming``, through the engine in ``chunk`` samples."""
    from streamer.runner import geometry_of
    from streamer.scoring import ErrorRate
    from streamer.transcribe import new_session, stream_array, text_of

    ev = Evaluation(ErrorRate(), ErrorRate(), by_characters=reads_by_characters(runner))
    for item in _progress(items, desc):
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


def describe_runner(runner: LocalRunner) -> str:
    """Backend, precision and device: ``onnxruntime int8 on cpu``."""
    return f"{runner.backend} {runner.precision} on {runner.device}"


@dataclass
class BackendComparison:
    """A manifest through torch float32 and through another backend (:func:`compare_backends`)."""

    reference: Evaluation
    """torch float32's results"""
    other: Evaluation
    other_name: str
    """the other runner as :func:`describe_runner` names it"""
    other_decoder: Decoder | None
    frames: int
    """frames of the offline passes"""
    agreeing_frames: int
    """frames whose argmax token is the same in both"""
    same_texts: int
    """utterances whose offline text is the same in both"""


def compare_backends(cfg: Config, items: list[ManifestItem], backend: str, dtype: str, *, chunk: int,
                     streaming: bool) -> BackendComparison:
    """The manifest through torch float32 (the torch checkpoint an export came from) and through ``backend``
    in ``dtype``, one after the other (one model in memory at a time)."""
    from streamer.checkpoint import resolve_model
    from streamer.onnx import check_export, is_export

    ref_id = cfg.model.id
    if is_export(resolve_model(ref_id)):  # the reference is the torch checkpoint the export came from
        info = check_export(Path(resolve_model(ref_id)), files=())
        ref_id = "demo" if info.data.get("name") == "demo" else info.source
    ref_cfg = cfg.replace(model=dataclasses.replace(cfg.model, id=ref_id, backend="torch", dtype="float32"))
    new_cfg = cfg.replace(model=dataclasses.replace(cfg.model, backend=backend, dtype=dtype))
    ref_runner, ref_lex = load_runner(ref_cfg)
    ref = evaluate(ref_runner, ref_cfg, ref_lex, items, chunk=chunk, streaming=streaming, desc="torch float32")
    del ref_runner
    new_runner, new_lex = load_runner(new_cfg)
    name = describe_runner(new_runner)
    new = evaluate(new_runner, new_cfg, new_lex, items, chunk=chunk, streaming=streaming, desc=name)
    frames = sum(len(a) for a in ref.frame_ids)
    agree = sum(int((a == b).sum()) for a, b in zip(ref.frame_ids, new.frame_ids, strict=True))
    same = sum(a[0] == b[0] for a, b in zip(ref.hypotheses, new.hypotheses, strict=True))
    return BackendComparison(ref, new, name, new_lex, frames, agree, same)


DECODERS = ("greedy", "words", "lm", "lm+words")
"""the decoders :func:`compare_decoders` compares: ``cfg.decoder``'s word list and LM, each alone and together"""


def build_decoders(cfg: Config, runner: Runner, names: Sequence[str]) -> dict[str, Decoder | None]:
    """Each named decoder from ``cfg.decoder`` (its word list and its LM, each alone or together)."""
    from streamer.decoder import build_decoder
    from streamer.lexicon import Lexicon

    d = cfg.decoder
    variants = {"greedy": dataclasses.replace(d, words="", lm="", hotwords=""),
                "words": dataclasses.replace(d, lm=""),
                "lm": dataclasses.replace(d, words=""),
                "lm+words": d}
    out: dict[str, Decoder | None] = {}
    for name in names:
        dec = build_decoder(variants[name], runner)
        if name in ("words", "lm+words") and not isinstance(dec, Lexicon):
            raise ConfigError(f"--decoders {name}: no word list (decoder.words = {d.words!r} finds none)")
        if name in ("lm", "lm+words") and (dec is None or dec.lm is None):
            raise ConfigError(f"--decoders {name}: no language model (decoder.lm = {d.lm!r} finds none)")
        out[name] = dec
    return out


class CachedRun:
    """The runner's ``run`` with each window's output kept for the utterance (every decoder sees the same
    windows), and the process CPU time spent in model calls. Call :meth:`clear` between utterances."""

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

    def clear(self) -> None:
        self.cache.clear()


@dataclass
class DecoderRow:
    """One decoder's results over a manifest (:func:`compare_decoders`)."""

    offline: ErrorRate
    streaming: ErrorRate
    offline_cpu: float = 0.0
    """process CPU seconds (all threads) spent decoding the offline passes"""
    streaming_cpu: float = 0.0
    """process CPU seconds spent streaming, less the model calls"""
    hypotheses: list[tuple[str, str | None]] = field(default_factory=list)
    """per utterance: the offline text and the streaming text (None without streaming)"""


@dataclass
class DecoderComparison:
    """Decoders on the same model outputs (:func:`compare_decoders`)."""

    model: str
    decoders: dict[str, Decoder | None]
    rows: dict[str, DecoderRow]
    audio_seconds: float
    model_cpu_offline: float
    """process CPU seconds in the model's offline passes"""
    model_cpu_streaming: float
    """process CPU seconds in the model's streaming windows (each window run once for all decoders)"""


def compare_decoders(cfg: Config, items: list[ManifestItem], names: Sequence[str], *, chunk: int,
                     streaming: bool) -> DecoderComparison:
    """Run the manifest through every decoder of ``names`` (of :data:`DECODERS`) on the same model outputs.

    The model runs once per utterance offline and once per streaming window (its outputs are reused by every
    decoder: the windows do not depend on the decoder). Decoding CPU time is the process's CPU time outside
    the model calls (all threads).
    """
    from streamer.model import load_model
    from streamer.runner import geometry_of
    from streamer.scoring import ErrorRate
    from streamer.transcribe import new_session, stream_array, text_of

    runner = load_model(cfg.model, max_batch=cfg.worker.max_batch)
    decoders = build_decoders(cfg, runner, names)
    rows = {n: DecoderRow(ErrorRate(), ErrorRate()) for n in names}
    audio_s = 0.0
    model_cpu = 0.0
    cached = CachedRun(runner)
    for item in _progress(items, "eval"):
        audio = load_16k(item.audio)
        audio_s += len(audio) / 16000
        c0 = time.process_time()
        lp = runner.run([audio])[0]
        model_cpu += time.process_time() - c0
        cached.clear()
        for name, dec in decoders.items():
            row = rows[name]
            c0 = time.process_time()
            hyp_off = decode_offline(runner, lp, dec)
            row.offline_cpu += time.process_time() - c0
            row.offline.add(item.text, hyp_off)
            hyp_str = None
            if streaming:
                session = new_session(cfg, runner.vocab, dec, geometry=geometry_of(runner))
                c0, m0 = time.process_time(), cached.cpu
                hyp_str = " ".join(text_of(stream_array(session, cached, audio, chunk)).split())
                row.streaming_cpu += time.process_time() - c0 - (cached.cpu - m0)
                row.streaming.add(item.text, hyp_str)
            row.hypotheses.append((hyp_off, hyp_str))
    return DecoderComparison(runner.name, decoders, rows, audio_s, model_cpu, cached.cpu)
