"""Weighted average of checkpoints of one architecture (a "model soup"), saved in the plain HF layout.

    python -m recipes.demo.average --out DIR run1/model:0.25 run2/model:0.75

The tokenizer, feature extractor and ``words.txt`` files are copied from the first model.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

__all__ = ["average", "main"]

COPY = ["vocab.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json", "words.txt"]


def average(models: Sequence[tuple[Path, float]], out: Path) -> None:
    import torch
    from transformers import Wav2Vec2ForCTC

    total = sum(w for _, w in models)
    base = Wav2Vec2ForCTC.from_pretrained(models[0][0])
    acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in base.state_dict().items()}
    for path, weight in models:
        sd = Wav2Vec2ForCTC.from_pretrained(path).state_dict()
        for k, v in sd.items():
            acc[k] += v.double() * (weight / total)
    ref = base.state_dict()
    base.load_state_dict({k: v.to(ref[k].dtype) for k, v in acc.items()})
    out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(out)
    for name in COPY:
        src = models[0][0] / name
        if src.is_file():
            shutil.copy(src, out / name)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.demo.average", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="DIR:WEIGHT", help="model directory and its weight")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    a = p.parse_args(argv)
    models = []
    for spec in a.models:
        path, _, weight = spec.rpartition(":")
        if not path:
            path, weight = spec, "1"
        models.append((Path(path), float(weight)))
    average(models, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
