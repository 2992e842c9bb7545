"""Hostile clients (issue 14): bad input gets its error event and close code, never 1011; the idle timeout counts
audio; names cannot be taken from other streams; a message the MQTT broker refuses cannot block the others; the
HTTP side answers odd requests with a 4xx and one log line. Where a finding is about other clients, a healthy
stream runs beside the hostile one and must get the finals ``streamer transcribe`` gives."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from conftest import pcm16
from test_server import TIMEOUT, finals_of, native_session, reference_finals
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def as_s16(audio: np.ndarray) -> np.ndarray:
    """The float audio a server decodes from ``pcm16(audio)``."""
    return np.frombuffer(pcm16(audio), "<i2").astype(np.float32) / 32768


async def until_closed(ws) -> list[dict]:
    """Every message until the server closes."""
    msgs = []
    async with asyncio.timeout(TIMEOUT):
        try:
            async for msg in ws:
                msgs.append(json.loads(msg))
        except ConnectionClosed:
            pass
    return msgs


async def healthy_finals_match(d, runner, speech, **kwargs) -> None:
    """A healthy native stream on ``d`` gets exactly the finals ``streamer transcribe`` gives."""
    msgs, code = await native_session(d.port, pcm16(speech), chunk=1600, pace=0.003, **kwargs)
    assert code == 1000
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(runner, as_s16(speech))]


# --- finding 10: every bad input gets its error event and documented close code ------------------------------

DEEP = "[" * 100_000 + "]" * 100_000

HOSTILE_INPUTS = [
    ("bad_message", ['{"type": "start", "words": ' + DEEP + "}"], 1007),  # RecursionError in json
    ("bad_message", ['{"type": "start", "words": [[[[[[[[[[[[[[[[["turn"]]]]]]]]]]]]]]]]]}'], 1007),  # 18 deep
    ("malformed_json", ['{"type": "start", "sample_rate": 1' + "0" * 5000 + "}"], 1007),  # int over 4300 digits
    ("malformed_json", ['{"type": "start", "sample_rate": NaN}'], 1007),
    ("malformed_json", ['{"type": "start", "sample_rate": -Infinity}'], 1007),
    ("unsupported_rate", ['{"type": "start", "sample_rate": 1e400}'], 1008),  # json reads inf
    ("bad_audio", [{"type": "start", "encoding": "f32le"}, np.array([0.1, 3e38], "<f4").tobytes()], 1007),
    ("bad_audio", [{"type": "start", "encoding": "f32le"}, np.array([0.1, -65.0], "<f4").tobytes()], 1007),
    ("bad_start", [{"type": "start", "name": "x\n"}], 1008),  # '$' matched before the newline
    ("bad_start", [{"type": "start", "name": "a/b"}], 1008),
]


@pytest.mark.parametrize(("code_name", "sends", "close_code"), HOSTILE_INPUTS,
                         ids=[b[0] + str(i) for i, b in enumerate(HOSTILE_INPUTS)])
async def test_hostile_input_gets_its_error_and_close_code(daemon_factory, model_runner, speech, code_name, sends,
                                                           close_code):
    d = await daemon_factory()
    healthy = asyncio.create_task(healthy_finals_match(d, model_runner, speech))
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream", max_size=None) as ws:
        await ws.recv()
        for item in sends:
            await ws.send(json.dumps(item) if isinstance(item, dict) else item)
        msgs = await until_closed(ws)
    assert [(m["type"], m.get("code")) for m in msgs] == [("error", code_name)], msgs
    assert msgs[0]["message"] and ws.close_code == close_code
    await healthy


VOSK_RATES = [("NaN", 1007), ("Infinity", 1007), ("-Infinity", 1007), ("1e400", 1008), ("1e308", 1008)]


@pytest.mark.parametrize(("rate", "close_code"), VOSK_RATES, ids=[r for r, _ in VOSK_RATES])
async def test_vosk_sample_rate_that_is_no_number(daemon_factory, speech, rate, close_code):
    """JSON's NaN/Infinity literals (Python's json reads them) and 1e400 (read as inf) crashed at the first frame."""
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
        await ws.send('{"config": {"sample_rate": %s}}' % rate)  # noqa: UP031 (a JSON literal, not a Python value)
        try:
            await ws.send(pcm16(speech[:3200]))
        except ConnectionClosed:
            pass
        replies = await until_closed(ws)
    assert len(replies) == 1 and ("sample_rate" in replies[0]["error"] or "JSON" in replies[0]["error"]), replies
    assert ws.close_code == close_code


async def test_out_of_range_float_audio_after_speech_keeps_the_finals(daemon_factory, model_runner, speech):
    """Huge finite f32le samples (3e38) became NaN in the engine's normalisation and lost the finals of the speech
    before them; now the frame is refused, and the finals of what was accepted come first, then the error."""
    d = await daemon_factory()
    audio = speech[:-8000].astype("<f4")  # without the last pause: the last final comes from the stream's end
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "start", "encoding": "f32le"}))
        for i in range(0, len(audio), 3200):
            await ws.send(audio[i : i + 3200].tobytes())
        await ws.send(np.full(1600, 3e38, "<f4").tobytes())
        msgs = await until_closed(ws)
    assert [f["text"] for f in finals_of(msgs)] == [f["text"] for f in reference_finals(model_runner, audio)]
    assert len(finals_of(msgs)) == 2 and finals_of(msgs)[-1]["reason"] == "end"
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "bad_audio" and "out-of-range" in msgs[-1]["message"]
    assert ws.close_code == 1007


# --- finding 8: the idle timeout counts audio, not control messages -------------------------------------------


async def test_control_messages_do_not_keep_a_stream_open(daemon_factory, speech):
    """A client that sends only {"type": "flush"} every few seconds held its slot forever."""
    d = await daemon_factory("server.idle_timeout_s=1.0")
    audio = pcm16(speech)
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
        await ws.recv()
        for i in range(6):  # audio every 0.3 s for 1.8 s: longer than the idle timeout, still open
            await ws.send(audio[i * 3200 : (i + 1) * 3200])
            await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionClosed):
            for _ in range(20):  # 6 s of flushes at most
                await ws.send(json.dumps({"type": "flush"}))
                await asyncio.sleep(0.3)
        waited = loop.time() - t0
    assert ws.close_code == 1000 and ws.close_reason == "idle timeout"
    assert waited < 2.5


async def test_vosk_reset_does_not_keep_a_stream_open(daemon_factory, speech):
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0", "server.idle_timeout_s=1.0")
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
        await ws.send(pcm16(speech[:6400]))
        await ws.recv()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionClosed):
            for _ in range(20):
                await ws.send(json.dumps({"reset": 1}))
                await ws.recv()
                await ws.send(json.dumps({"config": {"words": True}}))
                await asyncio.sleep(0.3)
        waited = loop.time() - t0
    assert ws.close_code == 1000 and ws.close_reason == "idle timeout"
    assert waited < 2.5
