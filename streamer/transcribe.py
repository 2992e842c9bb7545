"""Synchronous helpers that drive a :class:`StreamSession` with a model runner.

Used by ``streamer transcribe``, ``streamer eval`` and ``streamer bench``: the same engine and
runner the daemon uses, without asyncio.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from streamer.audio import AudioConverter, iter_file_chunks
from streamer.config import Config
from streamer.ctc import Vocabulary
from streamer.endpoint import EndpointRules
from streamer.engine import RunFn, StreamSession, WordDecoder, as_float32, run_session
from streamer.events import Event, Final
from streamer.runner import FrameGeometry
from streamer.vad import SpeechDetector, load_vad

__all__ = ["feed_audio", "new_session", "speech_detector", "stream_array", "stream_file", "text_of"]


def new_session(cfg: Config, vocab: Vocabulary, words: WordDecoder | None = None, *,
                record_frames: bool = False, geometry: FrameGeometry | None = None,
                refresh: bool = False, endpoint: EndpointRules | None = None,
                voice_events: bool = False, partials: bool = True) -> StreamSession:
    """A session with the configured window schedule and endpoint rules.

    ``words``: the word decoder (:func:`streamer.decoder.build_decoder`), or None for greedy CTC.
    ``geometry``: the model's frame grid (:func:`streamer.runner.geometry_of` the runner); None = wav2vec2's.
    ``refresh``: plan the partial refreshes of ``[stream] refresh_interval_ms`` (a live stream's); off for a file,
    which has nobody to show fresher partials to (:func:`run_session` would only skip them).
    ``endpoint``: the stream's own endpoint rules (a client's), instead of ``[endpoint]``'s.
    ``voice_events``: keep the detector's speech started/stopped events (:meth:`StreamSession.voice_events`).
    ``partials``: show partials (:attr:`StreamSession.partials`; off where only the finals are read).
    """
    schedule = cfg.stream.schedule()
    if geometry is not None:
        schedule = cfg.stream.schedule(geometry.frame_samples, geometry.receptive_field)
    if not refresh:
        schedule = dataclasses.replace(schedule, refresh=0)
    return StreamSession(schedule, vocab, endpoint or cfg.endpoint.rules(), record_frames=record_frames, words=words,
                         voice_events=voice_events, partials=partials)


def speech_detector(session: StreamSession) -> SpeechDetector | None:
    """The voice-activity detector to feed with the session's audio (``[endpoint] vad``), or None without the rule."""
    return SpeechDetector(load_vad()) if session.vad else None


def feed_audio(session: StreamSession, samples: np.ndarray, detector: SpeechDetector | None, *,
               heard: bool = False) -> None:
    """Give the session 16 kHz mono ``samples`` and, with a ``detector``, their speech probabilities.

    Then run the session's windows. The detector must be this session's own (it carries the stream's state).
    ``heard``: the detector was given the samples already (:meth:`SpeechDetector.add`, so that
    :func:`streamer.vad.score` could run them with other streams' frames); only their probabilities are read.
    """
    session.accept_audio(samples)  # (checks and converts them; the detector hears them only if the session took them)
    if detector is not None:
        if not heard:
            detector.add(as_float32(samples))
        session.accept_speech(detector.take())


def stream_blocks(
    session: StreamSession, run: RunFn, blocks: Iterable[np.ndarray], converter: AudioConverter
) -> Iterator[Event]:
    """Feed blocks (at the converter's rate and channels) and yield events as they come."""
    detector = speech_detector(session)
    for block in blocks:
        feed_audio(session, converter.convert(block), detector)
        run_session(session, run)
        yield from session.events_received()
    feed_audio(session, converter.convert(np.zeros((0, converter.channels), np.float32), last=True), detector)
    session.finish()
    run_session(session, run)
    yield from session.events_received()


def stream_array(session: StreamSession, run: RunFn, audio: np.ndarray, chunk: int = 1600) -> list[Event]:
    """Stream a 16 kHz mono array in chunks of ``chunk`` samples; return every event."""
    blocks = (audio[i : i + chunk] for i in range(0, len(audio), chunk))
    return list(stream_blocks(session, run, blocks, AudioConverter(16000, 1)))


def stream_file(
    session: StreamSession,
    run: RunFn,
    path: str | Path,
    chunk_ms: float = 100.0,
    progress: Callable[[float, float], None] | None = None,
) -> Iterator[Event]:
    """Stream a file (any rate, any channels) in ``chunk_ms`` pieces; yield events.

    ``progress(seconds_done, seconds_total)`` is called after each chunk.
    """
    chunks = iter_file_chunks(path, chunk_ms)
    first = next(chunks)
    _, rate, duration = first
    converter = AudioConverter(rate, first[0].shape[1])

    def blocks() -> Iterator[np.ndarray]:
        done = 0
        for block, _, _ in itertools.chain([first], chunks):
            yield block
            done += len(block)
            if progress:
                progress(done / rate, duration)

    yield from stream_blocks(session, run, blocks(), converter)


def text_of(events: Iterable[Event]) -> str:
    """The transcript: the finals' texts joined by spaces."""
    return " ".join(e.text for e in events if isinstance(e, Final) and e.text).strip()
