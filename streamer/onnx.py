"""The ONNX Runtime backend: a checkpoint exported to ONNX, run in this process without torch.

:func:`export` writes an export directory: ``model.onnx`` (float32) and ``model.int8.onnx`` (the linear layers
quantised to int8 dynamically, by onnxruntime's ``quantize_dynamic``), next to the checkpoint's own tokenizer,
feature-extractor and config files (and its ``words.txt``), and ``streamer-export.json``: the fingerprint of
the source checkpoint and the export options, the files written and their sizes, and how closely the export
reproduced the torch model. The graph computes the log-probabilities from the normalised samples; its batch
and time axes are dynamic (windows at the start and end of a stream and offline passes have other lengths than
the schedule's window, which is the length the export is traced and checked at).

:func:`load_onnx` runs such a directory (``model.id = DIR``: ``model.backend = "auto"`` sees it), or exports a
torch checkpoint once into the cache (``$XDG_CACHE_HOME/streamer/onnx``) and reuses it while the checkpoint is
unchanged. A stale export (its checkpoint changed since), one written with other options, or a broken one
(a file missing or cut short) is refused with the command that makes it anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamer.checkpoint import DEMO_MODEL, load_checkpoint, resolve_model
from streamer.config import ModelConfig
from streamer.engine import RECEPTIVE_FIELD
from streamer.exceptions import InferenceError, ModelLoadError
from streamer.hf import hf
from streamer.runner import LocalRunner, probe_windows

__all__ = ["EXPORT_INFO", "FLOAT_FILE", "INT8_FILE", "ExportInfo", "OnnxRunner", "cache_dir", "cached_export_dir",
           "check_export", "export", "is_export", "load_onnx"]

logger = logging.getLogger("streamer.onnx")

EXPORT_INFO = "streamer-export.json"
FLOAT_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FORMAT = 1
"""the layout of an export directory; another value is refused (export again)"""

OPTIONS: dict[str, Any] = {
    "format": FORMAT,
    "inputs": "normalised samples [batch, samples]",
    "outputs": "log-probabilities [batch, frames, vocab]",
    "int8": {"op_types": ["MatMul"], "weight_type": "QInt8", "per_channel": False, "reduce_range": False},
}
"""what an export is made with: part of its fingerprint, so that an export made otherwise is made anew"""

CHECKPOINT_FILES = ("config.json", "preprocessor_config.json", "vocab.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "words.txt")
"""the small files of a checkpoint an export depends on (with the weights)"""

FLOAT_TOLERANCE = 1e-3
"""largest log-probability difference between the float32 export and the torch model allowed at export"""


def cache_dir() -> Path:
    """Where exports made on first use are kept: ``$XDG_CACHE_HOME/streamer/onnx`` (``~/.cache`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "streamer" / "onnx"


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or (d / "pytorch_model.bin").is_file()


def is_export(source: str | Path) -> bool:
    """Whether ``source`` is an export directory (or looks like one: ``model.onnx`` and no torch weights)."""
    d = Path(source)
    if not d.is_dir():
        return False
    return (d / EXPORT_INFO).is_file() or ((d / FLOAT_FILE).is_file() and not _has_weights(d))


# --- fingerprints ----------------------------------------------------------------------------------------


def _source_dir(source: str, revision: str | None) -> Path | None:
    """The local directory of a checkpoint: itself, or its snapshot in the hub cache (None if not cached)."""
    if Path(source).is_dir():
        return Path(source).resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json", revision=revision)
    except Exception:  # not a repo id: nothing cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def _checkpoint_files(d: Path) -> list[Path]:
    names = set(CHECKPOINT_FILES)
    files = sorted(p for p in d.iterdir() if p.is_file() and (
        p.name in names or p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")))
    return files + _lm_files(d)


def _lm_files(d: Path) -> list[Path]:
    """The checkpoint's n-gram LM (``language_model/``, ``decoder.lm = "auto"``): copied into its export."""
    folder = d / "language_model"
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _stats(d: Path) -> list[list[Any]]:
    """Names, sizes and modification times: a cheap check that nothing changed."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in _checkpoint_files(d)]


def _content_hash(d: Path) -> str:
    """sha256 over the names and contents of the checkpoint's files (reads the weights: seconds for 1 GB)."""
    h = hashlib.sha256()
    for p in _checkpoint_files(d):
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _options_key() -> str:
    return hashlib.sha256(json.dumps(OPTIONS, sort_keys=True).encode()).hexdigest()[:16]


# --- the export directory ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """``streamer-export.json``: what an export directory holds and where it came from."""

    directory: Path
    data: dict[str, Any]

    @property
    def source(self) -> str:
        return str(self.data.get("source", "?"))

    @property
    def n_parameters(self) -> int:
        return int(self.data.get("n_parameters", 0))

    def remake(self) -> str:
        """The command that makes this export anew."""
        rev = f" --set model.revision={self.data['revision']}" if self.data.get("revision") else ""
        model = "demo" if self.data.get("name") == "demo" else self.source
        return f"streamer export -m {model}{rev} --out {self.directory}"


def _read_info(d: Path) -> dict[str, Any]:
    path = d / EXPORT_INFO
    if not path.is_file():
        raise ModelLoadError(
            f"{d} holds {FLOAT_FILE} but no {EXPORT_INFO}: it was not written by `streamer export`, or the export "
            f"was cut short; export the checkpoint again: streamer export -m CHECKPOINT --out {d}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is unreadable ({exc}); export the checkpoint again: "
                             f"streamer export -m CHECKPOINT --out {d}") from None
    return data


def check_export(d: Path, *, files: tuple[str, ...] = (FLOAT_FILE, INT8_FILE)) -> ExportInfo:
    """Read and check an export directory; raise :class:`ModelLoadError` with the fix when it cannot be used.

    Checks the format and options it was written with, that ``files`` (and their external data) are all there
    at their recorded sizes, and, when its source checkpoint is on this machine, that it has not changed since.
    """
    info = ExportInfo(d, _read_info(d))
    if info.data.get("options_key") != _options_key():
        raise ModelLoadError(f"{d} was exported by another version of streamer, with other options; export it "
                             f"again: {info.remake()}")
    recorded: dict[str, int] = info.data.get("files", {})
    for name in files:
        if name not in recorded:
            raise ModelLoadError(f"{d} has no {name}; export it again: {info.remake()}")
    for name, size in recorded.items():
        path = d / name
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: the export is broken; export it again: {info.remake()}")
        if path.stat().st_size != size:
            raise ModelLoadError(f"{path} has {path.stat().st_size} bytes, not the {size} it was exported with: the "
                                 f"export is broken; export it again: {info.remake()}")
    src = _source_dir(info.source, info.data.get("revision") or None)
    if src is not None and src.is_dir() and _stats(src) != info.data.get("source_stats"):
        if _content_hash(src) != info.data.get("source_hash"):
            raise ModelLoadError(f"{d} is stale: its checkpoint {info.source} has changed since it was exported "
                                 f"({info.data.get('created', '?')}); export it again: {info.remake()}")
    return info


class _Steps:
    """Progress of a long export: one line per step on stderr when it is a terminal, log lines otherwise."""

    def __init__(self, what: str, total: int) -> None:
        from tqdm import tqdm

        self.what = what
        self.bar = tqdm(total=total, desc=what, unit="step", file=sys.stderr, disable=not sys.stderr.isatty(),
                        bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        logger.info("%s: %s", self.what, name)
        yield
        self.bar.update()

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.t0


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Keep the exporter's and quantiser's chatter (prints, warnings, log lines) out of the output."""
    out = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            yield out
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export(model_id: str, out: str | Path, *, revision: str | None = None, window_samples: int = 48_000,
           force: bool = False) -> tuple[ExportInfo, bool]:
    """Export checkpoint ``model_id`` (``demo``, a directory or a hub id) to the directory ``out``.

    Returns the export's info and whether it was made now (False: ``out`` already held an up-to-date export,
    reused unless ``force``). A stale or broken export in ``out`` is replaced; a directory that holds anything
    else is refused. Raises :class:`ModelLoadError`.
    """
    source = resolve_model(model_id)
    out = Path(out).expanduser()
    if Path(source).is_dir() and out.resolve() == Path(source).resolve():
        raise ModelLoadError(f"--out {out} is the checkpoint itself; export to a directory of its own")
    if is_export(source):
        raise ModelLoadError(f"{source} is already an ONNX export; export the torch checkpoint it came from")
    if out.exists():
        if not out.is_dir():
            raise ModelLoadError(f"--out {out} is a file; give a directory (it is created)")
        if (out / EXPORT_INFO).is_file() and not force:
            try:
                info = check_export(out)
            except ModelLoadError as exc:
                logger.info("making %s anew: %s", out, exc)
            else:
                if info.data.get("source") == _source_name(source, model_id) and info.data.get("revision") == (
                        revision or ""):
                    return info, False
        elif any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
            raise ModelLoadError(f"--out {out} exists and is not a streamer export; choose a new or empty directory")

    steps = _Steps(f"exporting {model_id} to ONNX", 5)
    try:
        import torch

        with steps.step("loading the torch checkpoint"):
            tokenizer, fe, model = load_checkpoint(source, revision=revision, dtype=torch.float32)
            n_parameters = sum(p.numel() for p in model.parameters())
        if getattr(model, "main_input_name", "input_values") != "input_values":
            raise ModelLoadError(
                f"{model_id} is a {type(model).__name__} (Wav2Vec2-BERT: filterbank features in, not samples); "
                "the ONNX export and the onnxruntime backend take raw-sample models (wav2vec2 and its kin) only. "
                "Run it with model.backend = 'torch' (float32, bfloat16 or int8)")
        src = _source_dir(source, revision)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            data = _write(tmp, model, tokenizer, fe, steps, window_samples=window_samples, src=src)
            data.update(source=_source_name(source, model_id), revision=revision or "", n_parameters=n_parameters,
                        name="demo" if model_id == DEMO_MODEL else model_id,
                        source_stats=_stats(src) if src else None, source_hash=_content_hash(src) if src else None)
            (tmp / EXPORT_INFO).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            try:
                tmp.rename(out)
            except OSError:  # another process wrote it meanwhile: theirs is as good
                if not (out / EXPORT_INFO).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # the exporter and the quantiser raise many kinds
        raise ModelLoadError(f"exporting {model_id} to ONNX failed ({type(exc).__name__}: {exc}); "
                             "model.backend = 'torch' runs it without ONNX") from exc
    finally:
        seconds = steps.close()
    logger.info("exported %s to %s in %.0f s", model_id, out, seconds)
    return check_export(out), True


def _source_name(source: str, model_id: str) -> str:
    """How an export names its checkpoint: an absolute directory, or the hub id."""
    return str(Path(source).resolve()) if Path(source).is_dir() else model_id


def _write(d: Path, model: Any, tokenizer: Any, fe: Any, steps: _Steps, *, window_samples: int,
           src: Path | None) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class LogProbs(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_values: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.model(input_values).logits.float(), dim=-1)

    wrapped = LogProbs(model).eval()
    probe = probe_windows(2, max(window_samples, RECEPTIVE_FIELD))
    external = sum(p.numel() for p in model.parameters()) * 4 > 1_800_000_000  # protobuf's 2 GB limit
    with steps.step("tracing and writing the float32 graph"), _quiet():
        batch, samples = torch.export.Dim("batch", min=1), torch.export.Dim("samples", min=RECEPTIVE_FIELD)
        torch.onnx.export(wrapped, (torch.from_numpy(probe),), str(d / FLOAT_FILE), input_names=["input_values"],
                          output_names=["log_probs"], dynamic_shapes={"input_values": {0: batch, 1: samples}},
                          dynamo=True, external_data=external, verbose=False)
    q = OPTIONS["int8"]
    with steps.step("quantising the linear layers to int8"), _quiet():
        quantize_dynamic(d / FLOAT_FILE, d / INT8_FILE, op_types_to_quantize=q["op_types"],
                         weight_type=getattr(QuantType, q["weight_type"]), per_channel=q["per_channel"],
                         reduce_range=q["reduce_range"], use_external_data_format=external)
    with steps.step("checking the export against torch"):
        with torch.inference_mode():
            expected = wrapped(torch.from_numpy(probe)).numpy()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        got = {name: ort.InferenceSession(str(d / name), options, providers=["CPUExecutionProvider"]).run(
            None, {"input_values": probe})[0] for name in (FLOAT_FILE, INT8_FILE)}
        diff = float(np.abs(got[FLOAT_FILE] - expected).max())
        if not diff <= FLOAT_TOLERANCE:
            raise ModelLoadError(f"the ONNX export does not reproduce the torch model (log-probs differ by up to "
                                 f"{diff:.3g}); use model.backend = 'torch' for this checkpoint")
        agree = float((got[INT8_FILE].argmax(-1) == expected.argmax(-1)).mean())
    with steps.step("copying the tokenizer, feature extractor and config"):
        tokenizer.save_pretrained(d)
        fe.save_pretrained(d)
        model.config.save_pretrained(d)
        if src is not None and (src / "words.txt").is_file():
            shutil.copyfile(src / "words.txt", d / "words.txt")
        if src is not None and _lm_files(src):  # the LM decodes the export's outputs as it does the checkpoint's
            shutil.copytree(src / "language_model", d / "language_model", dirs_exist_ok=True)
    import onnx

    return {
        "format": FORMAT, "options": OPTIONS, "options_key": _options_key(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "window_samples": window_samples,
        "opset": next((o.version for o in onnx.load(str(d / FLOAT_FILE), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), None),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "check": {"float32_max_logprob_diff": diff, "int8_argmax_agreement": agree},
        "files": {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.name.startswith("model.")},
    }


# --- the runner ----------------------------------------------------------------------------------------------


class OnnxRunner(LocalRunner):
    """An export directory run by ONNX Runtime in this process (a :class:`streamer.runner.LocalRunner`).

    int8 runs one window per call: onnxruntime's dynamic quantisation scales a call's activations as a whole,
    so a window batched with others would come out a little different from the same window alone.
    """

    backend = "onnxruntime"

    def __init__(self, session: Any, tokenizer: Any, feature_extractor: Any, *, name: str, device: str,
                 precision: str, max_batch: int, info: ExportInfo) -> None:
        super().__init__(tokenizer, feature_extractor, name=name, device=device, precision=precision,
                         max_batch=max_batch, source=str(info.directory), per_window=precision == "int8")
        self.session = session
        self.info = info
        self._input = session.get_inputs()[0].name

    @property
    def n_parameters(self) -> int:
        return self.info.n_parameters

    def _forward(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        try:
            lp = self.session.run(None, {self._input: self.normalise(batch)})[0]
        except Exception as exc:  # onnxruntime raises its own kinds (shape, allocation)
            raise InferenceError(f"model call failed on a batch of {len(batch)} windows: {exc}") from exc
        return list(np.asarray(lp, dtype=np.float32))


def cached_export_dir(model_id: str, revision: str = "") -> Path:
    """Where the cache keeps the export of checkpoint ``model_id`` (``demo``, a directory or a hub id)."""
    name = "demo" if model_id == DEMO_MODEL else model_id
    key = hashlib.sha256(f"{_source_name(resolve_model(model_id), model_id)}\0{revision}".encode()).hexdigest()
    return cache_dir() / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')[-60:]}-{key[:12]}"


def _cached_export(cfg: ModelConfig, name: str) -> ExportInfo:
    """The cache's export of a torch checkpoint: made on first use, made anew when the checkpoint changed."""
    d = cached_export_dir(cfg.id, cfg.revision)
    if (d / EXPORT_INFO).is_file():
        try:
            return check_export(d)
        except ModelLoadError as exc:
            logger.warning("the cached ONNX export of %s cannot be used (%s); exporting it again", name, exc)
    logger.warning("exporting %s to ONNX for model.backend = 'onnxruntime' (once: it is cached in %s; "
                   "a 300 M parameter model takes a few minutes)", name, d)
    try:
        return export(cfg.id, d, revision=cfg.revision or None, force=True)[0]
    except PermissionError as exc:
        raise ModelLoadError(f"cannot write the ONNX export to {d} ({exc}); set XDG_CACHE_HOME to a writable "
                             f"directory, or run `streamer export -m {cfg.id} --out DIR` and set model.id to "
                             "DIR") from exc


def load_onnx(cfg: ModelConfig, source: str, *, name: str, max_batch: int = 64) -> OnnxRunner:
    """An :class:`OnnxRunner` over ``source``: an export directory, or a torch checkpoint exported on first use."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelLoadError(f"model.backend = 'onnxruntime' needs onnxruntime ({exc}); pip install onnxruntime"
                             ) from exc
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor
    from transformers.utils import logging as hf_logging

    hf(hf_logging.set_verbosity_error)()
    precision = "int8" if cfg.dtype == "int8" else "float32"
    file = INT8_FILE if precision == "int8" else FLOAT_FILE
    if is_export(source):
        info = check_export(Path(source), files=(file,))
    elif Path(source).exists() and not Path(source).is_dir():
        raise ModelLoadError(f"model.id = {source!r} is a file; give a checkpoint or export directory")
    else:
        info = _cached_export(cfg, name)
    providers: list[Any] = ["CPUExecutionProvider"]
    device = "cpu"
    if cfg.device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelLoadError(f"model.device = {cfg.device!r} but this onnxruntime has no CUDA provider; "
                                 "install onnxruntime-gpu, or use model.device = 'cpu' or model.backend = 'torch'")
        index = int(cfg.device.partition(":")[2] or 0)
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        device = f"cuda:{index}"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cfg.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Worker threads sleep between calls instead of spinning: the daemon's event loop, the audio threads and
    # other processes share the cores (spinning cost the demo model about 2x per window under load here).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    d = info.directory
    try:
        session = ort.InferenceSession(str(d / file), options, providers=providers)
        tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(d, local_files_only=True)
        fe = Wav2Vec2FeatureExtractor.from_pretrained(d, local_files_only=True)
    except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, ...; transformers' OSError
        raise ModelLoadError(f"cannot load the ONNX export in {d} ({type(exc).__name__}: {exc}); the export is "
                             f"broken: export it again: {info.remake()}") from exc
    logger.info("loaded %s on %s (onnxruntime %s, %s, from %s)", name, device, ort.__version__, precision, d)
    return OnnxRunner(session, tokenizer, fe, name=name, device=device, precision=precision, max_batch=max_batch,
                      info=info)
