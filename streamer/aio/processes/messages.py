"""The messages between a supervisor and its front-end processes (:mod:`streamer.aio.processes.cluster`), typed.

Sans-I/O, as :mod:`streamer.events` is: each message is a frozen dataclass with one wire mapping,
``to_dict()`` / ``from_dict()``; :func:`to_line` and :func:`from_line` frame them, one JSON object a
line with its ``op``. A request (:class:`Admit`, :class:`Claim`) carries an ``id`` and gets an answer
with the same id (:class:`AdmitAnswer`, :class:`ClaimAnswer`: ``op`` ``re``). A bad line raises
``ValueError``, ``KeyError`` or ``TypeError``.

From a process: :class:`Hello`, :class:`Listening`, :class:`Ready`, :class:`Reloaded`, :class:`Beat`,
:class:`Admit`, :class:`Release`, :class:`Claim`, :class:`Unclaim`, :class:`Watch`, :class:`Relay`,
:class:`Drained`. From the supervisor: :class:`Watching`, :class:`State`, :class:`Watch`,
:class:`Relay`, :class:`Drained` and the answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from streamer.events import Event, Final, Partial, message_from_dict

__all__ = ["Admit", "AdmitAnswer", "Beat", "Claim", "ClaimAnswer", "Drained", "Hello", "Listening", "Message", "Ready",
           "Relay", "Release", "Reloaded", "State", "Unclaim", "Watch", "Watching", "from_line", "parse_event_dict",
           "to_line"]


def parse_event_dict(d: dict[str, Any]) -> Event:
    """A relayed stream event (a partial or a final) from its wire mapping; ValueError for anything else."""
    event = message_from_dict(d)
    if not isinstance(event, Final | Partial):
        raise ValueError(f"not an event: {d.get('type')!r}")
    return event


@dataclass(frozen=True)
class Hello:
    """A process connected: which it is."""

    op: ClassVar[str] = "hello"
    slot: int
    pid: int

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "slot": self.slot, "pid": self.pid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hello:
        return cls(int(d["slot"]), int(d["pid"]))


@dataclass(frozen=True)
class Listening:
    """What a process listens on: config key -> value a sibling sets it to (``{"server.port": 41234}``)."""

    op: ClassVar[str] = "listening"
    ports: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "ports": self.ports}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Listening:
        return cls(dict(d["ports"]))


@dataclass(frozen=True)
class _Signal:
    """A message that is only its ``op``."""

    op: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls()


@dataclass(frozen=True)
class Ready(_Signal):
    """A process serves."""

    op: ClassVar[str] = "ready"


@dataclass(frozen=True)
class Reloaded(_Signal):
    """A process applied a reloaded config."""

    op: ClassVar[str] = "reloaded"


@dataclass(frozen=True)
class Drained(_Signal):
    """From a process: its streams are done. From the supervisor: every process's are (viewers may close)."""

    op: ClassVar[str] = "drained"


@dataclass(frozen=True)
class Beat:
    """A process's health (its ``/healthz``), every second."""

    op: ClassVar[str] = "beat"
    health: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "health": self.health}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Beat:
        return cls(dict(d.get("health", {})))


@dataclass(frozen=True)
class Admit:
    """May one more ``kind`` (``stream``, ``viewer``) be served under the daemon's ``limit``; held for ``key``."""

    op: ClassVar[str] = "admit"
    id: int
    kind: str
    key: str
    limit: int

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "kind": self.kind, "key": self.key, "limit": self.limit, "id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Admit:
        return cls(int(d["id"]), str(d["kind"]), str(d["key"]), int(d["limit"]))


@dataclass(frozen=True)
class AdmitAnswer:
    op: ClassVar[str] = "re"
    id: int
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "id": self.id, "ok": self.ok}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdmitAnswer:
        return cls(int(d["id"]), bool(d["ok"]))


@dataclass(frozen=True)
class Release:
    """What was admitted for ``key`` ended."""

    op: ClassVar[str] = "release"
    kind: str
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "kind": self.kind, "key": self.key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Release:
        return cls(str(d["kind"]), str(d["key"]))


@dataclass(frozen=True)
class Claim:
    """Hold stream name ``name`` for ``session`` in the whole daemon."""

    op: ClassVar[str] = "claim"
    id: int
    name: str
    session: str

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "name": self.name, "session": self.session, "id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Claim:
        return cls(int(d["id"]), str(d["name"]), str(d["session"]))


@dataclass(frozen=True)
class ClaimAnswer:
    op: ClassVar[str] = "re"
    id: int
    holder: str | None
    """who has the name (None: it is the asker's now)"""

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "id": self.id, "holder": self.holder}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClaimAnswer:
        return cls(int(d["id"]), None if d["holder"] is None else str(d["holder"]))


@dataclass(frozen=True)
class Unclaim:
    """The names of ``session`` are free again."""

    op: ClassVar[str] = "unclaim"
    session: str

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "session": self.session}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unclaim:
        return cls(str(d["session"]))


@dataclass(frozen=True)
class Watch:
    """From a process: it got its first viewer of ``name`` (``on``) or lost its last. From the supervisor: some
    process has viewers of ``name`` now, or none has any more."""

    op: ClassVar[str] = "watch"
    name: str
    on: bool

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "name": self.name, "on": self.on}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Watch:
        return cls(str(d["name"]), bool(d["on"]))


@dataclass(frozen=True)
class Watching:
    """To a process that connected: the names viewers watch, and what else to relay (MQTT)."""

    op: ClassVar[str] = "watching"
    names: tuple[str, ...]
    forward_all: bool = False
    """every final goes to the supervisor (its MQTT publisher)"""
    forward_partials: bool = False
    """... and every partial too"""

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "names": list(self.names), "forward_all": self.forward_all,
                "forward_partials": self.forward_partials}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Watching:
        return cls(tuple(d["names"]), bool(d.get("forward_all")), bool(d.get("forward_partials")))


@dataclass(frozen=True)
class State:
    """The whole daemon, pushed to every process each second and whenever it changes."""

    op: ClassVar[str] = "state"
    streams: int
    viewers: int
    configured: int
    """how many processes the daemon should have"""
    serving: int
    """how many of them serve"""
    health: dict[str, Any] | None = None
    """what the supervisor adds to ``/healthz`` (its MQTT publisher's state)"""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "streams": self.streams, "viewers": self.viewers,
                               "processes": {"configured": self.configured, "serving": self.serving}}
        if self.health is not None:
            out["health"] = self.health
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        processes = d["processes"]
        return cls(int(d["streams"]), int(d["viewers"]), int(processes["configured"]), int(processes["serving"]),
                   d.get("health"))


@dataclass(frozen=True)
class Relay:
    """An event of stream ``stream`` (session ``session``): to viewers on other processes, and to MQTT."""

    op: ClassVar[str] = "event"
    stream: str
    session: str
    event: Event

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "stream": self.stream, "session": self.session, "event": self.event.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Relay:
        return cls(str(d["stream"]), str(d["session"]), parse_event_dict(d["event"]))


Message = (Hello | Listening | Ready | Reloaded | Drained | Beat | Admit | AdmitAnswer | Release | Claim
           | ClaimAnswer | Unclaim | Watch | Watching | State | Relay)

_BY_OP: dict[str, Any] = {cls.op: cls for cls in (Hello, Listening, Ready, Reloaded, Drained, Beat, Admit, Release,
                                                   Claim, Unclaim, Watch, Watching, State, Relay)}


def to_line(msg: Message) -> bytes:
    """The message as one line of JSON."""
    return json.dumps(msg.to_dict(), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def from_line(line: bytes) -> Message:
    """The message of one line; ValueError (also for an unknown ``op``), KeyError or TypeError when it is bad."""
    d = json.loads(line)
    op = d["op"]
    if op == "re":
        return AdmitAnswer.from_dict(d) if "ok" in d else ClaimAnswer.from_dict(d)
    kind = _BY_OP.get(op)
    if kind is None:
        raise ValueError(f"unknown op {op!r}")
    message: Message = kind.from_dict(d)
    return message
