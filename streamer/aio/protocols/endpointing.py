"""A stream's own endpointing and its voice events, for the protocols that offer them (native, Realtime).

The engine keeps the detector's speech started/stopped and the utterance ends apart from the transcript
(:meth:`streamer.engine.StreamSession.voice_events`); :func:`with_voice_events` puts them where they belong among a
stream call's events, so a protocol sends one ordered list.
"""

from __future__ import annotations

from collections.abc import Sequence

from streamer.aio.stream import LiveStream
from streamer.endpoint import EndpointRules
from streamer.events import Event, Message, UtteranceEnd
from streamer.transcribe import speech_detector

__all__ = ["own_endpointing", "with_voice_events"]


def own_endpointing(stream: LiveStream, rules: EndpointRules, *, voice_events: bool = False) -> None:
    """Give a stream that has had no audio yet its own endpoint rules (:func:`streamer.endpoint.stream_rules`)
    and the detector they need (or none). ``voice_events``: keep the detector's speech events for
    :func:`with_voice_events`."""
    stream.session.use_endpoint(rules, voice_events=voice_events)
    stream.detector = speech_detector(stream.session)


def with_voice_events(stream: LiveStream | None, events: Sequence[Event]) -> list[Message]:
    """A stream call's ``events`` with the session's voice events in their place: speech started/stopped before
    the transcript (they are read off the audio, ahead of the windows over it), utterance ends after it (each
    follows the final it closes). Call it right after the stream call returned: none of the stream's engine
    calls runs then."""
    voice = stream.session.voice_events() if stream is not None else []
    if not voice:
        return list(events)
    return [*(v for v in voice if not isinstance(v, UtteranceEnd)), *events,
            *(v for v in voice if isinstance(v, UtteranceEnd))]
