"""Plain HTTP on the websocket ports: uploads, and the requests websockets' parser drops.

websockets reads a request head and upgrades it; it drops, without a word, a request with a body
(and, before websockets 14, any method but GET). So every connection's first bytes go through h11
first (:class:`HttpConnection`): a ``POST`` that an :class:`UploadRoute` serves is h11's to the end
(head, ``Content-Length`` or chunked body, ``Expect: 100-continue``, the answer), a request websockets
would drop gets 405 or h11's 400, and every other request is handed, byte for byte, to websockets,
which goes on as if it had read them itself.

Connections whose request head has not all come are bounded (:class:`PendingHeads`,
``server.max_pending_handshakes``): a new one beyond the bound closes the oldest of them.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import h11
from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from streamer.aio.host import StreamHost
from streamer.aio.http.access import page_allowed, repeated_header
from streamer.aio.http.limits import BoundedConnection, RefusalLog
from streamer.memory import MemoryReturn

__all__ = ["ALLOW", "OPEN_TIMEOUT_S", "HttpConnection", "PendingHeads", "Upload", "UploadProblem", "UploadRoute",
           "is_tls", "not_allowed", "respond"]

logger = logging.getLogger("streamer.server")

OPEN_TIMEOUT_S = 10.0
"""how long a connection may take to send its request head (and complete a websocket handshake): websockets'
``open_timeout``, applied by :class:`HttpConnection` so that an upload's answer may take longer"""
ALLOW = "GET, HEAD"
"""the methods the daemon answers (``Allow`` of a 405)"""
HEAD_BYTES = 1 << 16
"""the largest request head h11 reads (its ``max_incomplete_event_size``; also a chunk-size or trailer line)"""
LINGER_S = 5.0
"""how long an answered upload's connection stays open for the client to finish sending and read the answer"""
HEAD_GRACE_S = 1.0
"""how long a new connection may wait for its request head before a newer one may close it
(:class:`PendingHeads`): a client's head, sent at once, has been read by then"""
TRIM_AFTER_BYTES = 8 << 20
"""upload bytes answered before freed memory is handed back to the system: an upload's body (:meth:`Upload.drop_body`),
its form's copy and the blocks of audio decoded from it are freed when it is answered, but glibc keeps them in its
arenas (one per thread, and the audio is decoded in threads): five uploads of 22 MB (15 s of 8-channel 96 kHz audio,
46 MB decoded each) left the daemon's memory 283-285 MB above where it was, 90-130 MB with the trim and the dropped
body (most of it the model's memory for the larger batches an upload brings)"""
TRIM_DELAY_S = 1.0
"""how long after an upload's answer its memory is handed back: its connection, body and audio go meanwhile"""
MAX_CHUNKS = 16384
"""chunks of one chunked body: each costs the event loop a few microseconds, and clients send 8-64 KiB ones"""


def is_tls(conn: ServerConnection) -> bool:
    """Whether the connection came in over TLS (``server.tls_cert``)."""
    return conn.transport.get_extra_info("ssl_object") is not None


def respond(conn: ServerConnection, status: int, body: bytes | str, ctype: str) -> Response:
    """A complete HTTP response with ``body`` of type ``ctype`` (to a request websockets read)."""
    response = conn.respond(status, "")
    data = body.encode() if isinstance(body, str) else body
    response.body = data
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = ctype
    response.headers["Content-Length"] = str(len(data))
    return response


def not_allowed(protocol: ServerProtocol, method: str) -> Response:
    """405 for a method the daemon does not serve, with ``Allow`` (to a request websockets read)."""
    response = protocol.reject(http.HTTPStatus.METHOD_NOT_ALLOWED,
                               f"method {method[:40]!r} is not allowed here; use {ALLOW}\n")
    response.headers["Allow"] = ALLOW
    return response


class UploadRoute(Protocol):
    """Who serves some uploads (requests with a body), e.g. :class:`~streamer.aio.http.openai.OpenAIFront`."""

    @property
    def max_upload_bytes(self) -> int:
        """The largest body read; beyond, :attr:`Upload.too_large`."""
        ...

    def serves_post(self, path: str) -> bool:
        """Whether a POST to ``path`` is served here (the others get 405)."""
        ...

    async def serve_upload(self, conn: HttpConnection, upload: Upload) -> None:
        """Answer the upload (:meth:`HttpConnection.answer`), its errors in the API's shape through
        :meth:`HttpConnection.serve_upload`, which closes the connection after."""
        ...


@dataclass(eq=False)
class Upload:
    """A request with a body that the daemon serves, read by :class:`HttpConnection` through h11.

    The head is parsed when it arrives; the body is read as it comes, at most ``limit`` bytes, into
    :attr:`body`. Beyond ``limit`` nothing is kept: :attr:`too_large` says so.
    """

    request: Request
    """the method is always POST; ``request.path`` holds the query"""
    length: int | None
    """``Content-Length``; None when chunked or when neither was given (:attr:`framing` says which)"""
    framing: str
    """``length``, ``chunked``, ``none`` (no body length given: 411) or ``ambiguous`` (both: 400, as request
    smuggling sends them)"""
    limit: int
    body: asyncio.Future[bytes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """the whole body; EOFError when the client left first, ValueError for bad framing"""
    too_large: bool = False
    received: int = 0
    """body bytes received so far, kept or not"""
    unwanted: bool = False
    """set once the upload is answered: the rest of its body is read and dropped, never kept (an answer given
    before the body came, 401 or 429, must not leave the body to fill memory while the client sends it)"""

    def drop_body(self) -> None:
        """Let the body go once the upload is answered (:attr:`body` is ``b""`` after). The connection that holds
        the upload is freed only when the garbage collector finds it (websockets' connection and protocol refer
        to each other), which may be many uploads later: their bodies stayed with them."""
        dropped = asyncio.get_running_loop().create_future()
        dropped.set_result(b"")
        self.body = dropped

    @property
    def expects_continue(self) -> bool:
        """The client waits for ``100 Continue`` before it sends the body (curl does, for large ones)."""
        return self.request.headers.get("Expect", "").lower() == "100-continue"

    def check(self, conn: HttpConnection, host: StreamHost, *, authorized: Callable[[Request], bool],
              known_host: Callable[[Request], bool], limit_key: str) -> None:
        """The checks every upload passes before the daemon takes a stream for it, in this order: single headers,
        this daemon's host name, the page's origin, the token, the body's framing and size; else
        :class:`UploadProblem`. ``limit_key``: the config key of :attr:`limit`, named in the message."""
        request = self.request
        if (name := repeated_header(request.headers)) is not None:
            raise UploadProblem(400, "repeated_header", f"the header {name} came more than once; send it once")
        if not known_host(request):
            host.metrics.streams_rejected.labels("host").inc()
            raise UploadProblem(403, "host", "this server does not answer to that host name without a token: add it "
                                "to server.allowed_hosts, or use an IP address or localhost")
        if not page_allowed(request.headers, host.cfg.server.allowed_origins, is_tls(conn)):
            # a form or a body needs no preflight: any page could make a visitor's daemon transcribe and publish
            host.metrics.streams_rejected.labels("origin").inc()
            origin = (request.headers.get_all("Origin") or ["another site"])[0]
            raise UploadProblem(403, "origin", f"a page of {origin[:80]} may not upload here: only this server's own "
                                "pages and the origins in server.allowed_origins may")
        if not authorized(request):
            host.metrics.streams_rejected.labels("auth").inc()
            raise UploadProblem(401, "auth", "missing or wrong token")
        if self.too_large:
            raise UploadProblem(413, "too_large", f"the upload has {self.length} bytes; at most {self.limit} "
                                f"({limit_key})")
        if self.framing == "ambiguous":
            raise UploadProblem(400, "ambiguous", "the request has both Content-Length and Transfer-Encoding: "
                                "chunked; send one of them")
        if self.framing == "none":
            raise UploadProblem(411, "length_required", "the request has no Content-Length (nor Transfer-Encoding: "
                                "chunked)")

    async def read(self, conn: HttpConnection, *, timeout_s: float, idle_s: float, timeout_key: str,
                   limit_key: str) -> bytes:
        """The whole body, once it has come: within ``timeout_s`` and with no pause over ``idle_s`` (the request
        holds a stream meanwhile, as a silent websocket would), after ``100 Continue`` when the client waits for
        it. :class:`UploadProblem` (408, 413, 400), or ConnectionResetError when the client left."""
        if self.expects_continue and not self.body.done():
            await conn.answer_continue()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        seen, heard = -1, loop.time()
        try:
            while not self.body.done():
                now = loop.time()
                if self.received != seen:
                    seen, heard = self.received, now
                if now >= deadline:
                    raise UploadProblem(408, "timeout", f"the upload did not arrive within {timeout_s:g} s "
                                        f"({timeout_key}); {self.received} bytes came")
                if now - heard >= idle_s:
                    raise UploadProblem(408, "idle", f"nothing of the upload came for {idle_s:g} s "
                                        f"(server.idle_timeout_s); {self.received} bytes came")
                await asyncio.wait({self.body}, timeout=min(deadline, heard + idle_s, now + 1.0) - now)
            return self.body.result()
        except EOFError:
            raise ConnectionResetError("the client left during its upload") from None
        except ValueError as exc:
            if self.too_large:
                raise UploadProblem(413, "too_large", f"the upload has more than {self.limit} bytes "
                                    f"({limit_key})") from None
            raise UploadProblem(400, "malformed", f"malformed request body: {exc}") from None


Problem = Literal["repeated_header", "host", "origin", "auth", "too_large", "ambiguous", "length_required",
                  "timeout", "idle", "malformed"]
"""why an upload is not transcribed: each API answers every one in its own shape (status, code, message)"""


class UploadProblem(Exception):
    """An upload refused before or while its body comes (:meth:`Upload.check`, :meth:`Upload.read`): its HTTP
    ``status``, its :data:`Problem` and a message that says how to fix it. Each API maps it to its own shape."""

    def __init__(self, status: int, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem


T = TypeVar("T")
E = TypeVar("E", bound=Exception)


_memory = MemoryReturn(TRIM_AFTER_BYTES, TRIM_DELAY_S)


@dataclass(frozen=True)
class _Refusal:
    """A request answered at once: one websockets would drop, or one h11 cannot read."""

    status: int
    text: str
    allow: bool = False


Reading = Literal["head", "body", "websocket", "dropped"]
"""what a connection's incoming bytes are: its request head (h11), an upload's body (h11), websockets' own, or
dropped (the rest of a refused request, or of a body that ended or failed)"""


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _upload(route: UploadRoute, request: h11.Request) -> Upload:
    headers = Headers()
    for name, value in request.headers:
        headers[name.decode("latin-1")] = value.decode("latin-1")
    target = request.target.decode("latin-1")
    limit = route.max_upload_bytes
    lengths = headers.get_all("Content-Length")  # h11 has refused differing ones
    chunked = "chunked" in ",".join(headers.get_all("Transfer-Encoding")).lower()
    if chunked and lengths:
        return Upload(Request(target, headers), None, "ambiguous", limit)
    if chunked:
        return Upload(Request(target, headers), None, "chunked", limit)
    if lengths:
        length = int(lengths[0])
        return Upload(Request(target, headers), length, "length", limit, too_large=length > limit)
    return Upload(Request(target, headers), None, "none", limit)


class PendingHeads:
    """The connections whose request head has not all come yet, oldest first: a connection that arrives when
    ``server.max_pending_handshakes`` wait closes the oldest of them that have waited :data:`HEAD_GRACE_S`.

    A client that sends its head a byte at a time (slowloris) holds a descriptor and up to twice
    :data:`HEAD_BYTES` (h11's buffer and the copy kept for websockets) until :data:`OPEN_TIMEOUT_S`; by
    reopening each one as it is closed, 1,100 of them used up the descriptors and new clients timed out
    waiting in the listen queue. A bound per address would refuse the healthy clients that share the
    attacker's (on loopback and behind a proxy every peer has one address), and a bound that refuses new
    connections is the attacker's to fill. So a new connection is always taken, and the one closed is the
    oldest still without its head, as nginx closes its oldest idle connections when ``worker_connections``
    run out: a healthy client sends its head at once, so it is the dribblers that go. A connection is never
    closed in its first :data:`HEAD_GRACE_S`, though: the event loop takes up to a hundred connections at a
    time before it reads any, and an attacker that reopens every closed connection at once made so many
    arrive that a healthy client was closed before its head, already there, was read (chaos.py's slowloris
    row: 3,000 closes a second). Beyond the bound, then, the connections waiting are those of the last
    second.
    """

    def __init__(self, host: StreamHost) -> None:
        self.host = host
        self._waiting: OrderedDict[HttpConnection, float] = OrderedDict()  # -> when it came (loop time)

    def __len__(self) -> int:
        return len(self._waiting)

    def arrived(self, conn: HttpConnection) -> None:
        """``conn`` is new: it waits for its head, after the oldest ones beyond the bound are closed."""
        limit, now = self.host.cfg.server.max_pending_handshakes, conn.loop.time()
        while len(self._waiting) >= limit:
            oldest, since = next(iter(self._waiting.items()))
            if now - since < HEAD_GRACE_S:
                break
            del self._waiting[oldest]
            self.host.metrics.streams_rejected.labels("slow_head").inc()
            oldest.close_slow_head(limit)
        self._waiting[conn] = now

    def left(self, conn: HttpConnection) -> None:
        """``conn``'s head came (or the connection ended)."""
        self._waiting.pop(conn, None)


class HttpConnection(BoundedConnection):
    """A server connection whose request head h11 reads first: the uploads the daemon serves (``uploads``) stay
    with h11, the requests websockets' parser would drop are answered (405, 400), the rest go to websockets."""

    def __init__(self, protocol: ServerProtocol, server: Server, *, uploads: Sequence[UploadRoute] = (),
                 pending: PendingHeads | None = None, **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        self.uploads = tuple(uploads)
        self.pending = pending
        """the connections still waiting for their head, this one among them until its head came"""
        self._got_head = False
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_BYTES)
        """h11's side of the connection: it reads the head (and an upload's body) and writes the daemon's answers"""
        self.reading: Reading = "head"
        self.decided: asyncio.Future[Upload | _Refusal | None] = self.loop.create_future()
        """the request once its head was read: an :class:`Upload`, a :class:`_Refusal`, or None (websockets')"""
        self.upload: Upload | None = None
        self._route: UploadRoute | None = None
        self._head = bytearray()
        """what came before the head was read: websockets is given it all"""
        self._body = bytearray()
        self._chunks = 0

    # -- reading (the asyncio protocol's callbacks) ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.pending is not None:
            self.pending.arrived(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._no_request()
        self._head_came()
        super().connection_lost(exc)

    def _head_came(self) -> None:
        self._got_head = True
        if self.pending is not None:
            self.pending.left(self)

    def _no_request(self) -> None:
        """The connection ends before its request head came (the client left, or was too slow): one line at most,
        and not a flood of them (a slow-head attack ends thousands of connections so)."""
        if not self._got_head:
            self._got_head = True
            RefusalLog.install().closed_without_request(self)

    def close_slow_head(self, limit: int) -> None:
        """Close the connection at once: its head has not all come, and newer ones wait (:class:`PendingHeads`)."""
        peer = self.transport.get_extra_info("peername")
        RefusalLog.install().refused_request(
            self, "slow_head", "closed the connection of %s: the oldest of %d connections still sending their "
            "request head, and a new one came (server.max_pending_handshakes)",
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client", limit)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.reading == "websocket":
            super().data_received(data)
        elif self.reading == "body":
            self.http.receive_data(data)
            self._read_body()
        elif self.reading == "head":
            self._head += data
            self.http.receive_data(data)
            self._read_head()
        # "dropped": the rest of a refused request, or of a body after its end or its error
        if self.reading in ("body", "dropped"):
            self._one_read_a_turn()

    def _one_read_a_turn(self) -> None:
        """Read a body, or drop what follows its answer, one read each turn of the event loop: uvloop reads a
        readable socket many times over before it runs anything else, where asyncio's loop reads it once a turn,
        and eight clients sending 24 MiB bodies at once held the healthy streams' events back on it (chaos
        ``rest-bodies``: their lag p95 3.1 s against 0.7 s)."""
        if self.transport.is_reading() and not self.transport.is_closing():  # (not paused yet this turn)
            self.transport.pause_reading()
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> None:
        if self.reading == "head":
            self._no_request()
            self._to_websockets()  # websockets ends the handshake that never came, as it always did
        if self.reading == "websocket":
            super().eof_received()
        elif self.reading == "body":
            self.http.receive_data(b"")
            self._read_body()

    def _read_head(self) -> None:
        try:
            event = self.http.next_event()
        except h11.RemoteProtocolError as exc:
            if self._head.startswith((b"GET ", b"HEAD ")):
                self._to_websockets()  # a websocket upgrade h11 would not take: websockets decides, as it always did
            else:
                self._refuse(_Refusal(exc.error_status_hint, f"bad request: {exc}\n"))
            return
        if event is h11.NEED_DATA:
            return
        assert isinstance(event, h11.Request)
        method, path = event.method.decode("latin-1"), urlsplit(event.target.decode("latin-1")).path
        route = next((r for r in self.uploads if method == "POST" and r.serves_post(path)), None)
        self._head_came()
        if route is not None:
            self._route, self.upload, self.reading = route, _upload(route, event), "body"
            self._head.clear()
            self.decided.set_result(self.upload)
            if self.upload.too_large:  # nothing of it is kept: 413 at once
                self._fail(ValueError("too large"))
            else:
                self._read_body()
            return
        body = any(n == b"transfer-encoding" or (n == b"content-length" and v != b"0") for n, v in event.headers)
        if method not in ("GET", "HEAD") or body:
            shown = f"{method} with a body" if body else method
            self._refuse(_Refusal(405, f"method {shown[:40]!r} is not allowed here; use {ALLOW}\n", allow=True))
            return
        self._to_websockets()

    def _refuse(self, refusal: _Refusal) -> None:
        self._head_came()
        self.reading = "dropped"
        self._head.clear()
        self.decided.set_result(refusal)

    def _to_websockets(self) -> None:
        """websockets reads the connection from its first byte on, as if h11 had never seen it."""
        self.reading = "websocket"
        head, self._head = bytes(self._head), bytearray()
        if not self.decided.done():
            self.decided.set_result(None)
        if head:
            super().data_received(head)

    def _read_body(self) -> None:
        """Take the body's data from h11: kept up to the limit, dropped once the upload is answered."""
        assert self.upload is not None
        upload = self.upload
        try:
            while (event := self.http.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Data):
                    upload.received += len(event.data)
                    self._chunks += event.chunk_start
                    if self._chunks > MAX_CHUNKS:
                        raise ValueError(f"the chunked body has more than {MAX_CHUNKS} chunks; send larger chunks")
                    if upload.unwanted:
                        continue
                    if len(self._body) + len(event.data) > upload.limit:
                        upload.too_large = True
                        raise ValueError("too large")
                    self._body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    if not upload.body.done():
                        upload.body.set_result(bytes(self._body))
                    self._body.clear()
                    self.reading = "dropped"  # the answer closes the connection: whatever follows is not read
                    return
                else:
                    raise EOFError("the client left during its upload")
        except h11.RemoteProtocolError as exc:
            message = str(exc)
            if "peer closed" in message or "unexpectedly closed" in message:
                self._fail(EOFError(message))
            elif message.startswith("illegal chunk header"):  # h11 takes hex digits only: not 0x10, 1_0, +10
                self._fail(ValueError(f"bad chunk size line in a chunked body ({message})"))
            else:
                self._fail(ValueError(message))
        except (EOFError, ValueError) as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        """The body cannot be had: the answer says why, and nothing more is read."""
        assert self.upload is not None
        self._body.clear()
        self.reading = "dropped"
        if not self.upload.body.done():
            self.upload.body.set_exception(exc)
            self.upload.body.exception()  # retrieved: the answer may be given without waiting for the body

    # -- the handshake: the websocket one, or an answer -----------------------------------------------------

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        """The websocket handshake, or the answer to an upload or a refused request; the request head must come
        within :data:`OPEN_TIMEOUT_S` (websockets' ``open_timeout``, which the daemon sets to None for this)."""
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            waiting: list[asyncio.Future[Any]] = [self.decided, self.connection_lost_waiter]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not self.decided.done() or self.decided.result() is None:
                await super().handshake(*args, **kwargs)
                self._head_came()  # (a head h11 could not read: websockets has read it, or refused it)
                return
        decision = self.decided.result()
        if isinstance(decision, _Refusal):
            headers = [("Content-Type", "text/plain; charset=utf-8")] + [("Allow", ALLOW)] * decision.allow
            try:
                await self.answer(decision.status, headers, decision.text.encode())
            except ConnectionError:
                pass
            else:  # the one line websockets logs for the requests it answers itself
                self.logger.info("HTTP response sent (%d %s)", decision.status, _phrase(decision.status))
            await self.finish()
            return
        assert isinstance(decision, Upload) and self._route is not None
        await self._route.serve_upload(self, decision)

    async def serve_upload(self, work: Awaitable[None], *, host: StreamHost, request: str, error: type[E],
                           reason: Callable[[E], tuple[int, str]],
                           answer_error: Callable[[E], Awaitable[None]]) -> None:
        """Serve an upload with ``work``, which writes its answer, and close the connection, as every API does.

        An ``error`` that ``work`` raises (the API's refusal or failure, with its HTTP status and a short
        ``reason``) is counted in the metrics' errors under that reason, logged as one line unless many were
        lately (:class:`~streamer.aio.http.limits.RefusalLog`: a script repeating a bad request must not flood
        the log) and answered with ``answer_error``, in the API's own shape. A client that left ends it with a
        line. ``request`` names the request in the log (``openai request 3f2a...``).
        """
        try:
            await work
        except error as exc:
            status, why = reason(exc)
            host.metrics.errors.labels(why).inc()
            RefusalLog.install().refused_request(self, why, "%s: %d %s", request, status, exc)
            try:
                await answer_error(exc)
            except ConnectionError:
                pass
        except ConnectionError:
            logger.info("%s: the client left", request)
        finally:
            await self.finish()  # what still comes of the body is dropped as it comes
            if self.upload is not None:
                self.upload.drop_body()
                _memory.freed(self.upload.received)

    async def unless_left(self, work: Awaitable[T]) -> T:
        """``work``'s result; when the client leaves first, ``work`` is cancelled (its stream's windows are dropped
        before they reach the model) and ConnectionResetError raised."""
        task = asyncio.ensure_future(work)
        left: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(self.connection_lost_waiter))
        try:
            await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
                raise ConnectionResetError("the client left")
            return task.result()
        finally:
            left.cancel()

    # -- writing an answer (h11 frames it) ------------------------------------------------------------------

    async def answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A whole answer: its head (``Connection: close``, ``Content-Length``) and ``body``."""
        await self.answer_head(status, [*headers, ("Content-Length", str(len(body)))])
        await self.answer_body(body)
        await self.answer_end()

    async def answer_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        """An answer's head; without ``Content-Length``, h11 sends the body chunked (HTTP/1.1)."""
        await self.write(self.http.send(h11.Response(
            status_code=status, reason=_phrase(status).encode(),
            headers=[("Server", "streamer"), ("Connection", "close"), *headers])) or b"")

    async def answer_body(self, data: bytes) -> None:
        """Part of the answer's body (a chunk when it is chunked)."""
        if data:
            await self.write(self.http.send(h11.Data(data=data)) or b"")

    async def answer_end(self) -> None:
        """The end of the answer's body (the last chunk when it is chunked)."""
        await self.write(self.http.send(h11.EndOfMessage()) or b"")

    async def answer_continue(self) -> None:
        """``100 Continue``: the client that asked for it may send its body now."""
        continue_ = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        await self.write(self.http.send(continue_) or b"")

    async def write(self, data: bytes) -> None:
        """Write part of a plain HTTP answer; waits while the client does not read (bounded: see limits)."""
        if self.transport.is_closing():
            raise ConnectionResetError("the client left")
        if data:
            self.transport.write(data)
        await self.drain()

    async def finish(self, linger_s: float = LINGER_S) -> None:
        """End a plain HTTP answer: send what was written, then wait up to ``linger_s`` for the client to close.

        An answer may come before the client has sent its whole body (401, 413): closing at once would reset
        the connection under the client's upload, and it would see a broken connection instead of the answer.
        So the daemon stops writing (half-close), reads and drops the rest of the body, and closes when the
        client has read the answer and closed, or after ``linger_s``.
        """
        if self.upload is not None:
            self.upload.unwanted = True
        if self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()
        try:
            await asyncio.wait_for(asyncio.shield(self.connection_lost_waiter), linger_s)
        except TimeoutError:
            self.transport.abort()
