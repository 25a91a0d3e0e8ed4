"""A training step on all-MiniLM-L6-v2: PEFT's FRoD vs the same accelerated vs ours vs LoRA vs full fine-tuning.

Model: all-MiniLM-L6-v2 with a mean-pooled linear head (``minilm``). Targets in every adapter method:
q, k, v, attention-output, intermediate and output linears of every layer (36 linears,
``minilm.TARGETS``). Methods:

    peft_frod              ``peft.get_peft_model(encoder, FrodConfig(target_modules=TARGETS, sparse_rate=ρ))``:
                           PEFT's forward, y = ((x·V)·Sᵀ + (x·V)·diag(λ_l))·Uᵀ + b with S a COO tensor
                           rebuilt and coalesced every call, autograd through ``torch.sparse.mm``
    peft_frod_accelerated  a copy of that model after ``frod_kernels.peft.accelerate``: same parameters,
                           same function, computed by ``frod_linear`` (factored mode)
    frod                   our ``apply_frod`` (additive mode, its own decomposition and Ω)
    lora                   LoRA on the same linears, rank matched to FRoD's trainable count
                           (``minilm.prepare``: our ``LoRALinear``)
    full                   every encoder weight trainable except the word embeddings

One step = zero_grad, forward, cross-entropy on random labels, backward, AdamW step, on a batch of
``batch`` × ``seq_len`` random token ids with a full attention mask (every position is computed).
Timing: ``warmup`` + ``repeats`` rounds, each round runs every method's step once, in an order
rotated by one every round (``timing.time_interleaved``); reported: median and quartiles per method,
the ratio of each median to the accelerated one's, the median over rounds of the same-round ratio
(``paired_ratio_to_…``: robust to a load that drifts between rounds on a shared machine), the loss of
each method's first and last step (PEFT's and the accelerated steps must agree: same parameters, batch
and dropout masks), the set-up time (decomposition) and the load average before
(``machine.load_average_1min``) and after the run.

``tiny=True`` uses a 2-layer random BERT (hidden 32) and a 4 × 16 batch: the smoke test.

    python -m benchmarks.peft_bench [--tiny] [--batch B] [--seq-len T] [--repeats R] [--methods M ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from frod_kernels import peft as frod_peft
from frod_kernels.bench import runner
from frod_kernels.bench.baselines import quiet_peft
from frod_kernels.bench.timing import Progress, Timed, summarize, time_interleaved

from .minilm import HEAD_LR, LEARNING_RATES, encoder_factory, peft_frod_classifier, prepare

__all__ = ["METHODS", "OPTIONAL_METHODS", "build_parser", "format_report", "main", "run_peft_bench"]

METHODS = ("peft_frod", "peft_frod_accelerated", "frod", "lora", "full")
# Also accepted when asked for (gpu_check times LoRA at r = 8, the common default).
OPTIONAL_METHODS = ("lora_r8",)


def _peft_groups(model: nn.Module) -> list[dict]:
    """λ_l at FRoD's δ learning rate, s at its sparse one, the head at the head's (``minilm``'s values)."""
    lr_lambda, lr_sparse = LEARNING_RATES["frod"]
    groups: dict[str, list] = {"lambda": [], "sparse": [], "head": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "lambda" if "frod_lambda_l" in name else "sparse" if "frod_lambda_s_values" in name else "head"
            groups[kind].append(p)
    return [{"params": groups["lambda"], "lr": lr_lambda}, {"params": groups["sparse"], "lr": lr_sparse},
            {"params": groups["head"], "lr": HEAD_LR}]


class _Step:
    """One training step of one method; remembers its losses."""

    def __init__(self, model: nn.Module, groups: list[dict], batch: dict, labels: torch.Tensor) -> None:
        self.model, self.batch, self.labels = model, batch, labels
        self.opt = torch.optim.AdamW(groups)
        self.losses: list[float] = []

    def __call__(self) -> None:
        torch.manual_seed(len(self.losses))  # the same dropout masks in every method's n-th step
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(**self.batch), self.labels)
        loss.backward()
        self.opt.step()
        self.losses.append(float(loss.detach()))


def run_peft_bench(
    device: torch.device | str = "cpu", tiny: bool = False, batch: int = 16, seq_len: int = 128,
    warmup: int = 1, repeats: int = 5, methods: Sequence[str] | None = None, sparse_rate: float = 0.01,
    seed: int = 0, show_progress: bool = True,
) -> dict:
    """Time one training step per method (see the module docstring); returns a JSON-ready dict."""
    device = torch.device(device)
    methods = list(methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS) - set(OPTIONAL_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS + OPTIONAL_METHODS}")
    if tiny:
        batch, seq_len, warmup, repeats = 4, 16, 0, 2
    factory, hidden, vocab = encoder_factory(tiny)
    gen = torch.Generator().manual_seed(seed)
    data = {
        "input_ids": torch.randint(min(999, vocab // 2), vocab, (batch, seq_len), generator=gen).to(device),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.int64, device=device),
    }
    labels = torch.randint(0, 2, (batch,), generator=gen).to(device)
    steps: dict[str, _Step] = {}
    info: dict[str, dict] = {}
    peft_model = None
    for name in methods:
        started = time.perf_counter()
        if name in ("peft_frod", "peft_frod_accelerated"):
            if peft_model is None:
                peft_model = peft_frod_classifier(factory(), hidden, seed, sparse_rate=sparse_rate)
            model = peft_model if name == "peft_frod" else copy.deepcopy(peft_model)
            if name == "peft_frod_accelerated":
                frod_peft.accelerate(model)
            groups = _peft_groups(model)
        else:
            model, groups = prepare(name, factory(), hidden, seed, LEARNING_RATES)
        model.to(device).train()
        steps[name] = _Step(model, groups, data, labels)
        info[name] = {
            "setup_s": time.perf_counter() - started,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    progress = Progress(warmup + repeats, "peft bench", enabled=show_progress)
    with quiet_peft():
        samples = time_interleaved({n: Timed(s) for n, s in steps.items()}, device, warmup=warmup, repeats=repeats,
                                   progress=progress)
    progress.close()
    reference = "peft_frod_accelerated" if "peft_frod_accelerated" in samples else methods[0]
    ref_ms = summarize(samples[reference])["ms"]
    out = {}
    for name in methods:
        stats = summarize(samples[name])
        paired = [t / r for t, r in zip(samples[name], samples[reference], strict=True)]
        out[name] = {**info[name], **stats, "ratio_to_" + reference: stats["ms"] / ref_ms,
                     "paired_ratio_to_" + reference: statistics.median(paired),
                     "first_loss": steps[name].losses[0], "last_loss": steps[name].losses[-1],
                     "seconds": samples[name]}
    return {
        "title": "tiny random BERT" if tiny else "all-MiniLM-L6-v2 training step", "smoke_run": tiny,
        "batch": batch, "seq_len": seq_len, "warmup": warmup, "repeats": repeats, "sparse_rate": sparse_rate,
        "threads": torch.get_num_threads(), "reference": reference, "methods": out,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def format_report(result: dict) -> str:
    """A table: method, trainable, median ms (quartiles), ratio to the reference, first loss, set-up seconds."""
    ref = result["reference"]
    lines = [f"{result['title']}: batch {result['batch']} x {result['seq_len']} tokens, fwd+bwd+AdamW, "
             f"median of {result['repeats']} interleaved rounds, {result['threads']} threads; ratio = step / {ref}'s",
             f"{'method':<23} {'trainable':>10} {'step ms':>9} {'q25-q75':>15} {'ratio':>6} {'paired':>6} "
             f"{'1st loss':>9} {'last loss':>9} {'setup s':>8}"]
    for name, m in result["methods"].items():
        lines.append(f"{name:<23} {m['trainable']:>10,} {m['ms']:>9.1f} {m['q25_ms']:>7.0f}-{m['q75_ms']:<7.0f} "
                     f"{m['ratio_to_' + ref]:>6.2f} {m['paired_ratio_to_' + ref]:>6.2f} {m['first_loss']:>9.5f} "
                     f"{m['last_loss']:>9.5f} {m['setup_s']:>8.1f}")
    methods = result["methods"]
    if not result.get("smoke_run") and {"peft_frod", "peft_frod_accelerated"} <= methods.keys():
        lines.append(_speedup_line(methods["peft_frod"]["ms"] / methods["peft_frod_accelerated"]["ms"],
                                   methods["peft_frod"]["paired_ratio_to_peft_frod_accelerated"]))
    lines.append(f"load average after the run: {_load(result['load_average_after'])}")
    return "\n".join(lines)


def _speedup_line(ratio: float, paired: float) -> str:
    """What accelerate() did to PEFT's step, from PEFT's time / the accelerated time (> 1: faster)."""
    effect = f"{ratio:.2f}x faster" if ratio >= 1 else f"slower: it takes {1 / ratio:.2f}x the time"
    return f"accelerate() makes PEFT's FRoD step {effect} (median same-round ratio PEFT / accelerated {paired:.2f})"


def _load(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.peft_bench``."""
    choices = METHODS + OPTIONAL_METHODS
    parser = runner.make_parser(
        "python -m benchmarks.peft_bench",
        "MiniLM training step: PEFT's FRoD vs the same after frod_kernels.peft.accelerate vs our FRoD vs "
        "LoRA vs full fine-tuning.",
        common=True,
    )
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (4 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (16 with --tiny)")
    runner.add_rounds_options(parser, warmup=1, repeats=5, tiny=(0, 2))
    runner.add_methods_option(parser, choices, METHODS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.peft_bench``: time the steps, print the table, write the JSON."""
    args, device = runner.start(build_parser(), argv)
    result = run_peft_bench(device=device, tiny=args.tiny, batch=args.batch, seq_len=args.seq_len,
                            warmup=args.warmup, repeats=args.repeats, methods=args.methods,
                            show_progress=not args.no_progress)
    runner.report(args, result, format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
