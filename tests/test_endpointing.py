"""A stream's own endpointing: ``endpointing_ms`` (or none but the client's flush), ``utterance_end_ms`` and the
detector's speech events; the engine with a scripted model, then the native protocol on espeak-ng speech."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math

import numpy as np
import pytest

from streamer.endpoint import EndpointRules, stream_rules
from streamer.engine import StreamSession, run_session
from streamer.events import Final, SpeechStarted, SpeechStopped, UtteranceEnd, parse_event, to_json
from streamer.exceptions import ProtocolError
from streamer.protocol import parse_control
from tests.test_engine import SCHED, VAD_RULES, ScriptVocab, arrival, frames, script_audio, script_model, script_speech

# "ab c" over frames 0..7, 0.5 s of silence, "d" at frames 33-34, then 1.6 s of silence
SPEC = "__aab|_c" + "_" * 25 + "dd" + "_" * 80
VOICED = "+" * 8 + "." * 25 + "++" + "." * 80


def run(rules, spec=SPEC, voiced=VOICED, chunks=None, voice_events=True, flush_at=None):
    """Stream a scripted model's audio and speech probabilities; (samples received, event) pairs in the order a
    protocol sends them (speech events, the transcript, utterance ends)."""
    audio = script_audio(frames(spec))
    probs = script_speech(voiced, len(audio))
    session = StreamSession(SCHED, ScriptVocab(), EndpointRules(), voice_events=voice_events)
    session.use_endpoint(rules, voice_events=voice_events)
    out = []
    i = 0
    for n in chunks or arrival(160, len(audio)):
        if i >= len(audio):
            break
        session.accept_audio(audio[i : i + n])
        if session.vad:
            session.accept_speech(probs[i // 512 : min(i + n, len(audio)) // 512])
        i = min(i + n, len(audio))
        if flush_at is not None and i >= flush_at:
            session.flush()
            flush_at = None
        run_session(session, script_model)
        voice = session.voice_events()
        out += [(i, e) for e in voice if not isinstance(e, UtteranceEnd)]
        out += [(i, e) for e in session.events_received()]
        out += [(i, e) for e in voice if isinstance(e, UtteranceEnd)]
    session.finish()
    run_session(session, script_model)
    return out + [(-1, e) for e in session.events_received() + session.voice_events()]


def test_utterance_end_follows_the_last_final_after_the_gap():
    rules = dataclasses.replace(VAD_RULES, utterance_end_s=1.0)
    timed = run(rules)
    seq = [(type(e).__name__, getattr(e, "text", getattr(e, "time", None))) for _, e in timed
           if not isinstance(e, SpeechStarted | SpeechStopped)]
    # the 0.5 s pause after "ab c" ends its segment (the detector's 0.3 s), but is shorter than the utterance end
    # gap: one utterance end, after "d", at the end of its last word
    assert [k for k, _ in seq if k != "Partial"] == ["Final", "Final", "UtteranceEnd"]
    finals = [e for _, e in timed if isinstance(e, Final)]
    assert [f.text for f in finals] == ["ab c", "d"]
    (at, end), = [(at, e) for at, e in timed if isinstance(e, UtteranceEnd)]
    assert end.time == pytest.approx(finals[1].end) == pytest.approx(0.7)
    # sent once the model's frames over 1 s after that word were seen (a full window's look-ahead), not before
    assert 320 * 35 + 16000 <= at <= 320 * 35 + 16000 + 320 * (SCHED.hop + SCHED.lookahead) + 80
    # no utterance end without asking
    assert not any(isinstance(e, UtteranceEnd) for _, e in run(VAD_RULES))


def test_utterance_end_whatever_the_arrival():
    """The utterance ends (and, apart, the speech events) and their times are the same for every chunking; how
    they interleave is not: speech events are read off the audio as it comes, utterance ends off the model."""
    rules = dataclasses.replace(VAD_RULES, utterance_end_s=0.4)

    def seq(chunks):
        timed = run(rules, chunks=chunks)
        return ([(type(e).__name__, e.time) for _, e in timed if isinstance(e, UtteranceEnd)],
                [(type(e).__name__, e.time) for _, e in timed if isinstance(e, SpeechStarted | SpeechStopped)],
                [(e.text, e.end) for _, e in timed if isinstance(e, Final)])

    expected = seq(arrival(160, 0))
    # the 0.5 s pause is now long enough: one utterance end after each final, at its end
    assert expected[0] == [("UtteranceEnd", pytest.approx(end)) for _, end in expected[2]]
    assert len(expected[0]) == 2
    for chunk in (1, 7, 320, 1000, "random"):
        assert seq(arrival(chunk, 0)) == expected, chunk
    # and each comes after its final
    timed = run(rules, chunks=arrival("random", 0))
    order = [type(e).__name__ for _, e in timed if isinstance(e, Final | UtteranceEnd)]
    assert order == ["Final", "UtteranceEnd"] * 2


def test_utterance_end_does_not_need_the_detector():
    # with the CTC rule alone, the gap is read off the model's frames all the same
    rules = EndpointRules(silence_no_speech_s=1.0, silence_after_speech_s=0.8, utterance_end_s=1.0)
    timed = run(rules, voice_events=False)
    assert [type(e).__name__ for _, e in timed if isinstance(e, Final | UtteranceEnd)] == [
        "Final", "UtteranceEnd"]
    assert [f.text for _, f in timed if isinstance(f, Final)] == ["ab cd"]


def test_endpointing_off_waits_for_the_flush():
    """``endpointing_ms = false``: no final until the client flushes, whatever the pauses; the speech events
    still come from the detector."""
    rules = stream_rules(VAD_RULES, endpointing_ms=False, speech_events=True)
    assert not rules.enabled and rules.vad
    flush_at = 320 * 100
    timed = run(rules, flush_at=flush_at)
    finals = [(at, e) for at, e in timed if isinstance(e, Final)]
    assert [(f.text, f.reason) for _, f in finals] == [("ab cd", "flush")]
    assert all(at >= flush_at for at, _ in finals)
    assert [type(e).__name__ for _, e in timed if isinstance(e, SpeechStarted | SpeechStopped)] == [
        "SpeechStarted", "SpeechStopped"] * 2
    # the same without the flush: only the end of the stream ends it
    assert [(f.text, f.reason) for _, f in run(rules) if isinstance(f, Final)] == [("ab cd", "end")]


def test_endpointing_off_keeps_the_length_cap():
    """``endpointing_ms = false`` waits for the flush, but a client that never flushes still gets its speech cut
    at ``max_utterance_s``: one segment does not grow without bound."""
    rules = stream_rules(dataclasses.replace(VAD_RULES, max_utterance_s=1.0), endpointing_ms=False)
    spec = "ab|" * 90 + "_" * 10  # 5.4 s of speech without a pause, then 0.2 s of silence
    finals = [f for _, f in run(rules, spec=spec, voiced="+" * 270 + "." * 10, voice_events=False)
              if isinstance(f, Final)]
    assert [f.reason for f in finals] == ["max_length"] * 5 + ["end"]
    assert all(f.end - f.start <= 1.0 for f in finals)


def test_stream_rules_from_a_start():
    base = EndpointRules(silence_after_speech_s=0.8)
    assert stream_rules(base) == base
    assert stream_rules(base, endpointing_ms=True) == base
    fast = stream_rules(base, endpointing_ms=100)
    assert fast.enabled and fast.vad and fast.vad_silence_s == 0.1 and fast.silence_after_speech_s == 0.8
    slow = stream_rules(base, endpointing_ms=2000)
    assert slow.vad_silence_s == 2.0 and slow.silence_after_speech_s == 2.0  # the CTC rule waits as long
    off = stream_rules(dataclasses.replace(base, vad=True), endpointing_ms=False)
    assert not off.enabled and not off.vad  # no detector unless its events are asked for
    assert stream_rules(base, utterance_end_ms=1500).utterance_end_s == 1.5
    assert stream_rules(base, speech_events=True).vad
    with pytest.raises(ValueError, match="utterance end"):
        EndpointRules(utterance_end_s=-1)


def test_endpoint_rules_change_only_before_audio():
    session = StreamSession(SCHED, ScriptVocab(), EndpointRules())
    session.accept_audio(np.zeros(100, np.float32))
    with pytest.raises(RuntimeError, match="before the first audio"):
        session.use_endpoint(VAD_RULES)


def test_start_options_parse_and_bad_values_are_refused():
    start = parse_control('{"type": "start", "endpointing_ms": 250, "utterance_end_ms": 1000, "vad_events": true}')
    assert start.start is not None
    assert (start.start.endpointing_ms, start.start.utterance_end_ms, start.start.vad_events) == (250, 1000, True)
    off = parse_control('{"type": "start", "endpointing_ms": false}').start
    assert off is not None and off.endpointing_ms is False
    default = parse_control('{"type": "start", "endpointing_ms": true}').start
    assert default is not None and default.endpointing_ms is None and not default.vad_events
    for field, value in [("endpointing_ms", 5), ("endpointing_ms", 10_001), ("endpointing_ms", 250.5),
                         ("endpointing_ms", "250"), ("utterance_end_ms", 50),
                         ("utterance_end_ms", True), ("utterance_end_ms", False), ("vad_events", 1),
                         ("vad_events", "yes")]:
        with pytest.raises(ProtocolError, match=field) as info:
            parse_control(json.dumps({"type": "start", field: value}))
        assert (info.value.kind, info.value.code) == ("bad_start", 1008)


def test_voice_events_travel_and_parse_back():
    for event in (SpeechStarted(1.25), SpeechStopped(2.5), UtteranceEnd(3.125)):
        assert parse_event(to_json(event)) == event
    assert UtteranceEnd(0.7).to_dict() == {"type": "utterance_end", "time": 0.7}


# -- the native protocol and OpenAI Realtime, on espeak-ng speech with known pauses ---------------------------

SENTENCES = ["turn on the kitchen lights", "set a timer for twenty minutes", "add milk to the shopping list"]
PAUSES_S = [0.6, 1.5, 1.5]
"""the silence after each sentence: the first shorter than the utterance end's 1 s, the others longer"""


@pytest.fixture(scope="module")
def paused():
    """The sentences (trimmed) with PAUSES_S after each; (audio, [(start, end) seconds of each sentence])."""
    from streamer.testing import espeak_audio

    parts, spans, pos = [], [], 0
    for text, pause in zip(SENTENCES, PAUSES_S, strict=True):
        audio = espeak_audio(text)
        voiced = np.flatnonzero(np.abs(audio) > 1e-3)
        audio = audio[voiced[0] : voiced[-1] + 1]
        spans.append((pos / 16000, (pos + len(audio)) / 16000))
        parts += [audio, np.zeros(int(pause * 16000), dtype=np.float32)]
        pos += len(audio) + len(parts[-1])
    return np.concatenate(parts), spans


def kinds_of(messages, *kinds):
    return [m for m in messages if m["type"] in kinds]


async def test_native_speech_events_and_utterance_ends_fall_in_the_pauses(daemon_factory, paused):
    """``vad_events`` and ``utterance_end_ms`` on the native protocol: one speech_started/stopped pair per
    sentence, each time inside the sentence's edges and the pause around it; an utterance end after the finals
    that 1 s of silence follows, at their last word's end, after them; the finals themselves as without."""
    from tests.conftest import pcm16
    from tests.test_server import finals_of, native_session

    audio, spans = paused
    d = await daemon_factory("endpoint.vad=true")
    start = {"type": "start", "endpointing_ms": 300, "utterance_end_ms": 1000, "vad_events": True}
    msgs, code = await native_session(d.port, pcm16(audio), chunk=3200, start=start)
    assert code == 1000
    finals = finals_of(msgs)
    assert [(f["text"], f["reason"]) for f in finals] == [(s, "silence") for s in SENTENCES]
    voice = kinds_of(msgs, "speech_started", "speech_stopped")
    assert [m["type"] for m in voice] == ["speech_started", "speech_stopped"] * len(SENTENCES)
    previous_end = 0.0
    for (started, stopped), (begin, end), pause in zip(zip(voice[::2], voice[1::2], strict=True), spans, PAUSES_S,
                                                       strict=True):
        assert previous_end <= started["time"] <= begin + 0.1  # in the pause before the sentence (or its onset)
        assert end - 0.1 <= stopped["time"] <= end + pause  # at the sentence's end, inside the pause after it
        previous_end = end
    # each sentence's speech_stopped comes before its final, the next one's speech_started after it
    order = [m["type"] for m in kinds_of(msgs, "speech_started", "speech_stopped", "final")]
    assert order == ["speech_started", "speech_stopped", "final"] * len(SENTENCES)
    # utterance ends: not after the first sentence (0.6 s to the next word), after the other two
    turns = [m["type"] for m in kinds_of(msgs, "final", "utterance_end")]
    assert turns == ["final", "final", "utterance_end", "final", "utterance_end"]
    ends = kinds_of(msgs, "utterance_end")
    assert [m["time"] for m in ends] == [finals[1]["end"], finals[2]["end"]]
    for m, (_, end), pause in zip(ends, spans[1:], PAUSES_S[1:], strict=True):
        assert end - 0.15 <= m["time"] <= end + pause
    assert msgs[-1]["type"] == "end"


async def test_native_endpointing_false_waits_for_the_flush(daemon_factory, paused):
    """``endpointing_ms: false``: the pauses end nothing, the flush ends the first two sentences, the stop the
    third; with the detector on in the daemon, and with its events asked for, which still come."""
    from tests.conftest import pcm16
    from tests.test_server import finals_of, native_session

    audio, spans = paused
    d = await daemon_factory("endpoint.vad=true")
    flush_at = 2 * round((spans[1][1] + 0.4) * 16000)  # (bytes) inside the long pause after the second sentence
    start = {"type": "start", "endpointing_ms": False, "vad_events": True}
    msgs, code = await native_session(d.port, pcm16(audio), chunk=3200, start=start, flush_at=flush_at)
    assert code == 1000
    finals = finals_of(msgs)
    assert [(f["text"], f["reason"]) for f in finals] == [(" ".join(SENTENCES[:2]), "flush"), (SENTENCES[2], "end")]
    assert [m["type"] for m in kinds_of(msgs, "speech_started", "speech_stopped")] == [
        "speech_started", "speech_stopped"] * len(SENTENCES)
    # the same without the flush: one final, at the stop
    msgs, _ = await native_session(d.port, pcm16(audio), chunk=3200, start={"type": "start", "endpointing_ms": False})
    assert [(f["text"], f["reason"]) for f in finals_of(msgs)] == [(" ".join(SENTENCES), "end")]
    assert not kinds_of(msgs, "speech_started", "speech_stopped", "utterance_end")


@pytest.mark.parametrize("vad", [True, False])
async def test_native_stream_without_the_options_gets_no_new_messages(daemon_factory, paused, vad):
    from tests.conftest import pcm16
    from tests.test_server import native_session

    d = await daemon_factory(f"endpoint.vad={str(vad).lower()}")
    msgs, code = await native_session(d.port, pcm16(paused[0][: 16000 * 4]), chunk=3200, start={"type": "start"})
    assert code == 1000
    assert {m["type"] for m in msgs} <= {"ready", "partial", "final", "end"}


@pytest.mark.parametrize(("field", "value"), [("endpointing_ms", 0), ("endpointing_ms", "300"),
                                              ("utterance_end_ms", 99), ("utterance_end_ms", 1000.5),
                                              ("vad_events", "true")])
async def test_native_bad_endpointing_values_are_refused(daemon_factory, field, value):
    from tests.test_server import native_session

    d = await daemon_factory()
    msgs, code = await native_session(d.port, b"\0\0" * 1600, start={"type": "start", field: value})
    assert code == 1008
    error = msgs[-1]
    assert error["type"] == "error" and error["code"] == "bad_start" and field in error["message"]
    assert not finals_of_any(msgs)


def finals_of_any(msgs):
    return [m for m in msgs if m["type"] in ("partial", "final")]


async def test_realtime_speech_events_come_from_the_detector(daemon_factory, paused):
    """OpenAI Realtime through the official SDK with the detector on: speech_started and speech_stopped at the
    sentences' edges, inside the pauses (the session's silence_duration_ms is the stream's), before the item's
    committed and completed; the transcripts are the sentences."""
    import openai
    import soxr

    from tests.conftest import pcm16

    audio, spans = paused
    pcm = pcm16(soxr.resample(audio, 16000, 24000))
    d = await daemon_factory("endpoint.vad=true")
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="x", max_retries=0, timeout=90)
    seen = []
    async with asyncio.timeout(90), c.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}}})
        for i in range(0, len(pcm), 9600):  # 200 ms a message
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
        async for event in conn:
            seen.append(event)
            if sum(e.type == "conversation.item.input_audio_transcription.completed" for e in seen) == 3:
                break
    assert seen[1].session.audio.input.turn_detection.silence_duration_ms == 400
    completed = [e for e in seen if e.type == "conversation.item.input_audio_transcription.completed"]
    assert [e.transcript for e in completed] == SENTENCES
    previous_end = 0.0
    for e, (begin, end), pause in zip(completed, spans, PAUSES_S, strict=True):
        mine = [x for x in seen if getattr(x, "item_id", None) == e.item_id]
        types = [x.type for x in mine if x.type.startswith("input_audio_buffer.")]
        assert types == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed"]
        assert previous_end <= mine[0].audio_start_ms / 1000 <= begin + 0.1
        stopped = next(x for x in mine if x.type == "input_audio_buffer.speech_stopped")
        assert end - 0.1 <= stopped.audio_end_ms / 1000 <= end + pause
        previous_end = end


async def test_realtime_refuses_a_bad_silence_duration(daemon_factory):
    from websockets.asyncio.client import connect

    d = await daemon_factory("endpoint.vad=true")
    async with asyncio.timeout(30), connect(f"ws://127.0.0.1:{d.port}/v1/realtime?intent=transcription") as ws:
        await ws.recv()  # session.created
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 5}}}}}))
        error = json.loads(await ws.recv())
    assert error["type"] == "error"
    assert error["error"]["param"] == "session.turn_detection.silence_duration_ms"


async def test_the_window_a_final_waits_for_runs_first_and_alone(model_runner, speech):
    """The window a flush's final waits for runs before the due windows of other streams queued ahead of it, in a
    batch of its own, without waiting ``max_wait_ms`` for company; one of audio sent ahead of real time (no
    deadline) waits its turn as any other."""
    from streamer.aio.worker import BatchWorker
    from streamer.config import StreamConfig, WorkerConfig

    session = StreamSession(StreamConfig().schedule(), model_runner.vocab)
    session.accept_audio(speech[: 16000 * 2])
    full = next(w for w in session.windows_to_run() if not w.provisional)
    session.flush()
    (closing,) = session.windows_to_run()
    assert closing.closing and not full.closing
    worker = BatchWorker(model_runner, WorkerConfig(max_wait_ms=1000, max_batch=8))
    worker.start()
    order = []

    async def run(window, stream, due=0.0):
        out = await worker.submit(window, stream, due=due)
        order.append((stream, worker.batches))
        assert out is not None and out.shape[0] == window.n_frames

    try:
        async with asyncio.timeout(60):
            first = [asyncio.create_task(run(full, "b")), asyncio.create_task(run(full, "c"))]
            await asyncio.sleep(0)  # queued: the worker waits for company
            await asyncio.gather(*first, run(closing, "a"))
            assert order == [("a", 1), ("b", 2), ("c", 2)]
            order.clear()
            await asyncio.gather(run(full, "b"), run(closing, "ahead", math.inf))
            assert order == [("b", 3), ("ahead", 4)]
    finally:
        await worker.stop()


async def test_a_stream_flushing_every_message_does_not_keep_going_first(model_runner, speech):
    """A stream's closing windows go first at most once per URGENT_EVERY_S of its audio: a client that flushes
    after every 100 ms message would otherwise put a window ahead of every other stream's ten times a second
    (clients/chaos.py flush-flood: the real-time streams' finals 3 s late). Its next closing window keeps its
    deadline, and joins the due windows queued ahead of it; a second of audio later it goes first again."""
    from streamer.aio.worker import URGENT_EVERY_S, BatchWorker
    from streamer.config import StreamConfig, WorkerConfig

    def closing_after(seconds: float):
        session = StreamSession(StreamConfig().schedule(), model_runner.vocab)
        session.accept_audio(speech[: round(16000 * seconds)])
        session.windows_to_run()
        session.flush()
        (window,) = session.windows_to_run()
        assert window.closing
        return window

    session = StreamSession(StreamConfig().schedule(), model_runner.vocab)
    session.accept_audio(speech[: 16000 * 2])
    full = next(w for w in session.windows_to_run() if not w.provisional)
    first, soon, later = closing_after(2.0), closing_after(2.1), closing_after(2.0 + URGENT_EVERY_S + 0.1)
    worker = BatchWorker(model_runner, WorkerConfig(max_wait_ms=1000, max_batch=8))
    worker.start()
    order = []

    async def run(window, stream, due=0.0):
        await worker.submit(window, stream, due=due)
        order.append((stream, worker.batches))

    async def behind_two(window) -> None:
        queued = [asyncio.create_task(run(full, "b")), asyncio.create_task(run(full, "c"))]
        await asyncio.sleep(0)  # queued: the worker waits for company
        await asyncio.gather(*queued, run(window, "a", 1.0))

    try:
        async with asyncio.timeout(60):
            await behind_two(first)
            assert order == [("a", 1), ("b", 2), ("c", 2)]
            order.clear()
            await behind_two(soon)  # 0.1 s of audio later: due as the others are, in their batch, not before it
            assert len({batch for _, batch in order}) == 1, order
            order.clear()
            await behind_two(later)
            assert order[0][0] == "a" and order[0][1] < order[1][1], order
    finally:
        await worker.stop()
