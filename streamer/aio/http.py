"""The HTTP side of the daemon's port: ``/healthz``, ``/metrics``, the caption page, and the token check.

websockets calls :meth:`HttpFront.process_request` for every request before the upgrade: it answers
plain HTTP requests itself and refuses upgrades that lack the token (401) or go nowhere (404).
"""

from __future__ import annotations

import hmac
import json
import mimetypes
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

if TYPE_CHECKING:
    from streamer.aio.server import Daemon

__all__ = ["LISTEN_PREFIX", "STREAM_PATH", "HttpFront"]

STREAM_PATH = "/v1/stream"
LISTEN_PREFIX = "/v1/listen/"


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

    def authorized(self, request: Request, query: dict[str, list[str]]) -> bool:
        if not self.token:
            return True
        given = ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif query.get("token"):
            given = query["token"][0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """websockets' ``process_request`` hook: a response ends the request, None lets the upgrade go on."""
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
            return self.static(conn, path)
        if conn.local_address[1] == d.port and not (path == STREAM_PATH or path.startswith(LISTEN_PREFIX)):
            return respond(conn, 404, f"no websocket endpoint at {path}; use {STREAM_PATH} or "
                           f"{LISTEN_PREFIX}<name>\n", "text/plain")
        if not self.authorized(request, query):
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
        target = (root / rel).resolve()
        if root.is_dir() and target.is_file() and root.resolve() in target.parents:
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            return respond(conn, 200, target.read_bytes(), ctype)
        return respond(conn, 404, f"not found: {path}\n", "text/plain")
