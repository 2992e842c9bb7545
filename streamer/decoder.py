"""Building the word decoder from ``[decoder]``: a word list (or none: greedy CTC) for a runner's vocabulary.

The daemon, ``transcribe``, ``mic``, ``eval`` and ``bench`` call :func:`build_decoder` once and pass
the result explicitly where sessions are made; a stream's own list (native ``words``, Vosk
``phrase_list``) comes from :func:`word_list_decoder`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

from streamer.config import DecoderConfig
from streamer.exceptions import ConfigError
from streamer.lexicon import Lexicon, read_word_list
from streamer.runner import Runner, TokenVocabulary

__all__ = ["LETTER_BYTES", "WORD_LIST", "WordListBudget", "build_decoder", "trie_letters", "word_list_decoder"]

logger = logging.getLogger("streamer.decoder")

WORD_LIST = "words.txt"
"""the file name of the word list a checkpoint may ship (``decoder.words = "auto"``)"""


def build_decoder(cfg: DecoderConfig, runner: Runner) -> Lexicon | None:
    """The word list ``cfg.words`` asks for, spelled with ``runner``'s tokens; None for greedy decoding.

    ``auto`` uses the checkpoint's own ``words.txt`` when it ships one (the demo model does).
    Raises :class:`ConfigError` naming the file or the words that cannot be spelled.
    """
    if not cfg.words:
        return None
    if cfg.words == "auto":
        path = runner.shipped_file(WORD_LIST)
        if path is None:
            return None
    else:
        path = Path(cfg.words).expanduser()
        if not path.is_file():
            raise ConfigError(f"decoder.words = {cfg.words!r}: no such file; give a word list (one word per "
                              "line), 'auto', or '' for greedy decoding")
    lexicon = word_list_decoder(runner.vocab, read_word_list(path), cfg, str(path))
    logger.info("decoding with the word list %s (%d words)", path, len(lexicon))
    return lexicon


def word_list_decoder(vocab: TokenVocabulary, words: Iterable[str], cfg: DecoderConfig, source: str) -> Lexicon:
    """A word-list decoder spelled with ``vocab``; raises ConfigError naming ``source``."""
    return Lexicon(words, vocab.token_ids, vocab.blank_id, vocab.delimiter_id, beam_size=cfg.beam_size,
                   word_score=cfg.word_score, source=source)


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


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None  # glibc only
    return trim


class WordListBudget:
    """The letters of the word lists clients brought (native ``words``, Vosk ``phrase_list``) alive now.

    A list's letters are reserved before its trie is built and given back when the trie is freed (not
    when its stream ends, should something still hold it). glibc keeps freed memory of many small
    allocations in its arenas, so a freed trie's memory is returned to the system (``malloc_trim``, in
    a thread: it takes up to half a second with the model loaded).
    """

    TRIM_AFTER = 10_000
    """letters freed before memory is handed back to the system: smaller lists' memory is simply reused"""
    TRIM_DELAY_S = 1.0
    """how long after a list's release its memory is handed back"""

    def __init__(self) -> None:
        self.used = 0
        self._lock = threading.Lock()
        self._freed = 0  # letters freed since the last trim
        self._trimming = False
        self._trim = _malloc_trim()

    def reserve(self, letters: int, total: int) -> bool:
        """Reserve ``letters`` if the lists alive stay within ``total``; False when they would not."""
        with self._lock:
            if self.used + letters > total:
                return False
            self.used += letters
            return True

    def build(self, vocab: TokenVocabulary, words: Iterable[str], cfg: DecoderConfig, source: str,
              letters: int) -> Lexicon:
        """Build a reserved list (in a thread); its letters come back when it is freed or fails to build."""
        try:
            lexicon = word_list_decoder(vocab, words, cfg, source)
        except BaseException:
            self._release(letters)
            raise
        weakref.finalize(lexicon, self._release, letters)
        return lexicon

    def _release(self, letters: int) -> None:
        with self._lock:
            self.used -= letters
            self._freed += letters
            start = self._trim is not None and self._freed >= self.TRIM_AFTER and not self._trimming
            if start:
                self._freed, self._trimming = 0, True
        if start:
            threading.Thread(target=self._return_memory, name="malloc-trim", daemon=True).start()

    def _return_memory(self) -> None:
        assert self._trim is not None
        while True:  # again if more was freed meanwhile
            # the trie goes after its Lexicon (the finalizer runs first), and the searches of its stream hold it
            time.sleep(self.TRIM_DELAY_S)
            try:
                self._trim(0)
            finally:
                with self._lock:
                    again = self._freed >= self.TRIM_AFTER
                    self._freed = 0 if again else self._freed
                    self._trimming = again
            if not again:
                return
