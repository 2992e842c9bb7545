"""Train the demo Wav2Vec2ForCTC from scratch on espeak-ng speech.

The recipe: a small wav2vec2 in the XLSR layout (``feat_extract_norm="layer"``, ``do_stable_layer_norm=True``,
the standard 7-layer conv front end with its 320-sample stride), a character vocabulary (``<pad>`` = CTC
blank, ``<unk>``, ``|`` = word delimiter, apostrophe, a-z), per-utterance zero-mean/unit-variance input as
``Wav2Vec2FeatureExtractor(do_normalize=True)`` does it, batches of similar length with an attention mask,
AdamW with linear warmup and cosine decay, CTC loss (mean, ``zero_infinity``), SpecAugment time masks, and
fresh augmentation every epoch (silence, gain, white/pink/brown noise at 10-30 dB SNR).

Streaming consistency (``--window-weight``): the streaming engine runs the model on windows cut on the
320-sample frame grid, each normalised on its own, that start and end inside words. Each batch therefore
also cuts one such window from every utterance (1-4 s, a fifth of them at the start of the utterance, as a
stream's first windows) and adds the KL divergence from the whole-utterance output (detached) to the
window's output over the frames that see the same samples. No alignments are needed. Measured on the demo
model (its README), the effect is modest: most of its streaming/offline gap came from the schedule's
look-ahead and from endpointing, not from what this loss trains.

With no data directory present, it first generates the data (:mod:`recipes.demo.data`). A checkpoint is
written after every epoch (``--resume`` continues from it); the best epoch on the dev set (by WER, then CER)
is saved with ``save_pretrained`` into ``--out`` in the plain Hugging Face layout, together with
``words.txt``, ``training.json`` (arguments, history) and ``curve.png`` (loss and error rates per epoch).

The defaults train on the CPU for about an hour (6000 utterances generated in a few minutes, then 55 minutes
of training whose learning-rate schedule is tied to the clock, so it ends on time on any machine), from the
repository root::

    python -m recipes.demo.train --out data/model

That is a smoke-scale run (measured: dev WER 91 % greedy, 77 % with the word list, CER 49 %). The shipped
model (``streamer/models/demo``) was trained on a GPU with far more data and then fine-tuned on the CPU; its
README gives the exact commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recipes.demo import data as D
from streamer.engine import FRAME_SAMPLES as FRAME
from streamer.engine import RECEPTIVE_FIELD as RECEPTIVE
from streamer.scoring import ErrorRate
from streamer.testing import ModelShape, processor, random_model, save_checkpoint

__all__ = ["VOCAB", "build_model", "main"]

VOCAB = ["<pad>", "<unk>", "|", "'", *"abcdefghijklmnopqrstuvwxyz"]
CHAR_ID = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    return [CHAR_ID["|"] if c == " " else CHAR_ID.get(c, CHAR_ID["<unk>"]) for c in text]


def greedy_decode(ids: Sequence[int]) -> str:
    out = []
    prev = -1
    for i in ids:
        if i != prev and i != 0:
            out.append(" " if i == CHAR_ID["|"] else VOCAB[i] if i > 2 else "")
        prev = i
    return " ".join("".join(out).split())


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

def build_model(args: argparse.Namespace) -> Any:
    """A fresh Wav2Vec2ForCTC of the recipe's shape, with its dropout and SpecAugment settings (torch's
    generator as it is: :func:`train` seeds it)."""
    shape = ModelShape("layer", args.layers, args.hidden, args.heads, args.ffn, args.conv_dim)
    return random_model(
        VOCAB, shape, seed=None,
        bos_token_id=None,
        eos_token_id=None,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=args.mask_time_prob,
        mask_time_length=args.mask_time_length,
        mask_feature_prob=0.0,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
    )


def save_hf(model: Any, out: Path, words: list[str]) -> None:
    """``save_pretrained`` of model, tokenizer and feature extractor, plus special_tokens_map and words."""
    tok, fe = processor(VOCAB, norm="layer", bos_token=None, eos_token=None, do_lower_case=False)
    save_checkpoint(out, model, tok, fe)
    (out / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")
    (out / "words.txt").write_text("\n".join(words) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------

class Corpus:
    """Clean int16 audio + transcripts, held in memory."""

    def __init__(self, path: Path) -> None:
        audio, self.utts = D.load_dataset(path)
        self.audio = np.asarray(audio)
        self.labels = [np.array(encode(u.text), dtype=np.int64) for u in self.utts]
        self.lengths = np.array([u.length for u in self.utts])

    def __len__(self) -> int:
        return len(self.utts)

    def batches(self, max_samples: int, rng: np.random.Generator | None, pad: int) -> list[np.ndarray]:
        """Index batches of similar length, at most ``max_samples`` padded samples each (shuffled if rng)."""
        keys = self.lengths + (rng.uniform(0, 0.1 * D.SAMPLE_RATE, len(self)) if rng is not None else 0)
        order = np.argsort(keys, kind="stable")
        out: list[np.ndarray] = []
        cur: list[int] = []
        for i in order:
            longest = max(self.lengths[cur[0]] if cur else 0, self.lengths[i]) + pad
            if cur and longest * (len(cur) + 1) > max_samples:
                out.append(np.array(cur))
                cur = []
            cur.append(int(i))
        if cur:
            out.append(np.array(cur))
        if rng is not None:
            rng.shuffle(out)
        return out


def sample_windows(lengths: np.ndarray, rng: np.random.Generator, frames: tuple[int, int],
                   at_start: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """One streaming window per row: ``(start, length)`` in samples, on the engine's 320-sample grid.

    A window holds ``m`` frames (``320·m + 80`` samples, as the engine's steady-state windows), ``m``
    drawn uniformly from ``frames``; it starts on a frame boundary anywhere in the row (at sample 0 with
    probability ``at_start``, like a stream's first windows) and is cut short where the row is.
    """
    n = len(lengths)
    m = rng.integers(frames[0], frames[1] + 1, n)
    size = np.minimum(FRAME * m + RECEPTIVE - FRAME, lengths)
    slots = (lengths - size) // FRAME + 1
    start = FRAME * (rng.random(n) * slots).astype(np.int64)
    start[rng.random(n) < at_start] = 0
    return start, size


def make_batch(corpus: Corpus, idx: np.ndarray, rng: np.random.Generator,
               silence: tuple[float, float], windows: tuple[int, int] | None = None) -> dict[str, Any]:
    """Padded clean audio with random leading/trailing silence, and the per-row augmentation parameters."""
    n = len(idx)
    lead = (rng.uniform(*silence, n) * D.SAMPLE_RATE).astype(np.int64)
    tail = (rng.uniform(*silence, n) * D.SAMPLE_RATE).astype(np.int64)
    lengths = corpus.lengths[idx] + lead + tail
    x = np.zeros((n, int(lengths.max())), np.float32)
    for r, i in enumerate(idx):
        u = corpus.utts[i]
        x[r, lead[r]:lead[r] + u.length] = corpus.audio[u.offset:u.offset + u.length]
    x /= 32768.0
    labels = [corpus.labels[i] for i in idx]
    lab = np.full((n, max(len(a) for a in labels)), -100, np.int64)
    for r, a in enumerate(labels):
        lab[r, :len(a)] = a
    batch = {
        "audio": x, "lengths": lengths, "speech": (lead, lead + corpus.lengths[idx]), "labels": lab,
        "level": rng.uniform(0.05, 0.9, n), "snr": rng.uniform(10.0, 30.0, n),
        "alpha": rng.choice([0.0, 0.5, 1.0], n), "clean": rng.random(n) < 0.1,
        "seed": int(rng.integers(2**31)),
    }
    if windows is not None:
        batch["windows"] = sample_windows(lengths, rng, windows)
    return batch


def normalise(x: Any, valid: Any) -> Any:
    """Zero mean, unit variance per row over the valid samples, zeros beyond (as the feature extractor)."""
    import torch

    x = x * valid
    count = valid.sum(1, keepdim=True)
    mean = x.sum(1, keepdim=True) / count
    var = ((x - mean).square() * valid).sum(1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + 1e-7) * valid


def to_inputs(batch: dict[str, Any], device: Any, augment: bool) -> tuple[Any, Any, Any, Any]:
    """Augment on ``device`` (gain, coloured noise at an SNR), normalise each row, build the mask.

    Returns ``(inputs, attention_mask, labels, augmented)``: ``augmented`` is the signal before the
    normalisation, from which :func:`window_inputs` cuts streaming windows.
    """
    import torch

    x = torch.from_numpy(batch["audio"]).to(device, non_blocking=True)
    n, t = x.shape
    lengths = torch.from_numpy(batch["lengths"]).to(device)
    pos = torch.arange(t, device=device)
    valid = pos[None, :] < lengths[:, None]
    if augment:
        s0, s1 = (torch.from_numpy(a).to(device) for a in batch["speech"])
        speech = (pos[None, :] >= s0[:, None]) & (pos[None, :] < s1[:, None])
        peak = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
        x = x * (torch.from_numpy(batch["level"]).to(device, torch.float32)[:, None] / peak)
        power = (x.square() * speech).sum(1) / speech.sum(1).clamp_min(1)
        gen = torch.Generator(device=device).manual_seed(batch["seed"])
        white = torch.randn(n, t, device=device, generator=gen)
        spec = torch.fft.rfft(white, dim=1)
        f = torch.arange(spec.shape[1], device=device, dtype=torch.float32).clamp_min(1.0)
        alpha = torch.from_numpy(batch["alpha"]).to(device, torch.float32)
        noise = torch.fft.irfft(spec / f[None, :] ** alpha[:, None], n=t, dim=1)
        noise = noise / noise.std(dim=1, keepdim=True).clamp_min(1e-8)
        snr = torch.from_numpy(batch["snr"]).to(device, torch.float32)
        scale = torch.sqrt(power / 10 ** (snr / 10))
        scale = scale * (~torch.from_numpy(batch["clean"]).to(device))
        x = (x + noise * scale[:, None]).clamp(-1.0, 1.0)
    labels = torch.from_numpy(batch["labels"]).to(device)
    return normalise(x, valid), valid.long(), labels, x


def window_inputs(augmented: Any, batch: dict[str, Any], min_right: int) -> tuple[Any, Any, Any, Any]:
    """The batch's streaming windows, each normalised on its own as the engine does.

    Returns ``(inputs, attention_mask, frames, weight)``: ``frames[r, k]`` is the frame of the whole-row
    pass that frame ``k`` of window ``r`` covers (the same samples), and ``weight`` selects the frames that
    count in the consistency loss: all real frames of the window except its last ``min_right`` (which the
    engine only shows as partials), unless the window reaches the end of its row.
    """
    import torch

    device = augmented.device
    start, size = (torch.from_numpy(a).to(device) for a in batch["windows"])
    lengths = torch.from_numpy(batch["lengths"]).to(device)
    width = int(size.max())
    pos = torch.arange(width, device=device)
    valid = pos[None, :] < size[:, None]
    index = (start[:, None] + pos[None, :]).clamp_max(augmented.shape[1] - 1)
    x = normalise(torch.gather(augmented, 1, index), valid)
    n_win = (size - RECEPTIVE) // FRAME + 1
    k = torch.arange(int(n_win.max()), device=device)
    frames = start[:, None] // FRAME + k[None, :]
    at_end = start + size > lengths - FRAME
    keep = torch.where(at_end, n_win, (n_win - min_right).clamp_min(0))
    weight = (k[None, :] < keep[:, None]).float()
    return x, valid.long(), frames, weight


def consistency_loss(teacher_logits: Any, student_logits: Any, frames: Any, weight: Any) -> Any:
    """KL(teacher ‖ student) per frame, averaged over the weighted frames.

    The teacher is the whole-utterance pass (detached): the loss pulls each window's output towards what
    the model says with the whole utterance in view, so streaming and offline transcripts agree.
    """
    import torch

    t = teacher_logits.detach().float().log_softmax(-1)
    idx = frames.clamp_max(t.shape[1] - 1)
    t = torch.gather(t, 1, idx[:, :, None].expand(-1, -1, t.shape[2]))
    s = student_logits.float().log_softmax(-1)[:, : idx.shape[1]]
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * weight).sum() / weight.sum().clamp_min(1.0)


def prefetch(it: Iterator[Any], size: int = 4) -> Iterator[Any]:
    """Run ``it`` in a background thread (batch assembly overlaps the model's work)."""
    q: queue.Queue[Any] = queue.Queue(size)
    end = object()

    def work() -> None:
        for item in it:
            q.put(item)
        q.put(end)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not end:
        yield item


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return float(args.lr * warm * (args.final_lr_ratio + (1 - args.final_lr_ratio) * cos))


def evaluate(model: Any, corpus: Corpus, args: argparse.Namespace, device: Any) -> dict[str, float]:
    import torch

    from streamer.lexicon import Lexicon

    model.eval()
    rng = np.random.default_rng([args.seed, 7])  # the same dev conditions every epoch
    errors, listed = ErrorRate(), ErrorRate()
    lexicon = Lexicon(D.vocabulary(), CHAR_ID, CHAR_ID["<pad>"], CHAR_ID["|"])  # as streamer decodes it
    loss_sum, n = 0.0, 0
    with torch.inference_mode():
        for idx in corpus.batches(args.batch_samples, None, int(1.0 * D.SAMPLE_RATE)):
            batch = make_batch(corpus, idx, rng, (args.silence[0], args.silence[1]))
            x, mask, labels, _ = to_inputs(batch, device, augment=True)
            with autocast(args, device):
                out = model(x, attention_mask=mask, labels=labels)
            loss_sum += float(out.loss) * len(idx)
            n += len(idx)
            log_probs = torch.log_softmax(out.logits.float(), -1).cpu().numpy()
            frames = model._get_feat_extract_output_lengths(torch.from_numpy(batch["lengths"])).numpy()
            for r, i in enumerate(idx):
                lp = log_probs[r, : frames[r]]
                errors.add(corpus.utts[i].text, greedy_decode(lp.argmax(-1).tolist()))
                listed.add(corpus.utts[i].text, " ".join(w.word for w in lexicon.decode(lp)))
    model.train()
    return {"dev_loss": loss_sum / max(1, n), "dev_wer": errors.wer, "dev_cer": errors.cer,
            "dev_wer_words": listed.wer}


def autocast(args: argparse.Namespace, device: Any) -> Any:
    import contextlib

    import torch

    if args.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["dev_loss"] for h in history], label="dev")
    a.set_yscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("CTC loss")
    a.legend()
    b.plot(ep, [100 * h["dev_wer"] for h in history], label="dev WER")
    b.plot(ep, [100 * h["dev_cer"] for h in history], label="dev CER")
    if all("dev_wer_words" in h for h in history):  # histories from before the word list lack it
        b.plot(ep, [100 * h["dev_wer_words"] for h in history], label="dev WER, word list")
    b.set_yscale("log")
    b.set_xlabel("epoch")
    b.set_ylabel("%")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ensure_data(args: argparse.Namespace) -> tuple[Path, Path]:
    train_dir, dev_dir = args.data / "train", args.data / "dev"
    for d, split, n, seed in ((train_dir, "train", args.train_utts, args.seed),
                              (dev_dir, "dev", args.dev_utts, args.seed)):
        if not (d / "index.jsonl").is_file():
            print(f"generating {n} {split} utterances into {d}", file=sys.stderr)
            D.generate(d, split, n, seed, args.jobs, progress=not args.quiet)
    return train_dir, dev_dir


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train_dir, dev_dir = ensure_data(args)
    corpus, dev = Corpus(train_dir), Corpus(dev_dir)
    hours = corpus.lengths.sum() / D.SAMPLE_RATE / 3600
    print(f"train: {len(corpus)} utterances, {hours:.2f} h; dev: {len(dev)}", file=sys.stderr)

    model = build_model(args)
    if args.init_from is not None:
        from transformers import Wav2Vec2ForCTC

        init = Wav2Vec2ForCTC.from_pretrained(args.init_from)
        model.load_state_dict(init.state_dict())
        print(f"initialised from {args.init_from}", file=sys.stderr)
    model = model.to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters", file=sys.stderr)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "masked_spec_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "masked_spec_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98),
                            eps=1e-8, **({"fused": True} if device.type == "cuda" else {}))

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.work / "last.pt"
    state: dict[str, Any] = {"epoch": 0, "step": 0, "elapsed": 0.0, "history": [], "best": None}
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        print(f"resumed after epoch {state['epoch']}", file=sys.stderr)

    steps_per_epoch = len(corpus.batches(args.batch_samples, np.random.default_rng(0), 0))
    total_steps = steps_per_epoch * args.epochs
    budget = args.time_budget * 60 if args.time_budget else None
    model.train()
    best_state = None
    t_start = time.perf_counter() - state["elapsed"]
    stop = False
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        if budget and time.perf_counter() - t_start >= budget:
            break
        rng = np.random.default_rng([args.seed, epoch])
        torch.manual_seed(args.seed * 1000 + epoch)
        np.random.seed((args.seed * 1000 + epoch) % 2**32)  # SpecAugment masks (transformers uses numpy)
        batches = corpus.batches(args.batch_samples, rng, int(2 * args.silence[1] * D.SAMPLE_RATE))
        seeds = rng.integers(2**63, size=len(batches))
        win = (args.window_frames[0], args.window_frames[1]) if args.window_weight > 0 else None
        gen = (make_batch(corpus, b, np.random.default_rng(s), (args.silence[0], args.silence[1]), win)
               for b, s in zip(batches, seeds, strict=True))
        bar = tqdm(prefetch(gen), total=len(batches), desc=f"epoch {epoch}/{args.epochs}", unit="batch",
                   disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
        loss_sum, n_sum = 0.0, 0
        for batch in bar:
            elapsed = time.perf_counter() - t_start
            progress = state["step"] / max(1, total_steps)
            if budget:
                progress = max(progress, elapsed / budget)
            if budget and elapsed >= budget:
                stop = True
                break
            lr = lr_at(progress, state["step"], args)
            for g in opt.param_groups:
                g["lr"] = lr
            x, mask, labels, augmented = to_inputs(batch, device, augment=True)
            with autocast(args, device):
                out = model(x, attention_mask=mask, labels=labels)
            loss = out.loss
            if args.window_weight > 0:
                wx, wmask, frames, weight = window_inputs(augmented, batch, args.window_min_right)
                with autocast(args, device):
                    wout = model(wx, attention_mask=wmask)
                loss = loss + args.window_weight * consistency_loss(out.logits, wout.logits, frames, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            state["step"] += 1
            if state["step"] % 10 == 0 or device.type == "cpu":
                lv = loss.item()
                loss_sum += lv * len(batch["lengths"])
                n_sum += len(batch["lengths"])
                bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.2e}")
                if args.quiet and state["step"] % args.log_every == 0:
                    print(f"step {state['step']} loss {lv:.3f} lr {lr:.2e} {elapsed:.0f}s", file=sys.stderr,
                          flush=True)
        bar.close()
        metrics = evaluate(model, dev, args, device)
        state["elapsed"] = time.perf_counter() - t_start
        state["epoch"] = epoch
        rec = {"epoch": epoch, "step": state["step"], "train_loss": loss_sum / max(1, n_sum),
               "seconds": round(state["elapsed"], 1), **metrics}
        state["history"].append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        score = (metrics["dev_wer"], metrics["dev_cer"])
        if state["best"] is None or score <= tuple(state["best"]["score"]):
            state["best"] = {"epoch": epoch, "score": list(score)}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            torch.save(best_state, args.work / "best.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt_path)
        plot(state["history"], args.work / "curve.png")
        if stop:
            break

    if best_state is None:
        best_state = torch.load(args.work / "best.pt", map_location="cpu")
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    save_hf(model, args.out, D.vocabulary())
    plot(state["history"], args.out / "curve.png")
    summary = {
        "parameters": params, "train_utterances": len(corpus), "train_hours": round(float(hours), 3),
        "best_epoch": state["best"]["epoch"], "seconds": round(state["elapsed"], 1), "device": str(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "history": state["history"],
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipes.demo.train",
        description="Train the demo Wav2Vec2ForCTC from scratch on espeak-ng speech (defaults: ~1 h on a "
                    "2-core CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=Path("data/espeak"),
                   help="data directory with train/ and dev/ (generated there when missing)")
    g.add_argument("--train-utts", type=int, default=6000, help="training utterances to generate")
    g.add_argument("--dev-utts", type=int, default=300, help="dev utterances to generate")
    g.add_argument("-j", "--jobs", type=int, default=os.cpu_count(), help="parallel espeak-ng processes")
    g.add_argument("--silence", type=float, nargs=2, default=[0.0, 0.5], metavar=("MIN", "MAX"),
                   help="seconds of leading and of trailing silence added, each drawn uniformly")
    g = p.add_argument_group("model")
    g.add_argument("--conv-dim", type=int, default=128, help="channels of each of the 7 conv layers")
    g.add_argument("--hidden", type=int, default=256, help="transformer width")
    g.add_argument("--layers", type=int, default=5, help="transformer layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--ffn", type=int, default=768, help="feed-forward width")
    g.add_argument("--dropout", type=float, default=0.05, help="hidden and attention dropout")
    g.add_argument("--mask-time-prob", type=float, default=0.05, help="SpecAugment time-mask probability")
    g.add_argument("--mask-time-length", type=int, default=5, help="SpecAugment time-mask length (frames)")
    g = p.add_argument_group("streaming consistency")
    g.add_argument("--window-weight", type=float, default=1.0,
                   help="weight of the loss that makes each streaming window's output (cut on the 320-sample "
                        "grid, normalised on its own) match the whole-utterance output; 0 = off")
    g.add_argument("--window-frames", type=int, nargs=2, default=[50, 200], metavar=("MIN", "MAX"),
                   help="window lengths in 20 ms frames, drawn uniformly (the default schedule's window is 150)")
    g.add_argument("--window-min-right", type=int, default=10,
                   help="frames at a window's right edge (unless the utterance ends there) left out of that "
                        "loss")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30, help="at most this many epochs")
    g.add_argument("--batch-seconds", type=float, default=20.0, help="padded audio seconds per batch")
    g.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (AdamW)")
    g.add_argument("--final-lr-ratio", type=float, default=0.02, help="cosine decay floor, times --lr")
    g.add_argument("--warmup-steps", type=int, default=150)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=2.0, help="gradient norm clip")
    g.add_argument("--time-budget", type=float, default=55.0,
                   help="minutes of training (data generation not counted): the learning rate decays by time "
                        "or by steps, whichever is further along, and training stops when the time is up; "
                        "0 = no limit (then --epochs decides)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA")
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, default=Path("data/model"), help="output model directory")
    g.add_argument("--work", type=Path, default=None, help="checkpoint directory (default: OUT.work)")
    g.add_argument("--resume", action="store_true", help="continue from WORK/last.pt")
    g.add_argument("--init-from", type=Path, default=None,
                   help="start from the weights of a saved model directory (fine-tuning; fresh optimiser)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g.add_argument("--log-every", type=int, default=100, help="with --quiet: log a line every N steps")
    a = p.parse_args(argv)
    a.batch_samples = int(a.batch_seconds * D.SAMPLE_RATE)
    if a.work is None:
        a.work = a.out.with_name(a.out.name + ".work")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    summary = train(args)
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({k: summary[k] for k in ("parameters", "best_epoch", "seconds")} | last))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
