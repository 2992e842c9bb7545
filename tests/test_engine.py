"""The streaming engine against its reference, the transformers pipeline and one plain model call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.config import ModelConfig
from streamer.endpoint import EndpointRules
from streamer.engine import Schedule, StreamSession, n_frames, reference, run_session
from streamer.events import Final, Partial
from streamer.model import load_model

SCHEDULES = {
    "stream": Schedule(left=40, hop=10, lookahead=16),
    "pipeline": Schedule(left=40, hop=10, lookahead=16, pipeline=True),
}


@pytest.fixture(scope="module", params=["layer-padfirst", "layer-padlast", "group-padfirst", "group-padlast"])
def runner(request, tiny_models):
    return load_model(ModelConfig(id=str(tiny_models[request.param]), device="cpu"))


def stream(audio, runner, schedule, chunks, endpoint=None, vocab=None):
    session = StreamSession(schedule, vocab or runner.vocab, endpoint, record_frames=True)
    events = []
    i = 0
    for n in chunks:
        if i >= len(audio):
            break
        session.accept_audio(audio[i : i + n])
        i += n
        run_session(session, runner)
        events += session.events_received()
    session.finish()
    run_session(session, runner)
    events += session.events_received()
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
