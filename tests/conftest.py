"""Shared fixtures: tiny Wav2Vec2ForCTC checkpoints built in the test session, espeak-ng speech."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

LETTERS = list("abcdefghijklmnopqrstuvwxyz'")


def make_tiny_model(path: Path, *, norm: str = "layer", pad_last: bool = False, seed: int = 0,
                    hidden: int = 32, layers: int = 2) -> Path:
    """Save a random tiny checkpoint in the Hugging Face layout and return its directory."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
    )

    tokens = ["|", *LETTERS, "<unk>"]
    tokens = [*tokens, "<pad>"] if pad_last else ["<pad>", *tokens]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    tok = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                               word_delimiter_token="|")
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=(norm == "layer"))
    cfg = Wav2Vec2Config(
        vocab_size=len(tokens), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, conv_dim=(16,) * 7, feat_extract_norm=norm,
        do_stable_layer_norm=(norm == "layer"), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        pad_token_id=tok.pad_token_id, ctc_loss_reduction="mean",
    )
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(cfg)
    with torch.no_grad():  # spread the logits so that argmax is decisive
        model.lm_head.weight.normal_(0, 2.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    fe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four tiny checkpoints: layer/group norm x pad first/last."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for norm in ("layer", "group"):
        for pad_last in (False, True):
            name = f"{norm}-pad{'last' if pad_last else 'first'}"
            out[name] = make_tiny_model(root / name, norm=norm, pad_last=pad_last, seed=len(out))
    return out


def espeak(text: str, path: Path, *, voice: str = "en-us", speed: int = 150, rate: int = 16000) -> Path:
    """Speak ``text`` into a WAV file at ``rate`` Hz (espeak-ng, resampled with soxr)."""
    import soundfile as sf
    import soxr

    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed; `apt-get install espeak-ng` (.ci/run does it)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    audio, sr = sf.read(raw, dtype="float32")
    raw.unlink()
    if sr != rate:
        audio = soxr.resample(audio, sr, rate)
    sf.write(path, audio, rate)
    return path


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """About six seconds of espeak-ng speech at 16 kHz, with pauses."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("speech")
    parts = []
    for i, text in enumerate(["turn on the kitchen lights", "set a timer for twenty minutes"]):
        audio, _ = sf.read(espeak(text, root / f"{i}.wav"), dtype="float32")
        parts += [audio, np.zeros(8000, dtype=np.float32)]
    return np.concatenate(parts)


# --- the daemon, in-process, on port 0 -------------------------------------------------------


@pytest.fixture(scope="session")
def model_runner():
    """The model the daemon tests use: the shipped demo model, loaded once per session."""
    from streamer.config import ModelConfig
    from streamer.model import load_model

    return load_model(ModelConfig(id="demo", device="cpu"))


@pytest.fixture
async def daemon_factory(model_runner):
    """``await make("server.max_streams=2", ...)`` starts a Daemon on a free loopback port."""
    from streamer.aio.server import Daemon
    from streamer.config import load_config

    daemons = []

    async def make(*overrides, runner=None, services=()):
        cfg = load_config(None, ["server.port=0", "server.host='127.0.0.1'", *overrides])
        d = Daemon(cfg, runner or model_runner)
        d.services.extend(services)
        await d.start()
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        await d.shutdown()


def pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> s16le bytes."""
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
