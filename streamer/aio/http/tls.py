"""TLS for the daemon's ports: ``server.tls_cert`` and ``server.tls_key`` (PEM files).

With TLS, the caption page works from other machines (browsers allow the microphone only on
``https://`` pages or ``localhost``) and tokens do not travel in clear. The native port and the Vosk
port both use it. A plain ``ws://`` or ``http://`` client that reaches a TLS port has its connection
closed during the TLS handshake, before any HTTP: it sees the connection end without an HTTP
answer (websockets: ``InvalidMessage``, a browser: close 1006).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from streamer.config import ServerConfig
from streamer.exceptions import ConfigError

__all__ = ["server_ssl_context"]


def _read(key: str, path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"server.{key} = {path!r} cannot be read ({exc.strerror or exc}); give a PEM file "
                          "the daemon's user may read") from None


def server_ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """The TLS context of ``cfg`` (None without ``tls_cert``); a ConfigError says what is wrong with the files."""
    if not cfg.tls_cert:
        return None
    cert, key = _read("tls_cert", cfg.tls_cert), _read("tls_key", cfg.tls_key)
    if "-----BEGIN CERTIFICATE-----" not in cert:
        raise ConfigError(f"server.tls_cert = {cfg.tls_cert!r} holds no PEM certificate "
                          "('-----BEGIN CERTIFICATE-----'); give the certificate (chain) in PEM form")
    if "PRIVATE KEY-----" not in key:
        raise ConfigError(f"server.tls_key = {cfg.tls_key!r} holds no PEM private key "
                          "('-----BEGIN PRIVATE KEY-----'); give the certificate's key in PEM form")

    def no_passphrase() -> bytes:
        raise ConfigError(f"server.tls_key = {cfg.tls_key!r} is encrypted; give an unencrypted key (readable "
                          "by the daemon's user only): the daemon cannot ask for a passphrase")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(Path(cfg.tls_cert).expanduser(), Path(cfg.tls_key).expanduser(), password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"server.tls_key = {cfg.tls_key!r} is not the key of server.tls_cert = "
                              f"{cfg.tls_cert!r}; give the certificate's own key") from None
        raise ConfigError(f"server.tls_cert = {cfg.tls_cert!r} and server.tls_key = {cfg.tls_key!r} cannot be "
                          f"loaded ({exc.reason or exc}); give a PEM certificate and its unencrypted key") from None
    return context
