"""The demo model's n-gram language model: an ARPA file from the training grammar's sentences.

No maintained ARPA writer installs from PyPI without compiling KenLM's ``lmplz`` (the ``kenlm`` wheel
only queries), so this is a small writer: interpolated absolute discounting (Ney's discount
``D = n1 / (n1 + 2 n2)`` per order), written as an ARPA back-off model whose seen n-grams carry the
interpolated probability and whose contexts carry the back-off weight of the unseen mass, so every
context's distribution sums to one (``tests/test_lm.py`` checks that through KenLM).

    python -m recipes.demo.lm --out streamer/models/demo/language_model   # lm.arpa, attrs.json, unigrams.txt

The sentences are ``recipes.demo.data``'s training split only (dev and test sentences are other
sentences of the same grammar), so the held-out manifests stay held out.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["ngram_counts", "write_arpa", "main"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
UNK_SHARE = 0.001
"""the share of the unigram mass kept for words outside the text (``<unk>``)"""


def ngram_counts(sentences: Iterable[str], order: int) -> list[Counter[tuple[str, ...]]]:
    """Counts of the 1- to ``order``-grams of the sentences, each padded with ``<s>`` and ``</s>``."""
    counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order)]
    for sentence in sentences:
        words = [BOS, *sentence.split(), EOS]
        for n in range(1, order + 1):
            for i in range(len(words) - n + 1):
                gram = tuple(words[i : i + n])
                if n == 1 and gram == (BOS,):
                    continue
                counts[n - 1][gram] += 1
    return counts


def _discount(counts: Counter[tuple[str, ...]]) -> float:
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    return n1 / (n1 + 2 * n2) if n1 + n2 else 0.5


def write_arpa(sentences: Iterable[str], path: str | Path, order: int = 3, min_count: int = 1) -> dict[int, int]:
    """Write an ARPA model of ``sentences``; returns the number of n-grams per order.

    ``min_count``: n-grams of order 2 and up seen fewer times are left out (their probability comes from
    the back-off), which keeps the file small; a kept n-gram's prefix and suffix are always kept too
    (they were seen at least as often).
    """
    if order < 1:
        raise ValueError("order must be at least 1")
    counts = ngram_counts(sentences, order)
    if not counts[0]:
        raise ValueError("no words to model")
    # unigrams: relative frequencies, with a small share for <unk>
    total = sum(counts[0].values())
    probs: list[dict[tuple[str, ...], float]] = [
        {g: (1 - UNK_SHARE) * c / total for g, c in counts[0].items()}]
    probs[0][(UNK,)] = UNK_SHARE
    backoffs: list[dict[tuple[str, ...], float]] = [{} for _ in range(order)]
    for n in range(2, order + 1):
        grams = counts[n - 1]
        d = _discount(grams)
        context_total: Counter[tuple[str, ...]] = Counter()
        followers: Counter[tuple[str, ...]] = Counter()
        for g, c in grams.items():
            context_total[g[:-1]] += c
            followers[g[:-1]] += 1
        level: dict[tuple[str, ...], float] = {}
        kept_mass: dict[tuple[str, ...], float] = defaultdict(float)  # per context: the kept n-grams' probabilities
        lower_mass: dict[tuple[str, ...], float] = defaultdict(float)  # and their lower-order probabilities
        for g, c in grams.items():
            if c < min_count:
                continue
            h = g[:-1]
            lower = _prob(probs, backoffs, g[1:])
            gamma = d * followers[h] / context_total[h]
            level[g] = (c - d) / context_total[h] + gamma * lower
            kept_mass[h] += level[g]
            lower_mass[h] += lower
        probs.append(level)
        # the back-off weight spreads what the kept n-grams leave over the words they do not cover
        for h in context_total:
            if h in probs[n - 2] or n == 2:
                rest = 1.0 - lower_mass[h]
                backoffs[n - 2][h] = max(1.0 - kept_mass[h], 1e-12) / rest if rest > 1e-12 else 1.0
    sizes = {n + 1: len(probs[n]) + (1 if n == 0 else 0) for n in range(order)}  # + <s> in the 1-grams
    with open(path, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        for n in range(1, order + 1):
            f.write(f"ngram {n}={sizes[n]}\n")
        for n in range(1, order + 1):
            f.write(f"\n\\{n}-grams:\n")
            rows = sorted(probs[n - 1].items())
            if n == 1:
                rows = [((BOS,), 0.0), *rows]
            for g, p in rows:
                logp = -99.0 if g == (BOS,) else math.log10(p)
                line = f"{logp:.6f}\t{' '.join(g)}"
                if n < order and g in backoffs[n - 1]:
                    line += f"\t{math.log10(backoffs[n - 1][g]):.6f}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")
    return sizes


def _prob(probs: list[dict[tuple[str, ...], float]], backoffs: list[dict[tuple[str, ...], float]],
          gram: tuple[str, ...]) -> float:
    """P(last word | the others) by the orders written so far, backing off as an ARPA reader does."""
    n = len(gram)
    if n == 1:
        return probs[0].get(gram, probs[0][(UNK,)])
    if gram in probs[n - 1]:
        return probs[n - 1][gram]
    return backoffs[n - 2].get(gram[:-1], 1.0) * _prob(probs, backoffs, gram[1:])


def training_sentences(n: int, seed: int) -> list[str]:
    """``n`` sentences of the grammar's training split (the text the acoustic model was trained on)."""
    import numpy as np

    from recipes.demo.data import make_sentence

    rng = np.random.default_rng([seed, 18])
    return [make_sentence(rng, "train") for _ in range(n)]


def tune(folder: Path, manifest: Path, alphas: Sequence[float], betas: Sequence[float],
         limit: int = 0) -> tuple[float, float]:
    """Offline WER on a dev manifest for each (alpha, beta), decoding with the demo model's word list and the
    LM in ``folder`` (and without the list: reported only); writes the best pair for the list into attrs.json."""
    import dataclasses

    from streamer.config import Config, ModelConfig
    from streamer.decoder import build_decoder
    from streamer.evaluation import load_16k, read_manifest
    from streamer.model import load_model
    from streamer.scoring import ErrorRate

    items = read_manifest(manifest)[: limit or None]
    runner = load_model(ModelConfig(id="demo", device="cpu"))
    lps = [runner.run([load_16k(i.audio)])[0] for i in items]
    base = Config().decoder
    results: dict[tuple[float, float], tuple[float, float]] = {}
    for alpha in alphas:
        for beta in betas:
            wer = []
            for words in ("auto", ""):
                cfg = dataclasses.replace(base, words=words, lm=str(folder), lm_weight=alpha, lm_word_score=beta)
                dec = build_decoder(cfg, runner)
                assert dec is not None
                er = ErrorRate()
                for item, lp in zip(items, lps, strict=True):
                    er.add(item.text, " ".join(w.word for w in dec.decode(lp)))
                wer.append(er.wer)
            results[(alpha, beta)] = (wer[0], wer[1])
            print(f"alpha {alpha:5.2f} beta {beta:5.2f}: WER with the word list {100 * wer[0]:6.2f} %, "
                  f"without {100 * wer[1]:6.2f} %", flush=True)
    best = min(results, key=lambda k: (results[k][0], results[k][1]))
    attrs_path = folder / "attrs.json"
    attrs = json.loads(attrs_path.read_text()) if attrs_path.is_file() else {}
    attrs.update(alpha=best[0], beta=best[1])
    attrs_path.write_text(json.dumps(attrs, indent=2) + "\n", encoding="utf-8")
    print(f"best with the word list: alpha {best[0]}, beta {best[1]} -> {attrs_path}")
    return best


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.demo.lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the language_model/ folder to write")
    p.add_argument("-n", "--sentences", type=int, default=200_000, help="training sentences (default 200000)")
    p.add_argument("--order", type=int, default=3, help="n-gram order (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sentences (default 0)")
    p.add_argument("--min-count", type=int, default=2,
                   help="leave out 2-grams and longer seen fewer times (default 2: keeps the file small)")
    p.add_argument("--alpha", type=float, default=0.5, help="attrs.json alpha (LM weight; tune on dev)")
    p.add_argument("--beta", type=float, default=1.0, help="attrs.json beta (word score; tune on dev)")
    p.add_argument("--tune", type=Path, metavar="MANIFEST",
                   help="instead: tune alpha and beta of the LM in --out on this dev manifest (offline WER with the "
                   "demo model's word list) and write the best into its attrs.json")
    p.add_argument("--alphas", default="0.1,0.2,0.3,0.5,0.8,1.2", help="--tune: alphas to try")
    p.add_argument("--betas", default="-1,0,1,2,3", help="--tune: betas to try")
    p.add_argument("--limit", type=int, default=0, help="--tune: only the first N utterances")
    a = p.parse_args(argv)
    if a.tune:
        tune(a.out, a.tune, [float(x) for x in a.alphas.split(",")], [float(x) for x in a.betas.split(",")], a.limit)
        return 0
    from recipes.demo.data import vocabulary

    a.out.mkdir(parents=True, exist_ok=True)
    sentences = training_sentences(a.sentences, a.seed)
    sizes = write_arpa(sentences, a.out / "lm.arpa", a.order, a.min_count)
    words = sorted(set(vocabulary()) | {w for s in sentences for w in s.split()})
    (a.out / "unigrams.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    attrs = {"alpha": a.alpha, "beta": a.beta, "unk_score_offset": -10.0, "score_boundary": True}
    (a.out / "attrs.json").write_text(json.dumps(attrs, indent=2) + "\n", encoding="utf-8")
    print(f"{a.out / 'lm.arpa'}: " + ", ".join(f"{v} {k}-grams" for k, v in sizes.items())
          + f" from {len(sentences)} sentences")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
