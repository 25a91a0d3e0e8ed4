"""Figures for the benchmark results (matplotlib is optional: ``pip install frod_kernels[plot]``).

Every function returns the written path, or None (with a message on stderr) when matplotlib is
missing, so a benchmark never fails for want of a plot.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_convergence", "plot_layer_bench", "plot_memorise"]


def _pyplot():
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: skipping the plot (pip install 'frod_kernels[plot]')", file=sys.stderr)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_bench(rows: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Time vs N per method (log-log), one panel per (d, ρ), with the §5 floor (3 × one N·d² GEMM)."""
    plt = _pyplot()
    if plt is None:
        return None
    panels = sorted({(r["d"], r["sparse_rate"]) for r in rows})
    cols = min(2, len(panels))
    rows_ = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(6.2 * cols, 4.6 * rows_), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (d, rate) in zip(axes.flat, panels, strict=False):
        sel = [r for r in rows if r["d"] == d and r["sparse_rate"] == rate]
        methods = [m for m in dict.fromkeys(r["method"] for r in sel) if m != "gemm"]
        for m in methods:
            pts = sorted((r["n_tokens"], r["ms"]) for r in sel if r["method"] == m)
            ax.plot(*zip(*pts, strict=True), marker="o", label=m, linewidth=2.2 if m == "frod" else 1.2)
        floor = sorted({(r["n_tokens"], r["floor_ms"]) for r in sel if r["method"] == "gemm"})
        ax.plot(*zip(*floor, strict=True), "k--", label="floor: 3 GEMM units (§5)")
        ax.set(xscale="log", yscale="log", xlabel="N (rows of x)", ylabel="fwd+bwd ms (median)",
               title=f"d = {d}, ρ = {rate:g}")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_convergence(result: dict, path: str | Path) -> Path | None:
    """Training loss (mean over seeds, band = min..max) vs step, one line per method."""
    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, m in result["methods"].items():
        curves = np.array([run["smoothed_loss"] for run in m["runs"]])
        steps = np.arange(1, curves.shape[1] + 1)
        ax.plot(steps, curves.mean(0), label=f"{name} ({m['trainable']:,} trainable)")
        ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
    ax.set(xlabel="step", ylabel="training loss (EMA)", title=result.get("title", "convergence"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_memorise(result: dict, path: str | Path) -> Path | None:
    """Left: train accuracy vs step (mean over seeds, band = ± std). Then one panel per probed layer:
    cumulative share of ‖ΔW‖² vs the fraction of singular values (mean over seeds), 90 % marked."""
    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np

    probes = result["probe_layers"]
    fig, axes = plt.subplots(1, 1 + len(probes), figsize=(5.2 * (1 + len(probes)), 4.4), squeeze=False)
    acc_ax, spec_axes = axes[0, 0], axes[0, 1:]
    for name, m in result["methods"].items():
        runs = m["runs"]
        curves = np.array([r["train_accuracy"] for r in runs])
        (line,) = acc_ax.plot(runs[0]["steps"], curves.mean(0), marker=".", label=f"{name} ({m['trainable']:,})")
        acc_ax.fill_between(runs[0]["steps"], curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0),
                            alpha=0.2, color=line.get_color())
        for ax, layer in zip(spec_axes, probes, strict=True):
            if m["rank90_fraction"][layer][0] > 0:  # head only: ΔW = 0
                cum = np.array([r["cumulative_energy"][layer] for r in runs]).mean(0)
                ax.plot(np.arange(1, len(cum) + 1) / len(cum), cum, color=line.get_color(), label=name)
    acc_ax.axhline(100 / result["classes"], color="k", linestyle=":", label="chance")
    acc_ax.set(xlabel="step", ylabel="train accuracy over all keys (%)", ylim=(0, 101))
    acc_ax.set_title(textwrap.fill(result["title"], 48), fontsize=9)
    acc_ax.legend(fontsize=7)
    for ax, layer in zip(spec_axes, probes, strict=True):
        ax.axhline(0.9, color="k", linestyle=":")
        ax.set(xscale="log", xlabel="fraction of singular values of ΔW", ylabel="share of ‖ΔW‖²",
               title=layer.removeprefix("encoder."), ylim=(0, 1.01))
        ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
