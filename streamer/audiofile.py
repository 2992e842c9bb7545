"""A sound file held in memory, decoded a block at a time into the 16 kHz mono the engine takes.

The uploads of the HTTP APIs (OpenAI's transcriptions, Deepgram's pre-recorded requests) are files in any
format libsndfile reads. :class:`FileAudio` opens one from bytes, refuses what the daemon does not take
(sample rates, channels, length) with a :class:`FileAudioError` each API answers in its own shape, and
decodes and resamples a block at a time, so a long file is never whole in memory as samples.
"""

from __future__ import annotations

import io

import numpy as np

from streamer.audio import MAX_CHANNELS, AudioConverter, bad_samples
from streamer.exceptions import AudioError

__all__ = ["READ_BLOCK_S", "FileAudio", "FileAudioError"]

READ_BLOCK_S = 1.0
"""audio decoded (and resampled) per step"""


class FileAudioError(AudioError):
    """A file the daemon cannot or will not transcribe; ``code``: ``invalid_value`` or ``audio_too_long``."""

    def __init__(self, message: str, *, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.code = code


class FileAudio:
    """A sound file held in memory (any format libsndfile reads), decoded a block at a time into 16 kHz mono.

    Make it and call :meth:`read` in a thread (``asyncio.to_thread``): both decode and resample.
    """

    def __init__(self, data: bytes, filename: str, max_audio_s: float, min_rate: int, max_rate: int, *,
                 max_audio_key: str = "openai.max_audio_s") -> None:
        import soundfile as sf

        if not data:
            raise FileAudioError(f"the file {filename[:80]!r} is empty")
        try:
            self.file = sf.SoundFile(io.BytesIO(data))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
            reason = str(exc).split(">: ", 1)[-1]  # without "Error opening <_io.BytesIO object at 0x...>"
            raise FileAudioError(f"cannot read the audio of {filename[:80]!r} ({reason}); use a format libsndfile "
                                 "reads: wav, flac, ogg, mp3") from None
        self.rate, self.channels = int(self.file.samplerate), int(self.file.channels)
        if not min_rate <= self.rate <= max_rate:
            raise FileAudioError(f"the audio's sample rate is {self.rate} Hz; this server takes {min_rate} to "
                                 f"{max_rate} Hz (server.min_sample_rate, server.max_sample_rate)")
        if self.channels > MAX_CHANNELS:
            self.file.close()
            raise FileAudioError(f"the audio has {self.channels} channels; this server takes at most {MAX_CHANNELS}")
        self.max_frames = int(max_audio_s * self.rate)
        self.max_audio_key = max_audio_key
        if self.file.frames > self.max_frames:
            raise FileAudioError(f"the audio is {self.file.frames / self.rate:.0f} s long; at most {max_audio_s:g} s "
                                 f"({max_audio_key})", code="audio_too_long")
        self.converter = AudioConverter(self.rate, self.channels)
        self.frames = 0
        """frames read so far (at the file's rate)"""

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    def read(self) -> tuple[np.ndarray, bool]:
        """The next block as 16 kHz mono float32, and whether the file has ended (then it is the resampler's rest)."""
        import soundfile as sf

        try:
            block = self.file.read(max(1, int(self.rate * READ_BLOCK_S)), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise FileAudioError(f"the audio cannot be decoded after {self.seconds:.1f} s ({exc})") from None
        if not len(block):
            if not self.frames:
                raise FileAudioError("the file holds no audio samples")
            self.file.close()
            return self.converter.convert(np.zeros((0, self.channels), np.float32), last=True), True
        self.frames += len(block)
        if self.frames > self.max_frames:
            raise FileAudioError(f"the audio is longer than {self.max_audio_key} = {self.max_frames / self.rate:g} s",
                                 code="audio_too_long")
        if bad := bad_samples(block):
            raise FileAudioError(f"the audio contains {bad} samples")
        return self.converter.convert(block), False
