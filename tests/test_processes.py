"""``streamer serve --processes 2``: real front-end processes behind one port, their supervisor, real clients.

Each test starts ``python -m streamer serve --processes 2`` with the demo model on port 0 (the first
process picks the ports, the second shares them with SO_REUSEPORT) and drives it over loopback. The
kernel spreads connections over the processes; the native ``ready`` message says which process
(``server_pid``) serves a stream, so a test opens connections until it has the spread it needs
(bounded). What must not depend on the process a client lands on: the transcripts, the stream limit,
viewers, names, /healthz, /metrics, MQTT; and a process that dies takes only its own clients along.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import pcm16
from test_mqtt import MOSQUITTO, Broker, Subscriber, mqtt_overrides  # noqa: F401  (MOSQUITTO: the skip check)
from test_server import finals_of, reference_finals, vosk_session
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 60.0
START_TIMEOUT = 240.0
"""two processes each load the demo model, one after the other (port 0), on a shared machine"""
TRIES = 40
"""connections opened at most to land one on a wanted process (each lands on either at random: 2**-40)"""
LISTENING = re.compile(r"streamer: listening on ws://127\.0\.0\.1:(\d+)/v1/stream(?:, vosk on ws://127\.0\.0\.1:(\d+))?")


class Served:
    """``streamer serve --processes 2`` in a subprocess; its log (every process's) collected line by line."""

    def __init__(self, *overrides: str, config: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.overrides = overrides
        self.config = config
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.port = self.vosk_port = 0
        self._new = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Served:
        args = [a for o in ("server.processes=2", "vosk.enabled=true", "vosk.port=0", *self.overrides)
                for a in ("--set", o)]
        if self.config is not None:
            args += ["--config", str(self.config)]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "serve", "--model", "demo", "--device", "cpu", "--port", "0", *args,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        self._reader = asyncio.create_task(self._read())
        match = await self.wait_log(LISTENING, limit_s=START_TIMEOUT)
        self.port, self.vosk_port = int(match.group(1)), int(match.group(2))
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._new.set()
        self._new.set()

    async def wait_log(self, pattern: re.Pattern[str] | str, since: int = 0, limit_s: float = TIMEOUT) -> re.Match[str]:
        """The first log line from ``since`` on that matches ``pattern``."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        assert self._reader is not None
        async with asyncio.timeout(limit_s):
            while True:
                for line in self.lines[since:]:
                    if m := regex.search(line):
                        return m
                since = len(self.lines)
                if self._reader.done():
                    raise AssertionError("streamer serve exited:\n" + "\n".join(self.lines[-30:]))
                self._new.clear()
                await self._new.wait()

    def children(self) -> dict[int, int]:
        """slot -> pid of the latest process started in each slot."""
        out = {}
        for line in self.lines:
            if m := re.search(r"started front-end process (\d+) \(pid (\d+)\)", line):
                out[int(m.group(1))] = int(m.group(2))
        return out

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        assert self.proc is not None
        async with asyncio.timeout(TIMEOUT):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            for pid in self.children().values():  # the processes end when the supervisor does; do not wait
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=TIMEOUT) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def health(self) -> dict:
        status, body = await asyncio.to_thread(self.get, "/healthz")
        return json.loads(body)

    async def until_health(self, condition, limit_s: float = TIMEOUT) -> dict:
        """Poll /healthz (it has no event to await) until ``condition(health)``, bounded."""
        async with asyncio.timeout(limit_s):
            while not condition(health := await self.health()):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        return health


@pytest.fixture
async def served():
    """``await served(*overrides, config=...)`` starts a daemon of two processes; all are killed at the end."""
    started: list[Served] = []

    async def make(*overrides: str, config: Path | None = None, env: dict[str, str] | None = None) -> Served:
        s = Served(*overrides, config=config, env=env)
        started.append(s)
        return await s.start()

    yield make
    for s in started:
        await s.kill()


# --- clients ------------------------------------------------------------------------------------------


class Client:
    """A native client whose messages are collected as they come."""

    def __init__(self, ws: ClientConnection, ready: dict) -> None:
        self.ws = ws
        self.ready = ready
        self.messages: list[dict] = [ready]
        self.code: int | None = None
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @property
    def pid(self) -> int:
        return int(self.ready["server_pid"])

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                self.messages.append(json.loads(msg))
                self._new.set()
        except ConnectionClosed:
            pass
        self.code = self.ws.close_code
        self._new.set()

    async def wait_for(self, condition) -> None:
        """Until ``condition(messages)``; fails when the connection closes first."""
        async with asyncio.timeout(TIMEOUT):
            while not condition(self.messages):
                assert not self._reader.done(), self.messages[-3:]
                self._new.clear()
                await self._new.wait()

    async def send(self, audio: bytes, chunk: int = 3200) -> None:
        for i in range(0, len(audio), chunk):
            await self.ws.send(audio[i : i + chunk])

    async def finish(self) -> list[dict]:
        """Stop; the messages up to the close."""
        await self.ws.send(json.dumps({"type": "stop"}))
        return await self.closed()

    async def closed(self) -> list[dict]:
        async with asyncio.timeout(TIMEOUT):
            await self._reader
        return self.messages

    async def heard(self) -> None:
        """The server sent an event for this stream's audio: it is mid-stream."""
        await self.wait_for(lambda m: len(m) >= 2)

    async def flushed(self, finals: int) -> None:
        """Everything sent so far was computed and is final: ``finals`` finals came (a flush closes the open
        segment; its final may say ``silence`` when the flush's own padding ends the segment first)."""
        await self.ws.send(json.dumps({"type": "flush"}))
        await self.wait_for(lambda m: len(finals_of(m)) >= finals)


async def open_client(port: int, start: dict | None = None) -> Client:
    ws = await connect(f"ws://127.0.0.1:{port}/v1/stream")
    client = Client(ws, json.loads(await ws.recv()))
    if start is not None:
        await ws.send(json.dumps(start))
    return client


async def spread(port: int, per_process: int, *, pids: int = 2, opened: list[Client] | None = None) -> list[Client]:
    """``per_process`` clients on each of the ``pids`` processes (extra connections are closed); ``opened``
    collects every client opened, kept or not."""
    kept: dict[int, list[Client]] = {}
    for _ in range(TRIES * per_process):
        client = await open_client(port)
        if opened is not None:
            opened.append(client)
        assert client.ready["type"] == "ready", client.ready
        if len(kept.setdefault(client.pid, [])) < per_process:
            kept[client.pid].append(client)
        else:
            await client.ws.close()
        if len(kept) == pids and all(len(c) == per_process for c in kept.values()):
            return [c for cs in kept.values() for c in cs]
    raise AssertionError(f"connections landed on {sorted(kept)} only")


def as_float(audio: bytes) -> np.ndarray:
    return np.frombuffer(audio, "<i2").astype(np.float32) / 32768


def texts(finals: list[dict]) -> list[str]:
    return [f["text"] for f in finals]


@pytest.fixture(scope="module")
def expected(model_runner, speech) -> list[dict]:
    """What ``streamer transcribe`` makes of the test speech (default config, demo model)."""
    return reference_finals(model_runner, as_float(pcm16(speech)))


# --- serving ------------------------------------------------------------------------------------------


async def test_two_processes_serve_native_and_vosk_clients_like_transcribe(served, speech, expected):
    """8 native and 2 Vosk clients at once, over both processes, get the finals `streamer transcribe` gives;
    server.max_streams = 10 is the daemon's total: an 11th client is refused busy (1013) wherever it lands;
    /healthz and /metrics count both processes' streams."""
    s = await served("server.max_streams=10")
    audio = pcm16(speech)
    async with connect(f"ws://127.0.0.1:{s.vosk_port}/") as probe:  # Vosk has no ready: a header names the process
        assert probe.response is not None and int(probe.response.headers["X-Streamer-Pid"]) in s.children().values()
    opened: list[Client] = []
    natives = await spread(s.port, 4, opened=opened)
    assert len({c.pid for c in natives}) == 2 and set(s.children().values()) == {c.pid for c in natives}

    go = asyncio.Event()  # the Vosk clients hold their slots (admitted at connect) until the refusals are checked

    async def vosk() -> list[dict]:
        return await vosk_session(s.vosk_port, audio, config={"sample_rate": 16000}, gate=go)

    async def native(client: Client) -> list[dict]:
        await client.send(audio)
        return await client.finish()

    voskers = [asyncio.ensure_future(vosk()) for _ in range(2)]
    await s.until_health(lambda h: h["streams"] == 10)  # all ten admitted: the daemon is full
    for _ in range(4):  # wherever it lands, an eleventh is refused
        extra = await open_client(s.port)
        messages = await extra.closed()
        assert (messages[-1].get("code"), extra.code) == ("busy", 1013), messages
    health = await s.health()
    assert health["streams"] == 10 and health["processes"] == {"configured": 2, "serving": 2}
    assert health["status"] == "ok"
    go.set()

    results = await asyncio.gather(*(native(c) for c in natives), *voskers)
    for messages in results[:8]:
        assert texts(finals_of(messages)) == texts(expected) and messages[-1]["type"] == "end"
    for replies in results[8:]:
        assert " ".join(r["text"] for r in replies if r.get("text")) == " ".join(texts(expected))

    status, body = await asyncio.to_thread(s.get, "/metrics")
    metrics = body.decode()
    assert status == 200
    total = {m.group(1): float(m.group(2))
             for m in re.finditer(r'^streamer_streams_total\{protocol="(\w+)"\} (\S+)$', metrics, re.M)}
    # each counted once, by the process that served it (vosk: the probe and the two clients)
    assert total == {"native": float(len(opened)), "vosk": 3.0}
    rejected = re.search(r'^streamer_streams_rejected_total\{reason="busy"\} (\S+)$', metrics, re.M)
    assert rejected is not None and float(rejected.group(1)) == 4.0
    await s.until_health(lambda h: h["streams"] == 0)
    s.signal(signal.SIGTERM)
    assert await s.wait() == 0


async def test_viewer_and_names_across_processes(served, speech, expected):
    """A viewer on one process receives the stream its name names on the other; the name is the daemon's: a
    client on either process asking for it while it is taken is refused name_in_use."""
    s = await served()
    viewer_ws = None
    for _ in range(TRIES):
        viewer_ws = await connect(f"ws://127.0.0.1:{s.port}/v1/listen/hall")
        ready = json.loads(await viewer_ws.recv())
        assert ready["type"] == "ready" and ready["stream"] == "hall"
        viewer_pid = ready["server_pid"]
        break
    assert viewer_ws is not None
    speaker = None
    for _ in range(TRIES):
        client = await open_client(s.port)
        if client.pid != viewer_pid:
            speaker = client
            break
        await client.ws.close()
    assert speaker is not None, "every connection landed on the viewer's process"
    await speaker.ws.send(json.dumps({"type": "start", "name": "hall"}))
    await speaker.send(pcm16(speech))
    await speaker.flushed(len(expected))  # the name is held now

    refused_on = set()
    for _ in range(TRIES):
        rival = await open_client(s.port, {"type": "start", "name": "hall"})
        messages = await rival.closed()
        assert (messages[-1].get("code"), rival.code) == ("name_in_use", 1008), messages
        refused_on.add(rival.pid)
        if len(refused_on) == 2:
            break
    assert len(refused_on) == 2

    messages = await speaker.finish()
    seen: list[dict] = []
    async with asyncio.timeout(TIMEOUT):
        while len(finals_of(seen)) < len(finals_of(messages)):
            seen.append(json.loads(await viewer_ws.recv()))
    assert finals_of(seen) == finals_of(messages)
    assert [t for t in texts(finals_of(messages)) if t] == texts(expected)
    await viewer_ws.close()
    again = await open_client(s.port, {"type": "start", "name": "hall"})  # free again once the stream ended
    await again.send(pcm16(speech[:16000]))
    await again.heard()
    assert (await again.finish())[-1]["type"] == "end"


# --- a process dies; signals --------------------------------------------------------------------------------


async def mid_stream(clients: list[Client], audio: bytes) -> int:
    """Each client sends the first half of ``audio`` and hears an event of it; the bytes sent (where the rest
    starts)."""
    half = len(audio) // 2 & ~1
    for c in clients:
        await c.send(audio[:half])
    for c in clients:
        await c.heard()
    return half


async def served_to_the_end(s: Served, clients: list[Client], audio: bytes, expected) -> None:
    """Each client streams ``audio`` and gets transcribe's finals; then SIGTERM stops the daemon cleanly."""
    for c in clients:
        await c.send(audio)
    for c in clients:
        assert texts(finals_of(await c.finish())) == texts(expected)
    s.signal(signal.SIGTERM)
    assert await s.wait() == 0


async def test_a_killed_process_is_restarted_and_takes_only_its_own_clients(served, speech, expected):
    """SIGKILL one front-end process mid-stream: its clients' connections close, the other process's streams go
    on to the same finals; the supervisor starts a new process in its place, its stream slots are free again,
    and the killed clients can reconnect and be served."""
    s = await served("server.max_streams=5")
    audio = pcm16(speech)
    clients = await spread(s.port, 2)
    half = await mid_stream(clients, audio)
    victim = clients[0].pid
    doomed = [c for c in clients if c.pid == victim]
    survivors = [c for c in clients if c.pid != victim]
    mark = len(s.lines)
    os.kill(victim, signal.SIGKILL)
    for c in doomed:
        await c.closed()
        assert c.messages[-1]["type"] != "end" and c.code == 1006  # the connection went, no close frame
    for c in survivors:  # untouched: the rest of their audio, their finals, their end
        await c.send(audio[half:])
    for c in survivors:
        messages = await c.finish()
        assert [t for t in texts(finals_of(messages)) if t] == texts(expected) and messages[-1]["type"] == "end"
    await s.wait_log(rf"front-end process \d \(pid {victim}\) killed by SIGKILL", since=mark)
    await s.wait_log(r"started front-end process \d \(pid \d+\)", since=mark)
    await s.until_health(lambda h: h["processes"]["serving"] == 2 and h["streams"] == 0, START_TIMEOUT)
    new_pid = next(pid for pid in s.children().values() if pid not in {c.pid for c in clients})
    again = await spread(s.port, 2)  # four of five slots at once: the dead process's two were released
    assert {c.pid for c in again} == {new_pid, survivors[0].pid}
    await served_to_the_end(s, again, audio, expected)


async def test_a_finals_only_stream_forms_partials_for_a_viewer_on_another_process(served, speech, expected):
    """A native client that asks for finals only gets none of the partials, yet a viewer of its name served by the
    other process gets them (the supervisor tells the stream's process that the name is watched) and the finals."""
    s = await served()
    viewer, pid = None, 0
    for _ in range(TRIES):
        ws = await connect(f"ws://127.0.0.1:{s.port}/v1/listen/desk")
        pid = json.loads(await ws.recv())["server_pid"]
        client = await open_client(s.port, {"type": "start", "name": "desk", "partials": False})
        if client.pid != pid:
            viewer = ws
            break
        await client.ws.close()
        await ws.close()
    assert viewer is not None
    await asyncio.sleep(0.5)  # (the supervisor tells the stream's process of the viewer within a few ms)
    await client.send(pcm16(speech))
    messages = await client.finish()
    assert texts(finals_of(messages)) == texts(expected)
    assert not [m for m in messages if m["type"] == "partial"]
    seen: list[dict] = []
    async with asyncio.timeout(TIMEOUT):
        while len(finals_of(seen)) < len(finals_of(messages)):
            seen.append(json.loads(await viewer.recv()))
    await viewer.close()
    assert finals_of(seen) == finals_of(messages)
    assert [m for m in seen if m["type"] == "partial" and m["text"]]


async def test_sigterm_finalises_every_process_and_sighup_reaches_every_process(served, speech, tmp_path, expected):
    """SIGHUP: every process reloads the config file (the endpoint setting each `ready` shows changes on both).
    SIGTERM: every stream of every process gets its finals, `end` and 1001; a viewer on one process of a stream
    on the other receives that stream's last final before its own 1001; the supervisor exits 0."""
    config = tmp_path / "streamer.toml"
    config.write_text("[endpoint]\nsilence_after_speech_s = 0.8\n")
    s = await served("server.drain_timeout_s=0", config=config)  # SIGTERM finalises at once (no drain)
    config.write_text("[endpoint]\nsilence_after_speech_s = 0.7\n")
    mark = len(s.lines)
    s.signal(signal.SIGHUP)
    for slot in (0, 1):
        await s.wait_log(rf"\[p{slot}\]: reload: applied endpoint\.silence_after_speech_s", since=mark)
    reloaded = await spread(s.port, 1)
    assert {c.ready["endpoint"]["silence_after_speech_s"] for c in reloaded} == {0.7}
    for c in reloaded:
        await c.ws.close()

    audio = pcm16(speech)
    clients = await spread(s.port, 2)
    named = clients[0]  # a stream's name is its session id
    viewer = None
    for _ in range(TRIES):
        ws = await connect(f"ws://127.0.0.1:{s.port}/v1/listen/{named.ready['session']}")
        if json.loads(await ws.recv())["server_pid"] != named.pid:
            viewer = ws
            break
        await ws.close()
    assert viewer is not None
    before = {}

    async def speak(c: Client) -> None:
        await c.send(audio)
        await c.flushed(len(expected))  # all of it computed and final
        before[c] = len(finals_of(c.messages))
        mark = len(c.messages)
        await c.send(audio[: 2 * 16000])  # then two seconds of speech, not final yet when SIGTERM comes
        await c.wait_for(lambda m: any(e["type"] == "partial" and e["text"] for e in m[mark:]))

    await asyncio.gather(*(speak(c) for c in clients))
    s.signal(signal.SIGTERM)
    for c in clients:
        messages = await c.closed()
        assert messages[-1] == {"type": "end", "session": c.ready["session"], "reason": "server shutting down"}
        assert c.code == 1001
        finals = finals_of(messages)
        assert [t for t in texts(finals[: before[c]]) if t] == texts(expected)
        assert any(f["text"] for f in finals[before[c] :])  # the open segment was finalised
    seen = []
    try:
        async for msg in viewer:
            seen.append(json.loads(msg))
    except ConnectionClosed:
        pass
    assert viewer.close_code == 1001
    assert finals_of(seen) and finals_of(seen)[-1] == finals_of(named.messages)[-1]
    assert await s.wait() == 0


# --- MQTT ---------------------------------------------------------------------------------------------------


async def test_mqtt_with_two_processes(served, speech, tmp_path):
    """One MQTT connection for the daemon: every final a websocket client got is on MQTT exactly once per
    (session, segment), also those of a process killed mid-stream; `status` stays online while a process
    dies and comes back, and goes offline only when the whole daemon stopped."""
    broker = Broker(tmp_path)
    await broker.start()
    sub = await Subscriber(broker.port, "procs/#").connect()
    try:
        s = await served(*mqtt_overrides(broker.port, "mqtt.topic_prefix='procs'"))
        await sub.wait_for(lambda x: x.status("procs")[-1:] == ["online"])
        audio = pcm16(speech)
        half = len(audio) * 7 // 10 & ~1  # past the first phrase's final
        clients = await spread(s.port, 2)
        for c in clients:
            await c.send(audio[:half])
        for c in clients:
            await c.wait_for(lambda m: len(finals_of(m)) >= 1)
        victim = clients[0].pid
        os.kill(victim, signal.SIGKILL)
        for c in clients:
            if c.pid == victim:
                await c.closed()
            else:
                await c.send(audio[half:])
                await c.finish()
        sent = {(c.ready["session"], f["segment"]): f for c in clients for f in finals_of(c.messages)}
        await sub.wait_for(lambda x: len(x.on("procs/+/final")) >= len(sent))
        await s.wait_log(r"started front-end process \d \(pid \d+\)", since=0)
        health = await s.until_health(lambda h: h["processes"]["serving"] == 2, START_TIMEOUT)
        assert health["mqtt"] == "ok"
        s.signal(signal.SIGTERM)
        assert await s.wait() == 0
        await sub.wait_for(lambda x: x.status("procs")[-1:] == ["offline"])
        received = [json.loads(m.payload) for m in sub.on("procs/+/final")]
        keys = [(p["session"], p["segment"]) for p in received]
        assert sorted(keys) == sorted(sent)  # each exactly once, none missing
        for p in received:
            assert {k: v for k, v in p.items() if k not in ("stream", "session")} == sent[(p["session"],
                                                                                            p["segment"])]
        # the killed process never spoke for the daemon; the SIGTERM's drain did, before the end
        assert sub.status("procs") == ["online", "draining", "offline"]
    finally:
        await sub.close()
        await broker.kill()


# --- the supervisor's cluster service alone (no model, no processes) ------------------------------------------


async def test_cluster_service_counts_names_and_relays_and_frees_what_a_gone_process_held(tmp_path):
    """Admission is counted over every process; a name is one process's; an event of a watched name reaches the
    other process's viewers (not its own process again) and the MQTT hook; when a process's connection goes,
    its slots, names and watches are free at once."""
    from streamer.aio.processes.cluster import ClusterLink, ClusterService
    from streamer.events import Final

    published: list[tuple[str, str, str]] = []
    service = ClusterService(str(tmp_path / "c.sock"), on_event=lambda n, s, e: published.append((n, s, e.text)),
                             forward_all=True)
    await service.start()
    try:
        a = await ClusterLink.connect(service.path, 0)
        b = await ClusterLink.connect(service.path, 1)
        got: list[tuple[str, str]] = []
        b.deliver = lambda name, session, event: got.append((name, event.text))
        a.deliver = lambda name, session, event: got.append(("echo", event.text))
        assert [await a.admit("stream", k, 3) for k in ("a1", "a2")] == [True, True]
        assert await b.admit("stream", "b1", 3) is True
        assert await b.admit("stream", "b2", 3) is False  # 3 in the daemon, whichever process asks
        b.release("stream", "b1")
        assert await b.admit("stream", "b2", 3) is True
        assert await a.claim("hall", "s1") is None
        assert await a.claim("hall", "s1") is None  # again, same stream: harmless
        assert await b.claim("hall", "s2") == "another live stream"
        assert await a.claim("hall", "s3") == "another live stream"

        b.viewing("hall", True)
        async with asyncio.timeout(TIMEOUT):
            while "hall" not in a.watched:  # noqa: ASYNC110  (the supervisor's broadcast has no event to await)
                await asyncio.sleep(0.01)
        a.publish("hall", "s1", Final(0, "hello there", 0.0, 1.0))
        async with asyncio.timeout(TIMEOUT):
            while not got or not published:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert got == [("hall", "hello there")] and published == [("hall", "s1", "hello there")]

        await a.close()  # the process is gone: its two streams and its name are free
        async with asyncio.timeout(TIMEOUT):
            while service.count("stream") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert await b.claim("hall", "s2") is None
        assert await b.admit("stream", "b3", 3) is True and await b.admit("stream", "b4", 3) is True
        assert service.state()["streams"] == 3
        await b.close()
    finally:
        await service.stop()


async def test_a_process_whose_supervisor_is_gone_hears_of_it(tmp_path):
    """The supervisor went away: the process's link says so (the process then finalises and exits) and every
    question it asks is answered no rather than waited on."""
    from streamer.aio.processes.cluster import ClusterLink, ClusterService

    service = ClusterService(str(tmp_path / "c.sock"))
    await service.start()
    link = await ClusterLink.connect(service.path, 0)
    lost = asyncio.Event()
    link.on_lost = lost.set
    assert await link.admit("stream", "x", 10) is True
    await service.stop()
    async with asyncio.timeout(TIMEOUT):
        await lost.wait()
    assert await link.admit("stream", "x", 10) is False
    assert (await link.claim("n", "s")) is not None
    await link.close()


# --- systemd -------------------------------------------------------------------------------------------------


class NotifyMain:
    """systemd's side of sd_notify, keeping each message's sender pid (SO_PASSCRED), as NotifyAccess=main checks."""

    def __init__(self) -> None:
        self.name = f"@streamer-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.senders: set[int] = set()
        self._ready = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._ready.set)

    def _recv(self) -> list[str] | None:
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except BlockingIOError:
            return None
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                self.senders.add(struct.unpack("3i", value[:12])[0])
        return data.decode().split("\n")

    async def expect(self, field: str, within: float = TIMEOUT) -> list[str]:
        async with asyncio.timeout(within):
            while True:
                lines = self._recv()
                if lines is None:
                    self._ready.clear()
                    await self._ready.wait()
                elif any(line.startswith(field) for line in lines):
                    return lines

    def drain(self) -> list[list[str]]:
        got = []
        while (lines := self._recv()) is not None:
            got.append(lines)
        return got

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


async def test_systemd_hears_the_supervisor_only_ready_once_all_serve_and_a_stalled_process_stops_the_pings(
        served):
    """READY=1 comes from the supervisor once both processes serve; WATCHDOG=1 pings stop while one process's
    event loop is stalled (SIGSTOP) and come back when it runs again; a reload is RELOADING=1 then READY=1;
    SIGTERM is STOPPING=1 and exit 0. Every message comes from the supervisor's pid (NotifyAccess=main)."""
    notify = NotifyMain()
    try:
        s = await served(env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "1000000"})
        ready = await notify.expect("READY=1", START_TIMEOUT)
        assert any(line.startswith("STATUS=2/2 processes serving") for line in ready), ready
        for slot in (0, 1):  # both were listening before READY=1
            await s.wait_log(rf"\[p{slot}\]: listening on ws://", limit_s=1)
        for _ in range(2):
            await notify.expect("WATCHDOG=1", 5)
        stalled = s.children()[1]
        os.kill(stalled, signal.SIGSTOP)
        try:
            await s.wait_log(r"stopped reporting or lost their model worker: withholding watchdog pings")
            notify.drain()
            await asyncio.sleep(1.5)  # three ping intervals
            assert not any("WATCHDOG=1" in lines for lines in notify.drain())
        finally:
            os.kill(stalled, signal.SIGCONT)
        await notify.expect("WATCHDOG=1", 10)
        s.signal(signal.SIGHUP)
        await notify.expect("RELOADING=1", 10)
        await notify.expect("READY=1", 30)
        s.signal(signal.SIGTERM)
        await notify.expect("STOPPING=1", 10)
        assert await s.wait() == 0
        assert notify.senders == {s.proc.pid}
    finally:
        notify.close()


async def test_a_process_that_reads_nothing_costs_the_supervisor_bounded_memory(tmp_path, monkeypatch):
    """Events relayed to a process that stopped reading (a viewer's name) are dropped past a bound, and counted;
    the supervisor's buffer toward it stays at the bound."""
    from streamer.aio.processes import cluster
    from streamer.events import Partial

    monkeypatch.setattr(cluster, "EVENT_BUFFER_LIMIT", 1 << 16)
    service = cluster.ClusterService(str(tmp_path / "c.sock"))
    await service.start()
    try:
        speaker = await cluster.ClusterLink.connect(service.path, 0)
        reader, writer = await asyncio.open_unix_connection(service.path)  # a process that never reads again
        writer.write(b'{"op":"hello","slot":1,"pid":1}\n{"op":"watch","name":"hall","on":true}\n')
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            while "hall" not in speaker.watched:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        stuck = next(m for m in service.members if m.slot == 1)
        for i in range(20_000):
            speaker.publish("hall", "s1", Partial(i, "turn on the kitchen lights " * 4, 0.0, 1.0))
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the supervisor read
        await speaker.close()
        async with asyncio.timeout(TIMEOUT):
            while service.count("stream") or any(m.slot == 0 for m in service.members):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert stuck.drops.dropped > 0
        assert stuck.writer.transport.get_write_buffer_size() <= (1 << 16) + 1000
        writer.close()
    finally:
        await service.stop()


# --- capture sources ----------------------------------------------------------------------------------------


async def test_a_capture_source_runs_in_one_process_and_reaches_viewers_on_both(served, tmp_path, speech, expected):
    """A [[sources]] microphone (an ALSA device reading a FIFO, as in test_mic) is captured by the first process
    only; viewers of it on either process receive its finals; its name is refused to clients on both."""
    import ctypes.util

    from test_mic import ALSA_CONF, LiveMic, alsa_env

    if not ALSA_CONF.is_file() or ctypes.util.find_library("portaudio") is None:
        pytest.skip("needs ALSA and PortAudio (libasound2, libportaudio2)")
    config = tmp_path / "streamer.toml"
    config.write_text('[[sources]]\nname = "room"\nkind = "mic"\ndevice = "roommic"\nchannels = 1\n')
    env = alsa_env(tmp_path, {"roommic": (tmp_path / "room.raw", 16000, 1)})
    s = await served(config=config, env={"ALSA_CONFIG_PATH": env["ALSA_CONFIG_PATH"]})
    viewers: dict[int, ClientConnection] = {}
    for _ in range(TRIES):
        ws = await connect(f"ws://127.0.0.1:{s.port}/v1/listen/room")
        pid = json.loads(await ws.recv())["server_pid"]
        if pid in viewers:
            await ws.close()
        else:
            viewers[pid] = ws
        if len(viewers) == 2:
            break
    assert len(viewers) == 2
    refused_on = set()
    for _ in range(TRIES):
        rival = await open_client(s.port, {"type": "start", "name": "room"})
        messages = await rival.closed()
        assert messages[-1].get("code") == "name_in_use" and "capture source" in messages[-1]["message"]
        refused_on.add(rival.pid)
        if len(refused_on) == 2:
            break
    assert len(refused_on) == 2

    await s.wait_log(r"\[p0\]: source room: no input device matches 'roommic'")  # retrying with backoff
    live = LiveMic(tmp_path / "room.raw")  # plugged in: a later attempt finds it
    try:
        live.say(pcm16(speech))
        live.keep_quiet()
        for ws in viewers.values():
            finals: list[dict] = []
            async with asyncio.timeout(START_TIMEOUT):
                while len(finals) < len(expected):
                    event = json.loads(await ws.recv())
                    if event["type"] == "final" and event["text"]:
                        finals.append(event)
            assert texts(finals) == texts(expected)
        assert not [line for line in s.lines if "[p1]" in line and "source room" in line]
        assert any("[p0]" in line and "source room: capturing" in line for line in s.lines)
        s.signal(signal.SIGTERM)
        assert await s.wait() == 0
    finally:
        live.close()
        for ws in viewers.values():
            await ws.close()


async def test_a_process_that_cannot_start_stops_the_daemon_with_its_error():
    """Before the daemon first served, a process that fails (here: the port is taken) is not restarted in a loop:
    the supervisor stops and exits 1, and the process's error says what to fix."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "serve", "--model", "demo", "--device", "cpu", "--processes", "2",
            "--port", str(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        async with asyncio.timeout(START_TIMEOUT):
            _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 1, text
    assert f"cannot listen on 127.0.0.1:{port}" in text and "choose another with server.port" in text
    assert "before the daemon served; stopping" in text
    started = re.findall(r"started front-end process (\d)", text)
    assert sorted(started) == ["0", "1"]  # both at once (the port is set), neither restarted


async def test_a_hung_process_is_killed_and_replaced(served, speech, expected):
    """A front-end process whose event loop stops (SIGSTOP, as a stuck loop would) misses its heartbeats: the
    supervisor kills it after HUNG_AFTER_S and starts another in its place, which serves; the other process's
    stream goes on to its finals. Before, the hung process stayed, kept taking connections and nothing replaced
    it."""
    from streamer.aio.processes.supervisor import HUNG_AFTER_S

    s = await served()
    audio = pcm16(speech)
    victim = s.children()[1]
    mark = len(s.lines)
    os.kill(victim, signal.SIGSTOP)
    try:
        await s.wait_log(rf"front-end process 1 \(pid {victim}\) missed its heartbeats", since=mark,
                         limit_s=HUNG_AFTER_S + TIMEOUT)
        await s.wait_log(rf"front-end process 1 \(pid {victim}\) killed by SIGKILL", since=mark)
        await s.wait_log(r"started front-end process 1 \(pid \d+\)", since=mark)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    await s.until_health(lambda h: h["processes"]["serving"] == 2, START_TIMEOUT)
    assert s.children()[1] != victim
    clients = await spread(s.port, 1)
    assert victim not in {c.pid for c in clients}
    await served_to_the_end(s, clients, audio, expected)


def _has_pytriton(python: str) -> bool:
    return subprocess.run([python, "-c", "import pytriton"], capture_output=True, timeout=120).returncode == 0


async def test_a_model_server_that_dies_is_started_again(served, speech, expected):
    """``streamer serve`` with ``model_server.kind = "triton"`` and no url starts its own model server; SIGKILL of the
    server's process group: serve starts it again on the same port (with backoff), /healthz says the model server
    is up again, and both front-end processes serve new streams to transcribe's finals. A stream live across the
    restart (half its audio before the kill, the rest while the server is down) gets the same finals: its windows
    wait for the server (``model_server.retry_s``). Before, it stayed dead: /healthz 503 for good and every new
    stream 1011."""
    python = os.environ.get("STREAMER_TRITON_PYTHON") or sys.executable
    if not _has_pytriton(python):
        pytest.skip(f"{python} has no PyTriton: set STREAMER_TRITON_PYTHON (.ci/run makes .venv-triton)")
    pytest.importorskip("tritonclient.grpc.aio", reason="needs pip install 'streamer[triton]'")
    s = await served("model_server.kind='triton'", f"model_server.python='{python}'", "model_server.http_port=0",
                     "model_server.metrics_port=0")
    victim = int((await s.wait_log(r"model server ready at \S+ \(pid (\d+)\)", limit_s=1)).group(1))
    await s.until_health(lambda h: h.get("model_server") == "up", START_TIMEOUT)
    audio = pcm16(speech)
    live = await spread(s.port, 1)
    half = await mid_stream(live, audio)
    mark = len(s.lines)
    os.killpg(victim, signal.SIGKILL)
    await s.wait_log(rf"the model server \(pid {victim}\) killed by SIGKILL; restarting it", since=mark)
    for c in live:  # while the server is down: held, not lost
        await c.send(audio[half:])
    again = int((await s.wait_log(r"model server ready at \S+ \(pid (\d+)\)", since=mark,
                                  limit_s=START_TIMEOUT)).group(1))
    assert again != victim
    for c in live:
        assert texts(finals_of(await c.finish())) == texts(expected)
    await s.until_health(lambda h: h.get("model_server") == "up" and h["status"] == "ok", START_TIMEOUT)
    await served_to_the_end(s, await spread(s.port, 1), audio, expected)
