"""The layer benchmark's figure (matplotlib is optional: ``pip install frod_kernels[plot]``).

``plot_layer_bench`` returns the written path, or None (with a message on stderr) when matplotlib
is missing, so a benchmark never fails for want of a plot; ``pyplot`` is that check for any figure.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_layer_bench", "pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None (said on stderr) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: skipping the plot (pip install 'frod_kernels[plot]')", file=sys.stderr)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_bench(rows: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Time vs N per method (log-log), one panel per (d, ρ), with the §5 floor (3 × one N·d² GEMM)."""
    plt = pyplot()
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
