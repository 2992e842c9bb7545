"""The HTTP side of the daemon's port: ``/healthz``, ``/metrics``, the caption page, and the token check.

websockets calls :meth:`HttpFront.process_request` for every request before the upgrade: it answers
plain HTTP requests itself and refuses upgrades that go nowhere (404), come from another site's page
(403, :func:`streamer.aio.http.access.origin_allowed`) or lack the token (401). Uploads (requests
with a body) are read by :class:`~streamer.aio.http.connection.HttpConnection` and answered by the
OpenAI endpoints (:mod:`streamer.aio.http.openai`).
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from streamer.aio.host import Health, StreamHost
from streamer.aio.http.access import host_allowed, page_allowed, read_cookie, repeated_header, token_cookie
from streamer.aio.http.connection import HttpConnection, PendingHeads, is_tls, not_allowed, respond
from streamer.aio.http.limits import BoundedConnection, RefusalLog
from streamer.aio.http.openai import OpenAIFront
from streamer.aio.protocols.deepgram import DEEPGRAM_PATH, DeepgramFront, subprotocol_token

__all__ = ["LISTEN_PREFIX", "REALTIME_PATH", "STREAM_PATH", "TWILIO_PATH", "HttpFront"]

STREAM_PATH = "/v1/stream"
LISTEN_PREFIX = "/v1/listen/"
REALTIME_PATH = "/v1/realtime"
"""OpenAI Realtime transcription sessions (:mod:`streamer.aio.protocols.realtime`)"""
TWILIO_PATH = "/v1/twilio"
"""Twilio Media Streams, phone calls (:mod:`streamer.aio.protocols.twilio`)"""
MAX_NAME_BYTES = 255
"""the longest file name (one path component) a file system holds"""


logger = logging.getLogger("streamer.server")


def _web_root() -> Path:
    return Path(str(resources.files("streamer") / "web"))


class HttpFront:
    """Answers the daemon's HTTP requests; :attr:`token` is the one a reload put in force.

    ``health``: the ``/healthz`` answer; ``stream_port``: the native port (the Vosk port serves no viewers);
    ``started_at``: when the daemon started (the model's ``created`` in ``/v1/models``).
    """

    def __init__(self, host: StreamHost, token: str, *, health: Callable[[], Health],
                 stream_port: Callable[[], int], started_at: float) -> None:
        self.host = host
        self.token = token
        self.health = health
        self.stream_port = stream_port
        RefusalLog.install()  # one line per refused request, and not a flood of them
        self.pending = PendingHeads(host)
        """the connections whose request head has not all come yet (``server.max_pending_handshakes``)"""
        self.openai = OpenAIFront(host, self.authorized, started_at, self.known_host)
        """the OpenAI-compatible endpoints (``[openai]``): ``/v1/models``, ``/v1/audio/transcriptions``"""
        self.deepgram = DeepgramFront(host, self.authorized, self.known_host)
        """Deepgram's ``/v1/listen`` (``[deepgram]``): its answers before the websocket opens, pre-recorded uploads"""

    def connection(self, protocol: ServerProtocol, server: Server, **kwargs: Any) -> HttpConnection:
        """websockets' ``create_connection``: an :class:`HttpConnection` whose uploads this front answers."""
        return HttpConnection(protocol, server, uploads=[self.openai, self.deepgram], pending=self.pending, **kwargs)

    def connection_limits(self, conn: ServerConnection) -> None:
        """Give a new connection the message size and limits of the config in force (a reload may change them)."""
        s, protocol = self.host.cfg.server, conn.protocol
        # websockets sets the largest message of every connection from serve()'s max_size, and has no
        # public way to change it afterwards; Protocol.max_size was renamed max_message_size in websockets 14
        setattr(protocol, "max_message_size" if hasattr(protocol, "max_message_size") else "max_size",
                s.max_message_bytes)
        if isinstance(conn, BoundedConnection):
            conn.apply_limits(s)

    def authorized(self, request: Request, query: dict[str, list[str]], port: int = 0) -> bool:
        """The token as a bearer header, ``?token=``, or the caption page's cookie (:mod:`streamer.aio.http.access`)."""
        if not self.token:
            return True
        given = ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif auth.lower().startswith("token "):  # Deepgram's form
            given = auth[6:].strip()
        elif (key := subprotocol_token(request.headers)) is not None:  # Deepgram's, from browsers
            given = key
        elif query.get("token"):
            given = query["token"][0]
        else:
            given = read_cookie("; ".join(request.headers.get_all("Cookie")), port)
        return hmac.compare_digest(given.encode(), self.token.encode())

    def known_host(self, request: Request) -> bool:
        """Whether the request names this daemon in its ``Host``; any name may when a token is set
        (:func:`~streamer.aio.http.access.host_allowed`: a page that rebinds its own name to this machine)."""
        s = self.host.cfg.server
        hosts = request.headers.get_all("Host")
        return bool(self.token) or host_allowed(hosts[0] if hosts else None, s.allowed_hosts, s.host)

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
        would drop), a path no file can have (a component over 255 bytes, a NUL) 404, a header that must be
        single sent twice (:data:`~streamer.aio.http.access.SINGLE_HEADERS`) 400.
        """
        if request.method not in ("GET", "HEAD"):
            return not_allowed(conn.protocol, request.method)
        response: Response | None
        if (name := repeated_header(request.headers)) is not None:
            response = respond(conn, 400, f"the header {name} came more than once; send it once\n", "text/plain")
        else:
            response = self.route(conn, request)
        if request.method == "HEAD" and response is not None:
            response.body = b""  # Content-Length stays: the length of what GET returns
        return response

    def route(self, conn: ServerConnection, request: Request) -> Response | None:
        """The answer to a GET (None: go on with the websocket upgrade)."""
        host = self.host
        self.connection_limits(conn)  # the limits of the config now in force (reload)
        url = urlsplit(request.path)
        path, query = url.path, parse_qs(url.query)
        if not self.known_host(request):
            host.metrics.streams_rejected.labels("host").inc()
            RefusalLog.install().refused_request(
                conn, "host", "refused a request for host %s (not this server's name; server.allowed_hosts)",
                request.headers.get("Host", "")[:80])
            return respond(conn, 403, "this server does not answer to that host name without a token: add it to "
                           "server.allowed_hosts, or use an IP address or localhost\n", "text/plain")
        if path == "/healthz":
            h = self.health()
            return respond(conn, 503 if h.status == "unavailable" else 200, json.dumps(h.to_dict()), "application/json")
        if path == "/livez":  # the process works: its event loop answers this, its model worker runs
            h = self.health()
            return respond(conn, 200 if h.live() else 503, json.dumps(h.live_dict()), "application/json")
        if path == "/readyz":  # it takes new streams: not draining, model server reachable, under max_streams
            h = self.health()
            return respond(conn, 200 if h.readiness() == "ready" else 503, json.dumps(h.ready_dict()),
                           "application/json")
        if path == "/metrics":
            return respond(conn, 200, host.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        upgrade = "websocket" in ",".join(request.headers.get_all("Upgrade")).lower()
        if not upgrade and self.openai.serves_get(path):
            return self.openai.get(conn, request, path, query)
        if not upgrade:
            if query.get("token") and path in ("/", "/index.html"):
                redirect = self.keep_token(conn, path, query)
                if redirect is not None:
                    return redirect
            return self.static(conn, path)
        if host.draining.is_set():
            # Draining or shutting down (SIGTERM): closed to new streams and viewers while its live streams go on. A
            # new one gets 503, which a load balancer retries on another daemon (HAProxy's retry-on 503,
            # deploy/haproxy.cfg), and the client a clear answer.
            response = respond(conn, 503, "server shutting down: connect again to reach another server\n",
                               "text/plain")
            response.headers["Retry-After"] = "1"
            return response
        realtime = path == REALTIME_PATH and host.cfg.openai.enabled
        deepgram = path == DEEPGRAM_PATH and host.cfg.deepgram.enabled
        routed = path == STREAM_PATH or path.startswith(LISTEN_PREFIX) or realtime or deepgram
        twilio = path == TWILIO_PATH
        routed = routed or twilio
        if conn.local_address[1] == self.stream_port() and not routed:
            return respond(conn, 404, f"no websocket endpoint at {path}; use {STREAM_PATH} or "
                           f"{LISTEN_PREFIX}<name>\n", "text/plain")
        origin = request.headers.get("Origin")
        if not page_allowed(request.headers, host.cfg.server.allowed_origins, is_tls(conn)):
            host.metrics.streams_rejected.labels("origin").inc()
            RefusalLog.install().refused_request(
                conn, "origin", "refused a websocket from a page of %s (not this host; server.allowed_origins)", origin)
            return respond(conn, 403, f"a page of {origin} may not open websockets here: only this server's own "
                           "pages and the origins in server.allowed_origins may\n", "text/plain")
        if not self.authorized(request, query, conn.local_address[1]):
            if twilio and not query.get("token"):
                # Twilio sends no headers, and a <Stream> url takes no query string: the token comes in the start
                # message's customParameters, which the handler checks before it takes any audio
                return None
            host.metrics.streams_rejected.labels("auth").inc()
            if realtime:  # in OpenAI's error shape, as its clients read it
                return self.openai.unauthorized(conn)
            if deepgram:
                return self.deepgram.unauthorized(conn)
            response = respond(conn, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                               "or ?token=TOKEN\n", "text/plain")
            response.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
            return response
        if deepgram:  # its options, checked before the upgrade: a bad one gets Deepgram's 400
            return self.deepgram.check_upgrade(conn, request)
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
