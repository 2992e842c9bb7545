"""A CTC checkpoint (``Wav2Vec2ForCTC`` and its kin, or ``Wav2Vec2BertForCTC``): where it is, loading it with
transformers, and the output frame grid it streams on.

:func:`resolve_model` maps a model id (``demo``, a directory, a hub id) to what transformers loads;
:func:`load_checkpoint` loads the checkpoint's tokenizer, feature extractor and model (eval mode, on the CPU);
:func:`frame_geometry` derives the output frame grid from the checkpoint's own length arithmetic (feature
extractor and model), so windows land on it. The backends build on this: :mod:`streamer.model` (PyTorch, and
:func:`streamer.model.load_model`, which picks the backend), :mod:`streamer.onnx` (an export made from a torch
checkpoint) and :mod:`streamer.triton` (the model server).
"""

from __future__ import annotations

import logging
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from streamer.engine import SAMPLE_RATE
from streamer.exceptions import ModelLoadError
from streamer.runner import WAV2VEC2_GEOMETRY, FrameGeometry

__all__ = ["DEMO_MODEL", "SUPPORTED", "demo_model_dir", "frame_geometry", "load_checkpoint", "resolve_model"]

logger = logging.getLogger("streamer.model")  # the model's loading lines, under the name they have always had

DEMO_MODEL = "demo"

def demo_model_dir() -> Path:
    return Path(str(resources.files("streamer") / "models" / "demo"))


def resolve_model(model_id: str) -> str:
    """Map ``demo`` to the shipped checkpoint; anything else is a directory or a hub id."""
    if model_id == DEMO_MODEL:
        path = demo_model_dir()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the shipped demo model is missing from {path}; reinstall streamer, or pass --model "
                "with a local checkpoint directory or a hub id"
            )
        return str(path)
    return model_id



SUPPORTED = ("CTC models with wav2vec2's convolutional feature encoder (Wav2Vec2ForCTC: wav2vec2, XLS-R, MMS; "
             "HuBERT, WavLM and the like) and Wav2Vec2BertForCTC (Wav2Vec2-BERT 2.0)")


def _fit_grid(count: Any, what: str, source: str) -> tuple[int, int]:
    """``(frame_samples, receptive_field)`` such that ``count(n) == (n - rf) // fs + 1`` (0 below ``rf``).

    ``count(n)`` is the number of output frames the checkpoint gives ``n`` samples (non-decreasing). The first
    two thresholds are found by bisection, and the formula is then checked on either side of the next eight.
    """
    def first(at_least: int, lo: int, hi: int) -> int:
        if count(hi) < at_least:
            raise ModelLoadError(f"{source}: {what} gives fewer than {at_least} frames for {hi} samples; "
                                 f"streamer streams {SUPPORTED}")
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if count(mid) < at_least else (lo, mid)
        return lo

    rf = first(1, 1, 4 * SAMPLE_RATE)
    fs = first(2, rf, 8 * SAMPLE_RATE) - rf
    for k in range(1, 9):
        n = rf + k * fs
        if count(n) != k + 1 or count(n - 1) != k:
            raise ModelLoadError(
                f"{source}: {what} gives frames on no regular grid ({count(n - 1)} and {count(n)} frames for "
                f"{n - 1} and {n} samples, where one frame every {fs} samples after the first {rf} predicts "
                f"{k} and {k + 1}); streamer streams {SUPPORTED}")
    return fs, rf


def frame_geometry(model: Any, feature_extractor: Any, source: str) -> FrameGeometry:
    """The output frame grid of a loaded checkpoint, derived from its own length arithmetic.

    wav2vec2 and its kin (raw samples in, ``conv_kernel`` / ``conv_stride``): the model's
    ``_get_feat_extract_output_lengths`` of ``n`` samples (the conv stack, and its adapter when it has one;
    (320, 400) for wav2vec2). Wav2Vec2-BERT (``input_features``): the feature extractor's unmasked feature
    frames for ``n`` samples (10 ms fbank shift × stacking 2 = 320 samples, 560 for the first), through the
    model's ``_get_feat_extract_output_lengths`` (× ``adapter_stride`` per adapter layer with
    ``add_adapter``: 40 ms frames). Windows that start on a multiple of ``frame_samples`` put their frames on the
    stream's grid: neither front end pads on the left. Anything else raises :class:`ModelLoadError`.
    """
    import torch

    config = model.config
    kind = str(getattr(config, "model_type", "?"))
    main = str(getattr(model, "main_input_name", "input_values"))
    lengths = getattr(model, "_get_feat_extract_output_lengths", None)
    arch = f"{type(model).__name__} (model_type {kind!r}, input {main!r})"
    if lengths is None:
        raise ModelLoadError(f"{source}: {arch} does not say how many frames it gives; streamer streams {SUPPORTED}")

    def out_frames(n_features: int) -> int:
        return max(0, int(lengths(torch.tensor([n_features]))[0]))

    if main == "input_values" and getattr(config, "conv_stride", None) and getattr(config, "conv_kernel", None):
        if any(int(p) for p in getattr(config, "conv_padding", []) or []):
            raise ModelLoadError(f"{source}: {arch} pads its feature encoder; streamer streams {SUPPORTED}")
        fs, rf = _fit_grid(out_frames, f"{type(model).__name__}'s feature encoder", source)
        geometry = FrameGeometry(fs, rf, "wav2vec2")
        return WAV2VEC2_GEOMETRY if geometry == WAV2VEC2_GEOMETRY else geometry
    if kind == "wav2vec2-bert" and main == "input_features":
        if type(feature_extractor).__name__ != "SeamlessM4TFeatureExtractor":
            raise ModelLoadError(f"{source}: {arch} needs its SeamlessM4TFeatureExtractor (preprocessor_config.json), "
                                 f"not {type(feature_extractor).__name__}")
        cache: dict[int, int] = {}

        def features(n: int) -> int:  # the feature extractor's unmasked feature frames for n samples
            if n not in cache:
                if n < 2:
                    cache[n] = 0
                else:
                    with warnings.catch_warnings(), np.errstate(all="ignore"):
                        warnings.simplefilter("ignore")  # (one 10 ms frame: its variance is undefined)
                        try:
                            got = feature_extractor([np.zeros(n, np.float32)], sampling_rate=SAMPLE_RATE,
                                                    return_tensors="np", return_attention_mask=True)
                        except ValueError:  # shorter than one 25 ms frame
                            got = {"attention_mask": np.zeros(0)}
                    cache[n] = int(np.asarray(got["attention_mask"]).sum())
            return cache[n]

        fs, rf = _fit_grid(lambda n: out_frames(features(n)) if features(n) else 0,
                           "the Wav2Vec2-BERT feature extractor and adapter", source)
        return FrameGeometry(fs, rf, "wav2vec2-bert")
    raise ModelLoadError(f"{source}: {arch} is not supported; streamer streams {SUPPORTED}")


def _from_pretrained(cls: Any, source: str, local_only: bool, revision: str | None, **kw: Any) -> Any:
    return cls.from_pretrained(source, local_files_only=local_only, revision=revision, **kw)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def load_checkpoint(source: str, *, revision: str | None, dtype: Any, attention: str = "sdpa"
                    ) -> tuple[Any, Any, Any]:
    """The tokenizer, feature extractor and ``Wav2Vec2ForCTC`` (eval mode, on the CPU) of ``source``.

    ``source`` is a directory or a hub id (tried from the local cache first; fetched only when the cache misses
    and ``HF_HUB_OFFLINE`` is not set). Raises :class:`ModelLoadError` saying how to fix what is wrong.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCTC,
        SeamlessM4TFeatureExtractor,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
    )

    from streamer.hf import quiet_transformers

    quiet_transformers()
    is_dir = Path(source).is_dir()
    if not is_dir and (os.sep in source and source.count("/") != 1 or source.startswith((".", "~"))):
        raise ModelLoadError(f"model directory {source!r} does not exist; pass an existing checkpoint directory")

    def load_all(local_only: bool) -> tuple[Any, Any, Any]:
        tok = _from_pretrained(Wav2Vec2CTCTokenizer, source, local_only, revision)
        kind = getattr(_from_pretrained(AutoConfig, source, local_only, revision), "model_type", "")
        # Wav2Vec2-BERT takes log-mel filterbanks (its own extractor); everything else raw normalised samples.
        fe_class = SeamlessM4TFeatureExtractor if kind == "wav2vec2-bert" else Wav2Vec2FeatureExtractor
        fe = _from_pretrained(fe_class, source, local_only, revision)
        try:
            model = _from_pretrained(AutoModelForCTC, source, local_only, revision, dtype=dtype,
                                     attn_implementation=attention)
        except (ValueError, ImportError) as exc:
            if attention == "eager":
                raise
            logger.warning("attention %r unavailable (%s); using eager attention", attention, exc)
            model = _from_pretrained(AutoModelForCTC, source, local_only, revision, dtype=dtype,
                                     attn_implementation="eager")
        return tok, fe, model

    try:
        try:
            tokenizer, fe, model = load_all(local_only=True)
        except OSError:
            if is_dir or _hub_offline():
                raise
            tokenizer, fe, model = load_all(local_only=False)
    except ModelLoadError:
        raise
    except Exception as exc:
        if is_dir:
            msg = (
                f"cannot load the checkpoint in {source!r}: {exc}. The directory must hold config.json, "
                "model.safetensors (or pytorch_model.bin), vocab.json, tokenizer_config.json and "
                "preprocessor_config.json as written by save_pretrained"
            )
        else:
            why = (
                "HF_HUB_OFFLINE is set and it is not in the local cache"
                if _hub_offline()
                else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
            )
            msg = (
                f"model {source!r} is not a local directory and could not be loaded from the Hugging Face "
                f"hub or its cache ({why}). "
                f"On a machine with network run `huggingface-cli download {source} --local-dir DIR` and "
                "set model.id to DIR (or --model DIR), or point HF_HOME at a cache that holds it"
            )
        raise ModelLoadError(msg) from exc
    frame_geometry(model, fe, source)  # refuses what does not stream, naming it
    if int(getattr(fe, "sampling_rate", SAMPLE_RATE)) != SAMPLE_RATE:
        raise ModelLoadError(f"{source}: feature extractor expects {fe.sampling_rate} Hz; streamer needs 16000 Hz")
    return tokenizer, fe, model.eval()
