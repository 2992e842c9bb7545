"""Word-list constrained CTC decoding: flashlight-text's lexicon beam search.

Greedy CTC spells every word letter by letter, so a small model's slips ("thre", "kitcheng") reach
the transcript. With a word list, the beam search only follows letter paths that spell listed
words, separated by the word delimiter, and picks the best-scoring such path through the CTC
log-probabilities (Vosk's grammar does the same for its models). The demo model ships the
vocabulary it was trained on as ``words.txt``; any checkpoint can be given a domain word list.

Pure numpy around flashlight-text: no torch, no I/O apart from reading the list in
:meth:`Lexicon.from_file`. One :class:`Lexicon` is shared by all streams; each call builds its own
decoder, so calls do not share search state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamer.ctc import FRAME_S
from streamer.events import Word
from streamer.exceptions import ConfigError

__all__ = ["MAX_WORD_LETTERS", "Lexicon", "LexiconSearch", "read_word_list"]

MAX_WORD_LETTERS = 100
"""longer words are refused: the search's letter trie is walked recursively, one level per letter"""


def read_word_list(path: str | Path) -> list[str]:
    """One word per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of a word
    except OSError as exc:
        raise ConfigError(f"cannot read the word list {str(p)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the word list {str(p)!r} is not UTF-8 text ({exc.reason})") from exc
    return [w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")]


class Lexicon:
    """Decode CTC log-probabilities into words of a fixed list.

    ``token_ids`` maps the tokenizer's tokens (single characters for wav2vec2 CTC models) to ids;
    every word must be spelled with them (its lower- or upper-case form is tried too, for
    tokenizers with upper-case letters). ``word_score`` is added per word (negative values
    prefer fewer, longer words); ``beam_size`` bounds the hypotheses kept per frame.
    """

    def __init__(
        self,
        words: Iterable[str],
        token_ids: Mapping[str, int],
        blank_id: int,
        delimiter_id: int | None,
        *,
        beam_size: int = 50,
        word_score: float = -1.0,
        source: str = "word list",
    ) -> None:
        from flashlight.lib.text import decoder as fl

        if delimiter_id is None:
            raise ConfigError(
                f"{source}: the model's tokenizer has no word delimiter token (such as '|'), which "
                "word-list decoding needs; set decoder.words = \"\" to decode without a word list"
            )
        self._fl = fl
        self.source = source
        self.blank_id = blank_id
        self.delimiter_id = delimiter_id
        self.n_tokens = max(token_ids.values()) + 1
        self.words: list[str] = []
        self._needs = max(blank_id, delimiter_id)  # the highest id the search reads from the log-probs
        bad: list[str] = []
        self._trie = fl.Trie(self.n_tokens, delimiter_id)
        seen: set[str] = set()
        # letters: single-character tokens other than the blank and the word delimiter
        letters = {t: i for t, i in token_ids.items() if len(t) == 1 and i not in (blank_id, delimiter_id)}
        for word in words:
            if len(word) > MAX_WORD_LETTERS:
                raise ConfigError(f"{source}: a word of {len(word)} letters ({word[:20]!r}...); words may have at "
                                  f"most {MAX_WORD_LETTERS}")
            spelling = self._spell(word, letters)
            if spelling is None:
                bad.append(word)
                continue
            text = "".join(spelling[0])
            if text in seen:
                continue
            seen.add(text)
            self._trie.insert([*spelling[1], delimiter_id], len(self.words), 0.0)
            self.words.append(text)
            self._needs = max(self._needs, *spelling[1])
        if bad:
            raise ConfigError(
                f"{source}: {len(bad)} word(s) cannot be spelled with the model's letters, e.g. "
                f"{', '.join(repr(b) for b in bad[:5])}; the letters are "
                f"{''.join(sorted(t for t in letters if t.isprintable() and t != ' '))!r}"
            )
        if not self.words:
            raise ConfigError(f"{source} has no words; give one word per line")
        self._trie.smear(fl.SmearingMode.MAX)
        self._options = fl.LexiconDecoderOptions(
            beam_size=beam_size, beam_size_token=self.n_tokens, beam_threshold=25.0, lm_weight=0.0,
            word_score=word_score, unk_score=float("-inf"), sil_score=0.0, log_add=False,
            criterion_type=fl.CriterionType.CTC,
        )
        self._lm = fl.ZeroLM()

    @classmethod
    def from_file(cls, path: str | Path, token_ids: Mapping[str, int], blank_id: int, delimiter_id: int | None,
                  **kw: float | int) -> Lexicon:
        return cls(read_word_list(path), token_ids, blank_id, delimiter_id, source=str(path), **kw)  # type: ignore[arg-type]

    @staticmethod
    def _spell(word: str, letters: Mapping[str, int]) -> tuple[str, list[int]] | None:
        for form in (word, word.lower(), word.upper()):
            if form and all(c in letters for c in form):
                return form, [letters[c] for c in form]
        return None

    def __len__(self) -> int:
        return len(self.words)

    def search(self, start_frame: int = 0) -> LexiconSearch:
        """A search over frames that arrive in pieces, the first being global frame ``start_frame``."""
        return LexiconSearch(self, start_frame)

    def decode(self, log_probs: np.ndarray, start_frame: int = 0) -> list[Word]:
        """The best word sequence for ``[frames, tokens]`` log-probs whose first frame is ``start_frame``.

        Word times come from the best path's letters (frame index × 20 ms, as greedy decoding);
        confidence is the mean probability of the word's letter frames.
        """
        search = self.search(start_frame)
        search.step(log_probs)
        return search.finish()

    def _new_decoder(self) -> Any:
        return self._fl.LexiconDecoder(self._options, self._trie, self._lm, self.delimiter_id, self.blank_id,
                                       -1, [], False)

    def _check(self, log_probs: np.ndarray) -> np.ndarray:
        lp = np.ascontiguousarray(log_probs, dtype=np.float32)
        if lp.ndim != 2 or (len(lp) and lp.shape[1] <= self._needs):
            raise ValueError(f"expected [frames, > {self._needs}] log-probs, got shape {lp.shape}")
        return lp

    def _words(self, result: Any, lp: np.ndarray, start_frame: int) -> tuple[list[Word], int]:
        """The words of a flashlight result, and the frame after the last one's last letter (0: none).

        ``result.tokens[t + 1]`` is the token of frame ``t`` (``tokens[0]`` is the start state);
        the search emits a word id when the word is complete.
        """
        path = list(result.tokens)[1 : len(lp) + 1]
        ids = [w for w in result.words if w >= 0]
        groups: list[list[int]] = []  # frames of each word's letters
        current: list[int] = []
        for t, tok in enumerate(path):
            if tok == self.delimiter_id:
                if current:
                    groups.append(current)
                    current = []
            elif tok != self.blank_id:
                current.append(t)
        if current:
            groups.append(current)
        words = []
        for word_id, frames in zip(ids, groups, strict=False):
            probs = np.exp(lp[frames, [path[t] for t in frames]])
            words.append(Word(self.words[word_id], (start_frame + frames[0]) * FRAME_S,
                              (start_frame + frames[-1] + 1) * FRAME_S, float(probs.mean())))
        done = groups[len(words) - 1][-1] + 1 if words else 0
        return words, done


class LexiconSearch:
    """One segment's search, fed its final frames as they come (flashlight's incremental decoding).

    :meth:`step` costs only the new frames. :meth:`partial` shows the words completed so far plus a
    fresh search over the frames after them and the tentative look-ahead frames (which must not
    enter the search: they change in the next window), so its cost does not grow with the segment.
    """

    def __init__(self, lexicon: Lexicon, start_frame: int) -> None:
        self.lexicon = lexicon
        self.start_frame = start_frame
        self._decoder: Any = lexicon._new_decoder()
        self._decoder.decode_begin()
        self._rows: list[np.ndarray] = []
        self._finished = False

    def step(self, log_probs: np.ndarray) -> None:
        if self._finished:
            raise RuntimeError("this search is finished")
        lp = self.lexicon._check(log_probs)
        if len(lp):
            self._decoder.decode_step(lp.ctypes.data, lp.shape[0], lp.shape[1])
            self._rows.append(lp)

    def _all_rows(self) -> np.ndarray:
        if len(self._rows) > 1:
            self._rows = [np.concatenate(self._rows)]
        return self._rows[0] if self._rows else np.zeros((0, 0), np.float32)

    def partial(self, lookahead: np.ndarray) -> list[Word]:
        """A tentative reading of the frames so far followed by ``lookahead`` (not kept)."""
        rows = self._all_rows()
        done: list[Word] = []
        boundary = 0
        if len(rows):
            done, boundary = self.lexicon._words(self._decoder.get_best_hypothesis(0), rows, self.start_frame)
        tail = rows[boundary:]
        la = self.lexicon._check(lookahead)
        if len(la):
            tail = np.concatenate([tail, la]) if len(tail) else la
        return done + (self.lexicon.decode(tail, self.start_frame + boundary) if len(tail) else [])

    def finish(self) -> list[Word]:
        """The best word sequence over all frames stepped; the search ends."""
        self._finished = True
        rows = self._all_rows()
        if not len(rows):
            return []
        # Every listed word ends with the delimiter, and the search keeps only hypotheses that ended a
        # word: one certain delimiter frame lets a word whose last letter is the last frame count too
        # (a stream that stops, a flush or a max_length cut right after a word). Times ignore it.
        close = np.full((1, rows.shape[1]), -1e4, np.float32)
        close[0, self.lexicon.delimiter_id] = 0.0
        self._decoder.decode_step(close.ctypes.data, 1, close.shape[1])
        self._decoder.decode_end()
        return self.lexicon._words(self._decoder.get_all_final_hypothesis()[0], rows, self.start_frame)[0]
