"""Transcript output formats: text, jsonl, srt, vtt."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TextIO

from streamer.events import Event, Final

FORMATS = ("text", "jsonl", "srt", "vtt")


def _stamp(seconds: float, sep: str) -> str:
    ms = int(round(max(0.0, seconds) * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def cue_lines(finals: Iterable[Final], fmt: str) -> list[str]:
    """Subtitle cues from finals (one cue per final)."""
    sep = "," if fmt == "srt" else "."
    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    for n, f in enumerate(finals, 1):
        if fmt == "srt":
            lines.append(str(n))
        lines.append(f"{_stamp(f.start, sep)} --> {_stamp(max(f.end, f.start + 0.01), sep)}")
        lines += [f.text, ""]
    return lines


class EventWriter:
    """Writes events as they arrive; subtitle formats are written at the end."""

    def __init__(self, fmt: str, out: TextIO) -> None:
        self.fmt = fmt
        self.out = out
        self.finals: list[Final] = []

    def write(self, event: Event) -> None:
        if self.fmt == "jsonl":
            self.out.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
            self.out.flush()
        elif isinstance(event, Final):
            self.finals.append(event)

    def close(self) -> None:
        if self.fmt == "text":
            self.out.write(" ".join(f.text for f in self.finals) + "\n")
        elif self.fmt in ("srt", "vtt"):
            self.out.write("\n".join(cue_lines(self.finals, self.fmt)))
        self.out.flush()
