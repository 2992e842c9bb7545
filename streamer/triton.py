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

Requests go over gRPC's own channels (``grpc.aio`` for the worker, blocking for :meth:`TritonRunner.run`), as the
protocol's messages from ``tritonclient.grpc.service_pb2``; each request's bytes are written here so that its audio
is copied once (:meth:`TritonRunner._body`). tritonclient's client answers the start-up checks (readiness, metadata,
config).

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
from typing import Any, NamedTuple, Protocol, runtime_checkable

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

_RETRY_STATUSES = ("UNAVAILABLE", "NOT_FOUND")
"""gRPC statuses (``grpc.StatusCode`` names) of a server that is down, restarting or still loading its model: worth
waiting for"""
_CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                 # reconnect within a second once the server is back (gRPC's default backoff grows to two minutes)
                 ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000),
                 ("grpc.min_reconnect_backoff_ms", 200)]


def _import_client() -> Any:
    """tritonclient's gRPC module (its ``service_pb2`` holds the protocol's messages), or the error saying why not."""
    try:
        import tritonclient.grpc as grpc_client
    except ImportError as exc:
        raise ModelLoadError(f"model_server.kind = 'triton' needs tritonclient ({exc}); install it with "
                             "pip install 'streamer[triton]'") from None
    return grpc_client


def _method(name: str) -> str:
    """The gRPC path of the inference protocol's method ``name`` (``/inference.GRPCInferenceService/ModelInfer``)."""
    service = _import_client().service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return f"/{service.full_name}/{service.methods_by_name[name].name}"


def _varint(n: int) -> bytes:
    """``n`` as a protobuf base-128 varint (a field's length on the wire)."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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
        self._sync: Any = None
        self._calls: _Calls | None = None
        """the blocking path's channel (:meth:`run`)"""
        self._aio_calls: _Calls | None = None
        """the event loop's channel (:meth:`infer`, :meth:`watch`)"""
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
        """tritonclient's blocking client: :meth:`check` asks it about the server, its model and the model's config."""
        if self._sync is None:
            self._sync = _import_client().InferenceServerClient(self.url)
        return self._sync

    def run(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Blocking :meth:`infer` (one request per window length and ``max_batch``), without retries."""
        import grpc

        if self._calls is None:
            self._calls = _Calls.open(self.url, aio=False)
        out, parts = self._split(windows)
        for idx in parts:
            try:
                res = self._calls.infer(self._body([windows[i] for i in idx]), timeout=self.cfg.timeout_s)
            except grpc.RpcError as exc:
                raise InferenceError(f"the model server at {self.url} failed {len(idx)} window(s): "
                                     f"{exc.details() or exc.code().name}") from None
            for i, lp in zip(idx, self._outputs(res), strict=True):
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

    def _aio(self) -> _Calls:
        if self._aio_calls is None:
            self._aio_calls = _Calls.open(self.url, aio=True)
        return self._aio_calls

    async def infer(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One ``[frames, vocab]`` log-probability array per window, in order; windows of one length per request."""
        out, parts = self._split(windows)
        results = await asyncio.gather(*(self._request([windows[i] for i in idx]) for idx in parts))
        for idx, lps in zip(parts, results, strict=True):
            for i, lp in zip(idx, lps, strict=True):
                out[i] = lp
        return [o for o in out if o is not None]

    async def _request(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        import grpc

        body = self._body(windows)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.retry_s
        while True:
            try:
                self.requests += 1
                res = await self._aio().infer(body, timeout=self.cfg.timeout_s)
            except grpc.aio.AioRpcError as exc:
                why = exc.details() or exc.code().name
                if exc.code().name in _RETRY_STATUSES:
                    self._mark(False, why)
                    if loop.time() < deadline:
                        await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))
                        continue
                    raise InferenceError(f"the model server at {self.url} is unreachable ({why})") from None
                raise InferenceError(f"the model server at {self.url} failed {len(windows)} window(s): "
                                     f"{why}") from None
            self._mark(True)
            return self._outputs(res)

    async def watch(self, interval_s: float = 0.5) -> None:
        """Ask the server whether the model is ready every ``interval_s`` (sets :attr:`available`) until cancelled."""
        import grpc

        ask = _import_client().service_pb2.ModelReadyRequest(name=self.cfg.model_name, version=str(self.version))
        while True:
            try:
                res = await self._aio().ready(ask, timeout=2.0)
                self._mark(bool(res.ready), "the model is not ready")
            except grpc.aio.AioRpcError as exc:
                self._mark(False, exc.details() or exc.code().name)
            except Exception as exc:  # whatever else the channel raises: down, and keep watching
                self._mark(False, f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval_s)

    async def aclose(self) -> None:
        calls, self._aio_calls = self._aio_calls, None
        if calls is not None:
            await calls.channel.close()
        if self._calls is not None:
            self._calls.channel.close()
            self._calls = None

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

    def _body(self, windows: list[np.ndarray]) -> bytes:
        """The serialized ``ModelInferRequest`` of ``windows`` (one length), their samples copied once.

        tritonclient's ``InferInput`` and ``infer`` copied a request's audio five times on the event loop (the
        stacked array, its bytes, the protobuf field, the serialized message, then gRPC's own buffer), a request of
        six 3 s windows being 1.1 MB; now it is copied here once, then by gRPC (``docs/scaling.md``: the event loop
        8-11 % less). Protobuf's wire format takes a message's fields in any order, so protobuf serializes the small
        fields and the audio follows as the ``raw_input_contents`` field, each window's samples joined straight
        from the stream's buffer.
        """
        pb = _import_client().service_pb2
        req = pb.ModelInferRequest(model_name=self.cfg.model_name, model_version=str(self.version))
        req.inputs.add(name=INPUT, datatype=WIRE_DTYPES[self.cfg.dtype], shape=[len(windows), len(windows[0])])
        req.outputs.add(name=OUTPUT)
        audio = [self._encode(w) for w in windows]
        raw = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3 | 2  # wire type 2: bytes
        head = [req.SerializeToString(), _varint(raw), _varint(sum(a.nbytes for a in audio))]
        return b"".join([*head, *(a.data for a in audio)])

    def _encode(self, window: np.ndarray) -> np.ndarray:
        """One window's samples as they go on the wire (``model_server.dtype``), C-contiguous."""
        if self.cfg.dtype == "int16":
            wire: np.ndarray = np.clip(np.rint(np.asarray(window, dtype=np.float32) * 32768.0), -32768, 32767)
            return wire.astype(np.int16)
        return np.ascontiguousarray(window, dtype=np.float32)

    def _outputs(self, res: Any) -> list[np.ndarray]:
        """The ``[frames, vocab]`` arrays of a ``ModelInferResponse``, one per window (views of its bytes)."""
        names = [o.name for o in res.outputs]
        if OUTPUT not in names or res.outputs[names.index(OUTPUT)].datatype != "FP32":
            raise InferenceError(f"the model server at {self.url} answered without {OUTPUT!r} as FP32 ({names})")
        k = names.index(OUTPUT)
        shape = tuple(res.outputs[k].shape)
        return list(np.frombuffer(res.raw_output_contents[k], dtype=np.float32).reshape(shape))


class _Calls(NamedTuple):
    """A gRPC channel to the model server and the two methods the runner calls on it."""

    channel: Any
    infer: Any
    """``ModelInfer``: takes a request already serialized (:meth:`TritonRunner._body`)"""
    ready: Any
    """``ModelReady``: takes a ``ModelReadyRequest``"""

    @staticmethod
    def open(url: str, *, aio: bool) -> _Calls:
        import grpc

        pb = _import_client().service_pb2
        channel = (grpc.aio if aio else grpc).insecure_channel(url, options=_CHANNEL_ARGS)
        infer = channel.unary_unary(_method("ModelInfer"), request_serializer=None,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        ready = channel.unary_unary(_method("ModelReady"), request_serializer=pb.ModelReadyRequest.SerializeToString,
                                    response_deserializer=pb.ModelReadyResponse.FromString)
        return _Calls(channel, infer, ready)


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
