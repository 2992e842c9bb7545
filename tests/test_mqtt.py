"""MQTT publishing against a real mosquitto on loopback: payloads and order, broker restarts, status, bad settings.

Each test starts its own mosquitto on a free port with a generated config. Where the broker goes away,
the subscriber keeps a persistent session (clean_session false, QoS 1) that mosquitto saved to disk
(SIGUSR1), so that after the restart the broker holds the finals for it whichever of the daemon and
the subscriber reconnects first.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiomqtt
import pytest
import soundfile as sf
from conftest import pcm16
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.aio.mqtt import MqttPublisher
from streamer.config import MqttConfig, load_config
from streamer.events import Final, Partial
from streamer.exceptions import ConfigError

TIMEOUT = 30.0
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@pytest.fixture(scope="module", autouse=True)
def _needs_mosquitto():
    if not (os.access(MOSQUITTO, os.X_OK) and os.access(MOSQUITTO_PASSWD, os.X_OK)):
        pytest.fail("mosquitto is not installed; `apt-get install mosquitto` (.ci/run does it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition):
    """Poll a condition that has no event to await (a counter of the publisher), bounded."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


class Broker:
    """mosquitto on 127.0.0.1:port, restartable on the same port; its log lines can be awaited."""

    def __init__(self, root: Path, *, users: dict[str, str] | None = None, persistent: bool = False,
                 tls: tuple[Path, Path] | None = None, extra: tuple[str, ...] = ()) -> None:
        self.root = root / f"broker-{uuid.uuid4().hex[:6]}"
        self.root.mkdir()
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.users = users
        self.persistent = persistent
        self.tls = tls
        self.extra = extra  # more lines of mosquitto.conf
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    def _config(self) -> Path:
        lines = [f"listener {self.port} 127.0.0.1", "log_dest stderr", "log_type all", *self.extra]
        if getpass.getuser() == "root":
            lines.append("user root")  # else mosquitto switches to user mosquitto, who cannot read tmp_path
        if self.users:
            passwd = self.root / "passwd"
            for i, (user, password) in enumerate(self.users.items()):
                subprocess.run([MOSQUITTO_PASSWD, *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                               check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if self.persistent:
            lines += ["persistence true", f"persistence_location {self.root}/"]
        if self.tls:  # a second listener; the plain one stays for the subscriber
            cert, key = self.tls
            lines += [f"listener {self.tls_port} 127.0.0.1", f"certfile {cert}", f"keyfile {key}"]
        conf = self.root / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    async def start(self) -> None:
        mark = len(self.lines)
        self.proc = await asyncio.create_subprocess_exec(MOSQUITTO, "-c", str(self._config()),
                                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                         stderr=subprocess.PIPE)
        self._reader = asyncio.create_task(self._read(self.proc))
        await self.wait_log(" running", since=mark)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._line.set()
        self._line.set()

    async def wait_log(self, text: str, since: int = 0) -> None:
        assert self._reader is not None
        async with asyncio.timeout(TIMEOUT):
            while not any(text in line for line in self.lines[since:]):
                if self._reader.done():
                    raise AssertionError("mosquitto exited:\n" + "\n".join(self.lines[since:]))
                self._line.clear()
                await self._line.wait()

    async def save(self) -> None:
        """Write the persistent sessions to disk now (SIGUSR1), so that a SIGKILL keeps them."""
        assert self.proc is not None
        mark = len(self.lines)
        self.proc.send_signal(signal.SIGUSR1)
        await self.wait_log("Saving in-memory database", since=mark)

    def freeze(self) -> None:
        """SIGSTOP: the connections stay open but nothing is acknowledged."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
async def brokers(tmp_path):
    """``await brokers(users=..., persistent=...)`` starts a mosquitto; all are killed at the end."""
    started: list[Broker] = []

    async def make(**kwargs) -> Broker:
        broker = Broker(tmp_path, **kwargs)
        started.append(broker)
        await broker.start()
        return broker

    yield make
    for broker in started:
        await broker.kill()


class Subscriber:
    """An aiomqtt subscriber whose received messages can be awaited."""

    def __init__(self, port: int, *topics: str, persistent: bool = False, username: str | None = None,
                 password: str | None = None) -> None:
        self.port = port
        self.topics = topics or ("#",)
        self.persistent = persistent
        self.credentials = {"username": username, "password": password}
        self.client_id = f"test-sub-{uuid.uuid4().hex[:8]}"
        self.messages: list[aiomqtt.Message] = []
        self.client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._new = asyncio.Event()

    async def connect(self) -> Subscriber:
        await self.close()
        client = aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id,
                                clean_session=not self.persistent, **self.credentials)
        await client.__aenter__()
        self.client = client
        for topic in self.topics:
            await client.subscribe(topic, qos=1)
        self._reader = asyncio.create_task(self._read(client))
        return self

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                self.messages.append(message)
                self._new.set()
        except aiomqtt.MqttError:
            pass  # the broker went away; the test reconnects

    async def wait_for(self, condition) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not condition(self):
                self._new.clear()
                await self._new.wait()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.client is not None:
            try:
                await self.client.__aexit__(None, None, None)
            except aiomqtt.MqttError:
                pass
        self.client = self._reader = None

    def on(self, pattern: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.matches(pattern)]

    def finals(self, prefix: str = "streamer") -> list[dict]:
        """Final payloads de-duplicated by (session, segment), in order of first arrival."""
        seen, out = set(), []
        for m in self.on(f"{prefix}/+/final"):
            payload = json.loads(m.payload)
            key = (payload["session"], payload["segment"])
            if key not in seen:
                seen.add(key)
                out.append(payload)
        return out

    def status(self, prefix: str = "streamer") -> list[str]:
        return [m.payload.decode() for m in self.on(f"{prefix}/status")]


@pytest.fixture
async def subscribers():
    made: list[Subscriber] = []

    async def make(port, *topics, **kwargs) -> Subscriber:
        sub = Subscriber(port, *topics, **kwargs)
        made.append(sub)
        return await sub.connect()

    yield make
    for sub in made:
        await sub.close()


class WsClient:
    """A native-protocol websocket client whose received events can be awaited."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                self.events.append(json.loads(msg))
                self._new.set()
        except ConnectionClosed:
            pass
        finally:
            self._new.set()

    async def wait_for(self, condition) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not condition(self.events):
                if self._reader.done():
                    raise AssertionError(f"websocket closed before the condition: {self.events[-3:]}")
                self._new.clear()
                await self._new.wait()

    async def send_audio(self, data: bytes, chunk: int = 3200) -> None:
        for i in range(0, len(data), chunk):
            await self.ws.send(data[i : i + chunk])

    async def flush(self) -> None:
        """Close the open segment and wait for its final: everything sent so far was processed."""
        before = len(self.finals)
        await self.ws.send(json.dumps({"type": "flush"}))
        await self.wait_for(lambda ev: sum(e["type"] == "final" for e in ev) > before)
        assert self.finals[-1]["reason"] == "flush"

    async def stop(self) -> None:
        await self.ws.send(json.dumps({"type": "stop"}))
        async with asyncio.timeout(TIMEOUT):
            await self._reader
        assert self.events[-1]["type"] == "end"

    @property
    def session(self) -> str:
        return self.events[0]["session"]

    @property
    def finals(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "final"]


async def open_ws(port: int, name: str | None = None) -> WsClient:
    ws = await connect(f"ws://127.0.0.1:{port}/v1/stream")
    client = WsClient(ws)
    await client.wait_for(lambda ev: len(ev) >= 1)
    if name:
        await ws.send(json.dumps({"type": "start", "name": name}))
    return client


def mqtt_overrides(port: int, *extra: str) -> list[str]:
    return ["mqtt.enabled=true", "mqtt.host='127.0.0.1'", f"mqtt.port={port}", "mqtt.reconnect_max_s=0.4",
            "mqtt.flush_timeout_s=10", *extra]


async def start_daemon(daemon_factory, port: int, *extra: str):
    """The daemon with an MqttPublisher as sink and service, as ``streamer serve`` wires it."""
    overrides = mqtt_overrides(port, *extra)
    publisher = MqttPublisher(load_config(None, overrides).mqtt)
    d = await daemon_factory(*overrides, services=[publisher])
    d.hub.sinks.append(publisher)
    return d, publisher


def without_ids(payload: dict) -> dict:
    return {k: v for k, v in payload.items() if k not in ("stream", "session")}


def counter(metric, kind: str) -> float:
    return metric.labels(kind)._value.get()


# --- the daemon publishes ---------------------------------------------------------------------


async def test_finals_partials_hermes_and_status(brokers, subscribers, daemon_factory, speech):
    broker = await brokers()
    sub = await subscribers(broker.port, "streamer/#", "hermes/#")
    d, pub = await start_daemon(daemon_factory, broker.port, "endpoint.max_utterance_s=1.0", "mqtt.hermes=true",
                                "mqtt.site_id='kitchen'")
    async with asyncio.timeout(TIMEOUT):
        await pub.wait_connected()
    await sub.wait_for(lambda s: s.status() == ["online"])

    ws = await open_ws(d.port, name="kitchen")
    await ws.send_audio(pcm16(speech))
    await ws.stop()
    expected = ws.finals
    assert len(expected) >= 4
    await sub.wait_for(lambda s: len(s.finals()) >= len(expected))

    finals = sub.on("streamer/+/final")
    assert len(finals) == len(expected)  # no reconnect, so no duplicate
    assert {m.topic.value for m in finals} == {"streamer/kitchen/final"} and {m.qos for m in finals} == {1}
    payloads = [json.loads(m.payload) for m in finals]
    assert [without_ids(p) for p in payloads] == expected
    assert {(p["stream"], p["session"]) for p in payloads} == {("kitchen", ws.session)}

    partials = sub.on("streamer/kitchen/partial")
    assert partials and {m.qos for m in partials} == {0}
    sent = [e for e in ws.events if e["type"] == "partial"]
    assert [without_ids(json.loads(m.payload)) for m in partials] == sent

    await sub.wait_for(lambda s: len(s.on("hermes/asr/textCaptured")) >= len(expected))
    hermes = [json.loads(m.payload) for m in sub.on("hermes/asr/textCaptured")]
    assert [h["text"] for h in hermes] == [f["text"] for f in expected]
    for h, f in zip(hermes, expected, strict=True):
        assert h["siteId"] == "kitchen" and h["sessionId"] == ws.session
        assert h["seconds"] == pytest.approx(f["end"] - f["start"], abs=0.002)
        assert 0.0 <= h["likelihood"] <= 1.0

    await d.shutdown()
    await sub.wait_for(lambda s: s.status() == ["online", "offline"])
    assert counter(pub.metrics.mqtt_published, "final") == len(expected)
    assert counter(pub.metrics.mqtt_dropped, "final") == counter(pub.metrics.mqtt_dropped, "partial") == 0
    # a late subscriber reads the retained status
    late = await subscribers(broker.port, "streamer/status")
    await late.wait_for(lambda s: s.status() == ["offline"])
    assert late.messages[0].retain


async def test_broker_killed_mid_stream_loses_no_final(brokers, subscribers, daemon_factory, speech):
    broker = await brokers(persistent=True)
    sub = await subscribers(broker.port, "streamer/+/final", persistent=True)
    await broker.save()
    d, pub = await start_daemon(daemon_factory, broker.port, "endpoint.enabled=false")
    async with asyncio.timeout(TIMEOUT):
        await pub.wait_connected()
    audio, second = pcm16(speech), 32000  # bytes per second of s16le at 16 kHz

    ws = await open_ws(d.port, name="hall")
    for k in range(2):  # broker up
        await ws.send_audio(audio[k * second : (k + 1) * second])
        await ws.flush()
    await sub.wait_for(lambda s: len(s.finals()) == 2)

    broker.freeze()  # now the finals go out but are never acknowledged
    for k in range(2, 4):
        await ws.send_audio(audio[k * second : (k + 1) * second])
        await ws.flush()
    await until(lambda: pub.in_flight >= 2)  # written to the frozen broker, waiting for PUBACK
    await broker.kill()
    await until(lambda: not pub.connected)

    await ws.send_audio(audio[4 * second : 5 * second])  # broker gone: websocket unaffected
    await ws.flush()
    await ws.send_audio(audio[5 * second :])
    await ws.stop()
    expected = ws.finals
    # six flushes; a flushed second that holds only silence gives no final
    assert len(expected) >= 5 and pub.pending >= len(expected) - 2

    await broker.start()  # same port, same saved sessions
    async with asyncio.timeout(TIMEOUT):
        await pub.wait_connected()
    await sub.connect()
    await sub.wait_for(lambda s: len(s.finals()) >= len(expected))
    assert [without_ids(p) for p in sub.finals()] == expected
    assert all(p["session"] == ws.session for p in sub.finals())
    await until(lambda: pub.pending == 0)
    assert counter(pub.metrics.mqtt_dropped, "final") == 0


async def test_broker_down_at_start(brokers, subscribers, daemon_factory, speech, caplog):
    broker = await brokers(persistent=True)
    sub = await subscribers(broker.port, "streamer/+/final", persistent=True)
    await broker.save()
    await sub.close()
    await broker.kill()

    with caplog.at_level(logging.WARNING, logger="streamer.mqtt"):
        d, pub = await start_daemon(daemon_factory, broker.port, "endpoint.max_utterance_s=1.5")
    assert "refused the connection (is the broker running?); serving anyway" in caplog.text
    assert not pub.connected
    ws = await open_ws(d.port)
    await ws.send_audio(pcm16(speech))
    await ws.stop()
    expected = ws.finals
    assert expected and pub.pending >= len(expected)
    assert not pub.connected and pub.metrics.mqtt_connected._value.get() == 0

    await broker.start()
    async with asyncio.timeout(TIMEOUT):
        await pub.wait_connected()
    assert pub.metrics.mqtt_connected._value.get() == 1
    await sub.connect()
    await sub.wait_for(lambda s: len(s.finals()) >= len(expected))
    assert [without_ids(p) for p in sub.finals()] == expected
    assert {p["stream"] for p in sub.finals()} == {ws.session}  # no name given: the session id


async def test_overflow_drops_partials_first_then_oldest_finals(brokers, subscribers, caplog):
    broker = await brokers()
    sub = await subscribers(broker.port, "t/#")
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix="t", queue_size=4),
                        status=False)

    def event(kind, segment):
        return (Final if kind == "final" else Partial)(segment, f"{kind} {segment}", 0.0, 1.0)

    with caplog.at_level(logging.WARNING, logger="streamer.mqtt"):
        for kind, segment in [("partial", 0), ("final", 0), ("partial", 1), ("final", 1),  # full now
                              ("final", 2), ("partial", 2), ("final", 3), ("final", 4)]:
            pub.publish("s", "sess", event(kind, segment))
    assert pub.pending == 4
    assert counter(pub.metrics.mqtt_dropped, "partial") == 3 and counter(pub.metrics.mqtt_dropped, "final") == 1
    assert caplog.text.count("dropped") == 1 and "the queue is full" in caplog.text  # then rate-limited
    with caplog.at_level(logging.WARNING, logger="streamer.mqtt"):
        await pub.start()
        try:
            await sub.wait_for(lambda s: len(s.messages) >= 4)
        finally:
            await pub.stop()
    assert "dropped 3 more message(s)" in caplog.text  # the summary, when the broker is reached
    assert [json.loads(m.payload)["text"] for m in sub.messages] == ["final 1", "final 2", "final 3", "final 4"]
    assert not sub.on("t/status")  # status=False: the topic is the daemon's


async def test_a_message_that_cannot_be_published_is_dropped_not_retried(brokers, subscribers, caplog):
    broker = await brokers()
    sub = await subscribers(broker.port, "t/#")
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix="t"), status=False)
    await pub.start()
    try:
        with caplog.at_level(logging.WARNING, logger="streamer.mqtt"):
            pub.publish("x" * 70_000, "sess", Final(0, "too long", 0.0, 1.0))  # MQTT topics end at 65535 bytes
            pub.publish("s", "sess", Final(1, "fine", 0.0, 1.0))
            await sub.wait_for(lambda s: len(s.messages) >= 1)
            await until(lambda: pub.pending == 0)  # a retried message would stay pending
        assert pub.connected
    finally:
        await pub.stop()
    assert [json.loads(m.payload)["text"] for m in sub.messages] == ["fine"]
    assert counter(pub.metrics.mqtt_dropped, "final") == counter(pub.metrics.mqtt_published, "final") == 1
    assert "mqtt: cannot publish to t/xxx" in caplog.text
    assert "dropped 1 message(s) (latest: final to t/xxx" in caplog.text


async def test_stop_gives_up_after_flush_timeout(caplog):
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=free_port(), flush_timeout_s=0.3))
    await pub.start()  # refused: a warning, no error
    pub.publish("s", "sess", Final(0, "x", 0, 1))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="streamer.mqtt"):
        await pub.stop()
    assert time.monotonic() - t0 < 2.0
    assert counter(pub.metrics.mqtt_dropped, "final") == 1
    assert "1 message(s) not published within mqtt.flush_timeout_s" in caplog.text
    pub.publish("s", "sess", Final(1, "y", 0, 1))
    assert pub.pending == 0  # stopped: nothing is queued any more


# --- status and last will of a real `streamer serve` -------------------------------------------


async def serve_process(tiny_models, *overrides: str) -> asyncio.subprocess.Process:
    args = [a for o in overrides for a in ("--set", o)]
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "serve", "--model", str(tiny_models["layer-padfirst"]), "--port", "0",
        *args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def test_killed_daemon_leaves_offline_status(tiny_models, brokers, subscribers):
    broker = await brokers()
    sub = await subscribers(broker.port, "killtest/status")
    proc = await serve_process(tiny_models, *mqtt_overrides(broker.port, "mqtt.topic_prefix='killtest'"))
    try:
        async with asyncio.timeout(TIMEOUT):
            while not (line := (await proc.stderr.readline()).decode()).startswith("streamer: listening"):
                assert line, "streamer serve exited before listening"
        await sub.wait_for(lambda s: s.status("killtest")[-1:] == ["online"])
        proc.kill()  # SIGKILL: no goodbye, the broker publishes the last will
        await proc.wait()
        await sub.wait_for(lambda s: s.status("killtest")[-1:] == ["offline"])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_exits_with_an_error_on_unknown_host(tiny_models):
    proc = await serve_process(tiny_models, "mqtt.enabled=true", "mqtt.host='no-such-broker.invalid'")
    async with asyncio.timeout(TIMEOUT):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    assert "streamer serve: error: mqtt.host 'no-such-broker.invalid' cannot be resolved" in err.decode()


# --- settings ---------------------------------------------------------------------------------


async def test_login(brokers, subscribers, monkeypatch, tmp_path):
    broker = await brokers(users={"streamer": "right horse battery", "viewer": "v"})
    monkeypatch.setenv("STREAMER_TEST_MQTT_PASSWORD", "wrong")
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, username="streamer",
                     password_env="STREAMER_TEST_MQTT_PASSWORD")
    pub = MqttPublisher(cfg)
    with pytest.raises(ConfigError, match=r"refused the login \(.*\); check mqtt.username and the password"):
        await pub.start()
    await pub.stop()
    with pytest.raises(ConfigError, match="refused the login"):
        await MqttPublisher(MqttConfig(host="127.0.0.1", port=broker.port)).start()  # anonymous

    monkeypatch.setenv("STREAMER_TEST_MQTT_PASSWORD", "right horse battery")
    sub = await subscribers(broker.port, "streamer/status", username="viewer", password="v")
    pub = MqttPublisher(cfg)
    await pub.start()
    await sub.wait_for(lambda s: s.status() == ["online"])
    await pub.stop()
    await sub.wait_for(lambda s: s.status() == ["online", "offline"])

    password_file = tmp_path / "mqtt-password"
    password_file.write_text("right horse battery\n")
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=broker.port, username="streamer",
                                   password_file=str(password_file)))
    await pub.start()
    await sub.wait_for(lambda s: s.status()[-1:] == ["online"])
    await pub.stop()


@pytest.fixture
def self_signed(tmp_path):
    """(certificate, key) for 127.0.0.1, made by the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


async def test_tls(brokers, subscribers, self_signed):
    cert, _ = self_signed
    broker = await brokers(tls=self_signed)
    sub = await subscribers(broker.port, "streamer/status")
    with pytest.raises(ConfigError, match=r"sent a TLS certificate that was not accepted \(self.signed"):
        await MqttPublisher(MqttConfig(host="127.0.0.1", port=broker.tls_port, tls=True)).start()
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=broker.tls_port, tls=True, tls_ca_file=str(cert)))
    await pub.start()
    assert pub.connected
    await sub.wait_for(lambda s: s.status() == ["online"])
    await pub.stop()
    await sub.wait_for(lambda s: s.status() == ["online", "offline"])


BAD_SETTINGS = [
    ({"username": "u", "password_env": "STREAMER_TEST_UNSET_VARIABLE"},
     "mqtt.password_env names 'STREAMER_TEST_UNSET_VARIABLE', which is not set"),
    ({"username": "u", "password_file": "/nonexistent/pw"}, "mqtt.password_file '/nonexistent/pw' cannot be read"),
    ({"password_file": "/etc/hostname"}, "mqtt.password_file is set but mqtt.username is empty"),
    ({"tls": True, "tls_ca_file": "/nonexistent/ca.pem"}, "mqtt.tls_ca_file '/nonexistent/ca.pem' cannot be used"),
    ({"tls": True, "tls_ca_file": "GARBAGE"}, "cannot be used: not a PEM certificate"),
    ({"tls": True, "tls_cert_file": "/nonexistent/c.pem"}, "mqtt.tls_cert_file '/nonexistent/c.pem' cannot be used"),
    ({"tls_ca_file": "/etc/ssl/certs/ca-certificates.crt"}, "mqtt.tls_ca_file is set but mqtt.tls = false"),
    ({"tls": True, "tls_key_file": "k.pem"}, "mqtt.tls_key_file is set without mqtt.tls_cert_file"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS, ids=[m.split(" ")[0] for _, m in BAD_SETTINGS])
def test_bad_settings_are_config_errors(tmp_path, monkeypatch, settings, message):
    monkeypatch.delenv("STREAMER_TEST_UNSET_VARIABLE", raising=False)
    if settings.get("tls_ca_file") == "GARBAGE":
        garbage = tmp_path / "ca.pem"
        garbage.write_text("this is not a certificate\n")
        settings = {**settings, "tls_ca_file": str(garbage)}
    with pytest.raises(ConfigError) as info:
        MqttPublisher(MqttConfig(**settings))
    assert message in str(info.value)
    assert str(info.value)[0].islower() and not str(info.value).endswith(".")


async def test_unknown_host_is_an_error_at_start():
    pub = MqttPublisher(MqttConfig(host="no-such-broker.invalid"))
    with pytest.raises(ConfigError, match="mqtt.host 'no-such-broker.invalid' cannot be resolved .*; fix mqtt.host"):
        await pub.start()


# --- streamer transcribe --mqtt -----------------------------------------------------------------


async def test_transcribe_publishes(tiny_models, brokers, subscribers, speech, tmp_path, capsys):
    from streamer.cli import main

    broker = await brokers()
    sub = await subscribers(broker.port, "#")
    wav, out = tmp_path / "hall.wav", tmp_path / "out.jsonl"
    sf.write(wav, speech, 16000, subtype="PCM_16")
    argv = ["transcribe", "--model", str(tiny_models["layer-padfirst"]), "--mqtt", "-f", "jsonl", "-o", str(out),
            "--set", "mqtt.host='127.0.0.1'", "--set", f"mqtt.port={broker.port}",
            "--set", "endpoint.max_utterance_s=1.0", str(wav)]
    assert await asyncio.to_thread(main, argv) == 0
    expected = [e for e in map(json.loads, out.read_text().splitlines()) if e["type"] == "final"]
    assert len(expected) >= 4
    await sub.wait_for(lambda s: len(s.finals()) >= len(expected))
    assert [without_ids(p) for p in sub.finals()] == expected
    assert {m.topic.value for m in sub.on("streamer/+/final")} == {"streamer/hall/final"}
    assert not sub.on("streamer/status")  # a one-shot command leaves the daemon's status alone

    argv[argv.index(f"mqtt.port={broker.port}")] = "mqtt.host='no-such-broker.invalid'"
    assert await asyncio.to_thread(main, argv) == 1
    assert "error: mqtt.host 'no-such-broker.invalid' cannot be resolved" in capsys.readouterr().err
