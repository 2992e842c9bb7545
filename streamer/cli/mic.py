"""``streamer mic``: live dictation from a microphone through the streaming engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
from typing import TYPE_CHECKING, Any, TextIO

from streamer.aio import loop as event_loop
from streamer.cli import add_config_args, load_cli_config
from streamer.events import Event, Final
from streamer.exceptions import ConfigError
from streamer.formats import EventWriter

if TYPE_CHECKING:
    from streamer.aio.sources.capture import Capture
    from streamer.config import Config
    from streamer.engine import WordDecoder
    from streamer.runner import Runner

CLEAR_LINE = "\r\x1b[2K"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mic",
        help="live dictation from a microphone",
        description="Capture a microphone at its own rate and channels, convert to 16 kHz mono, and stream it "
        "through the engine. On a terminal the partial line is rewritten in place and each final is committed "
        "as a line; in a pipe every final (text) or event (jsonl) is printed and flushed at once. Ctrl-C, or "
        "the end of --duration, finalises the last words and exits.",
    )
    p.add_argument("--device", dest="input_device", metavar="NAME|INDEX",
                   help="input device: its index, name or part of the name (default: the system default input)")
    p.add_argument("--list-devices", action="store_true",
                   help="list the input devices with their default rates and channels, and exit")
    p.add_argument("--rate", type=int, default=0, metavar="HZ", help="capture rate (default: the device's)")
    p.add_argument("--channels", type=int, default=0, metavar="N",
                   help="channels to capture, averaged to mono (default: the device's, at most 2)")
    p.add_argument("-f", "--format", choices=("text", "jsonl"), default="text",
                   help="text: the dictation; jsonl: every partial/final event (default: text)")
    p.add_argument("-o", "--output", metavar="FILE", help="also append each final, one per line, to FILE")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="stop after this many seconds of audio (default: until Ctrl-C)")
    p.add_argument("--mqtt", action="store_true",
                   help="also publish every event to the [mqtt] broker, topics <prefix>/<name>/partial|final "
                   "(as mqtt.enabled = true does; see docs/mqtt.md)")
    p.add_argument("--name", default="mic", help="the stream's name, in MQTT topics (default: mic)")
    add_config_args(p, model=False)
    p.add_argument("-m", "--model", metavar="M",
                   help="'demo' (default), a checkpoint directory, or a Hugging Face hub id")
    p.add_argument("--model-device", metavar="D", help="where the model runs: auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamer.aio.sources.capture import Capture, describe_devices, find_device, input_devices

    if args.list_devices:
        devices = input_devices()
        if not devices:
            print(describe_devices(devices), file=sys.stderr)
        for d in devices:
            mark = "*" if d.default else " "
            print(f"{mark} {d.index:3d}  {d.name}  ({d.hostapi}, {d.sample_rate} Hz, {d.channels} ch)", flush=True)
        return 0
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    if args.rate < 0 or args.channels < 0:
        raise ConfigError("--rate and --channels must be positive (0 = the device's)")
    cfg = load_cli_config(args)
    # Before loading the model: a wrong device name, rate or channel count fails at once.
    capture = Capture(find_device(args.input_device), sample_rate=args.rate, channels=args.channels,
                      duration=args.duration)
    capture.check()
    append = open(args.output, "a", encoding="utf-8") if args.output else None  # noqa: SIM115
    try:
        from streamer.decoder import build_decoder
        from streamer.model import load_model

        runner = load_model(cfg.model, max_batch=cfg.worker.max_batch)
        words = build_decoder(cfg.decoder, runner)
        view = Dictation(args.format, sys.stdout, sys.stdout.isatty(), append)
        return event_loop.run(dictate(cfg, runner, words, capture, view, name=args.name,
                                      mqtt=args.mqtt or cfg.mqtt.enabled), cfg.server.loop)
    finally:
        if append is not None:
            append.close()


async def dictate(cfg: Config, runner: Runner, words: WordDecoder | None, capture: Capture, view: Dictation, *,
                  name: str = "mic", mqtt: bool = False) -> int:
    """Capture until Ctrl-C / SIGTERM / --duration; the model runs in the worker's thread."""
    from streamer.aio.hub import Hub
    from streamer.aio.metrics import Metrics
    from streamer.aio.sources.capture import pump
    from streamer.aio.stream import Streams
    from streamer.aio.worker import BatchWorker

    loop = asyncio.get_running_loop()
    metrics, hub = Metrics(), Hub()
    worker = BatchWorker(runner, cfg.worker, metrics)
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(130)  # a second Ctrl-C: give up on the last words
        capture.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    worker.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if mqtt:  # MQTT: events reach it through the hub, as in the daemon
                from streamer.aio.mqtt.publisher import running_publisher

                hub.sinks.append(await stack.enter_async_context(running_publisher(cfg.mqtt, metrics, status=False,
                                                                                   role="mic")))
            await stack.enter_async_context(capture)
            if sys.stderr.isatty():
                print(f"listening on {capture.device.describe()} at {capture.sample_rate} Hz, {capture.channels} ch; "
                      "Ctrl-C to stop", file=sys.stderr, flush=True)
            streams = Streams(cfg, runner.vocab, worker, hub, metrics, words)
            stream = streams.open(sample_rate=capture.sample_rate, channels=capture.channels, name=name)
            stream.wants_partials = view.shows_partials  # (MQTT's publish_partials asks for them through the hub)
            try:
                await pump(capture, stream, view.show)
            finally:
                view.close()
    finally:
        await worker.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


class Dictation:
    """Shows events as they come: in place on a terminal, one flushed line each in a pipe."""

    def __init__(self, fmt: str, out: TextIO, tty: bool, append: TextIO | None = None) -> None:
        self.out = out
        self.tty = tty and fmt == "text"
        self.jsonl = EventWriter("jsonl", out) if fmt == "jsonl" else None
        self.append = append
        self._partial = False

    @property
    def shows_partials(self) -> bool:
        """Whether partials are shown at all: on a terminal, or as JSON lines (a pipe of text gets finals only)."""
        return self.tty or self.jsonl is not None

    def show(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Final) and self.append is not None:
                self.append.write(e.text + "\n")
                self.append.flush()
            if self.jsonl is not None:
                self.jsonl.write(e)
            elif isinstance(e, Final):
                self.out.write((CLEAR_LINE if self._partial else "") + e.text + "\n")
                self._partial = False
            elif self.tty:
                self.out.write(CLEAR_LINE + DIM + self._fit(e.text) + RESET)
                self._partial = bool(e.text)
        self.out.flush()

    def close(self) -> None:
        if self._partial:
            self.out.write(CLEAR_LINE)
            self.out.flush()
            self._partial = False

    @staticmethod
    def _fit(text: str) -> str:
        """The end of ``text``, so that the line never wraps (\\r only returns to the start of the last row)."""
        width = max(10, shutil.get_terminal_size().columns - 1)
        return text if len(text) <= width else "…" + text[-(width - 1):]
