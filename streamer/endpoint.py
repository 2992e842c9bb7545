"""When a segment ends: sherpa-onnx's three endpoint rules over CTC frames, as a small pure object.

Silence is counted in final frames whose greedy id is the blank (or the word delimiter after a
word): a segment with no text ends after ``silence_no_speech_s`` of it, a segment with text after
``silence_after_speech_s``, and any segment at ``max_utterance_s``. The engine asks
:meth:`Endpointer.reason` after each final frame and :meth:`Endpointer.silence_ahead` with the
look-ahead frames of a window.

With ``vad`` on, a voice-activity detector adds a fourth, faster rule: :class:`VadTracker` reads its
speech probabilities (one per ``vad_frame_samples``) and marks the point where ``vad_silence_s`` of
non-speech follows speech; the engine then runs one window up to that point and ends the segment
there if the CTC frames over that silence are blank or the delimiter too (so a pause inside a word,
which CTC still spells, does not cut it). The rules over CTC frames stay as the fallback. With ``enabled``
off, nothing ends a segment but the caller's flush and ``max_utterance_s``; the detector's speech events still
come.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from streamer.ctc import FRAME_S

__all__ = ["EndpointRules", "Endpointer", "VadTracker", "stream_rules", "vad_points"]


@dataclass(frozen=True)
class EndpointRules:
    """The three rules, in seconds (``[endpoint]`` in the config builds one)."""

    enabled: bool = True
    silence_no_speech_s: float = 2.4
    silence_after_speech_s: float = 0.8
    max_utterance_s: float = 20.0
    vad: bool = False
    """end a segment with text where the voice-activity detector hears ``vad_silence_s`` of non-speech after
    speech and the CTC frames over it are quiet (the caller feeds the session speech probabilities)"""
    vad_silence_s: float = 0.3
    vad_threshold: float = 0.5
    """a probability at or above this is speech"""
    vad_frame_samples: int = 512
    """samples per speech probability (Silero VAD's 32 ms frame at 16 kHz)"""
    utterance_end_s: float = 0.0
    """after a final with text, report an utterance end once the model's frames have held no word for this long
    after its last word (:class:`streamer.events.UtteranceEnd`); 0: never. Not an endpoint: it closes nothing"""

    def __post_init__(self) -> None:
        if self.vad_frame_samples < 1 or not 0.0 < self.vad_threshold <= 1.0 or self.vad_silence_s <= 0:
            raise ValueError(f"bad voice-activity rule: frame {self.vad_frame_samples} samples, threshold "
                             f"{self.vad_threshold}, silence {self.vad_silence_s} s")
        if self.utterance_end_s < 0:
            raise ValueError(f"bad utterance end: {self.utterance_end_s} s")

    @property
    def vad_silence_frames(self) -> int:
        """Non-speech probabilities in a row that end speech (at least one)."""
        return max(1, math.ceil(round(self.vad_silence_s * 16_000) / self.vad_frame_samples))


def stream_rules(rules: EndpointRules, *, endpointing_ms: int | bool | None = None,
                 utterance_end_ms: int | None = None, speech_events: bool = False) -> EndpointRules:
    """A stream's own rules from the daemon's ``rules`` and a client's choices (a native ``start``).

    ``endpointing_ms``: an utterance ends that long after the detector last heard speech (with quiet CTC frames,
    as always), and the CTC rule waits at least as long; False: nothing ends one but the client's flush and the
    length cap (the ``enabled`` switch); None or True: ``rules`` as they are. ``speech_events``: the stream wants
    the detector's speech events, so it runs the detector, whose rule then ends its utterances too.
    ``utterance_end_ms``: see :attr:`EndpointRules.utterance_end_s`.
    """
    out = rules
    if endpointing_ms is False:
        out = dataclasses.replace(out, enabled=False, vad=speech_events)
    elif endpointing_ms is not None and endpointing_ms is not True:
        silence = endpointing_ms / 1000
        out = dataclasses.replace(out, enabled=True, vad=True, vad_silence_s=silence,
                                  silence_after_speech_s=max(out.silence_after_speech_s, silence))
    if speech_events:
        out = dataclasses.replace(out, vad=True)
    if utterance_end_ms is not None:
        out = dataclasses.replace(out, utterance_end_s=utterance_end_ms / 1000)
    return out


class Endpointer:
    """The rules in frames of ``frame_s`` seconds."""

    def __init__(self, rules: EndpointRules | None = None, frame_s: float = FRAME_S) -> None:
        self.rules = rules if rules is not None else EndpointRules()
        self.enabled = self.rules.enabled
        self.no_speech = round(self.rules.silence_no_speech_s / frame_s)
        self.after_speech = round(self.rules.silence_after_speech_s / frame_s)
        self.max_frames = round(self.rules.max_utterance_s / frame_s)

    def reason(self, has_text: bool, trailing_silence: int, n_frames: int) -> str:
        """Why a segment in this state ends now: ``silence``, ``max_length``, or ``""`` (it goes on).

        A segment with no text that reaches either limit ends as ``silence`` (no event: nothing said). With
        ``enabled`` off only the length limit holds: a client that never flushes still gets its finals.
        """
        if not self.enabled:
            return "" if n_frames < self.max_frames else "max_length" if has_text else "silence"
        if has_text:
            if trailing_silence >= self.after_speech:
                return "silence"
            if n_frames >= self.max_frames:
                return "max_length"
            return ""
        if trailing_silence >= self.no_speech or n_frames >= self.max_frames:
            return "silence"
        return ""

    def silence_ahead(self, has_text: bool, trailing_silence: int, quiet_lookahead: int) -> bool:
        """Whether the after-speech rule holds counting ``quiet_lookahead`` leading silent look-ahead frames.

        The final frames end one look-ahead before the audio received; when the look-ahead is quiet as
        well, the segment can close now instead of one look-ahead later, so finals come
        ``silence_after_speech_s`` after the speech, not that plus the look-ahead.
        """
        return self.enabled and has_text and trailing_silence + quiet_lookahead >= self.after_speech


class VadTracker:
    """Where the voice-activity rule asks for an endpoint: speech probabilities in, sample positions out.

    Pure and incremental: :meth:`push` takes the probability of the next frame and says whether that
    frame completes ``vad_silence_s`` of non-speech after speech; the point asked for is then the end
    of that frame, :attr:`end` samples into the stream. One point per stretch of speech.
    """

    def __init__(self, rules: EndpointRules) -> None:
        self.rules = rules
        self.need = rules.vad_silence_frames
        self.frames = 0
        """probabilities pushed so far"""
        self.heard = False  # speech since the last point asked for (or the last reset)
        self.quiet = 0  # non-speech frames in a row
        self.speaking = False
        """whether the last frame was speech"""
        self.started = False
        """whether the last frame began a stretch of speech (the first speech since the stream's start or the
        last point asked for)"""

    @property
    def end(self) -> int:
        """Samples covered by the probabilities pushed so far."""
        return self.frames * self.rules.vad_frame_samples

    def push(self, prob: float) -> bool:
        """Take the next frame's probability; true when an endpoint is due at :attr:`end`."""
        self.frames += 1
        self.speaking = prob >= self.rules.vad_threshold
        self.started = self.speaking and not self.heard
        if self.speaking:
            self.heard, self.quiet = True, 0
            return False
        self.quiet += 1
        if self.heard and self.quiet >= self.need:
            self.heard = False
            return True
        return False

    def reset(self) -> None:
        """Forget the speech heard so far (a flush closed the segment it belonged to)."""
        self.heard, self.quiet = False, 0


def vad_points(probs: Iterable[float], rules: EndpointRules) -> list[int]:
    """Every sample position where ``rules`` ask for a voice-activity endpoint over ``probs`` (a whole stream)."""
    tracker = VadTracker(rules)
    return [tracker.end for p in probs if tracker.push(float(p))]
