"""Helpers for tests and benchmarks: random/tiny Wav2Vec2ForCTC checkpoints built from a config with
``save_pretrained``, and espeak-ng speech. Nothing here is used by the daemon.

Checkpoints: :func:`random_model` draws a ``Wav2Vec2ForCTC`` of a :class:`ModelShape` over a character
vocabulary, :func:`processor` makes the tokenizer and feature extractor that go with it, and
:func:`save_checkpoint` writes the three in the plain Hugging Face layout that ``streamer`` loads. The test
suite's tiny models (:func:`make_tiny_model`), the benchmarks' random models of real shapes
(:data:`RANDOM_SIZES`, :func:`save_random_model`, :func:`random_runner`) and the demo recipe's model
(``recipes/demo/train.py``) are all built this way. Wav2Vec2-BERT checkpoints (``Wav2Vec2BertForCTC`` with its
``SeamlessM4TFeatureExtractor``) come from :func:`random_bert_model` / :func:`bert_processor`:
:func:`make_tiny_bert_model` for the tests, ``RANDOM_SIZES["w2v-bert-2.0"]`` (:class:`BertShape`) for benchmarks.

Speech: :func:`espeak_audio` runs espeak-ng (``$STREAMER_ESPEAK`` or ``espeak-ng`` on the path) and resamples
its 22050 Hz output with soxr; :func:`espeak` writes it to a WAV file, :func:`speech_audio` strings sentences
together to a given length.

Benchmarks: :func:`proc_cpu_seconds` reads a process's or thread's CPU time from ``/proc``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamer.engine import SAMPLE_RATE
from streamer.exceptions import StreamerError

if TYPE_CHECKING:
    from streamer.model import TorchRunner

__all__ = [
    "BENCH_SENTENCES",
    "BertShape",
    "RANDOM_SIZES",
    "TINY_LETTERS",
    "XLSR_VOCAB",
    "ModelShape",
    "espeak",
    "espeak_audio",
    "espeak_command",
    "bert_processor",
    "make_tiny_bert_model",
    "make_tiny_model",
    "processor",
    "random_bert_model",
    "random_model",
    "random_runner",
    "save_checkpoint",
    "save_random_model",
    "speech_audio",
]

# ---------------------------------------------------------------------------------------------------------
# Random checkpoints
# ---------------------------------------------------------------------------------------------------------

TINY_LETTERS = list("abcdefghijklmnopqrstuvwxyz'")
"""the letters of the test suite's tiny models (their vocabulary adds ``<pad>``, ``|`` and ``<unk>``)"""

XLSR_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"etaonihsrdlumwcfgypbvk'xjqz"]
"""the 32 tokens of the English fine-tuned wav2vec2 / XLSR checkpoints, in their order"""


@dataclass(frozen=True)
class ModelShape:
    """The size of a Wav2Vec2ForCTC; the defaults of the two positional-conv fields are transformers' own."""

    norm: str
    """``feat_extract_norm``: ``"layer"`` (XLSR: stable layer norm, attention mask) or ``"group"`` (base)"""
    layers: int
    hidden: int
    heads: int
    intermediate: int
    conv_dim: int
    """channels of each of the 7 conv layers of the front end"""
    conv_pos: int = 128
    conv_pos_groups: int = 16


@dataclass(frozen=True)
class BertShape:
    """The size of a Wav2Vec2BertForCTC (a Conformer over 20 ms filterbank features)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    adapter: bool = True
    """``add_adapter``: one strided convolution after the encoder, 40 ms output frames (the fine-tuning guide's)"""


RANDOM_SIZES: dict[str, ModelShape | BertShape] = {
    "base": ModelShape("group", 12, 768, 12, 3072, 512),
    "xlsr-large": ModelShape("layer", 24, 1024, 16, 4096, 512),
    "tiny": ModelShape("layer", 2, 64, 2, 128, 32),
    "w2v-bert-2.0": BertShape(24, 1024, 16, 4096),
}
"""the shapes of real models (``streamer bench --random``, ``clients/loadtest.py --random-model``)"""


def _drawn(build: Callable[[], Any], seed: int | None, logit_std: float | None) -> Any:
    """``build()`` a model with random weights: torch seeded with ``seed`` first (unless None), then the output
    layer redrawn from N(0, ``logit_std``) (unless None)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    model = build()
    if logit_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0, logit_std)
    return model


def random_model(vocab: Sequence[str], shape: ModelShape, *, seed: int | None = 0, logit_std: float | None = None,
                 **config: Any) -> Any:
    """A randomly initialised ``Wav2Vec2ForCTC`` of ``shape`` whose outputs are ``vocab`` (``<pad>`` = blank).

    ``seed`` seeds torch before the weights are drawn (None: draw from torch's generator as it is);
    ``logit_std`` redraws the output layer's weights from N(0, std), which spreads the logits so that the
    argmax of a random model is decisive; ``config`` holds further ``Wav2Vec2Config`` arguments.
    """
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    settings: dict[str, Any] = {
        "vocab_size": len(vocab), "pad_token_id": list(vocab).index("<pad>"), "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate, "conv_dim": (shape.conv_dim,) * 7,
        "feat_extract_norm": shape.norm, "do_stable_layer_norm": shape.norm == "layer",
        "num_conv_pos_embeddings": shape.conv_pos, "num_conv_pos_embedding_groups": shape.conv_pos_groups,
    }
    from streamer.hf import hf

    return _drawn(lambda: Wav2Vec2ForCTC(hf(Wav2Vec2Config)(**(settings | config))), seed, logit_std)


def processor(vocab: Sequence[str], *, norm: str = "layer", **tokenizer: Any) -> tuple[Any, Any]:
    """The tokenizer (``<pad>``, ``<unk>``, ``|`` as word delimiter) and the feature extractor of a model.

    The feature extractor normalises each input and, for ``norm="layer"`` models, returns an attention
    mask; ``tokenizer`` holds further ``Wav2Vec2CTCTokenizer`` arguments.
    """
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

    from streamer.hf import hf

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        tok = hf(Wav2Vec2CTCTokenizer)(
            str(vocab_file), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|", **tokenizer)
    fe = hf(Wav2Vec2FeatureExtractor)(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
        return_attention_mask=norm == "layer")
    return tok, fe


def random_bert_model(vocab: Sequence[str], shape: BertShape, *, seed: int | None = 0, logit_std: float | None = None,
                      **config: Any) -> Any:
    """A randomly initialised ``Wav2Vec2BertForCTC`` of ``shape`` whose outputs are ``vocab`` (``<pad>`` = blank).

    ``seed`` and ``logit_std`` as for :func:`random_model`; ``config`` holds further ``Wav2Vec2BertConfig``
    arguments. Layer drop is off, as the fine-tuning guide sets it.
    """
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC

    settings: dict[str, Any] = {
        "vocab_size": len(vocab), "pad_token_id": list(vocab).index("<pad>"), "hidden_size": shape.hidden,
        "output_hidden_size": shape.hidden, "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate, "add_adapter": shape.adapter, "layerdrop": 0.0,
    }
    from streamer.hf import hf

    return _drawn(lambda: Wav2Vec2BertForCTC(hf(Wav2Vec2BertConfig)(**(settings | config))), seed, logit_std)


def bert_processor(vocab: Sequence[str], **tokenizer: Any) -> tuple[Any, Any]:
    """The tokenizer (as :func:`processor`) and the ``SeamlessM4TFeatureExtractor`` of a Wav2Vec2-BERT model."""
    from transformers import SeamlessM4TFeatureExtractor

    from streamer.hf import hf

    tok, _ = processor(vocab, **tokenizer)
    return tok, hf(SeamlessM4TFeatureExtractor)(sampling_rate=SAMPLE_RATE)


def save_checkpoint(path: str | Path, model: Any, tokenizer: Any, feature_extractor: Any) -> Path:
    """``save_pretrained`` of the three parts into ``path`` (created); returns it."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for part in (model, tokenizer, feature_extractor):
        part.save_pretrained(out)
    return out


def make_tiny_model(path: Path, *, norm: str = "layer", pad_last: bool = False, seed: int = 0,
                    hidden: int = 32, layers: int = 2) -> Path:
    """Save a random tiny checkpoint (a few thousand parameters) for the tests; returns its directory.

    Its vocabulary is ``|``, the letters, ``<unk>`` and ``<pad>`` first or (``pad_last``) last; its logits
    are spread so that greedy decoding emits letters and blanks, not one token everywhere.
    """
    tokens = ["|", *TINY_LETTERS, "<unk>"]
    vocab = [*tokens, "<pad>"] if pad_last else ["<pad>", *tokens]
    shape = ModelShape(norm, layers, hidden, heads=2, intermediate=2 * hidden, conv_dim=16, conv_pos=16,
                       conv_pos_groups=4)
    model = random_model(vocab, shape, seed=seed, logit_std=2.0, ctc_loss_reduction="mean")
    return save_checkpoint(path, model, *processor(vocab, norm=norm))


def make_tiny_bert_model(path: Path, *, adapter: bool = False, pad_last: bool = False, seed: int = 0,
                         hidden: int = 32, layers: int = 2) -> Path:
    """Save a random tiny ``Wav2Vec2BertForCTC`` with its processor, as :func:`make_tiny_model` does for wav2vec2.

    ``adapter``: ``add_adapter`` (40 ms frames) or not (20 ms). Same vocabulary and spread logits as the tiny
    wav2vec2 models.
    """
    tokens = ["|", *TINY_LETTERS, "<unk>"]
    vocab = [*tokens, "<pad>"] if pad_last else ["<pad>", *tokens]
    shape = BertShape(layers, hidden, heads=2, intermediate=2 * hidden, adapter=adapter)
    model = random_bert_model(vocab, shape, seed=seed, logit_std=2.0, ctc_loss_reduction="mean")
    return save_checkpoint(path, model, *bert_processor(vocab))


def _random_parts(size: str) -> tuple[Any, Any, Any]:
    shape = RANDOM_SIZES[size]
    if isinstance(shape, BertShape):
        return random_bert_model(XLSR_VOCAB, shape, seed=0), *bert_processor(XLSR_VOCAB)
    return random_model(XLSR_VOCAB, shape, seed=0), *processor(XLSR_VOCAB, norm=shape.norm)


def save_random_model(size: str, path: str | Path) -> Path:
    """Write a randomly initialised checkpoint of a real model's shape (for daemon benchmarks)."""
    return save_checkpoint(path, *_random_parts(size))


def random_runner(size: str, device: str) -> TorchRunner:
    """A :class:`streamer.model.TorchRunner` over a random model of a real model's shape (no download)."""
    import torch

    from streamer.model import TorchRunner, pick_device

    model, tok, fe = _random_parts(size)
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    model = model.to(dtype).eval().to(dev)
    return TorchRunner(model, tok, fe, name=f"random-{size}", device=dev, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# espeak-ng speech
# ---------------------------------------------------------------------------------------------------------

BENCH_SENTENCES = [
    "turn on the kitchen lights and set the thermostat to twenty one degrees",
    "remind me to call my sister at seven thirty tomorrow morning",
    "what is the weather going to be like this weekend",
    "play some quiet music in the living room please",
    "open the garage door and switch off the porch light",
    "add milk eggs and bread to the shopping list",
    "set a timer for twelve minutes",
    "the meeting has been moved to thursday afternoon",
]
"""what :func:`speech_audio` says, in turn"""


def espeak_command() -> list[str]:
    """The espeak-ng command: ``$STREAMER_ESPEAK`` (shell-split, may hold a loader prefix) or ``espeak-ng``."""
    env = os.environ.get("STREAMER_ESPEAK")
    if env:
        return shlex.split(env)
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise StreamerError("espeak-ng is not installed (apt-get install espeak-ng), or set STREAMER_ESPEAK")
    return [exe]


def _read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    # espeak-ng --stdout writes a streaming header whose sizes may be wrong: find "data" and take the rest.
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise StreamerError("espeak-ng did not write a wav stream")
    rate = int.from_bytes(data[24:28], "little")
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"data":
            pcm = data[pos + 8:]
            pcm = pcm[: len(pcm) // 2 * 2]
            return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, rate
        pos += 8 + size
    raise StreamerError("no data chunk in espeak-ng output")


def espeak_audio(text: str, *, voice: str = "en-us", speed: int = 150, pitch: int | None = None,
                 gap: int | None = None, rate: int = SAMPLE_RATE, command: Sequence[str] | None = None
                 ) -> np.ndarray:
    """Speak ``text`` with espeak-ng: float32 mono at ``rate`` Hz, resampled with soxr (not trimmed).

    ``voice`` may carry a variant (``en-us+f2``); ``speed`` is in words per minute; ``pitch`` (0-99) and
    ``gap`` (extra pause between words, 10 ms units) are espeak-ng's defaults when None; ``command``
    replaces :func:`espeak_command` (worker processes pass it down).
    """
    import soxr

    cmd = [*(command or espeak_command()), "-v", voice, "-s", str(speed)]
    if pitch is not None:
        cmd += ["-p", str(pitch)]
    if gap is not None:
        cmd += ["-g", str(gap)]
    proc = subprocess.run([*cmd, "--stdout", text], capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise StreamerError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    audio, espeak_rate = _read_wav_bytes(proc.stdout)
    if espeak_rate == rate:
        return audio
    return np.asarray(soxr.resample(audio, espeak_rate, rate), dtype=np.float32)


def espeak(text: str, path: Path, *, voice: str = "en-us", speed: int = 150, rate: int = SAMPLE_RATE) -> Path:
    """Speak ``text`` into a 16-bit WAV file at ``rate`` Hz (:func:`espeak_audio`); returns ``path``."""
    import soundfile as sf

    sf.write(path, espeak_audio(text, voice=voice, speed=speed, rate=rate), rate, subtype="PCM_16")
    return path


def speech_audio(seconds: float) -> np.ndarray:
    """:data:`BENCH_SENTENCES` in three voices at 160 words/min, 0.4 s apart, cut to ``seconds`` (16 kHz)."""
    parts: list[np.ndarray] = []
    total = 0
    i = 0
    while total < seconds * SAMPLE_RATE:
        audio = espeak_audio(BENCH_SENTENCES[i % len(BENCH_SENTENCES)], voice=["en-us", "en", "en-gb-x-rp"][i % 3],
                             speed=160)
        parts += [audio, np.zeros(6400, np.float32)]
        total += len(audio) + 6400
        i += 1
    return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]


def proc_cpu_seconds(stat: str | Path) -> float:
    """User + system CPU seconds so far of the process or thread whose ``/proc`` ``stat`` file this is
    (``/proc/PID/stat``, ``/proc/PID/task/TID/stat``): what the benchmarks charge a daemon with, less disturbed by
    other load than wall time. Raises OSError once it is gone."""
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()  # (the name in brackets may hold spaces)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
