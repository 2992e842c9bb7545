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

The wire is one JSON object per line, ``{"op": ..., ...}``: the typed messages of
:mod:`streamer.aio.processes.messages`. A request carries an ``id`` and gets ``{"op": "re", "id": ..., ...}``
back. Events travel as their native JSON (``Event.to_dict()``).
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

from streamer.aio.processes.messages import (
    Admit,
    AdmitAnswer,
    Beat,
    Claim,
    ClaimAnswer,
    Drained,
    Hello,
    Listening,
    Message,
    Ready,
    Relay,
    Release,
    Reloaded,
    State,
    Unclaim,
    Watch,
    Watching,
    from_line,
    to_line,
)
from streamer.events import Event, Final
from streamer.exceptions import StreamerError

__all__ = ["CLUSTER_ENV", "ClusterLink", "ClusterService", "Member", "Place"]

logger = logging.getLogger("streamer.cluster")

CLUSTER_ENV = "STREAMER_CLUSTER"
"""the environment variable through which the supervisor tells a front-end process its place (JSON)"""
REQUEST_TIMEOUT_S = 10.0
"""how long a process waits for the supervisor's answer (admission, name); longer means it is gone"""
BEAT_INTERVAL_S = 1.0
"""how often a process reports its health; the supervisor pushes the daemon's state as often"""
STALE_AFTER_S = 3 * BEAT_INTERVAL_S
"""a process whose last heartbeat is older does not count as serving (``/healthz`` degraded)"""
LINE_LIMIT = 1 << 22
"""the longest line on the socket (an event with many words stays far below)"""
EVENT_BUFFER_LIMIT = 1 << 23
"""unsent bytes toward a peer beyond which events to it are dropped (a peer that stopped reading): memory
stays bounded; admissions, names and state are small and always sent"""
DROP_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Place:
    """A front-end process's place in the daemon, given by its supervisor in :data:`CLUSTER_ENV` (JSON)."""

    socket: str
    """the supervisor's Unix socket"""
    slot: int
    """which process this is (0 is the first: it alone runs capture sources and the Wyoming Unix socket)"""
    config: str | None
    """the config file, read again on reload"""
    overrides: dict[str, dict[str, Any]]
    """the command line's overrides and the listening ports of the first process"""
    sources: bool
    """whether this process runs the capture sources"""

    def to_json(self) -> str:
        return json.dumps({"socket": self.socket, "slot": self.slot, "config": self.config,
                           "overrides": self.overrides, "sources": self.sources})

    @classmethod
    def from_json(cls, text: str) -> Place:
        d = json.loads(text)
        return cls(str(d["socket"]), int(d["slot"]), d["config"], d["overrides"], bool(d.get("sources")))


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

    def send(self, msg: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(to_line(msg))


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

    def snapshot(self) -> State:
        """The daemon's state, as every process is told it."""
        now = time.monotonic()
        return State(self.count("stream"), self.count("viewer"), self.configured,
                     sum(1 for m in self.members if m.ready and now - m.beat_at <= STALE_AFTER_S),
                     self.extra_health() if self.extra_health is not None else None)

    def state(self) -> dict[str, Any]:
        """:meth:`snapshot` in its wire form."""
        return self.snapshot().to_dict()

    def begin_drain(self) -> None:
        """Shutdown began: once every process said its streams are done, tell all that viewers may close."""
        self.stopping = True
        self._check_drained()

    def _check_drained(self) -> None:
        if self.stopping and not self._drained_sent and all(m.drained for m in self.members):
            self._drained_sent = True
            for m in self.members:
                m.send(Drained())

    async def _push_state(self) -> None:
        while True:
            await asyncio.sleep(BEAT_INTERVAL_S)
            self.push_state()

    def push_state(self) -> None:
        """Send every process the daemon's state now (it changed: a process came, became ready or went)."""
        self._broadcast(self.snapshot())

    # -- one process's connection -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:  # accepted just before stop(): end it too
            writer.close()
            return
        member = Member(writer)
        self.members.add(member)
        member.send(Watching(tuple(sorted(self.watched())), self.forward_all, self.forward_partials))
        try:
            while line := await reader.readline():
                try:
                    self._handle(member, from_line(line), line)
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
            self._broadcast(Watch(name, False))
        if member.admitted["stream"] or member.names:
            logger.info("cluster: process %d (pid %d) left; released its %d stream(s) and %d name(s)", member.slot,
                        member.pid, len(member.admitted["stream"]), len(member.names))
        if self.on_member is not None:
            self.on_member(member, "left")
        self._check_drained()
        self.push_state()

    def _broadcast(self, msg: Message, *, skip: Member | None = None) -> None:
        data = to_line(msg)
        for m in self.members:
            if m is not skip and not m.writer.is_closing():
                m.writer.write(data)

    def _handle(self, m: Member, msg: Message, line: bytes) -> None:
        """One message of process ``m`` (``line``: as it came)."""
        match msg:
            case Relay(stream=name):
                for other in self.members:  # the line as it came: the event as the process wrote it
                    if (other is not m and name in other.watches and not other.writer.is_closing()
                            and not other.drops.full(other.writer)):
                        other.writer.write(line)
                if self.on_event is not None:
                    self.on_event(name, msg.session, msg.event)
            case Admit():
                ok = self.count(msg.kind) < msg.limit
                if ok:
                    m.admitted[msg.kind].add(msg.key)
                m.send(AdmitAnswer(msg.id, ok))
            case Release():
                m.admitted[msg.kind].discard(msg.key)
            case Claim(name=name, session=session):
                holder = next((o for o in self.members if name in o.names), None)
                if holder is None:
                    m.names[name] = session
                    m.send(ClaimAnswer(msg.id, None))
                else:
                    ok = holder is m and m.names[name] == session
                    m.send(ClaimAnswer(msg.id, None if ok else "another live stream"))
            case Unclaim():
                for name in [n for n, s in m.names.items() if s == msg.session]:
                    del m.names[name]
            case Watch(name=name, on=on):
                was = name in self.watched()
                (m.watches.add if on else m.watches.discard)(name)
                if was != (name in self.watched()):
                    self._broadcast(Watch(name, on))
            case Beat():
                m.health, m.beat_at = msg.health, time.monotonic()
            case Hello():
                m.slot, m.pid = msg.slot, msg.pid
                self._notify(m, "hello")
                m.send(self.snapshot())
            case Listening():
                m.listening = dict(msg.ports)
                self._notify(m, "listening")
            case Ready():
                m.ready = True
                m.beat_at = time.monotonic()
                self._notify(m, "ready")
                self.push_state()
            case Reloaded():
                self._notify(m, "reloaded")
            case Drained():
                m.drained = True
                self._check_drained()
            case _:
                raise ValueError(f"a process does not send {msg.op!r}")

    def _notify(self, m: Member, what: str) -> None:
        if self.on_member is not None:
            self.on_member(m, what)


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
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self.watched: set[str] = set()
        """names a viewer somewhere in the daemon listens to: only their events are relayed"""
        self.forward_all = False
        """the supervisor publishes to MQTT: every final (and partial) goes to it"""
        self.forward_partials = False
        self.state: State | None = None
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
        link.send(Hello(slot, link.pid))
        link._task = asyncio.create_task(link._read(), name="streamer-cluster")
        return link

    def send(self, msg: Message) -> None:
        if not self._writer.is_closing():
            self._writer.write(to_line(msg))

    async def _request(self, ask: Callable[[int], Admit | Claim]) -> Message:
        """Send the request ``ask(id)`` makes; the supervisor's answer."""
        if self.lost.is_set():
            raise StreamerError("the supervisor is gone")
        rid = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        self.send(ask(rid))
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return await future
        except TimeoutError:
            raise StreamerError(f"the supervisor did not answer in {REQUEST_TIMEOUT_S:g} s") from None
        finally:
            self._waiting.pop(rid, None)

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                match from_line(line):
                    case AdmitAnswer(id=rid) | ClaimAnswer(id=rid) as answer:
                        future = self._waiting.get(rid)
                        if future is not None and not future.done():
                            future.set_result(answer)
                    case Relay(stream=stream, session=session, event=event):
                        if self.deliver is not None:
                            self.deliver(stream, session, event)
                    case Watch(name=name, on=on):
                        (self.watched.add if on else self.watched.discard)(name)
                    case Watching() as watching:
                        self.watched = set(watching.names)
                        self.forward_all = watching.forward_all
                        self.forward_partials = watching.forward_partials
                    case State() as state:
                        self.state = state
                    case Drained():
                        self._drained.set()
        except (ConnectionError, ValueError, KeyError, TypeError, asyncio.LimitOverrunError) as exc:
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
            answer = await self._request(lambda rid: Admit(rid, kind, key, limit))
        except StreamerError as exc:
            logger.warning("cluster: refusing a %s: %s", kind, exc)
            return False
        return isinstance(answer, AdmitAnswer) and answer.ok

    def release(self, kind: str, key: str) -> None:
        self.send(Release(kind, key))

    async def claim(self, name: str, session: str) -> str | None:
        """Hold ``name`` for ``session`` in the whole daemon; or say who has it."""
        try:
            answer = await self._request(lambda rid: Claim(rid, name, session))
        except StreamerError as exc:
            return f"nobody, but the daemon cannot check now ({exc})"
        return answer.holder if isinstance(answer, ClaimAnswer) else "nobody, but the supervisor answered otherwise"

    def unclaim(self, session: str) -> None:
        self.send(Unclaim(session))

    def viewing(self, name: str, on: bool) -> None:
        """This process got its first viewer of ``name`` (``on``) or lost its last."""
        self.send(Watch(name, on))

    def wants_partials(self, stream: str) -> bool:
        """Event sink: whether a viewer in another process watches ``stream``, or the supervisor's MQTT takes
        partials."""
        return stream in self.watched or (self.forward_all and self.forward_partials)

    def publish(self, stream: str, session: str, event: Event) -> None:
        """Event sink: relay an event of this process's stream to viewers elsewhere and to MQTT."""
        final = isinstance(event, Final)
        if (stream in self.watched or (self.forward_all and (final or self.forward_partials))) \
                and not self._drops.full(self._writer):
            # written to the socket now (asyncio writes at once when nothing waits): a final the client
            # is sent afterwards reaches the supervisor even if this process is killed right then
            self.send(Relay(stream, session, event))

    async def beat(self, health: Callable[[], dict[str, Any]]) -> None:
        """Report this process's health every second (the supervisor's watchdog needs it), until cancelled."""
        while not self.lost.is_set():
            self.send(Beat(health()))
            await asyncio.sleep(BEAT_INTERVAL_S)

    async def drained(self, limit_s: float) -> None:
        """Say this process's streams are done; return once every process's are (or ``limit_s`` passed)."""
        self.send(Drained())
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
