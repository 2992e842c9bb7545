"""The example clients against a real daemon on loopback."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamer.config import Config
from streamer.decoder import build_decoder
from streamer.events import Final
from streamer.transcribe import new_session, stream_array

ROOT = Path(__file__).resolve().parent.parent


async def run(*cmd, stdin=None, limit=60):
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE if stdin else None,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(limit):
        out, err = await proc.communicate(stdin)
    return proc.returncode, out.decode(), err.decode()


def expected_finals(runner, audio):
    session = new_session(Config(), runner.vocab, build_decoder(Config().decoder, runner))
    return [e.text for e in stream_array(session, runner, audio) if isinstance(e, Final)]


async def test_caption_client_file_and_stdin(daemon_factory, model_runner, speech, tmp_path):
    d = await daemon_factory()
    url = f"ws://127.0.0.1:{d.port}/v1/stream"
    wav = tmp_path / "s.wav"
    sf.write(wav, speech, 16000, subtype="PCM_16")
    code, out, err = await run(sys.executable, str(ROOT / "clients" / "caption.py"), "--fast", "--url", url, str(wav))
    assert code == 0, err
    lines = [line.split("] ", 1)[1] for line in out.splitlines()]
    ints, _ = sf.read(wav, dtype="int16")
    assert lines == expected_finals(model_runner, ints.astype(np.float32) / 32768)
    assert out.splitlines()[0].startswith("[   0.")
    # written to a file, not a terminal: it asked for the finals only, and the daemon formed no partial
    assert not d.metrics.registry.get_sample_value("streamer_events_total", {"type": "partial"})
    code, out2, err = await run(sys.executable, str(ROOT / "clients" / "caption.py"), "--fast", "--url", url, "-",
                                stdin=ints.astype("<i2").tobytes())
    assert code == 0, err
    assert out2 == out


async def test_caption_client_reports_auth_failure(daemon_factory, speech, tmp_path):
    d = await daemon_factory("server.auth_token='x'")
    wav = tmp_path / "s.wav"
    sf.write(wav, speech[:16000], 16000)
    code, out, err = await run(sys.executable, str(ROOT / "clients" / "caption.py"), "--url",
                               f"ws://127.0.0.1:{d.port}/v1/stream", str(wav))
    assert code == 1 and "HTTP 401" in err and "--token" in err


@pytest.mark.slow
async def test_caption_fast_gets_every_final_from_a_server_that_is_behind(daemon_factory, model_runner, tmp_path):
    """A client with ``--fast`` over a long file while the server is far behind (each window waits
    ``worker.max_wait_ms`` for company, so 40 s of audio take the server about a minute). The old client piled the
    whole file into socket buffers, its keepalive ping waited behind it, and it closed itself (1011) with finals
    missing. Now it reads while it sends, bounds the audio in flight and keeps no keepalive of its own: every final
    arrives, equal to ``streamer transcribe``'s."""
    from streamer.testing import espeak_audio

    texts = ["turn on the kitchen lights", "set a timer for twenty minutes", "open the garage door",
             "play some quiet music"]
    parts = []
    for i in range(16):
        parts += [espeak_audio(texts[i % len(texts)]), np.zeros(8000, np.float32)]
    wav = tmp_path / "long.wav"
    sf.write(wav, np.concatenate(parts), 16000, subtype="PCM_16")
    ints, _ = sf.read(wav, dtype="int16")
    d = await daemon_factory("worker.max_wait_ms=500")

    async def caption():
        t0 = time.monotonic()
        result = await run(sys.executable, str(ROOT / "clients" / "caption.py"), "--fast", "--url",
                           f"ws://127.0.0.1:{d.port}/v1/stream", str(wav), limit=240)
        return *result, time.monotonic() - t0

    (code, out, err, took), expected = await asyncio.gather(
        caption(), asyncio.to_thread(expected_finals, model_runner, ints.astype(np.float32) / 32768))
    # websockets' keepalive pings after 20 s and gives up 20 s later: the server must need longer than that
    assert took > 40, f"the server was not behind enough to test the keepalive ({took:.0f} s)"
    assert code == 0, err
    assert [line.split("] ", 1)[1] for line in out.splitlines()] == expected
    assert len(expected) == 16
