"""Figures of the MiniLM experiments: convergence's loss curves, memorise's accuracy curves and spectra.

Each function returns the written path, or None when matplotlib is missing (``pip install
'frod_kernels[plot]'``), so an experiment never fails for want of a plot.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from frod_kernels.bench.plots import pyplot

__all__ = ["plot_convergence", "plot_memorise"]


def plot_convergence(result: dict, path: str | Path) -> Path | None:
    """Training loss (mean over seeds, band = min..max) vs step, one line per method."""
    plt = pyplot()
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
    plt = pyplot()
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
