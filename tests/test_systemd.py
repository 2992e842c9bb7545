"""Running under systemd: the units pass systemd's own checks, and the daemon speaks sd_notify.

The units are checked by ``systemd-analyze verify`` and ``systemd-analyze security --offline``
against a scratch root file system that holds what they name (the venv's ``streamer`` script, kill,
systemd's own units), so the shipped files are checked unchanged. The notify protocol is checked end
to end: the test plays systemd's part, binding the datagram socket named in ``NOTIFY_SOCKET`` and
sending SIGHUP and SIGTERM to a real ``streamer serve`` process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import pcm16
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.aio.processes.systemd import Notifier, Reloader, split_changes
from streamer.config import load_config
from streamer.exceptions import ConfigError

TIMEOUT = 60
UNITS = Path(__file__).resolve().parent.parent / "systemd"
MAX_EXPOSURE = 2.0


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is not installed; `apt-get install systemd` (.ci/run does it)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory):
    """A root file system for ``systemd-analyze --root``: the units as shipped and what they refer to.

    ``streamer@room`` is the template as is; ``streamer@gpu`` has the drop-ins (GPU, microphone, Wyoming).
    """
    root = tmp_path_factory.mktemp("root")
    for d in ("usr/bin", "usr/lib/systemd", "opt/streamer/bin", "etc/systemd/system/streamer@gpu.service.d"):
        (root / d).mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    system_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "usr/bin/kill")
    script = Path(sys.executable).with_name("streamer")
    if not script.is_file():
        pytest.fail(f"no `streamer` script next to {sys.executable}; `pip install -e .` installs it")
    shutil.copy2(script, root / "opt/streamer/bin/streamer")  # the script pip puts in /opt/streamer/bin
    for unit in ("streamer.service", "streamer@.service"):
        shutil.copy2(UNITS / unit, root / "etc/systemd/system" / unit)
    for dropin in ("gpu.conf", "microphone.conf", "wyoming.conf"):
        shutil.copy2(UNITS / dropin, root / "etc/systemd/system/streamer@gpu.service.d" / dropin)
    return root


UNIT_NAMES = ["streamer.service", "streamer@room.service", "streamer@gpu.service"]


def test_systemd_analyze_verify_accepts_the_units(unit_root):
    result = systemd_analyze("verify", f"--root={unit_root}", *UNIT_NAMES)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # ... and it does report mistakes: the same check on a unit with a misspelt key.
    broken = unit_root / "etc/systemd/system/broken.service"
    broken.write_text((UNITS / "streamer.service").read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = systemd_analyze("verify", f"--root={unit_root}", "broken.service")
    assert "Unknown key 'WatchdogSecs'" in result.stderr
    broken.unlink()


@pytest.mark.parametrize("unit", UNIT_NAMES)
def test_security_exposure_at_most_2(unit_root, unit):
    result = systemd_analyze("security", "--offline=true", f"--root={unit_root}", unit)
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file; a key set twice keeps both values."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and line[0] not in "#;[" and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", ["streamer.service", "streamer@.service"])
def test_units_are_notify_with_watchdog_reload_and_hardening(unit):
    s = unit_settings(UNITS / unit)
    config = "/etc/streamer/%i.toml" if "@" in unit else "/etc/streamer/streamer.toml"
    assert s["ExecStart"] == [f"/opt/streamer/bin/streamer serve -c {config}"]
    expected = {"Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["30"], "Restart": ["on-failure"],
                "ExecReload": ["/bin/kill -HUP $MAINPID"], "CacheDirectory": ["streamer"],
                "DynamicUser": ["yes"], "ProtectSystem": ["strict"], "ProtectHome": ["yes"],
                "PrivateTmp": ["yes"], "PrivateDevices": ["yes"], "NoNewPrivileges": ["yes"],
                "CapabilityBoundingSet": [""], "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"]}
    assert {k: s.get(k) for k in expected} == expected
    assert s["SystemCallFilter"][0] == "@system-service"
    assert "HF_HOME=%C/streamer" in s["Environment"][0].split()
    defaults = load_config()
    assert int(s["TimeoutStopSec"][0]) > defaults.server.shutdown_timeout_s + defaults.mqtt.flush_timeout_s


# --- sd_notify, in process ---------------------------------------------------------------------


def test_notifier_is_inert_without_notify_socket():
    n = Notifier.from_environ({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.notify("READY=1") is False
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"}).enabled


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(env).watchdog_interval == 15.0
    assert Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier.from_environ({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


def test_notify_to_a_socket_path(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(5)
        assert Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")}).notify("READY=1", "STATUS=x")
        assert sock.recv(4096) == b"READY=1\nSTATUS=x"


def test_notify_failure_is_a_warning_not_an_error(tmp_path, caplog):
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.notify("WATCHDOG=1") is False and n.notify("WATCHDOG=1") is False
    assert [r.levelname for r in caplog.records if r.name == "streamer.systemd"] == ["WARNING"]


class NotifySocket:
    """systemd's side of the notify protocol: an abstract unix datagram socket that collects messages."""

    def __init__(self) -> None:
        self.name = f"@streamer-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.seen: list[list[str]] = []

    async def expect(self, field: str, within: float = TIMEOUT) -> list[str]:
        """Wait up to ``within`` seconds for the next message with a line starting with ``field``."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            while True:
                lines = (await loop.sock_recv(self.sock, 4096)).decode().split("\n")
                self.seen.append(lines)
                if any(line.startswith(field) for line in lines):
                    return lines

    def drain(self) -> list[list[str]]:
        got = []
        while True:
            try:
                got.append(self.sock.recv(4096).decode().split("\n"))
            except BlockingIOError:
                return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket():
    s = NotifySocket()
    yield s
    s.close()


def count(messages: list[list[str]], field: str) -> int:
    return sum(field in lines for lines in messages)


async def test_watchdog_pings_come_from_the_event_loop(daemon_factory, notify_socket):
    d = await daemon_factory()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": "100000"})
    notifier.start(d)
    ready = await notify_socket.expect("READY=1", 5)
    assert any(line.startswith("STATUS=0 stream(s), RTF") for line in ready)
    await asyncio.sleep(0.3)
    assert count(notify_socket.drain(), "WATCHDOG=1") >= 2
    time.sleep(0.4)  # noqa: ASYNC251 -- a stalled event loop, on purpose
    assert count(notify_socket.drain(), "WATCHDOG=1") == 0
    await notify_socket.expect("WATCHDOG=1", 5)
    await d.worker.stop()  # a dead model worker withholds the pings too
    notify_socket.drain()
    await asyncio.sleep(0.3)
    assert count(notify_socket.drain(), "WATCHDOG=1") == 0
    await d.shutdown()
    await notify_socket.expect("STOPPING=1", 5)


# --- reload, in process ------------------------------------------------------------------------


def test_split_changes_keeps_what_needs_a_restart():
    old = load_config(None, ["server.port=8765"])
    new = load_config(None, ["server.port=9000", "server.max_streams=2", "stream.hop_ms=200", "model.id=other",
                             "logging.level='debug'", "endpoint.silence_after_speech_s=0.9",
                             "vosk.sample_rate=16000", "vosk.enabled=true", "mqtt.enabled=true"])
    run, live, restart = split_changes(old, new)
    assert sorted(live) == ["endpoint.silence_after_speech_s", "logging.level", "server.max_streams",
                            "vosk.sample_rate"]
    assert sorted(restart) == ["model.id", "mqtt.enabled", "server.port", "stream.hop_ms", "vosk.enabled"]
    assert (run.server.max_streams, run.logging.level, run.endpoint.silence_after_speech_s) == (2, "debug", 0.9)
    assert (run.server.port, run.stream, run.model, run.vosk.enabled) == (8765, old.stream, old.model, False)
    assert run.vosk.sample_rate == 16000
    assert split_changes(old, old) == (old, [], [])


async def test_reload_applies_limits_token_and_origins_to_new_connections(daemon_factory, notify_socket):
    d = await daemon_factory()
    configs = iter([load_config(None, ["server.port=0", "server.host='127.0.0.1'", "server.max_message_bytes=2048",
                                       "server.auth_token='s3cret'", "server.allowed_origins=['https://a.test']",
                                       "mqtt.topic_prefix='rooms'"]),
                    ConfigError("server.max_streams = 0 is too small; the minimum is 1")])

    def load():
        cfg = next(configs)
        if isinstance(cfg, Exception):
            raise cfg
        return cfg

    seen = []

    async def mqtt_hook(cfg):
        seen.append(cfg.mqtt.topic_prefix)

    d.on_reload.append(mqtt_hook)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket.name})
    reloader = Reloader(d, load, notifier)
    await reloader.request()
    assert [lines[0] for lines in notify_socket.drain()] == ["RELOADING=1", "READY=1"]
    assert seen == ["streamer"]  # [mqtt] needs a restart: the hooks see the running value
    url = f"ws://127.0.0.1:{d.port}/v1/stream"
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(InvalidStatus) as exc:
            await connect(url, origin="https://a.test")
        assert exc.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as exc:
            await connect(url + "?token=s3cret", origin="https://b.test")
        assert exc.value.response.status_code == 403
        async with connect(url + "?token=s3cret", origin="https://a.test", max_size=None) as ws:
            await ws.recv()
            await ws.send(b"\0" * 4096)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1009
    await reloader.request()  # a bad config: logged, the running one kept
    assert d.cfg.server.max_message_bytes == 2048 and seen == ["streamer"]


async def test_reload_reads_the_word_list_again_for_new_streams(daemon_factory, tmp_path, speech):
    """`systemctl reload` re-reads [decoder] words, also when only the file changed; a bad list keeps the old."""
    from test_server import finals_of, native_session

    words = tmp_path / "words.txt"
    words.write_text("turn\non\nthe\nlights\n")
    d = await daemon_factory(f"decoder.words='{words}'")
    before = await native_session(d.port, pcm16(speech))
    said = {w["word"] for f in finals_of(before[0]) for w in f["words"]}
    assert said and said <= {"turn", "on", "the", "lights"}

    words.write_text("set\na\ntimer\nfor\ntwenty\nminutes\n")
    reloader = Reloader(d, lambda: load_config(None, ["server.port=0", "server.host='127.0.0.1'",
                                                       f"decoder.words='{words}'"]), Notifier.from_environ({}))
    await reloader.request()
    after = await native_session(d.port, pcm16(speech))
    said = {w["word"] for f in finals_of(after[0]) for w in f["words"]}
    assert {"timer", "twenty", "minutes"} <= said <= {"set", "a", "timer", "for", "twenty", "minutes"}

    words.write_text("café\n")  # the model has no 'é': the reload fails and the running list stays
    await reloader.request()
    assert d.words.words == ["set", "a", "timer", "for", "twenty", "minutes"]


# --- end to end: `streamer serve` under a stand-in for systemd ---------------------------------


@asynccontextmanager
async def serve_process(tmp_path, model_dir, notify, *args, watchdog_usec=200_000):
    """Start ``python -m streamer serve`` with NOTIFY_SOCKET/WATCHDOG_USEC; kill it if the test left it."""
    env = {**os.environ, "NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": str(watchdog_usec)}
    log = tmp_path / "stderr.log"
    err = await asyncio.to_thread(open, log, "wb")
    with err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "serve", "--model", str(model_dir), "--port", "0", *args,
            stderr=err, env=env)
    try:
        yield proc, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def port_of(ready: list[str]) -> int:
    status = next(line for line in ready if line.startswith("STATUS="))
    return int(re.search(r"ws://[^:]+:(\d+)", status).group(1))


async def test_notify_ready_after_model_then_watchdog_then_stopping(tmp_path, tiny_models, notify_socket):
    model = tiny_models["layer-padfirst"]
    async with serve_process(tmp_path, model, notify_socket) as (proc, log):
        first = await notify_socket.expect("STATUS=", TIMEOUT)
        assert first == [f"STATUS=loading model {model}"]
        ready = await notify_socket.expect("READY=1", TIMEOUT)
        assert len(notify_socket.seen) == 2  # nothing between "loading" and READY
        text = log.read_text()
        assert "loaded in" in text and "listening on" in text  # logged before READY=1 was sent
        port = port_of(ready)
        health = await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert json.loads(health.read())["status"] == "ok"
        for _ in range(3):
            await notify_socket.expect("WATCHDOG=1", 5)
        proc.send_signal(signal.SIGTERM)
        await notify_socket.expect("STOPPING=1", 10)
        async with asyncio.timeout(TIMEOUT):
            assert await proc.wait() == 0


async def test_sighup_reloads_a_limit_without_dropping_a_live_stream(tmp_path, tiny_models, notify_socket, speech):
    config = tmp_path / "streamer.toml"
    config.write_text("[server]\nmax_streams = 2\n[endpoint]\nenabled = false\n")
    audio = pcm16(speech)
    async with serve_process(tmp_path, tiny_models["layer-padfirst"], notify_socket, "-c", str(config)) as (proc, log):
        port = port_of(await notify_socket.expect("READY=1", TIMEOUT))
        url = f"ws://127.0.0.1:{port}/v1/stream"
        async with asyncio.timeout(TIMEOUT), connect(url) as live:
            assert json.loads(await live.recv())["type"] == "ready"
            await live.send(audio[: 2 * 32000])
            while json.loads(await live.recv())["type"] != "partial":
                pass
            async with connect(url) as second:  # max_streams = 2: a second stream is welcome
                assert json.loads(await second.recv())["type"] == "ready"

            config.write_text("[server]\nmax_streams = 1\n[stream]\nhop_ms = 200\n[endpoint]\nenabled = false\n")
            proc.send_signal(signal.SIGHUP)
            await notify_socket.expect("RELOADING=1", 10)
            await notify_socket.expect("READY=1", 10)

            async with connect(url) as refused:  # the new limit holds for new connections
                busy = json.loads(await refused.recv())
                with pytest.raises(ConnectionClosed):
                    await refused.recv()
            assert busy["code"] == "busy" and refused.close_code == 1013

            await live.send(audio[2 * 32000 :])  # the live stream goes on, and ends normally
            await live.send(json.dumps({"type": "stop"}))
            after = [json.loads(m) async for m in live]
        assert live.close_code == 1000
        assert {m["type"] for m in after} >= {"partial", "final", "end"} and after[-1]["type"] == "end"

        config.write_text("[server]\nmax_streams = 0\n")  # invalid: logged, the running config kept
        proc.send_signal(signal.SIGHUP)
        await notify_socket.expect("READY=1", 10)
        async with asyncio.timeout(TIMEOUT), connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            assert await proc.wait() == 0
    text = log.read_text()
    assert "reload: applied server.max_streams" in text
    assert "needs a restart" in text and "stream.hop_ms = 200 (running 400)" in text
    assert "server.max_streams = 0 is too small" in text and "keeping the running config" in text


async def test_sighup_keeps_the_command_line_options(tmp_path, tiny_models, notify_socket):
    """A reload re-reads the file with the same command line: `--words none` stays greedy decoding (it once
    came back as decoder.words = "auto", and new streams silently switched to the checkpoint's word list)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["layer-padfirst"], model)
    (model / "words.txt").write_text("on\noff\n")  # what "auto" would pick up
    config = tmp_path / "streamer.toml"
    config.write_text("[server]\nmax_streams = 3\n")
    async with serve_process(tmp_path, model, notify_socket, "-c", str(config), "--words", "none",
                             "--host", "127.0.0.1") as (proc, log):
        await notify_socket.expect("READY=1", TIMEOUT)
        proc.send_signal(signal.SIGHUP)
        await notify_socket.expect("RELOADING=1", 10)
        await notify_socket.expect("READY=1", 10)
        config.write_text("[server]\nmax_streams = 2\n")
        proc.send_signal(signal.SIGHUP)
        await notify_socket.expect("RELOADING=1", 10)
        await notify_socket.expect("READY=1", 10)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            assert await proc.wait() == 0
    text = log.read_text()
    assert "reload: config unchanged" in text  # the first reload: nothing changed, --words and --host included
    assert "reload: applied server.max_streams" in text and "decoder.words" not in text
    assert "word list" not in text  # never decoded with words.txt


@pytest.mark.parametrize("unit", ["streamer.service", "streamer@.service"])
def test_units_give_descriptors_for_every_stream_and_viewer_with_headroom(unit):
    """Each stream and viewer holds a descriptor; the units' LimitNOFILE fits the default limits four times."""
    from streamer.aio.http.limits import descriptors_needed

    s = unit_settings(UNITS / unit)
    assert "LimitNOFILE" in s, f"{unit} sets no LimitNOFILE (systemd's default soft limit is 1024)"
    assert int(s["LimitNOFILE"][0]) >= 4 * descriptors_needed(load_config().server)
