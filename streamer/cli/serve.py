"""``streamer serve``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streamer.aio.processes.systemd import Notifier, Reloader
from streamer.cli import add_config_args, cli_overrides
from streamer.config import Config, load_config

if TYPE_CHECKING:
    from streamer.aio.processes.cluster import ClusterLink
    from streamer.aio.server import Daemon
    from streamer.runner import Runner

logger = logging.getLogger("streamer.serve")


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


def configure_logging(cfg: Config, verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else getattr(logging, cfg.logging.level.upper())
    root = logging.getLogger()
    root.setLevel(level)
    for h in root.handlers:
        h.setLevel(level)


def run(args: argparse.Namespace) -> int:
    from streamer.aio.processes.cluster import CLUSTER_ENV

    if os.environ.get(CLUSTER_ENV):  # one of several front-end processes, started by the supervisor
        return run_member(args, json.loads(os.environ[CLUSTER_ENV]))
    overrides = cli_overrides(args)
    if getattr(args, "processes", None) is not None:
        overrides.setdefault("server", {})["processes"] = args.processes
    cfg = load_config(args.config, overrides)
    configure_logging(cfg, args.verbose)
    cfg.server.token()  # fail early on a missing token variable or file
    from streamer.aio.mqtt.settings import check_settings

    check_settings(cfg.mqtt)  # and on a missing MQTT password or TLS file, before the model loads
    # -- model server: [model_server] kind = "triton" with no url starts one (streamer/aio/model_server.py),
    # before the front-end(s), and stops it last --
    from streamer.aio.processes.model_server import start_model_server

    started, model_server = start_model_server(cfg)
    try:
        if started.server.process_count() > 1 and not args.check:
            # -- several front-end processes (streamer/aio/supervisor.py); what starting the model server
            # changed (its url) reaches them as overrides --
            from streamer.aio.processes.supervisor import supervise, with_changes

            return supervise(started, args.config, with_changes(overrides, cfg, started), verbose=args.verbose)
        from streamer.aio.processes.supervisor import with_changes

        # a reload (SIGHUP) reads the file again: the started server's url and ports stay, not "wait for a restart"
        return _run_with_model(args, started, with_changes(overrides, cfg, started))
    finally:
        if model_server is not None:
            model_server.stop()
    # -- end model server --


def _run_with_model(args: argparse.Namespace, cfg: Config, overrides: dict[str, dict[str, Any]]) -> int:
    from streamer.aio.processes.model_server import open_runner
    from streamer.runner import geometry_of

    Notifier.from_environ().status(f"loading model {cfg.model.id}")  # systemd: shown while starting
    t0 = time.perf_counter()
    runner = open_runner(cfg)  # the model here ([model_server] kind = "local"), or a model server's client
    warm = runner.warmup(geometry_of(runner).schedule(cfg.stream).window_samples)
    logger.info("model %s loaded in %.1f s, warm-up window %.3f s", runner.name, time.perf_counter() - t0, warm)
    if args.check:
        from streamer.cli.eval_decoders import describe
        from streamer.decoder import build_decoder

        words = build_decoder(cfg.decoder, runner)
        print(f"config ok; model {runner.name} on {runner.device} ({runner.n_parameters / 1e6:.1f} M parameters), "
              f"warm-up window {warm * 1000:.0f} ms, decoding "
              + (f"with {describe(words)}" if words is not None else "letter by letter (greedy)"))
        return 0
    # SIGHUP re-reads the file with the same command-line overrides (systemd)
    return asyncio.run(serve(cfg, runner, lambda: load_config(args.config, overrides), verbose=args.verbose))


def run_member(args: argparse.Namespace, place: dict[str, Any]) -> int:
    """One front-end process of several: the config and ports its supervisor gave it (``place``)."""
    from streamer.aio.processes.model_server import open_runner
    from streamer.runner import geometry_of

    overrides = place["overrides"]
    cfg = load_config(place["config"], overrides)
    configure_logging(cfg, args.verbose)
    tag = f"[p{place['slot']}]"
    for handler in logging.getLogger().handlers:  # which process said it, in the shared log
        fmt = handler.formatter._fmt if handler.formatter is not None else None
        if fmt and "%(name)s" in fmt:
            handler.setFormatter(logging.Formatter(fmt.replace("%(name)s", f"%(name)s {tag}")))
    t0 = time.perf_counter()
    runner = open_runner(cfg)  # the model here ([model_server] kind = "local"), or a model server's client
    warm = runner.warmup(geometry_of(runner).schedule(cfg.stream).window_samples)
    logger.info("model %s loaded in %.1f s, warm-up window %.3f s", runner.name, time.perf_counter() - t0, warm)
    return asyncio.run(serve(cfg, runner, lambda: load_config(place["config"], overrides), verbose=args.verbose,
                             member=place))


async def serve(cfg: Config, runner: Runner, reload: Callable[[], Config], *, verbose: int = 0,
                member: dict[str, Any] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; ``reload`` reads the config again on SIGHUP.

    ``member``: this is one of several front-end processes (:mod:`streamer.aio.processes.supervisor`): it listens with
    SO_REUSEPORT, reaches its supervisor over ``member["socket"]``, runs capture sources only where
    ``member["sources"]``, leaves MQTT and systemd to the supervisor and prints no banner.
    """
    from streamer.aio.server import Daemon

    daemon = Daemon(cfg, runner)
    link = await join_cluster(daemon, member) if member is not None else None
    add_services(daemon, mqtt=link is None, sources=member is None or bool(member.get("sources")))
    # -- systemd: sd_notify and reload on SIGHUP (streamer/aio/systemd.py) --
    notifier = Notifier.from_environ() if link is None else Notifier(None)
    reloader = Reloader(daemon, reload, notifier)
    daemon.on_reload.append(lambda new: configure_logging(new, verbose))
    # -- end systemd --
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            if link is not None:  # systemd's stop signals every process besides the supervisor's: once is enough
                return
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        logger.info("%s: shutting down gracefully", signal.Signals(signum).name)
        daemon.request_shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await daemon.start()
    loop.add_signal_handler(signal.SIGHUP, reloader.request)  # systemctl reload
    if link is not None:  # the supervisor announces the daemon once every process serves
        link.send({"op": "listening", "ports": daemon.listening})
        link.send({"op": "ready"})
        beat = asyncio.ensure_future(link.beat(daemon.health))
        await daemon.closed.wait()
        beat.cancel()
        await link.close()
        return 0
    ws = "wss" if cfg.server.tls_cert else "ws"
    print(f"streamer: listening on {ws}://{cfg.server.host}:{daemon.port}/v1/stream"
          + (f", vosk on {ws}://{cfg.server.host}:{daemon.vosk_port}" if daemon.vosk_port else ""),
          file=sys.stderr, flush=True)
    notifier.start(daemon)  # READY=1: model warm, listeners and services up; then STATUS= and WATCHDOG=1
    await daemon.closed.wait()
    return 0


async def join_cluster(daemon: Daemon, member: dict[str, Any]) -> ClusterLink:
    """Wire a front-end process's daemon to its supervisor (:mod:`streamer.aio.processes.cluster`)."""
    from streamer.aio.processes.cluster import ClusterLink

    link = await ClusterLink.connect(member["socket"], int(member["slot"]))
    daemon.cluster, daemon.reuse_port = link, True
    daemon.hub.sinks.append(link)  # events to viewers on other processes, and to the supervisor's MQTT
    daemon.hub.on_watch = link.viewing
    link.deliver = daemon.hub.deliver

    def lost() -> None:
        if not daemon.stopping.is_set():
            logger.warning("the supervisor is gone: shutting down")
            daemon.request_shutdown()

    link.on_lost = lost
    daemon.on_reload.append(lambda _cfg: link.send({"op": "reloaded"}))
    return link


def add_services(daemon: Daemon, *, mqtt: bool = True, sources: bool = True) -> None:
    """MQTT publisher and capture sources, as configured (``mqtt``/``sources`` False: another process has them)."""
    # -- mqtt (streamer/aio/mqtt.py): a bad password or TLS file raises ConfigError here, an unknown
    # host or refused login when the daemon starts it; a broker that is down is retried meanwhile.
    # Added first, so that it stops last: after the streams and sources sent their finals --
    if mqtt:
        from streamer.aio.mqtt.publisher import attach_publisher

        attach_publisher(daemon)
    # -- end mqtt --
    # -- mic sources (streamer/aio/sources.py): each [[sources]] kind "mic" captions a microphone into
    # the stream named after it (viewers at /v1/listen/NAME, MQTT). Added last, so they stop first. --
    if daemon.cfg.sources and sources:
        from streamer.aio.sources.mic import MicSource

        daemon.services.extend(MicSource(daemon.streams, src) for src in daemon.cfg.sources if src.kind == "mic")
    # -- end mic sources --
