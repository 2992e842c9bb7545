"""``streamer transcribe`` end to end: real audio files, tiny model, every output format, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from streamer.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return str(tiny_models["layer-padlast"])


@pytest.fixture(scope="module")
def wav16(tmp_path_factory, speech):
    path = tmp_path_factory.mktemp("cli") / "speech16.wav"
    sf.write(path, speech, 16000, subtype="PCM_16")
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cer(hyp: str, ref: str) -> float:
    from streamer.cli.bench import cer as bench_cer

    return bench_cer(hyp, ref)


def test_jsonl_events(capsys, model_dir, wav16):
    code, out, _ = run_cli(capsys, "transcribe", "--model", model_dir, "--format", "jsonl", str(wav16))
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["type"] for e in events} == {"partial", "final"}
    finals = [e for e in events if e["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    for e in events:
        assert set(e) >= {"type", "segment", "text", "start", "end", "words"}
    for f in finals:
        assert f["text"] and f["words"]
        assert set(f["words"][0]) == {"word", "start", "end", "conf"}
    code, text, _ = run_cli(capsys, "transcribe", "--model", model_dir, str(wav16))
    assert text.strip() == " ".join(f["text"] for f in finals)


def test_chunk_size_does_not_change_the_text(capsys, model_dir, wav16):
    outs = {run_cli(capsys, "transcribe", "--model", model_dir, "--chunk-ms", ms, str(wav16))[1]
            for ms in ("20", "100", "730")}
    assert len(outs) == 1


def test_srt_and_vtt(capsys, model_dir, wav16):
    _, srt, _ = run_cli(capsys, "transcribe", "--model", model_dir, "-f", "srt", str(wav16))
    _, vtt, _ = run_cli(capsys, "transcribe", "--model", model_dir, "-f", "vtt", str(wav16))
    assert srt.startswith("1\n00:00:0") and " --> " in srt and "," in srt.splitlines()[1]
    assert vtt.startswith("WEBVTT\n\n00:00:0") and "." in vtt.splitlines()[2]


def test_stereo_44k_matches_mono_16k(capsys, model_dir, wav16, tmp_path, speech):
    import soxr

    stereo = soxr.resample(speech, 16000, 44100)
    path = tmp_path / "speech44.flac"
    sf.write(path, np.stack([stereo, stereo * 0.9], axis=1), 44100)
    _, a, _ = run_cli(capsys, "transcribe", "--model", model_dir, str(wav16))
    _, b, _ = run_cli(capsys, "transcribe", "--model", model_dir, str(path))
    assert cer(b.strip(), a.strip()) < 0.15


def test_set_override_changes_schedule(capsys, model_dir, wav16):
    _, base, _ = run_cli(capsys, "transcribe", "--model", model_dir, "-f", "jsonl", str(wav16))
    _, fast, _ = run_cli(capsys, "transcribe", "--model", model_dir, "-f", "jsonl",
                         "--set", "stream.hop_ms=100", str(wav16))
    assert len(fast.splitlines()) > len(base.splitlines())  # more, smaller steps: more partials


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.wav", "no such file"),
        (lambda p: _write(p / "empty.wav", b""), "cannot read audio"),
        (lambda p: _write(p / "junk.wav", b"RIFFxxxxjunk" * 10), "cannot read audio"),
        (lambda p: sf.write(p / "zero.wav", np.zeros(0), 16000) or p / "zero.wav", "holds no audio samples"),
        (lambda p: sf.write(p / "nan.wav", np.array([0.1, np.nan, np.inf] * 100), 16000, subtype="FLOAT")
         or p / "nan.wav", "NaN or infinite"),
    ],
    ids=["missing", "empty", "junk", "zero-samples", "nan"],
)
def test_bad_audio_is_a_clear_error(capsys, model_dir, tmp_path, make, message):
    code, out, err = run_cli(capsys, "transcribe", "--model", model_dir, str(make(tmp_path)))
    assert code == 1
    assert message in err and "Traceback" not in err
    assert err.startswith("streamer transcribe: error: ")


def test_bad_config_and_model_are_clear_errors(capsys, wav16, tmp_path):
    code, _, err = run_cli(capsys, "transcribe", "--set", "stream.hop_ms=-5", str(wav16))
    assert code == 1 and "stream.hop_ms = -5 is too small" in err
    code, _, err = run_cli(capsys, "transcribe", "--model", str(tmp_path / "nope"), str(wav16))
    assert code == 1 and "does not exist" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "transcribe", "--model", str(broken), str(wav16))
    assert code == 1 and "cannot load the checkpoint" in err and "save_pretrained" in err


def test_words_option_picks_the_word_list(capsys, wav16, tmp_path):
    """--words FILE restricts the demo model's transcript to FILE's words; --words none spells letter by letter."""
    listed = ["turn", "on", "the", "lights", "set", "a", "timer", "for", "twenty", "minutes"]
    words = tmp_path / "my words.txt"  # a space in the path, quoted into the override
    words.write_text("\n".join(listed) + "\n")
    code, out, err = run_cli(capsys, "transcribe", "--device", "cpu", "--words", str(words), str(wav16))
    assert code == 0, err
    assert out.split() and set(out.split()) <= set(listed) and "timer" in out.split()
    code, greedy, err = run_cli(capsys, "transcribe", "--device", "cpu", "--words", "none", str(wav16))
    assert code == 0 and "kitchen" in greedy.split()  # the speech says it; no list keeps it out
    code, _, err = run_cli(capsys, "transcribe", "--device", "cpu", "--words", str(tmp_path / "no.txt"), str(wav16))
    assert code == 1 and "decoder.words" in err and "no such file" in err
    words.write_text("naïve\n")
    code, _, err = run_cli(capsys, "transcribe", "--device", "cpu", "--words", str(words), str(wav16))
    assert code == 1 and "'naïve'" in err and "cannot be spelled" in err


def test_hub_id_offline_is_a_clear_error(wav16, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "transcribe", "--model", "someone/wav2vec2-xlsr-test", str(wav16)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in proc.stderr
    assert "huggingface-cli download someone/wav2vec2-xlsr-test" in proc.stderr


def test_bench_reports_early_partials_and_refreshes_with_their_gain(capsys, wav16):
    """`streamer bench` on the demo model: the early and refresh windows' counts and model seconds, and the
    partial delay with refreshes below the one without; the same finals (agreement) either way."""
    import re

    code, out, _ = run_cli(capsys, "bench", "--model", "demo", "--audio", str(wav16), "--no-pipeline")
    assert code == 0
    rows = {m[1].strip(): m[2] for m in re.finditer(r"^( *[a-z][a-z ]+?)\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+([\d.]+) %",
                                                    out, re.M)}
    assert rows["streaming engine"] == rows["no partial refreshes"] == rows["no early partials"]
    early = re.search(r"early partials every 400 ms: (\d+) provisional windows, ([\d.]+) model s", out)
    assert early and int(early[1]) > 0 and float(early[2]) > 0
    m = re.search(r"partial refreshes every 200 ms: (\d+) refresh windows, ([\d.]+) model s .*? words show in partials "
                  r"([\d.]+) / ([\d.]+) s \(p50 / p95\) of audio after their end, ([\d.]+) / ([\d.]+) s without", out)
    assert m, out
    n, seconds, p50, p95, p50_off, p95_off = int(m[1]), *map(float, m.groups()[1:])
    hops = len(sf.read(wav16)[0]) / 16000 / 0.4
    assert 0.5 * hops < n < hops and seconds > 0  # about one refresh between two full windows
    assert p95 < p95_off and p50 <= p50_off
