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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamer.ctc import FRAME_S
from streamer.events import Alternative, Word
from streamer.exceptions import ConfigError
from streamer.lm import Hotwords, LanguageModel, ScoreCache, make_search_lm
from streamer.text import Alphabet, join_words, solo, unspelled, word_spans

__all__ = ["MAX_ALTERNATIVES", "MAX_WORD_LETTERS", "UNK", "Alternative", "Lexicon", "LexiconSearch", "OpenVocabulary",
           "merge_unk", "read_word_list"]

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


UNK = "[unk]"
"""what speech outside a word list reads as when the list asks for it (Vosk's ``[unk]``)"""
MAX_ALTERNATIVES = 10
"""the most alternatives (n-best) a final may carry"""
Confidences = dict[tuple[tuple[int, ...], tuple[int, ...]], float]
"""words' confidences by their frames and letters (:meth:`_Searcher._words`), for rows that do not change"""


@dataclass
class Walked:
    """How far a reading of a search's best hypothesis got (:meth:`_Searcher._words`): its tokens and labels up to
    just after the last word it completed, and the words to there. The next reading of the same search whose
    hypothesis begins with those tokens and labels takes its words from here and reads on from there: a partial reads
    its segment's words again every hop, and a segment may run to ``endpoint.max_utterance_s``."""

    toks: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    done: int = 0


class _Searcher:
    """What the word-list and the lexicon-free searches share: results into words, n-best, searches."""

    source: str
    blank_id: int
    delimiter_id: int
    alternatives: int
    _needs: int
    _fl: Any

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

    def _new_decoder(self) -> tuple[Any, Any]:
        """A flashlight decoder and the LM it scores with (which must live as long as it)."""
        raise NotImplementedError

    def _partial_searcher(self) -> _Searcher:
        """What reads a partial's tentative tail (the frames after the last completed word and the look-ahead)."""
        return self

    def _check(self, log_probs: np.ndarray) -> np.ndarray:
        lp = np.ascontiguousarray(log_probs, dtype=np.float32)
        if lp.ndim != 2 or (len(lp) and lp.shape[1] <= self._needs):
            raise ValueError(f"expected [frames, > {self._needs}] log-probs, got shape {lp.shape}")
        return lp

    def _word_text(self, label: int, letters: list[int]) -> str | None:
        """The word a hypothesis completes: by its trie label, or spelled from ``letters`` (label -1)."""
        raise NotImplementedError

    def _words(self, result: Any, lp: np.ndarray, start_frame: int, complete: bool = False,
               confs: Confidences | None = None, walked: Walked | None = None) -> tuple[list[Word], int]:
        """The words of a flashlight result, and the frame after the last one's last letter (0: none).

        ``result.tokens[t + 1]`` is the token of frame ``t`` (``tokens[0]`` is the start state); the
        word-list search emits a word's label on the frame that completes it (its delimiter, or the letter
        of an ``[unk]`` stretch); the lexicon-free search's words end at a delimiter, or at the end when
        ``complete``. ``confs``: the confidences of words read before from rows of ``lp`` that have not changed
        since (a segment's search, whose frames only grow), by their frames and tokens; read and added to.
        ``walked``: where an earlier reading of the same search's rows got (:class:`Walked`); read on from there when
        this hypothesis begins as that one did, and updated.
        """
        toks = list(result.tokens)[1:]
        labels = list(result.words)[1:]
        n = len(lp)
        words: list[Word] = []
        frames: list[int] = []  # the current word's letter frames
        letters: list[int] = []  # its letters, CTC-collapsed
        starts: list[int] = []  # where each letter's frames start in ``frames``
        prev = -1
        done = 0
        begin = 0  # the first frame read
        if walked is not None:
            k = len(walked.toks)
            if k and toks[:k] == walked.toks and labels[:k] == walked.labels:
                # the same frames, tokens and labels as far as the last word read before: the same words to there
                words, done, prev, begin = list(walked.words), walked.done, walked.toks[-1], k

        def add(text: str | None, at: list[int]) -> None:
            nonlocal done
            if text is not None and at:
                ids = [toks[t] for t in at]
                key = (tuple(at), tuple(ids))
                conf = confs.get(key) if confs is not None else None
                if conf is None:  # (three numpy calls: a partial reads its segment's words again every hop)
                    conf = float(np.exp(lp[at, ids]).mean())
                    if confs is not None:
                        confs[key] = conf
                words.append(Word(text, (start_frame + at[0]) * FRAME_S, (start_frame + at[-1] + 1) * FRAME_S, conf))
                done = at[-1] + 1

        def emit(text: str | None) -> None:
            add(text, frames)
            frames.clear()
            letters.clear()
            starts.clear()

        def emit_spelled() -> None:
            """A word spelled letter by letter, cut as greedy decoding cuts words: a character of a script written
            without spaces (Han, kana) is a word of its own (:func:`streamer.text.word_spans`)."""
            text = self._word_text(-1, letters)
            if not text or not any(map(solo, text)):
                emit(text)
                return
            spans = word_spans([self._word_text(-1, [c]) or "" for c in letters])
            for a, b in spans:
                add(self._word_text(-1, letters[a:b]), frames[starts[a] : starts[b] if b < len(starts) else None])
            emit(None)

        mark = -1  # the last frame where a word was read (no letter pending after it)
        for t in range(begin, len(toks)):
            tok = toks[t]
            if tok != self.blank_id and tok != self.delimiter_id and tok >= 0 and t < n:
                frames.append(t)
                if tok != prev:
                    letters.append(tok)
                    starts.append(len(frames) - 1)
            label = labels[t] if t < len(labels) else -1
            if label >= 0:
                emit(self._word_text(label, letters))
                mark = t
            elif tok == self.delimiter_id and letters and self._spells():
                emit_spelled()
                mark = t
            prev = tok
        if walked is not None and mark >= 0:
            walked.toks, walked.labels = toks[: mark + 1], labels[: mark + 1]
            walked.words, walked.done = list(words), done
        if complete and letters and self._spells():
            emit_spelled()
        return merge_unk(words), done

    def _spells(self) -> bool:
        return False

    def _finals(self, decoder: Any, rows: np.ndarray, start_frame: int,
                confs: Confidences | None = None) -> tuple[list[Word], tuple[Alternative, ...]]:
        results = decoder.get_all_final_hypothesis()
        if not results:
            return [], ()
        best = self._words(results[0], rows, start_frame, complete=True, confs=confs)[0]
        if not self.alternatives:
            return best, ()
        readings: dict[str, tuple[float, float, list[Word]]] = {}  # text -> (log-sum of scores, best, words)
        for r in results:
            words = self._words(r, rows, start_frame, complete=True, confs=confs)[0]
            text = join_words(w.word for w in words)
            if text in readings:
                total, top, kept = readings[text]
                readings[text] = (float(np.logaddexp(total, r.score)), max(top, r.score), kept)
            else:
                readings[text] = (float(r.score), float(r.score), words)
        texts = sorted(readings, key=lambda k: -readings[k][1])
        norm = float(np.logaddexp.reduce([readings[k][0] for k in texts]))
        alts = tuple(Alternative(k, float(np.exp(readings[k][0] - norm)), tuple(readings[k][2]))
                     for k in texts[: self.alternatives])
        first = alts[0].words if alts else ()
        return list(first) if first else best, alts


def merge_unk(words: list[Word]) -> list[Word]:
    """Consecutive ``[unk]`` words (an unlisted word read letter by letter) as one."""
    out: list[Word] = []
    for w in words:
        if w.word == UNK and out and out[-1].word == UNK:
            last = out[-1]
            out[-1] = Word(UNK, last.start, w.end, (last.conf + w.conf) / 2)
        else:
            out.append(w)
    return out


class Lexicon(_Searcher):
    """Decode CTC log-probabilities into words of a fixed list.

    ``token_ids`` maps the tokenizer's tokens (single characters for wav2vec2 CTC models) to ids;
    every word must be spelled with them (its lower- or upper-case form is tried too, for
    tokenizers with upper-case letters), after Unicode normalisation to the vocabulary's form
    (:class:`streamer.text.Alphabet`). ``word_score`` is added per word (negative values
    prefer fewer, longer words); ``beam_size`` bounds the hypotheses kept per frame.

    ``unk``: speech that fits no listed word may read as ``[unk]`` (Vosk's behaviour when its phrase list
    has ``[unk]``): any letter can start an unlisted stretch, at ``unk_score`` per letter, so a listed
    word wins wherever the letters fit it. ``lm`` scores word sequences (an n-gram, see
    :mod:`streamer.lm`); ``hotwords`` are added to the list and boosted. ``alternatives``: how many
    readings (n-best) a finished search reports.
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
        unk: bool = False,
        unk_score: float = -5.0,
        lm: LanguageModel | None = None,
        hotwords: Hotwords | None = None,
        alternatives: int = 0,
        beam_size_token: int = 0,
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
        self.token_ids = dict(token_ids)
        self.n_tokens = max(token_ids.values()) + 1
        self.words: list[str] = []
        self.unk, self.unk_score, self.lm, self.hotwords = unk, unk_score, lm, hotwords
        self.alternatives = min(alternatives, MAX_ALTERNATIVES)
        self._settings = {"beam_size": beam_size, "word_score": word_score, "unk_score": unk_score,
                          "beam_size_token": beam_size_token}
        self._needs = max(blank_id, delimiter_id)  # the highest id the search reads from the log-probs
        bad: list[str] = []
        self._trie = fl.Trie(self.n_tokens, delimiter_id)
        seen: set[str] = set()
        # letters: single-character tokens other than the blank and the word delimiter
        self.letters = letters = {t: i for t, i in token_ids.items()
                                  if len(t) == 1 and i not in (blank_id, delimiter_id)}
        self.alphabet = alphabet = Alphabet(letters)
        spellings: list[list[int]] = []
        for word in [*words, *(hotwords.weights if hotwords else ())]:
            if len(word) > MAX_WORD_LETTERS:
                raise ConfigError(f"{source}: a word of {len(word)} letters ({word[:20]!r}...); words may have at "
                                  f"most {MAX_WORD_LETTERS}")
            spelling = alphabet.spell(word)
            if spelling is None:
                bad.append(word)
                continue
            text = "".join(spelling[0])
            if text in seen:
                continue
            seen.add(text)
            spellings.append(spelling[1])
            self.words.append(text)
            self._needs = max(self._needs, *spelling[1])
        if bad:
            raise ConfigError(
                f"{source}: {len(bad)} word(s) cannot be spelled with the model's letters, e.g. "
                f"{unspelled(bad, alphabet)}; the letters are {alphabet.shown()!r}"
            )
        if not self.words:
            raise ConfigError(f"{source} has no words; give one word per line")
        self._scored = bool(lm or hotwords or unk)
        unigram = self._unigram_scores() if self._scored else None
        for i, ids in enumerate(spellings):
            self._trie.insert([*ids, delimiter_id], i, unigram[i] if unigram else 0.0)
        self.unk_label = len(self.words)
        if unk:
            for i in sorted(set(letters.values())):
                self._trie.insert([i], self.unk_label, unk_score)
                self._needs = max(self._needs, i)
        self._trie.smear(fl.SmearingMode.MAX)
        self._options = self._decoder_options(beam_size, beam_size_token or self.n_tokens)
        self._lm = fl.ZeroLM()
        self._scores = ScoreCache()  # the LM's scores, shared by this list's searches (and its clones')

    BEAM_THRESHOLD = 25.0
    """how far below the best hypothesis's score the search keeps others (flashlight's ``beam_threshold``)"""

    def _decoder_options(self, beam_size: int, beam_size_token: int, threshold: float = BEAM_THRESHOLD) -> Any:
        fl = self._fl
        return fl.LexiconDecoderOptions(
            beam_size=beam_size, beam_size_token=beam_size_token, beam_threshold=threshold,
            lm_weight=1.0 if self._scored else 0.0, word_score=0.0 if self.lm else self._settings["word_score"],
            unk_score=float("-inf"), sil_score=0.0, log_add=False, criterion_type=fl.CriterionType.CTC,
        )

    PARTIAL_BEAM = (40, 8, 20.0)
    """beam size, letters per frame and beam threshold of a partial's fresh search over its tail (the frames after the
    last word the segment's search completed, and the look-ahead): it runs every hop over a second of frames or more,
    so it was most of the word list's cost. A trained model's outputs are peaky: the letters past the 8 likeliest of
    a frame never win, and trying them cost a fifth of the search. From (50, 8, 25) to (40, 8, 20), the search and
    the LM's callbacks cost 23 % less (``clients/frontcpu.py --seconds 120 --streams 8 --compare``: 4.02 to 3.09 ms
    per stream-second); over 120 s of speech the partials showed another text for 2.4 s, each time a last,
    tentative word shown a hop later or not at all ("tom" of "tomorrow", a misheard "is"), and their delay and
    wrong words measured the same. A narrower beam (10 or 20) or threshold (18) read unlike a search over all the
    frames more often. The finals keep every letter and the full beam."""

    def _partial_searcher(self) -> Lexicon:
        quick = self.__dict__.get("_quick")
        if quick is None:
            beam, tokens, threshold = self.PARTIAL_BEAM
            quick = object.__new__(Lexicon)
            quick.__dict__.update(self.__dict__)
            quick._options = self._decoder_options(min(beam, int(self._settings["beam_size"])),
                                                   min(tokens, int(self._settings["beam_size_token"]) or self.n_tokens),
                                                   threshold)
            self.__dict__["_quick"] = quick
        return quick

    def _unigram_scores(self) -> list[float]:
        """Each word's score from the start of a segment: what the trie's look-ahead (smearing) uses."""
        lm = make_search_lm(self.lm, self.hotwords, labels=self.words, unk_label=-2)
        state = lm.start(False)
        return [lm.score(state, i)[1] for i in range(len(self.words))]

    def with_options(self, *, hotwords: Hotwords | None = None, alternatives: int | None = None,
                     unk: bool | None = None) -> Lexicon:
        """This list with a stream's own hotwords (added to the list and boosted), n-best count or ``[unk]``."""
        if hotwords is None and (unk is None or unk == self.unk):
            clone = object.__new__(Lexicon)
            clone.__dict__.update(self.__dict__)
            clone.alternatives = min(self.alternatives if alternatives is None else alternatives, MAX_ALTERNATIVES)
            return clone
        merged = hotwords.merged(self.hotwords) if hotwords else self.hotwords
        base = [w for w in self.words if not (self.hotwords and w in self.hotwords.weights)]
        return Lexicon(base, self.token_ids, self.blank_id, self.delimiter_id, source=self.source,
                       unk=self.unk if unk is None else unk, lm=self.lm, hotwords=merged,
                       alternatives=self.alternatives if alternatives is None else alternatives,
                       **self._settings)  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: str | Path, token_ids: Mapping[str, int], blank_id: int, delimiter_id: int | None,
                  **kw: float | int) -> Lexicon:
        return cls(read_word_list(path), token_ids, blank_id, delimiter_id, source=str(path), **kw)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.words)

    def _new_decoder(self) -> tuple[Any, Any]:
        lm = (make_search_lm(self.lm, self.hotwords, labels=self.words, unk_label=self.unk_label,
                             unk_score=self.unk_score, cache=self._scores) if self._scored else self._lm)
        return self._fl.LexiconDecoder(self._options, self._trie, lm, self.delimiter_id, self.blank_id,
                                       -1, [], False), lm

    def _word_text(self, label: int, letters: list[int]) -> str | None:
        if label < 0:
            return None
        return UNK if label == self.unk_label else self.words[label]


class OpenVocabulary(_Searcher):
    """A lexicon-free search over the model's letters with an n-gram LM (and hotwords): any spelling can
    come out, the LM prefers the word sequences it knows (words it lacks cost ``unk_score_offset``).

    Costs one Python call per hypothesis and letter tried, so ``beam_size_token`` (letters tried per
    frame) and ``beam_size`` are kept small.
    """

    def __init__(self, token_ids: Mapping[str, int], blank_id: int, delimiter_id: int | None, *,
                 lm: LanguageModel | None, hotwords: Hotwords | None = None, beam_size: int = 20,
                 beam_size_token: int = 8, alternatives: int = 0, source: str = "language model") -> None:
        from flashlight.lib.text import decoder as fl

        if delimiter_id is None:
            raise ConfigError(f"{source}: the model's tokenizer has no word delimiter token (such as '|'), which "
                              "decoding with a language model needs; set decoder.lm = \"\"")
        self._fl = fl
        self.source = source
        self.blank_id, self.delimiter_id = blank_id, delimiter_id
        self.token_ids = dict(token_ids)
        self.lm, self.hotwords = lm, hotwords
        self.alternatives = min(alternatives, MAX_ALTERNATIVES)
        self.chars = {i: t for t, i in token_ids.items() if len(t) == 1 and i not in (blank_id, delimiter_id)}
        self._needs = max(blank_id, delimiter_id)  # letters beyond the model's outputs are never tried
        self.beam_size = beam_size
        """hypotheses kept per frame"""
        self.beam_size_token = beam_size_token
        """letters tried per frame"""
        self._options = fl.LexiconFreeDecoderOptions(
            beam_size=beam_size, beam_size_token=beam_size_token, beam_threshold=25.0, lm_weight=1.0,
            sil_score=0.0, log_add=False, criterion_type=fl.CriterionType.CTC)
        self._scores = ScoreCache()  # the LM's scores, shared by this search's decoders

    def __len__(self) -> int:
        return 0  # no list of words

    def __bool__(self) -> bool:
        return True  # a decoder, though it has no list (``words or default`` must keep it)

    def with_options(self, *, hotwords: Hotwords | None = None, alternatives: int | None = None,
                     unk: bool | None = None) -> OpenVocabulary:
        """This search with a stream's own hotwords or n-best count (``unk`` has no meaning here)."""
        return OpenVocabulary(self.token_ids, self.blank_id, self.delimiter_id, lm=self.lm,
                              hotwords=hotwords.merged(self.hotwords) if hotwords else self.hotwords,
                              alternatives=self.alternatives if alternatives is None else alternatives,
                              source=self.source, beam_size=self.beam_size, beam_size_token=self.beam_size_token)

    PARTIAL_BEAM = (8, 4)
    """beam size and letters per frame of a partial's fresh search over its tail: a partial is only shown,
    and the search without a word list costs a Python call per hypothesis and letter, every hop"""

    def _partial_searcher(self) -> OpenVocabulary:
        quick = self.__dict__.get("_quick")
        if quick is None:
            beam, tokens = self.PARTIAL_BEAM
            quick = OpenVocabulary(self.token_ids, self.blank_id, self.delimiter_id, lm=self.lm,
                                   hotwords=self.hotwords, beam_size=min(beam, self.beam_size),
                                   beam_size_token=min(tokens, self.beam_size_token),
                                   source=self.source)
            self.__dict__["_quick"] = quick
        return quick

    def _new_decoder(self) -> tuple[Any, Any]:
        lm = make_search_lm(self.lm, self.hotwords, chars=self.chars, delimiter=self.delimiter_id, cache=self._scores)
        return self._fl.LexiconFreeDecoder(self._options, lm, self.delimiter_id, self.blank_id, []), lm

    def _spells(self) -> bool:
        return True

    def _word_text(self, label: int, letters: list[int]) -> str | None:
        return "".join(self.chars[i] for i in letters)


class LexiconSearch:
    """One segment's search, fed its final frames as they come (flashlight's incremental decoding).

    :meth:`step` costs only the new frames. :meth:`partial` shows the words completed so far plus a
    fresh search over the frames after them and the tentative look-ahead frames (which must not
    enter the search: they change in the next window), so its cost does not grow with the segment.
    After :meth:`finish`, :attr:`alternatives` holds the n-best readings (when the decoder asks for any).
    """

    def __init__(self, lexicon: _Searcher, start_frame: int) -> None:
        self.lexicon = lexicon
        self.start_frame = start_frame
        self._decoder, self._lm = lexicon._new_decoder()
        self._decoder.decode_begin()
        self._rows: list[np.ndarray] = []
        self._confs: Confidences = {}  # the confidences of the words its partials read (_words)
        self._walked = Walked()  # how far its partials read its best hypothesis (_words)
        self._finished = False
        self.alternatives: tuple[Alternative, ...] = ()

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
            done, boundary = self.lexicon._words(self._decoder.get_best_hypothesis(0), rows, self.start_frame,
                                                 confs=self._confs, walked=self._walked)
        tail = rows[boundary:]
        la = self.lexicon._check(lookahead)
        if len(la):
            tail = np.concatenate([tail, la]) if len(tail) else la
        if not len(tail):
            return merge_unk(done)
        quick = self.lexicon._partial_searcher()  # a lighter search for what is only shown
        return merge_unk(done + quick.decode(tail, self.start_frame + boundary))

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
        words, self.alternatives = self.lexicon._finals(self._decoder, rows, self.start_frame, self._confs)
        return words
