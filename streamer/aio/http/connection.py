"""Plain HTTP on the websocket ports: the requests websockets' own parser drops, and uploads.

websockets reads a request head and upgrades it; it drops, without a word, a request with a body
(and, before websockets 14, any method but GET). :class:`HttpConnection` reads the head first
(:func:`_screen`): it answers those with 405, takes over a ``POST`` that an :class:`UploadRoute`
serves (its body read as it comes, :class:`Upload`), and leaves every other request to websockets.
"""

from __future__ import annotations

import asyncio
import http
import re
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from streamer.aio.http.limits import BoundedConnection

__all__ = ["ALLOW", "OPEN_TIMEOUT_S", "HttpConnection", "Upload", "UploadRoute", "is_tls", "not_allowed", "respond"]

OPEN_TIMEOUT_S = 10.0
"""how long a connection may take to send its request head (and complete a websocket handshake): websockets'
``open_timeout``, applied by :class:`HttpConnection` so that an upload's answer may take longer"""
ALLOW = "GET, HEAD"
"""the methods the daemon answers (``Allow`` of a 405)"""
SCREEN_BYTES = 1 << 16
"""how much of a request head :class:`HttpConnection` reads to find its method and body; beyond, websockets decides"""


def is_tls(conn: ServerConnection) -> bool:
    """Whether the connection came in over TLS (``server.tls_cert``)."""
    return conn.transport.get_extra_info("ssl_object") is not None


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


class UploadRoute(Protocol):
    """Who serves uploads (requests with a body): :class:`~streamer.aio.http.openai.OpenAIFront`."""

    @property
    def max_upload_bytes(self) -> int:
        """The largest body read; beyond, :attr:`Upload.too_large`."""
        ...

    def serves_post(self, path: str) -> bool:
        """Whether a POST to ``path`` is served here (the others get 405)."""
        ...

    async def serve_upload(self, conn: HttpConnection, upload: Upload) -> None:
        """Answer the upload and close the connection."""
        ...


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
    unwanted: bool = False
    """set once the upload is answered: the rest of its body is read and dropped, never kept (an answer given
    before the body came, 401 or 429, must not leave the body to fill memory while the client sends it)"""

    @property
    def expects_continue(self) -> bool:
        """The client waits for ``100 Continue`` before it sends the body (curl does, for large ones)."""
        return self.request.headers.get("Expect", "").lower() == "100-continue"


LINGER_S = 5.0
"""how long an answered upload's connection stays open for the client to finish sending and read the answer"""
CHUNK_LINE_BYTES = 4096
"""the longest chunk-size line (with extensions) or trailer line of a chunked body"""
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
"""a chunk size as RFC 9112 spells it: hex digits, nothing else"""
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
            while len(reader.buffer) < upload.length and not reader.eof and not upload.unwanted:
                upload.received = len(reader.buffer)
                yield
            if not upload.unwanted:
                upload.body.set_result(bytes((yield from reader.read_exact(upload.length))))
        else:
            body = bytearray()
            for _ in range(MAX_CHUNKS + 1):
                if upload.unwanted:
                    break
                line = yield from reader.read_line(CHUNK_LINE_BYTES, ValueError)
                size_text = bytes(line).rstrip(b"\r\n").split(b";", 1)[0].rstrip(b" \t")
                # hex digits only: int(x, 16) also reads "0x10", "1_0", "+10" and " 10", which a proxy in
                # front may read otherwise (or refuse), the framing difference request smuggling needs
                if not CHUNK_SIZE.fullmatch(size_text):
                    raise ValueError(f"bad chunk size {size_text[:20]!r} in a chunked body")
                size = int(size_text, 16)
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
    if method != "POST" or conn.uploads is None or not conn.uploads.serves_post(urlsplit(path).path):
        return None
    headers = Headers()
    for name, value in fields:
        if name:
            headers[name] = value
    limit = conn.uploads.max_upload_bytes
    lengths = {v.strip() for v in headers.get_all("Content-Length")}
    chunked = "chunked" in ",".join(headers.get_all("Transfer-Encoding")).lower()
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
    and the uploads the daemon serves (``uploads``)."""

    def __init__(self, protocol: ServerProtocol, server: Server, *, uploads: UploadRoute | None = None,
                 **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        self.uploads = uploads
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
        assert self.uploads is not None
        await self.uploads.serve_upload(self, self.upload.result())

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
