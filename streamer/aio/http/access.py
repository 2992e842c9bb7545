"""Who may open a websocket: the browser ``Origin`` check, and the token a page keeps in a cookie.

A browser sends ``Origin`` with every websocket upgrade, and any page may try to open one: without
a check, a page of any site could stream to the daemon or follow its viewers from a visitor's
browser (cross-site websocket hijacking). :func:`origin_allowed` accepts an upgrade without
``Origin`` (not a browser), one from the daemon's own host (the page it serves), and the origins
listed in ``server.allowed_origins`` (``"*"``: any).

Uploads (requests with a body, :func:`page_allowed`) follow the same rule: a page of any site may send a
form to any address without asking (a CORS "simple request": no preflight), so a page of another site
could make a visitor's daemon transcribe and publish. ``Sec-Fetch-Site: cross-site`` is refused as a
foreign ``Origin`` is.

Without a token, a request must also name the daemon in its ``Host`` (:func:`host_allowed`): a page of
any site can make its own name resolve to 127.0.0.1 (DNS rebinding), and its requests are then
same-origin for the browser, ``Origin`` and ``Host`` both the attacker's name. Rebinding needs a name in
a domain the attacker's DNS answers for, so an IP literal or a name without a dot is safe.

The caption page gets the token once, as ``/?token=TOKEN``: :func:`token_cookie` turns it into an
HttpOnly cookie and the page is reloaded without it (303), so the token stays out of the browser's
history and out of reach of scripts. Browsers cannot set headers on a websocket, but they send the
page's cookies with the upgrade; the cookie is ``SameSite=Strict``, so other sites' pages never send it.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import quote, unquote, urlsplit

from websockets.datastructures import Headers

__all__ = ["LOOPBACK", "SINGLE_HEADERS", "cookie_name", "host_allowed", "origin_allowed", "page_allowed", "read_cookie",
           "repeated_header", "token_cookie"]

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
"""host names of this machine that browsers treat as secure, and that a page and the daemon may mix"""

SINGLE_HEADERS = ("Host", "Origin", "Content-Type", "Content-Length", "Authorization", "Expect", "OpenAI-Beta")
"""headers a request may hold once: two (which one counts?) get 400, as two ``Host`` headers must (RFC 9112)"""

_DEFAULT_PORT = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _host_port(host: str, scheme: str) -> tuple[str, int | None] | None:
    """``host[:port]`` split into its (lower-case) name and port, the scheme's port when it has none."""
    try:
        url = urlsplit(f"{scheme}://{host}")
        name, port = url.hostname, url.port
    except ValueError:  # a port that is no number, or out of range
        return None
    if not name or url.path or url.query or url.username:
        return None
    return name, port if port is not None else _DEFAULT_PORT.get(scheme)


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...], tls: bool) -> bool:
    """Whether a websocket upgrade with ``Origin: origin`` to ``Host: host`` may go on.

    Allowed: no ``Origin`` (not a browser); an origin listed in ``allowed`` (``"*"``: any); the daemon's own
    host, as the ``Host`` header names it (same name, and the same port when ``Host`` names one: behind a
    proxy that does not forward the port, the name alone); and the loopback names among themselves, on the
    same port (a page at ``http://localhost:8765/`` and ``ws://127.0.0.1:8765``).
    """
    if origin is None or "*" in allowed or origin in allowed:
        return True
    if origin.rstrip("/") in allowed:
        return True
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not host:
        return False  # "null" (a file or a sandboxed frame) and anything odd
    page = _host_port(rest.rstrip("/"), scheme.lower())
    own = _host_port(host, "https" if tls else "http")
    if page is None or own is None:
        return False
    same_port = page[1] == own[1] or ":" not in host.rsplit("]", 1)[-1]
    if page[0] == own[0]:
        return same_port
    return page[0] in LOOPBACK and own[0] in LOOPBACK and page[1] == own[1]


def host_allowed(host: str | None, allowed: tuple[str, ...], listening: str) -> bool:
    """Whether ``Host: host`` names this daemon: an IP literal, a name without a dot (``localhost``, the
    machine's name), ``*.localhost``, ``listening`` (``server.host``), the machine's host name, or a name in
    ``allowed`` (``server.allowed_hosts``; ``"*"``: any). No ``Host`` at all: not a browser, allowed."""
    if host is None or "*" in allowed:
        return True
    parsed = _host_port(host, "http")
    if parsed is None:
        return False
    name = parsed[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if "." not in name or name.endswith(".localhost"):
        return True
    return name in (listening.lower(), socket.gethostname().lower()) or name in (a.lower() for a in allowed)


def repeated_header(headers: Headers) -> str | None:
    """The first of :data:`SINGLE_HEADERS` that ``headers`` hold more than once, else None."""
    return next((name for name in SINGLE_HEADERS if len(headers.get_all(name)) > 1), None)


def page_allowed(headers: Headers, allowed: tuple[str, ...], tls: bool) -> bool:
    """Whether a request (a websocket upgrade, an upload) may come from the browser page that sent it.

    :func:`origin_allowed` on its ``Origin`` and ``Host``; and a request a browser marks
    ``Sec-Fetch-Site: cross-site`` is another site's unless its origin is listed in ``allowed``.
    """
    origins = headers.get_all("Origin")
    origin = origins[0] if len(origins) == 1 else None
    if len(origins) > 1:
        return False
    if origin is not None and ("*" in allowed or origin in allowed or origin.rstrip("/") in allowed):
        return True
    if "cross-site" in ",".join(headers.get_all("Sec-Fetch-Site")).lower() and "*" not in allowed:
        return False
    hosts = headers.get_all("Host")
    return origin_allowed(origin, hosts[0] if len(hosts) == 1 else None, allowed, tls)


def cookie_name(port: int) -> str:
    """The token cookie of the daemon listening on ``port``: cookies are shared by all ports of a host."""
    return f"streamer_token_{port}"


def token_cookie(port: int, token: str, secure: bool) -> str:
    """A ``Set-Cookie`` value that keeps ``token`` for the page's websockets (HttpOnly, SameSite=Strict)."""
    return (f"{cookie_name(port)}={quote(token, safe='')}; Path=/; HttpOnly; SameSite=Strict"
            + ("; Secure" if secure else ""))


def read_cookie(header: str, port: int) -> str:
    """The token in a ``Cookie`` header (empty if none)."""
    name = cookie_name(port)
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return unquote(value)
    return ""
