"""Wav2Vec2-BERT 2.0 checkpoints (``Wav2Vec2BertForCTC``) stream on their own frame grid.

Tiny checkpoints are built here with and without the adapter (20 ms and 40 ms frames) and saved with their
processor (``SeamlessM4TFeatureExtractor`` + ``Wav2Vec2CTCTokenizer``), then loaded as a user would load one.
The checks are those of ``tests/test_engine.py`` for wav2vec2: arrival invariance against ``reference()``,
parity with the transformers ASR pipeline, one plain model call for short input, and the daemon end to end.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import pcm16
from test_engine import stream  # a runner is callable: the same feeding loop
from test_server import native_session

from streamer.checkpoint import frame_geometry
from streamer.config import Config, ModelConfig, StreamConfig
from streamer.endpoint import EndpointRules
from streamer.engine import Schedule, StreamSession, reference
from streamer.events import Final
from streamer.exceptions import ModelLoadError
from streamer.model import load_model
from streamer.runner import WAV2VEC2_GEOMETRY, FrameGeometry, geometry_of
from streamer.testing import make_tiny_bert_model

GRIDS = {"no-adapter": FrameGeometry(320, 560, "wav2vec2-bert"), "adapter": FrameGeometry(640, 560, "wav2vec2-bert")}


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    return {"no-adapter": make_tiny_bert_model(root / "no-adapter", adapter=False, seed=3),
            "adapter": make_tiny_bert_model(root / "adapter", adapter=True, pad_last=True, seed=4)}


@pytest.fixture(scope="module", params=list(GRIDS))
def bert(request, bert_dirs):
    return load_model(ModelConfig(id=str(bert_dirs[request.param]), device="cpu"))


def schedule_for(runner, left_ms=800, hop_ms=200, lookahead_ms=320, **kw):
    """The same schedule in milliseconds, on the runner's grid (40 ms frames halve the frame counts)."""
    return geometry_of(runner).schedule(StreamConfig(left_context_ms=left_ms, hop_ms=hop_ms, lookahead_ms=lookahead_ms,
                                                     **kw))


def same_finals(got, want):
    """Finals equal but for the confidences' float rounding: the reference batches equal windows together,
    streaming runs them as they become ready, and a batched Conformer differs from it in the last bits."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.segment, a.text, a.start, a.end, a.reason) == (b.segment, b.text, b.start, b.end, b.reason)
        assert [(w.word, w.start, w.end) for w in a.words] == [(w.word, w.start, w.end) for w in b.words]
        np.testing.assert_allclose([w.conf for w in a.words], [w.conf for w in b.words], rtol=1e-4, atol=1e-6)


def arrival(kind):
    if kind == "random":
        rng = np.random.default_rng(7)
        return iter(lambda: int(rng.integers(1, 8001)), None)
    return iter(lambda: kind, None)


def plain_call(runner, audio):
    """One plain model call on the whole input, as a user would make it: its unpadded frames' argmax."""
    feats = runner.feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        logits = runner.model(**feats).logits[0]
    real = int(runner.model._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))[0])
    return logits[:real].argmax(-1).tolist(), logits.shape[0]


# --- the grid ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GRIDS))
def test_geometry_comes_from_the_checkpoint(bert_dirs, kind):
    runner = load_model(ModelConfig(id=str(bert_dirs[kind]), device="cpu"))
    assert runner.geometry == GRIDS[kind]
    assert runner.model.config.inputs_to_logits_ratio == runner.geometry.frame_samples
    # Every length gives as many frames as the model's own unpadded output, so windows stack on this grid.
    rng = np.random.default_rng(0)
    for n in [560, 561, 879, 880, 1199, 1200, 1201, 3000, 3210, 4321, 16000, 16080]:
        audio = rng.normal(0, 0.1, n).astype(np.float32)
        ids, _ = plain_call(runner, audio)
        (lp,) = runner.run([audio])
        assert lp.shape[0] == runner.geometry.n_frames(n) == len(ids), n
        assert lp.argmax(-1).tolist() == ids, n
    assert runner.run([np.zeros(559, np.float32)])[0].shape[0] == 0


def test_wav2vec2_keeps_its_grid(tiny_models):
    runner = load_model(ModelConfig(id=str(tiny_models["layer-padfirst"]), device="cpu"))
    assert runner.geometry == WAV2VEC2_GEOMETRY == FrameGeometry(320, 400, "wav2vec2")
    assert geometry_of(object()) == WAV2VEC2_GEOMETRY  # a runner without the attribute: wav2vec2's grid


def test_schedule_in_milliseconds_follows_the_grid(bert_dirs):
    cfg = StreamConfig()
    on_40 = GRIDS["adapter"].schedule(cfg)
    on_20 = GRIDS["no-adapter"].schedule(cfg)
    assert (on_20.left, on_20.hop, on_20.lookahead, on_20.early) == (80, 20, 50, 20)
    assert (on_40.left, on_40.hop, on_40.lookahead, on_40.early) == (40, 10, 25, 10)
    assert on_40.window_samples == 640 * 75 - 80 and on_20.window_samples == 320 * 150 + 240
    assert on_40.n_frames(on_40.window_samples) == 75 and on_20.n_frames(on_20.window_samples) == 150
    assert WAV2VEC2_GEOMETRY.schedule(cfg) == cfg.schedule()  # wav2vec2: exactly the schedule it always had


def test_unsupported_architecture_is_refused_naming_it():
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC, Wav2Vec2FeatureExtractor

    model = Wav2Vec2BertForCTC(Wav2Vec2BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32, vocab_size=8, output_hidden_size=16))
    with pytest.raises(ModelLoadError, match="SeamlessM4TFeatureExtractor.*not Wav2Vec2FeatureExtractor"):
        frame_geometry(model, Wav2Vec2FeatureExtractor(), "dir")

    class Other(torch.nn.Module):
        config = type("C", (), {"model_type": "speech-thing"})()
        main_input_name = "input_features"

        def _get_feat_extract_output_lengths(self, n):
            return n

    with pytest.raises(ModelLoadError, match=r"dir: Other \(model_type 'speech-thing'.*is not supported.*Wav2Vec2Bert"):
        frame_geometry(Other(), Wav2Vec2FeatureExtractor(), "dir")


# --- streaming equals the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [False, True], ids=["stream", "pipeline"])
@pytest.mark.parametrize("chunk", [1, 7, 320, 1000, "random"])
def test_arrival_invariance(bert, speech, chunk, pipeline):
    audio = speech[: 16000 * 4 + 77]
    schedule = schedule_for(bert, pipeline_compatible=pipeline)
    endpoint = EndpointRules(silence_after_speech_s=0.4)
    ref_ids, ref_finals = reference(audio, bert.run, schedule, bert.vocab, endpoint)
    ids, events = stream(audio, bert, schedule, arrival(chunk), endpoint)
    assert len(ref_ids) == bert.geometry.n_frames(len(audio))
    assert ids == ref_ids
    same_finals([e for e in events if isinstance(e, Final)], ref_finals)
    assert ref_finals and all(f.text for f in ref_finals)


def test_word_times_are_in_the_models_frames(bert, speech):
    audio = speech[: 16000 * 4]
    _, finals = reference(audio, bert.run, schedule_for(bert), bert.vocab, EndpointRules(enabled=False))
    (final,) = finals
    frame_s = bert.geometry.frame_samples / 16000
    assert final.end == pytest.approx(len(audio) / 16000, abs=frame_s + 0.036)
    for w in final.words:
        assert w.start / frame_s == pytest.approx(round(w.start / frame_s), abs=1e-6)
        assert w.end / frame_s == pytest.approx(round(w.end / frame_s), abs=1e-6)


def test_steady_windows_batch_without_padding(bert, speech):
    """Windows of all streams batch: equal length, and a window's output does not depend on its companions."""
    schedule = schedule_for(bert)
    session = StreamSession(schedule, bert.vocab, None)
    session.accept_audio(speech[: 16000 * 5])
    windows = [w for w in session.windows_to_run() if not w.provisional]
    steady = [w.samples for w in windows if w.start_frame > 0]  # (earlier ones have less left context)
    assert len(steady) >= 3 and {len(x) for x in steady} == {schedule.window_samples}
    batched = bert.run(steady)
    for x, lp in zip(steady, batched, strict=True):
        assert lp.shape[0] == schedule.left + schedule.hop + schedule.lookahead
        np.testing.assert_allclose(lp, bert.run([x])[0], atol=1e-4)


def test_word_list_streams_as_its_reference(bert, speech, tmp_path):
    from streamer.config import DecoderConfig
    from streamer.decoder import build_decoder

    (tmp_path / "words.txt").write_text("turn\non\nthe\nkitchen\nlights\nset\na\ntimer\nfor\ntwenty\nminutes\n")
    words = build_decoder(DecoderConfig(words=str(tmp_path / "words.txt"), beam_size=8), bert)
    assert words is not None
    audio = speech[: 16000 * 4 + 5]
    schedule = schedule_for(bert)
    ref_ids, ref_finals = reference(audio, bert.run, schedule, bert.vocab, EndpointRules(), words)
    ids, events = stream(audio, bert, schedule, arrival("random"), EndpointRules(), words=words)
    assert ids == ref_ids
    same_finals([e for e in events if isinstance(e, Final)], ref_finals)
    assert any(f.words for f in ref_finals)


# --- against transformers --------------------------------------------------------------------------------


def test_pipeline_parity(bert, speech):
    """Text identical to the transformers ASR pipeline at the equivalent chunking.

    The audio ends on a whole 10 ms feature frame pair, as it would when the stream's length is a multiple of
    20 ms: otherwise the feature extractor pads the last chunk's odd 10 ms frame to a pair, the model gives a
    frame for it that the attention mask marks as padding, and the pipeline keeps that frame's letter while
    the engine (which counts unpadded frames only) does not. ``test_pipeline_chunks_are_the_engines_windows``
    checks the same windows on any length.
    """
    from transformers import pipeline

    schedule = schedule_for(bert, pipeline_compatible=True)
    s = schedule.frame_samples / 16000
    audio = speech[: 16000 * 5 + 320 * 7]
    pipe = pipeline("automatic-speech-recognition", model=bert.model, tokenizer=bert.tokenizer,
                    feature_extractor=bert.feature_extractor, device="cpu")
    n = schedule.left + schedule.hop + schedule.lookahead
    expected = pipe(audio.copy(), chunk_length_s=n * s, stride_length_s=(schedule.left * s, schedule.lookahead * s))
    _, events = stream(audio, bert, schedule, arrival(1600), EndpointRules(enabled=False))
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 1
    assert finals[0].text == expected["text"]


@pytest.mark.parametrize("extra", [0, 77, 160, 333])
def test_pipeline_chunks_are_the_engines_windows(bert, speech, extra):
    """The pipeline's chunks (its own ``chunk_iter``) are the engine's windows, sample for sample, and the frames
    each keeps are the ones the engine finalises from that window, on any length."""
    from transformers.pipelines.automatic_speech_recognition import chunk_iter

    schedule = schedule_for(bert, pipeline_compatible=True)
    fs = schedule.frame_samples
    audio = speech[: 16000 * 5 + extra]
    session = StreamSession(schedule, bert.vocab, None)
    session.accept_audio(audio)
    session.finish()
    windows = session.windows_to_run()
    chunks = list(chunk_iter(torch.from_numpy(audio), bert.feature_extractor, fs * (schedule.left + schedule.hop +
                             schedule.lookahead), fs * schedule.left, fs * schedule.lookahead))
    assert len(chunks) == len(windows)
    for k, (w, c) in enumerate(zip(windows, chunks, strict=True)):
        n, left, right = c["stride"]
        assert w.start_frame == k * schedule.hop and len(w.samples) == n
        feats = bert.feature_extractor(w.samples, sampling_rate=16000, return_tensors="pt")
        assert torch.equal(feats["input_features"], c["input_features"])
        keep_to = min(w.n_frames, round((n - right) / fs))
        assert (w.final_from - w.start_frame, w.final_to - w.start_frame) == (left // fs, keep_to)


@pytest.mark.parametrize("seconds", [0.04, 0.3, 0.52, 1.01])
def test_short_input_equals_one_model_call(bert, speech, seconds):
    audio = speech[16000 : 16000 + int(16000 * seconds)]
    schedule = schedule_for(bert, hop_ms=400, lookahead_ms=1000, early_partials=False)
    assert len(audio) < schedule.frame_samples * (schedule.hop + schedule.lookahead) + schedule.tail
    ids, _ = stream(audio, bert, schedule, arrival(320))
    plain, _ = plain_call(bert, audio)
    assert ids == plain
    assert len(ids) == bert.geometry.n_frames(len(audio))


# --- the commands and the daemon ---------------------------------------------------------------------------


def test_transcribe_command(bert_dirs, speech, tmp_path, capsys):
    from streamer.cli import main
    from streamer.transcribe import new_session, stream_array, text_of

    wav = tmp_path / "s.wav"
    sf.write(wav, speech, 16000, subtype="FLOAT")
    model = str(bert_dirs["adapter"])
    assert main(["transcribe", "--model", model, str(wav)]) == 0
    out = capsys.readouterr().out.strip()
    runner = load_model(ModelConfig(id=model, device="cpu"))
    cfg = Config()
    expected = text_of(stream_array(new_session(cfg, runner.vocab, geometry=runner.geometry), runner, speech))
    assert out.split() == expected.split() and out  # (one final a line)


def test_onnx_backend_refuses_wav2vec2_bert(bert_dirs):
    with pytest.raises(ModelLoadError, match="Wav2Vec2-BERT.*ONNX.*model.backend = 'torch'"):
        load_model(ModelConfig(id=str(bert_dirs["no-adapter"]), backend="onnxruntime", device="cpu"))


async def test_daemon_serves_a_wav2vec2_bert_model(daemon_factory, bert_dirs, speech):
    from streamer.transcribe import new_session, stream_array

    runner = load_model(ModelConfig(id=str(bert_dirs["adapter"]), device="cpu"))
    d = await daemon_factory(runner=runner)
    pcm = pcm16(speech)
    messages, _ = await native_session(d.port, pcm, limit_s=120)
    ready = messages[0]
    assert ready["type"] == "ready" and ready["schedule"]["window_samples"] == GRIDS["adapter"].schedule(
        d.cfg.stream).window_samples
    assert ready["schedule"]["hop_ms"] == d.cfg.stream.hop_ms
    finals = [m for m in messages if m["type"] == "final"]
    sent = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768  # the audio as the daemon received it
    expected = [e.to_dict() for e in stream_array(new_session(d.cfg, runner.vocab, None, geometry=runner.geometry),
                                                    runner, sent) if isinstance(e, Final)]
    assert finals and [f["text"] for f in finals] == [e["text"] for e in expected]
    assert [f["end"] for f in finals] == [e["end"] for e in expected]


def test_same_model_other_grid_is_not_schedule_equal():
    """A 40 ms schedule is not the 20 ms one with the same frame counts (the grid is part of the schedule)."""
    s20 = Schedule(20, 5, 8)
    s40 = dataclasses.replace(s20, frame_samples=640, receptive_field=560)
    assert s20 != s40 and s40.window_samples == 640 * 33 - 80 and s20.window_samples == 320 * 33 + 80
