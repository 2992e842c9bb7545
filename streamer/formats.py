"""Transcript output formats: text, jsonl, srt, vtt."""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterable
from typing import TextIO

from streamer.events import Event, Final
from streamer.text import join_words, seam, squeeze

FORMATS = ("text", "jsonl", "srt", "vtt")
MAX_CUE_COLUMNS = 84
"""the most a subtitle cue shows: two lines of 42 columns, the usual limit; a wide (CJK) character takes two"""
MAX_CUE_S = 7.0
"""the longest a subtitle cue stays on screen"""


def _stamp(seconds: float, sep: str) -> str:
    ms = int(round(max(0.0, seconds) * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _columns(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cut(text: str, at: int) -> int:
    """``at`` moved forward to where a piece of ``text`` may start: not on a combining mark (harakat, matras),
    nor right after a virama (a Devanagari conjunct)."""
    while 0 < at < len(text) and (unicodedata.category(text[at]).startswith("M")
                                  or unicodedata.combining(text[at - 1]) == 9):
        at += 1
    return at


Piece = tuple[str, float, float, str]
"""a cue's part: text, start, end, and what joins it to the part before (" " between words, "" inside one)"""


def _pieces(text: str, start: float, end: float) -> list[Piece]:
    """``text`` (one word, or a whole utterance of a script written without spaces) in pieces that each fit a
    cue, timed in proportion to their length: a final keeps no time per character."""
    n = max(math.ceil(_columns(text) / MAX_CUE_COLUMNS), math.ceil((end - start) / MAX_CUE_S), 1)
    cuts = sorted({_cut(text, round(i * len(text) / n)) for i in range(n)} | {len(text)})
    span = (end - start) / max(1, len(text))
    return [(text[a:b], start + a * span, start + b * span, " " if a == 0 else "")
            for a, b in zip(cuts, cuts[1:], strict=False) if a < b]


def final_cues(f: Final) -> list[tuple[float, float, str]]:
    """A final's subtitle cues (start, end, text): one, unless it is longer than :data:`MAX_CUE_COLUMNS` or
    :data:`MAX_CUE_S`; then its words grouped into cues that fit, at the words' times, and a word too long
    for one cue cut between characters. Words join as :func:`streamer.text.join_words` joins them: a script
    written without spaces has a word per character (:meth:`streamer.ctc.CtcSegment.words`), no space between."""
    end = max(f.end, f.start + 0.01)
    if _columns(f.text) <= MAX_CUE_COLUMNS and end - f.start <= MAX_CUE_S:
        return [(f.start, end, f.text)]
    words = [(w.word, w.start, w.end) for w in f.words]
    if not words or join_words(w for w, _, _ in words) != squeeze(f.text):  # no word times that spell the text
        words = [(f.text, f.start, end)]
    pieces: list[Piece] = []
    before = ""
    for word, start, stop in words:
        fits = _columns(word) <= MAX_CUE_COLUMNS and stop - start <= MAX_CUE_S
        cut = [(word, start, stop, " ")] if fits else _pieces(word, start, stop)
        pieces += [(cut[0][0], cut[0][1], cut[0][2], seam(before, word)), *cut[1:]]
        before = word
    cues: list[tuple[float, float, str]] = []
    group: list[Piece] = []
    for piece in pieces:
        if group and (_columns(_text([*group, piece])) > MAX_CUE_COLUMNS or piece[2] - group[0][1] > MAX_CUE_S):
            cues.append((group[0][1], group[-1][2], _text(group)))
            group = []
        group.append(piece)
    cues.append((group[0][1], group[-1][2], _text(group)))
    return cues


def _text(group: list[Piece]) -> str:
    return "".join(p[3] + p[0] for p in group)[len(group[0][3]):]


def cue_lines(finals: Iterable[Final], fmt: str) -> list[str]:
    """Subtitle cues from finals (:func:`final_cues`: one per final unless it is too long for one)."""
    sep = "," if fmt == "srt" else "."
    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    n = 0
    for f in finals:
        for start, end, text in final_cues(f):
            n += 1
            if fmt == "srt":
                lines.append(str(n))
            lines.append(f"{_stamp(start, sep)} --> {_stamp(end, sep)}")
            lines += [text, ""]
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
