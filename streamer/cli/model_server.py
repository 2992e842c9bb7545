"""``streamer model-server``: the model on a Triton Inference Server, for front-ends on this or other machines."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streamer.cli import add_config_args, cli_overrides


def register(sub: Any) -> None:
    p = sub.add_parser(
        "model-server",
        help="serve the model to streamer front-ends through NVIDIA Triton (one per GPU)",
        description="Load model.id once on model.device and serve it over Triton's gRPC API "
        "([model_server] host, grpc_port; HTTP on http_port, Prometheus metrics on metrics_port), with a "
        "dynamic batcher that merges the windows of every front-end (model_server.max_batch, "
        "max_queue_delay_ms). Front-ends use it with model_server.kind = \"triton\" and model_server.url = "
        "HOST:GRPC_PORT, and read the same checkpoint's vocabulary. Needs pip install 'streamer[triton-server]' "
        "(PyTriton, which holds numpy below 2: best in an environment of its own). "
        "SIGTERM or Ctrl-C stops it.",
    )
    add_config_args(p)
    p.add_argument("--host", dest="ms_host", help="listen address (model_server.host)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (model_server.grpc_port)")
    p.add_argument("--http-port", type=int, help="HTTP port (model_server.http_port)")
    p.add_argument("--metrics-port", type=int, help="metrics port (model_server.metrics_port)")
    p.add_argument("--memo", type=int, default=0, metavar="N",
                   help="benchmarks only: answer a window seen before, byte for byte, from memory (the last N "
                   "windows), so one CPU serves a trained model's outputs to a load test's many streams of the "
                   "same speech (clients/loadtest.py; with streamer -v it logs its hits and misses when it "
                   "stops); 0 = off (default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamer.config import load_config

    overrides = cli_overrides(args)
    for dest, key in (("ms_host", "host"), ("grpc_port", "grpc_port"), ("http_port", "http_port"),
                      ("metrics_port", "metrics_port")):
        if getattr(args, dest) is not None:
            overrides.setdefault("model_server", {})[key] = getattr(args, dest)
    cfg = load_config(args.config, overrides)
    from streamer.aio.processes.model_server import free_ports, serve_model

    cfg = free_ports(cfg)
    ms = cfg.model_server

    def ready(version: int) -> None:
        print(f"streamer model-server: {ms.model_name!r} version {version} on grpc {ms.host}:{ms.grpc_port}, "
              f"http {ms.http_port}, metrics {ms.metrics_port}", file=sys.stderr, flush=True)

    serve_model(cfg, ready=ready, memo=args.memo)
    return 0
