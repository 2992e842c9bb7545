"""Building the word decoder from ``[decoder]``: a word list (or none: greedy CTC) for a runner's vocabulary.

The daemon, ``transcribe``, ``mic``, ``eval`` and ``bench`` call :func:`build_decoder` once and pass
the result explicitly where sessions are made; a stream's own list (native ``words``, Vosk
``phrase_list``) comes from :func:`word_list_decoder`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from streamer.config import DecoderConfig
from streamer.exceptions import ConfigError
from streamer.lexicon import Lexicon, read_word_list
from streamer.runner import Runner, TokenVocabulary

__all__ = ["WORD_LIST", "build_decoder", "word_list_decoder"]

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
