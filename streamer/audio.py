"""Audio at the edge: decoding PCM, downmixing, resampling to 16 kHz mono, reading files."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

if sys.version_info >= (3, 13):
    import audioop  # audioop-lts: the module the standard library dropped in 3.13, same name and functions
else:
    # audioop is deprecated in 3.11 and 3.12 and warns once at import; audioop-lts takes its place from 3.13,
    # so the warning says nothing a user can act on here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

from streamer.engine import SAMPLE_RATE, as_float32
from streamer.exceptions import AudioError

__all__ = ["ENCODINGS", "G711_ENCODINGS", "MAX_CHANNELS", "MAX_F32_ABS", "PCM_ENCODINGS", "AudioConverter",
           "bad_samples", "decode_pcm", "encode_g711", "iter_file_chunks", "read_audio"]

ENCODINGS = ("s16le", "f32le")
"""the encodings the native protocol takes"""
G711_ENCODINGS = ("mulaw", "alaw")
"""G.711, the 8-bit companded audio of phone calls (one byte a sample): what Twilio and Deepgram's clients send"""
PCM_ENCODINGS = ENCODINGS + G711_ENCODINGS
"""every encoding `decode_pcm` decodes"""
MAX_CHANNELS = 8
"""the most channels audio may have (7.1), as the native and Wyoming protocols allow: a file's decoded block
is rate x channels x 4 bytes, and 255 channels at 192 kHz cost ~200 MB a second of audio from a few KB of Ogg"""
MAX_F32_ABS = 64.0
"""The largest magnitude an f32le sample may have: full scale is 1.0; this leaves 36 dB of headroom
for unnormalised float audio and keeps the engine's normalisation far from overflow."""


def decode_pcm(data: bytes, encoding: str, channels: int) -> np.ndarray:
    """Decode interleaved PCM bytes into a float32 ``[frames, channels]`` array.

    ``s16le`` and ``f32le`` are little-endian; ``mulaw`` and ``alaw`` are G.711 bytes, expanded by ``audioop``
    (the standard library's before 3.13, audioop-lts after) to 16-bit samples, so they come out on the s16le scale.
    """
    if encoding in G711_ENCODINGS:
        if len(data) % channels:
            raise AudioError(f"audio message of {len(data)} bytes is not a whole number of {encoding} frames "
                             f"({channels} bytes each for {channels} channel(s))")
        linear = audioop.ulaw2lin(data, 2) if encoding == "mulaw" else audioop.alaw2lin(data, 2)
        # audioop writes samples in the machine's byte order
        return (np.frombuffer(linear, dtype=np.int16).astype(np.float32) / 32768.0).reshape(-1, channels)
    if encoding == "s16le":
        width, dtype = 2, "<i2"
    elif encoding == "f32le":
        width, dtype = 4, "<f4"
    else:
        raise AudioError(f"unsupported encoding {encoding!r}; use one of {', '.join(PCM_ENCODINGS)}")
    if len(data) % (width * channels):
        raise AudioError(
            f"audio message of {len(data)} bytes is not a whole number of {encoding} frames "
            f"({width * channels} bytes each for {channels} channel(s))"
        )
    a = np.frombuffer(data, dtype=dtype)
    x = a.astype(np.float32) / 32768.0 if encoding == "s16le" else a.astype(np.float32)
    if encoding == "f32le" and (bad := bad_samples(x)):
        raise AudioError(f"audio contains {bad} samples; send finite float samples in [-1, 1] "
                         f"(|x| up to {MAX_F32_ABS:g} is accepted)")
    return x.reshape(-1, channels)


def encode_g711(samples: np.ndarray, encoding: str) -> bytes:
    """Compand 16-bit samples (an int16 array) into G.711 ``mulaw`` or ``alaw`` bytes, as a phone network does."""
    if encoding not in G711_ENCODINGS:
        raise AudioError(f"unsupported encoding {encoding!r}; use one of {', '.join(G711_ENCODINGS)}")
    linear = np.ascontiguousarray(samples, dtype=np.int16).tobytes()  # machine order, as audioop reads it
    return audioop.lin2ulaw(linear, 2) if encoding == "mulaw" else audioop.lin2alaw(linear, 2)


def bad_samples(x: np.ndarray) -> str:
    """What is wrong with float samples that the engine must not see (NaN, inf, huge values); '' when nothing."""
    if not x.size or (np.abs(x) <= MAX_F32_ABS).all():  # NaN compares False
        return ""
    return "NaN or infinite" if not np.isfinite(x).all() else f"out-of-range (|x| > {MAX_F32_ABS:g})"


class AudioConverter:
    """Streams audio of any rate and channel count into 16 kHz mono float32 (soxr, mean downmix)."""

    def __init__(self, sample_rate: int, channels: int = 1, *, quality: str = "HQ") -> None:
        if sample_rate <= 0:
            raise AudioError(f"sample rate must be positive, got {sample_rate}")
        if channels <= 0:
            raise AudioError(f"channel count must be positive, got {channels}")
        self.sample_rate = sample_rate
        self.channels = channels
        self._resampler = None
        if sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality=quality)

    def convert(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """Convert a ``[frames]`` or ``[frames, channels]`` block; ``last=True`` drains the resampler."""
        a = np.asarray(block)
        if a.ndim == 1:
            a = a.reshape(-1, 1) if self.channels == 1 else a.reshape(-1, self.channels)
        if a.ndim != 2 or a.shape[1] != self.channels:
            raise AudioError(f"expected {self.channels} channel(s), got an array of shape {a.shape}")
        if a.dtype == np.int16:
            a = a.astype(np.float32) / 32768.0
        mono = a.mean(axis=1, dtype=np.float32) if self.channels > 1 else a[:, 0]
        mono = as_float32(np.ascontiguousarray(mono, dtype=np.float32))
        if self._resampler is None:
            return mono
        return np.asarray(self._resampler.resample_chunk(mono, last=last), dtype=np.float32)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a whole file with soundfile: ``([frames, channels] float32, rate)``, checked."""
    import soundfile as sf

    if not Path(path).is_file():
        raise AudioError(f"{path}: no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(
            f"{path}: cannot read audio ({exc}); use a format libsndfile reads: wav, flac, ogg, mp3"
        ) from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    if bad := bad_samples(data):
        raise AudioError(f"{path}: the file contains {bad} samples")
    return data, int(rate)


def iter_file_chunks(path: str | Path, chunk_ms: float) -> Iterator[tuple[np.ndarray, int, float]]:
    """Yield ``(chunk, rate, duration_s)`` blocks of ``chunk_ms`` of the file at its own rate."""
    data, rate = read_audio(path)
    step = max(1, int(round(rate * chunk_ms / 1000)))
    duration = data.shape[0] / rate
    for i in range(0, data.shape[0], step):
        yield data[i : i + step], rate, duration
