"""Running the daemon: what ``streamer serve`` does once it has parsed its arguments.

:func:`run` takes the config file and the command line's overrides and runs the whole daemon:

    a model server        ``[model_server] kind = "triton"`` with no url starts one first, and stops it last
                          (:mod:`~streamer.aio.processes.model_server`)
    one process           the model, a :class:`~streamer.aio.server.Daemon`, its MQTT publisher and capture
                          sources, systemd's notifications and reload on SIGHUP (:func:`serve`)
    or several            ``server.processes`` > 1: a supervisor (:mod:`~streamer.aio.processes.supervisor`)
                          starts the front-end processes; each runs :func:`serve` with its
                          :class:`~streamer.aio.processes.cluster.Place` (it finds it in
                          :data:`~streamer.aio.processes.cluster.CLUSTER_ENV`)

SIGTERM or SIGINT drains (no new stream; the live ones go on to their end, for ``server.drain_timeout_s`` at
most), then finalises the streams left and exits; a second one finalises them at once; a third exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from streamer.aio import loop as event_loop
from streamer.aio.mqtt.publisher import MqttPublisher
from streamer.aio.mqtt.settings import check_settings
from streamer.aio.processes.cluster import CLUSTER_ENV, ClusterLink, Place
from streamer.aio.processes.messages import Listening, Ready, Reloaded
from streamer.aio.processes.model_server import open_runner, start_model_server
from streamer.aio.processes.supervisor import supervise, with_changes
from streamer.aio.processes.systemd import Notifier, Reloader
from streamer.aio.server import Daemon
from streamer.aio.sources.mic import MicSource
from streamer.config import Config, load_config
from streamer.runner import Runner, geometry_of

__all__ = ["Check", "configure_logging", "run", "serve"]

logger = logging.getLogger("streamer.serve")

Overrides = dict[str, dict[str, Any]]
Check = Callable[[Config, Runner, float], int]
"""``serve --check``: given the config, the loaded model and its warm-up time, say what would run; the exit code"""


def configure_logging(cfg: Config, verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else getattr(logging, cfg.logging.level.upper())
    root = logging.getLogger()
    root.setLevel(level)
    for h in root.handlers:
        h.setLevel(level)


def run(config: str | None, overrides: Overrides, *, verbose: int = 0, check: Check | None = None) -> int:
    """Run the daemon until it is stopped; its exit code. ``check``: load the model, call it instead, and stop."""
    place = os.environ.get(CLUSTER_ENV)
    if place:  # one of several front-end processes, started by the supervisor
        return run_member(Place.from_json(place), verbose)
    cfg = load_config(config, overrides)
    configure_logging(cfg, verbose)
    cfg.server.token()  # fail early on a missing token variable or file
    event_loop.loop_factory(cfg.server.loop)  # and on server.loop = "uvloop" without uvloop
    check_settings(cfg.mqtt)  # and on a missing MQTT password or TLS file, before the model loads
    started, model_server = start_model_server(cfg)
    try:
        # what starting the model server changed (its url, ports) reaches the front-end processes, and a reload
        # (SIGHUP), as overrides: a reload reads the file again, and the started server's url must stay
        overrides = with_changes(overrides, cfg, started)
        if started.server.process_count() > 1 and check is None:
            return supervise(started, config, overrides, verbose=verbose)
        runner, warm = load_model(started)
        if check is not None:
            return check(started, runner, warm)
        return event_loop.run(serve(started, runner, lambda: load_config(config, overrides), verbose=verbose),
                              started.server.loop)
    finally:
        if model_server is not None:
            model_server.stop()


def run_member(place: Place, verbose: int) -> int:
    """One front-end process of several: the config and ports its supervisor gave it."""
    cfg = load_config(place.config, place.overrides)
    configure_logging(cfg, verbose)
    _tag_log_records(f"[p{place.slot}]")
    runner, _ = load_model(cfg)
    return event_loop.run(serve(cfg, runner, lambda: load_config(place.config, place.overrides), verbose=verbose,
                                place=place), cfg.server.loop)


def _tag_log_records(tag: str) -> None:
    """Which process said it, in the shared log: every record's logger name is followed by ``tag``."""
    make = logging.getLogRecordFactory()

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.name = f"{record.name} {tag}"
        return record

    logging.setLogRecordFactory(tagged)


def load_model(cfg: Config) -> tuple[Runner, float]:
    """The model here (``[model_server] kind = "local"``) or a model server's client, warmed up; and the warm-up
    window's time."""
    Notifier.from_environ().status(f"loading model {cfg.model.id}")  # systemd: shown while starting
    t0 = time.perf_counter()
    runner = open_runner(cfg)
    warm = runner.warmup(geometry_of(runner).schedule(cfg.stream).window_samples)
    logger.info("model %s loaded in %.1f s, warm-up window %.3f s", runner.name, time.perf_counter() - t0, warm)
    return runner, warm


async def serve(cfg: Config, runner: Runner, reload: Callable[[], Config], *, verbose: int = 0,
                place: Place | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; ``reload`` reads the config again on SIGHUP.

    ``place``: this is one of several front-end processes (:mod:`streamer.aio.processes.supervisor`): it
    listens with SO_REUSEPORT, reaches its supervisor over ``place.socket``, runs capture sources only where
    ``place.sources``, leaves MQTT and systemd to the supervisor and prints no banner.
    """
    link = await ClusterLink.connect(place.socket, place.slot) if place is not None else None
    daemon = Daemon(cfg, runner, cluster=link)
    if link is not None:
        _follow_supervisor(daemon, link)
    if link is None and cfg.mqtt.enabled:  # first, so that it stops last: after the streams and sources
        # a bad password or TLS file raised ConfigError before; an unknown host or a refused login fails the
        # start; a broker that is down is retried meanwhile
        publisher = MqttPublisher(cfg.mqtt, daemon.metrics)
        daemon.hub.sinks.append(publisher)
        daemon.services.append(publisher)
        daemon.on_drain.append(publisher.draining)  # its status topic says "draining"
    if place is None or place.sources:  # each [[sources]] kind "mic" captions a microphone into its named stream
        daemon.services.extend(MicSource(daemon.streams, src) for src in cfg.sources if src.kind == "mic")
    notifier = Notifier.from_environ() if link is None else Notifier(None)
    reloader = Reloader(daemon, reload, notifier)
    daemon.on_reload.append(lambda new: configure_logging(new, verbose))
    loop = asyncio.get_running_loop()
    logger.info("event loop: %s", event_loop.loop_name(loop))
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals > 2:
            if link is not None:  # the supervisor ends what is left itself
                return
            logger.warning("third %s: exiting now", name)
            os._exit(1)
        if signals == 2:
            logger.info("second %s: finalising every live stream now", name)
            daemon.request_shutdown()
            return
        logger.info("%s: shutting down gracefully", name)
        daemon.request_shutdown(drain=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await daemon.start()
    loop.add_signal_handler(signal.SIGHUP, reloader.request)  # systemctl reload
    if link is not None:  # the supervisor announces the daemon once every process serves
        link.send(Listening(daemon.listening))
        link.send(Ready())
        beat = asyncio.ensure_future(link.beat(lambda: daemon.health().to_dict()))
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


def _follow_supervisor(daemon: Daemon, link: ClusterLink) -> None:
    """A front-end process shuts down when its supervisor is gone, and tells it of each reload."""

    def lost() -> None:
        if not daemon.stopping.is_set():
            logger.warning("the supervisor is gone: shutting down")
            daemon.request_shutdown()

    link.on_lost = lost
    daemon.on_reload.append(lambda _cfg: link.send(Reloaded()))
