"""Word and character error rates from a plain Levenshtein distance (no dependencies).

Used by ``streamer eval`` (corpus rates of the offline pass and of the streaming engine), ``streamer bench``
(streaming text against offline text) and the demo recipe (dev-set rates while training).

:func:`words_shown` says when each final word was first on screen, for partial latency (``streamer bench``,
``clients/loadtest.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streamer.text import split_words, squeeze

__all__ = ["ErrorRate", "cer", "edit_distance", "normalise_text", "words_shown"]

Shown = tuple[str, float, float]
"""a word as an event shows it: (text, start, end) in stream seconds"""


def edit_distance(ref: Sequence[object], hyp: Sequence[object]) -> int:
    """Minimum number of substitutions, insertions and deletions turning ``ref`` into ``hyp``."""
    if len(ref) < len(hyp):
        ref, hyp = hyp, ref
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def cer(hyp: str, ref: str) -> float:
    """Character error rate of one pair: Levenshtein distance / reference length (1.0 for text against none)."""
    if not ref:
        return float(bool(hyp))
    return edit_distance(ref, hyp) / len(ref)


def normalise_text(text: str) -> str:
    """Lower case, single spaces, no leading or trailing space."""
    return " ".join(text.lower().split())


@dataclass
class ErrorRate:
    """Accumulates word and character errors over many utterances (corpus-level rates).

    Words are :func:`streamer.text.split_words`'s: a character of a script written without spaces (Chinese,
    Japanese) counts as a word of its own, so a model that never writes its word delimiter is not scored one
    word per utterance; and characters are compared without the spaces next to such characters (where a
    model puts its delimiter there is not an error of the text). English is scored as before: words at spaces.
    """

    word_errors: int = 0
    words: int = 0
    char_errors: int = 0
    chars: int = 0
    utterances: int = 0
    exact: int = 0

    def add(self, ref: str, hyp: str) -> None:
        ref, hyp = squeeze(normalise_text(ref)), squeeze(normalise_text(hyp))
        self.word_errors += edit_distance(split_words(ref), split_words(hyp))
        self.words += len(split_words(ref))
        self.char_errors += edit_distance(ref, hyp)
        self.chars += len(ref)
        self.utterances += 1
        self.exact += ref == hyp

    @property
    def wer(self) -> float:
        return self.word_errors / max(1, self.words)

    @property
    def cer(self) -> float:
        return self.char_errors / max(1, self.chars)

    @property
    def sentence_accuracy(self) -> float:
        return self.exact / max(1, self.utterances)


def words_shown(events: Sequence[tuple[float, bool, Sequence[Shown]]]) -> list[tuple[float, float]]:
    """When each word of the finals was first shown: ``(its end, the time of the first event showing it)``.

    ``events``: ``(time, is_final, words)`` of a stream's partials and finals in the order they came. The words
    of the finals are the truth; an event shows a final word when it has a word of the same text overlapping
    it in time, so a misread does not count as shown, and a word whose end moves by a frame between a partial
    and the final is still the word the partial showed. A word no partial showed is shown by its final.
    """
    out = []
    seen: list[tuple[float, Sequence[Shown]]] = []
    for at, is_final, words in events:
        seen.append((at, words))
        if not is_final:
            continue
        for text, start, end in words:
            first = next((t for t, shown in seen if any(w == text and s <= end and e >= start for w, s, e in shown)),
                         at)
            out.append((end, first))
    return out
