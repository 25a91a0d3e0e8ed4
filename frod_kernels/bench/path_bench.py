"""Does the dispatcher choose well? The chosen path against every forced path, per shape.

A case is (o, n, N, r): one additive ``FRoDLinear`` built from a random ``nn.Linear(n, o)``
(δ, s non-zero), x (N, n) requiring grad, a fixed upstream gradient, and r calls of forward +
backward with the same δ and s (r > 1: the micro-batches of gradient accumulation, where W' can be
reused), then an in-place SGD-like step on δ and s (untimed; it bumps their versions, so every
timed unit starts without a valid W'). Variants, sharing the frozen tensors:

    auto     path='auto': the dispatcher's choice, call by call (``FRoDLinear.last_path``)
    token, weight, basis     that path forced (weight reuses W' within the unit, as auto does)

Timing: ``timing.time_interleaved`` (variants take turns), median per unit. Reported per case: ms
per call of each variant, the paths auto took, and auto / best forced; the acceptance is ≤ 1.10 at
every case (docs/benchmarks.md), not judged in a smoke run. ``dispatch.path_costs`` predicts which
path wins; this measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layer import FRoDLinear
from .baselines import dense_linear
from .layer_bench import update_and_zero
from .timing import Progress, Timed, summarize, time_interleaved

__all__ = ["FORCED", "default_cases", "format_table", "run_path_bench"]

FORCED = ("token", "weight", "basis")


def default_cases(tiny: bool = False, device: torch.device | None = None) -> list[tuple[int, int, int, int]]:
    """(o, n, N, r): MiniLM's three layer shapes, a square 1024 and a wide one, at small to large N."""
    if tiny:
        return [(24, 16, 8, 1), (16, 40, 64, 2)]
    shapes = [(384, 384), (1536, 384), (384, 1536), (1024, 1024)]
    if device is not None and device.type == "cuda":
        shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 1024)]
    return [(o, n, rows, r) for o, n in shapes for rows in (64, 512, 2048) for r in (1, 4)]


def _unit(layer: FRoDLinear, x: torch.Tensor, gy: torch.Tensor, calls: int, paths: list[str]):
    def run() -> None:
        for _ in range(calls):
            layer(x).backward(gy)
            paths.append(layer.last_path)

    return run


def run_case(o: int, n: int, rows: int, calls: int, device: torch.device, dtype: torch.dtype = torch.float32,
             sparse_rate: float = 0.01, warmup: int = 2, repeats: int = 5, seed: int = 0,
             progress: Progress | None = None) -> dict:
    """One case: ms per call for auto and each forced path, and auto's paths."""
    torch.manual_seed(seed)
    base = dense_linear(n, o, dtype=dtype, device=device).requires_grad_(False)
    template = FRoDLinear.from_linear(base, sparse_rate=sparse_rate, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(rows, n, generator=g, device=device, dtype=dtype).requires_grad_()
    gy = torch.randn(rows, o, generator=g, device=device, dtype=dtype)
    timed, paths = {}, {}
    for variant in ("auto", *FORCED):
        layer = FRoDLinear(base.weight, base.bias, template.U, template.lam, template.basis, path=variant)
        with torch.no_grad():
            layer.delta.normal_(0.0, 0.01, generator=g)
            layer.sparse_values.normal_(0.0, 0.01, generator=g)
        paths[variant] = []
        params = [layer.delta, layer.sparse_values]
        timed[variant] = Timed(_unit(layer, x, gy, calls, paths[variant]), update_and_zero(params, x))
    samples = time_interleaved(timed, device, warmup=warmup, repeats=repeats, progress=progress)
    ms = {v: summarize([s / calls for s in samples[v]])["ms"] for v in timed}
    best = min(FORCED, key=ms.__getitem__)
    taken = sorted(set(paths["auto"][warmup * calls:]))
    return {"o": o, "n": n, "rows": rows, "calls": calls, "ms": ms, "best_forced": best,
            "auto_paths": taken, "auto_over_best": ms["auto"] / ms[best]}


def run_path_bench(device: torch.device | str = "cpu", tiny: bool = False,
                   cases: Sequence[tuple[int, int, int, int]] | None = None, dtype: torch.dtype = torch.float32,
                   warmup: int = 2, repeats: int = 5, show_progress: bool = True) -> dict:
    """Every case of ``cases`` (default ``default_cases``); a JSON-ready dict."""
    device = torch.device(device)
    cases = list(cases or default_cases(tiny, device))
    if tiny:
        warmup, repeats = 1, 2
    progress = Progress(len(cases) * (warmup + repeats), "path bench", enabled=show_progress)
    rows = [run_case(o, n, N, r, device, dtype, warmup=warmup, repeats=repeats, progress=progress)
            for o, n, N, r in cases]
    progress.close()
    worst = max(row["auto_over_best"] for row in rows)
    return {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "cases": rows,
            "smoke_run": tiny, "worst_auto_over_best": worst,
            "within_10_percent": None if tiny else worst <= 1.10}  # two rounds of tiny shapes decide nothing


def format_table(result: dict) -> str:
    """One line per case: ms per call of each variant, auto's paths, auto / best forced."""
    head = (f"{'o':>6} {'n':>6} {'N':>6} {'r':>2} " + " ".join(f"{v:>8}" for v in ("auto", *FORCED))
            + f"  {'best':<7} {'auto/best':>9}  auto took")
    lines = [f"ms per call (fwd + bwd), median; r = calls per update of δ, s; {result['dtype']}, "
             f"{result['threads']} threads", head, "-" * len(head)]
    for row in result["cases"]:
        lines.append(f"{row['o']:>6} {row['n']:>6} {row['rows']:>6} {row['calls']:>2} "
                     + " ".join(f"{row['ms'][v]:8.2f}" for v in ("auto", *FORCED))
                     + f"  {row['best_forced']:<7} {row['auto_over_best']:9.2f}  {', '.join(row['auto_paths'])}")
    if result.get("within_10_percent") is not None:
        verdict = "within" if result["within_10_percent"] else "NOT within"
        lines.append(f"worst auto / best forced: {result['worst_auto_over_best']:.2f} ({verdict} 10 %)")
    return "\n".join(lines)
