"""Vosk exactly as vosk-server: what its own clients do, unmodified, gets what vosk-server would give them.

vosk-server's clients (websocket/test*.py, the browser sample, the node client) send a config message
or none, then binary s16le frames of 0.2 s, each answered with one JSON reply, then ``{"eof" : 1}``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from conftest import pcm16
from websockets.asyncio.client import connect

from streamer.audio import AudioConverter
from streamer.config import Config, load_config
from streamer.decoder import build_decoder
from streamer.transcribe import new_session, stream_blocks, text_of

TIMEOUT = 60
VOSK = ("vosk.enabled=true", "vosk.port=0")


def reference_text(runner, audio: np.ndarray, rate: int = 16000) -> str:
    """What ``streamer transcribe`` prints for mono float32 ``audio`` at ``rate``."""
    cfg = load_config(None)
    session = new_session(cfg, runner.vocab, build_decoder(cfg.decoder, runner))
    blocks = (audio[i : i + rate // 10] for i in range(0, len(audio), rate // 10))
    return text_of(stream_blocks(session, runner, blocks, AudioConverter(rate, 1)))


async def vosk_client(port: int, frames: list[bytes], config: dict | None = None, after: dict | None = None,
                      config_text: str | None = None) -> tuple[list[dict], int | None]:
    """vosk-server's test.py: an optional config, frames each answered once, eof; ``after`` is sent as a
    config after the first frame. Returns the replies and the close code."""
    replies = []
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{port}/") as ws:
        if config_text is not None:
            await ws.send(config_text)
        elif config is not None:
            await ws.send(json.dumps({"config": config}))
        for i, frame in enumerate(frames):
            await ws.send(frame)
            replies.append(json.loads(await ws.recv()))
            if i == 0 and after is not None:
                await ws.send(json.dumps({"config": after}))
        await ws.send('{"eof" : 1}')
        replies.append(json.loads(await ws.recv()))
        await ws.wait_closed()
    return replies, ws.close_code


def frames_of(pcm: bytes, rate: int) -> list[bytes]:
    size = int(rate * 0.2) * 2  # vosk-server's clients: 0.2 s per frame
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def text_of_replies(replies: list[dict]) -> str:
    return " ".join(r["text"] for r in replies if r.get("text"))


def words_of_replies(replies: list[dict]) -> list[str]:
    return [w["word"] for r in replies for w in r.get("result", [])]


@pytest.fixture(scope="module")
def speech8k(speech):
    import soxr

    return soxr.resample(speech, 16000, 8000).astype(np.float32)


async def test_no_config_means_8000_hz(daemon_factory, model_runner, speech8k):
    """vosk-server's browser sample and node client send 8 kHz audio and no config message."""
    assert Config().vosk.sample_rate == 8000
    d = await daemon_factory(*VOSK)
    replies, code = await vosk_client(d.vosk_port, frames_of(pcm16(speech8k), 8000))
    expected = reference_text(model_runner, np.frombuffer(pcm16(speech8k), "<i2") / np.float32(32768), 8000)
    assert code == 1000 and {"turn", "timer"} <= set(expected.split())  # 8 kHz: fewer words right
    assert text_of_replies(replies) == expected
    assert len(replies) == len(frames_of(pcm16(speech8k), 8000)) + 1  # lock-step: one reply per frame, one for eof


async def test_numbers_sent_as_strings_are_converted(daemon_factory, model_runner, speech):
    d = await daemon_factory(*VOSK)
    frames = frames_of(pcm16(speech), 16000)
    as_numbers, _ = await vosk_client(d.vosk_port, frames, {"sample_rate": 16000, "max_alternatives": 2})
    as_strings, code = await vosk_client(d.vosk_port, frames, {"sample_rate": "16000", "max_alternatives": "2"})
    assert code == 1000 and as_strings == as_numbers
    results = [r for r in as_strings if "alternatives" in r]
    assert results and all(r["alternatives"] and "text" in r["alternatives"][0] for r in results)
    texts = " ".join(r["alternatives"][0]["text"] for r in results if r["alternatives"][0]["text"])
    assert texts == reference_text(model_runner, np.frombuffer(pcm16(speech), "<i2") / np.float32(32768))
    # a float rate as a string, as float() reads it; what float()/int() cannot read is a clear error
    replies, code = await vosk_client(d.vosk_port, frames[:2], {"sample_rate": " 1.6e4 "})
    assert code == 1000 and len(replies) == 3
    for bad in ({"sample_rate": "fast"}, {"max_alternatives": "2.5"}):
        async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
            await ws.send(json.dumps({"config": bad}))
            reply = json.loads(await ws.recv())
            await ws.wait_closed()
        assert str(next(iter(bad.values()))) in reply["error"] and ws.close_code == 1008


async def test_odd_length_frames_drop_their_last_byte(daemon_factory, model_runner, speech):
    """vosk-api reads len // 2 samples: a frame with a stray byte is not refused."""
    d = await daemon_factory(*VOSK)
    frames = frames_of(pcm16(speech), 16000)
    odd = [f + b"\x7f" for f in frames]  # each frame one byte too long: that byte goes
    replies, code = await vosk_client(d.vosk_port, odd, {"sample_rate": 16000})
    assert code == 1000 and len(replies) == len(frames) + 1
    assert text_of_replies(replies) == reference_text(model_runner, np.frombuffer(pcm16(speech), "<i2")
                                                      / np.float32(32768))
    replies, code = await vosk_client(d.vosk_port, [b"\x01", b"\x01\x02\x03"])  # 0 and 1 sample
    assert code == 1000 and replies[:2] == [{"partial": ""}, {"partial": ""}]


async def test_phrase_list_skips_words_the_model_cannot_spell(daemon_factory, speech, caplog):
    """Digits and punctuation ("lights,", "20") are not in the model's letters: skipped with a log line, as
    Vosk skips words missing from its vocabulary; the connection goes on with the rest of the list."""
    caplog.set_level(logging.INFO, "streamer.server")
    d = await daemon_factory(*VOSK)
    phrases = ["turn on the kitchen lights,", "set a timer for 20 minutes", "twenty", "lights"]
    replies, code = await vosk_client(d.vosk_port, frames_of(pcm16(speech), 16000),
                                      {"sample_rate": 16000, "phrase_list": phrases})
    assert code == 1000
    listed = {"turn", "on", "the", "kitchen", "set", "a", "timer", "for", "minutes", "twenty", "lights"}
    words = words_of_replies(replies)
    assert words and set(words) <= listed
    assert {"kitchen", "timer", "twenty"} <= set(words)
    assert "ignoring 2 word(s) the model cannot spell: 'lights,', '20'" in caplog.text


@pytest.mark.parametrize("phrases", [[], ["[unk]"]], ids=["empty", "unk-only"])
async def test_empty_and_unk_only_phrase_lists_mean_no_restriction(daemon_factory, speech, phrases):
    d = await daemon_factory(*VOSK)
    frames = frames_of(pcm16(speech), 16000)
    plain, _ = await vosk_client(d.vosk_port, frames, {"sample_rate": 16000})
    listed, code = await vosk_client(d.vosk_port, frames, {"sample_rate": 16000, "phrase_list": phrases})
    assert code == 1000 and listed == plain
    # a phrase list that spells nothing (digits only) restricts nothing either
    digits, code = await vosk_client(d.vosk_port, frames, {"sample_rate": 16000, "phrase_list": ["1 2", "3"]})
    assert code == 1000 and digits == plain


async def test_unk_in_the_phrase_list_reads_speech_outside_it_as_unk(daemon_factory, speech):
    """Without [unk], every stretch of speech is forced onto listed words; with it, "kitchen lights" and
    "set a timer for twenty minutes" (not listed) come out as [unk] while the listed words stay."""
    d = await daemon_factory(*VOSK)
    frames = frames_of(pcm16(speech), 16000)
    forced, _ = await vosk_client(d.vosk_port, frames, {"sample_rate": 16000, "phrase_list": ["turn on the"]})
    with_unk, code = await vosk_client(d.vosk_port, frames,
                                       {"sample_rate": 16000, "phrase_list": ["turn on the", "[unk]"]})
    assert code == 1000
    assert "[unk]" not in words_of_replies(forced) and set(words_of_replies(forced)) <= {"turn", "on", "the"}
    words = words_of_replies(with_unk)
    assert "[unk]" in words and {"turn", "on"} <= set(words) and set(words) <= {"turn", "on", "the", "[unk]"}


async def test_config_after_audio_is_ignored_with_a_log_line(daemon_factory, model_runner, speech, caplog):
    """vosk-server makes its recognizer at the first frame: a phrase_list or sample_rate sent later changes
    nothing (and closes nothing); words and max_alternatives apply from then on."""
    caplog.set_level(logging.INFO, "streamer.server")
    d = await daemon_factory(*VOSK)
    frames = frames_of(pcm16(speech), 16000)
    plain, _ = await vosk_client(d.vosk_port, frames, {"sample_rate": 16000, "words": False})
    late, code = await vosk_client(d.vosk_port, frames, {"sample_rate": 16000, "words": False},
                                   after={"phrase_list": ["yes", "no"], "sample_rate": 8000})
    assert code == 1000 and late == plain
    assert "phrase_list after audio is ignored" in caplog.text and "sample_rate after audio is ignored" in caplog.text
    late_words, _ = await vosk_client(d.vosk_port, frames, {"sample_rate": 16000, "words": False},
                                      after={"words": True})
    assert words_of_replies(late_words) and text_of_replies(late_words) == text_of_replies(plain)


async def test_what_already_matched_still_does(daemon_factory, speech):
    """eof and reset with any spacing, any URL path, and a message over 1 MiB closed with 1009."""
    d = await daemon_factory(*VOSK)
    frames = frames_of(pcm16(speech), 16000)
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/any/path?x=1") as ws:
        await ws.send('{"config" : {"sample_rate" : 16000}}')
        for frame in frames[:10]:
            await ws.send(frame)
            await ws.recv()
        await ws.send('{ "reset":1 }')
        assert "text" in json.loads(await ws.recv())
        await ws.send(frames[10])
        assert set(json.loads(await ws.recv())) & {"partial", "text"}
        await ws.send('{"eof":1}')
        assert "text" in json.loads(await ws.recv())
        await ws.wait_closed()
    assert ws.close_code == 1000
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{d.vosk_port}/", max_size=None) as ws:
        await ws.send(b"\0" * ((1 << 20) + 2))
        await ws.wait_closed()
    assert ws.close_code == 1009
