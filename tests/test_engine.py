"""The streaming engine against its reference, the transformers pipeline and one plain model call."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from streamer.config import ModelConfig, StreamConfig
from streamer.endpoint import EndpointRules
from streamer.engine import Schedule, StreamSession, n_frames, reference, run_session
from streamer.events import Final, Partial, SpeechStopped
from streamer.model import load_model

SCHEDULES = {
    "stream": Schedule(left=40, hop=10, lookahead=16),
    "pipeline": Schedule(left=40, hop=10, lookahead=16, pipeline=True),
}


@pytest.fixture(scope="module", params=["layer-padfirst", "layer-padlast", "group-padfirst", "group-padlast"])
def runner(request, tiny_models):
    return load_model(ModelConfig(id=str(tiny_models[request.param]), device="cpu"))


def stream(audio, runner, schedule, chunks, endpoint=None, vocab=None, words=None, seen=None, skip=None,
           speech=None):
    """Feed ``audio`` in ``chunks``; return (final frame ids, events). ``seen`` collects the windows planned;
    ``skip(window)`` says whether to skip an optional one (a partial refresh) instead of running it; ``speech``:
    the voice-activity probabilities of the whole audio, fed as the audio completes each 512-sample frame."""
    session = StreamSession(schedule, vocab or runner.vocab, endpoint, record_frames=True, words=words)
    events = []

    def run():
        windows = session.windows_to_run()
        if seen is not None:
            seen.extend(windows)
        todo = [w for w in windows if not (w.optional and skip is not None and skip(w))]
        outputs = dict(zip(map(id, todo), runner([w.samples for w in todo]) if todo else [], strict=True))
        for w in windows:
            if id(w) in outputs:
                session.accept_result(w, outputs[id(w)])
            else:
                session.skip(w)
        events.extend(session.events_received())

    i = 0
    for n in chunks:
        if i >= len(audio):
            break
        session.accept_audio(audio[i : i + n])
        if speech is not None:
            session.accept_speech(speech[min(i, len(audio)) // 512 : min(i + n, len(audio)) // 512])
        i += n
        run()
    session.finish()
    run()
    assert session.finished
    return session.frame_ids, events


def arrival(kind, n):
    if kind == "random":
        rng = np.random.default_rng(42)
        return iter(lambda: int(rng.integers(1, 8001)), None)
    return iter(lambda: kind, None)


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("chunk", [1, 7, 320, 1000, "random"])
def test_arrival_invariance(runner, speech, schedule, chunk):
    audio = speech[: 16000 * 4 + 77]
    ref_ids, ref_finals = reference(audio, runner, schedule, runner.vocab)
    ids, events = stream(audio, runner, schedule, arrival(chunk, len(audio)))
    assert len(ref_ids) == n_frames(len(audio))
    assert ids == ref_ids
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.text for f in finals] == [f.text for f in ref_finals]
    assert [(f.segment, f.start, f.end, f.reason) for f in finals] == [
        (f.segment, f.start, f.end, f.reason) for f in ref_finals
    ]
    words = [(w.word, w.start, w.end) for f in finals for w in f.words]
    assert words == [(w.word, w.start, w.end) for f in ref_finals for w in f.words]
    # probabilities differ only by float rounding of different batch shapes
    confs = [w.conf for f in finals for w in f.words]
    assert confs == pytest.approx([w.conf for f in ref_finals for w in f.words], abs=1e-4)


def test_logits_match_reference_windows(runner, speech):
    """Windows cut by the engine hold exactly the samples the reference gives the model."""
    audio = speech[: 16000 * 3]
    schedule = SCHEDULES["stream"]
    seen = []

    def spy(windows):
        seen.extend(w.copy() for w in windows)
        return runner(windows)

    reference(audio, spy, schedule, runner.vocab)
    ref_windows, seen = seen, []
    stream(audio, spy, schedule, arrival(1000, len(audio)), vocab=runner.vocab)
    assert len(seen) == len(ref_windows)
    for a, b in zip(seen, ref_windows, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(runner([a])[0], runner([b])[0], rtol=0, atol=1e-6)
    steady = {len(w) for w in seen[5:-1]}
    assert steady == {schedule.window_samples}  # steady windows stack without padding


def test_pipeline_parity(runner, speech):
    from transformers import pipeline

    schedule = SCHEDULES["pipeline"]
    audio = speech[: 16000 * 5 + 1234]
    pipe = pipeline("automatic-speech-recognition", model=runner.model, tokenizer=runner.tokenizer,
                    feature_extractor=runner.feature_extractor, device="cpu")
    n = schedule.left + schedule.hop + schedule.lookahead
    expected = pipe(audio.copy(), chunk_length_s=n * 0.02,
                    stride_length_s=(schedule.left * 0.02, schedule.lookahead * 0.02))["text"]
    _, events = stream(audio, runner, schedule, arrival(1600, len(audio)), EndpointRules(enabled=False))
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 1
    assert finals[0].text == expected


@pytest.mark.parametrize("seconds", [0.03, 0.3, 0.52])
def test_short_input_equals_one_model_call(runner, speech, seconds):
    audio = speech[16000 : 16000 + int(16000 * seconds)]
    schedule = SCHEDULES["stream"]
    assert len(audio) < FRAME_WINDOW(schedule)
    ids, _ = stream(audio, runner, schedule, arrival(320, len(audio)))
    feats = runner.feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        plain = runner.model(feats["input_values"]).logits[0].argmax(-1).tolist()
    assert ids == plain
    assert len(ids) == n_frames(len(audio))


def FRAME_WINDOW(schedule):
    return 320 * (schedule.hop + schedule.lookahead) + 80


# --- endpointing, flush, word times: a scripted "model" whose frame ids are written in the audio ---


class ScriptVocab:
    """ids: 0 blank, 1 '|', 2.. letters a, b, c, ..."""

    blank_id = 0
    delimiter_id = 1

    def decode(self, ids):
        return "".join(" " if i == 1 else chr(ord("a") + i - 2) for i in ids).strip()


def script_audio(frame_ids):
    """Audio whose sample at 320 t + 200 encodes the id of frame t."""
    audio = np.zeros(320 * len(frame_ids) + 80, dtype=np.float32)
    for t, i in enumerate(frame_ids):
        audio[320 * t + 200] = i / 100
    return audio


def script_model(windows):
    out = []
    for w in windows:
        ids = [round(float(w[320 * t + 200]) * 100) for t in range(n_frames(len(w)))]
        lp = np.full((len(ids), 8), -20.0, dtype=np.float32)
        lp[np.arange(len(ids)), ids] = np.log(0.9)
        out.append(lp)
    return out


def frames(text_spec):
    """'ab_|c' -> ids; '_' blank; letters; '|' delimiter."""
    table = {"_": 0, "|": 1}
    return [table[c] if c in table else ord(c) - ord("a") + 2 for c in text_spec]


ENDPOINT = EndpointRules(silence_no_speech_s=1.0, silence_after_speech_s=0.4, max_utterance_s=3.0)
SCHED = Schedule(left=20, hop=5, lookahead=8)


def run_script(spec, chunks=160, flush_at=None):
    ids = frames(spec)
    audio = script_audio(ids)
    session = StreamSession(SCHED, ScriptVocab(), ENDPOINT)
    events = []
    for i in range(0, len(audio), chunks):
        session.accept_audio(audio[i : i + chunks])
        if flush_at is not None and i <= 320 * flush_at < i + chunks:
            session.flush()
        run_session(session, script_model)
        events += session.events_received()
    session.finish()
    run_session(session, script_model)
    return events + session.events_received(), len(audio) / 16000


def test_endpoint_after_trailing_silence():
    # "ab c" then 20 blank frames (0.4 s) -> final; then "d" -> final at end of stream
    events, duration = run_script("__aab|_c" + "_" * 25 + "dd__")
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.text for f in finals] == ["ab c", "d"]
    assert [f.reason for f in finals] == ["silence", "end"]
    assert [f.segment for f in finals] == [0, 1]
    assert [w.word for w in finals[0].words] == ["ab", "c"]
    assert finals[0].words[0].start == pytest.approx(0.04)
    assert finals[0].words[1].end == pytest.approx(0.16)
    assert finals[1].words[0].start == pytest.approx((8 + 25) * 0.02)
    times = [t for f in finals for w in f.words for t in (w.start, w.end)]
    assert times == sorted(times)
    assert 0 <= times[0] and times[-1] <= duration
    partials = [e for e in events if isinstance(e, Partial) and not isinstance(e, Final)]
    assert partials and all(p.segment in (0, 1) for p in partials)


def test_short_silence_does_not_end_segment():
    events, _ = run_script("ab" + "_" * 15 + "cd")
    assert [f.text for f in events if isinstance(f, Final)] == ["abcd"]


def test_max_utterance_cuts_long_speech():
    events, _ = run_script("ab" * 100)  # 4 s of letters without silence, max 3 s
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.reason for f in finals] == ["max_length", "end"]
    assert finals[0].end == pytest.approx(3.0)


def test_silence_without_speech_gives_no_final():
    events, _ = run_script("_" * 150)
    assert events == []


def test_flush_closes_segment_at_once():
    events, _ = run_script("abab" + "_" * 5 + "cc" + "_" * 3, flush_at=6)
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.text for f in finals] == ["abab", "c"]
    assert [f.reason for f in finals] == ["flush", "end"]


def test_letter_repeated_across_window_seam_counts_once():
    # 'a' spans frames 3..7; the hop is 5 frames, so a seam falls inside it
    events, _ = run_script("___aaaaa_a_")
    assert [e.text for e in events if isinstance(e, Final)] == ["aa"]


def test_windows_keep_their_audio_as_views_while_the_stream_goes_on():
    """A window's samples are a view of the stream's buffer, not a copy (a 3 s window was 192 KB copied two to three
    times a second); the buffer grows and forgets old audio many times over while windows wait for the model, and
    every window still holds exactly its stretch of the stream."""
    audio = np.random.default_rng(0).uniform(-1, 1, 16000 * 40).astype(np.float32)
    session = StreamSession(SCHED, ScriptVocab(), ENDPOINT)
    held = []
    for i in range(0, len(audio), 1600):
        session.accept_audio(audio[i : i + 1600])
        held += session.windows_to_run()  # (none answered yet: the model is slow)
    assert len(held) > 100 and held[-1].end_sample > 16000 * 39
    for w in held:
        assert not w.samples.flags.owndata
        start = w.start_frame * 320
        assert np.array_equal(w.samples, audio[start : start + len(w.samples)]), w.start_frame


def test_nan_audio_is_refused():
    from streamer.exceptions import AudioError

    session = StreamSession(SCHED, ScriptVocab())
    with pytest.raises(AudioError, match="NaN"):
        session.accept_audio(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(AudioError, match="mono"):
        session.accept_audio(np.zeros((10, 2), dtype=np.float32))


class DelimiterFirstVocab(ScriptVocab):
    """'|' at id 0 and the blank at id 1, as many XLS-R fine-tunes have them."""

    blank_id = 1
    delimiter_id = 0

    def decode(self, ids):
        return "".join(" " if i == 0 else chr(ord("a") + i - 2) for i in ids).strip()


def first_final_at(vocab, spec):
    """Seconds of audio received when the first final arrives (audio fed in 160-sample chunks)."""
    audio = script_audio(frames(spec))
    session = StreamSession(SCHED, vocab, ENDPOINT)
    for i in range(0, len(audio), 160):
        session.accept_audio(audio[i : i + 160])
        run_session(session, script_model)
        if any(isinstance(e, Final) for e in session.events_received()):
            return (i + 160) / 16000
    return None


def test_lookahead_silence_counts_delimiters_whatever_their_id():
    # "ab" then 30 frames that are blanks for ScriptVocab and word delimiters for DelimiterFirstVocab: both
    # are silence to the endpoint rule, in the final frames and in the look-ahead alike.
    spec = "ab" + "_" * 30 + "cd"
    blank = first_final_at(ScriptVocab(), spec)
    delimiter = first_final_at(DelimiterFirstVocab(), spec)
    assert blank is not None and delimiter == blank
    # the look-ahead rule: the final comes before the final frames alone could hold 0.4 s of silence
    assert blank < (2 + 20 + SCHED.lookahead) * 0.02


# --- early partials: provisional windows before the first full window ---------------------------------------

EARLY = {name: dataclasses.replace(s, early=5) for name, s in SCHEDULES.items()}


def streams_like_the_reference(runner, audio, schedule, chunk, skip=None, endpoint=None, speech=None):
    """Stream ``audio`` (``chunk`` arrivals, ``skip`` as for :func:`stream`) and check it against ``reference()``:
    the full windows are byte-identical to its windows, and the frame ids, finals and word times are its own.
    Returns every window planned."""
    ref_windows = []

    def spy(windows):
        ref_windows.extend(windows)
        return runner(windows)

    ref_ids, ref_finals = reference(audio, spy, schedule, runner.vocab, endpoint, speech=speech)
    seen = []
    ids, events = stream(audio, runner, schedule, arrival(chunk, len(audio)), endpoint, seen=seen, skip=skip,
                         speech=speech)
    full = [w.samples for w in seen if not w.provisional]
    assert len(full) == len(ref_windows) and all(np.array_equal(a, b) for a, b in zip(full, ref_windows, strict=True))
    assert ids == ref_ids
    finals = [e for e in events if isinstance(e, Final)]
    assert [(f.segment, f.text, f.start, f.end, f.reason) for f in finals] == [
        (f.segment, f.text, f.start, f.end, f.reason) for f in ref_finals
    ]
    assert [(w.word, w.start, w.end) for f in finals for w in f.words] == [
        (w.word, w.start, w.end) for f in ref_finals for w in f.words
    ]
    return seen


@pytest.mark.parametrize("runner", ["layer-padlast", "group-padfirst"], indirect=True)
@pytest.mark.parametrize("schedule", EARLY.values(), ids=EARLY.keys())
@pytest.mark.parametrize("chunk", [1, 7, 320, 1000, "random"])
def test_early_partials_leave_finals_arrival_invariant(runner, speech, schedule, chunk):
    """Provisional windows run and show partials, yet frame ids, finals and their times are the reference's."""
    seen = streams_like_the_reference(runner, speech[: 16000 * 4 + 77], schedule, chunk)
    provisional = [w for w in seen if w.provisional]
    assert provisional and all(w.final_from == w.final_to for w in provisional)


def first_text_at(runner, audio, schedule, words=None, chunk=1600):
    """Samples received when the first event with text came, or None if only finish() brought one."""
    session = StreamSession(schedule, runner.vocab, EndpointRules(), words=words)
    for i in range(0, len(audio), chunk):
        session.accept_audio(audio[i : i + chunk])
        run_session(session, runner)
        if any(e.text for e in session.events_received()):
            return min(len(audio), i + chunk)
    return None


@pytest.mark.parametrize("decoder", ["greedy", "words"])
def test_first_words_show_before_the_first_full_window(model_runner, demo_words, speech, decoder):
    """'turn on the kitchen lights': 'turn' ends after ~0.3 s; a partial shows it long before 1.4 s of audio."""
    words = demo_words if decoder == "words" else None
    on = StreamConfig().schedule()
    off = StreamConfig(early_partials=False).schedule()
    assert on.early > 0 and off.early == 0 and dataclasses.replace(on, early=0) == off
    audio = speech[: 16000 * 3]
    _, ref_finals = reference(audio, model_runner, on, model_runner.vocab, words=words)
    assert ref_finals[0].words[0].word == "turn" and ref_finals[0].words[0].end < 0.5  # the first word ends early
    full_window = 320 * (on.hop + on.lookahead) + 80
    late = first_text_at(model_runner, audio, off, words)
    assert late is not None and late >= full_window  # what the early partials improve on
    early = first_text_at(model_runner, audio, on, words)
    assert early is not None and early <= 16000 * 0.5 < full_window


def test_stream_shorter_than_a_window_shows_a_partial_before_its_end(model_runner, speech):
    audio = speech[: 16000 * 12 // 10]  # 1.2 s of "turn on the kitchen lights": no full window fits
    on = StreamConfig().schedule()
    assert len(audio) < 320 * (on.hop + on.lookahead) + 80
    assert first_text_at(model_runner, audio, StreamConfig(early_partials=False).schedule()) is None
    assert first_text_at(model_runner, audio, on) is not None


def test_word_list_finals_untouched_by_provisional_windows(model_runner, demo_words, speech):
    """Provisional windows never step the word search: finals equal the reference's, partials are words."""
    schedule = StreamConfig().schedule()
    audio = speech[: 16000 * 5]
    _, ref_finals = reference(audio, model_runner, schedule, model_runner.vocab, words=demo_words)
    seen = []
    _, events = stream(audio, model_runner, schedule, arrival(1000, len(audio)), EndpointRules(),
                       words=demo_words, seen=seen)
    assert [w.provisional for w in seen[:2]] == [True, True]
    assert [(f.text, f.start, f.end, f.reason) for f in events if isinstance(f, Final)] == [
        (f.text, f.start, f.end, f.reason) for f in ref_finals
    ]
    early = [e for e in events if isinstance(e, Partial) and e.text][0]
    assert early.end <= 1.4 and all(w.word in set(demo_words.words) for w in early.words)


# Event timelines of the engine before early partials existed (scripted model, SCHED, 160-sample chunks), taken
# from the commit that added them: (samples received or -1 after finish, type, segment, text, start, end).
SPEC = "_ab|c__d|ef" + "_" * 24 + "cd__|a" + "_" * 6 + "fe|bb" + "_" * 10
TODAY = [
    (4320, "partial", 0, "ab cd ef", 0.02, 0.22), (10720, "final", 0, "ab cd ef", 0.02, 0.22),
    (12320, "partial", 1, "cd", 0.7, 0.74), (13920, "partial", 1, "cd a", 0.7, 0.82),
    (15520, "partial", 1, "cd af", 0.7, 0.96), (17120, "partial", 1, "cd afe b", 0.7, 1.04),
    (-1, "final", 1, "cd afe b", 0.7, 1.04),
]
TODAY_FLUSH_AT_40 = [
    (4320, "partial", 0, "ab cd ef", 0.02, 0.22), (10720, "final", 0, "ab cd ef", 0.02, 0.22),
    (12320, "partial", 1, "cd", 0.7, 0.74), (12960, "final", 1, "cd", 0.7, 0.74),
    (17120, "partial", 2, "afe b", 0.8, 1.04), (-1, "final", 2, "afe b", 0.8, 1.04),
]


def timeline(schedule, spec=SPEC, chunk=160, flush_at=None, seen=None, skip=False):
    """(samples received, type, segment, text, start, end) of every event; partial refreshes run unless ``skip``.
    ``seen`` collects (samples received, window) of every window planned."""
    audio = script_audio(frames(spec))
    session = StreamSession(schedule, ScriptVocab(), ENDPOINT)
    out = []

    def run(received):
        windows = session.windows_to_run()
        if seen is not None:
            seen.extend((received, w) for w in windows)
        for w in windows:
            if w.optional and skip:
                session.skip(w)
            else:
                session.accept_result(w, script_model([w.samples])[0])
        out.extend((received, e.type, e.segment, e.text, round(e.start, 2), round(e.end, 2))
                   for e in session.events_received())

    for i in range(0, len(audio), chunk):
        session.accept_audio(audio[i : i + chunk])
        if flush_at is not None and i <= 320 * flush_at < i + chunk:
            session.flush()
        run(i + chunk)
    session.finish()
    run(-1)
    return out


def test_early_partials_off_is_todays_event_sequence():
    off = dataclasses.replace(SCHED, early=StreamConfig(early_partials=False).schedule().early)
    assert timeline(off) == TODAY
    assert timeline(off, flush_at=40) == TODAY_FLUSH_AT_40
    # The comparison sees a difference where there is one: with early partials on, segment 0 shows sooner
    # (and again after the flush), while the finals stay where they were.
    on = dataclasses.replace(SCHED, early=2)
    for got, today in [(timeline(on), TODAY), (timeline(on, flush_at=40), TODAY_FLUSH_AT_40)]:
        assert got != today
        assert [e for e in got if e[1] == "final"] == [e for e in today if e[1] == "final"]
    assert timeline(on)[0][:2] == (1280, "partial") and timeline(on)[0][0] < TODAY[0][0]
    after_flush = [e for e in timeline(on, flush_at=40) if e[2] == 2]
    assert after_flush[0][1] == "partial" and after_flush[0][0] < 17120


def test_provisional_result_after_a_full_window_was_planned():
    """A provisional window answered after the first full window was planned: in order, and only a partial."""
    audio = script_audio(frames("_ab|c" + "_" * 40))
    schedule = dataclasses.replace(SCHED, early=2)
    session = StreamSession(schedule, ScriptVocab(), ENDPOINT)
    session.accept_audio(audio[:1600])  # 5 frames: provisional windows only
    (provisional,) = session.windows_to_run()  # up to the grid point 4 (its last frame given up): "_ab"
    assert provisional.provisional and provisional.final_from == provisional.final_to == 0
    assert provisional.n_frames == 3
    session.accept_audio(audio[1600:5000])  # the first full window (13 frames) is ready now
    later = session.windows_to_run()
    assert [w.provisional for w in later] == [False]
    with pytest.raises(RuntimeError, match="order"):
        session.accept_result(later[0], script_model([later[0].samples])[0])
    session.accept_result(provisional, script_model([provisional.samples])[0])
    assert [(e.type, e.text) for e in session.events_received()] == [("partial", "ab")]
    session.accept_result(later[0], script_model([later[0].samples])[0])
    assert [(e.type, e.text) for e in session.events_received()] == [("partial", "ab c")]
    session.accept_audio(audio[5000:])
    run_session(session, script_model)
    session.finish()
    run_session(session, script_model)
    assert session.finished
    assert [(e.type, e.text) for e in session.events_received() if isinstance(e, Final)] == [("final", "ab c")]


def test_no_provisional_window_once_the_full_one_is_due():
    """The grid point that coincides with the first full window plans no provisional window of the same audio."""
    schedule = dataclasses.replace(SCHED, early=SCHED.hop + SCHED.lookahead)
    session = StreamSession(schedule, ScriptVocab(), ENDPOINT)
    session.accept_audio(script_audio(frames("_" * 13))[: 320 * 13])  # 80 samples short of the full window
    assert session.windows_to_run() == []


# --- partial refreshes between full windows ----------------------------------------------------------------

REFRESH = {name: dataclasses.replace(s, early=5, refresh=4, refresh_left=20) for name, s in SCHEDULES.items()}


@pytest.mark.parametrize("runner", ["layer-padfirst", "group-padlast"], indirect=True)
@pytest.mark.parametrize("schedule", REFRESH.values(), ids=REFRESH.keys())
@pytest.mark.parametrize("chunk", [1, 7, 320, 1000, "random"])
def test_partial_refreshes_leave_finals_arrival_invariant(runner, speech, schedule, chunk):
    """Refresh windows, some run and some skipped, show partials; frame ids, finals and the full windows are the
    reference's."""
    pattern = itertools.cycle([True, False, False])  # skip a third of them, run the rest
    seen = streams_like_the_reference(runner, speech[: 16000 * 4 + 77], schedule, chunk, skip=lambda w: next(pattern))
    refresh = [w for w in seen if w.optional]
    assert refresh and all(w.provisional and w.final_from == w.final_to for w in refresh)
    assert all(w.start_frame == max(0, w.final_from - schedule.refresh_left) for w in refresh)


def test_refresh_windows_fall_between_full_windows_on_their_grid():
    """refresh = 2 frames with a 5-frame hop: refreshes end 2 and 4 frames after each full window (never where
    the next full window ends, 5 after); each starts refresh_left frames before the first non-final frame."""
    schedule = dataclasses.replace(SCHED, refresh=2, refresh_left=6)
    seen = []
    timeline(schedule, seen=seen)
    full_end = final_to = None
    offsets = []
    for _, w in seen:
        if not w.provisional:  # a full window ends 80 samples past its last frame boundary
            full_end, final_to = (w.start_frame * 320 + len(w.samples) - 80) // 320, w.final_to
            continue
        assert w.optional and full_end is not None
        assert w.final_from == w.final_to == final_to and w.start_frame == max(0, final_to - 6)
        offsets.append(w.start_frame + len(w.samples) // 320 - full_end)  # a refresh ends on the grid itself
    assert len(offsets) >= 6 and set(offsets) == {2, 4}


def test_refreshes_show_text_sooner_and_skipped_ones_change_nothing():
    """With refreshes the letters show sooner than once a hop; finals stay; every refresh skipped is the
    engine without refreshes, event for event (also across a flush)."""
    off = SCHED
    on = dataclasses.replace(SCHED, refresh=2, refresh_left=10)
    for flush_at, today in [(None, TODAY), (40, TODAY_FLUSH_AT_40)]:
        assert timeline(off, flush_at=flush_at) == today
        assert timeline(on, flush_at=flush_at, skip=True) == today
        got = timeline(on, flush_at=flush_at)
        assert [e for e in got if e[1] == "final"] == [e for e in today if e[1] == "final"]

        def first_shown(events):
            shown = {}
            for received, _kind, segment, text, *_ in events:
                for n in range(1, len(text) + 1):
                    shown.setdefault((segment, text[:n]), received if received >= 0 else 10**9)
            return shown

        sooner, later = first_shown(got), first_shown(today)
        common = sooner.keys() & later.keys()
        assert common and any(sooner[k] < later[k] for k in common)
    # text that the full window showed at 15520 (segment 1 "cd af") shows one refresh earlier
    assert min(r for r, kind, seg, text, *_ in timeline(on) if text.startswith("cd af")) < 15520


def test_no_refresh_after_a_flush_until_the_next_full_window():
    """After a flush the early partials (if on) show the new segment; refreshes wait for its first full window."""
    for early in (0, 2):
        schedule = dataclasses.replace(SCHED, early=early, refresh=2, refresh_left=6)
        timeline(schedule, flush_at=40, seen=(pairs := []))
        seen = [w for _, w in pairs]
        flushed = next(i for i, w in enumerate(seen) if not w.provisional and w.final_to - w.final_from != SCHED.hop)
        assert seen[flushed].final_to == 40  # the window the flush closed the segment with
        after = seen[flushed + 1 :]
        first_full = next(i for i, w in enumerate(after) if not w.provisional)
        assert not any(w.optional for w in after[:first_full])
        assert all(w.provisional for w in after[:first_full]) and (first_full > 0) == (early > 0)
        assert any(w.optional for w in after[first_full:])


def test_only_an_optional_window_can_be_skipped_in_order():
    audio = script_audio(frames("_ab|c" + "_" * 40))
    session = StreamSession(dataclasses.replace(SCHED, refresh=2, refresh_left=6), ScriptVocab(), ENDPOINT)
    session.accept_audio(audio[: 320 * 15])  # the first full window (13 frames) and a refresh 2 frames on
    full, refresh = session.windows_to_run()
    assert (full.optional, refresh.optional) == (False, True)
    with pytest.raises(ValueError, match="optional"):
        session.skip(full)
    with pytest.raises(RuntimeError, match="order"):
        session.skip(refresh)
    session.accept_result(full, script_model([full.samples])[0])
    session.skip(refresh)
    assert session.pending == 0
    # run_session (streamer transcribe, eval) skips refreshes unless asked: a file has nobody to show them to
    ran = []
    session.accept_audio(audio[320 * 15 : 320 * 17])  # the refresh 4 frames on
    run_session(session, lambda ws: ran.extend(ws) or script_model(ws))
    assert ran == [] and session.pending == 0
    session.accept_audio(audio[320 * 17 : 320 * 20])  # the next full window (18) and a refresh (20)
    run_session(session, lambda ws: ran.extend(ws) or script_model(ws), refresh=True)
    assert len(ran) == 2 and session.pending == 0


def partial_delays(runner, audio, schedule, words=None, chunk=1600):
    """Seconds of audio received past the end of each final word (from the chunk that held it) when an event
    first showed that word (``words_shown``), with every window run: what a live client waits, less the compute."""
    from streamer.scoring import words_shown

    session = StreamSession(schedule, runner.vocab, EndpointRules(), words=words)
    timeline = []
    for i in range(0, len(audio) + chunk, chunk):
        if i < len(audio):
            session.accept_audio(audio[i : i + chunk])
        else:
            session.finish()
        run_session(session, runner, refresh=True)
        received = min(len(audio), i + chunk) / 16000
        timeline += [(received, isinstance(e, Final), [(w.word, w.start, w.end) for w in e.words])
                     for e in session.events_received()]
    return np.array([at - np.ceil(end / 0.1 - 1e-6) * 0.1 for end, at in words_shown(timeline)])


def test_words_shown_counts_the_right_word_at_its_place():
    """A final word is shown by the first event with the same word overlapping it: a misread does not count, a
    word whose end moved by a frame still does, and the same word elsewhere in the stream is another word."""
    from streamer.scoring import words_shown

    events = [
        (1.0, False, [("ten", 0.1, 0.3)]),  # "turn" misread
        (1.4, False, [("turn", 0.1, 0.32), ("on", 0.4, 0.44)]),
        (1.8, False, [("turn", 0.1, 0.32), ("on", 0.4, 0.46), ("the", 0.5, 0.6)]),
        (2.5, True, [("turn", 0.1, 0.32), ("on", 0.4, 0.46), ("the", 0.5, 0.62), ("lights", 0.9, 1.2)]),
        (3.0, False, [("on", 2.0, 2.2)]),
        (3.5, True, [("on", 2.0, 2.2)]),
    ]
    assert words_shown(events) == [(0.32, 1.4), (0.46, 1.4), (0.62, 1.8), (1.2, 2.5), (2.2, 3.0)]
    assert words_shown(events[:3]) == []  # no final yet: nothing to measure


@pytest.mark.parametrize("decoder", ["greedy", "words"])
def test_refreshes_cut_the_partial_delay_of_real_speech(model_runner, demo_words, speech, decoder):
    """The demo model on espeak speech: the slowest words (p90) show about a refresh interval after their end
    instead of a hop or more; the finals are the same."""
    words = demo_words if decoder == "words" else None
    on = StreamConfig().schedule()
    off = dataclasses.replace(on, refresh=0)
    assert on.refresh == 10 and on.refresh_left == 40 and on.hop == 20
    audio = np.concatenate([speech, speech])
    slow_on = np.percentile(partial_delays(model_runner, audio, on, words), 90)
    slow_off = np.percentile(partial_delays(model_runner, audio, off, words), 90)
    print(f"p90 partial delay {slow_on:.2f} s with refreshes, {slow_off:.2f} s without")
    assert slow_on <= slow_off - 0.15, (slow_on, slow_off)
    assert slow_on <= 0.45
    _, events_on = stream(audio, model_runner, on, arrival(1600, len(audio)), EndpointRules(), words=words)
    _, events_off = stream(audio, model_runner, off, arrival(1600, len(audio)), EndpointRules(), words=words)
    assert [f for f in events_on if isinstance(f, Final)] == [f for f in events_off if isinstance(f, Final)]


# --- voice activity: the detector's probabilities are an input, like the model's frames ------------------------

VAD_RULES = EndpointRules(silence_no_speech_s=1.0, silence_after_speech_s=0.8, max_utterance_s=5.0, vad=True,
                          vad_silence_s=0.3)


def script_speech(voiced, n_samples):
    """Speech probabilities per 512-sample frame: 1 where ``voiced`` (a '+'/'.' string, one mark per 20 ms frame)
    marks a frame whose scripted sample (320 t + 200) lies in it, else 0."""
    probs = np.zeros(n_samples // 512, dtype=np.float32)
    for t, mark in enumerate(voiced):
        if mark == "+" and (320 * t + 200) // 512 < len(probs):
            probs[(320 * t + 200) // 512] = 1.0
    return probs


def run_vad_script(spec, voiced, rules=VAD_RULES, chunk=160):
    """Stream a scripted model's audio with scripted speech probabilities; (samples received, event) pairs."""
    audio = script_audio(frames(spec))
    probs = script_speech(voiced, len(audio))
    session = StreamSession(SCHED, ScriptVocab(), rules)
    out = []
    for i in range(0, len(audio), chunk):
        session.accept_audio(audio[i : i + chunk])
        if session.vad:
            session.accept_speech(probs[i // 512 : min(i + chunk, len(audio)) // 512])
        run_session(session, script_model)
        out += [(min(i + chunk, len(audio)), e) for e in session.events_received()]
    session.finish()
    run_session(session, script_model)
    return out + [(-1, e) for e in session.events_received()]


def finals_of(timed):
    return [(at, e.text, e.reason) for at, e in timed if isinstance(e, Final)]


def test_vad_endpoint_fires_vad_silence_after_the_speech():
    # "ab c" spoken over frames 0..7, then 1.2 s of silence and "d": the detector's 0.3 s of silence (ten
    # 32 ms frames after the last voiced one, which ends at sample 2560) end the segment at sample 7680, when
    # that audio has come; the CTC rule alone needs 0.8 s of blank final frames and the look-ahead behind them.
    spec = "__aab|_c" + "_" * 60 + "dd__"
    voiced = "+" * 8 + "." * 60 + "++.."
    vad = finals_of(run_vad_script(spec, voiced))
    ctc = finals_of(run_vad_script(spec, voiced, dataclasses.replace(VAD_RULES, vad=False)))
    assert [(text, reason) for _, text, reason in vad] == [("ab c", "silence"), ("d", "end")]
    assert [text for _, text, _ in ctc] == ["ab c", "d"]
    assert vad[0][0] == 7680
    assert ctc[0][0] >= 320 * (8 + 40) + 80
    # the final's words are those of the frames, whatever window closed the segment
    timed = run_vad_script(spec, voiced)
    first = next(e for _, e in timed if isinstance(e, Final))
    assert [(w.word, w.start, w.end) for w in first.words] == [("ab", 0.04, pytest.approx(0.1)),
                                                              ("c", pytest.approx(0.14), pytest.approx(0.16))]


def test_vad_silence_over_letters_does_not_cut_a_word():
    # The detector hears 0.5 s of "silence" in the middle of a word the model still spells (a letter every
    # 0.2 s): no cut there. A pause the model hears as blank too (0.5 s between "abcd" and "ef") ends the first.
    spec = "ab" + "_" * 9 + "c" + "_" * 9 + "d" + "_" * 25 + "ef" + "_" * 5
    voiced = "++" + "." * 19 + "+" + "." * 25 + "++" + "." * 5
    vad = finals_of(run_vad_script(spec, voiced))
    assert [(text, reason) for _, text, reason in vad] == [("abcd", "silence"), ("ef", "end")]
    # with the CTC rule alone (0.8 s) the 0.5 s pause does not end anything
    ctc = finals_of(run_vad_script(spec, voiced, dataclasses.replace(VAD_RULES, vad=False)))
    assert [text for _, text, _ in ctc] == ["abcd ef"] or [text for _, text, _ in ctc] == ["abcdef"]


def test_vad_noise_without_text_ends_nothing():
    # speech the detector hears but the model does not spell: no final, no event
    spec = "_" * 80
    assert run_vad_script(spec, "+" * 20 + "." * 60) == []


def test_vad_flush_forgets_the_speech_before_it():
    spec = "ab" + "_" * 40
    voiced = "++" + "." * 40
    audio = script_audio(frames(spec))
    probs = script_speech(voiced, len(audio))
    session = StreamSession(SCHED, ScriptVocab(), VAD_RULES)
    session.accept_audio(audio[:1600])
    session.flush()
    session.accept_speech(probs)  # the detector's frames come after the flush: they end nothing more
    session.accept_audio(audio[1600:])
    session.finish()
    run_session(session, script_model)
    events = session.events_received()
    assert [(e.text, e.reason) for e in events if isinstance(e, Final)] == [("ab", "flush")]
    assert not any(w.quiet_from is not None for w in session.windows_to_run())


def test_speech_needs_the_vad_rule():
    session = StreamSession(SCHED, ScriptVocab(), ENDPOINT)
    assert not session.vad
    with pytest.raises(ValueError, match="vad"):
        session.accept_speech(np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="voice-activity"):
        EndpointRules(vad=True, vad_threshold=0.0)


def test_voice_events_say_where_speech_started_and_stopped():
    spec = "__aab|_c" + "_" * 60 + "dd" + "_" * 30
    voiced = "+" * 8 + "." * 60 + "++" + "." * 30
    audio = script_audio(frames(spec))
    probs = script_speech(voiced, len(audio))
    session = StreamSession(SCHED, ScriptVocab(), VAD_RULES, voice_events=True)
    got = []
    for i in range(0, len(audio), 1000):
        session.accept_audio(audio[i : i + 1000])
        session.accept_speech(probs[i // 512 : min(i + 1000, len(audio)) // 512])
        got += [(min(i + 1000, len(audio)), e) for e in session.voice_events()]
        run_session(session, script_model)
    # speech in the 32 ms frames 0-4 (holding frames 0..7: to sample 2560), then 42-43 (frames 68-69)
    assert [(type(e).__name__, round(e.time, 3)) for _, e in got] == [
        ("SpeechStarted", 0.0), ("SpeechStopped", 0.16), ("SpeechStarted", 1.344), ("SpeechStopped", 1.408)]
    # each stop comes as soon as the audio holding its 0.3 s of silence did
    assert [at for at, e in got if isinstance(e, SpeechStopped)] == [8000, 28000]
    # without asking, or without the voice-activity rule, none are kept
    assert StreamSession(SCHED, ScriptVocab(), VAD_RULES).voice_events() == []
    assert StreamSession(SCHED, ScriptVocab(), ENDPOINT, voice_events=True).voice_events() == []


class ScriptRunner:
    vocab = ScriptVocab()

    def __call__(self, windows):
        return script_model(windows)


VAD_SPEC = ("__ab_c" + "_" * 14 + "dd|e" + "_" * 8 + "f" + "_" * 30 + "ab" + "_" * 3 + "c" + "_" * 40
            + "de" * 10 + "_" * 17 + "f" + "_" * 5)
VAD_VOICED = ("++++++" + "." * 14 + "++++" + "." * 8 + "+" + "." * 30 + "++" + "." * 3 + "+" + "." * 40
              + "++" * 10 + "." * 17 + "+" + "." * 5)


@pytest.mark.parametrize("schedule", [SCHED, dataclasses.replace(SCHED, pipeline=True),
                                      dataclasses.replace(SCHED, early=3, refresh=2)], ids=["stream", "pipeline",
                                                                                            "refresh"])
@pytest.mark.parametrize("chunk", [1, 7, 320, 1000, "random"])
def test_vad_endpoints_are_arrival_invariant(schedule, chunk):
    """Endpoint windows go where the speech probabilities say, whatever the chunking: the reference's finals."""
    audio = script_audio(frames(VAD_SPEC))
    probs = script_speech(VAD_VOICED, len(audio))
    seen = streams_like_the_reference(ScriptRunner(), audio, schedule, chunk, endpoint=VAD_RULES, speech=probs)
    endpoint_windows = [w for w in seen if w.quiet_from is not None]
    assert len(endpoint_windows) >= 3
    # (the detector's pauses of 0.34 s and more end segments that the CTC rule's 0.8 s would have joined)
    _, finals = reference(audio, script_model, schedule, ScriptVocab(), VAD_RULES, speech=probs)
    assert [f.text for f in finals] == ["abcd ef", "abc", "de" * 10, "f"]


@pytest.mark.parametrize("runner", ["layer-padlast", "group-padfirst"], indirect=True)
@pytest.mark.parametrize("chunk", [1, 7, 320, 1000, "random"])
def test_vad_leaves_real_model_finals_arrival_invariant(runner, speech, chunk):
    """With a real model and the real detector's probabilities of espeak-ng speech: the reference's finals."""
    from streamer.vad import speech_probabilities

    audio = speech[: 16000 * 4 + 77]
    probs = speech_probabilities(audio)
    rules = dataclasses.replace(VAD_RULES, silence_after_speech_s=0.4)
    seen = streams_like_the_reference(runner, audio, EARLY["stream"], chunk, endpoint=rules, speech=probs)
    assert any(w.quiet_from is not None for w in seen)


def _stream_with_detector(runner, audio, session, *, partials_from=None, chunk=1600):
    """Feed ``audio`` in ``chunk`` pieces with the voice-activity detector, every window run (refreshes too); the
    windows run and the events. ``partials_from``: the session shows partials from that sample on."""
    from streamer.transcribe import feed_audio, speech_detector

    detector = speech_detector(session)
    seen, events = [], []

    def run():
        windows = session.windows_to_run()
        seen.extend(windows)
        run_session_all(session, windows, runner)
        events.extend(session.events_received())

    for i in range(0, len(audio), chunk):
        if partials_from is not None and i >= partials_from:
            session.partials = True
        feed_audio(session, audio[i : i + chunk], detector)
        run()
    session.finish()
    run()
    return seen, events


def run_session_all(session, windows, runner):
    for w, lp in zip(windows, runner.run([w.samples for w in windows]) if windows else [], strict=True):
        session.accept_result(w, lp)


@pytest.mark.parametrize("decoder", ["greedy", "words"])
def test_a_session_that_shows_no_partials_runs_no_window_for_them_and_reads_the_same_finals(
        model_runner, demo_words, speech, decoder):
    """``partials = False`` (a phone call nobody watches, a Deepgram client without interim results): no
    provisional window, no refresh, no partial; the finals are those of a session that shows them, to the word
    times. Turned on mid-stream, partials come again from the next window."""
    from streamer.config import load_config
    from streamer.transcribe import new_session

    words = demo_words if decoder == "words" else None
    cfg = load_config(None, [])
    audio = np.concatenate([speech, speech])  # (four sentences, pauses between: several segments)

    def session(partials):
        return new_session(cfg, model_runner.vocab, words, refresh=True, partials=partials)

    on_windows, on_events = _stream_with_detector(model_runner, audio, session(True))
    off_windows, off_events = _stream_with_detector(model_runner, audio, session(False))
    late_windows, late_events = _stream_with_detector(model_runner, audio, session(False), partials_from=len(speech))

    def finals(events):
        return [(f.text, f.start, f.end, f.reason, f.words) for f in events if isinstance(f, Final)]

    assert len(finals(on_events)) >= 4 and finals(off_events) == finals(on_events) == finals(late_events)
    assert any(isinstance(e, Partial) and e.text for e in on_events)
    assert not any(isinstance(e, Partial) for e in off_events)
    assert any(w.provisional and not w.optional for w in on_windows)  # early partials ...
    assert any(w.optional for w in on_windows)  # ... and refreshes
    assert not any(w.provisional for w in off_windows)
    def plan(windows):
        return [(w.start_frame, w.final_from, w.final_to, len(w.samples), w.quiet_from) for w in windows]

    assert plan(w for w in on_windows if not w.provisional) == plan(off_windows)  # the same full windows
    # from the second half on, the late one shows partials as the first does
    half = len(speech) / 16000
    assert not any(isinstance(e, Partial) and e.start < half - 1.0 for e in late_events)
    shown = [e.text for e in late_events if isinstance(e, Partial) and e.start >= half]
    assert shown and shown == [e.text for e in on_events if isinstance(e, Partial) and e.start >= half]
    assert any(w.provisional for w in late_windows)
