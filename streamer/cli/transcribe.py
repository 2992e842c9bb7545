"""``streamer transcribe``: stream files through the engine, as the daemon would."""

from __future__ import annotations

import argparse
import sys
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

from streamer.cli import add_config_args, load_cli_config
from streamer.exceptions import ConfigError
from streamer.formats import FORMATS, EventWriter

SAMPLE_TEXT = "turn on the kitchen lights"
"""what the shipped sample says (``streamer transcribe --sample``; the README's first command prints it)"""


def sample_path() -> Path:
    """The shipped sample recording: ``streamer/samples/kitchen.wav``, 1.9 s of espeak-ng speech at 16 kHz."""
    path = Path(str(resources.files("streamer") / "samples" / "kitchen.wav"))
    if not path.is_file():
        raise ConfigError(f"the shipped sample is missing from {path}; reinstall streamer")
    return path


def register(sub: Any) -> None:
    p = sub.add_parser(
        "transcribe",
        help="transcribe audio files through the streaming engine",
        description="Stream each FILE (any format libsndfile reads, any rate, any channels) through the "
        "streaming engine in chunks of --chunk-ms, exactly as live audio would arrive, and print the result.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="audio files")
    p.add_argument("--sample", action="store_true",
                   help=f"transcribe the short recording that ships with streamer ({SAMPLE_TEXT!r}, 16 kHz, "
                   "made with espeak-ng) before any FILE: a first try that needs nothing else")
    p.add_argument("-f", "--format", choices=FORMATS, default="text",
                   help="text: final transcript; jsonl: every partial/final event; srt/vtt: subtitles "
                   "(default: text)")
    p.add_argument("--chunk-ms", type=float, default=100.0, metavar="N",
                   help="arrival chunk size in milliseconds (default: 100)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--mqtt", action="store_true",
                   help="also publish every event to the [mqtt] broker, topics <prefix>/<file stem>/partial|final "
                   "(as mqtt.enabled = true does; see docs/mqtt.md)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamer.decoder import build_decoder
    from streamer.model import load_model
    from streamer.runner import geometry_of
    from streamer.transcribe import new_session, stream_file

    if args.chunk_ms <= 0:
        raise ConfigError(f"--chunk-ms must be positive, got {args.chunk_ms}")
    files = [str(sample_path()), *args.files] if args.sample else list(args.files)
    if not files:
        raise ConfigError("give one or more audio files, or --sample for the one that ships with streamer")
    cfg = load_cli_config(args)
    runner = load_model(cfg.model, max_batch=cfg.worker.max_batch)
    words = build_decoder(cfg.decoder, runner)
    mqtt = None
    if args.mqtt or cfg.mqtt.enabled:  # -- mqtt (streamer/aio/mqtt/publisher.py) --
        from streamer.aio.mqtt import PublisherThread

        mqtt = PublisherThread.started(cfg.mqtt, role="transcribe")
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for path in files:
            writer = EventWriter(args.format, out)
            bar = _progress_bar(path)
            # partials only where they are written: a transcript or subtitles show finals (and cost half the search)
            partials = args.format == "jsonl" or (mqtt is not None and cfg.mqtt.publish_partials)
            session = new_session(cfg, runner.vocab, words, geometry=geometry_of(runner), partials=partials)
            stream, session_id = Path(path).stem, uuid.uuid4().hex[:12]
            try:
                for event in stream_file(session, runner.run, path, args.chunk_ms, bar.update if bar else None):
                    writer.write(event)
                    if mqtt:
                        mqtt.publish(stream, session_id, event)
            finally:
                if bar:
                    bar.close()
            writer.close()
    finally:
        if args.output:
            out.close()
        if mqtt:
            mqtt.close()  # flushes, at most mqtt.flush_timeout_s
    return 0


class _Bar:
    """A tqdm bar in audio seconds, shown only when stderr is a terminal."""

    def __init__(self, name: str) -> None:
        from tqdm import tqdm

        fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}]"
        self.tqdm = tqdm(desc=name, unit="s", leave=False, file=sys.stderr, bar_format=fmt)

    def update(self, done: float, total: float) -> None:
        self.tqdm.total = total
        self.tqdm.n = done
        self.tqdm.refresh()

    def close(self) -> None:
        self.tqdm.close()


def _progress_bar(path: str) -> _Bar | None:
    return _Bar(path) if sys.stderr.isatty() else None
