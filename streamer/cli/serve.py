"""``streamer serve``: the daemon."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from streamer.cli import add_config_args, cli_overrides

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.runner import Runner


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the daemon (websocket, Vosk-compatible websocket, MQTT, sources)",
        description="Load the model once, warm it up, and serve live transcription over websocket "
        "(native protocol at /v1/stream, viewers at /v1/listen/NAME, Vosk protocol on [vosk] port), "
        "with /healthz and /metrics on the same port. SIGTERM or Ctrl-C finalises every open stream "
        "and exits; a second signal exits at once.",
    )
    add_config_args(p)
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--port", type=int, help="listen port (server.port; 0 = any free port)")
    p.add_argument("--processes", type=_processes, metavar="N",
                   help="front-end processes sharing the ports (server.processes): a number, or 'auto' for one "
                   "per usable CPU core; each loads its own model copy with the local model server")
    p.add_argument("--check", action="store_true",
                   help="validate the config, load and warm up the model, print a summary, and exit")
    p.set_defaults(func=run)


def _processes(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes; use e.g. 4, or auto") from None


def run(args: argparse.Namespace) -> int:
    from streamer.aio.processes import run as daemon

    overrides = cli_overrides(args)
    if getattr(args, "processes", None) is not None:
        overrides.setdefault("server", {})["processes"] = args.processes
    return daemon.run(args.config, overrides, verbose=args.verbose, check=check if args.check else None)


def check(cfg: Config, runner: Runner, warm: float) -> int:
    """``serve --check``: the config is valid and the model loads; what it decodes with."""
    from streamer.decoder import build_decoder, describe

    words = build_decoder(cfg.decoder, runner)
    print(f"config ok; model {runner.name} on {runner.device} ({runner.n_parameters / 1e6:.1f} M parameters), "
          f"warm-up window {warm * 1000:.0f} ms, decoding "
          + (f"with {describe(words)}" if words is not None else "letter by letter (greedy)"))
    return 0
