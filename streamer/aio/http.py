"""The HTTP side of the daemon's port: ``/healthz``, ``/metrics``, the caption page, and the token check.

websockets calls :meth:`HttpFront.process_request` for every request before the upgrade: it answers
plain HTTP requests itself and refuses upgrades that go nowhere (404), come from another site's page
(403, :func:`streamer.aio.access.origin_allowed`) or lack the token (401).
"""

from __future__ import annotations

import hmac
import http
import json
import logging
import mimetypes
from collections.abc import Generator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from streamer.aio.access import origin_allowed, read_cookie, token_cookie
from streamer.aio.limits import BoundedConnection

if TYPE_CHECKING:
    from streamer.aio.server import Daemon

__all__ = ["ALLOW", "LISTEN_PREFIX", "STREAM_PATH", "HttpConnection", "HttpFront"]

STREAM_PATH = "/v1/stream"
LISTEN_PREFIX = "/v1/listen/"
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
        self.daemon = daemon
        self.token = token

    def authorized(self, request: Request, query: dict[str, list[str]], port: int = 0) -> bool:
        """The token as a bearer header, ``?token=``, or the caption page's cookie (:mod:`streamer.aio.access`)."""
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
        if request.headers.get("Upgrade", "").lower() != "websocket":
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
        if conn.local_address[1] == d.port and not (path == STREAM_PATH or path.startswith(LISTEN_PREFIX)):
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


def _screen(protocol: ServerProtocol) -> Generator[None]:
    """Read the request head before websockets does; answer 405 where websockets would drop the request.

    websockets' parser closes the connection without a word on a request with a body (``Content-Length``
    other than 0, or ``Transfer-Encoding``: a POST with data), and before websockets 14 on any method but
    GET. A generator like websockets' own parsers: the protocol resumes it whenever data or the end of the
    stream arrived. Nothing is consumed: websockets' parser reads the same bytes afterwards.
    """
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
        body = any(name == "transfer-encoding" or (name == "content-length" and value != "0") for name, value in fields)
        if method not in ("GET", "HEAD") or body:
            protocol.send_response(not_allowed(protocol, f"{method} with a body" if body else method))
            yield  # the protocol discards what follows
            return
    yield from protocol.parse()


class HttpConnection(BoundedConnection):
    """A server connection that answers, instead of dropping, the requests websockets' parser refuses (405)."""

    def __init__(self, protocol: ServerProtocol, server: Server, **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        protocol.parser = _screen(protocol)  # nothing has arrived yet
        next(protocol.parser)
