"""A stream's own decoder, within the letter budget: the one place that builds it.

A client may bring a word list (native ``words``, Vosk ``phrase_list``), hotwords and an n-best
count (native ``hotwords`` and ``alternatives``, Vosk ``max_alternatives``). A word list's search
trie costs memory (about :data:`streamer.decoder.LETTER_BYTES` a letter), so each is counted
against ``server.max_word_list_letters`` (one list) and ``server.max_word_list_letters_total``
(the lists alive now), and its letters come back when it is freed. Both are built in a thread: a
list of thousands of words takes a noticeable time, and other streams go on. A bad list is the
client's error (``bad_words``, ``bad_hotwords``: 1008), a full budget ``busy`` (1013).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable

from streamer.aio.host import StreamHost
from streamer.decoder import hotword_letters, stream_decoder, trie_letters
from streamer.engine import WordDecoder
from streamer.events import CLOSE_POLICY, CLOSE_TRY_AGAIN
from streamer.exceptions import ConfigError, ProtocolError
from streamer.lexicon import Lexicon, OpenVocabulary

__all__ = ["own_word_list", "tuned_decoder"]


async def own_word_list(host: StreamHost, words: tuple[str, ...], *, unk: bool = False) -> WordDecoder:
    """A stream's own word list, spelled with the model's tokens.

    ``unk``: speech that fits no listed word reads as ``[unk]`` (a Vosk ``phrase_list`` with ``"[unk]"``).
    """
    srv = host.cfg.server
    letters = trie_letters(words)  # what its search trie costs: about LETTER_BYTES each
    if letters > srv.max_word_list_letters:
        raise ProtocolError(f"the word list has {letters} letters (a prefix shared by several words counted "
                            f"once, plus one per word); the limit is {srv.max_word_list_letters}",
                            kind="bad_words", code=CLOSE_POLICY)
    if not host.word_lists.reserve(letters, srv.max_word_list_letters_total):
        raise ProtocolError(f"server busy: the word lists of other streams hold {host.word_lists.used} of "
                            f"{srv.max_word_list_letters_total} letters and this one has {letters}; try again "
                            "later or send a shorter list", kind="busy", code=CLOSE_TRY_AGAIN)
    try:  # the letters come back when the list is freed, or at once if it cannot be built
        return await asyncio.to_thread(host.word_lists.build, host.model.vocab, words, host.cfg.decoder,
                                       "the stream's word list", letters, unk=unk)
    except ConfigError as exc:
        raise ProtocolError(str(exc), kind="bad_words", code=CLOSE_POLICY) from None


async def tuned_decoder(host: StreamHost, words: WordDecoder | None, *,
                        hotwords: Iterable[tuple[str, float | None]] | None = None,
                        alternatives: int | None = None) -> WordDecoder | None:
    """The stream's decoder (``words``: its own list, else the daemon's) with its own hotwords and n-best count.

    Hotwords with a word list rebuild its search trie for this stream, counted like a stream's own
    word list; bad hotwords are the client's error (``bad_hotwords``). Greedy decoding reads no
    alternatives; a decoder other than the word-list or lexicon-free search is used as it is.
    """
    if hotwords is None and alternatives is None:
        return words
    srv = host.cfg.server
    base = words if words is not None else host.words
    if not isinstance(base, (Lexicon, OpenVocabulary)) and base is not None:
        return words
    letters = hotword_letters(base, hotwords)
    if letters > srv.max_word_list_letters:
        raise ProtocolError(f"hotwords rebuild the word list's search trie for this stream: {letters} letters, "
                            f"the limit is {srv.max_word_list_letters}; send a shorter word list",
                            kind="bad_hotwords", code=CLOSE_POLICY)
    if letters and not host.word_lists.reserve(letters, srv.max_word_list_letters_total):
        raise ProtocolError("server busy: the word lists of other streams hold their letters; try again later",
                            kind="busy", code=CLOSE_TRY_AGAIN)
    try:
        tuned = await asyncio.to_thread(stream_decoder, base, host.model.vocab, host.cfg.decoder, hotwords,
                                        alternatives)
    except ConfigError as exc:
        if letters:
            host.word_lists.release(letters)
        raise ProtocolError(str(exc), kind="bad_hotwords", code=CLOSE_POLICY) from None
    if letters and tuned is not None:
        weakref.finalize(tuned, host.word_lists.release, letters)
    return tuned
