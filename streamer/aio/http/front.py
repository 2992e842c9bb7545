"""The HTTP side of the daemon's port: ``/healthz``, ``/metrics``, the caption page, and the token check.

websockets calls :meth:`HttpFront.process_request` for every request before the upgrade: it answers
plain HTTP requests itself and refuses upgrades that go nowhere (404), come from another site's page
(403, :func:`streamer.aio.http.access.origin_allowed`) or lack the token (401).
"""

from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import mimetypes
from collections.abc import Generator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from streamer.aio.http.access import origin_allowed, read_cookie, token_cookie
from streamer.aio.http.limits import BoundedConnection

if TYPE_CHECKING:
    from streamer.aio.server import Daemon

__all__ = ["ALLOW", "LISTEN_PREFIX", "OPEN_TIMEOUT_S", "REALTIME_PATH", "STREAM_PATH", "HttpConnection", "HttpFront",
           "Upload"]

STREAM_PATH = "/v1/stream"
LISTEN_PREFIX = "/v1/listen/"
REALTIME_PATH = "/v1/realtime"
"""OpenAI Realtime transcription sessions (:mod:`streamer.aio.protocols.realtime`)"""
OPEN_TIMEOUT_S = 10.0
"""how long a connection may take to send its request head (and complete a websocket handshake): websockets'
``open_timeout``, applied by :class:`HttpConnection` so that an upload's answer may take longer"""
ALLOW = "GET, HEAD"
"""the methods the daemon answers (``Allow`` of a 405)"""
MAX_NAME_BYTES = 255
"""the longest file name (one path component) a file system holds"""
SCREEN_BYTES = 1 << 16
"""how much of a request head :class:`HttpConnection` reads to find its method and body; beyond, websockets decides"""


logger = logging.getLogger("streamer.server")


def is_tls(conn: ServerConnection) -> bool:
    """Whether the connection came in over TLS (``server.tls_cert``)."""
    return conn.transport.get_extra_info("ssl_object") is not None


def _web_root() -> Path:
    return Path(str(resources.files("streamer") / "web"))


def respond(conn: ServerConnection, status: int, body: bytes | str, ctype: str) -> Response:
    """A complete HTTP response with ``body`` of type ``ctype``."""
    response = conn.respond(status, "")
    data = body.encode() if isinstance(body, str) else body
    response.body = data
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = ctype
    response.headers["Content-Length"] = str(len(data))
    return response


class HttpFront:
    """Answers the daemon's HTTP requests; :attr:`token` is the one a reload put in force."""

    def __init__(self, daemon: Daemon, token: str) -> None:
        from streamer.aio.http.openai import OpenAIFront  # it answers through this module's helpers

        self.daemon = daemon
        self.token = token
        self.openai = OpenAIFront(daemon, self)
        """the OpenAI-compatible endpoints (``[openai]``): ``/v1/models``, ``/v1/audio/transcriptions``"""

    def connection(self, protocol: ServerProtocol, server: Server, **kwargs: Any) -> HttpConnection:
        """websockets' ``create_connection``: an :class:`HttpConnection` whose uploads this front answers."""
        return HttpConnection(protocol, server, front=self, **kwargs)

    def authorized(self, request: Request, query: dict[str, list[str]], port: int = 0) -> bool:
        """The token as a bearer header, ``?token=``, or the caption page's cookie (:mod:`streamer.aio.http.access`)."""
        if not self.token:
            return True
        given = ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif query.get("token"):
            given = query["token"][0]
        else:
            given = read_cookie(request.headers.get("Cookie", ""), port)
        return hmac.compare_digest(given.encode(), self.token.encode())

    def keep_token(self, conn: ServerConnection, path: str, query: dict[str, list[str]]) -> Response | None:
        """The page asked for as ``/?token=TOKEN`` with the right token: a cookie keeps the token for the page's
        websockets, and the page is loaded again without it in its address (303), so the token stays out of
        the browser's history. A wrong token: None (the page shows the error when it connects)."""
        given = query["token"][0]
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            return None
        rest = {k: v for k, v in query.items() if k != "token"}
        response = respond(conn, 303, "", "text/plain")
        response.headers["Location"] = path + (f"?{urlencode(rest, doseq=True)}" if rest else "")
        response.headers["Set-Cookie"] = token_cookie(conn.local_address[1], self.token, is_tls(conn))
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """websockets' ``process_request`` hook: a response ends the request, None lets the upgrade go on.

        Odd requests get a 4xx and websockets' one log line (``HTTP response sent (405 Method Not Allowed)``),
        never a traceback: ``HEAD`` gets the headers of the ``GET`` answer without its body, other methods 405
        (websockets 14 and later hand them here; :class:`HttpConnection` answers those that websockets' parser
        would drop), a path no file can have (a component over 255 bytes, a NUL) 404.
        """
        if request.method not in ("GET", "HEAD"):
            return not_allowed(conn.protocol, request.method)
        response = self.route(conn, request)
        if request.method == "HEAD" and response is not None:
            response.body = b""  # Content-Length stays: the length of what GET returns
        return response

    def route(self, conn: ServerConnection, request: Request) -> Response | None:
        """The answer to a GET (None: go on with the websocket upgrade)."""
        d = self.daemon
        d.connection_limits(conn)  # the limits of the config now in force (reload)
        url = urlsplit(request.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/healthz":
            h = d.health()
            return respond(conn, 503 if h["status"] == "unavailable" else 200, json.dumps(h), "application/json")
        if path == "/metrics":
            return respond(conn, 200, d.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if not upgrade and self.openai.serves_get(path):
            return self.openai.get(conn, request, path, query)
        if not upgrade:
            if query.get("token") and path in ("/", "/index.html"):
                redirect = self.keep_token(conn, path, query)
                if redirect is not None:
                    return redirect
            return self.static(conn, path)
        if d.stopping.is_set():
            # Draining (SIGTERM): the listeners are closed, and so is this daemon to new streams and viewers. A
            # connection it accepted just before gets 503, which a load balancer retries on another daemon
            # (HAProxy's retry-on 503, deploy/haproxy.cfg), and the client a clear answer.
            response = respond(conn, 503, "server shutting down: connect again to reach another server\n",
                               "text/plain")
            response.headers["Retry-After"] = "1"
            return response
        realtime = path == REALTIME_PATH and d.cfg.openai.enabled
        if conn.local_address[1] == d.port and not (path == STREAM_PATH or path.startswith(LISTEN_PREFIX) or realtime):
            return respond(conn, 404, f"no websocket endpoint at {path}; use {STREAM_PATH} or "
                           f"{LISTEN_PREFIX}<name>\n", "text/plain")
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, request.headers.get("Host"), d.cfg.server.allowed_origins, is_tls(conn)):
            d.metrics.streams_rejected.labels("origin").inc()
            logger.info("refused a websocket from a page of %s (not this host; server.allowed_origins)", origin)
            return respond(conn, 403, f"a page of {origin} may not open websockets here: only this server's own "
                           "pages and the origins in server.allowed_origins may\n", "text/plain")
        if not self.authorized(request, query, conn.local_address[1]):
            d.metrics.streams_rejected.labels("auth").inc()
            if realtime:  # in OpenAI's error shape, as its clients read it
                return self.openai.unauthorized(conn)
            response = respond(conn, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                               "or ?token=TOKEN\n", "text/plain")
            response.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
            return response
        return None

    @staticmethod
    def static(conn: ServerConnection, path: str) -> Response:
        """A file of the caption page (``streamer/web/``), or 404."""
        root = _web_root()
        rel = "index.html" if path in ("/", "") else path.lstrip("/")
        if any(len(part.encode()) > MAX_NAME_BYTES for part in rel.split("/")) or "\x00" in rel:
            return respond(conn, 404, "not found: no file has such a name\n", "text/plain")
        try:
            target = (root / rel).resolve()
            found = root.is_dir() and target.is_file() and root.resolve() in target.parents
        except (OSError, ValueError):  # a name the file system refuses: nothing to find
            found = False
        if found:
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            return respond(conn, 200, target.read_bytes(), ctype)
        return respond(conn, 404, f"not found: {path}\n", "text/plain")


def not_allowed(protocol: ServerProtocol, method: str) -> Response:
    """405 for a method the daemon does not serve, with ``Allow``."""
    response = protocol.reject(http.HTTPStatus.METHOD_NOT_ALLOWED,
                               f"method {method[:40]!r} is not allowed here; use {ALLOW}\n")
    response.headers["Allow"] = ALLOW
    return response


@dataclass(eq=False)
class Upload:
    """A request with a body that the daemon serves (``POST /v1/audio/transcriptions``), read by HttpConnection.

    The head is parsed when it arrives; the body is read as it comes (``Content-Length`` or chunked), at most
    ``limit`` bytes, into :attr:`body`. Beyond ``limit`` nothing is read: :attr:`too_large` says so.
    """

    request: Request
    """the method is always POST; ``request.path`` holds the query"""
    length: int | None
    """``Content-Length``; None when chunked or when neither was given (:attr:`framing` says which)"""
    framing: str
    """``length``, ``chunked`` or ``none`` (no body length given: 411)"""
    limit: int
    body: asyncio.Future[bytes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """the whole body; EOFError when the client left first, ValueError for bad chunked framing"""
    too_large: bool = False
    received: int = 0
    """body bytes received so far"""

    @property
    def expects_continue(self) -> bool:
        """The client waits for ``100 Continue`` before it sends the body (curl does, for large ones)."""
        return self.request.headers.get("Expect", "").lower() == "100-continue"


LINGER_S = 5.0
"""how long an answered upload's connection stays open for the client to finish sending and read the answer"""
CHUNK_LINE_BYTES = 4096
"""the longest chunk-size line (with extensions) or trailer line of a chunked body"""
MAX_TRAILERS = 64
"""trailer fields after a chunked body (ignored)"""
MAX_CHUNKS = 16384
"""chunks of one chunked body: each costs the event loop a few microseconds, and clients send 8-64 KiB ones"""


def _read_body(conn: HttpConnection, upload: Upload) -> Generator[None]:
    """Read an upload's body into ``upload.body``, then discard whatever follows (the answer closes the connection)."""
    reader = conn.protocol.reader
    try:
        if upload.too_large or upload.framing == "none":
            pass
        elif upload.length is not None:
            while len(reader.buffer) < upload.length and not reader.eof:
                upload.received = len(reader.buffer)
                yield
            upload.body.set_result(bytes((yield from reader.read_exact(upload.length))))
        else:
            body = bytearray()
            for _ in range(MAX_CHUNKS + 1):
                line = yield from reader.read_line(CHUNK_LINE_BYTES, ValueError)
                size_text = bytes(line).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ValueError(f"bad chunk size {size_text[:20]!r} in a chunked body") from None
                if size < 0:
                    raise ValueError("bad chunk size in a chunked body")
                if len(body) + size > upload.limit:
                    upload.too_large = True
                    break
                body += yield from reader.read_exact(size)
                upload.received = len(body)
                if size == 0:
                    for _ in range(MAX_TRAILERS + 1):  # trailer fields: read and ignored
                        if not (yield from reader.read_line(CHUNK_LINE_BYTES, ValueError)).strip():
                            break
                    else:
                        raise ValueError(f"the chunked body has more than {MAX_TRAILERS} trailer fields")
                    upload.body.set_result(bytes(body))
                    break
                if (yield from reader.read_exact(2)) != b"\r\n":
                    raise ValueError("a chunk of a chunked body does not end with CRLF")
            else:
                raise ValueError(f"the chunked body has more than {MAX_CHUNKS} chunks; send larger chunks")
    except (EOFError, ValueError) as exc:
        if not upload.body.done():
            upload.body.set_exception(exc)
    if upload.too_large and not upload.body.done():
        upload.body.set_exception(ValueError("too large"))
    if upload.body.done():
        upload.body.exception()  # retrieved: the answer may be given without waiting for the body (413)
    while not (yield from reader.at_eof()):
        reader.discard()
    conn.protocol.state = State.CLOSED  # as websockets' own discard(): the connection may be lost now
    yield


def _upload(conn: HttpConnection, method: str, path: str, fields: list[tuple[str, str]]) -> Upload | None:
    """The :class:`Upload` of a request head the daemon serves with a body (else None: websockets decides)."""
    if method != "POST" or conn.front is None or not conn.front.openai.serves_post(urlsplit(path).path):
        return None
    headers = Headers()
    for name, value in fields:
        if name:
            headers[name] = value
    limit = conn.front.daemon.cfg.openai.max_upload_bytes
    lengths = {v.strip() for v in headers.get_all("Content-Length")}
    chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
    if chunked:
        return Upload(Request(path, headers), None, "chunked", limit)
    if len(lengths) == 1 and (value := lengths.pop()).isdigit() and len(value) < 19:
        length = int(value)
        return Upload(Request(path, headers), length, "length", limit, too_large=length > limit)
    return Upload(Request(path, headers), None, "none", limit)


def _screen(conn: HttpConnection) -> Generator[None]:
    """Read the request head before websockets does; answer 405 where websockets would drop the request.

    websockets' parser closes the connection without a word on a request with a body (``Content-Length``
    other than 0, or ``Transfer-Encoding``: a POST with data), and before websockets 14 on any method but
    GET. A generator like websockets' own parsers: the protocol resumes it whenever data or the end of the
    stream arrived. Nothing is consumed: websockets' parser reads the same bytes afterwards.

    A POST the daemon serves (:class:`Upload`) is taken over here instead: its head is consumed, its body
    read by :func:`_read_body`, and :meth:`HttpConnection.handshake` answers it.
    """
    protocol = conn.protocol
    reader, seen = protocol.reader, 0
    while (end := reader.buffer.find(b"\r\n\r\n", max(0, seen - 3))) < 0:
        seen = len(reader.buffer)
        if seen > SCREEN_BYTES or reader.eof:
            break
        yield
    if end >= 0:
        lines = bytes(reader.buffer[:end]).decode("latin-1").split("\r\n")
        method = lines[0].split(" ", 1)[0]
        fields = [(name.strip().lower(), value.strip()) for name, _, value in (f.partition(":") for f in lines[1:])]
        parts = lines[0].split(" ")
        upload = _upload(conn, method, parts[1], fields) if len(parts) == 3 and parts[1].startswith("/") else None
        if upload is not None:
            del reader.buffer[: end + 4]
            conn.upload.set_result(upload)
            yield from _read_body(conn, upload)
            return
        body = any(name == "transfer-encoding" or (name == "content-length" and value != "0") for name, value in fields)
        if method not in ("GET", "HEAD") or body:
            protocol.send_response(not_allowed(protocol, f"{method} with a body" if body else method))
            yield  # the protocol discards what follows
            return
    yield from protocol.parse()


class HttpConnection(BoundedConnection):
    """A server connection that answers, instead of dropping, the requests websockets' parser refuses (405),
    and the uploads the daemon serves (``front``: :meth:`HttpFront.openai`)."""

    def __init__(self, protocol: ServerProtocol, server: Server, *, front: HttpFront | None = None,
                 **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        self.front = front
        self.upload: asyncio.Future[Upload] = self.loop.create_future()
        """set when the request is an :class:`Upload` the daemon serves"""
        protocol.parser = _screen(self)  # nothing has arrived yet
        next(protocol.parser)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        """The websocket handshake, or the answer to an upload; the request head must come within
        :data:`OPEN_TIMEOUT_S` (websockets' ``open_timeout``, which the daemon sets to None for this)."""
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            waiting: list[asyncio.Future[Any]] = [self.request_rcvd, self.upload, self.connection_lost_waiter]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not self.upload.done():
                await super().handshake(*args, **kwargs)
                return
        assert self.front is not None
        await self.front.openai.serve_upload(self, self.upload.result())

    async def write(self, data: bytes) -> None:
        """Write part of a plain HTTP answer; waits while the client does not read (bounded: see limits)."""
        if self.transport.is_closing():
            raise ConnectionResetError("the client left")
        self.transport.write(data)
        await self.drain()

    async def finish(self, linger_s: float = LINGER_S) -> None:
        """End a plain HTTP answer: send what was written, then wait up to ``linger_s`` for the client to close.

        An answer may come before the client has sent its whole body (401, 413): closing at once would reset
        the connection under the client's upload, and it would see a broken connection instead of the answer.
        So the daemon stops writing (half-close), reads and drops the rest of the body, and closes when the
        client has read the answer and closed, or after ``linger_s``.
        """
        if self.transport.can_write_eof():
            self.transport.write_eof()
        try:
            await asyncio.wait_for(asyncio.shield(self.connection_lost_waiter), linger_s)
        except TimeoutError:
            self.transport.abort()
