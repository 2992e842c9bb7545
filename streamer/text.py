"""Words spelled with a model's letters, after Unicode normalisation.

The same word can be written with different code points: ``é`` is one (U+00E9, NFC, what most
tokenizers were trained on) or two (``e`` and a combining acute, NFD, as macOS and some editors save
text); Arabic harakat and Devanagari combining marks come in more than one order. A word list, a
hotword, a Vosk ``phrase_list`` word or an LM unigram is therefore brought to the normal form of the
model's vocabulary before its letters are looked up: NFD when the vocabulary is decomposed (it has
combining marks and no letter that NFD would split), NFC otherwise. An :class:`Alphabet` is the one
place this happens; :mod:`streamer.lexicon`, :mod:`streamer.lm` and :mod:`streamer.decoder` spell with it.

Scripts written without spaces (Chinese, Japanese): a checkpoint for them hardly ever writes its word
delimiter, so "the text between two delimiters" would make a whole utterance one word. :func:`word_spans`
cuts such text into words of one character each (with the marks and punctuation after it), which is what
:class:`streamer.ctc.CtcSegment` makes its words with; :func:`join_words` puts them back together without
spaces, :func:`split_words` splits a text the same way for word error rates, and :func:`spaceless` says
whether a vocabulary is written so (``streamer eval`` then leads with the character error rate).

Pure Python (``unicodedata``): no I/O.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Literal

__all__ = ["Alphabet", "Form", "join_words", "lacking", "normal_form", "seam", "solo", "spaceless", "split_words",
           "squeeze", "unspelled", "word_spans"]

Form = Literal["NFC", "NFD"]
"""the Unicode normal form words are brought to before they are spelled"""


def normal_form(letters: Iterable[str]) -> Form:
    """The normal form of a vocabulary's ``letters``: NFD when they are decomposed, else NFC.

    Decomposed: some letter is a combining mark and none has a canonical decomposition (an ``é`` token
    would be split by NFD, so a vocabulary holding one is NFC). Arabic harakat and Devanagari signs are
    combining marks in both forms; such a vocabulary is NFD unless it has a precomposed letter (``أ``,
    ``ऩ``), and for its other letters the two forms agree. Tokens longer than one character are ignored.
    """
    marks = composed = False
    for c in letters:
        if len(c) != 1:
            continue  # a special token (<pad>)
        marks = marks or unicodedata.combining(c) > 0
        composed = composed or unicodedata.normalize("NFD", c) != c
    return "NFD" if marks and not composed else "NFC"


class Alphabet:
    """A model's letters (single-character tokens other than the blank and the word delimiter) and their
    normal form. Call it with a word for the word as the model spells it, or None.
    """

    def __init__(self, letters: Mapping[str, int]) -> None:
        self.letters = dict(letters)
        self.form: Form = normal_form(self.letters)

    def normalise(self, text: str) -> str:
        """``text`` in the vocabulary's normal form."""
        return unicodedata.normalize(self.form, text)

    def spell(self, word: str) -> tuple[str, list[int]] | None:
        """``word`` as the letters spell it (normalised; its own, lower- or upper-case form) and its letter ids.

        None when no form can be spelled: :meth:`lacks` says which letters are missing.
        """
        for form in (word, word.lower(), word.upper()):
            text = self.normalise(form)
            if text and all(c in self.letters for c in text):
                return text, [self.letters[c] for c in text]
        return None

    def __call__(self, word: str) -> str | None:
        found = self.spell(word)
        return found[0] if found else None

    def lacks(self, word: str) -> str:
        """The characters of ``word`` (normalised) that no case of is among the letters, in order, once each."""
        missing: dict[str, None] = {}
        for c in self.normalise(word):
            if not any(self.normalise(f) in self.letters for f in (c, c.lower(), c.upper())):
                missing[c] = None
        return "".join(missing)

    def shown(self) -> str:
        """The printable letters, sorted: what an error shows as the model's letters."""
        return "".join(sorted(t for t in self.letters if t.isprintable() and t != " "))


def lacking(word: str, spell: Callable[[str], str | None]) -> str:
    """`` (lacks 'é')``: the letters ``word`` lacks when ``spell`` is an :class:`Alphabet`, for an error; or ""."""
    missing = spell.lacks(word) if isinstance(spell, Alphabet) else ""
    return f" (lacks {' '.join(repr(c) for c in missing)})" if missing else ""


def unspelled(words: Iterable[str], spell: Callable[[str], str | None], limit: int = 5) -> str:
    """``words`` named for an error, each with the letters it lacks: ``'café' (lacks 'é'), 'garçon' (lacks 'ç')``."""
    return ", ".join(f"{w!r}{lacking(w, spell)}" for w in list(words)[:limit])


# -- scripts written without spaces ---------------------------------------------------------------------------

_SOLO_RANGES = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9D),  # halfwidth Katakana
    (0x20000, 0x323AF),  # CJK unified ideographs extensions B to H, compatibility supplement
)
"""code points of scripts written without spaces in which one character is a syllable or a morpheme: each
is a word of its own (Thai, Lao, Khmer and Myanmar, also written without spaces, spell words with letters:
a run of them stays one word, as a run of Latin letters does)"""


@lru_cache(maxsize=4096)
def solo(c: str) -> bool:
    """Whether the character ``c`` is a word by itself: Han, kana, Bopomofo (:data:`_SOLO_RANGES`)."""
    o = ord(c)
    return any(a <= o <= b for a, b in _SOLO_RANGES)


def _trails(c: str) -> bool:
    """Whether ``c`` stays with the character before it: a combining mark or punctuation (``。``, ``、``)."""
    return unicodedata.category(c)[0] in "MP"


def word_spans(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """The words of a run of ``pieces`` (the texts of a word's tokens, no word delimiter among them), as
    ``[start, stop)`` spans of pieces: a piece of a script written without spaces (:func:`solo`) is a word of
    its own, with the marks and punctuation that follow it; the pieces between such words form one word each.

    ``["你", "好"]`` gives two words, ``["G", "P", "S", "定", "位"]`` three (``GPS``, ``定``, ``位``),
    ``["c", "a", "t"]`` one. Pure and per-piece, so a word never depends on how frames arrived.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    after_solo = False  # the word open since ``start`` is a character of its own (and what trails it)
    for i, piece in enumerate(pieces):
        text = piece.strip()
        if not text or (after_solo and all(_trails(c) for c in text)):
            continue  # a mark or punctuation after a character: part of its word
        if solo(text[0]) or after_solo:
            if i > start:
                spans.append((start, i))
            start = i
            after_solo = all(solo(c) or _trails(c) for c in text)  # (a token mixing scripts opens a run)
    if len(pieces) > start:
        spans.append((start, len(pieces)))
    return spans


def seam(left: str, right: str) -> str:
    """What goes between the words ``left`` and ``right``: a space, or nothing where either side of the seam is
    a character of a script written without spaces (:func:`word_spans` cut the text there)."""
    last = next((c for c in reversed(left) if not _trails(c)), "")
    return "" if not left or not right or (last and solo(last)) or solo(right[0]) else " "


def join_words(words: Iterable[str]) -> str:
    """Words as a text, joined by :func:`seam`: ``["GPS", "定", "位", "on"]`` -> ``"GPS定位 on"``."""
    out = ""
    for w in words:
        out += seam(out, w) + w
    return out


def squeeze(text: str) -> str:
    """``text`` without the spaces next to a character of a script written without spaces: what tells two
    texts apart there is the characters, not where a model put its word delimiter. Other spaces are kept."""
    return join_words(text.split())


def split_words(text: str) -> list[str]:
    """``text``'s words as :func:`word_spans` cuts them: at spaces, and each character of a script written
    without spaces on its own (for word error rates; English splits at spaces alone)."""
    words: list[str] = []
    for chunk in text.split():
        words += [chunk[a:b] for a, b in word_spans(list(chunk))]
    return words


def spaceless(letters: Iterable[str]) -> bool:
    """Whether a vocabulary's ``letters`` are mostly of scripts written without spaces (a Chinese or Japanese
    checkpoint): its word error rate counts characters, and its character error rate is the figure to read."""
    singles = [c for c in letters if len(c) == 1 and not c.isspace() and c != "|"]
    return bool(singles) and 2 * sum(map(solo, singles)) > len(singles)
