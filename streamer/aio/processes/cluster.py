"""What the front-end processes of one daemon share, through their supervisor (``server.processes`` > 1).

Each front-end process (:mod:`streamer.cli.serve` run by :mod:`streamer.aio.processes.supervisor`) owns its
connections and streams, but a few things must hold for the whole daemon whichever process a client
lands on. The supervisor keeps them in a :class:`ClusterService` on a Unix socket; each process holds
one :class:`ClusterLink` connection to it for its whole life::

    stream and viewer admission   server.max_streams / max_viewers are the daemon's totals
    stream names                  a name is one live stream's in the whole daemon
    events                        a viewer on one process sees a stream served by another; finals and
                                  partials go to the supervisor's one MQTT publisher
    health                        /healthz counts every process's streams and says which processes serve
    shutdown                      viewers close only after every process's streams sent their finals

Everything a process holds (admissions, names, viewers) belongs to its connection: when a process dies,
its connection closes and the supervisor releases all of it at once, so slots never leak. When the
supervisor goes away, each process finalises its streams and exits (its connection closed).

The wire is one JSON object per line, ``{"op": ..., ...}``; a request carries an ``id`` and gets
``{"op": "re", "id": ..., ...}`` back. Events travel as their native JSON (``Event.to_dict()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamer.events import Event, Final, Partial
from streamer.exceptions import StreamerError

__all__ = ["CLUSTER_ENV", "ClusterLink", "ClusterService", "Member"]

logger = logging.getLogger("streamer.cluster")

CLUSTER_ENV = "STREAMER_CLUSTER"
"""the environment variable through which the supervisor tells a front-end process its place (JSON)"""
REQUEST_TIMEOUT_S = 10.0
"""how long a process waits for the supervisor's answer (admission, name); longer means it is gone"""
BEAT_INTERVAL_S = 1.0
"""how often a process reports its health; the supervisor pushes the daemon's state as often"""
LINE_LIMIT = 1 << 22
"""the longest line on the socket (an event with many words stays far below)"""
EVENT_BUFFER_LIMIT = 1 << 23
"""unsent bytes toward a peer beyond which events to it are dropped (a peer that stopped reading): memory
stays bounded; admissions, names and state are small and always sent"""
DROP_LOG_INTERVAL_S = 10.0


class _DropLog:
    """Counts events dropped toward a peer that does not read, and logs them at most once per interval."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.dropped = 0
        self._logged_at = -DROP_LOG_INTERVAL_S

    def full(self, writer: asyncio.StreamWriter) -> bool:
        if writer.transport.get_write_buffer_size() <= EVENT_BUFFER_LIMIT:
            return False
        self.dropped += 1
        now = time.monotonic()
        if now - self._logged_at >= DROP_LOG_INTERVAL_S:
            self._logged_at = now
            logger.warning("cluster: %s reads nothing of the %d bytes waiting for it: dropped %d event(s) so far",
                           self.peer, writer.transport.get_write_buffer_size(), self.dropped)
        return True


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# -- the supervisor's side ------------------------------------------------------------------------


@dataclass(eq=False)
class Member:
    """One connected front-end process and everything it holds."""

    writer: asyncio.StreamWriter
    slot: int = -1
    pid: int = 0
    ready: bool = False
    drained: bool = False
    admitted: dict[str, set[str]] = field(default_factory=lambda: {"stream": set(), "viewer": set()})
    names: dict[str, str] = field(default_factory=dict)
    """name -> session"""
    watches: set[str] = field(default_factory=set)
    """names this process has viewers for"""
    health: dict[str, Any] = field(default_factory=dict)
    beat_at: float = field(default_factory=time.monotonic)
    listening: dict[str, Any] = field(default_factory=dict)
    drops: _DropLog = field(default_factory=lambda: _DropLog("a front-end process"))

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(_line(msg))


class ClusterService:
    """The supervisor's half: admission counts, the name registry, the event relay, the daemon's state.

    ``on_event(stream, session, event)`` receives every event a process forwards (the MQTT publisher);
    ``on_member`` is called when a process says hello, becomes ready, reports listening ports or goes.
    """

    def __init__(self, path: str, *, on_event: Callable[[str, str, Event], None] | None = None,
                 on_member: Callable[[Member, str], None] | None = None, forward_all: bool = False,
                 forward_partials: bool = False, extra_health: Callable[[], dict[str, Any]] | None = None) -> None:
        self.path = path
        self.on_event = on_event
        self.on_member = on_member
        self.forward_all = forward_all
        """whether processes send every final here, not only those a viewer elsewhere waits for (MQTT)"""
        self.forward_partials = forward_partials
        """... and every partial too (``mqtt.publish_partials``)"""
        self.extra_health = extra_health
        self.members: set[Member] = set()
        self.configured = 0
        """how many processes the daemon should have (for /healthz)"""
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._state_task: asyncio.Task[None] | None = None
        self._drained_sent = False
        self._closed = False

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=LINE_LIMIT)
        os.chmod(self.path, 0o600)
        self._state_task = asyncio.create_task(self._push_state(), name="streamer-cluster-state")

    async def stop(self) -> None:
        self._closed = True
        if self._state_task is not None:
            self._state_task.cancel()
        if self._server is not None:
            self._server.close()
        for m in list(self.members):
            m.writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    # -- what the daemon as a whole has -----------------------------------------------------------

    def count(self, kind: str) -> int:
        return sum(len(m.admitted[kind]) for m in self.members)

    def watched(self) -> set[str]:
        return set().union(*(m.watches for m in self.members)) if self.members else set()

    def state(self) -> dict[str, Any]:
        serving = sum(1 for m in self.members if m.ready)
        out: dict[str, Any] = {"op": "state", "streams": self.count("stream"), "viewers": self.count("viewer"),
                               "processes": {"configured": self.configured, "serving": serving}}
        if self.extra_health is not None:
            out["health"] = self.extra_health()
        return out

    def begin_drain(self) -> None:
        """Shutdown began: once every process said its streams are done, tell all that viewers may close."""
        self.stopping = True
        self._check_drained()

    def _check_drained(self) -> None:
        if self.stopping and not self._drained_sent and all(m.drained for m in self.members):
            self._drained_sent = True
            for m in self.members:
                m.send({"op": "drained"})

    async def _push_state(self) -> None:
        while True:
            await asyncio.sleep(BEAT_INTERVAL_S)
            self.push_state()

    def push_state(self) -> None:
        """Send every process the daemon's state now (it changed: a process came, became ready or went)."""
        self._broadcast(self.state())

    # -- one process's connection -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:  # accepted just before stop(): end it too
            writer.close()
            return
        member = Member(writer)
        self.members.add(member)
        member.send({"op": "watching", "names": sorted(self.watched()), "forward_all": self.forward_all,
                     "forward_partials": self.forward_partials})
        try:
            while line := await reader.readline():
                try:
                    self._handle(member, json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    logger.error("cluster: bad message from process %d: %s (%r)", member.slot, exc, line[:200])
        except (ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
            logger.warning("cluster: the connection of process %d broke: %s", member.slot, exc)
        finally:
            self._leave(member)
            writer.close()

    def _leave(self, member: Member) -> None:
        """A process went (exited or died): everything it held is free again."""
        self.members.discard(member)
        before = member.watches
        member.watches = set()
        left = self.watched()
        for name in before - left:
            self._broadcast({"op": "watch", "name": name, "on": False})
        if member.admitted["stream"] or member.names:
            logger.info("cluster: process %d (pid %d) left; released its %d stream(s) and %d name(s)", member.slot,
                        member.pid, len(member.admitted["stream"]), len(member.names))
        if self.on_member is not None:
            self.on_member(member, "left")
        self._check_drained()
        self.push_state()

    def _broadcast(self, msg: dict[str, Any], *, skip: Member | None = None) -> None:
        data = _line(msg)
        for m in self.members:
            if m is not skip and not m.writer.is_closing():
                m.writer.write(data)

    def _handle(self, m: Member, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "event":
            name = msg["stream"]
            data = _line(msg)
            for other in self.members:
                if (other is not m and name in other.watches and not other.writer.is_closing()
                        and not other.drops.full(other.writer)):
                    other.writer.write(data)
            if self.on_event is not None:
                self.on_event(name, msg["session"], parse_event_dict(msg["event"]))
        elif op == "admit":
            kind, key, limit = msg["kind"], msg["key"], int(msg["limit"])
            ok = self.count(kind) < limit
            if ok:
                m.admitted[kind].add(key)
            m.send({"op": "re", "id": msg["id"], "ok": ok})
        elif op == "release":
            m.admitted[msg["kind"]].discard(msg["key"])
        elif op == "claim":
            name, session = msg["name"], msg["session"]
            holder = next((o for o in self.members if name in o.names), None)
            if holder is None:
                m.names[name] = session
                m.send({"op": "re", "id": msg["id"], "holder": None})
            else:
                ok = holder is m and m.names[name] == session
                m.send({"op": "re", "id": msg["id"], "holder": None if ok else "another live stream"})
        elif op == "unclaim":
            for name in [n for n, s in m.names.items() if s == msg["session"]]:
                del m.names[name]
        elif op == "watch":
            name, on = msg["name"], bool(msg["on"])
            was = name in self.watched()
            (m.watches.add if on else m.watches.discard)(name)
            if was != (name in self.watched()):
                self._broadcast({"op": "watch", "name": name, "on": on})
        elif op == "beat":
            m.health, m.beat_at = msg.get("health", {}), time.monotonic()
        elif op == "hello":
            m.slot, m.pid = int(msg["slot"]), int(msg["pid"])
            self._notify(m, "hello")
            m.send(self.state())
        elif op == "listening":
            m.listening = dict(msg["ports"])
            self._notify(m, "listening")
        elif op == "ready":
            m.ready = True
            m.beat_at = time.monotonic()
            self._notify(m, "ready")
            self.push_state()
        elif op == "reloaded":
            self._notify(m, "reloaded")
        elif op == "drained":
            m.drained = True
            self._check_drained()
        else:
            raise ValueError(f"unknown op {op!r}")

    def _notify(self, m: Member, what: str) -> None:
        if self.on_member is not None:
            self.on_member(m, what)


def parse_event_dict(d: dict[str, Any]) -> Event:
    kind = d.get("type")
    if kind == "final":
        return Final.from_dict(d)
    if kind == "partial":
        return Partial.from_dict(d)
    raise ValueError(f"not an event: {kind!r}")


# -- a front-end process's side ----------------------------------------------------------------------


class ClusterLink:
    """A front-end process's connection to its supervisor; also an event sink of the process's hub.

    Build it with :meth:`connect`; :meth:`attach` wires it into a daemon (admission, names, events, health,
    shutdown). When the connection ends (the supervisor went away) ``on_lost`` is called.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slot: int) -> None:
        self.slot = slot
        self.pid = os.getpid()
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.watched: set[str] = set()
        """names a viewer somewhere in the daemon listens to: only their events are relayed"""
        self.forward_all = False
        """the supervisor publishes to MQTT: every final (and partial) goes to it"""
        self.forward_partials = False
        self.state: dict[str, Any] = {}
        """the daemon's state as the supervisor last pushed it"""
        self.deliver: Callable[[str, str, Event], None] | None = None
        """hands an event of another process's stream to this process's viewers"""
        self.on_lost: Callable[[], None] | None = None
        self.lost = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._drops = _DropLog("the supervisor")

    @classmethod
    async def connect(cls, path: str, slot: int) -> ClusterLink:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=LINE_LIMIT)
        except OSError as exc:
            raise StreamerError(f"cannot reach the supervisor at {path}: {exc.strerror or exc}") from None
        link = cls(reader, writer, slot)
        link.send({"op": "hello", "slot": slot, "pid": link.pid})
        link._task = asyncio.create_task(link._read(), name="streamer-cluster")
        return link

    def send(self, msg: dict[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(_line(msg))

    async def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.lost.is_set():
            raise StreamerError("the supervisor is gone")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        self.send({**msg, "id": rid})
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                answer: dict[str, Any] = await future
                return answer
        except TimeoutError:
            raise StreamerError(f"the supervisor did not answer in {REQUEST_TIMEOUT_S:g} s") from None
        finally:
            self._waiting.pop(rid, None)

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                msg = json.loads(line)
                op = msg["op"]
                if op == "re":
                    future = self._waiting.get(msg["id"])
                    if future is not None and not future.done():
                        future.set_result(msg)
                elif op == "event":
                    if self.deliver is not None:
                        self.deliver(msg["stream"], msg["session"], parse_event_dict(msg["event"]))
                elif op == "watch":
                    (self.watched.add if msg["on"] else self.watched.discard)(msg["name"])
                elif op == "watching":
                    self.watched = set(msg["names"])
                    self.forward_all = bool(msg.get("forward_all"))
                    self.forward_partials = bool(msg.get("forward_partials"))
                elif op == "state":
                    self.state = msg
                elif op == "drained":
                    self._drained.set()
        except (ConnectionError, ValueError, KeyError, asyncio.LimitOverrunError) as exc:
            logger.error("cluster: the connection to the supervisor broke: %s", exc)
        finally:
            self.lost.set()
            self._drained.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(StreamerError("the supervisor is gone"))
            if self.on_lost is not None:
                self.on_lost()

    # -- what the daemon asks --------------------------------------------------------------------------

    async def admit(self, kind: str, key: str, limit: int) -> bool:
        """Whether one more ``kind`` (``stream``, ``viewer``) fits under the daemon's ``limit``; if so it is held."""
        try:
            return bool((await self._request({"op": "admit", "kind": kind, "key": key, "limit": limit}))["ok"])
        except StreamerError as exc:
            logger.warning("cluster: refusing a %s: %s", kind, exc)
            return False

    def release(self, kind: str, key: str) -> None:
        self.send({"op": "release", "kind": kind, "key": key})

    async def claim(self, name: str, session: str) -> str | None:
        """Hold ``name`` for ``session`` in the whole daemon; or say who has it."""
        try:
            holder = (await self._request({"op": "claim", "name": name, "session": session}))["holder"]
        except StreamerError as exc:
            return f"nobody, but the daemon cannot check now ({exc})"
        return None if holder is None else str(holder)

    def unclaim(self, session: str) -> None:
        self.send({"op": "unclaim", "session": session})

    def viewing(self, name: str, on: bool) -> None:
        """This process got its first viewer of ``name`` (``on``) or lost its last."""
        self.send({"op": "watch", "name": name, "on": on})

    def publish(self, stream: str, session: str, event: Event) -> None:
        """Event sink: relay an event of this process's stream to viewers elsewhere and to MQTT."""
        final = isinstance(event, Final)
        if (stream in self.watched or (self.forward_all and (final or self.forward_partials))) \
                and not self._drops.full(self._writer):
            # written to the socket now (asyncio writes at once when nothing waits): a final the client
            # is sent afterwards reaches the supervisor even if this process is killed right then
            self.send({"op": "event", "stream": stream, "session": session, "event": event.to_dict()})

    def health(self) -> dict[str, Any]:
        """The daemon-wide part of ``/healthz``, from the supervisor's last push."""
        out: dict[str, Any] = {"process": {"slot": self.slot, "pid": self.pid}}
        if "streams" in self.state:
            out["streams"] = self.state["streams"]
            out["processes"] = self.state["processes"]
        out.update(self.state.get("health", {}))
        return out

    async def beat(self, health: Callable[[], dict[str, Any]]) -> None:
        """Report this process's health every second (the supervisor's watchdog needs it), until cancelled."""
        while not self.lost.is_set():
            self.send({"op": "beat", "health": health()})
            await asyncio.sleep(BEAT_INTERVAL_S)

    async def drained(self, limit_s: float) -> None:
        """Say this process's streams are done; return once every process's are (or ``limit_s`` passed)."""
        self.send({"op": "drained"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await self._drained.wait()

    async def close(self) -> None:
        """Send what is buffered and close (at the end of the process)."""
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
