"""The streaming engine: audio in, windows out, frames in, events out. No I/O.

A :class:`StreamSession` is one audio stream. Use it like a sans-I/O protocol::

    session = StreamSession(schedule, vocab, endpoint)
    session.accept_audio(samples)            # any chunk size, float32 or int16, 16 kHz mono
    for window in session.windows_to_run():  # windows that became ready
        session.accept_result(window, model([window.samples])[0])   # in order
    for event in session.events_received():  # Partial / Final
        ...
    session.finish()                         # end of stream: the rest becomes final

The frame grid is the model's (:class:`Schedule` carries it as plain numbers, the runner reports it):
frame t covers samples [320 t, 320 t + 400) for wav2vec2's convolutional feature encoder; 20 ms frames
(fbank shift 160 × stacking 2, ``receptive_field`` 560) or 40 ms frames with an adapter for
Wav2Vec2-BERT. Window geometry: final frames ``[f, f + hop)`` are decoded with ``left`` frames
of context before and ``lookahead`` frames after; the look-ahead frames form the partial.

Early partials: the first full window of a stream needs ``hop + lookahead`` frames of audio (1.4 s by
default), and so does the first one after a :meth:`StreamSession.flush`. Until it can run, a schedule with
``early`` frames plans a *provisional* window every ``early`` frames over the audio that has arrived
(:attr:`Window.provisional`). Its frames are all tentative: they only form a partial (a fresh word search
with a word list), never enter the final CTC state, the word search or the endpoint rules, so finals stay
exactly those of :func:`reference` whatever the arrival chunking. Provisional windows sit in the same
ordered queue as full ones, so results still come back in the order they were handed out. After an
endpoint the next full window is one hop away as always, so no provisional window is needed there. A session
whose partials nobody is shown (:attr:`StreamSession.partials` off) plans no provisional window and no refresh.

Text comes from greedy CTC (:mod:`streamer.ctc`), or, with ``words`` (a :class:`WordDecoder` such as
:class:`streamer.lexicon.Lexicon`), from a beam search over a word list: each segment's final frames
step one search, which the segment's final reads; partials add the look-ahead frames without keeping them.
Endpointing always counts greedy blank frames, so segments are cut the same either way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from streamer.ctc import FRAME_S, CtcSegment, Vocabulary
from streamer.endpoint import Endpointer, EndpointRules, VadTracker, vad_points
from streamer.events import Event, Final, Partial, SpeechStarted, SpeechStopped, UtteranceEnd, VoiceEvent, Word
from streamer.exceptions import AudioError
from streamer.text import join_words

__all__ = [
    "FRAME_SAMPLES",
    "RECEPTIVE_FIELD",
    "SAMPLE_RATE",
    "Schedule",
    "StreamSession",
    "Window",
    "WordDecoder",
    "WordSearch",
    "n_frames",
    "reference",
    "run_session",
]

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 320
RECEPTIVE_FIELD = 400
PAUSE_S = 0.1
"""non-speech heard by the voice-activity detector after which no provisional window is planned until speech comes
again"""

# A model call: windows (float32 arrays) in, per-window log-probabilities [frames, vocab] out.
RunFn = Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]]


class WordSearch(Protocol):
    """One segment's word search: final frames go in as they come (see :class:`streamer.lexicon.LexiconSearch`)."""

    def step(self, log_probs: np.ndarray) -> None: ...

    def partial(self, lookahead: np.ndarray) -> list[Word]:
        """A tentative reading of the frames so far followed by ``lookahead`` rows, which are not kept."""
        ...

    def finish(self) -> list[Word]: ...


class WordDecoder(Protocol):
    """Makes word searches (:class:`streamer.lexicon.Lexicon`: a word list)."""

    def search(self, start_frame: int = 0) -> WordSearch: ...


def n_frames(n_samples: int, frame_samples: int = FRAME_SAMPLES, receptive_field: int = RECEPTIVE_FIELD) -> int:
    """Frames a model yields for ``n_samples`` samples (default: the wav2vec2 feature encoder's grid).

    Frame ``t`` of a window starting at sample ``frame_samples · s`` is global frame ``s + t``; the first frame
    needs ``receptive_field`` samples, every further one ``frame_samples`` more.
    """
    if n_samples < receptive_field:
        return 0
    return (n_samples - receptive_field) // frame_samples + 1


@dataclass(frozen=True)
class Schedule:
    """Window geometry in frames.

    ``pipeline=True`` cuts windows exactly as transformers' ASR pipeline with
    ``chunk_length_s = (l+h+r)·frame_s`` and ``stride_length_s = (l·frame_s, r·frame_s)``: the first
    window finalises ``l + h`` frames, windows are ``frame_samples·(l+h+r)`` samples long (one frame
    fewer on wav2vec2's grid), and a window exactly at the end of the audio counts as the last one.
    """

    left: int
    hop: int
    lookahead: int
    pipeline: bool = False
    early: int = 0
    """frames between provisional windows while the first full window of a stream (or after a flush) cannot
    run yet; 0: none, the first partial waits for that window"""
    frame_samples: int = FRAME_SAMPLES
    """the model's samples per output frame (its grid; the runner's ``geometry``)"""
    receptive_field: int = RECEPTIVE_FIELD
    """samples the model needs for its first output frame; each further frame needs ``frame_samples`` more"""
    refresh: int = 0
    """frames between partial refreshes once full windows run: a refresh window is planned every ``refresh``
    frames of audio between two full windows (optional: a caller short of model time skips it); 0: none,
    partials come once per hop"""
    refresh_left: int | None = None
    """left context (frames before the first non-final frame) of a refresh window; None: ``left``"""

    def __post_init__(self) -> None:
        if self.frame_samples < 1 or self.receptive_field < 1:
            raise ValueError(f"frame_samples and receptive_field must be positive, got {self.frame_samples}, "
                             f"{self.receptive_field}")
        if self.refresh < 0 or (self.refresh_left is not None and not 0 <= self.refresh_left <= self.left):
            raise ValueError(f"refresh must be >= 0 and refresh_left within 0..left ({self.left}), got "
                             f"{self.refresh}, {self.refresh_left}")

    @property
    def frame_s(self) -> float:
        """Seconds per output frame."""
        return self.frame_samples / SAMPLE_RATE

    def n_frames(self, n_samples: int) -> int:
        """Frames the model yields for a window of ``n_samples`` samples."""
        return n_frames(n_samples, self.frame_samples, self.receptive_field)

    @property
    def tail(self) -> int:
        """Samples after the last frame boundary that a window includes (negative: it ends before it)."""
        return 0 if self.pipeline else self.receptive_field - self.frame_samples

    @property
    def window_samples(self) -> int:
        """Length of a steady-state window: all such windows batch without padding."""
        return self.frame_samples * (self.left + self.hop + self.lookahead) + self.tail

    def plan(self, next_final: int) -> tuple[int, int, int]:
        """Return ``(start, final_end, end)`` frames of the window that finalises from ``next_final``."""
        if self.pipeline and next_final == 0:
            final_end = self.left + self.hop
        else:
            final_end = next_final + self.hop
        start = max(0, next_final - self.left)
        return start, final_end, final_end + self.lookahead

    def ready(self, end_frame: int, n_available: int) -> bool:
        need = self.frame_samples * end_frame + self.tail
        # The pipeline treats a chunk that ends exactly at the end of the audio as the last one.
        return n_available > need if self.pipeline else n_available >= need


@dataclass(eq=False)
class Window:
    """Audio the model must run, and what the session will do with its frames."""

    samples: np.ndarray
    start_frame: int
    final_from: int
    final_to: int
    """frames ``[final_from, final_to)`` become final; later frames are tentative"""
    provisional: bool = False
    """an early window or a refresh: no frame becomes final, its output only forms a partial"""
    optional: bool = False
    """a refresh between full windows: it only makes the partial fresher, so a caller short of model time may
    answer it with :meth:`StreamSession.skip` instead of running it"""
    quiet_from: int | None = None
    """an endpoint window (None: not one): the voice-activity detector heard silence from frame ``quiet_from``
    to the window's end; if the model's frames there are blank or the delimiter, every frame of the window
    becomes final and the segment ends with it, otherwise the window only forms a partial"""
    closing: bool = False
    """a final waits for this window: the rest of the audio at a flush or the end, or an endpoint window (a
    caller with other windows waiting may run it first)"""
    handed: bool = field(default=False, repr=False)
    frame_samples: int = field(default=FRAME_SAMPLES, repr=False)
    receptive_field: int = field(default=RECEPTIVE_FIELD, repr=False)
    """the model's grid (the schedule's), which says how many frames the window yields"""

    @property
    def n_frames(self) -> int:
        return n_frames(len(self.samples), self.frame_samples, self.receptive_field)

    @property
    def end_sample(self) -> int:
        """the stream's sample (16 kHz) where the window's audio ends"""
        return self.start_frame * self.frame_samples + len(self.samples)


@dataclass(frozen=True)
class _Marker:
    reason: str  # "flush" or "end"


class _Buffer:
    """Append-only sample buffer that forgets what lies before a moving floor.

    A window's samples are a view of it (:meth:`slice`), not a copy: a 3 s window copied 192 KB, two to three
    times a second per stream. Samples are never written over once appended: growing and forgetting both move
    what is kept to a new array, so a window's view keeps the samples it was cut from.
    """

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE * 8, dtype=np.float32)
        self._len = 0  # valid samples in _data
        self.offset = 0  # global index of _data[0]

    @property
    def end(self) -> int:
        return self.offset + self._len

    def append(self, x: np.ndarray) -> None:
        if self._len + len(x) > len(self._data):
            size = max(len(self._data), 2 * (self._len + len(x)))
            data = np.empty(size, dtype=np.float32)
            data[: self._len] = self._data[: self._len]
            self._data = data
        self._data[self._len : self._len + len(x)] = x
        self._len += len(x)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` of the stream: a view that stays as it is (not to be written to)."""
        return self._data[start - self.offset : stop - self.offset]

    def forget_before(self, index: int) -> None:
        drop = index - self.offset
        if drop <= 0 or drop < len(self._data) // 2:
            return  # compact only when it frees at least half the buffer
        keep = self._len - drop
        data = np.empty(len(self._data), dtype=np.float32)  # (windows may hold views of the old array)
        data[:keep] = self._data[drop : self._len]
        self._data = data
        self._len = keep
        self.offset = index


def best_path(log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the most likely id and its probability (greedy CTC)."""
    ids = log_probs.argmax(axis=1)
    return ids, np.exp(log_probs[np.arange(len(ids)), ids]).astype(np.float32)


def as_float32(samples: np.ndarray) -> np.ndarray:
    """Convert a mono chunk of int16 or float samples to float32 in [-1, 1], checking it."""
    a = np.asarray(samples)
    if a.ndim != 1:
        raise AudioError(f"expected mono samples (a 1-D array), got shape {a.shape}; downmix first")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if a.dtype.kind != "f":
        raise AudioError(f"unsupported sample type {a.dtype}; use int16 or float32")
    a = a.astype(np.float32, copy=False)
    if a.size and not np.isfinite(a).all():
        raise AudioError("audio contains NaN or infinite samples; send finite float samples in [-1, 1]")
    return a


class StreamSession:
    """The streaming state of one audio stream (16 kHz mono)."""

    def __init__(
        self,
        schedule: Schedule,
        vocab: Vocabulary,
        endpoint: EndpointRules | None = None,
        *,
        record_frames: bool = False,
        words: WordDecoder | None = None,
        voice_events: bool = False,
        partials: bool = True,
    ) -> None:
        self.schedule = schedule
        self.vocab = vocab
        self.words = words
        """word-list decoding of partials and finals; None = greedy CTC (the letters of each frame's best id)"""
        self.partials = partials
        """whether the session shows partials. False: it plans no provisional window and no refresh, and reads no
        partial (with a word list, no search over the look-ahead): for a stream whose partials nobody is shown (a
        file, a phone call, a voice agent that takes finals only), that was most of the word search's work and the
        model's provisional windows. The finals are the same either way (only full and endpoint windows make
        them); it may change between calls, and takes effect with the next window planned or answered."""
        self._search: WordSearch | None = None  # the open segment's, once it has final frames
        self.endpointer = Endpointer(endpoint, schedule.frame_s)
        # Segments and word searches count time in 20 ms frames; a model with other frames scales their times.
        self._time_scale = schedule.frame_s / FRAME_S
        self._buf = _Buffer()
        self._planned_next = 0  # first frame not yet covered by a planned window
        # Provisional windows: the frame the early phase started at (None once a full window was planned,
        # or with early partials off) and how many provisional windows it has planned so far.
        self._early_from: int | None = 0 if schedule.early > 0 else None
        self._early_planned = 0
        self._full_end = 0  # end frame of the last full window planned
        self._refreshed_to = 0  # end frame of the last refresh window planned
        self._pending: deque[Window | _Marker] = deque()
        self._events: list[Event] = []
        self._segment_index = 0
        self._seg = CtcSegment(vocab)
        self._last_partial = ""
        self._finishing = False
        self.finished = False
        """true once :meth:`finish` was called and every planned window was answered"""
        self.frame_ids: list[int] | None = [] if record_frames else None
        # Voice activity (with endpoint.vad): the rule's state, probabilities received and not yet read
        # (they are read in the order of the audio, between the full windows they fall between), and the
        # sample a flush closed the stream at (speech before it ends nothing more).
        self._vad = VadTracker(self.endpointer.rules) if self.endpointer.rules.vad else None
        self._speech: deque[float] = deque()
        self._vad_floor = 0
        self._voice: list[VoiceEvent] = []
        self._speech_events = voice_events and self._vad is not None
        self._word_end: float | None = None  # the last final's last word, until its utterance end is reported

    # -- input -------------------------------------------------------------

    def accept_audio(self, samples: np.ndarray) -> None:
        """Add 16 kHz mono samples. Then call :meth:`windows_to_run`."""
        if self._finishing:
            raise AudioError("audio after the end of the stream")
        self._buf.append(as_float32(samples))
        self._plan_ready()

    def accept_speech(self, probs: np.ndarray | Sequence[float]) -> None:
        """Add the voice-activity detector's speech probabilities, one per ``vad_frame_samples`` of the stream.

        Only with ``EndpointRules.vad`` (the rule is off otherwise); the probabilities continue those given
        before (:class:`streamer.vad.SpeechDetector` yields them as the audio comes). With the rule on, full
        windows wait for the probabilities of the audio before them, so feed both, in either order, before
        calling :meth:`windows_to_run`.
        """
        if self._vad is None:
            raise ValueError("speech probabilities need the voice-activity rule (endpoint vad = true)")
        self._speech.extend(float(p) for p in np.asarray(probs, dtype=np.float32).reshape(-1).tolist())
        if not self._finishing:
            self._plan_ready()

    @property
    def vad(self) -> bool:
        """Whether the session ends segments by voice activity: feed it :meth:`accept_speech`."""
        return self._vad is not None

    def use_endpoint(self, rules: EndpointRules, *, voice_events: bool = False) -> None:
        """Take a stream's own endpoint rules (a client's) instead of those the session was made with.

        Only before the first audio. ``voice_events`` as for the constructor. Then check :attr:`vad`: the caller
        feeds speech probabilities when the rules ask for the detector.
        """
        if self._buf.end or self._pending:
            raise RuntimeError("endpoint rules change only before the first audio")
        self.endpointer = Endpointer(rules, self.schedule.frame_s)
        self._vad = VadTracker(rules) if rules.vad else None
        self._speech_events = voice_events and self._vad is not None

    def flush(self) -> None:
        """Force an endpoint now: all audio so far is decoded and closed as a final. Then run the last windows.

        With early partials, provisional windows follow again until the next full window can run.
        """
        if self._finishing:
            return
        self._plan_rest()
        self._pending.append(_Marker("flush"))
        self._drain_markers()
        if self._vad is not None:  # the speech heard so far belongs to the segment the flush closes
            self._vad.reset()
            self._vad_floor = self._buf.end
        self._full_end = 0  # no refresh until the next full window: early partials (if on) fill that gap
        if self.schedule.early > 0:
            # The next full window is hop + lookahead away again: show early partials until it runs.
            self._early_from, self._early_planned = self._planned_next, 0

    def finish(self) -> None:
        """End of stream: the rest becomes final. Then run the last windows."""
        if self._finishing:
            return
        self._finishing = True
        self._plan_rest()
        self._pending.append(_Marker("end"))
        self._drain_markers()

    # -- model side ---------------------------------------------------------

    def windows_to_run(self) -> list[Window]:
        """Windows planned since the last call, in order; answer each with :meth:`accept_result`.

        Provisional windows (:attr:`Window.provisional`) are answered like the others, in the same order.
        """
        out = [w for w in self._pending if isinstance(w, Window) and not w.handed]
        for w in out:
            w.handed = True
        return out

    @property
    def pending(self) -> int:
        """Windows handed out and not answered yet."""
        return sum(1 for w in self._pending if isinstance(w, Window))

    def accept_result(self, window: Window, log_probs: np.ndarray) -> None:
        """Merge the model output of ``window`` (``[frames, vocab]``). Then read :meth:`events_received`."""
        self._pop(window)
        lp = np.asarray(log_probs)
        expected = window.n_frames
        if lp.ndim != 2 or lp.shape[0] != expected:
            raise RuntimeError(f"window of {len(window.samples)} samples needs {expected} frames, got {lp.shape}")
        ids, probs = best_path(lp)
        b = self._merge(window, lp, ids, probs, ahead=not (self._pending and isinstance(self._pending[0], _Marker)))
        if self._word_end is not None and not window.provisional:
            self._utterance_end(window, ids)
        if self._pending and isinstance(self._pending[0], _Marker):
            self._drain_markers()
        elif b is not None and self.partials:
            seg = self._seg.preview(window.start_frame + b, ids[b:], probs[b:])
            self._emit_partial(seg, lp[b:])

    def skip(self, window: Window) -> None:
        """Answer an optional window (:attr:`Window.optional`) without running it: it shows nothing.

        In the same order as :meth:`accept_result`; the partial stays as the last window left it.
        """
        if not window.optional:
            raise ValueError("only an optional window (a partial refresh) may be skipped")
        self._pop(window)
        if self._pending and isinstance(self._pending[0], _Marker):
            self._drain_markers()

    def _merge(self, window: Window, lp: np.ndarray, ids: np.ndarray, probs: np.ndarray, *,
               ahead: bool = True) -> int | None:
        """Merge a window's frames: the final ones into the open segment, then maybe an endpoint.

        Frames before the open segment's end are final already (an endpoint window closed a segment past
        them) and are left out. Returns the window's first row that forms the partial, or None when the
        window closed the segment (an endpoint window over quiet frames, or ``ahead`` and the look-ahead
        frames complete the after-speech silence).
        """
        s = window.start_frame
        lo = max(window.final_from, self._seg.end_frame) - s
        if window.quiet_from is not None:
            if self._quiet_end(ids, lo, window.quiet_from - s, probs):
                self._push_final(s + lo, ids[lo:], probs[lo:], lp[lo:])
                self._close_segment("silence")
                return None
            return lo
        b = max(lo, min(window.final_to - s, len(ids)))
        self._push_final(s + lo, ids[lo:b], probs[lo:b], lp[lo:b])
        if ahead and not window.provisional and self._silence_ahead(ids[b:]):
            # (a provisional window's frames are redone by a full window: they decide no endpoint)
            self._close_segment("silence")
            return None
        return b

    def _quiet_end(self, ids: np.ndarray, lo: int, quiet_from: int, probs: np.ndarray) -> bool:
        """Whether an endpoint window's frames end the open segment: it has text once rows ``lo:`` join it,
        and the rows from ``quiet_from`` on (the silence the detector heard) are blank or the delimiter."""
        tail = ids[max(lo, quiet_from, 0) :]
        if not self._quiet(tail).all():
            return False
        return self._seg.has_text or self._seg.preview(0, ids[lo:], probs[lo:]).has_text

    def _utterance_end(self, window: Window, ids: np.ndarray) -> None:
        """Report the utterance end once the model heard no word for ``utterance_end_s`` after the last final's
        last word: the open segment has no text, and the window's frames after it are blank or the delimiter up to
        that time. Only full and endpoint windows decide (their frames are the same whatever the arrival)."""
        assert self._word_end is not None
        seg = self._seg
        if seg.has_text:
            return
        tail = self._quiet(ids[max(0, seg.end_frame - window.start_frame) :])
        quiet_to = seg.end_frame + (int(np.argmin(tail)) if not tail.all() else len(tail))
        if quiet_to * self.schedule.frame_s - self._word_end >= self.endpointer.rules.utterance_end_s - 1e-6:
            self._voice.append(UtteranceEnd(self._word_end))
            self._word_end = None

    def _quiet(self, ids: np.ndarray) -> np.ndarray:
        quiet: np.ndarray = ids == self.vocab.blank_id
        if self.vocab.delimiter_id is not None:  # may be 0 (XLS-R fine-tunes put "|" first)
            quiet |= ids == self.vocab.delimiter_id
        return quiet

    def _pop(self, window: Window) -> None:
        head = self._pending[0] if self._pending else None
        if head is not window:
            raise RuntimeError("results must be accepted in the order the windows were handed out")
        self._pending.popleft()

    def events_received(self) -> list[Event]:
        """Return the events produced since the last call."""
        events, self._events = self._events, []
        return events

    def voice_events(self) -> list[VoiceEvent]:
        """The detector's speech started/stopped events since the last call (with ``voice_events`` and the
        voice-activity rule; else none), and the utterance ends (with ``EndpointRules.utterance_end_s``).

        Speech events come as the probabilities are read, ahead of the windows planned over the same audio, so
        call this after :meth:`accept_speech`; an utterance end comes as a window's result is accepted, after the
        final it follows (send it after :meth:`events_received`'s events).
        """
        events, self._voice = self._voice, []
        return events

    # -- internals ----------------------------------------------------------

    def _plan_ready(self) -> None:
        sched = self.schedule
        vad = self._vad
        step = self.endpointer.rules.vad_frame_samples
        while True:
            start, final_end, end = sched.plan(self._planned_next)
            # (the pipeline treats a chunk that ends exactly at the end of the audio as the last one)
            ready_at = sched.frame_samples * end + sched.tail + (1 if sched.pipeline else 0)
            # With voice activity, a full window waits until every endpoint that may come before it is known:
            # the probabilities of the audio before it were read (an endpoint at the same sample comes after).
            if ready_at <= self._buf.end and (vad is None or ready_at <= vad.end + step):
                stop = sched.frame_samples * end + sched.tail
                self._add_window(start, self._planned_next, final_end, stop)
                self._early_from = None  # the first full window: from here on partials come from full windows
                self._full_end = end
                continue
            if vad is None or not self._speech or vad.end + step > self._buf.end:
                break
            due = vad.push(self._speech.popleft())
            if vad.end <= self._vad_floor:
                vad.reset()
                continue
            if self._speech_events and (vad.started or due):
                at = vad.end - step if vad.started else vad.end - vad.need * step
                self._voice.append((SpeechStarted if vad.started else SpeechStopped)(at / SAMPLE_RATE))
            if due and self.endpointer.enabled:  # (endpointing off: the speech events only)
                self._plan_endpoint(vad.end)
        if self.partials:  # (provisional windows and refreshes only form partials)
            if self._early_from is not None:
                self._plan_provisional(self._early_from)
            elif sched.refresh > 0 and self._full_end > 0:
                self._plan_refresh()
        # Keep what the next window (or the closing one) needs as left context.
        self._buf.forget_before(sched.frame_samples * max(0, self._planned_next - sched.left))

    def _plan_provisional(self, origin: int) -> None:
        """Plan a provisional window once another ``early`` frames of audio past frame ``origin`` have arrived.

        It ends on a grid of ``early`` frames from ``origin`` (a big chunk plans only the latest point), so
        the provisional windows of streams that started together have equal lengths and batch. It ends on the
        grid point itself, not 80 samples later as a full window would: its last frame is given up so that
        100 ms chunks do not wait for a further chunk.
        """
        step = self.schedule.early
        fs = self.schedule.frame_samples
        due = (self._buf.end // fs - origin) // step
        if due <= self._early_planned or due * step < 2:  # (a window of one grid step of 20 ms has no frame)
            return
        if origin + due * step >= self.schedule.plan(origin)[2]:
            return  # the full window needs at most 80 samples more: it shows this audio with its own look-ahead
        pause = self._pause(fs * (origin + due * step))
        if pause is None:
            return  # the detector has not heard this audio yet (its probabilities come next)
        self._early_planned = due
        if pause:
            return  # nothing new to show
        start = max(0, origin - self.schedule.left)
        samples = self._buf.slice(fs * start, fs * (origin + due * step))
        # Nothing becomes final (final_from == final_to): in accept_result the final state then still ends at
        # ``origin``, since every window before this one was answered first, and all its frames form the partial.
        self._pending.append(Window(samples, start, origin, origin, provisional=True, frame_samples=fs,
                                    receptive_field=self.schedule.receptive_field))

    def _plan_refresh(self) -> None:
        """Plan a refresh window once another ``refresh`` frames of audio past the last full window arrived.

        Its frames after the final ones form the partial, as a provisional window's do; it ends on a grid of
        ``refresh`` frames from the last full window's end (a big chunk plans only the latest point), so the
        refreshes of streams in step batch, and none is planned where the next full window is due anyway.
        """
        sched = self.schedule
        fs = sched.frame_samples
        due = (self._buf.end // fs - self._full_end) // sched.refresh
        end = self._full_end + due * sched.refresh
        if due < 1 or end <= self._refreshed_to or end >= sched.plan(self._planned_next)[2]:
            return
        self._refreshed_to = end
        origin = self._planned_next
        left = sched.left if sched.refresh_left is None else sched.refresh_left
        start = max(0, origin - left)
        if sched.n_frames(fs * (end - start)) < 1:  # (no left context, no look-ahead: too short for a frame)
            return
        self._pending.append(Window(self._buf.slice(fs * start, fs * end), start, origin, origin, provisional=True,
                                    optional=True, frame_samples=fs, receptive_field=sched.receptive_field))

    def _pause(self, stop: int) -> bool | None:
        """Whether the voice-activity detector hears a pause at sample ``stop``: ``PAUSE_S`` of non-speech up to
        there (False without the detector); None: it has not heard that far yet.

        Provisional windows are not planned in a pause: they would show the partial already shown (nothing, in the
        pause after a flush or before the first words), and they are not optional, so they cost model time that
        other streams' windows, finals among them, wait for (each up to 2.8 s of audio: 0.06 s of this CPU, up to
        three after each flush).
        """
        vad = self._vad
        if vad is None:
            return False
        step = self.endpointer.rules.vad_frame_samples
        if vad.end + step <= stop:
            return None
        return vad.quiet * step >= PAUSE_S * SAMPLE_RATE

    def _plan_endpoint(self, stop: int) -> None:
        """Plan an endpoint window over the audio up to sample ``stop``, where the voice-activity rule holds.

        It has the left context of a full window before the first frame not yet planned final, and no
        look-ahead: the detector already heard the silence its last frames cover.
        """
        sched = self.schedule
        fs = sched.frame_samples
        origin = self._planned_next
        start = max(0, origin - sched.left)
        if start + sched.n_frames(stop - fs * start) <= origin:
            return  # the full windows planned cover this audio as final already
        rules = self.endpointer.rules
        quiet_from = -(-(stop - rules.vad_silence_frames * rules.vad_frame_samples) // fs)  # (rounded up)
        self._pending.append(Window(self._buf.slice(fs * start, stop), start, origin, origin, quiet_from=quiet_from,
                                    closing=True, frame_samples=fs, receptive_field=sched.receptive_field))

    def _plan_rest(self) -> None:
        total = self.schedule.n_frames(self._buf.end)
        if total > self._planned_next:
            start = max(0, self._planned_next - self.schedule.left)
            self._add_window(start, self._planned_next, total, self._buf.end, closing=True)

    def _add_window(self, start: int, final_from: int, final_to: int, stop: int, *, closing: bool = False) -> None:
        sched = self.schedule
        samples = self._buf.slice(sched.frame_samples * start, stop)
        self._pending.append(Window(samples, start, final_from, final_to, closing=closing,
                                    frame_samples=sched.frame_samples, receptive_field=sched.receptive_field))
        self._planned_next = final_to

    def _drain_markers(self) -> None:
        while self._pending and isinstance(self._pending[0], _Marker):
            marker = self._pending.popleft()
            assert isinstance(marker, _Marker)
            self._close_segment(marker.reason)
            if marker.reason == "end":
                self.finished = True

    def _push_final(self, t0: int, ids: np.ndarray, probs: np.ndarray, rows: np.ndarray) -> None:
        if self.frame_ids is not None:
            self.frame_ids.extend(ids.tolist())
        endpointer = self.endpointer
        seg = self._seg
        stepped = 0  # rows handed to the word search
        for i, (frame_id, prob) in enumerate(zip(ids.tolist(), probs.tolist(), strict=True)):
            seg.push_frame(t0 + i, frame_id, prob)
            reason = endpointer.reason(seg.has_text, seg.trailing_silence, seg.n_frames)
            if reason:
                self._step_search(rows[stepped : i + 1])
                stepped = i + 1
                self._close_segment(reason)
                seg = self._seg
        self._step_search(rows[stepped:])

    def _step_search(self, rows: np.ndarray) -> None:
        if self.words is None or not len(rows):
            return
        if self._search is None:
            self._search = self.words.search(self._seg.start_frame)
        self._search.step(rows)

    def _silence_ahead(self, lookahead_ids: np.ndarray) -> bool:
        """Whether the after-speech rule holds counting the look-ahead frames too.

        The final frames end ``lookahead`` frames before the audio received; when those frames are blank
        as well and the silence so far reaches the rule, the segment is closed now instead of one
        look-ahead later (its text is what the final frames say; the look-ahead frames start the next
        segment). Finals then come ``silence_after_speech_s`` after the speech, not that plus the
        look-ahead.
        """
        seg = self._seg
        if not self.endpointer.enabled or not seg.has_text or not len(lookahead_ids):
            return False
        quiet = self._quiet(lookahead_ids)
        lead = int(np.argmin(quiet)) if not quiet.all() else len(quiet)
        return self.endpointer.silence_ahead(seg.has_text, seg.trailing_silence, lead)

    def _decode(self, seg: CtcSegment, lookahead: np.ndarray | None = None) -> tuple[str, list[Word]]:
        """The text and words of ``seg`` (final frames, then ``lookahead`` rows if given)."""
        if not seg.has_text:
            return "", []
        if self.words is None:
            return seg.text(), self._scaled(seg.words())
        search = self._search
        if lookahead is None:
            words = search.finish() if search is not None else []
        else:
            words = (search or self.words.search(seg.start_frame)).partial(lookahead)
        return join_words(w.word for w in words), self._scaled(words)  # (no space beside a Han character)

    def _scaled(self, words: list[Word]) -> list[Word]:
        """Word times in seconds of this model's frames (segments and searches count 20 ms frames)."""
        k = self._time_scale
        if k == 1.0:
            return words
        return [replace(w, start=w.start * k, end=w.end * k) for w in words]

    def _span(self, seg: CtcSegment, words: list[Word]) -> tuple[float, float]:
        if words:
            return words[0].start, words[-1].end
        return seg.start_frame * self.schedule.frame_s, seg.end_frame * self.schedule.frame_s

    def _close_segment(self, reason: str) -> None:
        seg = self._seg
        search = self._search
        text, words = self._decode(seg)
        self._search = None
        if text:
            start, end = self._span(seg, words)
            alternatives = tuple(getattr(search, "alternatives", ()))  # n-best, when the search reads them
            self._events.append(Final(self._segment_index, text, start, end, tuple(words), reason, alternatives))
            self._segment_index += 1
            if self.endpointer.rules.utterance_end_s > 0:
                self._word_end = end
        elif self._last_partial:
            # The open segment showed text that turned out to be nothing: clear it.
            self._events.append(Partial(self._segment_index, "", *self._span(seg, [])))
        self._seg = CtcSegment(self.vocab, start_frame=seg.end_frame)
        self._last_partial = ""

    def _emit_partial(self, seg: CtcSegment, lookahead: np.ndarray) -> None:
        if self.words is not None:
            text, words = self._decode(seg, lookahead)
            if text == self._last_partial:
                return
        else:
            text = seg.text()
            if text == self._last_partial:
                return
            words = self._scaled(seg.words())
        self._last_partial = text
        start, end = self._span(seg, words)
        self._events.append(Partial(self._segment_index, text, start, end, tuple(words)))


def run_session(session: StreamSession, run: RunFn, *, refresh: bool = False) -> None:
    """Run every window the session has handed out, synchronously, in one batched call.

    Partial refreshes (optional windows) are skipped unless ``refresh``: a file transcribed offline
    has nobody waiting for fresher partials.
    """
    windows = session.windows_to_run()
    todo = [w for w in windows if refresh or not w.optional]
    outputs = iter(run([w.samples for w in todo]) if todo else [])
    for w in windows:
        if refresh or not w.optional:
            session.accept_result(w, next(outputs))
        else:
            session.skip(w)


def reference(
    audio: np.ndarray,
    run: RunFn,
    schedule: Schedule,
    vocab: Vocabulary,
    endpoint: EndpointRules | None = None,
    words: WordDecoder | None = None,
    speech: np.ndarray | Sequence[float] | None = None,
) -> tuple[list[int], list[Final]]:
    """Run the window schedule over a complete buffer in one model call.

    Returns the final frame ids and the finals. For any arrival chunking, a
    :class:`StreamSession` must produce exactly these. ``speech``: the voice-activity probabilities of
    the whole buffer, with ``endpoint.vad`` (an endpoint window goes where the rule holds, before the
    full window that becomes ready at a later sample).
    """
    x = as_float32(audio)
    total = schedule.n_frames(len(x))
    fs = schedule.frame_samples
    rules = endpoint or EndpointRules()
    points = vad_points(speech, rules) if rules.vad and rules.enabled and speech is not None else []
    quiet_len = rules.vad_silence_frames * rules.vad_frame_samples
    spans: list[Window] = []  # (samples left empty: the model runs the slices below)

    def endpoints_before(ready_at: int, f: int) -> None:
        while points and points[0] < ready_at:
            stop = points.pop(0)
            start = max(0, f - schedule.left)
            if start + schedule.n_frames(stop - fs * start) > f:
                spans.append(Window(x[fs * start : stop], start, f, f, quiet_from=-(-(stop - quiet_len) // fs)))

    f = 0
    while f < total:
        start, final_end, end = schedule.plan(f)
        if schedule.ready(end, len(x)):
            endpoints_before(fs * end + schedule.tail + (1 if schedule.pipeline else 0), f)
            spans.append(Window(x[fs * start : fs * end + schedule.tail], start, f, final_end))
            f = final_end
        else:
            endpoints_before(len(x) + 1, f)
            spans.append(Window(x[fs * start :], start, f, total))
            f = total
    outputs = run([w.samples for w in spans]) if spans else []
    session = StreamSession(schedule, vocab, endpoint, record_frames=True, words=words)
    for w, lp in zip(spans, outputs, strict=True):
        lp = np.asarray(lp)
        session._merge(w, lp, *best_path(lp))
    session._close_segment("end")
    finals = [e for e in session.events_received() if isinstance(e, Final)]
    assert session.frame_ids is not None
    return session.frame_ids, finals
