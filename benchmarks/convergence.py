"""Convergence on a real pre-trained model: all-MiniLM-L6-v2 fine-tuned for sentence sentiment.

Data: the movie-review snippets of Hutto & Gilbert (ICWSM 2014) that ship inside the source
distribution of ``vaderSentiment==3.3.2`` (``additional_resources/hutto_ICWSM_2014.tar.gz`` →
``movieReviewSnippets_GroundTruth.txt``: id, mean score in [-4, 4], sentence; label = score > 0).
Fetched once with ``pip download`` and cached under ``$FROD_CACHE`` (default ``~/.cache/frod_kernels``).
Split: a fixed permutation (seed 0) of the snippets; the last 500 are the test set, the rest
(10,105) the training set. Sentences are truncated to 32 tokens.

Model and methods: ``minilm`` (all-MiniLM-L6-v2, a mean-pooled linear head; frod, lora, lora_r8, full).
Every method gets the same steps, batch, data order, head init and seeds; AdamW, linear warm-up then
cosine; no learning-rate sweep was run here (``benchmarks/lr_sweep.sh`` runs a small one).

Reported per method: trainable parameters, training-loss curves (raw and EMA-smoothed), steps to
reach given loss levels and LoRA's final loss, test accuracy (mean ± std over seeds), seconds per
step. ``tiny=True`` swaps in a 2-layer random BERT and synthetic sentences (no files, no network):
the smoke test of this module.

    python -m benchmarks.convergence [--tiny] [--steps N] [--seeds S ...] [--methods M ...] [--lr METHOD=LR]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from frod_kernels.bench import runner
from frod_kernels.bench.timing import Progress

from .minilm import HEAD_LR, LEARNING_RATES, METHODS, encoder_factory, mean_std, minilm_dir, prepare, warmup_cosine
from .plots import plot_convergence

__all__ = ["build_parser", "cache_dir", "format_report", "load_movie_reviews", "main", "run_convergence"]

LOSS_LEVELS = (0.6, 0.5, 0.4)
_EMA = 0.9
_VADER = "vaderSentiment==3.3.2"


def cache_dir() -> Path:
    """``$FROD_CACHE`` or ``~/.cache/frod_kernels``."""
    return Path(os.environ.get("FROD_CACHE", Path.home() / ".cache" / "frod_kernels"))


def load_movie_reviews(cache: Path | None = None) -> list[tuple[str, int]]:
    """(sentence, label) pairs; downloads the vaderSentiment sdist once (pip) and caches a TSV."""
    cache = cache or cache_dir()
    tsv = cache / "movie_reviews.tsv"
    if not tsv.exists():
        cache.mkdir(parents=True, exist_ok=True)
        sdists = sorted(cache.glob("vaderSentiment-3.3.2.tar.gz"))
        if not sdists:
            pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", _VADER]
            subprocess.run([*pip, "-d", str(cache)], check=True)
            sdists = sorted(cache.glob("vaderSentiment-3.3.2.tar.gz"))
        with tarfile.open(sdists[0]) as outer:
            inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
            with tarfile.open(fileobj=io.BytesIO(inner.read())) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
        lines = []
        for line in raw.splitlines():
            parts = line.strip().split("\t")
            if len(parts) >= 3:
                lines.append(f"{int(float(parts[1]) > 0)}\t{parts[2].strip()}")
        tsv.write_text("\n".join(lines) + "\n")
    return [(text, int(label)) for label, text in (line.split("\t", 1) for line in tsv.read_text().splitlines())]


def _synthetic(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences of random words; the label says whether 'good' outnumbers 'bad'."""
    g = torch.Generator().manual_seed(seed)
    words = ["good", "bad", "film", "plot", "the", "a", "very", "not", "actor", "scene"]
    out = []
    for _ in range(n):
        idx = torch.randint(len(words), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
        sent = [words[i] for i in idx.tolist()]
        out.append((" ".join(sent), int(sent.count("good") > sent.count("bad"))))
    return out


def _setup(tiny: bool) -> tuple[Callable[[], nn.Module], Callable[[list[str]], dict], list, list, int]:
    """(encoder factory, tokenizer, train, test, hidden size)."""
    encoder, hidden, vocab = encoder_factory(tiny)
    if tiny:

        def tokenize(texts: list[str]) -> dict:
            ids = [[1, *[2 + zlib.crc32(w.encode()) % (vocab - 2) for w in t.split()][:14]] for t in texts]
            width = max(map(len, ids))
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]), "attention_mask": mask}

        data = _synthetic(160, 0)
        return encoder, tokenize, data[:128], data[128:], hidden
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())

    def tokenize(texts: list[str]) -> dict:
        enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    data = load_movie_reviews()
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    data = [data[i] for i in perm]
    return encoder, tokenize, data[:-500], data[-500:], hidden


def _steps_to(curve: Sequence[float], level: float) -> int | None:
    """First 1-based step at which ``curve`` is ≤ ``level`` (None if never)."""
    return next((i + 1 for i, v in enumerate(curve) if v <= level), None)


@torch.no_grad()
def _accuracy(model: nn.Module, tokenize, data, batch: int = 100) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch):
        texts, labels = zip(*data[i : i + batch], strict=True)
        correct += int((model(**tokenize(list(texts))).argmax(-1) == torch.tensor(labels)).sum())
    model.train()
    return 100.0 * correct / len(data)


def _train(method: str, seed: int, setup, steps: int, batch: int, lrs: dict, device: torch.device, progress) -> dict:
    make_encoder, tokenize, train, test, hidden = setup
    model, groups = prepare(method, make_encoder(), hidden, seed, lrs)
    model.to(device)
    for g in groups:
        g["base_lr"] = g.get("lr", HEAD_LR)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    losses, smoothed, ema = [], [], 0.0
    started = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * warmup_cosine(step, steps, max(1, steps // 10))
        idx = torch.randint(len(train), (batch,), generator=order).tolist()
        texts, labels = zip(*(train[i] for i in idx), strict=True)
        inputs = {k: v.to(device) for k, v in tokenize(list(texts)).items()}
        loss = nn.functional.cross_entropy(model(**inputs), torch.tensor(labels, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        ema = _EMA * ema + (1 - _EMA) * losses[-1]
        smoothed.append(ema / (1 - _EMA ** (step + 1)))  # bias-corrected EMA
        if progress is not None:
            progress.update(f"{method} seed {seed} loss {ema:.3f}")
    seconds = time.perf_counter() - started
    return {
        "seed": seed, "loss": losses, "smoothed_loss": smoothed, "seconds_per_step": seconds / steps,
        "test_accuracy": _accuracy(model, tokenize, test),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def run_convergence(
    device: torch.device | None = None, tiny: bool = False, steps: int | None = None,
    seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None, batch: int | None = None,
    learning_rates: dict | None = None, show_progress: bool = True,
) -> dict:
    """Train every method for every seed; curves, accuracies, timings and the targets (``_summarize``)."""
    device = device or torch.device("cpu")
    steps = steps or (6 if tiny else 100)
    seeds = list(seeds or ([0] if tiny else [0, 1, 2]))
    methods = list(methods or METHODS)
    batch = batch or (8 if tiny else 16)
    lrs = {**LEARNING_RATES, **(learning_rates or {})}
    setup = _setup(tiny)
    progress = Progress(steps * len(seeds) * len(methods), "convergence", enabled=show_progress)
    result = {
        "title": "tiny random BERT, synthetic" if tiny else "all-MiniLM-L6-v2, movie-review snippets",
        "smoke_run": tiny,
        "steps": steps, "batch": batch, "seeds": seeds, "train_size": len(setup[2]), "test_size": len(setup[3]),
        "learning_rates": {**lrs, "head": HEAD_LR}, "methods": {},
    }
    for method in methods:
        runs = [_train(method, seed, setup, steps, batch, lrs, device, progress) for seed in seeds]
        acc = mean_std([r["test_accuracy"] for r in runs])
        final = mean_std([r["smoothed_loss"][-1] for r in runs])
        result["methods"][method] = {
            "trainable": runs[0]["trainable"], "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
            "final_loss_mean": final[0], "final_loss_std": final[1],
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs), "runs": runs,
        }
    progress.close()
    _summarize(result, tiny)
    return result


def _mean_curve(m: dict) -> list[float]:
    curves = [r["smoothed_loss"] for r in m["runs"]]
    return [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]


def _summarize(result: dict, tiny: bool) -> None:
    """Steps to loss levels (on the seed-mean EMA curve) and the targets, not for a smoke run: FRoD reaches
    LoRA's final loss in at most half the steps; its test accuracy is at least LoRA's and within 1.5
    points of full fine-tuning's."""
    ms = result["methods"]
    levels = list(LOSS_LEVELS)
    if "lora" in ms:
        levels.append(ms["lora"]["final_loss_mean"])
    result["loss_levels"] = levels
    for m in ms.values():
        m["steps_to_level"] = [_steps_to(_mean_curve(m), level) for level in levels]
    if not tiny and {"frod", "lora", "full"} <= ms.keys():
        to_lora = ms["frod"]["steps_to_level"][-1]
        fr, lo, fu = (ms[k]["test_accuracy_mean"] for k in ("frod", "lora", "full"))
        result["targets"] = {
            "frod_steps_to_lora_final_fraction": None if to_lora is None else to_lora / result["steps"],
            "steps_target_met": to_lora is not None and to_lora <= 0.5 * result["steps"],
            "accuracy_vs_lora": fr - lo, "accuracy_vs_full": fr - fu,
            "accuracy_target_met": fr >= lo and fu - fr <= 1.5,
        }


def format_report(result: dict) -> str:
    """A table per method and a line on the targets."""
    levels = result["loss_levels"]
    names = [f"<={lv:.3f}" for lv in levels]
    head = (f"{'method':<8} {'trainable':>11} {'test acc %':>12} {'final loss':>11} {'s/step':>7} "
            + " ".join(f"{n:>8}" for n in names))
    lines = [f"{result['title']}: {result['steps']} steps, batch {result['batch']}, seeds {result['seeds']}, "
             f"train {result['train_size']}, test {result['test_size']}; steps to reach each EMA loss level "
             f"(last level = LoRA's final loss)", head, "-" * len(head)]
    for name, m in result["methods"].items():
        reach = " ".join(f"{'-' if s is None else s:>8}" for s in m["steps_to_level"])
        lines.append(
            f"{name:<8} {m['trainable']:>11,} {m['test_accuracy_mean']:6.2f} ± {m['test_accuracy_std']:4.2f} "
            f"{m['final_loss_mean']:11.3f} {m['seconds_per_step']:7.2f} {reach}"
        )
    t = result.get("targets")
    if result.get("smoke_run"):
        lines.append("targets: not assessed in a --tiny smoke run")
    elif t:
        frac = t["frod_steps_to_lora_final_fraction"]
        lines.append(
            f"targets: FRoD reaches LoRA's final loss at {'never' if frac is None else f'{frac:.2f}x'} the steps "
            f"(target <= 0.5: {'met' if t['steps_target_met'] else 'NOT met'}); accuracy vs LoRA "
            f"{t['accuracy_vs_lora']:+.2f}, vs full {t['accuracy_vs_full']:+.2f} points "
            f"(target >= LoRA and within 1.5 of full: {'met' if t['accuracy_target_met'] else 'NOT met'})"
        )
    return "\n".join(lines)


def _learning_rate(text: str) -> tuple[str, float | tuple[float, float]]:
    """``METHOD=LR`` (``frod=LR_DELTA,LR_SPARSE``) as (method, rate)."""
    name, _, value = text.partition("=")
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        values = ()
    if name not in METHODS or len(values) != (2 if name == "frod" else 1):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected METHOD=LR with METHOD one of {', '.join(METHODS)} (frod=LR_DELTA,LR_SPARSE)")
    return name, values if name == "frod" else values[0]


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.convergence``."""
    parser = runner.make_parser(
        "python -m benchmarks.convergence",
        "MiniLM sentiment fine-tuning: FRoD vs LoRA vs full fine-tuning (loss curves, steps to loss "
        "levels, test accuracy).",
        common=True,
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 100; 6 with --tiny)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; 0 with --tiny)")
    runner.add_methods_option(parser, METHODS, METHODS)
    parser.add_argument("--lr", type=_learning_rate, action="append", default=[], metavar="METHOD=LR",
                        help="override a learning rate, e.g. --lr lora=5e-3 --lr frod=1e-2,1e-3 (δ, s); "
                             f"default: {', '.join(f'{k}={v}' for k, v in LEARNING_RATES.items())}")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="plot the loss curves (matplotlib)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.convergence``: train, print the report, write the JSON and the plot."""
    args, device = runner.start(build_parser(), argv)
    result = run_convergence(device=device, tiny=args.tiny, steps=args.steps, seeds=args.seeds, methods=args.methods,
                             learning_rates=dict(args.lr), show_progress=not args.no_progress)
    runner.report(args, result, format_report(result), plot=lambda path: plot_convergence(result, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
