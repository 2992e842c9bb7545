"""Events produced by the streaming engine, with their wire mapping.

The same dictionaries travel over websocket, MQTT and ``streamer transcribe --format jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "Final", "Partial", "Word"]


def _r(x: float) -> float:
    return round(x, 3)


@dataclass(frozen=True)
class Word:
    """One recognised word with its time span in seconds from stream start."""

    word: str
    start: float
    end: float
    conf: float
    """mean probability of the word's characters, 0..1"""

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "start": _r(self.start), "end": _r(self.end), "conf": _r(self.conf)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Word:
        return cls(str(d["word"]), float(d["start"]), float(d["end"]), float(d["conf"]))


@dataclass(frozen=True)
class Partial:
    """Tentative text of the open segment; a later partial or the final replaces it."""

    segment: int
    text: str
    start: float
    end: float
    words: tuple[Word, ...] = field(default=())

    type = "partial"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "segment": self.segment,
            "text": self.text,
            "start": _r(self.start),
            "end": _r(self.end),
            "words": [w.to_dict() for w in self.words],
        }


@dataclass(frozen=True)
class Final(Partial):
    """Text of a closed segment: it never changes.

    ``reason`` says why the segment closed: ``silence``, ``max_length``, ``flush`` or ``end``.
    """

    reason: str = "end"

    type = "final"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["reason"] = self.reason
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Final:
        return cls(
            segment=int(d["segment"]),
            text=str(d["text"]),
            start=float(d["start"]),
            end=float(d["end"]),
            words=tuple(Word.from_dict(w) for w in d.get("words", [])),
            reason=str(d.get("reason", "end")),
        )


Event = Partial | Final
