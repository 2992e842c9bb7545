"""The ``streamer`` command line: one module per subcommand, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from streamer import __version__
from streamer.exceptions import StreamerError

if TYPE_CHECKING:
    from streamer.config import Config

# Subcommand modules, in the order --help lists them.
COMMANDS = ["transcribe", "serve", "mic", "eval", "bench", "export", "model-server"]

EPILOG = """\
examples:
  streamer transcribe talk.wav                 print the transcript (shipped demo model)
  streamer transcribe --format srt talk.flac   subtitles
  streamer serve -c /etc/streamer/streamer.toml
  streamer bench --help

Every config key can be overridden with --set section.key=value (see configs/default.toml).
"""


def add_config_args(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """The options every model-using command shares."""
    p.add_argument("-c", "--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set stream.hop_ms=500 (repeatable)",
    )
    if model:
        p.add_argument("-m", "--model", metavar="M",
                       help="'demo' (default), a checkpoint directory, or a Hugging Face hub id")
        p.add_argument("--device", metavar="D", help="auto, cpu, cuda or cuda:N (default: auto)")
        p.add_argument("--words", metavar="FILE",
                       help="decode over this word list (one word per line); 'none': letter by letter; default "
                       "'auto': the model's own words.txt if it ships one (the demo model does)")


SHORTCUTS: dict[str, tuple[str, str]] = {
    "model": ("model", "id"),
    "device": ("model", "device"),
    "model_device": ("model", "device"),  # streamer mic: --device is the microphone
    "words": ("decoder", "words"),
    "host": ("server", "host"),
    "port": ("server", "port"),
}
"""option dest -> the config key it sets (options a command does not have are skipped)"""


def cli_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """What the command line sets on top of the config file: ``--set``, then the shortcut options.

    The one path from the command line to the config: used at start and again on every reload.
    """
    from streamer.config import parse_overrides

    out = parse_overrides(getattr(args, "overrides", ()))
    for dest, (section, key) in SHORTCUTS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "words" and value == "none":
            value = ""
        out.setdefault(section, {})[key] = value
    return out


def load_cli_config(args: argparse.Namespace) -> Config:
    """Config file + --set + the --model/--device/--words/... shortcuts, in that order of precedence."""
    from streamer.config import load_config

    return load_config(args.config, cli_overrides(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="Real-time streaming speech recognition for wav2vec2 / XLSR CTC models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"streamer.cli.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name != f"streamer.cli.{name.replace('-', '_')}":
                raise
            continue  # not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except StreamerError as exc:
        print(f"streamer {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
