"""Building the word decoder from ``[decoder]``: a word list (or none: greedy CTC) for a runner's vocabulary.

The daemon, ``transcribe``, ``mic``, ``eval`` and ``bench`` call :func:`build_decoder` once and pass
the result explicitly where sessions are made; a stream's own list (native ``words``, Vosk
``phrase_list``) comes from :func:`word_list_decoder` (``unk=True`` for a list that asks for ``[unk]``),
a stream's own hotwords or n-best count from the daemon decoder's ``with_options``.
``docs/decoding.md`` describes the decoders side by side.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streamer.config import DecoderConfig
from streamer.exceptions import ConfigError
from streamer.lexicon import Lexicon, OpenVocabulary, read_word_list
from streamer.lm import Hotwords, LanguageModel, find_lm_folder, load_language_model, parse_hotwords, read_hotwords
from streamer.memory import MemoryReturn
from streamer.runner import Runner, TokenVocabulary
from streamer.text import Alphabet

__all__ = ["LETTER_BYTES", "LM_FOLDER", "WORD_LIST", "Decoder", "WordListBudget", "build_decoder", "describe",
           "find_lm", "hotword_letters", "load_lm", "speller", "stream_decoder", "trie_letters", "word_list_decoder"]

logger = logging.getLogger("streamer.decoder")

WORD_LIST = "words.txt"
"""the file name of the word list a checkpoint may ship (``decoder.words = "auto"``)"""


Decoder = Lexicon | OpenVocabulary
"""a word decoder: a word list (with or without an LM), or the LM's open-vocabulary search"""
LM_FOLDER = "language_model"
"""where ``Wav2Vec2ProcessorWithLM`` keeps a checkpoint's n-gram (``decoder.lm = "auto"``)"""


def build_decoder(cfg: DecoderConfig, runner: Runner) -> Decoder | None:
    """The decoder ``cfg`` asks for, spelled with ``runner``'s tokens; None for greedy decoding.

    ``words = "auto"`` uses the checkpoint's own ``words.txt`` when it ships one (the demo model does);
    ``lm = "auto"`` its ``language_model/`` folder. A word list gives the word-list search (with the LM
    and hotwords when given); an LM or hotwords without a list give the lexicon-free search.
    Raises :class:`ConfigError` naming the file that is missing or wrong, at start.
    """
    lm = load_lm(cfg, runner)
    hotwords = read_hotwords(cfg.hotwords, speller(runner.vocab), cfg.hotword_weight) if cfg.hotwords else None
    path: Path | None = None
    if cfg.words == "auto":
        path = runner.shipped_file(WORD_LIST)
    elif cfg.words:
        path = Path(cfg.words).expanduser()
        if not path.is_file():
            raise ConfigError(f"decoder.words = {cfg.words!r}: no such file; give a word list (one word per "
                              "line), 'auto', or '' for greedy decoding")
    if path is not None:
        lexicon = word_list_decoder(runner.vocab, read_word_list(path), cfg, str(path), lm=lm, hotwords=hotwords)
        logger.info("decoding with the word list %s (%d words)%s", path, len(lexicon),
                    f" and the language model {lm.source}" if lm else "")
        return lexicon
    if lm is None and hotwords is None:
        return None
    v = runner.vocab
    logger.info("decoding with %s, without a word list", f"the language model {lm.source}" if lm else "hotwords")
    return OpenVocabulary(v.token_ids, v.blank_id, v.delimiter_id, lm=lm, hotwords=hotwords,
                          beam_size=cfg.lm_beam_size, beam_size_token=cfg.lm_beam_size_token,
                          alternatives=cfg.alternatives, source=lm.source if lm else "hotwords")


def describe(dec: Decoder | None) -> str:
    """What decodes, in words: greedy CTC, a word list or the lexicon-free search, and the LM.

    ``streamer serve --check`` and ``streamer eval`` print it.
    """
    if dec is None:
        return "greedy CTC (no word list)"
    parts = []
    if isinstance(dec, Lexicon):
        parts.append(f"the word list {dec.source} ({len(dec.words)} words)")
    else:
        parts.append(f"lexicon-free search (beam {dec.beam_size}, {dec.beam_size_token} letters per frame)")
    if dec.lm is not None:
        parts.append(f"the LM {dec.lm.source} (alpha {dec.lm.alpha:g}, beta {dec.lm.beta:g})")
    return " + ".join(parts)


def speller(vocab: TokenVocabulary) -> Alphabet:
    """What spells a word with ``vocab``'s letters (Unicode-normalised as the vocabulary is; its own, lower- or
    upper-case form): called with a word, the word as the model spells it, or None when it cannot be."""
    return Alphabet({t: i for t, i in vocab.token_ids.items()
                     if len(t) == 1 and i not in (vocab.blank_id, vocab.delimiter_id)})


def find_lm(cfg: DecoderConfig, runner: Runner) -> tuple[Path, dict[str, Any], Path | None] | None:
    """The n-gram file, its ``attrs.json`` values and ``unigrams.txt`` that ``cfg.lm`` names, or None."""
    if not cfg.lm:
        return None
    if cfg.lm == "auto":
        folder: Path | None = None
        for name in ("attrs.json", "unigrams.txt"):  # a local checkpoint's folder, or the hub cache's
            found = runner.shipped_file(f"{LM_FOLDER}/{name}")
            if found is not None:
                folder = found.parent
                break
        if folder is None:
            return None
        return find_lm_folder(folder)
    path = Path(cfg.lm).expanduser()
    if path.is_dir():
        return find_lm_folder(path)
    return path, {}, None


def load_lm(cfg: DecoderConfig, runner: Runner) -> LanguageModel | None:
    """The language model ``cfg.lm`` names, loaded and checked against the model's letters; None for none."""
    found = find_lm(cfg, runner)
    if found is None:
        return None
    path, attrs, unigrams = found
    weights = {} if cfg.lm_weight < 0 else {"alpha": cfg.lm_weight, "beta": cfg.lm_word_score}
    lm = load_language_model(path, speller(runner.vocab), attrs=attrs, unigrams=unigrams, **weights)
    logger.info("language model %s: %d words, alpha %.3g, beta %.3g", path, len(lm.index), lm.alpha, lm.beta)
    return lm


def word_list_decoder(vocab: TokenVocabulary, words: Iterable[str], cfg: DecoderConfig, source: str, *,
                      unk: bool = False, lm: LanguageModel | None = None,
                      hotwords: Hotwords | None = None) -> Lexicon:
    """A word-list decoder spelled with ``vocab``; raises ConfigError naming ``source``.

    ``unk``: speech that fits no listed word reads as ``[unk]`` (a Vosk ``phrase_list`` with ``"[unk]"``);
    without it every stretch of speech is read as listed words. ``lm``: the daemon's language model
    (:attr:`Lexicon.lm` of the daemon's decoder) to score the list's word sequences with.
    """
    return Lexicon(words, vocab.token_ids, vocab.blank_id, vocab.delimiter_id, beam_size=cfg.beam_size,
                   word_score=cfg.word_score, source=source, unk=unk, unk_score=cfg.unk_score, lm=lm,
                   hotwords=hotwords, alternatives=cfg.alternatives)


def stream_decoder(base: Decoder | None, vocab: TokenVocabulary, cfg: DecoderConfig,
                   hotwords: Iterable[tuple[str, float | None]] | None = None,
                   alternatives: int | None = None) -> Decoder | None:
    """A stream's decoder: ``base`` (the daemon's, or the stream's own word list) with the stream's own
    hotwords (added to a word list and boosted; boosted in the lexicon-free search, which greedy decoding
    becomes when hotwords come) and n-best count. Raises ConfigError for hotwords the model cannot spell.
    """
    hw = parse_hotwords(hotwords, speller(vocab), cfg.hotword_weight, "the stream's hotwords") if hotwords else None
    if base is None:
        if hw is None:
            return None  # greedy decoding reads no alternatives
        return OpenVocabulary(vocab.token_ids, vocab.blank_id, vocab.delimiter_id, lm=None, hotwords=hw,
                              beam_size=cfg.lm_beam_size, beam_size_token=cfg.lm_beam_size_token,
                              alternatives=alternatives or 0, source="the stream's hotwords")
    return base.with_options(hotwords=hw, alternatives=alternatives)


def hotword_letters(base: Decoder | None, hotwords: Iterable[tuple[str, float | None]] | None) -> int:
    """The letters of the search trie a stream's hotwords make (its word list rebuilt with them); 0: none."""
    if not hotwords or not isinstance(base, Lexicon):
        return 0
    return trie_letters([*base.words, *(w for phrase, _ in hotwords for w in phrase.split())])


LETTER_BYTES = 370
"""measured memory (RSS) per letter of a word list's search trie (flashlight-text), in bytes"""


def trie_letters(words: Iterable[str]) -> int:
    """The size of a word list's search trie: its letters, a prefix shared by several words counted once,
    plus one word delimiter per word. What a word list costs in memory is this times :data:`LETTER_BYTES`."""
    total, previous = 0, ""
    for word in sorted(set(words)):
        shared = 0
        for a, b in zip(word, previous, strict=False):
            if a != b:
                break
            shared += 1
        total += len(word) - shared + 1
        previous = word
    return total


class WordListBudget:
    """The letters of the word lists clients brought (native ``words``, Vosk ``phrase_list``) alive now.

    A list's letters are reserved before its trie is built and given back when the trie is freed (not
    when its stream ends, should something still hold it). glibc keeps freed memory of many small
    allocations in its arenas, so freed tries' memory is handed back to the system (:class:`MemoryReturn`).
    """

    TRIM_AFTER = 10_000
    """letters freed before memory is handed back to the system: smaller lists' memory is simply reused"""
    TRIM_DELAY_S = 1.0
    """how long after a list's release its memory is handed back: the trie goes after its Lexicon (the finalizer
    runs first), and the searches of its stream hold it"""

    def __init__(self) -> None:
        self.used = 0
        self._lock = threading.Lock()
        self._memory = MemoryReturn(self.TRIM_AFTER, self.TRIM_DELAY_S)

    def reserve(self, letters: int, total: int) -> bool:
        """Reserve ``letters`` if the lists alive stay within ``total``; False when they would not."""
        with self._lock:
            if self.used + letters > total:
                return False
            self.used += letters
            return True

    def build(self, vocab: TokenVocabulary, words: Iterable[str], cfg: DecoderConfig, source: str,
              letters: int, *, unk: bool = False, lm: LanguageModel | None = None) -> Lexicon:
        """Build a reserved list (in a thread); its letters come back when it is freed or fails to build.

        ``unk`` and ``lm`` as :func:`word_list_decoder`."""
        try:
            lexicon = word_list_decoder(vocab, words, cfg, source, unk=unk, lm=lm)
        except BaseException:
            self._release(letters)
            raise
        weakref.finalize(lexicon, self._release, letters)
        return lexicon

    def release(self, letters: int) -> None:
        """Give back ``letters`` reserved for a trie that was not built, or has been freed."""
        self._release(letters)

    def _release(self, letters: int) -> None:
        with self._lock:
            self.used -= letters
        self._memory.freed(letters)
