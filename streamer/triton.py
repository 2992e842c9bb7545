"""A runner whose model runs on an NVIDIA Triton Inference Server over gRPC (``[model_server] kind = "triton"``).

A front-end (one ``streamer serve`` process) loads only the checkpoint's tokenizer: its vocabulary decodes what the
server returns. The batching worker (:mod:`streamer.aio.worker`) hands its batches to :meth:`TritonRunner.infer`,
which sends them without blocking the event loop, several requests at once; the server's dynamic batcher merges the
requests of every front-end into one forward pass.

Windows of one length go in one request (a ``[windows, samples]`` array): Triton batches only requests of equal
shape, and the server runs exactly what the in-process runner runs (equal-length windows, no padding), so a
window's output is the same as with ``kind = "local"``. Nearly every window has the schedule's full length; the
shorter ones (a stream's first windows, early partials, a final flush) go in requests of their own length.

The model on the server carries a version computed from its vocabulary (:func:`model_version`): the front-end asks
for that version, so a server started from another checkpoint is refused at start with the reason, never used.

No asyncio server code here; ``tritonclient`` is imported when a runner is made (``pip install 'streamer[triton]'``:
the client alone, which takes numpy 2; the server, PyTriton, is ``streamer[triton-server]``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from streamer.config import Config, ModelConfig, ModelServerConfig
from streamer.engine import SAMPLE_RATE
from streamer.exceptions import InferenceError, ModelLoadError
from streamer.runner import (
    WAV2VEC2_GEOMETRY,
    FrameGeometry,
    Runner,
    TokenizerVocabulary,
    TokenVocabulary,
    checkpoint_file,
)

__all__ = ["INPUT", "OUTPUT", "AsyncRunner", "TritonRunner", "checkpoint_geometry", "connect_runner", "load_vocabulary",
           "model_version"]

logger = logging.getLogger("streamer.triton")

INPUT = "audio"
"""the model's input: ``[windows, samples]`` 16 kHz audio, FP32 in [-1, 1] or INT16 (``model_server.dtype``)"""
OUTPUT = "logprobs"
"""the model's output: ``[windows, frames, vocab]`` FP32 CTC log-probabilities"""
WIRE_DTYPES = {"float32": "FP32", "int16": "INT16"}

_RETRY_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND")
"""gRPC statuses of a server that is down, restarting or still loading its model: worth waiting for"""


def _import_client() -> Any:
    try:
        import tritonclient.grpc.aio as grpc_aio
    except ImportError as exc:
        raise ModelLoadError(f"model_server.kind = 'triton' needs tritonclient ({exc}); install it with "
                             "pip install 'streamer[triton]'") from None
    return grpc_aio


@runtime_checkable
class AsyncRunner(Runner, Protocol):
    """A runner the worker awaits on its event loop (a remote model server) instead of calling it in a thread."""

    @property
    def available(self) -> bool:
        """Whether the model server answered its last check (``/healthz`` says 503 while not)."""
        ...

    @property
    def max_inflight(self) -> int:
        """How many :meth:`infer` calls the worker may have running at once."""
        ...

    async def infer(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Like :meth:`Runner.run`, without blocking the event loop; raises InferenceError."""
        ...

    async def watch(self) -> None:
        """Check the server's health until cancelled (the worker runs it while it runs)."""
        ...

    async def aclose(self) -> None:
        """Close the connection."""
        ...


def model_version(vocab: TokenVocabulary, geometry: FrameGeometry = WAV2VEC2_GEOMETRY) -> int:
    """A Triton model version (a positive integer) that names this vocabulary (blank, delimiter, every token) and
    frame grid: what a front-end must share with the model to decode its output."""
    grid = [geometry.frame_samples, geometry.receptive_field, geometry.kind]
    ident = json.dumps({"tokens": sorted(vocab.token_ids.items()), "blank": vocab.blank_id,
                        "delimiter": vocab.delimiter_id, "size": vocab.size, "rate": SAMPLE_RATE, "grid": grid},
                       sort_keys=True)
    return 1 + int(hashlib.sha256(ident.encode()).hexdigest()[:7], 16)


def checkpoint_geometry(cfg: ModelConfig, source: str) -> FrameGeometry:
    """The checkpoint's output frame grid, from its config and feature extractor, without its weights (the model is
    built on torch's meta device): what the engine cuts windows on, as the server's model has it."""
    import torch
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC

    from streamer.checkpoint import frame_geometry
    from streamer.hf import hf

    kw: dict[str, Any] = {"revision": cfg.revision} if cfg.revision else {}
    try:
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True, **kw)
            fe = hf(AutoFeatureExtractor).from_pretrained(source, local_files_only=True, **kw)
        except OSError:
            if Path(source).is_dir():
                raise
            config = AutoConfig.from_pretrained(source, **kw)
            fe = hf(AutoFeatureExtractor).from_pretrained(source, **kw)
        with torch.device("meta"):
            model = hf(AutoModelForCTC).from_config(config)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the configuration of model.id = {cfg.id!r} ({source}): {exc}") from exc
    return frame_geometry(model, fe, source)


def load_vocabulary(cfg: ModelConfig) -> tuple[TokenizerVocabulary, str, str]:
    """The checkpoint's tokenizer as a vocabulary, without its weights: ``(vocab, source, name)``."""
    from streamer.checkpoint import DEMO_MODEL, resolve_model

    source = resolve_model(cfg.id)
    name = "demo" if cfg.id == DEMO_MODEL else cfg.id
    from transformers import Wav2Vec2CTCTokenizer

    from streamer.hf import quiet_transformers

    quiet_transformers()
    kw: dict[str, Any] = {"revision": cfg.revision} if cfg.revision else {}
    try:
        try:
            tok = Wav2Vec2CTCTokenizer.from_pretrained(source, local_files_only=True, **kw)
        except OSError:
            if Path(source).is_dir():
                raise
            tok = Wav2Vec2CTCTokenizer.from_pretrained(source, **kw)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the vocabulary of model.id = {cfg.id!r} ({source}): {exc}. The front-ends "
                             "of a model server read the checkpoint's tokenizer (vocab.json, tokenizer_config.json): "
                             "give them the checkpoint the server runs") from exc
    return TokenizerVocabulary(tok), source, name


class TritonRunner:
    """The model on a Triton server (a :class:`streamer.runner.Runner` and :class:`AsyncRunner`).

    Make it with :func:`connect_runner`. :meth:`infer` is what the daemon's worker calls; :meth:`run` is a blocking
    equivalent (warm-up, tools). While the server is unreachable a request is retried for ``retry_s``, then its
    windows fail with :class:`~streamer.exceptions.InferenceError` (the streams get ``inference_failed``, 1011).
    """

    backend = "triton"

    def __init__(self, cfg: ModelServerConfig, url: str, vocab: TokenizerVocabulary, *, name: str, source: str,
                 revision: str | None = None, geometry: FrameGeometry = WAV2VEC2_GEOMETRY) -> None:
        self.cfg = cfg
        self.url = url
        self.vocab = vocab
        self.name = name
        self.source = source
        self.revision = revision
        self.sample_rate = SAMPLE_RATE
        self.n_parameters = 0
        self.precision = ""
        self.geometry = geometry
        """where the output frames lie (the engine's schedule is cut on this grid)"""
        self.version = model_version(vocab, geometry)
        self.max_inflight = cfg.max_inflight
        self.available = True
        """whether the server answered its last check or request"""
        self.requests = 0
        self.max_batch = cfg.max_batch
        """most windows in one request: the server's max_batch_size once :meth:`check` read it"""
        self._client: Any = None
        self._sync: Any = None
        self._down_since: float | None = None

    @property
    def device(self) -> str:
        return f"triton://{self.url}"

    # -- checks -------------------------------------------------------------------

    def check(self, timeout_s: float | None = None) -> None:
        """Wait until the server's model is ready (``start_timeout_s``) and serves this vocabulary; else raise.

        Raises :class:`ModelLoadError` naming the server, what it serves and what was expected.
        """
        from tritonclient.utils import InferenceServerException

        limit = self.cfg.start_timeout_s if timeout_s is None else timeout_s
        client = self._sync_client()
        deadline = time.monotonic() + limit
        why = "no answer"
        while True:
            try:
                if client.is_server_ready(client_timeout=2.0) and client.is_model_ready(self.cfg.model_name,
                                                                                        client_timeout=2.0):
                    break
                why = f"model {self.cfg.model_name!r} not ready"
            except InferenceServerException as exc:
                why = str(exc.message() or exc)
            if time.monotonic() >= deadline:
                raise ModelLoadError(f"the model server at {self.url} is not ready after {limit:.0f} s ({why}); start "
                                     "it (streamer model-server) or fix model_server.url")
            time.sleep(0.5)
        meta = client.get_model_metadata(self.cfg.model_name, as_json=True)
        versions = [int(v) for v in meta.get("versions", [])]
        if self.version not in versions:
            raise ModelLoadError(
                f"the model server at {self.url} serves {self.cfg.model_name!r} version(s) {versions}, made from "
                f"another vocabulary or frame grid than model.id = {self.name!r} here (version {self.version}): "
                "give the front-ends and the server the same checkpoint")
        inputs = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}
        want = WIRE_DTYPES[self.cfg.dtype]
        if inputs.get(INPUT) != want:
            raise ModelLoadError(f"the model server at {self.url} takes {INPUT!r} as {inputs.get(INPUT)}, this "
                                 f"front-end sends {want} (model_server.dtype = {self.cfg.dtype!r}): use the same "
                                 "model_server.dtype on both")
        cfg = client.get_model_config(self.cfg.model_name, as_json=True).get("config", {})
        self.max_batch = int(cfg.get("max_batch_size", self.cfg.max_batch)) or self.cfg.max_batch

    # -- the blocking path --------------------------------------------------------

    def _sync_client(self) -> Any:
        if self._sync is None:
            try:
                import tritonclient.grpc as grpc_sync
            except ImportError as exc:
                raise ModelLoadError(f"model_server.kind = 'triton' needs tritonclient ({exc}); install it with "
                                     "pip install 'streamer[triton]'") from None
            self._sync = grpc_sync.InferenceServerClient(self.url)
        return self._sync

    def run(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Blocking :meth:`infer` (one request per window length and ``max_batch``), without retries."""
        import tritonclient.grpc as grpc_sync
        from tritonclient.utils import InferenceServerException

        out, parts = self._split(windows)
        for idx in parts:
            inp = grpc_sync.InferInput(INPUT, [len(idx), len(windows[idx[0]])], WIRE_DTYPES[self.cfg.dtype])
            inp.set_data_from_numpy(self._encode([windows[i] for i in idx]))
            try:
                res = self._sync_client().infer(self.cfg.model_name, [inp], model_version=str(self.version),
                                                outputs=[grpc_sync.InferRequestedOutput(OUTPUT)],
                                                client_timeout=self.cfg.timeout_s)
            except InferenceServerException as exc:
                raise InferenceError(f"the model server at {self.url} failed {len(idx)} window(s): "
                                     f"{exc.message() or exc}") from None
            for i, lp in zip(idx, res.as_numpy(OUTPUT), strict=True):
                out[i] = lp
        return [o for o in out if o is not None]

    def warmup(self, samples: int) -> float:
        """Send one window of ``samples`` samples; return the seconds it took."""
        t0 = time.perf_counter()
        self.run([np.random.default_rng(0).normal(0, 1e-3, samples).astype(np.float32)])
        return time.perf_counter() - t0

    def shipped_file(self, name: str) -> Path | None:
        """The checkpoint's own file ``name`` (``words.txt``): in its directory or the hub cache; never downloads."""
        return checkpoint_file(self.source, name, self.revision)

    # -- the asyncio path ---------------------------------------------------------

    def _aio(self) -> Any:
        if self._client is None:
            grpc_aio = _import_client()
            # reconnect within a second once the server is back (gRPC's default backoff grows to two minutes)
            args = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000),
                    ("grpc.min_reconnect_backoff_ms", 200)]
            self._client = grpc_aio.InferenceServerClient(self.url, channel_args=args)
        return self._client

    async def infer(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One ``[frames, vocab]`` log-probability array per window, in order; windows of one length per request."""
        out, parts = self._split(windows)
        results = await asyncio.gather(*(self._request([windows[i] for i in idx]) for idx in parts))
        for idx, lps in zip(parts, results, strict=True):
            for i, lp in zip(idx, lps, strict=True):
                out[i] = lp
        return [o for o in out if o is not None]

    async def _request(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        inp = InferInput(INPUT, [len(windows), len(windows[0])], WIRE_DTYPES[self.cfg.dtype])
        inp.set_data_from_numpy(self._encode(windows))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.retry_s
        while True:
            try:
                self.requests += 1
                res = await self._aio().infer(self.cfg.model_name, [inp], model_version=str(self.version),
                                              outputs=[InferRequestedOutput(OUTPUT)],
                                              client_timeout=self.cfg.timeout_s)
            except InferenceServerException as exc:
                status = str(exc.status())
                why = exc.message() or str(exc)
                if status in _RETRY_STATUSES:
                    self._mark(False, why)
                    if loop.time() < deadline:
                        await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))
                        continue
                    raise InferenceError(f"the model server at {self.url} is unreachable ({why})") from None
                raise InferenceError(f"the model server at {self.url} failed {len(windows)} window(s): "
                                     f"{why}") from None
            self._mark(True)
            return list(res.as_numpy(OUTPUT))

    async def watch(self, interval_s: float = 0.5) -> None:
        """Ask the server whether the model is ready every ``interval_s`` (sets :attr:`available`) until cancelled."""
        from tritonclient.utils import InferenceServerException

        while True:
            try:
                ready = await self._aio().is_model_ready(self.cfg.model_name, str(self.version), client_timeout=2.0)
                self._mark(bool(ready), "the model is not ready")
            except InferenceServerException as exc:
                self._mark(False, exc.message() or str(exc))
            except Exception as exc:  # whatever else the channel raises: down, and keep watching
                self._mark(False, f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval_s)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _mark(self, up: bool, why: str = "") -> None:
        if up and not self.available:
            down = time.monotonic() - (self._down_since or time.monotonic())
            logger.warning("the model server at %s is back after %.1f s", self.url, down)
        elif not up and self.available:
            self._down_since = time.monotonic()
            logger.warning("the model server at %s is unreachable: %s", self.url, why)
        self.available = up

    # -- shared -------------------------------------------------------------------

    def _split(self, windows: Sequence[np.ndarray]) -> tuple[list[np.ndarray | None], list[list[int]]]:
        """The outputs known already (windows too short for one frame) and the requests: index lists, one length."""
        out: list[np.ndarray | None] = [None] * len(windows)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, w in enumerate(windows):
            if len(w) < self.geometry.receptive_field:
                out[i] = np.zeros((0, self.vocab.size), dtype=np.float32)
            else:
                groups[len(w)].append(i)
        size = self.max_batch
        parts = [idx[k:k + size] for idx in groups.values() for k in range(0, len(idx), size)]
        return out, parts

    def _encode(self, windows: list[np.ndarray]) -> np.ndarray:
        x: np.ndarray = np.stack([np.asarray(w, dtype=np.float32) for w in windows])
        if self.cfg.dtype == "int16":
            x = np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)
        return x


def connect_runner(cfg: Config, url: str | None = None) -> TritonRunner:
    """A :class:`TritonRunner` for ``cfg`` at ``url`` (default ``model_server.url``), checked against the server."""
    _import_client()  # the clear error first, before the vocabulary loads
    ms = cfg.model_server
    address = url or ms.url
    if not address:
        raise ModelLoadError("model_server.url is empty: give the address of a running model server (host:port)")
    address = address.removeprefix("grpc://")
    vocab, source, name = load_vocabulary(cfg.model)
    runner = TritonRunner(ms, address, vocab, name=name, source=source, revision=cfg.model.revision or None,
                          geometry=checkpoint_geometry(cfg.model, source))
    runner.check()
    return runner
