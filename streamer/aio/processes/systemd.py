"""Running under systemd: sd_notify over ``$NOTIFY_SOCKET``, the watchdog, and reload on SIGHUP.

The notify protocol (``man sd_notify``) is one unix datagram of ``KEY=VALUE`` lines per message,
sent to the socket named in ``$NOTIFY_SOCKET`` (a path, or an abstract name written ``@name``).
It takes a few lines, so there is no library. When the variable is unset (``streamer serve`` run
from a shell) :class:`Notifier` does nothing, and reload still works.

What ``streamer serve`` sends, in order (``systemd/streamer.service`` is ``Type=notify``)::

    STATUS=loading model ...         before the model loads
    READY=1                          model loaded and warmed up, listeners up, services started
    STATUS=N streams, RTF x ...      every few seconds, when it changed
    WATCHDOG=1                       every WATCHDOG_USEC/2, from the event loop
    RELOADING=1 ... READY=1          around a reload (SIGHUP, i.e. ``systemctl reload``)
    STOPPING=1                       as soon as the graceful shutdown begins (SIGTERM: the drain)
    STATUS=draining: N stream(s) ... every second while draining: the live streams left, the time left
    STATUS=stopping: finalising N    once the streams left are finalised

The watchdog pings come from a task on the event loop, so a loop that stalls stops pinging and
systemd kills and restarts the daemon (``WatchdogSec=``). A dead model worker withholds the pings
too. A reload re-reads the config file with the same ``--set`` overrides and applies what can
change while streams run (see :func:`split_changes`; the keys that need a restart say so in
``streamer/config.py``); it logs the changed keys that need a
restart and keeps their running values until then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from streamer.config import Config, needs_restart
from streamer.exceptions import ConfigError

if TYPE_CHECKING:
    from streamer.aio.server import Daemon

__all__ = ["Notifier", "Reloader", "describe_drain", "split_changes"]

logger = logging.getLogger("streamer.systemd")

_SECRETS = frozenset({"server.auth_token"})

STATUS_INTERVAL_S = 5.0
DRAIN_STATUS_INTERVAL_S = 1.0


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int:
    """``WATCHDOG_USEC``, or 0 when unset, malformed, or meant for another process (``WATCHDOG_PID``)."""
    pid = environ.get("WATCHDOG_PID", "")
    try:
        if pid and int(pid) != os.getpid():
            return 0
        return max(0, int(environ.get("WATCHDOG_USEC", "0")))
    except ValueError:
        return 0


class Notifier:
    """Sends sd_notify messages; every method does nothing when systemd did not ask for them.

    Build it with :meth:`from_environ`. Call :meth:`start` once the daemon serves: it sends
    ``READY=1`` and starts the status and watchdog tasks, which send ``STOPPING=1`` when the
    daemon's shutdown begins and end when it has closed.
    """

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        #: Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``); None: no watchdog.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._status = ""
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        raw = environ.get("NOTIFY_SOCKET", "")
        address = _address(raw)
        if raw and address is None:
            logger.warning("NOTIFY_SOCKET=%r is not a unix socket path or @name; not notifying systemd", raw)
        return cls(address, _watchdog_usec(environ) if address else 0)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; False when inert or failed.

        A new non-blocking socket per message, as ``sd_notify()`` does: nothing stays open, and a
        full receive queue costs a warning (once until a send succeeds), never a stalled event loop.
        """
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failing:
                logger.warning("sd_notify %s failed: %s", fields[0].partition("=")[0], exc)
            self._failing = True
            return False
        self._failing = False
        return True

    def status(self, text: str) -> None:
        """``STATUS=text``, shown by ``systemctl status``; sent only when it changed."""
        if text != self._status and self.notify(f"STATUS={text}"):
            self._status = text

    def ready(self, daemon: Daemon) -> None:
        self._status = describe(daemon)
        self.notify("READY=1", f"STATUS={self._status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload (systemd >= 253) match this reload to its request.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading config")

    def start(self, daemon: Daemon) -> None:
        """Call once the daemon serves (after ``await daemon.start()``): READY=1, then status and pings."""
        if not self.enabled:
            return
        self.ready(daemon)
        runs = [self._report(daemon)]
        if self.watchdog_interval is not None:
            runs.append(self._watchdog(daemon, self.watchdog_interval))
        for run in runs:
            task = asyncio.ensure_future(run)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _report(self, daemon: Daemon) -> None:
        draining = asyncio.ensure_future(daemon.draining.wait())
        try:
            while not draining.done():
                self.status(describe(daemon))
                await asyncio.wait({draining}, timeout=STATUS_INTERVAL_S)
        finally:
            draining.cancel()
        self.notify("STOPPING=1")
        while not daemon.stopping.is_set():
            self.status(describe_drain(daemon.active_streams, daemon.drain_left_s))
            await asyncio.sleep(DRAIN_STATUS_INTERVAL_S)
        self.status(f"stopping: finalising {daemon.active_streams} stream(s)")

    async def _watchdog(self, daemon: Daemon, interval: float) -> None:
        warned = False
        while not daemon.closed.is_set():
            if daemon.worker.alive or daemon.stopping.is_set():
                self.notify("WATCHDOG=1")
            elif not warned:
                warned = True
                logger.error("the model worker is not running: withholding watchdog pings so that systemd "
                             "restarts the daemon")
            await asyncio.sleep(interval)


def describe_drain(streams: int, left_s: float | None) -> str:
    """The status line while draining: how many live streams are left, and how long they may still go on."""
    within = f", finalised in {left_s:.0f} s at most" if left_s is not None else ""
    return f"draining: {streams} live stream(s) left{within}; no new ones taken"


def describe(daemon: Daemon) -> str:
    """One status line: streams, real-time factor, model, where it listens."""
    return (f"{daemon.active_streams} stream(s), RTF {daemon.metrics.rtf_now:.3f}; model {daemon.runner.name} on "
            f"{daemon.runner.device}; ws://{daemon.cfg.server.host}:{daemon.port}")


# -- reload ----------------------------------------------------------------------------------


def _flatten(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            out.update({f"{f.name}.{g.name}": getattr(section, g.name) for g in dataclasses.fields(section)})
        else:
            out[f.name] = section  # sources: one value
    return out


def split_changes(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """Compare a reloaded config with the running one.

    Returns the config to run now (``new``, but with the running value of every key that needs a
    restart), the changed keys applied live, and the changed keys that wait for a restart.
    """
    before, after = _flatten(old), _flatten(new)
    changed = [k for k in after if after[k] != before[k]]
    restart = [k for k in changed if needs_restart(k)]
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        running, loaded = getattr(old, f.name), getattr(new, f.name)
        keep = [k.partition(".")[2] for k in restart if k.partition(".")[0] == f.name]
        if not keep:
            sections[f.name] = loaded
        elif dataclasses.is_dataclass(running):
            sections[f.name] = dataclasses.replace(loaded, **{k: getattr(running, k) for k in keep})
        else:
            sections[f.name] = running
    return Config(**sections), [k for k in changed if k not in restart], restart


def _show(key: str, cfg: Config) -> str:
    return "***" if key in _SECRETS else repr(_flatten(cfg)[key])


class Reloader:
    """Applies ``load()`` (the config file and ``--set`` overrides, read again) to a running daemon.

    :meth:`request` is the SIGHUP handler; reloads run one at a time on the event loop. A config
    that does not load or validate is logged and the running one is kept.
    """

    def __init__(self, daemon: Daemon, load: Callable[[], Config], notifier: Notifier | None = None) -> None:
        self.daemon = daemon
        self.load = load
        self.notifier = notifier or Notifier(None)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def reload(self) -> None:
        async with self._lock:
            if self.daemon.draining.is_set():
                logger.info("reload: ignored, shutting down")
                return
            self.notifier.reloading()
            try:
                await self._apply()
            finally:
                if not self.daemon.draining.is_set():  # after STOPPING=1, READY=1 would confuse systemd
                    self.notifier.ready(self.daemon)

    async def _apply(self) -> None:
        d = self.daemon
        try:
            loaded = self.load()
            cfg, live, restart = split_changes(d.cfg, loaded)
            d.apply_config(cfg)  # reads the auth token: a missing token file is a bad config too
        except ConfigError as exc:
            logger.error("reload: %s; keeping the running config", exc)
            return
        for hook in list(d.on_reload):
            try:
                result = hook(cfg)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("reload: hook %r failed", hook)
        if restart:
            logger.warning("reload: needs a restart to take effect (systemctl restart), running values kept: %s",
                           ", ".join(f"{k} = {_show(k, loaded)} (running {_show(k, d.cfg)})" for k in restart))
        if live:
            logger.info("reload: applied %s", ", ".join(live))
        elif not restart:
            logger.info("reload: config unchanged")
