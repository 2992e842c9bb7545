"""The daemon over real websockets on loopback: native and Vosk protocols, limits, bad input, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request

import numpy as np
import pytest
from conftest import pcm16
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.config import Config
from streamer.events import Final
from streamer.transcribe import new_session, stream_array, text_of

TIMEOUT = 60


def reference_finals(runner, audio, *overrides):
    from streamer.config import load_config
    from streamer.decoder import build_decoder

    cfg = load_config(None, list(overrides))
    session = new_session(cfg, runner.vocab, build_decoder(cfg.decoder, runner))
    return [e.to_dict() for e in stream_array(session, runner, audio) if isinstance(e, Final)]


async def native_session(port, audio, *, chunk=3200, start=None, pace=0.0, path="/v1/stream", headers=None,
                         flush_at=None, limit_s=TIMEOUT):
    """Stream audio (a flush after byte ``flush_at``), stop, collect every message until the server closes;
    return (messages, close code)."""
    messages = []
    async with asyncio.timeout(limit_s):
        async with connect(f"ws://127.0.0.1:{port}{path}", additional_headers=headers) as ws:
            messages.append(json.loads(await ws.recv()))
            if start is not None:
                await ws.send(json.dumps(start))
            for i in range(0, len(audio), chunk):
                await ws.send(audio[i : i + chunk])
                if flush_at is not None and i <= flush_at < i + chunk:
                    await ws.send(json.dumps({"type": "flush"}))
                if pace:
                    await asyncio.sleep(pace)
            await ws.send(json.dumps({"type": "stop"}))
            try:
                async for msg in ws:
                    messages.append(json.loads(msg))
            except ConnectionClosed:
                pass
            return messages, ws.close_code


def finals_of(messages):
    return [m for m in messages if m["type"] == "final"]


def metric(text, name, missing=None):
    """The value of sample ``name`` in a /metrics page; ``missing`` when it is not there (None: it must be)."""
    found = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    if found:
        return found[0]
    assert missing is not None, f"{name} is not in /metrics"
    return missing


async def test_native_protocol_equals_transcribe(daemon_factory, model_runner, speech):
    d = await daemon_factory()
    msgs, code = await native_session(d.port, pcm16(speech))
    assert code == 1000
    assert msgs[0]["type"] == "ready" and msgs[0]["sample_rate"] == 16000 and msgs[0]["session"]
    assert msgs[-1]["type"] == "end"
    assert any(m["type"] == "partial" for m in msgs)
    expected = reference_finals(model_runner, np.frombuffer(pcm16(speech), "<i2").astype(np.float32) / 32768)
    got = finals_of(msgs)
    assert [f["text"] for f in got] == [f["text"] for f in expected]
    assert [f["text"] for f in got] == ["turn on the kitchen lights", "set a timer for twenty minutes"]
    spans = [(f["segment"], f["start"], f["end"]) for f in got]
    assert spans == [(f["segment"], f["start"], f["end"]) for f in expected]


async def test_start_message_with_other_rate_and_float(daemon_factory, model_runner, demo_words, speech):
    import soxr

    d = await daemon_factory()
    audio48 = soxr.resample(speech, 16000, 48000).astype("<f4")
    stereo = np.stack([audio48, audio48], axis=1).astype("<f4").tobytes()
    msgs, code = await native_session(
        d.port, stereo, chunk=48000 * 8 // 10,
        start={"type": "start", "sample_rate": 48000, "encoding": "f32le", "channels": 2, "name": "hall"})
    assert code == 1000
    text = " ".join(f["text"] for f in finals_of(msgs))
    ref = text_of(stream_array(new_session(Config(), model_runner.vocab, demo_words), model_runner, speech))
    from test_cli import cer

    assert cer(text, ref) < 0.15


async def test_concurrent_clients_each_get_their_own_transcript(daemon_factory, model_runner, speech):
    d = await daemon_factory("worker.max_wait_ms=30")
    clips = [speech, speech[::-1].copy(), speech[16000:], speech * 0.5]
    results = await asyncio.gather(*(native_session(d.port, pcm16(c), chunk=1600, pace=0.002) for c in clips))
    for clip, (msgs, code) in zip(clips, results, strict=True):
        assert code == 1000
        expected = reference_finals(model_runner, np.frombuffer(pcm16(clip), "<i2").astype(np.float32) / 32768)
        assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in expected]
    assert d.worker.batches < d.metrics.windows._value.get()  # some windows really were batched together


BAD_INPUTS = [
    ("malformed_json", ['{"type": "flush"'], 1007),
    ("unknown_type", [{"type": "dance"}], 1008),
    ("text_not_audio", ["hello there"], 1003),
    ("bad_audio", [b"\x00\x01\x02"], 1007),  # odd-length s16le
    ("unsupported_rate", [{"type": "start", "sample_rate": 1000}], 1008),
    ("unsupported_encoding", [{"type": "start", "encoding": "mulaw"}], 1008),
    ("late_start", [b"\x00\x00" * 800, {"type": "start"}], 1008),
    ("bad_audio", [{"type": "start", "encoding": "f32le"}, np.array([np.nan] * 4, "<f4").tobytes()], 1007),
    ("bad_words", [{"type": "start", "words": ["coffee", "café"]}], 1008),  # no such letter in the model
    ("bad_words", [{"type": "start", "words": "turn on"}], 1008),  # not a list
    ("bad_words", [{"type": "start", "words": ["[unk]"]}], 1008),  # no words
    ("bad_words", [{"type": "start", "words": ["a" * 120_000]}], 1008),  # one huge word (it crashed the trie)
    ("bad_words", [{"type": "start", "words": [" ".join(f"w{i}" for i in range(20_001))]}], 1008),  # too many
]


@pytest.mark.parametrize(("code_name", "sends", "close_code"), BAD_INPUTS,
                         ids=[b[0] + str(i) for i, b in enumerate(BAD_INPUTS)])
async def test_bad_input_errors_without_touching_other_streams(daemon_factory, model_runner, speech, code_name,
                                                               sends, close_code):
    d = await daemon_factory()
    healthy = asyncio.create_task(native_session(d.port, pcm16(speech), chunk=1600, pace=0.003))
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        await ws.recv()
        for item in sends:
            await ws.send(json.dumps(item) if isinstance(item, dict) else item)
        msgs = []
        with pytest.raises(ConnectionClosed):
            while True:
                msgs.append(json.loads(await ws.recv()))
    errors = [m for m in msgs if m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == code_name and errors[0]["message"]
    assert ws.close_code == close_code
    msgs, code = await healthy
    assert code == 1000
    expected = reference_finals(model_runner, np.frombuffer(pcm16(speech), "<i2").astype(np.float32) / 32768)
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in expected]
    await wait_for_no_streams(d)


async def wait_for_no_streams(d):
    """Every stream's resources are released once its connection closed."""
    async with asyncio.timeout(5):
        while d.active_streams or d.worker.queued:  # noqa: ASYNC110 (polling a counter, bounded by the timeout)
            await asyncio.sleep(0.01)


async def test_flush_forces_a_final(daemon_factory, speech):
    d = await daemon_factory("endpoint.enabled=false")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        await ws.recv()
        await ws.send(pcm16(speech[:32000]))
        await ws.send(json.dumps({"type": "flush"}))
        while (m := json.loads(await ws.recv()))["type"] != "final":
            pass
        assert m["reason"] == "flush" and m["segment"] == 0 and m["end"] <= 2.0
        await ws.send(pcm16(speech[32000:64000]))
        await ws.send(json.dumps({"type": "stop"}))
        finals = [json.loads(x) for x in [msg async for msg in ws]]
    later = [f for f in finals if f["type"] == "final"]
    assert later and later[0]["segment"] == 1 and later[0]["start"] >= 1.9


async def test_stream_limit_closes_1013_without_slowing_running_streams(daemon_factory, speech):
    d = await daemon_factory("server.max_streams=1")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as first:
        await first.recv()
        async with connect(f"ws://127.0.0.1:{d.port}/v1/stream") as second:
            msg = json.loads(await second.recv())
            with pytest.raises(ConnectionClosed):
                await second.recv()
        assert msg["type"] == "error" and msg["code"] == "busy"
        assert second.close_code == 1013 and "busy" in second.close_reason
        await first.send(pcm16(speech))
        await first.send(json.dumps({"type": "stop"}))
        got = [json.loads(m) async for m in first]
    assert got[-1]["type"] == "end" and first.close_code == 1000
    assert d.metrics.streams_rejected.labels("busy")._value.get() == 1


async def test_refused_connections_leave_no_task_behind(daemon_factory):
    """A connection refused as busy (or during shutdown) costs nothing once it is closed: no pending task."""
    d = await daemon_factory("server.max_streams=1")
    url = f"ws://127.0.0.1:{d.port}/v1/stream"
    async with asyncio.timeout(TIMEOUT), connect(url) as first:
        await first.recv()
        await asyncio.sleep(0.1)
        before = len(asyncio.all_tasks())
        for _ in range(20):
            async with connect(url) as refused:
                assert json.loads(await refused.recv())["code"] == "busy"
                with pytest.raises(ConnectionClosed):
                    await refused.recv()
        for _ in range(50):  # the server side finishes its closing handshakes
            if len(asyncio.all_tasks()) <= before:
                break
            await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) <= before, [t for t in asyncio.all_tasks() if not t.done()][-5:]
    assert d.metrics.streams_rejected.labels("busy")._value.get() == 20


async def test_stopping_the_worker_keeps_the_callers_cancellation(model_runner):
    """BatchWorker.stop() swallows the CancelledError of its own loop, but not a cancellation of its caller."""
    from streamer.aio.worker import BatchWorker
    from streamer.config import WorkerConfig

    worker = BatchWorker(model_runner, WorkerConfig())
    worker.start()
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)  # stop() now waits for the loop to end
    stopping.cancel()
    await asyncio.wait({stopping})
    assert stopping.cancelled()
    assert not worker.alive
    other = BatchWorker(model_runner, WorkerConfig())
    other.start()
    await other.stop()  # not cancelled: returns normally
    assert not other.alive


async def test_auth_token(daemon_factory, speech):
    d = await daemon_factory("server.auth_token='s3cret'")
    for headers, path in [(None, "/v1/stream"), ({"Authorization": "Bearer wrong"}, "/v1/stream"),
                          (None, "/v1/stream?token=nope")]:
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{d.port}{path}", additional_headers=headers):
                pass
        assert info.value.response.status_code == 401
    for headers, path in [({"Authorization": "Bearer s3cret"}, "/v1/stream"), (None, "/v1/stream?token=s3cret")]:
        msgs, code = await native_session(d.port, pcm16(speech[:16000]), headers=headers, path=path)
        assert code == 1000 and msgs[0]["type"] == "ready"


async def test_oversized_message_closes_1009(daemon_factory):
    d = await daemon_factory("server.max_message_bytes=4096")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream", max_size=None) as ws:
        await ws.recv()
        await ws.send(b"\x00" * 8192)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1009


async def test_idle_timeout_finalises_and_closes(daemon_factory, speech):
    d = await daemon_factory("server.idle_timeout_s=0.5")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        await ws.recv()
        await ws.send(pcm16(speech[:48000]))
        msgs = [json.loads(m) async for m in ws]
    assert ws.close_code == 1000 and ws.close_reason == "idle timeout"
    assert msgs[-1] == {"type": "end", "session": msgs[-1]["session"], "reason": "idle timeout"}
    assert finals_of(msgs)


async def test_unknown_path_404_and_origin_check(daemon_factory):
    d = await daemon_factory("server.allowed_origins=['https://ok.example']")
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{d.port}/nope"):
            pass
    assert info.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{d.port}/v1/stream", origin="https://evil.example"):
            pass
    assert info.value.response.status_code == 403
    async with connect(f"ws://127.0.0.1:{d.port}/v1/stream", origin="https://ok.example") as ws:
        assert json.loads(await ws.recv())["type"] == "ready"


def http_get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


async def test_health_and_metrics_move(daemon_factory, speech):
    d = await daemon_factory()
    status, ctype, body = await asyncio.to_thread(http_get, d.port, "/healthz")
    assert status == 200 and json.loads(body)["worker_alive"] is True
    _, ctype, before = await asyncio.to_thread(http_get, d.port, "/metrics")
    assert ctype.startswith("text/plain") and "streamer_windows_total 0.0" in before
    await native_session(d.port, pcm16(speech))
    _, _, after = await asyncio.to_thread(http_get, d.port, "/metrics")

    assert metric(after, "streamer_windows_total") > 0
    assert metric(after, "streamer_audio_seconds_total") == pytest.approx(len(speech) / 16000, abs=0.01)
    assert metric(after, "streamer_batch_size_count") > 0
    assert metric(after, "streamer_final_latency_seconds_count") > 0
    assert 0 < metric(after, "streamer_rtf")
    assert 'streamer_streams_total{protocol="native"} 1.0' in after


async def test_model_failure_reaches_the_stream_and_daemon_keeps_serving(daemon_factory, model_runner, speech):
    class Flaky:
        def __init__(self, runner):
            self.inner, self.fail = runner, True
            self.vocab, self.shipped_file = runner.vocab, runner.shipped_file
            self.name, self.device = "flaky", "cpu"

        def run(self, windows):
            if self.fail:
                self.fail = False
                raise RuntimeError("CUDA error: out of memory (simulated)")
            return self.inner.run(windows)

    d = await daemon_factory(runner=Flaky(model_runner))
    msgs, code = await native_session(d.port, pcm16(speech))
    assert code == 1011
    assert [m["code"] for m in msgs if m["type"] == "error"] == ["inference_failed"]
    msgs, code = await native_session(d.port, pcm16(speech))
    assert code == 1000 and finals_of(msgs)


async def test_start_words_restrict_that_stream_only(daemon_factory, speech):
    """A stream's own word list (start "words") decodes that stream with a beam search over those words only;
    other streams keep the daemon's decoding. Works on a daemon that decodes greedily, too."""
    listed = ["turn", "off", "the", "lights", "set", "a", "timer", "for", "twenty", "minutes", "on"]
    d = await daemon_factory("decoder.words=", "decoder.lm=")
    plain, restricted = await asyncio.gather(
        native_session(d.port, pcm16(speech)),
        native_session(d.port, pcm16(speech), start={"type": "start", "words": [" ".join(listed)]}))
    plain_words = [w["word"] for f in finals_of(plain[0]) for w in f["words"]]
    restricted_words = [w["word"] for f in finals_of(restricted[0]) for w in f["words"]]
    assert "kitchen" in plain_words  # the speech says it
    assert restricted_words and set(restricted_words) <= set(listed)
    assert " ".join(f["text"] for f in finals_of(restricted[0])) == " ".join(restricted_words)
    assert {"timer", "twenty", "minutes"} <= set(restricted_words)


# --- Vosk protocol ---------------------------------------------------------------------------------


async def vosk_session(port, audio, chunk=6400, config=None, gate=None):
    """Send ``config``, wait for ``gate`` (an asyncio.Event) if given, send the audio and eof; every reply."""
    replies = []
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{port}/") as ws:
        if config:
            await ws.send(json.dumps({"config": config}))
        if gate is not None:
            await gate.wait()
        for i in range(0, len(audio), chunk):
            await ws.send(audio[i : i + chunk])
            replies.append(json.loads(await ws.recv()))
        await ws.send('{"eof" : 1}')
        replies.append(json.loads(await ws.recv()))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    return replies


async def test_vosk_protocol_one_reply_per_frame(daemon_factory, model_runner, speech):
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0")
    audio = pcm16(speech)
    replies = await vosk_session(d.vosk_port, audio, config={"sample_rate": 16000, "words": True})
    n_frames = -(-len(audio) // 6400)
    assert len(replies) == n_frames + 1
    for r in replies[:-1]:
        assert set(r) in ({"partial"}, {"text", "result"}, {"text"})
    finals = [r for r in replies if "text" in r]
    expected = reference_finals(model_runner, np.frombuffer(audio, "<i2").astype(np.float32) / 32768)
    assert " ".join(r["text"] for r in finals if r["text"]) == " ".join(f["text"] for f in expected)
    for r in finals:
        for w in r.get("result", []):
            assert set(w) == {"conf", "end", "start", "word"} and w["start"] <= w["end"]


async def test_vosk_reset_keeps_session_and_8k_rate(daemon_factory, speech):
    import soxr

    d = await daemon_factory("vosk.enabled=true", "vosk.port=0")
    audio8 = pcm16(soxr.resample(speech, 16000, 8000))
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
        await ws.send(json.dumps({"config": {"sample_rate": 8000, "words": False}}))
        await ws.send(audio8[:19200])  # 1.2 s: inside the first sentence (it ends at 1.57 s), whatever the endpointing
        await ws.recv()
        await ws.send(json.dumps({"reset": 1}))
        r = json.loads(await ws.recv())
        assert set(r) == {"text"} and r["text"]
        await ws.send(audio8[19200:])
        await ws.recv()
        await ws.send('{"eof": 1}')
        last = json.loads(await ws.recv())
        assert "text" in last
    assert ws.close_code == 1000


async def test_vosk_phrase_list_restricts_the_words(daemon_factory, speech):
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0")
    phrases = ["turn on the lights", "set a timer for twenty minutes"]
    replies = await vosk_session(d.vosk_port, pcm16(speech), config={"sample_rate": 16000, "phrase_list": phrases})
    words = [w["word"] for r in replies for w in r.get("result", [])]
    assert words and set(words) <= {w for p in phrases for w in p.split()}
    assert "kitchen" not in " ".join(r.get("text", "") for r in replies)
    # a phrase list after audio is ignored, as vosk-server ignores it (tests/test_vosk_exact.py)
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
        await ws.send(pcm16(speech)[:6400])
        await ws.recv()
        await ws.send(json.dumps({"config": {"phrase_list": ["yes", "no"]}}))
        await ws.send('{"eof" : 1}')
        assert "text" in json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1000


async def test_vosk_odd_frame_drops_its_last_byte(daemon_factory):
    """As vosk-api (len // 2 samples): not an error, the session goes on."""
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
        await ws.send(b"\x01\x02\x03")
        assert json.loads(await ws.recv()) == {"partial": ""}
        await ws.send('{"eof" : 1}')
        assert json.loads(await ws.recv()) == {"text": ""}
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1000


# --- SIGTERM on a real `streamer serve` process ------------------------------------------------


async def test_sigterm_mid_stream_sends_finals_then_1001(tiny_models, speech, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "serve", "--model", str(tiny_models["layer-padfirst"]), "--port", "0",
        "--set", "endpoint.enabled=false", "--set", "server.shutdown_timeout_s=20", "--set", "server.drain_timeout_s=0",
        stderr=asyncio.subprocess.PIPE, env=env)
    try:
        async with asyncio.timeout(TIMEOUT):
            port = None
            while port is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "streamer serve exited before listening"
                if line.startswith("streamer: listening on ws://"):
                    port = int(line.split(":")[3].split("/")[0])
            async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
                await ws.recv()
                await ws.send(pcm16(speech[:48000]))
                while json.loads(await ws.recv())["type"] != "partial":
                    pass
                proc.send_signal(signal.SIGTERM)
                msgs = [json.loads(m) async for m in ws]
            assert ws.close_code == 1001
            finals = finals_of(msgs)
            assert finals and finals[-1]["reason"] == "end" and finals[-1]["end"] > 2.0
            assert msgs[-1]["type"] == "end"
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _serve_one_stream_on(loop: str | None, model, speech) -> tuple[list[str], list[dict]]:
    """``streamer serve --set server.loop=LOOP`` (None: the default): its log lines up to listening, and one native
    stream's messages; then SIGTERM, and it exits 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "serve", "--model", str(model), "--port", "0",
        *(("--set", f"server.loop={loop}") if loop else ()), stderr=asyncio.subprocess.PIPE, env=env)
    try:
        async with asyncio.timeout(TIMEOUT):
            lines: list[str] = []
            while not lines or not lines[-1].startswith("streamer: listening on ws://"):
                line = (await proc.stderr.readline()).decode()
                assert line, f"streamer serve exited before listening: {lines}"
                lines.append(line.rstrip())
            port = int(lines[-1].split(":")[3].split("/")[0])
            msgs, code = await native_session(port, pcm16(speech))
            assert code == 1000
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            return lines, msgs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_runs_on_uvloop_by_default_and_on_asyncio_when_asked(tiny_models, speech):
    """The daemon runs on uvloop by default (``server.loop = "auto"``: uvloop is a dependency here);
    ``server.loop = "asyncio"`` runs it on the standard loop. The log says which, and the same audio gets the same
    finals on both."""
    import uvloop

    model = tiny_models["layer-padfirst"]
    auto_log, auto_msgs = await _serve_one_stream_on(None, model, speech)
    plain_log, plain_msgs = await _serve_one_stream_on("asyncio", model, speech)
    assert any(line.endswith(f"event loop: uvloop {uvloop.__version__}") for line in auto_log), auto_log
    assert any(line.endswith("event loop: asyncio") for line in plain_log), plain_log
    assert finals_of(auto_msgs) and finals_of(auto_msgs) == finals_of(plain_msgs)


def test_server_loop_uvloop_without_it_is_a_clear_error(monkeypatch):
    from streamer.aio.loop import loop_factory
    from streamer.exceptions import ConfigError

    assert loop_factory("auto") is not None and loop_factory("asyncio") is None  # (uvloop is a dependency here)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # (as if it were not installed)
    assert loop_factory("auto") is None and loop_factory("asyncio") is None
    with pytest.raises(ConfigError, match=r"server.loop = 'uvloop' needs the uvloop package .*pip install uvloop"):
        loop_factory("uvloop")


async def test_port_in_use_is_a_clear_error(daemon_factory):
    from streamer.exceptions import StreamerError

    d = await daemon_factory()
    with pytest.raises(StreamerError, match=f"cannot listen on 127.0.0.1:{d.port}.*server.port"):
        await daemon_factory(f"server.port={d.port}")


async def test_viewer_follows_a_named_stream(daemon_factory, speech):
    d = await daemon_factory()
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/listen/desk") as viewer:
        assert json.loads(await viewer.recv()) == {"type": "ready", "stream": "desk", "mode": "listen"}
        msgs, _ = await native_session(d.port, pcm16(speech), start={"type": "start", "name": "desk"})
        seen = []
        while len([m for m in seen if m["type"] == "final"]) < len(finals_of(msgs)):
            seen.append(json.loads(await viewer.recv()))
        await viewer.send("hello")
        with pytest.raises(ConnectionClosed):
            while True:
                await viewer.recv()
    assert finals_of(seen) == finals_of(msgs)
    assert viewer.close_code == 1008


async def test_shutdown_sends_a_sources_last_final_to_its_viewers(daemon_factory):
    class Source:
        is_source = True

        def __init__(self):
            self.daemon = None

        async def start(self):
            pass

        async def stop(self):  # a capture source finalises its last words when stopped
            await asyncio.sleep(0.05)
            self.daemon.hub.publish("room", "s1", Final(0, "last words", 0.5, 1.25))

    source = Source()
    d = await daemon_factory(services=[source])
    source.daemon = d
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/listen/room") as viewer:
        await viewer.recv()
        shutdown = asyncio.create_task(d.shutdown())
        got = [json.loads(m) async for m in viewer]
        await shutdown
    assert got == [{"type": "final", "segment": 0, "text": "last words", "start": 0.5, "end": 1.25, "words": [],
                    "reason": "end"}]
    assert viewer.close_code == 1001


async def test_metrics_count_provisional_windows(daemon_factory, model_runner, speech):
    """Early partials show in /metrics: the provisional windows run and their model seconds; none when off."""
    from streamer.engine import StreamSession

    command = speech[: 16000 * 12 // 10]  # 1.2 s: shorter than the first full window (1.4 s)
    planned = StreamSession(Config().stream.schedule(), model_runner.vocab)  # plans what the daemon's session will
    count = 0
    for i in range(0, len(command), 1600):
        planned.accept_audio(command[i : i + 1600])
        count += sum(w.provisional for w in planned.windows_to_run())
    assert count > 0

    for early, expected in [("true", count), ("false", 0)]:
        d = await daemon_factory(f"stream.early_partials={early}")
        messages, _ = await native_session(d.port, pcm16(command), chunk=3200)
        _, _, metrics = await asyncio.to_thread(http_get, d.port, "/metrics")
        assert metric(metrics, "streamer_provisional_windows_total") == expected
        seconds = metric(metrics, "streamer_provisional_model_seconds_total")
        assert (0 < seconds < metric(metrics, "streamer_model_seconds_total")) if expected else seconds == 0
        texts = [m["type"] for m in messages if m["type"] in ("partial", "final") and m["text"]]
        assert texts[0] == ("partial" if expected else "final")  # the only text before the end is an early one


async def test_partial_refreshes_on_spare_time_and_counted(daemon_factory, model_runner, speech):
    """A live stream gets partials between full windows (refreshes run while the model is idle) and the same
    finals; with refresh_max_load = 0 every refresh is skipped and the events are those without refreshes; a
    client far ahead of real time gets none after its first seconds."""

    runs = {}
    for name, overrides, pace in [("on", (), 0.1), ("fast", (), 0.0), ("off", ("stream.refresh_interval_ms=0",), 0.0),
                                  ("skipped", ("worker.refresh_max_load=0",), 0.0)]:
        d = await daemon_factory(*overrides)
        messages, code = await native_session(d.port, pcm16(speech), pace=pace)  # 100 ms messages
        assert code == 1000
        _, _, metrics = await asyncio.to_thread(http_get, d.port, "/metrics")
        runs[name] = ([(m["type"], m["text"]) for m in messages if m["type"] in ("partial", "final")],
                      metric(metrics, 'streamer_refresh_windows_total{outcome="run"}', missing=0),
                      metric(metrics, 'streamer_refresh_windows_total{outcome="skipped"}', missing=0))
        assert finals_of(messages) == reference_finals(model_runner, speech)
    (on, ran, skipped), (_, ran_fast, skipped_fast) = runs["on"], runs["fast"]
    (off, *none), (skip_all, ran_0, skipped_all) = runs["off"], runs["skipped"]
    assert ran >= 10 and none == [0, 0]
    assert ran_0 == 0 and skipped_all == ran + skipped == ran_fast + skipped_fast  # the same refreshes were planned
    assert ran_fast < ran / 2  # at 2 s ahead of real time the stream is not live
    assert len([e for e in on if e[0] == "partial"]) > len([e for e in off if e[0] == "partial"])
    assert skip_all == off


async def test_a_client_that_wants_finals_only_costs_no_partials_unless_a_viewer_watches(daemon_factory, model_runner,
                                                                                         speech):
    """``"partials": false``: the client gets its finals, the same, and no partial; the daemon forms none (no
    provisional or refresh window, no partial counted) while nobody else takes them. A viewer of the stream's name
    takes them: then they are formed and it gets them, the client still only its finals."""

    expected = reference_finals(model_runner, speech)
    d = await daemon_factory()
    messages, code = await native_session(d.port, pcm16(speech), start={"type": "start", "partials": False},
                                          pace=0.1)  # live: refreshes would be planned
    assert code == 1000 and finals_of(messages) == expected
    assert not [m for m in messages if m["type"] == "partial"]
    _, _, metrics = await asyncio.to_thread(http_get, d.port, "/metrics")
    assert metric(metrics, 'streamer_events_total{type="final"}') == len(expected)
    for name in ('streamer_events_total{type="partial"}', "streamer_provisional_windows_total",
                 'streamer_refresh_windows_total{outcome="run"}', 'streamer_refresh_windows_total{outcome="skipped"}'):
        assert metric(metrics, name, missing=0) == 0, name

    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/listen/desk") as viewer:
        assert json.loads(await viewer.recv())["type"] == "ready"
        messages, code = await native_session(d.port, pcm16(speech), pace=0.1,
                                              start={"type": "start", "partials": False, "name": "desk"})
        seen = []
        while len(finals_of(seen)) < len(expected):
            seen.append(json.loads(await viewer.recv()))
    assert code == 1000 and finals_of(messages) == expected == finals_of(seen)
    assert not [m for m in messages if m["type"] == "partial"]
    assert [m for m in seen if m["type"] == "partial" and m["text"]]
    _, _, metrics = await asyncio.to_thread(http_get, d.port, "/metrics")
    assert metric(metrics, 'streamer_events_total{type="partial"}') > 0
    assert metric(metrics, "streamer_provisional_windows_total") > 0
