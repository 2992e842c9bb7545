"""The example clients against a real daemon on loopback."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
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
