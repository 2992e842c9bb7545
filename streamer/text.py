"""Words spelled with a model's letters, after Unicode normalisation.

The same word can be written with different code points: ``é`` is one (U+00E9, NFC, what most
tokenizers were trained on) or two (``e`` and a combining acute, NFD, as macOS and some editors save
text); Arabic harakat and Devanagari combining marks come in more than one order. A word list, a
hotword, a Vosk ``phrase_list`` word or an LM unigram is therefore brought to the normal form of the
model's vocabulary before its letters are looked up: NFD when the vocabulary is decomposed (it has
combining marks and no letter that NFD would split), NFC otherwise. An :class:`Alphabet` is the one
place this happens; :mod:`streamer.lexicon`, :mod:`streamer.lm` and :mod:`streamer.decoder` spell with it.

Pure Python (``unicodedata``): no I/O.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

__all__ = ["Alphabet", "Form", "lacking", "normal_form", "unspelled"]

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
