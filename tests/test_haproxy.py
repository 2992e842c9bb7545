"""Two daemons behind a real HAProxy (deploy/haproxy.cfg) on loopback: spreading, readiness, draining, rolling restarts.

The daemons are ``streamer serve`` subprocesses with the demo model; HAProxy runs the shipped config (its
``maxconn`` too, under a descriptor hard limit of 20,000) with its ``bind`` and ``server`` addresses replaced by
loopback ports. A rolling restart (SIGTERM one daemon, start it again, then the other) cuts no stream: a draining
daemon's live streams go on through HAProxy to their clients' stop with the finals ``streamer transcribe`` makes,
while new connections land on the other. A stream still live when ``server.drain_timeout_s`` passes gets its finals,
``end`` and 1001 through HAProxy. An upload whose answer takes longer than the websockets' server timeout passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
from conftest import pcm16
from test_processes import as_float
from test_server import reference_finals
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients"))
from loadtest import free_port, haproxy_config  # noqa: E402  (the same rewrite of the shipped config)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "haproxy.cfg"
TIMEOUT = 90
HARD_NOFILE = 20_000
"""the descriptor hard limit HAProxy runs under here: the shipped maxconn must fit it"""


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start a process (its stderr piped as text); the tests wait for it in threads."""
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, **kwargs)


def hard_nofile_limit() -> None:
    """In HAProxy's process before it runs: a descriptor hard limit of :data:`HARD_NOFILE` (a machine where the
    shipped maxconn would not fit refuses to start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > HARD_NOFILE:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, HARD_NOFILE), HARD_NOFILE))


@dataclass
class Daemon:
    proc: subprocess.Popen
    overrides: tuple[str, ...] = ()
    port: int = 0
    vosk_port: int = 0
    log: list[str] = field(default_factory=list)

    def metric(self, name: str) -> float:
        """A sample of the daemon's /metrics, read on its own port (not through HAProxy)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def health(self, path: str = "/healthz") -> int:
        """HTTP status of its /healthz (or ``path``), or 0 when nothing answers (it stopped listening)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def streams_total(self) -> float:
        return self.metric('streamer_streams_total{protocol="native"}')


async def start_daemon(*overrides: str, port: int = 0, vosk_port: int = 0) -> Daemon:
    cmd = [sys.executable, "-m", "streamer", "serve", "--model", "demo", "--host", "127.0.0.1", "--port", str(port),
           "--set", "vosk.enabled=true", "--set", f"vosk.port={vosk_port}", "--set", "server.shutdown_timeout_s=30",
           "--set", "model.threads=1", *(a for o in overrides for a in ("--set", o))]
    proc = spawn(cmd, cwd=ROOT)
    d = Daemon(proc, overrides)
    assert proc.stderr is not None
    while True:
        line = await asyncio.to_thread(proc.stderr.readline)
        d.log.append(line)
        if not line:
            pytest.fail("the daemon exited before listening:\n" + "".join(d.log[-20:]))
        if line.startswith("streamer: listening on "):
            ports = [int(p) for p in re.findall(r"://127\.0\.0\.1:(\d+)", line)]
            d.port, d.vosk_port = ports[0], ports[1]
            break

    def drain() -> None:  # keep reading its log, so that it never blocks on a full pipe
        assert proc.stderr is not None
        for line in proc.stderr:
            d.log.append(line)

    asyncio.get_running_loop().run_in_executor(None, drain)
    return d


def stats(port: int) -> dict[str, str]:
    """HAProxy's state of each server of the native backend (``UP``, ``DOWN``, ...), from its stats CSV."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/;csv", timeout=5) as r:
            rows = r.read().decode().splitlines()
    except OSError:  # not listening yet
        return {}
    head = rows[0].lstrip("# ").split(",")
    out = {}
    for row in rows[1:]:
        cells = dict(zip(head, row.split(","), strict=False))
        if cells.get("pxname") == "daemons" and cells.get("svname", "").startswith("daemon"):
            out[cells["svname"]] = cells["status"]
    return out


async def wait_for(check, what: str, tries: int = 120, pause: float = 0.25):
    """Poll ``check()`` (in a thread) until it is true; a bounded number of times."""
    for _ in range(tries):
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(pause)
    pytest.fail(f"gave up waiting for {what}")


class Client:
    """A native stream through HAProxy: ``ready`` read at open, every later message kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[dict] = []
        self.code: int | None = None
        self.ready: dict = {}
        self._reader: asyncio.Task | None = None

    async def open(self) -> Client:
        self.ws = await connect(self.url, max_size=None)
        self.ready = json.loads(await self.ws.recv())
        assert self.ready["type"] == "ready"
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                self.messages.append(json.loads(msg))
        except ConnectionClosed:
            pass
        self.code = self.ws.close_code

    async def send(self, pcm: bytes, chunk: int = 6400) -> None:
        for i in range(0, len(pcm), chunk):
            await self.ws.send(pcm[i : i + chunk])

    async def stop(self) -> None:
        try:
            await self.ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass

    async def closed(self) -> int | None:
        assert self._reader is not None
        await self._reader
        return self.code

    @property
    def finals(self) -> list[str]:
        return [m["text"] for m in self.messages if m["type"] == "final" and m["text"]]

    @property
    def text(self) -> str:
        return " ".join(self.finals)


@dataclass
class Cluster:
    """Daemons behind a running HAProxy."""

    daemons: list[Daemon]
    url: str
    stats_port: int
    vosk_url: str
    upload_url: str
    started: list[Daemon]
    """every daemon process started, restarted ones too (the fixture stops them all)"""

    def states(self) -> dict[str, str]:
        return stats(self.stats_port)

    async def restart(self, i: int) -> None:
        """Daemon ``i`` started again on its ports (as systemd would after a rolling update's stop)."""
        d = self.daemons[i]
        self.daemons[i] = await start_daemon(*d.overrides, port=d.port, vosk_port=d.vosk_port)
        self.started.append(self.daemons[i])


@pytest.fixture
async def cluster():
    """``await cluster(*overrides)``: two daemons (each with the overrides) behind HAProxy, both UP."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.fail("haproxy is not installed; `apt-get install haproxy` (.ci/run does it)")
    started: list[Daemon] = []
    balancers: list[tuple[subprocess.Popen, Path, io.TextIOBase]] = []

    async def make(*overrides: str) -> Cluster:
        daemons = list(await asyncio.gather(start_daemon(*overrides), start_daemon(*overrides)))
        started.extend(daemons)
        listen, vosk, stats_port = free_port(), free_port(), free_port()
        cfg = haproxy_config(CONFIG.read_text(), listen=listen, vosk=vosk, stats=stats_port,
                             daemons=[(d.port, d.vosk_port) for d in daemons])
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"streamer-haproxy-{os.getpid()}-{listen}.cfg"
        path.write_text(cfg)
        check = await asyncio.to_thread(subprocess.run, [haproxy, "-c", "-f", str(path)], capture_output=True,
                                        text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        log = path.with_suffix(".log").open("w")  # HAProxy logs each connection to stdout: kept for a failing test
        lb = spawn([haproxy, "-db", "-f", str(path)], stdout=log, preexec_fn=hard_nofile_limit)
        balancers.append((lb, path, log))
        await wait_for(lambda: stats(stats_port) == {"daemon1": "UP", "daemon2": "UP"} if lb.poll() is None
                       else pytest.fail(f"haproxy exited: {lb.stderr.read() if lb.stderr else ''}"),
                       "both daemons up in HAProxy")
        return Cluster(daemons, f"ws://127.0.0.1:{listen}/v1/stream", stats_port, f"ws://127.0.0.1:{vosk}/",
                       f"http://127.0.0.1:{listen}/v1", started)

    try:
        yield make
    finally:
        for lb, _, _ in balancers:
            lb.terminate()
        for d in started:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
                d.proc.send_signal(signal.SIGTERM)  # the second: no drain
        for p in (*(lb for lb, _, _ in balancers), *(d.proc for d in started)):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for _, path, log in balancers:
            log.close()
            path.unlink(missing_ok=True)
            path.with_suffix(".log").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def expected(model_runner, speech) -> list[str]:
    """The texts of what ``streamer transcribe`` makes of the test speech."""
    return [f["text"] for f in reference_finals(model_runner, as_float(pcm16(speech))) if f["text"]]


async def on_each(c: Cluster, per_daemon: int) -> list[Client]:
    """Open clients through HAProxy until each daemon has ``per_daemon`` more (leastconn spreads them)."""
    before = [await asyncio.to_thread(d.streams_total) for d in c.daemons]
    clients = []
    while True:
        clients.append(await Client(c.url).open())
        got = [await asyncio.to_thread(d.streams_total) for d in c.daemons]
        if all(g - b >= per_daemon for g, b in zip(got, before, strict=True)):
            return clients
        assert len(clients) < 4 * per_daemon * len(c.daemons), (before, got)


async def drain_one(c: Cluster, i: int, live: list[Client], pcm: bytes, half: int, expected: list[str]) -> int:
    """SIGTERM daemon ``i`` while ``live`` streams are open on both: new connections land on the other; every live
    stream, on the draining daemon too, goes on to its client's stop with transcribe's finals; the drained daemon
    exits 0 and HAProxy marks it down. The number of streams that were live on it."""
    d, other = c.daemons[i], c.daemons[1 - i]
    on_d = await asyncio.to_thread(d.metric, 'streamer_streams_active{protocol="native"}')
    assert on_d >= 1
    d.proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: d.health("/readyz") == 503, "the draining daemon's /readyz to say 503")
    assert d.health("/livez") == 200  # alive: only not ready
    before = await asyncio.to_thread(other.streams_total)
    late = [await Client(c.url).open() for _ in range(3)]  # wherever HAProxy's checks are, none lands on d
    assert await asyncio.to_thread(other.streams_total) == before + 3
    for client in live:
        await client.send(pcm[half:])
        await client.stop()
    await asyncio.gather(*(client.send(pcm) for client in late))
    for client in late:
        await client.stop()
    for client in live + late:
        assert await client.closed() == 1000
        assert client.messages[-1]["type"] == "end" and client.finals == expected
    assert await asyncio.to_thread(d.proc.wait, TIMEOUT) == 0
    await wait_for(lambda: c.states().get(f"daemon{i + 1}", "").startswith("DOWN"), "HAProxy to mark it down")
    return int(on_d)


async def test_a_rolling_restart_behind_haproxy_cuts_no_stream(cluster, speech, expected):
    """Streams live on both daemons; SIGTERM one: its streams finish whole, new ones go to the other; start it
    again; the same for the other. 0 streams cut, 0 finals lost, every stream closed normally after its stop."""
    c = await cluster("server.drain_timeout_s=120")
    pcm = pcm16(speech)
    half = len(pcm) // 4 * 2
    drained = 0
    async with asyncio.timeout(TIMEOUT * 6):
        for i in (0, 1):
            live = await on_each(c, 1)
            await asyncio.gather(*(client.send(pcm[:half]) for client in live))
            drained += await drain_one(c, i, live, pcm, half, expected)
            await c.restart(i)
            await wait_for(lambda i=i: c.states().get(f"daemon{i + 1}") == "UP", "HAProxy to mark it up again")
    assert drained >= 2


async def test_streams_live_at_the_drain_timeout_get_finals_end_and_1001_through_haproxy(cluster, speech):
    c = await cluster("server.drain_timeout_s=3")
    a, b = c.daemons
    pcm = pcm16(speech)
    half = len(pcm) // 4 * 2
    async with asyncio.timeout(TIMEOUT * 3):
        # -- spreading: four streams, one after the other; leastconn gives each daemon some
        clients = [await Client(c.url).open() for _ in range(4)]
        counts = [d.metric('streamer_streams_active{protocol="native"}') for d in c.daemons]
        assert counts[0] >= 1 and counts[1] >= 1 and sum(counts) == 4, counts
        await asyncio.gather(*(client.send(pcm[:half]) for client in clients))
        on_a = int(counts[0])
        # a Vosk client goes through HAProxy's second frontend to a daemon's Vosk port
        async with connect(c.vosk_url) as vosk:
            await vosk.send(json.dumps({"config": {"sample_rate": 16000}}))
            await vosk.send(pcm[:half])
            await vosk.send('{"eof": 1}')
            replies = [json.loads(m) async for m in vosk]
        assert "kitchen" in " ".join(r.get("text", "") for r in replies)

        # -- SIGTERM to daemon A: it takes nothing new, and new connections go to B ...
        before_b = b.streams_total()
        a.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: a.health() != 200, "daemon A to stop answering its health check with 200")
        late = [await Client(c.url).open() for _ in range(3)]
        assert b.streams_total() == before_b + 3
        await asyncio.gather(*(client.send(pcm) for client in late))
        for client in late:
            await client.stop()

        # ... A's streams, which never stop, get their finals, end and 1001 once the drain's 3 s passed; B's go on
        assert await asyncio.to_thread(a.proc.wait, TIMEOUT) == 0
        await wait_for(lambda: sum(client.code == 1001 for client in clients) >= on_a, "A's clients to be closed")
        closed_by_a = [client for client in clients if client.code == 1001]
        assert len(closed_by_a) == on_a
        for client in closed_by_a:
            assert client.messages[-1] == {"type": "end", "session": client.ready["session"],
                                           "reason": "server shutting down"}
            assert "kitchen" in client.text  # the audio it sent before the drain became finals
        on_b = [client for client in clients if client not in closed_by_a]
        assert len(on_b) == 4 - on_a and all(client.code is None for client in on_b)
        for client in on_b:
            await client.send(pcm[half:])
            await client.stop()
        for client in on_b + late:
            assert await client.closed() == 1000
            assert client.messages[-1]["type"] == "end"
            assert "kitchen lights" in client.text and "timer" in client.text

        # HAProxy marks A down by its checks; B stays up
        await wait_for(lambda: c.states().get("daemon1", "").startswith("DOWN"), "HAProxy to mark A down")
        assert c.states()["daemon2"] == "UP"
        assert b.health() == 200
    assert [client.code for client in clients + late].count(1001) == on_a


async def test_an_upload_answered_after_the_websockets_server_timeout_passes(cluster, speech, tmp_path):
    """The upload backend's server timeout fits a long transcription: a file the daemons decode at 1x real time
    (server.max_speed = 1, no burst), 35 s long, is answered after more than the 30 s of the websocket backend."""
    c = await cluster("server.max_speed=1", "server.max_burst_s=0")
    audio = np.concatenate([speech, np.zeros(35 * 16000 - len(speech), dtype=np.float32)])
    wav = io.BytesIO()
    sf.write(wav, audio, 16000, format="WAV", subtype="PCM_16")
    client = openai.AsyncOpenAI(base_url=c.upload_url, api_key="none", max_retries=0, timeout=TIMEOUT * 2)
    t0 = time.monotonic()
    got = await client.audio.transcriptions.create(model="x", file=("long.wav", wav.getvalue()))
    took = time.monotonic() - t0
    print(f"a 35 s upload through HAProxy answered in {took:.1f} s")
    assert took > 30  # the premise: longer than `timeout server 30s`, which cut it before (504)
    assert got.text.startswith("turn on the kitchen lights")


class HeldWords:
    """The daemon's word list, whose first search step once the daemon is stopping waits for ``release``: it keeps
    the daemon draining (a stream's last finals in progress) for as long as the test needs."""

    def __init__(self, words, daemon) -> None:
        self.words, self.daemon = words, daemon
        self.release = threading.Event()

    def search(self, start_frame: int = 0):
        held = self

        class Search:
            def __init__(self) -> None:
                self.inner = held.words.search(start_frame)

            def step(self, rows):
                if held.daemon.stopping.is_set():
                    held.release.wait(TIMEOUT)
                self.inner.step(rows)

            def partial(self, lookahead):
                return self.inner.partial(lookahead)

            def finish(self):
                return self.inner.finish()

        return Search()


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str) -> tuple[int, str]:
    """Send an HTTP request head on an open connection; the status and the whole answer."""
    writer.write(head.encode())
    await writer.drain()
    answer = (await reader.read()).decode("latin-1")
    writer.close()
    return int(answer.split()[1]), answer


async def test_a_draining_daemon_answers_503_to_health_checks_and_new_streams(daemon_factory, demo_words, speech):
    """While a daemon drains (SIGTERM's shutdown, its streams' last finals in progress): its listener is closed (a
    new connection is refused), and on a connection it had accepted just before, /healthz says 503 and a websocket
    upgrade gets 503 with Retry-After (which HAProxy retries on another daemon: retry-on 503)."""
    d = await daemon_factory()
    held = HeldWords(demo_words, d)
    d.streams.words = held
    upgrade = ("GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        await ws.recv()
        await ws.send(pcm16(speech[:16000]))
        before = asyncio.all_tasks()
        early = [await asyncio.open_connection("127.0.0.1", d.port) for _ in range(2)]
        for _ in range(1000):  # the daemon accepted them (not only the kernel): websockets serves each in a task
            if len(asyncio.all_tasks() - before) >= 2:
                break
            await asyncio.sleep(0.01)
        shutdown = asyncio.create_task(d.shutdown())
        await asyncio.sleep(0)  # shutdown() runs up to its first wait: stopping is set, the listener closed
        assert d.stopping.is_set()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", d.port)
        status, answer = await request(*early[0], "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 503 and '"status": "unavailable"' in answer
        status, answer = await request(*early[1], upgrade)
        assert status == 503 and "Retry-After: 1" in answer and "shutting down" in answer
        assert not shutdown.done()  # the stream's last finals are still being made
        held.release.set()
        events = []
        with contextlib.suppress(ConnectionClosed):
            async for msg in ws:
                events.append(json.loads(msg))
        await shutdown
    assert ws.close_code == 1001
    assert events[-1]["type"] == "end" and any(e["type"] == "final" for e in events)
