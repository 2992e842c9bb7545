"""``[model_server] kind = "triton"``: the daemon's windows on a real Triton server (PyTriton, CPU, loopback).

One ``streamer model-server`` (the demo model) serves the module; the kill-and-restart test restarts it. The
server runs on ``$STREAMER_TRITON_PYTHON`` (an environment with ``streamer[triton-server]``, as ``.ci/run`` makes
it: PyTriton holds numpy below 2), else on this interpreter; the front-ends need ``streamer[triton]`` here.
Skipped when either is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import pcm16
from test_server import finals_of, native_session, reference_finals
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ASKED = bool(os.environ.get("STREAMER_TRITON_PYTHON"))
"""set by .ci/run (the README's test command): then a missing piece fails these tests instead of skipping them"""
if ASKED:
    import tritonclient.grpc.aio  # noqa: F401
else:
    pytest.importorskip("tritonclient.grpc.aio", reason="needs pip install 'streamer[triton]'")
SERVER_PYTHON = os.environ.get("STREAMER_TRITON_PYTHON") or sys.executable
"""the interpreter of the model server: one with streamer[triton-server]"""
if subprocess.run([SERVER_PYTHON, "-c", "import pytriton"], capture_output=True, timeout=120).returncode != 0:
    why = (f"{SERVER_PYTHON} has no PyTriton: set STREAMER_TRITON_PYTHON to a python with "
           "streamer[triton-server] (.ci/run makes .venv-triton)")
    if ASKED:
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)
SERVER_NUMPY = subprocess.run([SERVER_PYTHON, "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                              text=True, timeout=120).stdout.strip()

from streamer.config import load_config  # noqa: E402
from streamer.exceptions import ModelLoadError  # noqa: E402
from streamer.triton import TritonRunner, connect_runner, load_vocabulary  # noqa: E402

START_S = 180.0
"""how long a model server may take to start on a loaded CI machine"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ModelServer:
    """``streamer model-server`` in its own session (so that Triton and its proxies stop with it), fixed ports."""

    def __init__(self, *sets: str) -> None:
        self.grpc, self.http, self.metrics = _free_port(), _free_port(), _free_port()
        self.sets = sets
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def start(self) -> None:
        cmd = [SERVER_PYTHON, "-m", "streamer", "model-server", "--device", "cpu", "--grpc-port", str(self.grpc),
               "--http-port", str(self.http), "--metrics-port", str(self.metrics), "--set",
               "model_server.max_queue_delay_ms=30", *(a for s in self.sets for a in ("--set", s))]
        self.proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        cfg = load_config(None, ["model.id='demo'"])
        vocab, source, name = load_vocabulary(cfg.model)
        probe = TritonRunner(cfg.model_server, self.url, vocab, name=name, source=source)
        deadline = time.monotonic() + START_S
        while True:
            assert self.proc.poll() is None, f"the model server exited with {self.proc.returncode}"
            try:
                probe.check(timeout_s=1.0)
                return
            except ModelLoadError:
                assert time.monotonic() < deadline, "the model server did not start"

    def kill(self) -> None:
        """SIGKILL the server and everything it started (a crash, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            if self.proc is not None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stats(self) -> dict[str, float]:
        """Triton's own counters of the model (its metrics port): requests, windows and executions."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).read().decode()
        out = {}
        for metric in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count"):
            out[metric] = sum(float(m) for m in re.findall(rf'^{metric}{{model="streamer"[^}}]*}} (\S+)$', text, re.M))
        return out


@pytest.fixture(scope="module")
def server():
    s = ModelServer()
    s.start()
    yield s
    s.stop()


def triton_config(server, *overrides):
    return load_config(None, ["model_server.kind='triton'", f"model_server.url='{server.url}'",
                              "model_server.retry_s=1.0", *overrides])


def _i16(audio):
    return np.frombuffer(pcm16(audio), "<i2").astype(np.float32) / 32768


async def test_windows_of_every_length_equal_the_local_runner(server, model_runner):
    runner = connect_runner(triton_config(server))
    rng = np.random.default_rng(1)
    # full windows, a stream's first (shorter) ones, early partials, a final flush, one too short for a frame
    windows = [rng.normal(0, 0.1, n).astype(np.float32) for n in (48000, 48000, 30080, 300, 48000, 16000, 6400)]
    expected = model_runner.run(windows)
    # the same computation: bit for bit when the server has this numpy; numpy 1.26 (PyTriton's, in the server's
    # environment) and 2.x round the feature extractor's mean/variance differently, by float32 ulps (~1e-5 here)
    exact = SERVER_NUMPY == np.__version__
    for got in (runner.run(windows), await runner.infer(windows)):
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected, strict=True):
            if exact:
                np.testing.assert_array_equal(g, e)
            else:
                np.testing.assert_allclose(g, e, rtol=0, atol=1e-4)
                assert (g.argmax(-1) == e.argmax(-1)).all()
    assert runner.requests == 4  # one request per window length (the short one never leaves)
    await runner.aclose()


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_a_request_on_the_wire_is_the_protocols_message_with_every_window(dtype):
    """The runner writes a request's bytes itself (the audio copied once): protobuf reads them as the message
    tritonclient describes, the windows' samples in order (views and strided ones alike)."""
    from tritonclient.grpc import service_pb2 as pb

    cfg = load_config(None, ["model.id='demo'", f"model_server.dtype='{dtype}'"])
    vocab, source, name = load_vocabulary(cfg.model)
    runner = TritonRunner(cfg.model_server, "127.0.0.1:1", vocab, name=name, source=source)
    audio = np.random.default_rng(2).uniform(-1.2, 1.2, 200_000).astype(np.float32)
    for windows in ([audio[:48000], audio[16000:64000], audio[1:96001:2]], [audio[5:305]]):
        got = pb.ModelInferRequest.FromString(runner._body(windows))
        stacked = np.stack(windows)
        if dtype == "int16":
            stacked = np.clip(np.rint(stacked * 32768.0), -32768, 32767).astype(np.int16)
        want = pb.ModelInferRequest(model_name=cfg.model_server.model_name, model_version=str(runner.version),
                                    raw_input_contents=[stacked.tobytes()])
        want.inputs.add(name="audio", datatype={"float32": "FP32", "int16": "INT16"}[dtype],
                        shape=[len(windows), len(windows[0])])
        want.outputs.add(name="logprobs")
        assert got == want


def test_front_ends_know_the_frame_grid_without_the_weights(tmp_path, tiny_models):
    """A front-end's windows are cut on the server's model's grid: read from the checkpoint's config alone."""
    from streamer.config import ModelConfig
    from streamer.model import load_model
    from streamer.testing import make_tiny_bert_model
    from streamer.triton import checkpoint_geometry, model_version

    bert = make_tiny_bert_model(tmp_path / "bert", adapter=True)
    grids = set()
    for path in (next(iter(tiny_models.values())), bert):
        cfg = ModelConfig(id=str(path), device="cpu")
        local = load_model(cfg)
        assert checkpoint_geometry(cfg, str(path)) == local.geometry
        grids.add(local.geometry)
    assert len(grids) == 2  # wav2vec2's 20 ms frames and the adapter's 40 ms ones
    assert model_version(local.vocab, local.geometry) != model_version(local.vocab)  # the grid is in the version


def test_another_checkpoint_or_dtype_is_refused_at_start(server, tiny_models):
    tiny = next(iter(tiny_models.values()))
    with pytest.raises(ModelLoadError, match="another vocabulary or frame grid than model.id"):
        connect_runner(triton_config(server, f"model.id='{tiny}'"))
    with pytest.raises(ModelLoadError, match=r"model_server.dtype = 'int16'"):
        connect_runner(triton_config(server, "model_server.dtype='int16'"))
    with pytest.raises(ModelLoadError, match="not ready after"):
        connect_runner(triton_config(server, f"model_server.url='127.0.0.1:{_free_port()}'",
                                     "model_server.start_timeout_s=1"))


async def test_front_ends_get_the_local_finals_and_triton_merges_their_windows(daemon_factory, server, model_runner,
                                                                              speech):
    # two front-ends (each its own gRPC connection and worker), three streams each
    fronts = [await daemon_factory("worker.max_wait_ms=2", runner=connect_runner(triton_config(server)))
              for _ in range(2)]
    before = server.stats()
    clips = [speech, speech[::-1].copy(), speech[16000:]]
    results = await asyncio.gather(*(native_session(d.port, pcm16(c), chunk=3200, pace=0.02)
                                     for d in fronts for c in clips))
    for (msgs, code), clip in zip(results, clips * 2, strict=True):
        assert code == 1000
        expected = reference_finals(model_runner, _i16(clip))
        assert [(f["text"], f["start"], f["end"]) for f in finals_of(msgs)] == [
            (f["text"], f["start"], f["end"]) for f in expected]
    assert finals_of(results[0][0])[0]["text"] == "turn on the kitchen lights"
    after = server.stats()
    requests = after["nv_inference_request_success"] - before["nv_inference_request_success"]
    windows = after["nv_inference_count"] - before["nv_inference_count"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    sent = sum(d.worker.remote.requests for d in fronts)
    assert requests == sent and windows == sum(d.worker.metrics.windows._value.get() for d in fronts)
    assert executions < requests  # Triton's dynamic batcher ran requests of several front-ends as one batch
    print(f"triton: {requests:.0f} requests, {windows:.0f} windows, {executions:.0f} executions "
          f"(mean batch {windows / executions:.2f} windows)")


async def test_two_front_end_processes_share_one_model_server(server, model_runner, speech):
    """``streamer serve --processes 2`` with kind = "triton": 8 native and 2 Vosk clients over both processes get
    the finals of `streamer transcribe`; Triton merged the two processes' requests into shared forward passes."""
    from test_processes import Served, spread
    from test_server import vosk_session

    s = Served("model_server.kind='triton'", f"model_server.url='{server.url}'", "worker.max_wait_ms=2")
    await s.start()
    try:
        health = await s.until_health(lambda h: h.get("model_server") == "up")
        assert health["device"] == f"triton://{server.url}"
        audio = pcm16(speech)
        natives = await spread(s.port, 4)
        assert len({c.pid for c in natives}) == 2
        before = await asyncio.to_thread(server.stats)

        async def native(client):
            for i in range(0, len(audio), 3200):
                await client.ws.send(audio[i : i + 3200])
                await asyncio.sleep(0.02)
            return await client.finish()

        results = await asyncio.gather(*(native(c) for c in natives),
                                       *(vosk_session(s.vosk_port, audio, config={"sample_rate": 16000})
                                         for _ in range(2)))
        expected = [f["text"] for f in reference_finals(model_runner, _i16(speech))]
        for messages in results[:8]:
            assert [f["text"] for f in finals_of(messages)] == expected and messages[-1]["type"] == "end"
        for replies in results[8:]:
            assert " ".join(r["text"] for r in replies if r.get("text")) == " ".join(expected)
        after = await asyncio.to_thread(server.stats)
        requests = after["nv_inference_request_success"] - before["nv_inference_request_success"]
        executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
        assert 0 < executions < requests  # forward passes that served requests of both processes at once
        s.signal(signal.SIGTERM)
        assert await s.wait() == 0
    finally:
        await s.kill()


def _health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def live_session(port, audio, *, chunk=3200, pace=0.1):
    """Stream audio in real time while reading what comes back; the server may end the stream early (an error)."""
    messages = []
    async with asyncio.timeout(300), connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:

        async def read():
            try:
                async for msg in ws:
                    messages.append(json.loads(msg))
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(read())
        try:
            for i in range(0, len(audio), chunk):
                await ws.send(audio[i : i + chunk])
                await asyncio.sleep(pace)
            await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass
        await reader
        return messages, ws.close_code


async def _until(predicate, what, limit_s=START_S):
    deadline = time.monotonic() + limit_s
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_killed_and_restarted_model_server(daemon_factory, server, model_runner, speech):
    d = await daemon_factory(runner=connect_runner(triton_config(server)))
    status, health = await asyncio.to_thread(_health, d.port)  # the daemon runs on this loop: ask from a thread
    assert status == 200 and health["model_server"] == "up"
    # a stream in real time; the server dies under it
    stream = asyncio.create_task(live_session(d.port, pcm16(np.tile(speech, 3))))
    await asyncio.sleep(2.0)
    await asyncio.to_thread(server.kill)
    await _until(lambda: _health(d.port)[0] == 503, "/healthz did not report the model server down", 30)
    assert (await asyncio.to_thread(_health, d.port))[1]["model_server"] == "unreachable"
    msgs, code = await stream
    assert code == 1011 and msgs[-1]["type"] == "error" and msgs[-1]["code"] == "inference_failed"
    # meanwhile the daemon serves nothing but stays up; the server comes back and the daemon reconnects by itself
    await asyncio.to_thread(server.start)
    await _until(lambda: _health(d.port)[0] == 200, "/healthz did not recover", 30)
    msgs, code = await native_session(d.port, pcm16(speech))
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(model_runner, _i16(speech))]


async def test_a_restart_within_retry_s_loses_nothing(daemon_factory, server, model_runner, speech):
    d = await daemon_factory(runner=connect_runner(triton_config(server, "model_server.retry_s=120")))
    stream = asyncio.create_task(live_session(d.port, pcm16(speech)))
    await asyncio.sleep(1.5)
    await asyncio.to_thread(server.kill)
    await _until(lambda: _health(d.port)[0] == 503, "/healthz did not report the model server down", 30)
    await asyncio.to_thread(server.start)  # the windows wait (bounded by retry_s) for the server to come back
    msgs, code = await stream
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(model_runner, _i16(speech))]


@pytest.mark.slow
def test_serve_starts_and_stops_its_own_model_server(tmp_path, speech):
    """``streamer serve`` with kind = "triton" and no url: int16 windows to a server it started (with
    model_server.python); SIGHUP keeps it; SIGTERM stops both."""
    import soundfile as sf

    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="PCM_16")
    ref = subprocess.run([sys.executable, "-m", "streamer", "transcribe", "--device", "cpu", str(wav)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    grpc = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "serve", "--port", "0", "--device", "cpu",
         "--set", "model_server.kind='triton'", "--set", "model_server.dtype='int16'",
         "--set", f"model_server.python='{SERVER_PYTHON}'",
         "--set", f"model_server.grpc_port={grpc}", "--set", "model_server.http_port=0",
         "--set", "model_server.metrics_port=0"],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = None
        assert proc.stderr is not None
        deadline = time.monotonic() + START_S
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "streamer serve exited"
            if m := re.search(r"listening on ws://127.0.0.1:(\d+)", line):
                port = int(m.group(1))
        assert port is not None
        status, health = _health(port)
        assert status == 200 and health["model_server"] == "up" and health["device"] == f"triton://127.0.0.1:{grpc}"
        msgs, code = asyncio.run(native_session(port, (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()))
        assert code == 1000
        assert " ".join(f["text"] for f in finals_of(msgs)) == " ".join(ref.split())
        # a reload reads the same file: the url and ports of the server it started are no change to restart for
        proc.send_signal(signal.SIGHUP)
        while "reload:" not in (line := proc.stderr.readline()):
            assert line, "streamer serve exited"
        assert "config unchanged" in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        with socket.socket() as s:  # the model server is gone too
            assert s.connect_ex(("127.0.0.1", grpc)) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
