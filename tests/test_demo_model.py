"""The shipped demo model: plain Hugging Face layout, loads with no network from any directory, transcribes
espeak-ng speech generated here to its exact text, and ``streamer eval`` runs on a generated manifest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamer.checkpoint import demo_model_dir
from streamer.testing import espeak

# Sentences in the demo model's vocabulary, spoken by espeak-ng's default en-us voice at 150 words/min.
SENTENCES = [
    "turn on the kitchen lights",
    "set a timer for twenty minutes",
    "add milk to the shopping list",
]

HF_FILES = ["config.json", "model.safetensors", "vocab.json", "tokenizer_config.json", "special_tokens_map.json",
            "preprocessor_config.json", "words.txt"]


def test_demo_checkpoint_layout():
    d = demo_model_dir()
    missing = [f for f in HF_FILES if not (d / f).is_file()]
    assert not missing, f"the shipped demo model in {d} lacks {missing}"
    assert sum(f.stat().st_size for f in d.iterdir() if f.is_file()) <= 20 * 2**20
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["feat_extract_norm"] == "layer" and cfg["do_stable_layer_norm"] is True
    vocab = json.loads((d / "vocab.json").read_text())
    assert vocab["<pad>"] == cfg["pad_token_id"] and "|" in vocab and "'" in vocab
    words = (d / "words.txt").read_text().split()
    assert len(words) >= 200
    for sentence in SENTENCES:
        assert set(sentence.split()) <= set(words)


def test_demo_model_transcribes_espeak_offline(tmp_path):
    """`streamer transcribe` with no --model, HF_HUB_OFFLINE=1, an empty HF cache, run from another directory."""
    wavs = [str(espeak(s, tmp_path / f"s{i}.wav")) for i, s in enumerate(SENTENCES)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "transcribe", "--device", "cpu", *wavs],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == SENTENCES


def test_eval_on_generated_manifest(tmp_path, capsys):
    from recipes.demo.data import write_manifest
    from streamer.cli import main

    manifest = write_manifest(tmp_path / "heldout", "test", 4, seed=0, jobs=2, augmented=False, progress=False)
    assert manifest.is_file() and len(manifest.read_text().splitlines()) == 4
    report = tmp_path / "results.jsonl"
    assert main(["eval", "--device", "cpu", "--jsonl", str(report), "--group-by", "voice", str(manifest)]) == 0
    out = capsys.readouterr().out
    rows = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(r"^(offline|streaming)\s+([\d.]+)%\s+([\d.]+)%",
                                                                  out, flags=re.M)}
    assert set(rows) == {"offline", "streaming"}, out
    assert "difference" in out
    assert re.search(r"decoding with the word list .*words\.txt \(\d+ words\)", out), out
    assert rows["offline"][1] < 25.0, out  # CER of a trained model, not a random one
    results = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(results) == 4 and all(Path(r["audio"]).is_file() for r in results)
    # --group-by: one row per voice of the manifest, with its utterance count
    table = out[out.index("\nvoice "):]
    voices = [r["voice"] for r in results]
    for v in set(voices):
        assert re.search(rf"^{re.escape(v)}\s+{voices.count(v)}\s+[\d.]+%\s+[\d.]+%$", table, flags=re.M), table
    assert main(["eval", "--device", "cpu", "--group-by", "speaker", str(manifest)]) == 1
    assert re.search(r"error: --group-by speaker: .*keys present: .*voice", capsys.readouterr().err)
    assert main(["eval", "--device", "cpu", "--no-streaming", "--limit", "1", "--set", "decoder.words=",
                 "--set", "decoder.lm=", str(manifest)]) == 0
    assert "decoding with greedy CTC (no word list)" in capsys.readouterr().out


def test_eval_reads_tsv_manifest(tmp_path):
    from streamer.evaluation import read_manifest
    from streamer.exceptions import ConfigError

    (tmp_path / "m.tsv").write_text("path\ttext\na.wav\thello there\n/abs/b.wav\tgood night\n")
    items = read_manifest(tmp_path / "m.tsv")
    assert [(str(i.audio), i.text) for i in items] == [(str(tmp_path / "a.wav"), "hello there"),
                                                      ("/abs/b.wav", "good night")]
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(ConfigError, match="bad.tsv:1"):
        read_manifest(tmp_path / "bad.tsv")


# Held-out utterances (test split, seed 0, as `python -m recipes.demo.data --split test --manifest` makes
# them) that start with a word whose first letter the model emits at the sound's onset, followed by ~0.6 s of
# CTC blanks before the rest of the word ("s ... et the lamps to white").
EARLY_ONSET = [8, 24, 109, 120, 130, 146, 147]


def _held_out(indices: list[int]) -> list[tuple[str, np.ndarray]]:
    from recipes.demo import data as D

    items = D.plan("test", max(indices) + 1, seed=0, unique=True)
    out = []
    for i in indices:
        utt, voice = items[i]
        audio = D.manifest_audio(D.synthesize_pcm(utt.text, voice), "test", i, seed=0)
        # as the WAV file holds it and streamer reads it back
        out.append((utt.text, (np.clip(audio, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768))
    return out


def test_default_endpointing_does_not_split_words_at_their_onset(model_runner, demo_words):
    """Endpoint rule 2 counts CTC blank frames as silence; blanks also fill words, so a rule that fires after
    0.6 s cut these words in two (two final events, "s" and "et ..."); the default must not.

    The cut shows with the plain word list (the demo LM reads "s" + "et" back into known words, hiding it), so
    the contrast runs on that list; the default rule must keep the offline text with the LM and without."""
    from streamer.config import DecoderConfig, load_config
    from streamer.decoder import build_decoder
    from streamer.evaluation import offline_text
    from streamer.transcribe import new_session, stream_array, text_of

    plain_words = build_decoder(DecoderConfig(lm=""), model_runner)
    split = 0
    for text, audio in _held_out(EARLY_ONSET):
        for words, runs in ((demo_words, ((None, True),)), (plain_words, ((None, True), (0.6, False)))):
            offline = offline_text(model_runner, audio, words)
            for after, expect_same in runs:
                cfg = load_config(None, [f"endpoint.silence_after_speech_s={after}"] if after else [])
                session = new_session(cfg, model_runner.vocab, words)
                streamed = text_of(stream_array(session, model_runner, audio))
                if expect_same:
                    assert streamed == offline, (text, offline, streamed)
                else:
                    split += streamed.split() != offline.split()
    assert split >= 3, "the 0.6 s rule no longer splits these onsets with the word list: pick new examples"


def test_final_comes_after_the_silence_not_after_the_lookahead(model_runner, demo_words, tmp_path):
    """Rule 2 counts blank look-ahead frames: with 2 s of look-ahead, the final of a sentence followed by
    silence arrives about silence_after_speech_s (+ one hop) after the last word, well before the final
    frames could reach that silence (last word + 0.8 s + 2 s)."""
    import soundfile as sf

    from streamer.config import load_config
    from streamer.events import Final
    from streamer.transcribe import new_session

    speech, rate = sf.read(espeak("turn on the kitchen lights", tmp_path / "s.wav"), dtype="float32")
    assert rate == 16000
    audio = np.concatenate([speech, np.zeros(4 * 16000, np.float32)])
    cfg = load_config(None, ["stream.lookahead_ms=2000", "endpoint.silence_after_speech_s=0.8",
                             "endpoint.vad=false"])  # rule 2 alone (the detector would end it 0.3 s after speech)
    session = new_session(cfg, model_runner.vocab, demo_words)
    arrived = None
    for i in range(0, len(audio), 1600):
        session.accept_audio(audio[i:i + 1600])
        windows = session.windows_to_run()
        for w, lp in zip(windows, model_runner.run([w.samples for w in windows]), strict=True):
            session.accept_result(w, lp)
        finals = [e for e in session.events_received() if isinstance(e, Final)]
        if finals:
            final, arrived = finals[0], (i + 1600) / 16000
            break
    assert arrived is not None, "no final within 4 s of silence"
    assert final.text == "turn on the kitchen lights" and final.reason == "silence"
    last_word_end = final.words[-1].end
    assert arrived < last_word_end + 0.8 + 2.0 - 0.3, (arrived, last_word_end)
    assert arrived >= last_word_end + 0.8  # not before the rule's silence


def test_readme_quickstart_prints_what_it_says(tmp_path):
    """The README's commands, run as written in an empty directory with no network: its first command's
    ``streamer transcribe --sample`` (the recording shipped in the package: nothing else needed) and its
    own-recording example (espeak-ng's default voice and rate, a 22.05 kHz file) print the words the README
    promises; its test command is ``bash .ci/run``, which installs the test dependencies and runs pytest."""
    from streamer.cli.transcribe import SAMPLE_TEXT

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    quick = re.search(r"^pip install (.+?) && streamer transcribe --sample\s+# -> (.+)$", readme, flags=re.M)
    say = re.search(r'^espeak-ng -w (\S+) "([^"]+)"', readme, flags=re.M)
    run = re.search(r"^streamer transcribe (\S+)\s+# -> (.+)$", readme, flags=re.M)
    assert quick and say and run and say[1] == run[1], "the README's quickstart lines changed shape"
    assert "torch==" in quick[1] and "[dev]" not in quick[1], "the first command installs the CPU torch, no extras"
    assert re.search(r"^bash \.ci/run$", readme, flags=re.M), "the README's test command is bash .ci/run"
    assert re.search(r"^exec \S+ -m pytest", (root / ".ci" / "run").read_text(), flags=re.M)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(["espeak-ng", "-w", say[1], say[2]], cwd=tmp_path, check=True)
    for args, promised in [("--sample", quick[2]), (run[1], run[2])]:
        proc = subprocess.run([sys.executable, "-m", "streamer", "transcribe", args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == promised.strip(), args
    assert quick[2].strip() == SAMPLE_TEXT == say[2]


def test_readme_daemon_lines_caption_the_sample(tmp_path):
    """The README's first screen: ``streamer serve`` in one terminal, ``clients/caption.py`` on the shipped sample
    in another, prints the line the README promises (the daemon on a free port here, not 8765)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert re.search(r"^streamer serve\s+# ws://127\.0\.0\.1:8765/v1/stream", readme, flags=re.M)
    caption = re.search(r"^python (clients/caption\.py) (\S+)\s+# -> (.+)$", readme, flags=re.M)
    assert caption, "the README's caption line changed shape"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    daemon = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--port", "0"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        assert daemon.stdout is not None
        for line in daemon.stdout:  # ends when the daemon exits: a daemon that never listens fails below
            if m := re.search(r"streamer: listening on (ws://\S+/v1/stream)", line):
                url = m[1]
                break
        assert url, "the daemon did not say where it listens"
        proc = subprocess.run([sys.executable, str(root / caption[1]), "--url", url, str(root / caption[2])],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == caption[3].strip()
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
