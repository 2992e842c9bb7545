"""Backends behind the runner: torch float32/bfloat16/int8 and ONNX Runtime float32/int8, `streamer export`.

What is checked against torch float32 (the reference):
- float32 backends (ONNX Runtime): every log-probability within ``FLOAT_ATOL`` and the same argmax everywhere.
- int8 on the tiny random checkpoints: the frame argmax agrees on at least ``AGREE_DECISIVE`` of
  the frames where torch float32 is decisive (its best token ahead of the second by ``DECISIVE`` nats; 40-70 %
  of the frames) and on ``AGREE_ALL`` of all frames. A random model has frames whose two best tokens are nearly
  tied, which no 8-bit arithmetic keeps apart, and int8 kernels differ by CPU and by onnxruntime release, so
  these bounds are set below the spread measured, not at it (see ``AGREE_DECISIVE``); a quantiser or export
  that breaks a model lands far below them (a layer mis-scaled changes most frames).
- the trained demo model, what users run: bfloat16 and int8 keep the argmax of at least ``AGREE_DEMO`` of all
  its frames, int8 transcribes the README's sentence, and the WER gate of ``streamer eval --compare-backend``
  passes it.
- every backend and dtype: finals (frame ids, texts, spans) independent of how the audio arrives.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import pcm16

from streamer.config import ModelConfig
from streamer.engine import Schedule, StreamSession, reference, run_session
from streamer.events import Final
from streamer.exceptions import ConfigError, ModelLoadError
from streamer.model import load_model
from streamer.onnx import EXPORT_INFO, FLOAT_FILE, INT8_FILE, export

MODELS = ["layer-padfirst", "layer-padlast", "group-padfirst", "group-padlast"]
CONFIGS = [("onnxruntime", "float32"), ("torch", "bfloat16"), ("torch", "int8"), ("onnxruntime", "int8")]
TINY_CONFIGS = [c for c in CONFIGS if c != ("torch", "bfloat16")]
"""what the tiny random models' outputs are compared in. Not torch bfloat16: on a CPU with AMX, oneDNN's bfloat16
kernels keep the argmax of only 84 % of a random model's decisive frames (100 % with oneDNN off,
``torch.backends.mkldnn.flags(enabled=False)``; at least 99 % on the CPUs without AMX that ran it before), while
the trained demo model keeps 100 % of its frames there: bfloat16 is held to the demo model, which is what users run."""
FLOAT_ATOL = 3e-3
"""largest log-probability difference of a float32 backend from torch float32 (measured, group norm: 8e-4 with
onnxruntime 1.32, 2.03e-3 in one of 20,460 values with 1.18.1, the lowest version pyproject.toml allows)"""
DECISIVE = 2.0
"""a frame is decisive when torch float32 puts its best token this many nats ahead of the second"""
AGREE_DECISIVE = 0.95
"""least share of decisive frames whose int8 argmax equals torch float32's, on the tiny random models.
Measured per model and int8 backend (``python`` over :func:`windows_of` of ``speech``, the four tiny models):
onnxruntime 1.20.1, 1.28.0 and 1.32.0 on an Intel CPU with AMX and VNNI: 100 %; onnxruntime 1.24.4 there:
97.2-97.4 %; 1.32.0 on another machine of this kind: 98.9 %. torch int8: 100 % here."""
AGREE_DEMO = 0.98
"""least share of the trained demo model's frames that agree (measured: onnxruntime int8 99.3 % with 1.24.4,
99.6 % with 1.32.0; its text is checked apart, exactly)"""
AGREE_ALL = 0.92
"""least share of all frames that agree (measured as above: 97.5-99.1 %, 95.5-96.3 % with 1.24.4, 94.9 % on
the other machine)"""
SCHEDULE = Schedule(left=40, hop=10, lookahead=16)
SENTENCE = "turn on the kitchen lights"


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory):
    """Exports made on first use go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def runner_of(tiny_models, onnx_cache):
    """``runner_of(model, backend, dtype)``: one runner per combination, loaded once (exports cached)."""
    cache = {}

    def get(model, backend, dtype):
        key = (model, backend, dtype)
        if key not in cache:
            cache[key] = load_model(ModelConfig(id=str(tiny_models[model]), device="cpu", backend=backend,
                                                dtype=dtype))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory, onnx_cache):
    out = tmp_path_factory.mktemp("demo") / "onnx"
    export("demo", out)
    return out


@pytest.fixture(scope="module")
def exported_tiny(tiny_models, tmp_path_factory, onnx_cache):
    """An export directory of one tiny checkpoint, made from a copy of it (tests change the copy)."""
    root = tmp_path_factory.mktemp("tiny-export")
    source = Path(shutil.copytree(tiny_models["layer-padfirst"], root / "checkpoint"))
    export(str(source), root / "onnx")
    return source, root / "onnx"


def windows_of(speech):
    """Windows of the lengths the engine sends: the shortest one that yields a frame, short tails, full windows."""
    full = SCHEDULE.window_samples
    return [speech[:400], speech[1000:1480], speech[2000:2720], speech[5000:5000 + 3 * 16000],
            *(speech[i : i + full] for i in range(0, len(speech) - full, 5 * 3200)), speech]


def compare(ref, out, dtype):
    assert [a.shape for a in ref] == [b.shape for b in out]
    ref, out = np.concatenate(ref), np.concatenate(out)
    if dtype == "float32":
        np.testing.assert_allclose(out, ref, rtol=0, atol=FLOAT_ATOL)
        assert (out.argmax(-1) == ref.argmax(-1)).all()
        return 1.0
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= DECISIVE
    agree = out.argmax(-1) == ref.argmax(-1)
    assert decisive.mean() > 0.3
    assert agree[decisive].mean() >= AGREE_DECISIVE, f"{agree[decisive].mean():.4f} of {decisive.sum()} decisive"
    assert agree.mean() >= AGREE_ALL, f"{agree.mean():.4f} of {len(agree)} frames"
    return float(agree.mean())


@pytest.mark.parametrize(("backend", "dtype"), TINY_CONFIGS, ids=[f"{b}-{d}" for b, d in TINY_CONFIGS])
@pytest.mark.parametrize("model", MODELS)
def test_outputs_against_torch_float32(runner_of, speech, model, backend, dtype):
    runner = runner_of(model, backend, dtype)
    assert (runner.backend, runner.precision) == (backend, dtype)
    windows = windows_of(speech)
    compare(runner_of(model, "torch", "float32").run(windows), runner.run(windows), dtype)


def test_demo_model_agrees_on_speech_in_every_backend(model_runner, demo_export, speech):
    """The trained model: bfloat16 and int8 keep the argmax of at least ``AGREE_DEMO`` of all frames."""
    windows = windows_of(speech)
    ref = model_runner.run(windows)
    for backend, dtype in CONFIGS:
        cfg = ModelConfig(id=str(demo_export) if backend == "onnxruntime" else "demo", device="cpu", dtype=dtype)
        runner = load_model(cfg)
        assert runner.backend == backend
        out = runner.run(windows)
        agree = compare(ref, out, dtype)
        assert agree >= AGREE_DEMO, (backend, dtype, agree)


def streamed(runner, audio, chunks):
    session = StreamSession(SCHEDULE, runner.vocab, None, record_frames=True)
    events = []
    i = 0
    for n in chunks:
        session.accept_audio(audio[i : i + n])
        i += n
        run_session(session, runner.run)
        events += session.events_received()
        if i >= len(audio):
            break
    session.finish()
    run_session(session, runner.run)
    events += session.events_received()
    return session.frame_ids, [e for e in events if isinstance(e, Final)]


@pytest.mark.parametrize(("backend", "dtype"), CONFIGS, ids=[f"{b}-{d}" for b, d in CONFIGS])
@pytest.mark.parametrize("model", MODELS)
def test_finals_do_not_depend_on_arrival(runner_of, speech, model, backend, dtype):
    runner = runner_of(model, backend, dtype)
    audio = speech[: 16000 * 4 + 77]
    ref_ids, ref_finals = reference(audio, runner.run, SCHEDULE, runner.vocab)
    rng = np.random.default_rng(7)
    for chunks in ([320] * len(audio), rng.integers(1, 8001, len(audio)).tolist()):
        ids, finals = streamed(runner, audio, chunks)
        assert ids == ref_ids
        assert [(f.text, f.segment, f.start, f.end) for f in finals] == [
            (f.text, f.segment, f.start, f.end) for f in ref_finals]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_an_int8_window_does_not_depend_on_its_batch(runner_of, speech, backend):
    """Dynamic int8 scales a call's activations as a whole: int8 runners call the model once per window."""
    runner = runner_of("layer-padfirst", backend, "int8")
    assert runner.per_window and runner.max_batch == 1
    full = SCHEDULE.window_samples
    windows = [speech[i : i + full] for i in (0, 16000, 32000)]
    windows[1] = windows[1] * 20  # a loud neighbour would change a shared scale
    alone = runner.run(windows[:1])[0]
    np.testing.assert_array_equal(runner.run(windows)[0], alone)
    assert runner_of("layer-padfirst", "onnxruntime", "float32").max_batch == 64


def test_small_models_stay_float32_under_auto(tiny_models):
    runner = load_model(ModelConfig(id=str(tiny_models["group-padlast"]), device="cpu"))
    assert (runner.backend, runner.precision) == ("torch", "float32")


def test_demo_onnx_int8_transcribes_the_readme_sentence(demo_export, tmp_path, capsys):
    from streamer.cli import main
    from streamer.config import Config
    from streamer.decoder import build_decoder
    from streamer.evaluation import offline_text
    from streamer.testing import espeak, espeak_audio
    from streamer.transcribe import new_session, stream_array, text_of

    runner = load_model(ModelConfig(id=str(demo_export), dtype="int8"))
    assert (runner.backend, runner.precision) == ("onnxruntime", "int8")
    words = build_decoder(Config().decoder, runner)
    assert words is not None and runner.shipped_file("words.txt") == demo_export / "words.txt"
    audio = espeak_audio(SENTENCE)
    assert offline_text(runner, audio, words) == SENTENCE
    assert offline_text(runner, audio, None) == SENTENCE  # greedy too
    session = new_session(Config(), runner.vocab, words)
    assert " ".join(text_of(stream_array(session, runner.run, audio, 1600)).split()) == SENTENCE
    wav = espeak(SENTENCE, tmp_path / "s.wav")
    assert main(["transcribe", "--model", str(demo_export), "--set", "model.dtype=int8", str(wav)]) == 0
    assert capsys.readouterr().out.strip() == SENTENCE


def test_eval_compare_backend_int8_within_half_a_point(demo_export, tmp_path, capsys):
    from recipes.demo.data import write_manifest
    from streamer.cli import main

    manifest = write_manifest(tmp_path / "m", "test", 40, seed=0, jobs=2, progress=False)
    args = ["eval", "--model", str(demo_export), "--device", "cpu", "--no-streaming", "--compare-backend",
            "onnxruntime:int8", "--max-wer-increase", "0.5", str(manifest)]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(torch float32|onnxruntime int8 on cpu)\s+([\d.]+)%", out, flags=re.M))
    assert set(rows) == {"torch float32", "onnxruntime int8 on cpu"}, out
    assert float(rows["onnxruntime int8 on cpu"]) - float(rows["torch float32"]) <= 0.5, out
    assert float(rows["torch float32"]) < 15.0, out  # a trained model on its own kind of speech
    agree = float(re.search(r"frame agreement with torch float32 \(offline argmax\): ([\d.]+) %", out)[1])
    assert agree >= 99.0, out
    assert "gate: WER" in out and "passed" in out
    assert main(["eval", "--compare-backend", "onnxruntime:bfloat16", str(manifest)]) == 1
    assert "--compare-backend onnxruntime:bfloat16: model.dtype = 'bfloat16' is not available" in (
        capsys.readouterr().err)


def test_export_round_trip(tiny_models, tmp_path, capsys):
    """Export, reuse, load by directory; a changed checkpoint makes the export stale until it is made anew."""
    import onnxruntime as ort

    from streamer.cli import main

    source = Path(shutil.copytree(tiny_models["group-padlast"], tmp_path / "checkpoint"))
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(source), "--out", str(out), "--set", "stream.hop_ms=500"]) == 0
    assert capsys.readouterr().out.startswith(f"exported: {out}\n")
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["source"] == str(source.resolve()) and info["window_samples"] == 320 * (80 + 25 + 50 - 1) + 400
    assert info["check"]["float32_max_logprob_diff"] < 1e-3
    for name in (FLOAT_FILE, INT8_FILE, "config.json", "vocab.json", "preprocessor_config.json"):
        assert (out / name).is_file()
    session = ort.InferenceSession(str(out / FLOAT_FILE), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", "samples"]  # dynamic axes
    # made once: the same command reuses it
    assert main(["export", "--model", str(source), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"up to date (reused): {out}\n")
    assert json.loads((out / EXPORT_INFO).read_text())["created"] == info["created"]
    # loaded by directory like a checkpoint: model.backend = "auto" sees the export
    runner = load_model(ModelConfig(id=str(out)))
    assert (runner.backend, runner.precision, runner.n_parameters) == ("onnxruntime", "float32", info["n_parameters"])
    torch_runner = load_model(ModelConfig(id=str(source), device="cpu", dtype="float32"))
    audio = np.random.default_rng(0).normal(0, 0.1, 20000).astype(np.float32)
    np.testing.assert_allclose(runner.run([audio])[0], torch_runner.run([audio])[0], rtol=0, atol=FLOAT_ATOL)

    # the checkpoint changes: the export is refused as stale, with the command that makes it anew
    original = (source / "config.json").read_text()
    changed = json.dumps(json.loads(original) | {"streamer_note": "changed"})
    (source / "config.json").write_text(changed)
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(out))} is stale: its checkpoint .* has changed since "
                       rf"it was exported .*; export it again: streamer export -m {re.escape(str(source.resolve()))} "
                       rf"--out {re.escape(str(out))}$"):
        load_model(ModelConfig(id=str(out)))
    (source / "config.json").write_text(original)  # the same contents, a new modification time: not stale
    load_model(ModelConfig(id=str(out)))
    (source / "config.json").write_text(changed)
    assert main(["export", "--model", str(source), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"exported: {out}\n")
    assert load_model(ModelConfig(id=str(out))).backend == "onnxruntime"


def test_exports_made_on_first_use_are_cached(tiny_models, tmp_path, caplog):
    """model.backend = "onnxruntime" on a torch checkpoint: exported once into the cache, made anew when it changes."""
    from streamer.onnx import cached_export_dir

    source = Path(shutil.copytree(tiny_models["group-padfirst"], tmp_path / "checkpoint"))
    cfg = ModelConfig(id=str(source), backend="onnxruntime", dtype="int8")
    with caplog.at_level("WARNING", logger="streamer.onnx"):
        runner = load_model(cfg)
    assert runner.source == str(cached_export_dir(str(source)))
    assert [r.message for r in caplog.records if "exporting" in r.message]
    created = json.loads((Path(runner.source) / EXPORT_INFO).read_text())["created"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="streamer.onnx"):
        load_model(cfg)
    assert not caplog.records
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"streamer_note": "changed"}))
    with caplog.at_level("WARNING", logger="streamer.onnx"):
        load_model(cfg)
    assert any("is stale" in r.message and "exporting it again" in r.message for r in caplog.records)
    assert json.loads((Path(runner.source) / EXPORT_INFO).read_text())["created"] != created


def _broken(exported_tiny, tmp_path, damage):
    _, out = exported_tiny
    d = Path(shutil.copytree(out, tmp_path / "broken"))
    damage(d)
    return d


def test_missing_or_broken_exports_say_how_to_fix_them(exported_tiny, tmp_path, capsys):
    from streamer.cli import main

    source, out = exported_tiny
    again = rf"export it again: streamer export -m {re.escape(str(source.resolve()))} --out "

    def fails(d, match, **cfg):
        with pytest.raises(ModelLoadError, match=match):
            load_model(ModelConfig(id=str(d), **cfg))

    d = _broken(exported_tiny, tmp_path / "1", lambda d: (d / EXPORT_INFO).unlink())
    fails(d, rf"holds model\.onnx but no {EXPORT_INFO}: it was not written by `streamer export`, or the export was "
          r"cut short; export the checkpoint again: streamer export -m CHECKPOINT --out ")
    d = _broken(exported_tiny, tmp_path / "2", lambda d: (d / FLOAT_FILE).unlink())
    fails(d, rf"model\.onnx is missing: the export is broken; {again}")
    d = _broken(exported_tiny, tmp_path / "3",
                lambda d: (d / INT8_FILE).write_bytes((d / INT8_FILE).read_bytes()[:999]))
    fails(d, rf"model\.int8\.onnx has 999 bytes, not the \d+ it was exported with: the export is broken; {again}",
          dtype="int8")
    d = _broken(exported_tiny, tmp_path / "4",
                lambda d: (d / FLOAT_FILE).write_bytes(b"\x00garbage" * ((d / FLOAT_FILE).stat().st_size // 8)
                                                       + b"\x00" * ((d / FLOAT_FILE).stat().st_size % 8)))
    fails(d, rf"cannot load the ONNX export in .*; the export is broken: {again}")
    d = _broken(exported_tiny, tmp_path / "5", lambda d: (d / EXPORT_INFO).write_text(
        (d / EXPORT_INFO).read_text().replace('"options_key": "', '"options_key": "x')))
    fails(d, rf"was exported by another version of streamer, with other options; {again}")
    d = _broken(exported_tiny, tmp_path / "6", lambda d: (d / EXPORT_INFO).write_text("{"))
    fails(d, r"streamer-export\.json is unreadable .*; export the checkpoint again")
    fails(out, r"is an ONNX export \(model\.onnx, no torch weights\); set model\.backend = 'onnxruntime'",
          backend="torch")
    fails(tmp_path / "nowhere", r"model directory .* does not exist", backend="onnxruntime")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match=r"exists and is not a streamer export; choose a new or empty directory"):
        export(str(source), tmp_path / "other")
    with pytest.raises(ConfigError, match=r"model\.dtype = 'bfloat16' is not available with model\.backend = "
                       r"'onnxruntime'; use 'auto' \(float32\), 'float32' or 'int8'"):
        ModelConfig(backend="onnxruntime", dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"model\.dtype = 'int8' runs on the CPU, not model\.device = 'cuda'"):
        ModelConfig(device="cuda", dtype="int8")
    # on the command line: one line on stderr, exit status 1
    import soundfile as sf

    sf.write(tmp_path / "x.wav", np.zeros(16000, np.float32), 16000)
    assert main(["transcribe", "--model", str(tmp_path / "2" / "broken"), str(tmp_path / "x.wav")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("streamer transcribe: error: ") and "model.onnx is missing" in err


async def test_the_daemon_serves_through_onnxruntime(daemon_factory, demo_export, speech):
    from test_server import finals_of, native_session

    runner = load_model(ModelConfig(id=str(demo_export), dtype="int8"))
    d = await daemon_factory(f"model.id='{demo_export}'", "model.backend='onnxruntime'", "model.dtype='int8'",
                             runner=runner)
    messages, code = await native_session(d.port, pcm16(speech))
    assert code == 1000 and messages[0]["type"] == "ready" and messages[-1]["type"] == "end"
    assert any(m["type"] == "partial" for m in messages)
    assert [m["text"] for m in finals_of(messages)] == [SENTENCE, "set a timer for twenty minutes"]
