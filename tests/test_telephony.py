"""Phone calls: G.711 decoding, Twilio Media Streams and Asterisk AudioSocket."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.audio import PCM_ENCODINGS, decode_pcm, encode_g711
from streamer.exceptions import AudioError

# ---------------------------------------------------------------------------------------------------------- G.711


def sine(rate: int = 8000, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")


@pytest.mark.parametrize(("encoding", "silence"), [("mulaw", 0xFF), ("alaw", 0xD5)])
def test_g711_silence_decodes_to_nearly_zero(encoding: str, silence: int) -> None:
    x = decode_pcm(bytes([silence]) * 160, encoding, 1)
    assert x.shape == (160, 1) and x.dtype == np.float32
    assert np.abs(x).max() <= 8 / 32768


@pytest.mark.parametrize(("encoding", "data", "expected"), [
    # G.711's tables: the largest codes and the smallest steps either side of zero
    ("mulaw", b"\x00\x80\xff\x7f\xfe", [-32124, 32124, 0, 0, 8]),
    ("alaw", b"\x2a\xaa\xd5\x55", [-32256, 32256, 8, -8]),
])
def test_g711_known_codes(encoding: str, data: bytes, expected: list[int]) -> None:
    assert (decode_pcm(data, encoding, 1).ravel() * 32768).round().astype(int).tolist() == expected


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_g711_sine_round_trips_within_the_companding_error(encoding: str) -> None:
    x = sine()
    y = decode_pcm(encode_g711(x, encoding), encoding, 1).ravel()
    ref = x / 32768
    # G.711 keeps 4 bits of mantissa: an error of at most 1/32 of the sample, or half the smallest step near zero
    assert (np.abs(y - ref) <= np.abs(ref) / 32 + 16 / 32768).all()
    assert np.corrcoef(y, ref)[0, 1] > 0.999


def test_g711_channels_interleave() -> None:
    data = encode_g711(np.array([1000, -1000] * 80, np.int16), "mulaw")
    x = decode_pcm(data, "mulaw", 2)
    assert x.shape == (80, 2) and (x[:, 0] > 0).all() and (x[:, 1] < 0).all()
    with pytest.raises(AudioError, match="whole number of mulaw frames"):
        decode_pcm(data[:-1], "mulaw", 2)


def test_unknown_encoding_names_g711() -> None:
    assert {"mulaw", "alaw"} <= set(PCM_ENCODINGS)
    with pytest.raises(AudioError, match="mulaw, alaw"):
        decode_pcm(b"\0\0", "opus", 1)
    with pytest.raises(AudioError, match="use one of mulaw, alaw"):
        encode_g711(sine(), "s16le")
