"""N-gram language models and hotwords for the CTC beam searches (:mod:`streamer.lexicon`).

A :class:`LanguageModel` is a KenLM n-gram (ARPA text or KenLM binary, read by flashlight-text's KenLM
binding) over words, with the weights ``Wav2Vec2ProcessorWithLM`` (pyctcdecode) uses: a word's score is
``alpha · ln P(word | previous words) + beta``, plus ``unk_score_offset`` for a word outside the LM's
vocabulary. ``decoder.lm = "auto"`` reads a checkpoint's ``language_model/`` folder (the n-gram file,
``attrs.json`` with alpha/beta, ``unigrams.txt``) as that processor would.

Hotwords (:class:`Hotwords`) add a bonus to listed words (and to the prefixes of the word being spelled,
so the beam keeps them) without banning anything else.

:func:`make_search_lm` makes what one search hands flashlight's decoder: a Python ``LM`` that scores word ids
(the word-list search) or single characters (the lexicon-free search, which assembles words from
letters and scores each when its delimiter comes). One is made per search, so its state memo lives and
dies with the segment; the scores themselves are kept in the decoder's :class:`ScoreCache`, which all its
searches share, and the KenLM model is shared, read-only.

Pure numpy/flashlight: no torch, no asyncio. Files are read only by the loaders.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.exceptions import ConfigError
from streamer.text import lacking, unspelled

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "MAX_HOTWORDS",
    "MAX_HOTWORD_WORDS",
    "Hotwords",
    "LanguageModel",
    "ScoreCache",
    "find_lm_folder",
    "load_language_model",
    "make_search_lm",
    "parse_hotwords",
    "read_hotwords",
]

logger = logging.getLogger("streamer.lm")

DEFAULT_ALPHA = 0.5
"""pyctcdecode's default LM weight (natural-log scores), used when nothing says otherwise"""
DEFAULT_BETA = 1.0
"""pyctcdecode's default word insertion bonus"""
DEFAULT_UNK_OFFSET = -10.0
"""pyctcdecode's default score added for a word the LM does not know"""
LN10 = math.log(10.0)
KENLM_MAGIC = b"mmap lm http://kheafield.com/code"
MAX_HOTWORDS = 1000
"""the most hotword entries (words or phrases) a file or a stream may give"""
MAX_HOTWORD_WORDS = 10
"""the most words in one hotword phrase"""
MAX_HOTWORD_WEIGHT = 100.0
FORBIDDEN = -1e9
"""the score of a token the lexicon-free search must not spell (special tokens)"""
Spell = Callable[[str], "str | None"]
"""a word as the model spells it (Unicode-normalised; its own, lower- or upper-case form), or None when it cannot
be spelled: a :class:`streamer.text.Alphabet`, whose errors also name the letters a word lacks"""


# --------------------------------------------------------------------------------------------- files


def _arpa_unigrams(path: Path) -> tuple[list[str], int]:
    """The words of an ARPA file's 1-gram section and its order; ConfigError when it is not ARPA."""
    words: list[str] = []
    order = 0
    try:
        with open(path, encoding="utf-8") as f:
            line = ""
            for line in f:
                if line.strip():
                    break
            if line.strip() != "\\data\\":
                raise ConfigError(f"the language model {str(path)!r} is neither an ARPA file (its first line is "
                                  f"{line.strip()[:40]!r}, not '\\data\\') nor a KenLM binary; give an .arpa "
                                  "file or one made by KenLM's build_binary")
            for line in f:
                m = re.match(r"ngram (\d+)=\d+", line.strip())
                if m:
                    order = max(order, int(m.group(1)))
                elif line.strip() == "\\1-grams:":
                    break
            for line in f:
                s = line.strip()
                if not s:
                    continue
                if s.startswith("\\"):
                    break
                parts = s.split("\t")
                if len(parts) >= 2:
                    words.append(parts[1])
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the language model {str(path)!r} is not UTF-8 text nor a KenLM binary ({exc.reason})"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the language model {str(path)!r}: {exc.strerror or exc}") from None
    if not order or not words:
        raise ConfigError(f"the language model {str(path)!r} has no n-gram counts or no 1-grams: a truncated "
                          "or malformed ARPA file")
    return words, order


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return [w.strip() for w in path.read_text(encoding="utf-8-sig").splitlines() if w.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc}") from None


def find_lm_folder(folder: Path) -> tuple[Path, dict[str, Any], Path | None]:
    """The n-gram file, ``attrs.json`` values and ``unigrams.txt`` of a ``language_model/`` folder."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".arpa", ".bin", ".binary", ".klm"))
    if len(files) != 1:
        raise ConfigError(f"{str(folder)!r} must hold exactly one n-gram file (.arpa, .bin, .binary or .klm), "
                          f"found {len(files)}")
    attrs: dict[str, Any] = {}
    if (folder / "attrs.json").is_file():
        try:
            attrs = json.loads((folder / "attrs.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {str(folder / 'attrs.json')!r}: {exc}") from None
        if not isinstance(attrs, dict) or not all(
                isinstance(attrs.get(k, 0.0), (int, float)) for k in ("alpha", "beta", "unk_score_offset")):
            raise ConfigError(f"{str(folder / 'attrs.json')!r}: alpha, beta and unk_score_offset must be numbers")
    unigrams = folder / "unigrams.txt"
    return files[0], attrs, unigrams if unigrams.is_file() else None


@dataclass
class LanguageModel:
    """A loaded word n-gram: flashlight's KenLM over the LM's vocabulary, and the weights to apply.

    ``index`` maps a word as the model spells it to the KenLM dictionary index of the LM's own spelling;
    words the LM lacks score as its ``<unk>`` (plus ``unk_offset``).
    """

    source: str
    kenlm: Any
    index: dict[str, int]
    unk_index: int
    order: int
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    unk_offset: float = DEFAULT_UNK_OFFSET
    score_boundary: bool = True
    sorted_words: list[str] = field(default_factory=list)

    def is_prefix(self, text: str) -> bool:
        """Whether ``text`` begins some word of the LM's vocabulary (a partial word not yet out of it)."""
        i = bisect.bisect_left(self.sorted_words, text)
        return i < len(self.sorted_words) and self.sorted_words[i].startswith(text)

    def with_weights(self, alpha: float, beta: float) -> LanguageModel:
        return LanguageModel(self.source, self.kenlm, self.index, self.unk_index, self.order, alpha, beta,
                             self.unk_offset, self.score_boundary, self.sorted_words)


@contextlib.contextmanager
def _kenlm_chatter(path: Path) -> Iterator[None]:
    """KenLM (C++) writes a hint and a progress bar straight to file descriptor 2 while it reads an ARPA file;
    keep them off the terminal of `streamer transcribe` and the daemon's log, and log them at debug level.
    Its errors are exceptions, so nothing a user needs is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            chatter = sink.read(4096).decode("utf-8", "replace").strip()
            if chatter:
                logger.debug("KenLM reading %s: %s", path, chatter)


def load_language_model(path: str | Path, spell: Spell, *, alpha: float | None = None, beta: float | None = None,
                        attrs: Mapping[str, Any] | None = None, unigrams: Path | None = None) -> LanguageModel:
    """Load an ARPA or KenLM binary file for a model whose spelling is ``spell``.

    Raises :class:`ConfigError` naming the file when it is missing, not an n-gram file, or its words
    cannot be spelled with the model's letters (a vocabulary mismatch).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"the language model {str(p)!r}: no such file; give an ARPA or KenLM binary file, "
                          "'auto' (the checkpoint's language_model/ folder), or '' for none")
    try:
        with open(p, "rb") as f:
            head = f.read(len(KENLM_MAGIC))
    except OSError as exc:
        raise ConfigError(f"cannot read the language model {str(p)!r}: {exc.strerror or exc}") from None
    binary = head == KENLM_MAGIC
    if binary:
        if unigrams is None and (p.parent / "unigrams.txt").is_file():
            unigrams = p.parent / "unigrams.txt"
        if unigrams is None:
            raise ConfigError(f"the KenLM binary {str(p)!r} needs its vocabulary beside it as unigrams.txt (one "
                              "word per line, as Wav2Vec2ProcessorWithLM saves it), or give the ARPA file")
        words, order = _read_lines(unigrams, "the LM vocabulary"), 0
    else:
        words, order = _arpa_unigrams(p)
        if unigrams is not None:
            words = list(dict.fromkeys([*words, *_read_lines(unigrams, "the LM vocabulary")]))
    specials = {"<s>", "</s>", "<unk>"}
    entries = [w for w in words if w not in specials]
    spelled: dict[str, str] = {}
    bad: list[str] = []
    for w in entries:
        s = spell(w)
        if s is None:
            bad.append(w)
        else:
            spelled.setdefault(s, w)
    if not spelled or len(bad) > len(entries) // 2:
        raise ConfigError(f"the language model {str(p)!r} does not fit the model's vocabulary: {len(bad)} of its "
                          f"{len(entries)} words cannot be spelled with the model's letters, e.g. "
                          f"{unspelled(bad, spell)}")
    if bad:
        logger.info("%s: %d of %d words cannot be spelled with the model's letters and are never decoded",
                    p, len(bad), len(entries))
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    dictionary = Dictionary()
    index: dict[str, int] = {}
    for s, w in spelled.items():
        index[s] = dictionary.index_size()
        dictionary.add_entry(w)
    unk_index = dictionary.index_size()
    dictionary.add_entry("<unk>")
    try:
        with _kenlm_chatter(p):
            kenlm = KenLM(str(p), dictionary)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200]
        raise ConfigError(f"KenLM cannot read the language model {str(p)!r}: {reason}") from None
    a = dict(attrs or {})
    return LanguageModel(
        str(p), kenlm, index, unk_index, order or 6,
        float(a.get("alpha", DEFAULT_ALPHA)) if alpha is None else alpha,
        float(a.get("beta", DEFAULT_BETA)) if beta is None else beta,
        float(a.get("unk_score_offset", DEFAULT_UNK_OFFSET)), bool(a.get("score_boundary", True)),
        sorted(spelled))


# --------------------------------------------------------------------------------------------- hotwords


@dataclass(frozen=True)
class Hotwords:
    """Words to boost: word (as the model spells it) → bonus added when the search completes it.

    A phrase's words are each boosted by the phrase's weight. ``prefixes`` give the word being spelled a
    share of the bonus as it grows (the lexicon-free search), so the beam keeps a hotword to its end.
    """

    weights: Mapping[str, float]
    source: str = "hotwords"

    def __bool__(self) -> bool:
        return bool(self.weights)

    def bonus(self, word: str) -> float:
        return self.weights.get(word, 0.0)

    def prefix_bonus(self, partial: str) -> float:
        best = 0.0
        for w, weight in self.weights.items():
            if len(w) > len(partial) and w.startswith(partial):
                best = max(best, weight * len(partial) / len(w))
        return best

    def merged(self, other: Hotwords | None) -> Hotwords:
        if not other:
            return self
        return Hotwords({**self.weights, **other.weights}, f"{self.source} + {other.source}")


def parse_hotwords(entries: Iterable[tuple[str, float | None]], spell: Spell, default_weight: float,
                   source: str) -> Hotwords:
    """Hotwords from ``(phrase, weight or None)`` pairs; raises ConfigError naming ``source``."""
    weights: dict[str, float] = {}
    items = list(entries)
    if len(items) > MAX_HOTWORDS:
        raise ConfigError(f"{source}: more than {MAX_HOTWORDS} hotwords ({len(items)}); give at most {MAX_HOTWORDS}")
    for phrase, weight in items:
        w = default_weight if weight is None else weight
        if not math.isfinite(w) or not 0 < w <= MAX_HOTWORD_WEIGHT:
            raise ConfigError(f"{source}: hotword {phrase!r} has weight {w!r}; weights are numbers above 0 and "
                              f"at most {MAX_HOTWORD_WEIGHT:g}")
        words = phrase.split()
        if not words:
            raise ConfigError(f"{source}: an empty hotword")
        if len(words) > MAX_HOTWORD_WORDS:
            raise ConfigError(f"{source}: hotword {phrase[:40]!r} has {len(words)} words; a phrase may have at most "
                              f"{MAX_HOTWORD_WORDS}")
        for word in words:
            if len(word) > 100:
                raise ConfigError(f"{source}: hotword {word[:20]!r}... has {len(word)} letters; at most 100")
            s = spell(word)
            if s is None:
                raise ConfigError(f"{source}: hotword {word!r} cannot be spelled with the model's letters"
                                  f"{lacking(word, spell)}")
            weights[s] = max(weights.get(s, 0.0), w)
    return Hotwords(weights, source)


def read_hotwords(path: str | Path, spell: Spell, default_weight: float) -> Hotwords:
    """A hotword file: one word or phrase per line, optionally followed by a tab or ``:`` and its weight."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"decoder.hotwords = {str(path)!r}: no such file; give a file of words or phrases, one "
                          "per line, each optionally followed by a tab and a weight")
    entries: list[tuple[str, float | None]] = []
    for n, raw in enumerate(_read_lines(p, "the hotword file"), 1):
        if raw.startswith("#"):
            continue
        text, sep, weight = raw.rpartition("\t") if "\t" in raw else raw.rpartition(":")
        if not sep:
            entries.append((raw, None))
            continue
        try:
            entries.append((text.strip(), float(weight)))
        except ValueError:
            raise ConfigError(f"{p}:{n}: {weight.strip()!r} is not a weight; write 'phrase<TAB>weight' or just the "
                              "phrase") from None
    return parse_hotwords(entries, spell, default_weight, str(p))


# --------------------------------------------------------------------------------------------- search LM


SCORE_CACHE_SIZE = 10_000
"""the most word and letter scores a :class:`ScoreCache` holds before it starts afresh (about 350 bytes each: a
client's own word list has a cache of its own; the demo model's word list and LM ask about a thousand)"""


class ScoreCache:
    """Scores the searches of one decoder share: ``(start, history, partial word, token)`` → what follows.

    A search's LM asks KenLM for each word a hypothesis completes after the words before it; every search of a
    segment (and each partial's fresh search, every hop) asks mostly the same questions again. The answers
    depend only on the key (the KenLM state after the ``order - 1`` words of the history is always the same), so
    a decoder keeps one cache for all its searches; it is cleared when full rather than grown without bound.
    """

    def __init__(self, size: int = SCORE_CACHE_SIZE) -> None:
        self.size = size
        self.entries: dict[tuple[Any, ...], tuple[tuple[str, ...], str, Any, float]] = {}


_search_lm_class: type | None = None


def _search_lm() -> type:
    """The flashlight ``LM`` subclass of :func:`make_search_lm` (made once: flashlight is imported lazily)."""
    global _search_lm_class
    if _search_lm_class is not None:
        return _search_lm_class
    from flashlight.lib.text import decoder as fl

    class SearchLM(fl.LM):  # type: ignore[misc]
        def __init__(self, lm: LanguageModel | None, hotwords: Hotwords | None, labels: list[str] | None,
                     unk_label: int, unk_score: float, chars: Mapping[int, str] | None, delimiter: int,
                     cache: ScoreCache) -> None:
            fl.LM.__init__(self)
            self.lm, self.hotwords, self.labels, self.chars, self.cache = lm, hotwords, labels, chars, cache
            self.unk_label, self.unk_score, self.delimiter = unk_label, unk_score, delimiter
            self.keys: dict[Any, tuple[tuple[str, ...], str, Any]] = {}  # state -> (history, partial, kenlm state)
            self.memo: dict[tuple[tuple[str, ...], str], Any] = {}
            self.partial_scores: dict[str, float] = {}
            self.edges: dict[tuple[Any, int], tuple[Any, float]] = {}
            self.keep = max(1, (lm.order if lm else 1) - 1)
            self.begin = False  # whether the search began at a sentence start (part of every cache key)

        def _state(self, history: tuple[str, ...], partial: str, ken: Any) -> Any:
            key = (history, partial)
            st = self.memo.get(key)
            if st is None:
                st = fl.LMState()
                self.memo[key] = st
                self.keys[st] = (history, partial, ken)
            return st

        def start(self, start_with_nothing: bool) -> Any:
            self.keys.clear()
            self.memo.clear()
            self.edges.clear()
            lm = self.lm
            self.begin = bool(lm and lm.score_boundary and not start_with_nothing)
            ken = lm.kenlm.start(not self.begin) if lm else None
            return self._state((), "", ken)

        def _word(self, history: tuple[str, ...], ken: Any, word: str | None) -> tuple[float, Any]:
            """The score of ``word`` after ``history`` (None: ``[unk]``) and the KenLM state after it."""
            lm, hotwords = self.lm, self.hotwords
            bonus = hotwords.bonus(word) if hotwords and word is not None else 0.0
            if lm is None:
                return bonus, None
            idx = lm.index.get(word, lm.unk_index) if word is not None else lm.unk_index
            ken2, s = lm.kenlm.score(ken, idx)
            score = lm.alpha * s * LN10 + lm.beta + bonus
            if idx == lm.unk_index:
                score += lm.unk_offset
            return score, ken2

        def _partial_score(self, partial: str) -> float:
            s = self.partial_scores.get(partial)
            if s is None:
                s = 0.0
                if self.lm is not None and not self.lm.is_prefix(partial):
                    s += self.lm.unk_offset
                if self.hotwords:
                    s += self.hotwords.prefix_bonus(partial)
                self.partial_scores[partial] = s
            return s

        def score(self, state: Any, token: int) -> tuple[Any, float]:
            # the search asks again for every frame a hypothesis lives: answer repeats from the memo, and what
            # another search of this decoder asked already from the shared cache
            key = (state, token)
            found = self.edges.get(key)
            if found is None:
                history, partial, ken = self.keys[state]
                shared = self.cache.entries
                ckey = (self.begin, history, partial, token)
                hit = shared.get(ckey)
                if hit is None:
                    if len(shared) >= self.cache.size:
                        shared.clear()
                    hit = shared[ckey] = self._score(history, partial, ken, token)
                found = self.edges[key] = (self._state(*hit[:3]), hit[3])
            return found

        def _score(self, history: tuple[str, ...], partial: str, ken: Any,
                   token: int) -> tuple[tuple[str, ...], str, Any, float]:
            """The history, partial word and KenLM state after ``token``, and its score."""
            chars = self.chars
            if chars is None:  # word-list search: token is a trie label
                if token == self.unk_label:
                    s, ken2 = self._word(history, ken, None)
                    return (*history, "<unk>")[-self.keep:], "", ken2, s + self.unk_score
                assert self.labels is not None
                word = self.labels[token]
                s, ken2 = self._word(history, ken, word)
                return (*history, word)[-self.keep:], "", ken2, s
            if token == self.delimiter:
                if not partial:
                    return history, partial, ken, 0.0
                s, ken2 = self._word(history, ken, partial)
                return (*history, partial)[-self.keep:], "", ken2, s - self._partial_score(partial)
            c = chars.get(token)
            if c is None:
                return history, partial, ken, FORBIDDEN
            grown = partial + c
            return history, grown, ken, self._partial_score(grown) - self._partial_score(partial)

        def finish(self, state: Any) -> tuple[Any, float]:
            history, partial, ken = self.keys[state]
            total = 0.0
            if self.chars is not None and partial:
                history, partial, ken, total = self._score(history, partial, ken, self.delimiter)
                state = self._state(history, partial, ken)
            lm = self.lm
            if lm is not None and lm.score_boundary:
                _, s = lm.kenlm.finish(ken)
                total += lm.alpha * s * LN10
            return state, total

    _search_lm_class = SearchLM
    return SearchLM


def make_search_lm(lm: LanguageModel | None, hotwords: Hotwords | None, *, labels: list[str] | None = None,
                   unk_label: int = -1, unk_score: float = 0.0, chars: Mapping[int, str] | None = None,
                   delimiter: int = -1, cache: ScoreCache | None = None) -> Any:
    """A flashlight ``LM`` for one search.

    Word-list search: ``labels[i]`` is the word of trie label ``i``; ``unk_label`` is the ``[unk]``
    letter path, scored ``unk_score`` per letter. Lexicon-free search: ``chars`` maps each letter token to
    its character and ``delimiter`` ends a word; other tokens are forbidden. ``cache``: the scores this
    decoder's other searches share (made with the same arguments); None: the search's own.
    """
    return _search_lm()(lm, hotwords, labels, unk_label, unk_score, chars, delimiter, cache or ScoreCache())
