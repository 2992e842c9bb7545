"""The model server: the configured checkpoint on an NVIDIA Triton Inference Server, through PyTriton.

:func:`serve_model` loads the model once (on ``model.device``; bfloat16 on a GPU that has it), binds it to
Triton with a dynamic batcher and serves until SIGTERM or SIGINT: ``streamer model-server`` runs it, one per GPU.
:class:`ModelServerProcess` is how ``streamer serve`` runs one itself when ``model_server.url`` is empty: a
``streamer model-server`` child process, started first and stopped last, and started again (with backoff) when
it dies.

The Triton model takes ``[windows, samples]`` of one length per request (:mod:`streamer.triton`); the dynamic
batcher merges requests of equal shape from every front-end, and the merged batch runs through the same
:class:`~streamer.runner.LocalRunner` as in a one-process daemon, so the outputs are the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np

from streamer.aio.processes.supervisor import RESTART_MAX_S, RESTART_MIN_S, STABLE_AFTER_S
from streamer.config import Config
from streamer.exceptions import ModelLoadError, StreamerError
from streamer.runner import Runner, geometry_of
from streamer.triton import INPUT, OUTPUT, model_version

__all__ = ["ModelServerProcess", "WindowMemo", "free_ports", "open_runner", "serve_model", "start_model_server"]

logger = logging.getLogger("streamer.model_server")


def free_ports(cfg: Config) -> Config:
    """``cfg`` with each model-server port that is 0 replaced by a free one (Triton needs them named)."""
    ms = cfg.model_server
    ports: dict[str, Any] = {}
    socks = []
    for key in ("grpc_port", "http_port", "metrics_port"):
        if getattr(ms, key) == 0:
            s = socket.socket()
            s.bind((ms.host, 0))
            socks.append(s)
            ports[key] = s.getsockname()[1]
    for s in socks:
        s.close()
    return cfg.replace(model_server=replace(ms, **ports)) if ports else cfg


def _library_path() -> None:
    """Let Triton's Python backend stub find this interpreter's libpython (pyenv and similar builds)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and os.path.isdir(libdir):
        paths = os.environ.get("LD_LIBRARY_PATH", "")
        if libdir not in paths.split(":"):
            os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{paths}" if paths else libdir


class WindowMemo:
    """The model's outputs for windows it has run, byte for byte, up to ``size`` windows (the least recently used go).

    For benchmarks of front ends (``streamer model-server --memo``): load tests send every stream the same
    speech, cut on the same grid from the stream's start, so after the first stream a trained model's real
    outputs cost a lookup, and one CPU can serve them to as many streams as the front end carries. A daemon
    serving users gets nothing from it (no two live windows are equal), so nothing turns it on by default.
    """

    def __init__(self, run: Any, size: int) -> None:
        self._run = run
        self._size = size
        self._seen: OrderedDict[tuple[str, int, bytes], np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        keys = [(w.dtype.str, len(w), hashlib.blake2b(w.tobytes(), digest_size=16).digest()) for w in windows]
        missing: dict[tuple[str, int, bytes], int] = {}  # each window not seen yet: its first place in the batch
        for i, k in enumerate(keys):
            if k not in self._seen:
                missing.setdefault(k, i)  # (twice in one batch, streams of the same speech at once: it runs once)
        if missing:
            outputs = self._run([windows[i] for i in missing.values()])
            self._seen.update(zip(missing, outputs, strict=True))
        self.misses += len(missing)
        self.hits += len(windows) - len(missing)
        out = []
        for k in keys:
            self._seen.move_to_end(k)
            out.append(self._seen[k])
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return out


def serve_model(cfg: Config, *, ready: Any = None, memo: int = 0) -> None:
    """Load ``model.id`` and serve it on Triton (``[model_server]`` ports) until SIGTERM/SIGINT.

    ``ready(version)`` is called once the server answers. ``memo`` > 0 answers windows seen before from a
    :class:`WindowMemo` of that many windows (benchmarks only).
    """
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise ModelLoadError(f"the model server needs PyTriton ({exc}); install it with pip install "
                             "'streamer[triton-server]', in an environment of its own (PyTriton holds numpy below 2), "
                             "and run streamer model-server from there or name its python in "
                             "model_server.python") from None
    from streamer.model import load_model

    ms = cfg.model_server
    runner = load_model(cfg.model, max_batch=ms.max_batch)
    warm = runner.warmup(cfg.stream.schedule().window_samples)
    version = model_version(runner.vocab, geometry_of(runner))
    int16 = ms.dtype == "int16"
    logger.info("model %s on %s (%s), warm-up window %.3f s; serving it as %r version %d",
                runner.name, runner.device, runner.precision, warm, ms.model_name, version)

    def run(windows: list[np.ndarray]) -> list[np.ndarray]:
        return runner.run([w.astype(np.float32) / 32768.0 for w in windows] if int16 else windows)

    forward = WindowMemo(run, memo) if memo > 0 else run

    @batch  # type: ignore[untyped-decorator]
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {OUTPUT: np.stack(forward(list(inputs[INPUT])))}

    _library_path()
    config = TritonConfig(http_address=ms.host, http_port=ms.http_port, grpc_address=ms.host,
                          grpc_port=ms.grpc_port, metrics_port=ms.metrics_port, allow_metrics=True,
                          exit_timeout_secs=5)
    # SIGTERM as SIGINT: PyTriton's serve() stops Triton and its proxy processes on KeyboardInterrupt
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=ms.model_name,
            model_version=version,
            infer_func=infer,
            inputs=[Tensor(name=INPUT, dtype=np.int16 if int16 else np.float32, shape=(-1,))],
            outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(-1, -1))],
            config=ModelConfig(max_batch_size=ms.max_batch, batcher=DynamicBatcher(
                max_queue_delay_microseconds=round(ms.max_queue_delay_ms * 1000))),
            strict=False,
        )
        triton.run()  # starts the server and loads the model
        if ready is not None:
            ready(version)
        try:
            triton.serve()
        except KeyboardInterrupt:
            pass
    if isinstance(forward, WindowMemo):
        logger.info("the memo answered %d windows and ran %d", forward.hits, forward.misses)


def _set_args(cfg: Config) -> list[str]:
    """``--set`` options that give a child process this config's ``[model]`` and ``[model_server]``."""
    out: list[str] = []
    for section in ("model", "model_server"):
        for key, value in vars(getattr(cfg, section)).items():
            out += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return out


class ModelServerProcess:
    """A ``streamer model-server`` child process serving ``cfg``'s model, for a daemon with no ``model_server.url``.

    :meth:`start` returns once the server answers (or raises, with its output's tail); :meth:`stop` ends it.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = free_ports(cfg)
        ms = self.cfg.model_server
        host = "127.0.0.1" if ms.host in ("0.0.0.0", "") else ms.host
        self.url = f"{host}:{ms.grpc_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._keeper: threading.Thread | None = None

    def start(self) -> str:
        """Start the server and wait until its model is ready; return its gRPC address (``host:port``).

        From then on a server that dies is started again on the same ports (the front-ends reconnect to it; their
        windows wait up to ``model_server.retry_s`` meanwhile), with the backoff of front-end processes, until
        :meth:`stop`.
        """
        url = self._start()
        self._keeper = threading.Thread(target=self._keep, name="streamer-model-server-keeper", daemon=True)
        self._keeper.start()
        return url

    def _keep(self) -> None:
        """Restart the server whenever it dies, with backoff (in a thread: the daemon's loop is not touched)."""
        delay = RESTART_MIN_S
        while not self._stopping.is_set():
            proc = self.proc
            if proc is None:
                return
            started = time.monotonic()
            code = proc.wait()
            if self._stopping.is_set() or self.proc is not proc:
                return
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what it started (tritonserver, the proxies), if left
            if time.monotonic() - started > STABLE_AFTER_S:
                delay = RESTART_MIN_S
            self.restarts += 1
            logger.warning("the model server (pid %d) %s; restarting it in %.1f s", proc.pid, how, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_MAX_S)
            try:
                self._start()
            except StreamerError as exc:
                logger.error("the model server did not start again: %s", exc)

    def _start(self) -> str:
        from streamer.triton import TritonRunner, checkpoint_geometry, load_vocabulary

        python = os.path.expanduser(self.cfg.model_server.python) or sys.executable
        cmd = [python, "-m", "streamer", "model-server", *_set_args(self.cfg)]
        # its own session: stopping it stops Triton and the proxy processes it started
        try:
            self.proc = subprocess.Popen(cmd, start_new_session=True)
        except OSError as exc:
            raise StreamerError(f"cannot start the model server with model_server.python = {python!r}: "
                                f"{exc.strerror or exc}") from None
        vocab, source, name = load_vocabulary(self.cfg.model)
        probe = TritonRunner(self.cfg.model_server, self.url, vocab, name=name, source=source,
                             geometry=checkpoint_geometry(self.cfg.model, source))
        deadline = time.monotonic() + self.cfg.model_server.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise StreamerError(f"the model server exited with status {self.proc.returncode} while starting "
                                    "(see its log above)")
            try:
                probe.check(timeout_s=1.0)
                break
            except ModelLoadError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
        logger.info("model server ready at %s (pid %d)", self.url, self.proc.pid)
        return self.url

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server (and what it started); SIGKILL what is left after ``timeout_s``. No more restarts."""
        self._stopping.set()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the model server did not stop within %.0f s: killing it", timeout_s)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: tritonserver and the proxies, if any are left
        except ProcessLookupError:
            pass
        proc.wait()


def start_model_server(cfg: Config) -> tuple[Config, ModelServerProcess | None]:
    """With ``model_server.kind = "triton"`` and no ``url``: start a model server; return ``cfg`` with its url.

    Otherwise ``(cfg, None)``. Call :meth:`ModelServerProcess.stop` on the process last.
    """
    ms = cfg.model_server
    if ms.kind != "triton" or ms.url:
        return cfg, None
    server = ModelServerProcess(cfg)
    url = server.start()
    return cfg.replace(model_server=replace(server.cfg.model_server, url=url)), server


def open_runner(cfg: Config) -> Runner:
    """The model in this process (``model_server.kind = "local"``), or a client of the model server at ``url``."""
    if cfg.model_server.kind == "triton":
        from streamer.triton import connect_runner

        return connect_runner(cfg)
    from streamer.model import load_model

    return load_model(cfg.model, max_batch=cfg.worker.max_batch)
