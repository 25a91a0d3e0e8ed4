"""Setup cost: ``apply_frod`` and ``load_frod`` into a bare model, on a SmolLM2-135M-shaped Llama.

    python -m benchmarks.setup_cost [--threads 2] [--warmup W] [--repeats R] [--json PATH]

Model: ``transformers.LlamaForCausalLM`` with SmolLM2-135M's shapes (hidden 576, intermediate 1536,
30 layers, 9 heads / 3 key-value heads, vocabulary 49152, tied embeddings), random weights (seed 0),
float32; targets q, k, v, o, gate, up and down projections: 7 categories, 210 layers. ``--tiny``:
2 layers of width 64 (the smoke test; its timings mean nothing).

Steps, timed in interleaved rounds (``timing.time_interleaved``: the starting step rotates each
round; ``warmup`` untimed rounds, then ``repeats`` timed ones):

    apply          apply_frod(model, targets) on a fresh copy of the base model
    load           load_frod(fresh copy, adapter), the adapter saved once before the rounds
    decompose      joint_decompose of each category inside one ``shared_stack()``, as apply_frod and
                   load_frod run it: the float64 linear algebra of docs/design.md §2
    unshared       the same without ``shared_stack()``: each call allocates its own float64 stack
    fingerprints   fingerprints_by_dtype of each category (float32, bfloat16 and float16 roundings)
    floor          per category one eigh of an n × n symmetric matrix, plus one pass over every
                   targeted weight (aminmax): the least any shared-eigenbasis decomposition does
    gemm           one float64 GEMM (4096 × 1536)·(1536 × 1536): this machine's multiply-add rate

Reported: median and quartiles (ms) of each step; load / apply as the ratio of medians and as the
median same-round ratio (robust to load drifting between rounds); decompose / unshared as the median
same-round ratio; the multiply-adds of the
decomposition's per-layer products (``_multiply_adds``) and the time they would take at the GEMM's
rate; the 1-minute load average before the rounds and after each (a run's own threads add about
their number to it). Copying the models and saving the adapter are not timed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

import frod_kernels as fk
from frod_kernels.bench import runner
from frod_kernels.bench.timing import Progress, Timed, summarize, time_interleaved
from frod_kernels.decomposition import joint_decompose, shared_stack
from frod_kernels.fingerprint import fingerprints_by_dtype

__all__ = ["TARGETS", "build_parser", "format_report", "main", "run_setup_cost"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GEMM = (4096, 1536, 1536)


class _LoadRecorder(Progress):
    """A progress bar that also records the 1-minute load average at the end of each round."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__(total, "setup cost", enabled=enabled)
        self.loads: list[float] = []

    def update(self, note: str = "", step: int = 1) -> None:
        self.loads.append(os.getloadavg()[0])
        super().update(note, step)


def _llama(tiny: bool, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = ({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 128} if tiny else
             {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152})
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval().to(device)


class _Fresh:
    """A copy of the base model, made again (untimed) after each timed use."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self.next()

    def next(self) -> None:
        self.model = None  # the used copy is freed before the next one is made
        self.model = copy.deepcopy(self.base)


def _categories(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    """The weights of each target category (one per projection name in a Llama)."""
    return [[m.weight for name, m in model.named_modules() if name.endswith(f".{target}")] for target in TARGETS]


def _multiply_adds(layers: int, o: int, n: int) -> float:
    """Multiply-adds of joint_decompose's per-layer products for L layers (o, n) (docs/design.md §2,
    "Cost"), with the probe error estimate (32·o·n) in both forms. o ≥ n, the Gram form (taken for a
    well-conditioned Gram sum, as these weights have): G_i = W_iᵀW_i (a symmetric product, 5/8 of
    o·n²), B_i = W_i·(R⁻¹E) (o·n²) and the Cholesky factor and inverse of G_i + α·RᵀR (n³/6 + n³/3).
    o < n, the Q form: the Gram term (5/8·o·n²), Q_i (a triangular solve: half), B_i = Q_i·E (o·n²),
    Q_iQ_iᵀ (5/8·o²·n), Z_i = K_i⁻¹Q_i (½·o²·n) and Z_iᵀZ_i (5/8·o·n²). The few n³ steps done once
    per category (Cholesky, R⁻¹, eigh, V) are left out."""
    if o >= n:
        return layers * (1.625 * o * n * n + n**3 / 2 + 32 * o * n)
    return layers * (2.75 * o * n * n + 1.125 * o * o * n + 32 * o * n)


def _decompose_shared(categories: list[list[torch.Tensor]]) -> None:
    with shared_stack():
        for weights in categories:
            joint_decompose(weights)


def _floor(categories: list[list[torch.Tensor]], symmetric: list[torch.Tensor]) -> None:
    for weights, t in zip(categories, symmetric, strict=True):
        torch.linalg.eigh(t)
        for w in weights:
            torch.aminmax(w)


def run_setup_cost(device: torch.device, tiny: bool = False, warmup: int = 1, repeats: int = 5,
                   show_progress: bool = True) -> dict:
    """Time the steps (module docstring); the result dict that ``format_report`` prints."""
    base = _llama(tiny, device)
    categories = _categories(base)
    gen = torch.Generator().manual_seed(0)
    symmetric = []
    for weights in categories:
        n = weights[0].shape[1]
        x = torch.randn(n, n, generator=gen, dtype=torch.float64)
        symmetric.append((x @ x.mT / n + torch.eye(n, dtype=torch.float64)).to(device))
    gemm = (64, 32, 32) if tiny else GEMM
    a, b = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device) for shape in (gemm[:2], gemm[1:]))
    to_apply, to_load = _Fresh(base), _Fresh(base)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        summary = fk.apply_frod(to_apply.model, list(TARGETS))
        fk.save_frod(to_apply.model, adapter)
        to_apply.next()
        steps = {
            "apply": Timed(lambda: fk.apply_frod(to_apply.model, list(TARGETS)), to_apply.next),
            "load": Timed(lambda: fk.load_frod(to_load.model, adapter), to_load.next),
            "decompose": Timed(lambda: _decompose_shared(categories)),
            "unshared": Timed(lambda: [joint_decompose(ws) for ws in categories]),
            "fingerprints": Timed(lambda: [fingerprints_by_dtype(ws) for ws in categories]),
            "floor": Timed(lambda: _floor(categories, symmetric)),
            "gemm": Timed(lambda: a @ b),
        }
        progress = _LoadRecorder(warmup + repeats, enabled=show_progress)
        samples = time_interleaved(steps, device, warmup=warmup, repeats=repeats, progress=progress)
        progress.close()
    timed = {name: summarize(seconds) for name, seconds in samples.items()}
    rate = gemm[0] * gemm[1] * gemm[2] / (timed["gemm"]["ms"] / 1e3)
    multiply_adds = sum(_multiply_adds(len(ws), *ws[0].shape) for ws in categories)
    return {
        "title": "tiny random Llama" if tiny else "SmolLM2-135M-shaped Llama, random weights",
        "categories": len(summary.categories), "layers": summary.layers,
        "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats, "steps": timed,
        "samples_s": samples,
        "load_over_apply": timed["load"]["ms"] / timed["apply"]["ms"],
        "load_over_apply_paired": statistics.median(
            load / apply for load, apply in zip(samples["load"], samples["apply"], strict=True)),
        "shared_over_unshared_paired": statistics.median(
            shared / own for shared, own in zip(samples["decompose"], samples["unshared"], strict=True)),
        "gemm_multiply_adds_per_s": rate, "decompose_multiply_adds": multiply_adds,
        "decompose_at_gemm_rate_s": multiply_adds / rate,
        "load_average_before": load_before, "load_average_rounds": progress.loads[warmup:],
    }


def format_report(result: dict) -> str:
    """One line per step: median and quartiles, then the load / apply ratio and the load averages."""
    lines = [f"{result['title']}: {result['categories']} categories, {result['layers']} layers, "
             f"{result['threads']} threads; median of {result['repeats']} interleaved rounds",
             f"{'step':<13} {'ms':>9} {'q25-q75':>15}"]
    for name, m in result["steps"].items():
        lines.append(f"{name:<13} {m['ms']:>9.0f} {m['q25_ms']:>7.0f}-{m['q75_ms']:<7.0f}")
    lines.append(f"load / apply: {result['load_over_apply']:.3f} (median same-round ratio "
                 f"{result['load_over_apply_paired']:.3f})")
    lines.append(f"decompose / unshared (one stack buffer for all categories / one each): median same-round "
                 f"ratio {result['shared_over_unshared_paired']:.3f}")
    lines.append(f"decomposition: {result['decompose_multiply_adds'] / 1e9:.0f} G multiply-adds in its per-layer "
                 f"products, {result['decompose_at_gemm_rate_s']:.2f} s at the GEMM's "
                 f"{result['gemm_multiply_adds_per_s'] / 1e9:.1f} G/s")
    rounds = ", ".join(f"{x:.2f}" for x in result["load_average_rounds"])
    lines.append(f"load average before {result['load_average_before']:.2f}; after each round {rounds}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.setup_cost``."""
    parser = runner.make_parser(
        "python -m benchmarks.setup_cost",
        "apply_frod and load_frod on a SmolLM2-135M-shaped Llama (random weights), with the decomposition, the "
        "fingerprints and a floor timed beside them.",
        common=True,
    )
    runner.add_rounds_options(parser, warmup=1, repeats=5, tiny=(0, 1))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.setup_cost``: time the steps, print the table, write the JSON."""
    args, device = runner.start(build_parser(), argv)
    warmup, repeats = (0, 1) if args.tiny else (args.warmup, args.repeats)
    result = run_setup_cost(device, tiny=args.tiny, warmup=warmup, repeats=repeats,
                            show_progress=not args.no_progress)
    runner.report(args, result, format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
