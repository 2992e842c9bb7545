"""The demo model's training recipe: streaming windows cut on the engine's frame grid, the consistency loss
that ties each window's output to the whole-utterance output, and a tiny end-to-end run (reproducible,
resumable, written in the Hugging Face layout that ``streamer`` loads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.demo import data as D
from recipes.demo import train as T
from streamer.config import StreamConfig
from streamer.engine import FRAME_SAMPLES, RECEPTIVE_FIELD, n_frames


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> T.Corpus:
    d = tmp_path_factory.mktemp("espeak") / "train"
    D.generate(d, "train", 12, seed=5, jobs=2, progress=False)
    return T.Corpus(d)


def test_windows_lie_on_the_engine_grid():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2000, 80000, 500)
    start, size = T.sample_windows(lengths, rng, (50, 200))
    assert np.all(start % FRAME_SAMPLES == 0)
    assert np.all(start + size <= lengths)
    full = size < lengths - start  # not cut short by the row's end
    frames = (size[full] - (RECEPTIVE_FIELD - FRAME_SAMPLES)) / FRAME_SAMPLES
    assert np.all(frames == np.round(frames)) and frames.min() >= 50 and frames.max() <= 200
    assert np.mean(start == 0) > 0.15  # a stream's first windows are trained on too
    # the default schedule's steady-state window is one of the shapes drawn
    default = StreamConfig().schedule()
    assert 50 <= default.left + default.hop + default.lookahead <= 200


def test_window_frames_map_to_the_whole_utterance_frames(corpus):
    """With the shipped model: a window that is the whole row reproduces the whole pass exactly, and each
    window's frames line up with the frames of the whole pass that see the same samples (a shift by one
    frame makes the two disagree far more)."""
    from transformers import Wav2Vec2ForCTC

    from streamer.checkpoint import demo_model_dir

    model = Wav2Vec2ForCTC.from_pretrained(demo_model_dir()).eval()
    rng = np.random.default_rng(1)
    batch = T.make_batch(corpus, np.arange(len(corpus)), rng, (0.0, 0.5), (50, 120))
    x, mask, _, augmented = T.to_inputs(batch, torch.device("cpu"), augment=True)
    with torch.inference_mode():
        whole = model(x, attention_mask=mask).logits
        wx, wmask, frames, weight = T.window_inputs(augmented, batch, min_right=10)
        assert wx.shape[0] == len(corpus) and int(wmask.sum()) == int(batch["windows"][1].sum())
        win = model(wx, attention_mask=wmask).logits
        aligned = float(T.consistency_loss(whole, win, frames, weight))
        shifted = [float(T.consistency_loss(whole, win, (frames + s).clamp_min(0), weight)) for s in (-1, 1)]
        assert aligned < 0.2 * min(shifted), (aligned, shifted)

        batch["windows"] = (np.zeros(len(corpus), np.int64), batch["lengths"].copy())
        wx, wmask, frames, weight = T.window_inputs(augmented, batch, min_right=10)
        assert torch.equal(wx, x) and torch.equal(wmask, mask)
        assert weight.sum(1).tolist() == [n_frames(int(n)) for n in batch["lengths"]]
        assert float(T.consistency_loss(whole, model(wx, attention_mask=wmask).logits, frames, weight)) < 1e-6


def test_consistency_loss_leaves_out_the_right_edge():
    lengths = np.array([32000, 32000])
    batch = {"lengths": lengths, "windows": (np.array([0, 32000 - 8080]), np.array([8080, 8080]))}
    _, _, frames, weight = T.window_inputs(torch.zeros(2, 32000), batch, min_right=10)
    assert frames[1, 0] == (32000 - 8080) // FRAME_SAMPLES
    assert weight[0].sum() == 25 - 10  # a window inside the utterance: its last 10 frames do not count
    assert weight[1].sum() == 25  # a window that ends with the utterance: all of them count
    teacher = torch.randn(2, 100, 30)
    student = torch.gather(teacher, 1, frames[:, :, None].expand(-1, -1, 30))
    assert float(T.consistency_loss(teacher, student, frames, weight)) < 1e-6
    assert float(T.consistency_loss(teacher, student.flip(-1), frames, weight)) > 0.1


TINY = ["--conv-dim", "16", "--hidden", "32", "--layers", "1", "--heads", "2", "--ffn", "64",
        "--train-utts", "16", "--dev-utts", "4", "--jobs", "2", "--batch-seconds", "8", "--time-budget", "0",
        "--warmup-steps", "2", "--threads", "1", "-q"]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(d / "model.safetensors")


def test_tiny_training_run_is_reproducible_resumable_and_loadable(tmp_path):
    from streamer.config import DecoderConfig, ModelConfig
    from streamer.decoder import build_decoder
    from streamer.model import load_model

    data = tmp_path / "data"
    assert T.main([*TINY, "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    assert T.main([*TINY, "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # fixed seed: same weights

    # resume the first run for a second epoch
    assert T.main([*TINY, "--data", str(data), "--epochs", "2", "--resume", "--out", str(tmp_path / "a")]) == 0
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    assert info["history"][1]["step"] > info["history"][0]["step"]
    assert all(h["dev_wer_words"] >= 0 and h["dev_wer"] >= 0 for h in info["history"])  # greedy and word list
    assert (tmp_path / "a" / "curve.png").stat().st_size > 1000

    loaded = load_model(ModelConfig(id=str(tmp_path / "a"), device="cpu"))
    assert loaded.vocab.blank_id == 0
    words = build_decoder(DecoderConfig(), loaded)
    assert words is not None and "kitchen" in words.words  # its words.txt comes along
    out = loaded.run([np.zeros(16000, np.float32)])
    assert out[0].shape == (n_frames(16000), len(T.VOCAB))
