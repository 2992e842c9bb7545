"""``streamer serve`` with ``server.processes`` > 1: a supervisor and its front-end processes.

The supervisor loads no model and serves no client. It starts N front-end processes (``python -m
streamer serve`` with :data:`~streamer.aio.processes.cluster.CLUSTER_ENV` set), each a whole daemon of its own
(:func:`streamer.cli.serve.serve`) listening with ``SO_REUSEPORT`` on the same ports, so that the
kernel spreads new connections over them. Like uvicorn's multiprocess supervisor it

- restarts a process that dies (with backoff); the dead one's clients lose their connection and
  reconnect, which the kernel hands to a living process; the others' streams are untouched; a process
  that stops sending its heartbeat (a stuck event loop) counts as not serving at once (``/healthz``
  degraded) and is killed and replaced after ``HUNG_AFTER_S``;
- forwards SIGHUP (reload) to every process, and on SIGTERM/SIGINT has every process drain (no new
  stream; live ones go on to their end, for ``server.drain_timeout_s`` at most) and then finalise the
  streams left (finals, ``end``, close 1001), waits for all of them, then exits 0; a second signal has
  them finalise at once, a third kills them;
- speaks for the daemon to systemd (``READY=1`` once every process serves; ``WATCHDOG=1`` only while
  every serving process reports in) and to MQTT (one connection, one ``status`` topic and last will;
  processes hand it their events, see :mod:`streamer.aio.processes.cluster`).

When a listening port is 0 (any free port), the first process starts alone and the others take the
port it got. A process that fails before the daemon first served ends the supervisor (exit 1): a bad
model or a port in use would fail again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from streamer.aio import loop as event_loop
from streamer.aio.metrics import MULTIPROC_ENV
from streamer.aio.processes.cluster import BEAT_INTERVAL_S, CLUSTER_ENV, ClusterService, Member, Place
from streamer.aio.processes.systemd import DRAIN_STATUS_INTERVAL_S, STATUS_INTERVAL_S, Notifier, describe_drain
from streamer.config import Config

__all__ = ["Supervisor", "supervise"]

logger = logging.getLogger("streamer.supervisor")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_AFTER_S = 60.0
"""a process that ran this long is restarted after RESTART_MIN_S again"""
HUNG_AFTER_S = 15.0
"""a serving process that sent no heartbeat for this long is hung (a stuck event loop): it is killed and replaced"""
RELOAD_WAIT_S = 15.0
"""how long a reload waits for every process to apply it before telling systemd it is done"""
KILL_GRACE_S = 15.0
"""after server.drain_timeout_s and server.shutdown_timeout_s (and MQTT's flush), how long processes get before
SIGKILL"""
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def with_changes(overrides: dict[str, dict[str, Any]], before: Config, after: Config) -> dict[str, dict[str, Any]]:
    """``overrides`` plus the keys that differ between ``before`` and ``after`` (e.g. a started model server's url),
    so that the front-end processes, which read the config file again, run with ``after``."""
    out: dict[str, dict[str, Any]] = json.loads(json.dumps(overrides))
    for f in dataclasses.fields(after):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if old == new or not dataclasses.is_dataclass(new):
            continue
        for g in dataclasses.fields(new):
            value = getattr(new, g.name)
            if getattr(old, g.name) != value:
                out.setdefault(f.name, {})[g.name] = list(value) if isinstance(value, tuple) else value
    return out


def supervise(cfg: Config, config_path: str | None, overrides: dict[str, dict[str, Any]], *, verbose: int = 0) -> int:
    """Run the daemon as ``server.processes`` front-end processes until SIGTERM/SIGINT; the exit status."""
    return event_loop.run(Supervisor(cfg, config_path, overrides, verbose=verbose).run(), cfg.server.loop)


@dataclass(eq=False)
class Slot:
    """One front-end process's place; a restarted process takes the same slot."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    member: Member | None = None
    restarts: int = 0


class Supervisor:
    """Starts, watches and stops the front-end processes; see the module's docstring."""

    def __init__(self, cfg: Config, config_path: str | None, overrides: dict[str, dict[str, Any]], *,
                 verbose: int = 0) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides
        self.verbose = verbose
        self.count = cfg.server.process_count()
        self.slots = [Slot(i) for i in range(self.count)]
        self.runtime = tempfile.mkdtemp(prefix="streamer-", dir=os.environ.get("RUNTIME_DIRECTORY") or None)
        self.socket_path = os.path.join(self.runtime, "cluster.sock")
        self.metrics_dir = os.path.join(self.runtime, "metrics")
        os.mkdir(self.metrics_dir)
        self.notifier = Notifier.from_environ()
        self.ports: dict[str, Any] = {}
        """what the first process listens on (``{"server.port": 41234}``): every later process shares it"""
        self.serving = False
        """every process served once: from now on a process that dies is restarted"""
        self.stopping = asyncio.Event()
        self.failed = False
        self.publisher: Any = None
        self.service: ClusterService | None = None
        self._listening = asyncio.Event()
        self._changed = asyncio.Event()
        self._signals = 0
        self._reloads: set[asyncio.Task[None]] = set()
        self._reloaded: set[int] = set()

    # -- the whole run ------------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

    async def _run(self) -> int:
        self._share_metrics()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        self.notifier.status(f"starting {self.count} front-end processes")
        await self._start_publisher()
        self.service = ClusterService(
            self.socket_path, on_event=self.publisher.publish if self.publisher is not None else None,
            on_member=self._on_member, forward_all=self.publisher is not None,
            forward_partials=self.cfg.mqtt.publish_partials, extra_health=self._health)
        self.service.configured = self.count
        await self.service.start()
        keepers = []
        try:
            keepers.append(asyncio.create_task(self._keep(self.slots[0])))
            if self._port_zero():  # the first process picks the ports, the others share them
                await self._first(self._listening.wait())
            keepers += [asyncio.create_task(self._keep(slot)) for slot in self.slots[1:]]
            await self._first(self._all_serving())
            if not self.stopping.is_set():
                self.serving = True
                self._announce()
                tasks = [asyncio.create_task(self._report()), asyncio.create_task(self._hang_watch())]
                if self.notifier.watchdog_interval is not None:  # pings go on while the processes drain
                    keepers.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_interval)))
                await self.stopping.wait()
                for task in tasks:
                    task.cancel()
            self.notifier.notify("STOPPING=1", "STATUS=draining: every process's live streams go on to their end")
            await self._stop_processes()
        finally:
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            for slot in self.slots:  # never leave a process behind
                if slot.proc is not None and slot.proc.returncode is None:
                    slot.proc.kill()
                    await slot.proc.wait()
            if self.publisher is not None:
                await self.publisher.stop()  # the processes' last finals are queued: flush, then "offline"
            await self.service.stop()
        logger.info("stopped")
        return 1 if self.failed else 0

    async def _first(self, aw: Any) -> None:
        """Wait for ``aw`` unless the daemon is stopped (a signal, or a process that failed to start) first."""
        waiting = asyncio.ensure_future(aw)
        stopping = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        stopping.cancel()

    def _share_metrics(self) -> None:
        """prometheus-client's multiprocess mode for this process and every process it starts."""
        os.environ[MULTIPROC_ENV] = self.metrics_dir
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # in case prometheus_client was imported before

    async def _start_publisher(self) -> None:
        """The daemon's one MQTT connection (``status`` and its last will, and every process's events)."""
        if not self.cfg.mqtt.enabled:
            return
        from streamer.aio.metrics import MqttMetrics
        from streamer.aio.mqtt.publisher import MqttPublisher

        publisher = MqttPublisher(self.cfg.mqtt, MqttMetrics())
        await publisher.start()  # a ConfigError (unknown host, login refused) ends the command here
        self.publisher = publisher

    def _health(self) -> dict[str, Any]:
        return self.publisher.health() if self.publisher is not None else {}

    def _port_zero(self) -> bool:
        c = self.cfg
        if c.audiosocket.enabled and c.audiosocket.uri.endswith(":0"):
            return True
        return (c.server.port == 0 or (c.vosk.enabled and c.vosk.port == 0)
                or (c.wyoming.enabled and c.wyoming.uri.startswith("tcp://") and c.wyoming.uri.endswith(":0")))

    async def _all_serving(self) -> None:
        while not all(slot.member is not None and slot.member.ready for slot in self.slots):
            self._changed.clear()
            await self._changed.wait()

    def _announce(self) -> None:
        c = self.cfg
        ws = "wss" if c.server.tls_cert else "ws"
        port = self.ports.get("server.port", c.server.port)
        vosk = self.ports.get("vosk.port")
        print(f"streamer: listening on {ws}://{c.server.host}:{port}/v1/stream"
              + (f", vosk on {ws}://{c.server.host}:{vosk}" if vosk else "")
              + f" ({self.count} processes, supervisor pid {os.getpid()})", file=sys.stderr, flush=True)
        self.notifier.notify("READY=1", f"STATUS={self._describe()}")

    def _describe(self) -> str:
        serving = sum(1 for s in self.slots if s.member is not None and s.member.ready)
        streams = self.service.count("stream") if self.service is not None else 0
        return (f"{serving}/{self.count} processes serving, {streams} stream(s); ws://{self.cfg.server.host}:"
                f"{self.ports.get('server.port', self.cfg.server.port)}")

    # -- the processes --------------------------------------------------------------------------------

    def _on_member(self, member: Member, what: str) -> None:
        if not 0 <= member.slot < self.count:
            return
        slot = self.slots[member.slot]
        if what == "left":
            if slot.member is member:
                slot.member = None
        elif what == "hello":
            slot.member = member
        elif what == "listening" and not self._listening.is_set():
            self.ports = dict(member.listening)
            self._listening.set()
        elif what == "reloaded":
            self._reloaded.add(member.slot)
        self._changed.set()

    async def _spawn(self, slot: Slot) -> asyncio.subprocess.Process:
        overrides: dict[str, Any] = json.loads(json.dumps(self.overrides))
        overrides.setdefault("server", {})["processes"] = 1
        for key, value in self.ports.items():
            section, _, name = key.partition(".")
            overrides.setdefault(section, {})[name] = value
        place = Place(self.socket_path, slot.index, self.config_path, overrides, sources=slot.index == 0)
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        env[CLUSTER_ENV] = place.to_json()
        env[MULTIPROC_ENV] = self.metrics_dir
        argv = [sys.executable, "-m", "streamer", *(["-v"] * self.verbose), "serve"]
        # its own session: a terminal's Ctrl-C reaches the supervisor only, which stops the processes in order
        proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        slot.proc, slot.started_at = proc, time.monotonic()
        logger.info("started front-end process %d (pid %d)", slot.index, proc.pid)
        return proc

    async def _keep(self, slot: Slot) -> None:
        """Run slot's process; restart it when it dies, with backoff, until the daemon stops."""
        delay = RESTART_MIN_S
        while not self.stopping.is_set():
            proc = await self._spawn(slot)
            code = await proc.wait()
            self._forget(proc.pid)
            self._changed.set()
            if self.stopping.is_set():
                return
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            if not self.serving:
                logger.error("front-end process %d (pid %d) %s before the daemon served; stopping", slot.index,
                             proc.pid, how)
                self.failed = True
                self.stopping.set()
                return
            if time.monotonic() - slot.started_at > STABLE_AFTER_S:
                delay = RESTART_MIN_S
            slot.restarts += 1
            logger.warning("front-end process %d (pid %d) %s; its clients lost their connections; restarting it "
                           "in %.1f s", slot.index, proc.pid, how, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, RESTART_MAX_S)

    def _forget(self, pid: int) -> None:
        """A process ended: its gauges leave /metrics (its counters and histograms stay counted)."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _signal_all(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    async def _stop_processes(self) -> None:
        """Every process finalises its streams (SIGTERM); those that take too long are killed."""
        assert self.service is not None
        self.service.begin_drain()
        self._signal_all(signal.SIGTERM)
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if not procs:
            return
        limit = self.cfg.server.drain_timeout_s + self.cfg.server.shutdown_timeout_s + KILL_GRACE_S
        report = asyncio.ensure_future(self._report_drain(time.monotonic() + self.cfg.server.drain_timeout_s))
        try:
            done, pending = await asyncio.wait({asyncio.ensure_future(p.wait()) for p in procs}, timeout=limit)
        finally:
            report.cancel()
        if pending:
            logger.warning("%d front-end process(es) did not stop within %.0f s; killing them", len(pending), limit)
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(pending)
        bad = [p for p in procs if p.returncode != 0]
        if bad:
            logger.warning("front-end process(es) %s did not exit cleanly (%s)", ", ".join(str(p.pid) for p in bad),
                           ", ".join(str(p.returncode) for p in bad))
            self.failed = True

    async def _report_drain(self, until: float) -> None:
        """``STATUS=`` each second while the processes drain: the daemon's live streams left."""
        while True:
            streams = self.service.count("stream") if self.service is not None else 0
            left = None if self._signals > 1 else max(0.0, until - time.monotonic())
            self.notifier.status(describe_drain(streams, left))
            await asyncio.sleep(DRAIN_STATUS_INTERVAL_S)

    # -- signals, systemd -------------------------------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 2:
            logger.warning("third %s: killing the front-end processes and exiting now", name)
            self._signal_all(signal.SIGKILL)
            os._exit(1)
        if self._signals == 2:  # a process's second SIGTERM ends its drain
            logger.info("second %s: every front-end process finalises its live streams now", name)
            self._signal_all(signal.SIGTERM)
            return
        logger.info("%s: shutting down gracefully (%d front-end processes drain)", name, self.count)
        if self.publisher is not None:
            self.publisher.draining()
        self.stopping.set()

    def _on_reload_signal(self) -> None:
        if self.stopping.is_set():
            logger.info("reload: ignored, shutting down")
            return
        task = asyncio.ensure_future(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        """SIGHUP to every process; READY=1 for systemd once each said it reloaded (or after a while)."""
        self.notifier.reloading()
        self._reloaded.clear()
        waiting = {s.index for s in self.slots if s.member is not None and s.member.ready}
        logger.info("reload: passing SIGHUP to %d front-end process(es)", len(waiting))
        self._signal_all(signal.SIGHUP)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RELOAD_WAIT_S):
                while not waiting <= self._reloaded and not self.stopping.is_set():
                    self._changed.clear()
                    await self._changed.wait()
        if not self.stopping.is_set():
            self.notifier.notify("READY=1", f"STATUS={self._describe()}")

    async def _report(self) -> None:
        while True:
            self.notifier.status(self._describe())
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _hang_watch(self) -> None:
        """Kill a serving process that sent no heartbeat for ``HUNG_AFTER_S`` (its event loop is stuck: it would
        keep taking connections and serve none); :meth:`_keep` starts another in its place. Its clients lose their
        connections, as when a process dies."""
        while True:
            now = time.monotonic()
            for slot in self.slots:
                m, proc = slot.member, slot.proc
                if m is None or not m.ready or proc is None or proc.returncode is not None \
                        or now - m.beat_at <= HUNG_AFTER_S:
                    continue
                logger.error("front-end process %d (pid %d) missed its heartbeats for %.0f s: killing it",
                             slot.index, proc.pid, now - m.beat_at)
                m.ready = False  # not serving: /healthz says degraded until its replacement serves
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.sleep(BEAT_INTERVAL_S)

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` while every serving process reports in and has its model worker (a stalled event loop
        or a dead worker anywhere withholds it, and systemd restarts the daemon). A process being restarted
        does not count: the supervisor itself is bringing it back."""
        stale_after = max(5 * BEAT_INTERVAL_S, 2 * interval)
        warned = False
        while True:
            now = time.monotonic()
            bad = [s.index for s in self.slots if s.member is not None and s.member.ready
                   and (now - s.member.beat_at > stale_after or s.member.health.get("worker_alive") is False)]
            if not bad:
                self.notifier.notify("WATCHDOG=1")
                warned = False
            elif not warned:
                warned = True
                logger.error("front-end process(es) %s stopped reporting or lost their model worker: withholding "
                             "watchdog pings so that systemd restarts the daemon", bad)
            await asyncio.sleep(interval)
