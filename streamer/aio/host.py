"""What a handler sees of the daemon: a narrow typed host.

Every protocol (:mod:`streamer.aio.protocols`), the viewers and the HTTP front are written against
:class:`StreamHost`, never against the daemon class: the config in force, a description of the
loaded model, the metrics, the stopping event, stream names, the letter budget of word lists,
opening a stream, one admission, and the viewers' subscriptions. Only :mod:`streamer.aio.server`
imports the handlers, to route connections to them; so no handler can reach the daemon's
listeners, worker or services, and the import graph has no circle.

A handler's life with its host::

    async with host.admission("native") as refused:     # counted against server.max_streams
        if refused is not None:
            ...                                          # tell the client, in its protocol's words
            return
        stream = open_named(host, session)               # the name (else the session id) is held
        try:
            ...                                          # feed audio, send events
        finally:
            close_named(host, stream)                    # and given back
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from streamer.aio.hub import ViewerQueue
from streamer.aio.metrics import Metrics
from streamer.aio.stream import LiveStream
from streamer.config import Config
from streamer.decoder import WordListBudget
from streamer.engine import SAMPLE_RATE, WordDecoder
from streamer.events import CLOSE_POLICY, Error
from streamer.exceptions import ProtocolError
from streamer.runner import FrameGeometry, Runner, TokenVocabulary, geometry_of

__all__ = ["Admission", "Health", "ModelInfo", "StreamHost", "close_named", "name_in_use", "open_named"]

Admission = Literal["stream", "viewer"]
"""what a connection is admitted as: a stream (``server.max_streams``) or a viewer (``server.max_viewers``)"""


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model as handlers describe it (``ready``, ``/v1/models``, Wyoming's ``info``)."""

    name: str
    """what to call the model in answers and logs"""
    device: str
    """where it runs"""
    vocab: TokenVocabulary
    """its CTC vocabulary: what a stream's own word list is spelled with"""
    geometry: FrameGeometry
    """its frame grid: what a ``[stream]`` schedule is cut on"""

    @classmethod
    def of(cls, runner: Runner) -> ModelInfo:
        return cls(runner.name, runner.device, runner.vocab, geometry_of(runner))


Status = Literal["ok", "degraded", "unavailable"]
Readiness = Literal["ready", "draining", "full", "unavailable"]


@dataclass(frozen=True)
class Health:
    """The daemon's health: what ``/healthz`` says, and what ``/livez`` and ``/readyz`` decide from.

    ``/healthz`` (:meth:`to_dict`) is 503 when :attr:`status` is ``unavailable``; ``/livez`` (:meth:`live`) is 503
    only when the process no longer works (its model worker is dead: restart it); ``/readyz`` (:meth:`readiness`) is
    200 only while the daemon takes new streams.
    """

    status: Status
    """``unavailable`` while not serving (shutting down or draining, the model worker or model server down),
    ``degraded`` while a service (MQTT) or a front-end process is not well, else ``ok``"""
    model: str
    device: str
    worker_alive: bool
    """whether the model worker runs (the process's own; with a model server, its client)"""
    streams: int
    """streams being served now: the whole daemon's with several front-end processes"""
    uptime_s: float
    draining: bool = False
    """the shutdown began: no new stream is taken (``server.drain_timeout_s``)"""
    max_streams: int = 0
    """``server.max_streams`` in force: at it, the daemon is not ready"""
    model_server: Literal["up", "unreachable"] | None = None
    """``[model_server] kind = "triton"``: whether it answers"""
    process_streams: int | None = None
    """with several front-end processes: this process's streams"""
    process: tuple[int, int] | None = None
    """with several front-end processes: this one's (slot, pid)"""
    processes: tuple[int, int] | None = None
    """with several front-end processes: (configured, serving)"""
    services: Mapping[str, Any] = field(default_factory=dict)
    """what services add (``mqtt``, ``mqtt_reason``; the supervisor's MQTT with several processes)"""

    def live(self) -> bool:
        """``/livez``: the event loop answered (this is running) and the model worker is alive."""
        return self.worker_alive

    def readiness(self) -> Readiness:
        """``/readyz``: ``ready`` (200) while it takes new streams, else why not (503)."""
        if self.draining:
            return "draining"
        if self.status == "unavailable":
            return "unavailable"
        if self.streams >= self.max_streams > 0:
            return "full"
        return "ready"

    def to_dict(self) -> dict[str, Any]:
        """The ``/healthz`` answer (what the supervisor's watchdog reads of each process, too)."""
        out: dict[str, Any] = {"status": self.status, "model": self.model, "device": self.device,
                               "worker_alive": self.worker_alive, "streams": self.streams,
                               "uptime_s": self.uptime_s, "draining": self.draining, **self.services}
        if self.process_streams is not None:
            out["process_streams"] = self.process_streams
        if self.process is not None:
            out["process"] = {"slot": self.process[0], "pid": self.process[1]}
        if self.processes is not None:
            out["processes"] = {"configured": self.processes[0], "serving": self.processes[1]}
        if self.model_server is not None:
            out["model_server"] = self.model_server
        return out

    def live_dict(self) -> dict[str, Any]:
        """The ``/livez`` answer."""
        return {"status": "alive" if self.live() else "dead", "worker_alive": self.worker_alive,
                "uptime_s": self.uptime_s}

    def ready_dict(self) -> dict[str, Any]:
        """The ``/readyz`` answer."""
        out: dict[str, Any] = {"status": self.readiness(), "streams": self.streams, "max_streams": self.max_streams}
        if self.model_server is not None:
            out["model_server"] = self.model_server
        return out


class StreamHost(Protocol):
    """The daemon as its handlers see it."""

    @property
    def cfg(self) -> Config:
        """The config in force (a reload replaces it: read it when a limit is used, never keep it)."""
        ...

    @property
    def model(self) -> ModelInfo: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def draining(self) -> asyncio.Event:
        """Set when the daemon's shutdown begins (SIGTERM): no new stream, upload or viewer is taken; live streams
        go on as normal until their clients end them or :attr:`stopping` is set (``server.drain_timeout_s``)."""
        ...

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the daemon finalises its streams (after the drain, or at once): streams finish, send their last
        finals and close with 1001. :attr:`draining` is set too by then."""
        ...

    @property
    def viewers_stop(self) -> asyncio.Event:
        """Set when viewers close: after every stream of the daemon sent its last finals."""
        ...

    @property
    def server_pid(self) -> int | None:
        """This process's pid when it is one of several front-end processes (``ready`` names it), else None."""
        ...

    @property
    def words(self) -> WordDecoder | None:
        """The word decoder new streams use unless they bring their own (``[decoder]``); None = greedy."""
        ...

    @property
    def word_lists(self) -> WordListBudget:
        """The letters of the word lists clients brought (``server.max_word_list_letters_total``)."""
        ...

    def claim_name(self, name: str, session: str) -> str | None:
        """Hold ``name`` for stream ``session`` in this process; or say who has it (and hold nothing)."""
        ...

    async def claim_name_everywhere(self, name: str, session: str) -> str | None:
        """:meth:`claim_name` in the whole daemon (several front-end processes ask their supervisor)."""
        ...

    def release_names(self, session: str) -> None:
        """The stream ``session`` ended: its names are free again."""
        ...

    def name_live(self, name: str) -> bool:
        """Whether a stream or capture source of this process has ``name`` now."""
        ...

    def open_stream(self, *, sample_rate: int = SAMPLE_RATE, channels: int = 1, encoding: str = "s16le",
                    name: str | None = None, id: str | None = None, words: WordDecoder | None = None,
                    live: bool = True) -> LiveStream:
        """A new live stream with the config in force (:meth:`streamer.aio.stream.Streams.open`)."""
        ...

    def admission(self, protocol: str, kind: Admission = "stream") -> AbstractAsyncContextManager[Error | None]:
        """Serve the running task as one ``kind`` of ``protocol`` inside the ``async with``: it yields None, the
        task is counted (and awaited at shutdown) until the block ends; or it yields why not (``busy``, and
        ``shutting_down`` for a stream) and counts nothing. The caller tells its client in its own protocol."""
        ...

    def subscribe(self, name: str) -> ViewerQueue:
        """A viewer's queue of the events of stream ``name``; :meth:`unsubscribe` when it leaves."""
        ...

    def unsubscribe(self, name: str, queue: ViewerQueue) -> None: ...


def name_in_use(wanted: str, holder: str) -> ProtocolError:
    """The refusal of a stream name another stream or a capture source holds (1008)."""
    return ProtocolError(f"stream name {wanted!r} is in use by {holder}; choose another name, or use "
                         f"{wanted!r} again once that stream has ended", kind="name_in_use", code=CLOSE_POLICY)


def open_named(host: StreamHost, session: str, *, name: str | None = None, sample_rate: int = SAMPLE_RATE,
               channels: int = 1, encoding: str = "s16le", words: WordDecoder | None = None,
               live: bool = True) -> LiveStream:
    """Open stream ``session`` under ``name`` (else its session id), holding the name in this process.

    Raises ``name_in_use`` (:func:`name_in_use`) when another live stream or a capture source has it;
    holding it again for the same session is harmless. :func:`close_named` gives it back.
    """
    wanted = name or session
    holder = host.claim_name(wanted, session)
    if holder is not None:
        raise name_in_use(wanted, holder)
    return host.open_stream(sample_rate=sample_rate, channels=channels, encoding=encoding, name=name, id=session,
                            words=words, live=live)


def close_named(host: StreamHost, stream: LiveStream | None, session: str) -> None:
    """Close ``stream`` (its queued windows are dropped) and free the names of ``session``."""
    if stream is not None:
        stream.close()
    host.release_names(session)
