"""What ``apply_frod`` reports: the per-category summary table, trainable counts, the progress bar."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from torch import nn

from .basis import FRoDBasis
from .layer import FRoDLayer
from .targets import frod_categories, frod_layers

__all__ = ["FRoDSummary", "print_trainable_parameters", "progress_bar", "report_category", "summarize",
           "trainable_parameters"]


@dataclass
class FRoDSummary:
    """The FRoD categories of a model after ``apply_frod``: per category (layers, o, n, k, rate,
    max reconstruction error, the basis path's deviation), and the trainable count of the whole model.

    The basis path (``FRoDLinear``, docs/design.md §5) per category: ``basis_ratio`` is the largest
    deviation / tolerance over its layers in the weights' dtype (≤ 1: within the error criterion),
    ``basis_layers`` how many layers may take it; "exact" (every layer has ``exact=True``) or
    "factored" (the category computes in the basis by construction) instead of a ratio. A category
    in the input form (docs/design.md §6.1) shows "input", its ``condition`` (cond₂(V)) and how many
    directions the λ guard ``disabled`` over its layers.

    It covers every FRoD layer of the model, those of earlier ``apply_frod`` calls included.
    """

    categories: dict[str, dict] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0

    @property
    def layers(self) -> int:
        return sum(len(c["layers"]) for c in self.categories.values())

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"{'category':<48} {'layers':>6} {'o x n':>11} {'k':>9} {'rate':>7} {'max rel. err':>12} "
                 f"{'basis dev/tol':>16}"]
        for name, c in self.categories.items():
            shape = f"{c['out_features']}x{c['in_features']}"
            ratio = c["basis_ratio"]
            basis = ratio if isinstance(ratio, str) else f"{ratio:.2f} ({c['basis_layers']}/{len(c['layers'])} ok)"
            if ratio == "input":
                basis = f"cond {c['condition']:.1e}, {c['disabled']} off"
            lines.append(
                f"{name:<48} {len(c['layers']):>6} {shape:>11} {c['k']:>9} {c['sparse_rate']:>7g} "
                f"{c['max_error']:>12.2e} {basis:>16}"
            )
        lines.append(
            f"{self.layers} FRoD layers in {len(self.categories)} categories; trainable "
            f"{self.trainable:,} of {self.total:,} parameters ({self.percent:.3f}%)"
        )
        return "\n".join(lines)


def summarize(model: nn.Module) -> FRoDSummary:
    """The ``FRoDSummary`` of every FRoD category in ``model`` and its trainable count."""
    summary = FRoDSummary()
    all_layers = frod_layers(model)
    for name, (basis, layers) in frod_categories(model).items():
        layer = all_layers[layers[0]]
        summary.categories[name] = {
            "layers": layers, "out_features": layer.out_features, "in_features": layer.in_features, "k": basis.k,
            "sparse_rate": basis.sparse_rate, "seed": basis.base_seed, "reg": basis.reg,
            "max_error": basis.max_error, "jitter": basis.jitter,
            **_basis_summary([all_layers[n] for n in layers]),
        }
    summary.trainable, summary.total = trainable_parameters(model)
    return summary


def _basis_summary(layers: list[FRoDLayer]) -> dict:
    """``basis_ratio`` and ``basis_layers`` of one category (see ``FRoDSummary``)."""
    if all(layer.mode == "input" for layer in layers):
        return {"basis_ratio": "input", "basis_layers": 0, "condition": getattr(layers[0].basis, "condition", None),
                "disabled": sum(layer.disabled for layer in layers)}
    if all(layer.mode == "factored" for layer in layers):
        return {"basis_ratio": "factored", "basis_layers": len(layers)}
    measured = [layer.basis_deviation() for layer in layers
                if not layer.exact and layer.mode == "additive" and layer.basis_valid]
    if not measured:
        return {"basis_ratio": "exact", "basis_layers": 0}
    return {"basis_ratio": max(dev / tol for dev, tol in measured),
            "basis_layers": sum(dev <= tol for dev, tol in measured)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as ``requires_grad`` says now (shared parameters once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


def progress_bar(total: int, enabled: bool | None):
    """A tqdm bar over categories, or None (disabled, not a terminal, or tqdm not installed)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="apply_frod", unit="category", file=sys.stderr)


def report_category(bar, verbose: bool, i: int, total: int, name: str, basis: FRoDBasis, layers: int,
                    started: float) -> None:
    """Advance the bar and, with ``verbose``, print one line for a category just built."""
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.set_postfix_str(f"{name}: {layers} layers, {seconds:.1f}s")
        bar.update(1)
    if verbose:
        print(
            f"[frod] {i + 1}/{total} {name}: {layers} x ({basis.n}, {basis.n}) basis, decomposed in "
            f"{seconds:.1f}s, max rel. error {basis.max_error:.1e}",
            file=sys.stderr,
        )
