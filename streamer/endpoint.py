"""When a segment ends: sherpa-onnx's three endpoint rules over CTC frames, as a small pure object.

Silence is counted in final frames whose greedy id is the blank (or the word delimiter after a
word): a segment with no text ends after ``silence_no_speech_s`` of it, a segment with text after
``silence_after_speech_s``, and any segment at ``max_utterance_s``. The engine asks
:meth:`Endpointer.reason` after each final frame and :meth:`Endpointer.silence_ahead` with the
look-ahead frames of a window.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamer.ctc import FRAME_S

__all__ = ["EndpointRules", "Endpointer"]


@dataclass(frozen=True)
class EndpointRules:
    """The three rules, in seconds (``[endpoint]`` in the config builds one)."""

    enabled: bool = True
    silence_no_speech_s: float = 2.4
    silence_after_speech_s: float = 0.8
    max_utterance_s: float = 20.0


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

        A segment with no text that reaches either limit ends as ``silence`` (no event: nothing said).
        """
        if not self.enabled:
            return ""
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
