"""MQTT settings that need the outside world: the password, the TLS context, client ids, failures in words.

:func:`check_settings` reads the password and TLS files once, before anything connects, so that a
mistake stops the command with a :class:`ConfigError` saying what to fix. :func:`explain_failure`
turns a failed connection into such a sentence and says whether retrying can help.
:mod:`streamer.aio.mqtt.publisher` uses all of them.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

from aiomqtt import MqttError
from aiomqtt.exceptions import MqttConnectError

from streamer.config import MqttConfig
from streamer.exceptions import ConfigError

__all__ = ["check_settings", "client_id_for", "explain_failure", "password", "tls_context"]

_LOGIN_REFUSED = {4, 5, 134, 135}  # MQTT 3.1.1 and 5 codes: bad user name or password, not authorised
_ID_REFUSED = {2, 133}
_BROKER_BUSY = {3, 136, 137}  # server unavailable, server busy: try again later


def check_settings(cfg: MqttConfig) -> None:
    """Raise ConfigError for MQTT settings that are wrong before any connection (password, TLS files)."""
    if cfg.enabled:
        password(cfg)
        tls_context(cfg)


def client_id_for(cfg: MqttConfig, role: str = "") -> str:
    """The client id: ``mqtt.client_id`` or ``streamer-<host>-<pid>``; a ``role`` makes it unique per process.

    The daemon uses no role. One-shot commands pass one (``transcribe``) so that they never take
    over the daemon's connection when both share a config file: a broker closes the older of two
    connections with the same id.
    """
    base = cfg.client_id or f"streamer-{socket.gethostname()}"
    if role:
        return f"{base}-{role}-{os.getpid()}"
    return cfg.client_id or f"{base}-{os.getpid()}"


def password(cfg: MqttConfig) -> str | None:
    """The password from ``mqtt.password_env`` (first) or ``mqtt.password_file``; None without either."""
    if not (cfg.password_env or cfg.password_file):
        return None
    if not cfg.username:
        key = "password_env" if cfg.password_env else "password_file"
        raise ConfigError(f"mqtt.{key} is set but mqtt.username is empty; set mqtt.username")
    if cfg.password_env:
        value = os.environ.get(cfg.password_env, "")
        if not value:
            raise ConfigError(f"mqtt.password_env names {cfg.password_env!r}, which is not set; "
                              "export it or use mqtt.password_file")
        return value
    try:
        lines = Path(cfg.password_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"mqtt.password_file {cfg.password_file!r} cannot be read: {exc.strerror}") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"mqtt.password_file {cfg.password_file!r} is empty; put the password on its first line")
    return lines[0].strip()


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context for ``mqtt.tls = true`` (CA and client certificate loaded); None for plain MQTT."""
    files = {"tls_ca_file": cfg.tls_ca_file, "tls_cert_file": cfg.tls_cert_file, "tls_key_file": cfg.tls_key_file}
    if not cfg.tls:
        for key, value in files.items():
            if value:
                raise ConfigError(f"mqtt.{key} is set but mqtt.tls = false; set mqtt.tls = true or remove mqtt.{key}")
        return None
    if cfg.tls_key_file and not cfg.tls_cert_file:
        raise ConfigError("mqtt.tls_key_file is set without mqtt.tls_cert_file; set both for a client certificate")
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_file or None)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigError(f"mqtt.tls_ca_file {cfg.tls_ca_file!r} cannot be used: {_os_reason(exc)}") from None
    if cfg.tls_cert_file:
        try:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file or None)
        except OSError as exc:
            which = "mqtt.tls_cert_file" + (" / mqtt.tls_key_file" if cfg.tls_key_file else "")
            raise ConfigError(f"{which} {cfg.tls_cert_file!r} cannot be used: {_os_reason(exc)}") from None
    return ctx


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not a PEM certificate or key ({exc.reason or exc})"
    return str(exc.strerror or exc)


def explain_failure(exc: BaseException, cfg: MqttConfig, client_id: str) -> tuple[bool, str]:
    """Explain a failed connection: (is it a settings mistake, lowercase message saying what to fix).

    A settings mistake does not go away by retrying: at start, raise it as a :class:`ConfigError`;
    later, log it as an error. Anything else is logged as a warning and retried.
    """
    where = f"mqtt broker {cfg.host}:{cfg.port}"
    if isinstance(exc, MqttConnectError):
        rc = exc.rc
        code = rc if isinstance(rc, int) else getattr(rc, "value", -1)
        text = str(rc).lower() if not isinstance(rc, int) else str(exc).lower()
        if code in _LOGIN_REFUSED:
            return True, (f"{where} refused the login ({text}); check mqtt.username and the password "
                          "in mqtt.password_env or mqtt.password_file")
        if code in _ID_REFUSED:
            return True, f"{where} rejected the client id {client_id!r} ({text}); set another mqtt.client_id"
        if code in _BROKER_BUSY:
            return False, f"{where} is not available ({text})"
        return True, f"{where} refused the connection ({text})"
    if not isinstance(exc, MqttError):
        return True, f"cannot connect to {where}: {exc!r}"
    cause = exc.__cause__ or exc.__context__  # aiomqtt raises MqttError(str(oserror)) from None
    if isinstance(cause, socket.gaierror):
        transient = cause.errno == socket.EAI_AGAIN
        return not transient, (f"mqtt.host {cfg.host!r} cannot be resolved ({cause.strerror}); "
                               "fix mqtt.host or the DNS setup")
    if isinstance(cause, ssl.SSLCertVerificationError):
        return True, (f"{where} sent a TLS certificate that was not accepted ({cause.verify_message}); "
                      "check mqtt.tls_ca_file and that mqtt.host matches the certificate")
    if isinstance(cause, ssl.SSLError):
        return True, (f"TLS handshake with {where} failed ({cause.reason or cause}); "
                      "is mqtt.port a TLS listener? check the mqtt.tls settings")
    if isinstance(cause, ConnectionRefusedError):
        return False, f"{where} refused the connection (is the broker running?)"
    # A TLS client on a plain port is reset; a plain client on a TLS port gets no CONNACK.
    listener = "a TLS listener (mqtt.tls = true)" if cfg.tls else "a plain MQTT listener (mqtt.tls = false)"
    if isinstance(cause, TimeoutError) or str(exc) == "Operation timed out":
        return False, f"{where} did not answer in time; is mqtt.port {listener}?"
    if isinstance(cause, ConnectionResetError):
        return False, f"{where} reset the connection; is mqtt.port {listener}?"
    if isinstance(cause, OSError):
        return False, f"{where} is unreachable ({cause.strerror or cause})"
    return False, f"{where}: {exc}"
