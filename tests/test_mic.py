"""``streamer mic`` and the daemon's microphone source, through a real PortAudio capture stream.

The "microphones" are ALSA PCMs built from the ``file`` plugin, which reads raw PCM of espeak-ng
speech from its ``infile``, inside a ``plug`` whose slave fixes the device's native format and
rate (PortAudio reports that rate as the device's default). The infile is either a regular file
(read as fast as PortAudio asks, so ``--duration`` ends the capture exactly at the end of the
speech) or a FIFO this test writes into: speech, then silence at about real time, like a live
microphone. ALSA reads its configuration when PortAudio initialises, so every capture runs in a
subprocess whose ``ALSA_CONFIG_PATH`` adds the test's PCMs to the system configuration.

PortAudio sees up to 128 channels on such a plugin device, so the mono devices are opened with
``--channels 1`` (``channels = 1`` in a source): capturing more would make ``plug`` convert, and
the ``file`` plugin then skips parts of its infile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import fcntl
import getpass
import io
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import pcm16
from test_cli import cer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.checkpoint import demo_model_dir
from streamer.cli import main

ALSA_CONF = Path("/usr/share/alsa/alsa.conf")
TIMEOUT = 60
SPOKEN = "turn on the kitchen lights set a timer for twenty minutes"  # conftest's `speech`

pytestmark = [
    pytest.mark.skipif(not ALSA_CONF.is_file(), reason="needs ALSA (Debian: libasound2)"),
    pytest.mark.skipif(ctypes.util.find_library("portaudio") is None, reason="needs PortAudio (libportaudio2)"),
]


def alsa_env(directory: Path, devices: dict[str, tuple[Path, int, int]]) -> dict[str, str]:
    """Environment whose ALSA has a capture PCM ``name`` reading ``(infile, rate, channels)`` for each device."""
    lines = []
    for name, (infile, rate, channels) in devices.items():
        lines.append(
            f'pcm.{name} {{ type plug; slave {{ pcm {{ type file; slave.pcm "null"; file "/dev/null"; '
            f'infile "{infile}"; format "raw" }} format S16_LE; rate {rate}; channels {channels} }} }}'
        )
    conf = directory / "asoundrc"
    conf.write_text("\n".join(lines) + "\n")
    return {**os.environ, "ALSA_CONFIG_PATH": f"{ALSA_CONF}:{conf}", "PYTHONUNBUFFERED": "1"}


class LiveMic:
    """A FIFO an ALSA device reads from, like a live microphone: PortAudio's reads wait for our writes."""

    def __init__(self, path: Path, rate: int = 16000) -> None:
        os.mkfifo(path)
        # Hold both ends, so that neither PortAudio's device scan nor our writes block on open.
        self.fd = os.open(path, os.O_RDWR)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # the speech fits in at once: no short reads
        self.rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._silence, daemon=True)

    def say(self, pcm: bytes) -> None:
        os.write(self.fd, pcm)

    def keep_quiet(self) -> None:
        """From now on write silence at about real time."""
        os.set_blocking(self.fd, False)
        self._thread.start()

    def _silence(self) -> None:
        chunk = bytes(2 * self.rate // 20)
        while not self._stop.wait(0.05):
            with contextlib.suppress(BlockingIOError):
                os.write(self.fd, chunk)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        os.close(self.fd)


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return str(tiny_models["layer-padfirst"])


@pytest.fixture(scope="module")
def audio(tmp_path_factory, speech):
    """The speech as a 16 kHz WAV, as raw 16 kHz mono s16le, and as raw 44.1 kHz stereo s16le."""
    import soxr

    root = tmp_path_factory.mktemp("mic")
    mono = np.frombuffer(pcm16(speech), dtype="<i2")
    sf.write(root / "speech16.wav", mono, 16000, subtype="PCM_16")
    (root / "speech16.raw").write_bytes(mono.tobytes())
    resampled = soxr.resample(mono.astype(np.float32) / 32768, 16000, 44100)
    stereo = np.stack([resampled, resampled * 0.8], axis=1)
    (root / "speech44.raw").write_bytes(pcm16(stereo))
    return {"dir": root, "pcm": mono.tobytes(), "frames16": len(mono), "frames44": len(stereo)}


@pytest.fixture(scope="module")
def devices(audio):
    d = audio["dir"]
    return alsa_env(d, {"speech16": (d / "speech16.raw", 16000, 1), "speech44": (d / "speech44.raw", 44100, 2)})


def transcribe(model_dir, wav, *options):
    """What ``streamer transcribe`` prints for ``wav``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["transcribe", "--model", model_dir, *options, str(wav)]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def expected(model_dir, audio):
    """``streamer transcribe`` of the 16 kHz file: its text, and its finals when segments end every 2 s."""
    wav = audio["dir"] / "speech16.wav"
    lines = transcribe(model_dir, wav, "--format", "jsonl", "--set", "endpoint.max_utterance_s=2").splitlines()
    finals = [e["text"] for e in map(json.loads, lines) if e["type"] == "final"]
    assert len(finals) >= 3
    return {"text": transcribe(model_dir, wav).strip(), "finals_2s": finals}


def mic(env, *args):
    return subprocess.Popen([sys.executable, "-m", "streamer", "mic", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def result(proc):
    """``(exit code, stdout, stderr)`` of a :func:`mic` process, waiting at most TIMEOUT; memoised."""
    if hasattr(proc, "results"):
        return proc.results
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.results = (proc.returncode, out, err)
    return proc.results


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """mosquitto on a free loopback port, and a subscriber to ``streamer/desk/final`` writing to a file."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not (os.access(mosquitto, os.X_OK) and shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")):
        yield None  # test_mqtt fails loudly on a missing broker; here only the --mqtt check is skipped
        return
    root = tmp_path_factory.mktemp("broker")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    + ("user root\n" if getpass.getuser() == "root" else ""))
    received = root / "received.txt"
    procs = [subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        host = ["-h", "127.0.0.1", "-p", str(port)]
        with open(received, "w") as out:
            sub = ["mosquitto_sub", *host, "-v", "-t", "streamer/desk/final", "-t", "probe"]
            for _ in range(100):  # until the broker listens and the subscriber is subscribed
                if procs[1:] and "probe" in received.read_text():
                    break
                if not procs[1:] or procs[1].poll() is not None:
                    procs[1:] = [subprocess.Popen(sub, stdout=out, stderr=subprocess.DEVNULL)]
                subprocess.run(["mosquitto_pub", *host, "-t", "probe", "-m", "up"], capture_output=True, timeout=10)
                time.sleep(0.1)
            else:
                pytest.fail("mosquitto did not come up")
        yield {"port": port, "received": received}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def captures(devices, audio, model_dir, broker, tmp_path_factory):
    """Both file-backed devices captured for exactly the speech's length, side by side (time is short).

    The processes start here; each test collects its own with :func:`result`, so that the
    in-process ``expected`` transcription runs meanwhile. The 16 kHz one also publishes to MQTT.
    """
    out = tmp_path_factory.mktemp("mic-out") / "finals.txt"
    out.write_text("earlier line\n")
    mqtt = ["--mqtt", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker['port']}", "--name", "desk"] \
        if broker else []
    procs = {
        "16k": mic(devices, "--device", "speech16", "--channels", "1", "--model", model_dir,
                   "--duration", repr(audio["frames16"] / 16000), "--output", str(out), *mqtt),
        "44k": mic(devices, "--device", "speech44", "--model", model_dir, "--format", "jsonl",
                   "--duration", repr(audio["frames44"] / 44100)),
    }
    yield {**procs, "output": out}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_list_devices(devices):
    code, out, err = result(mic(devices, "--list-devices"))
    assert code == 0, err
    rows = out.splitlines()
    assert any("speech16" in row and "16000 Hz" in row for row in rows), out
    assert any("speech44" in row and "44100 Hz" in row for row in rows), out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "no-such-mic"], "no input device matches 'no-such-mic'; "),
        (["--device", "99"], "no input device has index 99; "),
        (["--device", "speech16", "--channels", "300"],
         "'speech16' (16000 Hz, 128 ch) at 16000 Hz, 300 ch: Invalid number of channels"),
    ],
    ids=["unknown-name", "unknown-index", "fails-to-open"],
)
def test_device_errors_name_the_device_and_list_the_inputs(devices, model_dir, args, message):
    code, out, err = result(mic(devices, *args, "--model", model_dir))
    assert code == 1
    assert err.startswith("streamer mic: error: ") or "\nstreamer mic: error: " in err, err  # after PortAudio's own
    assert message in err, err
    listing = err[err.index("input devices: "):]
    assert "'speech16' (16000 Hz, 128 ch)" in listing and "'speech44' (44100 Hz, 128 ch)" in listing
    assert "Traceback" not in err and out == ""


def test_16k_mono_device_gives_the_transcribe_text(captures, expected):
    code, out, err = result(captures["16k"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines and all(lines)  # not a terminal: one line per final, no partials
    assert " ".join(lines) == expected["text"]
    assert captures["output"].read_text() == "earlier line\n" + "".join(line + "\n" for line in lines)
    assert "dropped" not in err and "overflow" not in err


def test_mqtt_gets_the_finals(captures, broker):
    if broker is None:
        pytest.skip("needs mosquitto, mosquitto_sub and mosquitto_pub")
    code, out, err = result(captures["16k"])
    assert code == 0, err
    lines = out.splitlines()
    for _ in range(100):  # the publisher flushed before the process exited: this is the broker's delivery
        finals = [line.split(" ", 1)[1] for line in broker["received"].read_text().splitlines()
                  if line.startswith("streamer/desk/final ")]
        if len(finals) >= len(lines):
            break
        time.sleep(0.05)
    assert [json.loads(f)["text"] for f in finals] == lines


def test_44k_stereo_device_gives_the_same_text(captures, expected):
    code, out, err = result(captures["44k"])
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["type"] for e in events} == {"partial", "final"}
    text = " ".join(e["text"] for e in events if e["type"] == "final")
    assert cer(text, expected["text"]) < 0.15, (text, expected["text"])


@pytest.mark.skipif(not (demo_model_dir() / "config.json").is_file(), reason="the demo model is not shipped yet")
def test_demo_model_hears_the_words(devices, audio):
    """With the trained demo model: the captured words are the spoken ones, at 16 kHz mono and 44.1 kHz stereo."""
    procs = [mic(devices, "--device", "speech16", "--channels", "1", "--duration", repr(audio["frames16"] / 16000)),
             mic(devices, "--device", "speech44", "--duration", repr(audio["frames44"] / 44100))]
    words = transcribe("demo", audio["dir"] / "speech16.wav").split()
    assert words == SPOKEN.split()
    for proc in procs:
        code, out, err = result(proc)
        assert code == 0, err
        assert out.split() == words


def test_live_finals_are_flushed_and_ctrl_c_finalises(audio, model_dir, expected, tmp_path):
    live = LiveMic(tmp_path / "live.raw")
    env = alsa_env(tmp_path, {"live": (tmp_path / "live.raw", 16000, 1)})
    live.say(audio["pcm"])  # the pipe holds it until the device is opened; then the reads wait
    proc = mic(env, "--device", "live", "--channels", "1", "--model", model_dir, "--format", "jsonl",
               "--set", "endpoint.max_utterance_s=2")
    lines: queue.Queue[str] = queue.Queue()
    stdout = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    stderr: list[str] = []
    threads = [stdout, threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)]
    for t in threads:
        t.start()
    try:
        finals = []
        while len(finals) < 2:  # the first two-second segments arrive while the capture runs
            event = json.loads(lines.get(timeout=TIMEOUT))
            if event["type"] == "final":
                finals.append(event)
        assert [f["text"] for f in finals] == expected["finals_2s"][:2]
        proc.send_signal(signal.SIGINT)  # the speech's last words are still an open segment
        live.keep_quiet()
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in threads:
            t.join(TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()
        live.close()
    err = "".join(stderr)
    assert code == 0, err
    rest = [e for e in (json.loads(line) for line in lines.queue) if e["type"] == "final"]
    assert len(rest) == 1 and rest[0]["reason"] == "end", rest
    tail = expected["finals_2s"][2]
    assert rest[0]["text"].startswith(tail[: len(tail) // 2]), (rest, tail)
    assert "Traceback" not in err


async def test_daemon_source_retries_then_reaches_listen_viewers(audio, model_dir, expected, tmp_path):
    live = None
    env = alsa_env(tmp_path, {"roommic": (tmp_path / "room.raw", 16000, 1)})
    cfg = tmp_path / "streamer.toml"
    cfg.write_text(f"""
[model]
id = "{model_dir}"
device = "cpu"

[endpoint]
max_utterance_s = 2.0

[[sources]]
name = "room"
kind = "mic"
device = "roommic"
channels = 1
""")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "serve", "-c", str(cfg), "--port", "0", "--host", "127.0.0.1",
        stderr=asyncio.subprocess.PIPE, env=env)
    log = _Log()
    try:
        async with asyncio.timeout(TIMEOUT):
            port = None
            while port is None:
                line = (await proc.stderr.readline()).decode()
                assert line, f"streamer serve exited before listening:\n{log}"
                log.add(line)
                if line.startswith("streamer: listening on ws://"):
                    port = int(line.split(":")[3].split("/")[0])
            drain = asyncio.create_task(log.collect(proc.stderr))
            async with connect(f"ws://127.0.0.1:{port}/v1/listen/room") as ws:
                assert json.loads(await ws.recv()) == {"type": "ready", "stream": "room", "mode": "listen"}
                # The device's infile does not exist yet, so ALSA cannot open it: the source retries.
                await log.wait_for("source room: no input device matches 'roommic'")
                live = LiveMic(tmp_path / "room.raw")  # plugged in: found by a later attempt's rescan
                live.say(audio["pcm"])
                live.keep_quiet()
                finals = []
                while len(finals) < 2:
                    event = json.loads(await ws.recv())
                    assert event["type"] in ("partial", "final"), event
                    if event["type"] == "final":
                        finals.append(event)
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(ConnectionClosed):
                    async for _ in ws:
                        pass
            assert ws.close_code == 1001
            assert [f["text"] for f in finals] == expected["finals_2s"][:2]
            assert [f["reason"] for f in finals] == ["max_length", "max_length"]
            assert await proc.wait() == 0, str(log)
            await drain
        assert "retrying in 0.5 s" in str(log)
        assert "Traceback" not in str(log), str(log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if live is not None:
            live.close()


class _Log:
    """A process's stderr lines, as they come."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def __str__(self) -> str:
        return "".join(self.lines)

    def add(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()

    async def collect(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.add(line.decode())

    async def wait_for(self, text: str) -> None:
        while not any(text in line for line in self.lines):
            self._changed.clear()
            await self._changed.wait()


# --- the pieces, without a device ---------------------------------------------------------------


def test_terminal_rewrites_the_partial_in_place_and_commits_finals(tmp_path):
    from streamer.cli.mic import CLEAR_LINE, Dictation
    from streamer.events import Final, Partial

    events = [Partial(0, "hel", 0, 1), Partial(0, "hello", 0, 1), Final(0, "hello world", 0, 2), Partial(1, "ag", 2, 3)]
    tty, pipe, jsonl = io.StringIO(), io.StringIO(), io.StringIO()
    shows = []
    with open(tmp_path / "finals.txt", "a", encoding="utf-8") as append:
        for out, fmt, is_tty, extra in ((tty, "text", True, append), (pipe, "text", False, None),
                                        (jsonl, "jsonl", False, None)):
            view = Dictation(fmt, out, is_tty, extra)
            view.show(events)
            view.close()
            shows.append(view.shows_partials)
    assert shows == [True, False, True]  # a pipe of text shows none: its stream is asked for finals only
    assert tty.getvalue().startswith(CLEAR_LINE) and tty.getvalue().count(CLEAR_LINE) == 5
    assert f"{CLEAR_LINE}hello world\n" in tty.getvalue() and tty.getvalue().endswith(CLEAR_LINE)
    assert pipe.getvalue() == "hello world\n"
    types = [json.loads(line)["type"] for line in jsonl.getvalue().splitlines()]
    assert types == ["partial", "partial", "final", "partial"]
    assert (tmp_path / "finals.txt").read_text() == "hello world\n"


class _Status:
    def __init__(self, overflow: bool) -> None:
        self.input_overflow = overflow


async def test_callback_blocks_are_bounded_counted_and_ordered():
    """The PortAudio side of a capture, driven from a plain thread: nothing waits, excess is dropped."""
    from streamer.aio.sources.capture import Capture, InputDevice

    capture = Capture(InputDevice(7, "fake", "ALSA", 16000, 2), queue_blocks=4, stall_s=5)
    capture._loop = asyncio.get_running_loop()
    assert capture.channels == 2 and capture.blocksize == 800

    def audio_thread():
        for i in range(10):
            capture._callback(np.full((800, 2), i, np.int16), 800, None, _Status(overflow=i == 3))

    await asyncio.to_thread(audio_thread)
    await asyncio.sleep(0)  # let the loop take the handed-over blocks
    capture.stop()
    blocks = [block async for block in capture]
    assert [int(b[0, 0]) for b in blocks] == [0, 1, 2, 3]
    stats = capture.stats
    assert (stats.frames, stats.blocks, stats.overflows, stats.dropped) == (8000, 4, 1, 6)
