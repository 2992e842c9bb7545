"""The PyTorch backend, and :func:`load_model`, which picks where and how a checkpoint runs.

Everything model-specific goes through transformers (:mod:`streamer.checkpoint` loads the checkpoint:
``AutoModelForCTC``, its ``Wav2Vec2CTCTokenizer``, blank = its pad token, word delimiter = its ``|``, and its
feature extractor, ``Wav2Vec2FeatureExtractor`` or Wav2Vec2-BERT's ``SeamlessM4TFeatureExtractor`` filterbanks;
per-window normalisation, exactly as the ASR pipeline does it for each chunk).
:func:`load_model` returns a :class:`streamer.runner.LocalRunner`: :class:`TorchRunner` (PyTorch in this
process, float32, float16, bfloat16 or int8) or, with ``model.backend = "onnxruntime"``, the ONNX Runtime
runner of :mod:`streamer.onnx` (float32 or int8). A new backend is one module beside :mod:`streamer.onnx`
(a :class:`streamer.runner.LocalRunner` and its loader) plus its route in :func:`resolve_backend` and
:func:`load_model`.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from streamer.checkpoint import DEMO_MODEL, frame_geometry, load_checkpoint, resolve_model
from streamer.config import ModelConfig
from streamer.engine import SAMPLE_RATE
from streamer.exceptions import InferenceError, ModelLoadError
from streamer.onnx import is_export, load_onnx
from streamer.runner import WAV2VEC2_GEOMETRY, FrameGeometry, LocalRunner, probe_windows

__all__ = ["TorchRunner", "cpu_has_bf16", "load_model", "pick_device"]

logger = logging.getLogger("streamer.model")

BF16_PROBE_MIN_PARAMETERS = 100_000_000
"""``dtype = "auto"`` on a CPU with bfloat16 instructions times bfloat16 against float32 for models at least
this large; smaller ones keep float32 (they run many times faster than real time anyway, and stay exact)"""


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), as /proc/cpuinfo lists them."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(name: str, dtype: str = "auto") -> str:
    """The device ``model.device = name`` means: ``auto`` is CUDA when a GPU is visible (the CPU for int8)."""
    import torch

    if name == "auto":
        if dtype == "int8":  # dynamic int8 runs on the CPU
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device = {name!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return name


def _pick_precision(name: str, device: str) -> str:
    """The precision to load in; ``auto`` on a CPU is decided after loading (:func:`_auto_cpu_precision`)."""
    import torch

    if name == "auto" and device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if name == "bfloat16" and device == "cpu" and not cpu_has_bf16():
        logger.warning("model.dtype = 'bfloat16' on a CPU without bfloat16 instructions (avx512_bf16, amx_bf16): "
                       "it is emulated and slower than float32; use 'float32' or 'int8'")
    return name


class TorchRunner(LocalRunner):
    """A PyTorch model in this process (a :class:`streamer.runner.LocalRunner`).

    ``dtype`` is what the inputs are cast to (the weights' dtype; float32 for an int8 model, whose linear
    layers quantise their inputs themselves); ``precision`` names the arithmetic (``int8`` for such a model).
    """

    backend = "torch"

    def __init__(self, model: Any, tokenizer: Any, feature_extractor: Any, *, name: str, device: str,
                 dtype: Any, max_batch: int = 64, source: str | None = None, revision: str | None = None,
                 precision: str | None = None, n_parameters: int | None = None,
                 geometry: FrameGeometry | None = None) -> None:
        precision = precision or str(dtype).removeprefix("torch.")
        if geometry is None:
            geometry = frame_geometry(model, feature_extractor, name)
        super().__init__(tokenizer, feature_extractor, name=name, device=device, precision=precision,
                         max_batch=max_batch, source=source, revision=revision, per_window=precision == "int8",
                         geometry=geometry)
        self.model = model
        self.dtype = dtype
        self.use_mask = bool(getattr(feature_extractor, "return_attention_mask", False))
        self._n_parameters = n_parameters

    @property
    def n_parameters(self) -> int:
        if self._n_parameters is None:
            self._n_parameters = sum(p.numel() for p in self.model.parameters())
        return self._n_parameters

    def _forward(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        try:
            kwargs: dict[str, Any] = {}
            if self.geometry.kind == "wav2vec2-bert":
                features, mask = self.filterbanks(batch)
                inputs = torch.from_numpy(features).to(self.device, dtype=self.dtype)
                kwargs["attention_mask"] = torch.from_numpy(mask).to(self.device)
            else:
                inputs = torch.from_numpy(self.normalise(batch)).to(self.device, dtype=self.dtype)
                if self.use_mask:  # no padding: a mask of ones, as the feature extractor returns it
                    kwargs["attention_mask"] = torch.ones(inputs.shape, dtype=torch.int32, device=self.device)
            with torch.inference_mode():
                logits = self.model(inputs, **kwargs).logits
                lp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        except Exception as exc:  # torch raises many kinds (OOM, CUDA errors, shape errors)
            raise InferenceError(f"model call failed on a batch of {len(batch)} windows: {exc}") from exc
        return list(lp)


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantisation of the linear layers (weights int8 per tensor, activations per call), in place.

    torch 2.13 marks ``torch.ao.quantization`` deprecated in favour of torchao, but torchao does not fit here
    (as of 0.18): its PyPI wheel is built for CUDA (its kernels fail to load next to CPU torch, with a warning
    on every import), and once installed, transformers imports it on every ``from_pretrained`` (+0.4 s and
    those warnings at each model load). The eager ``quantize_dynamic`` still works in 2.13; its notice is
    silenced here, and the ONNX Runtime backend is the int8 path to prefer (faster, and maintained).
    """
    import torch

    quantization = getattr(getattr(torch, "ao", None), "quantization", None)
    if quantization is None or not hasattr(quantization, "quantize_dynamic"):
        raise ModelLoadError(f"model.dtype = 'int8' with model.backend = 'torch' needs torch.ao.quantization, "
                             f"which torch {torch.__version__} no longer has; use model.backend = 'onnxruntime'")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        return quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def _auto_cpu_precision(model: Any, n_parameters: int, fe: Any = None) -> tuple[Any, str]:
    """``dtype = "auto"`` on a CPU: bfloat16 where the CPU has it and a timing shows it faster, else float32."""
    if n_parameters < BF16_PROBE_MIN_PARAMETERS or not cpu_has_bf16():
        return model, "float32"
    import torch

    probe = probe_windows(1, SAMPLE_RATE)
    if getattr(model, "main_input_name", "input_values") == "input_features":  # Wav2Vec2-BERT: its filterbanks
        probe = np.asarray(fe([probe[0]], sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"],
                           dtype=np.float32)
    x32 = torch.from_numpy(probe)
    fast = copy.deepcopy(model).to(torch.bfloat16)
    seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    with torch.inference_mode():
        model(x32)  # the first call of each builds its kernels: not timed
        fast(x32.bfloat16())
        for _ in range(2):  # interleaved, so that load from elsewhere hits both alike
            for name, m, x in (("float32", model, x32), ("bfloat16", fast, x32.bfloat16())):
                t0 = time.perf_counter()
                m(x)
                seconds[name].append(time.perf_counter() - t0)
    t32, t16 = min(seconds["float32"]), min(seconds["bfloat16"])
    pick = "bfloat16" if t16 < 0.8 * t32 else "float32"
    logger.info("model.dtype = 'auto' on this CPU: %s (a 1 s window took %.3f s in bfloat16, %.3f s in float32)",
                pick, t16, t32)
    return (fast, pick) if pick == "bfloat16" else (model, pick)


def resolve_backend(cfg: ModelConfig, source: str) -> str:
    """``torch`` or ``onnxruntime``: ``auto`` is ONNX Runtime for a ``streamer export`` directory, else torch."""
    exported = is_export(source)
    if cfg.backend == "auto":
        return "onnxruntime" if exported else "torch"
    if cfg.backend == "torch" and exported:
        raise ModelLoadError(f"{source} is an ONNX export (model.onnx, no torch weights); set model.backend = "
                             "'onnxruntime' (or 'auto'), or point model.id at the torch checkpoint it came from")
    return cfg.backend


def load_model(cfg: ModelConfig | None = None, *, max_batch: int = 64) -> LocalRunner:
    """Load a checkpoint from ``cfg.id``: ``demo``, a local directory, a hub id, or a ``streamer export`` directory.

    The hub is tried from the local cache first, so a cached model works offline; the network is used only
    when the cache misses and ``HF_HUB_OFFLINE`` is not set. ``cfg.backend`` picks PyTorch or ONNX Runtime
    (:func:`streamer.onnx.load_onnx`; a torch checkpoint is exported once and cached), ``cfg.dtype`` the
    precision. The runner decodes nothing: build the word decoder with :func:`streamer.decoder.build_decoder`.
    """
    cfg = cfg or ModelConfig()
    source = resolve_model(cfg.id)
    name = "demo" if cfg.id == DEMO_MODEL else cfg.id
    if resolve_backend(cfg, source) == "onnxruntime":
        return load_onnx(cfg, source, name=name, max_batch=max_batch)
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, cfg.dtype)
    precision = _pick_precision(cfg.dtype, device)
    load_dtype = getattr(torch, precision) if precision in ("float32", "float16", "bfloat16") else torch.float32
    revision = cfg.revision or None
    tokenizer, fe, model = load_checkpoint(source, revision=revision, dtype=load_dtype, attention=cfg.attention)
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters())
    if precision == "int8":
        model = quantize_int8(model)
    elif precision == "auto":
        model, precision = _auto_cpu_precision(model, n_parameters, fe)
    dtype = torch.float32 if precision == "int8" else getattr(torch, precision)
    logger.info("loaded %s on %s (torch, %s, %s attention)", name, device, precision,
                getattr(model.config, "_attn_implementation", "?"))
    geometry = frame_geometry(model, fe, source)
    if geometry != WAV2VEC2_GEOMETRY:
        logger.info("%s: %s", name, geometry.describe())
    return TorchRunner(model, tokenizer, fe, name=name, device=device, dtype=dtype, max_batch=max_batch,
                       source=source, revision=revision, precision=precision, n_parameters=n_parameters,
                       geometry=geometry)
