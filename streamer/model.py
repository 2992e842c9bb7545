"""Loading a Wav2Vec2ForCTC checkpoint and running windows through it in this process (PyTorch).

Everything model-specific goes through transformers: ``AutoModelForCTC``, the checkpoint's
``Wav2Vec2CTCTokenizer`` (blank = its pad token, word delimiter = its ``|``) and its
``Wav2Vec2FeatureExtractor`` (per-window normalisation, exactly as the ASR pipeline does it).
:class:`TorchRunner` is the in-process :class:`streamer.runner.Runner`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from streamer.config import ModelConfig
from streamer.engine import FRAME_SAMPLES, RECEPTIVE_FIELD, SAMPLE_RATE
from streamer.exceptions import InferenceError, ModelLoadError

__all__ = ["DEMO_MODEL", "TokenizerVocabulary", "TorchRunner", "load_model", "resolve_model"]

logger = logging.getLogger("streamer.model")

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


class TokenizerVocabulary:
    """A :class:`streamer.ctc.Vocabulary` backed by a Hugging Face CTC tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ModelLoadError("the tokenizer has no pad token, which CTC uses as its blank")
        self._blank = int(pad)
        delim_token = getattr(tokenizer, "word_delimiter_token", None)
        delim = tokenizer.convert_tokens_to_ids(delim_token) if delim_token else None
        self._delim = None if delim is None or delim == tokenizer.unk_token_id else int(delim)
        self.size = len(tokenizer)
        self._cache: dict[tuple[int, ...], str] = {}

    @property
    def blank_id(self) -> int:
        return self._blank

    @property
    def delimiter_id(self) -> int | None:
        return self._delim

    @property
    def token_ids(self) -> dict[str, int]:
        """Token string to id, as the tokenizer spells words."""
        return dict(self.tokenizer.get_vocab())

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's own decoding, memoised: words and partials are decoded again and again."""
        if not ids:
            return ""
        key = tuple(ids)
        text = self._cache.get(key)
        if text is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            text = self._cache[key] = str(
                self.tokenizer.decode(list(ids), skip_special_tokens=False, group_tokens=False)
            )
        return text


def _pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device = {name!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return name


def _pick_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


@dataclass
class RunStats:
    """Counters of the model runner (read by ``streamer eval``)."""

    seconds: float = 0.0
    """time spent in :meth:`TorchRunner.run`"""


class TorchRunner:
    """A loaded model: call it with windows of 16 kHz float32 audio, get log-probs back.

    Windows of equal length are stacked into batches of at most ``max_batch`` with no
    padding and no mask, so a window's output does not depend on what it was batched with
    beyond float rounding. Windows of other lengths run in their own batches.
    """

    def __init__(self, model: Any, tokenizer: Any, feature_extractor: Any, *, name: str, device: str,
                 dtype: Any, max_batch: int = 64, source: str | None = None, revision: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.vocab = TokenizerVocabulary(tokenizer)
        self.name = name
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.sample_rate = int(getattr(feature_extractor, "sampling_rate", SAMPLE_RATE))
        self.use_mask = bool(getattr(feature_extractor, "return_attention_mask", False))
        self.stats = RunStats()
        self.source = source or name
        """where the checkpoint was loaded from (a directory or a hub id): :meth:`shipped_file` looks there"""
        self.revision = revision
        self._lock = threading.Lock()

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __call__(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.run(windows)

    def run(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return one ``[frames, vocab]`` float32 log-probability array per window."""
        out: list[np.ndarray | None] = [None] * len(windows)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, w in enumerate(windows):
            if len(w) < RECEPTIVE_FIELD:
                out[i] = np.zeros((0, self.vocab.size), dtype=np.float32)
            else:
                groups[len(w)].append(i)
        t0 = time.perf_counter()
        with self._lock:
            for idx in groups.values():
                for k in range(0, len(idx), self.max_batch):
                    part = idx[k : k + self.max_batch]
                    for i, lp in zip(part, self._forward([windows[i] for i in part]), strict=True):
                        out[i] = lp
        self.stats.seconds += time.perf_counter() - t0
        return [o for o in out if o is not None]

    def _forward(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        try:
            feats = self.feature_extractor(
                batch, sampling_rate=self.sample_rate, return_tensors="pt", return_attention_mask=self.use_mask
            )
            inputs = feats["input_values"].to(self.device, dtype=self.dtype)
            kwargs: dict[str, Any] = {}
            if self.use_mask:
                kwargs["attention_mask"] = feats["attention_mask"].to(self.device)
            with torch.inference_mode():
                logits = self.model(inputs, **kwargs).logits
                lp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        except Exception as exc:  # torch raises many kinds (OOM, CUDA errors, shape errors)
            raise InferenceError(f"model call failed on a batch of {len(batch)} windows: {exc}") from exc
        return list(lp)

    def shipped_file(self, name: str) -> Path | None:
        """The checkpoint's own file ``name``: in its directory, or in the hub cache (never downloaded)."""
        if Path(self.source).is_dir():
            path = Path(self.source) / name
            return path if path.is_file() else None
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(self.source, name, revision=self.revision)
        except Exception:  # not a valid repo id, no cache: no such file
            return None
        return Path(found) if isinstance(found, str) else None

    def warmup(self, samples: int) -> float:
        """Run one window of silence-like noise; return the seconds it took."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        self.run([rng.normal(0, 1e-3, samples).astype(np.float32)])
        return time.perf_counter() - t0


def _check_geometry(config: Any, source: str) -> None:
    stride = int(np.prod(getattr(config, "conv_stride", [0])))
    kernels = getattr(config, "conv_kernel", [])
    rf, jump = 1, 1
    for k, s in zip(kernels, getattr(config, "conv_stride", []), strict=False):
        rf += (k - 1) * jump
        jump *= s
    if stride != FRAME_SAMPLES or rf != RECEPTIVE_FIELD:
        raise ModelLoadError(
            f"{source}: feature encoder has stride {stride} and receptive field {rf} samples; "
            f"streamer needs the wav2vec2 grid ({FRAME_SAMPLES}, {RECEPTIVE_FIELD})"
        )


def _from_pretrained(cls: Any, source: str, local_only: bool, revision: str | None, **kw: Any) -> Any:
    return cls.from_pretrained(source, local_files_only=local_only, revision=revision, **kw)


def load_model(cfg: ModelConfig | None = None, *, max_batch: int = 64) -> TorchRunner:
    """Load a checkpoint from ``cfg.id``: ``demo``, a local directory, or a hub id.

    The hub is tried from the local cache first, so a cached model works offline; the
    network is used only when the cache misses and ``HF_HUB_OFFLINE`` is not set.
    The runner decodes nothing: build the word decoder with :func:`streamer.decoder.build_decoder`.
    """
    cfg = cfg or ModelConfig()
    source = resolve_model(cfg.id)
    import torch
    from transformers import AutoModelForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _pick_device(cfg.device)
    dtype = _pick_dtype(cfg.dtype, device)
    revision = cfg.revision or None
    is_dir = Path(source).is_dir()
    if not is_dir and (os.sep in source and source.count("/") != 1 or source.startswith((".", "~"))):
        raise ModelLoadError(f"model directory {source!r} does not exist; pass an existing checkpoint directory")

    def load_all(local_only: bool) -> tuple[Any, Any, Any]:
        tok = _from_pretrained(Wav2Vec2CTCTokenizer, source, local_only, revision)
        fe = _from_pretrained(Wav2Vec2FeatureExtractor, source, local_only, revision)
        try:
            model = _from_pretrained(AutoModelForCTC, source, local_only, revision, dtype=dtype,
                                     attn_implementation=cfg.attention)
        except (ValueError, ImportError) as exc:
            if cfg.attention == "eager":
                raise
            logger.warning("attention %r unavailable (%s); using eager attention", cfg.attention, exc)
            model = _from_pretrained(AutoModelForCTC, source, local_only, revision, dtype=dtype,
                                     attn_implementation="eager")
        return tok, fe, model

    try:
        try:
            tokenizer, fe, model = load_all(local_only=True)
        except OSError:
            if is_dir or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
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
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            why = (
                "HF_HUB_OFFLINE is set and it is not in the local cache"
                if offline
                else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
            )
            msg = (
                f"model {source!r} is not a local directory and could not be loaded from the Hugging Face "
                f"hub or its cache ({why}). "
                f"On a machine with network run `huggingface-cli download {source} --local-dir DIR` and "
                "set model.id to DIR (or --model DIR), or point HF_HOME at a cache that holds it"
            )
        raise ModelLoadError(msg) from exc
    _check_geometry(model.config, source)
    if int(getattr(fe, "sampling_rate", SAMPLE_RATE)) != SAMPLE_RATE:
        raise ModelLoadError(f"{source}: feature extractor expects {fe.sampling_rate} Hz; streamer needs 16000 Hz")
    model.eval()
    model.to(device)
    name = "demo" if cfg.id == DEMO_MODEL else cfg.id
    logger.info("loaded %s on %s (%s, %s attention)", name, device, str(dtype).removeprefix("torch."),
                getattr(model.config, "_attn_implementation", "?"))
    return TorchRunner(model, tokenizer, fe, name=name, device=device, dtype=dtype, max_batch=max_batch,
                       source=source, revision=revision)
