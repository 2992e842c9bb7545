"""``streamer export``: a checkpoint as ONNX (float32 and int8) for ``model.backend = "onnxruntime"``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from streamer.cli import add_config_args, load_cli_config


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (float32 and int8) for the onnxruntime backend",
        description="Write the model (--model, default the demo model) as ONNX: model.onnx (float32) and "
        "model.int8.onnx (linear layers quantised to int8), with dynamic batch and time axes, traced and checked "
        "at the schedule's window length, next to a copy of the checkpoint's tokenizer, feature-extractor and "
        "config files. Run it with --set model.id=DIR (model.backend = 'auto' sees the export) and --set "
        "model.dtype=int8 for the int8 model. Without --out the export goes where model.backend = 'onnxruntime' "
        "looks for it first (the cache), so a daemon started afterwards does not export at start-up. An up-to-date "
        "export is reused; a stale or broken one is made anew.",
    )
    add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="export directory (default: the cache, $XDG_CACHE_HOME/streamer/onnx)")
    p.add_argument("--force", action="store_true", help="export again even when DIR holds an up-to-date export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamer.onnx import FLOAT_FILE, INT8_FILE, cached_export_dir, export

    cfg = load_cli_config(args)
    out = Path(args.out) if args.out else cached_export_dir(cfg.model.id, cfg.model.revision)
    window = cfg.stream.schedule().window_samples
    info, made = export(cfg.model.id, out, revision=cfg.model.revision or None, window_samples=window,
                        force=args.force)
    files = info.data["files"]
    check = info.data["check"]
    print(f"{'exported' if made else 'up to date (reused)'}: {info.directory}")
    print(f"  {FLOAT_FILE:<18} {files[FLOAT_FILE] / 2**20:8.1f} MB   float32; log-probs within "
          f"{check['float32_max_logprob_diff']:.1e} of torch")
    print(f"  {INT8_FILE:<18} {files[INT8_FILE] / 2**20:8.1f} MB   int8 linear layers; frame argmax agrees with "
          f"torch on {100 * check['int8_argmax_agreement']:.1f} % of a check window (noise, not speech)")
    print(f"  traced and checked at {info.data['window_samples'] / 16000:.2f} s windows; the batch and time axes are "
          "dynamic")
    model = f"--model {info.directory}" if args.out else f"--model {cfg.model.id} --set model.backend=onnxruntime"
    print(f"run it:  streamer transcribe {model} [--set model.dtype=int8] FILE")
    print(f"before int8, check the accuracy on your audio:  streamer eval MANIFEST --model {cfg.model.id} "
          "--compare-backend onnxruntime:int8")
    return 0
