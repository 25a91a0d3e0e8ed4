"""One layer, forward + backward, FRoD against the baselines (docs/design.md §5).

A case is (d, N, ρ, dtype, device): a random ``nn.Linear(d, d)`` (bias included), N rows of x
(requiring grad) and a fixed non-zero upstream gradient dY. Every method computes y = layer(x)
and y.backward(dY); between timed calls its trainable tensors take an SGD-like step in place
under no_grad (so δ and s stay non-zero and change every call) and all gradients, x's included,
are reset to None. Methods:

    dense        nn.Linear with trainable weight: 3 GEMMs of N·d² (the speed floor of §5)
    lora         frozen base + rank r, r·2d ≈ d + ρd² trainable (``lora_rank_for_budget``)
    frod         FRoDLinear, backend and path chosen by the dispatcher ('frod_<backend>_<path>' forced)
    published    the published code's computation (``PublishedFRoDLinear``)
    naive        W' = W + U·M·Vᵀ with dense M, autograd (``NaiveDenseFRoDLinear``)
    peft         upstream PEFT's FRoD layer (only when peft is installed)
    gemm         one Y = X·Wᵀ without autograd: 3× its time is the measured floor of §5

Reported per method: median ms (and quartiles), ratio to dense, dense-equivalent throughput
6·N·d² FLOP / t (2·N·d² / t for 'gemm', its actual rate), trainable parameters, peak memory of one
step (``timing.peak_memory``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..layer import FRoDLinear
from .baselines import (
    LoRALinear,
    NaiveDenseFRoDLinear,
    PublishedFRoDLinear,
    dense_linear,
    lora_rank_for_budget,
    peft_frod_layer,
    quiet_peft,
)
from .timing import Progress, Timed, peak_memory, summarize, time_interleaved

__all__ = [
    "DEFAULT_METHODS", "METHODS", "LayerCase", "build_modules", "format_table", "run_case", "run_layer_bench",
    "update_and_zero",
]

DEFAULT_METHODS = ("dense", "lora", "frod", "published", "naive")
METHODS = (*DEFAULT_METHODS, "peft",
           *(f"frod_{backend}_{path}" for backend in ("torch", "triton") for path in ("token", "weight", "basis")))
_LR = 1e-6


@dataclass(frozen=True)
class LayerCase:
    """One benchmarked shape: x (n_tokens, d) → y (n_tokens, d)."""

    d: int
    n_tokens: int
    sparse_rate: float = 0.01
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _frod_variant(layer: FRoDLinear, backend: str, path: str) -> FRoDLinear:
    """A FRoDLinear sharing ``layer``'s frozen tensors with its own copy of δ and s."""
    out = FRoDLinear(layer.weight, layer.bias, layer.U, layer.lam, layer.basis, backend=backend, path=path)
    with torch.no_grad():
        out.delta.copy_(layer.delta)
        out.sparse_values.copy_(layer.sparse_values)
    return out


def build_modules(case: LayerCase, methods: Sequence[str], seed: int) -> dict[str, nn.Module]:
    """The layers of ``methods`` for ``case`` (all FRoD variants share one decomposition; peft only if installed)."""
    torch.manual_seed(seed)
    kw = {"dtype": case.torch_dtype, "device": case.device}
    base = dense_linear(case.d, case.d, **kw)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    frod = FRoDLinear.from_linear(base, sparse_rate=case.sparse_rate, seed=seed)
    with torch.no_grad():
        frod.delta.normal_(0.0, 0.01)
        frod.sparse_values.normal_(0.0, 0.01)
    out: dict[str, nn.Module] = {}
    for name in methods:
        if name == "dense":
            out[name] = dense_linear(case.d, case.d, **kw)
        elif name == "lora":
            r = lora_rank_for_budget(case.d, case.d, frod.num_trainable())
            lora = LoRALinear(base, r)
            with torch.no_grad():
                lora.lora_B.normal_(0.0, 0.01)
            out[name] = lora
        elif name == "frod":
            out[name] = _frod_variant(frod, "auto", "auto")
        elif name.startswith("frod_"):
            _, backend, path = name.split("_")
            out[name] = _frod_variant(frod, backend, path)
        elif name == "published":
            out[name] = PublishedFRoDLinear(frod)
        elif name == "naive":
            out[name] = NaiveDenseFRoDLinear(frod)
        elif name == "peft":
            layer = peft_frod_layer(nn.Linear(case.d, case.d, **kw), case.sparse_rate, seed)
            if layer is not None:
                out[name] = layer
        else:
            raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    return out


def _step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module(x).backward(gy)

    return run


def update_and_zero(params: list[nn.Parameter], x: torch.Tensor) -> Callable[[], None]:
    """The untimed step between calls: p ← p − lr·∇p for ``params`` (no_grad), then every gradient to None."""
    @torch.no_grad()
    def between() -> None:
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-_LR)
            p.grad = None
        x.grad = None

    return between


def run_case(
    case: LayerCase, methods: Sequence[str] = DEFAULT_METHODS, warmup: int = 2, repeats: int = 7, seed: int = 0,
    memory: bool = True, progress: Progress | None = None,
) -> list[dict]:
    """Time every method on one case (interleaved); one result row per method, plus 'gemm'."""
    device = torch.device(case.device)
    modules = build_modules(case, methods, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(case.n_tokens, case.d, generator=g, device=device, dtype=case.torch_dtype).requires_grad_()
    gy = torch.randn(case.n_tokens, case.d, generator=g, device=device, dtype=case.torch_dtype)
    w = torch.randn(case.d, case.d, generator=g, device=device, dtype=case.torch_dtype)
    x_plain = x.detach()
    timed = {"gemm": Timed(lambda: x_plain @ w.mT)}
    trainable = {"gemm": 0}
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.requires_grad]
        trainable[name] = sum(p.numel() for p in params)
        timed[name] = Timed(_step(module, x, gy), update_and_zero(params, x))
    samples = time_interleaved(timed, device, warmup=warmup, repeats=repeats, progress=progress)
    dense_ms = summarize(samples["dense"])["ms"] if "dense" in samples else math.nan
    flop = 6.0 * case.n_tokens * case.d * case.d
    rows = []
    for name in timed:
        stats = summarize(samples[name])
        row = {**asdict(case), "method": name, **stats, "ratio_to_dense": stats["ms"] / dense_ms,
               "tflops": flop / (3.0 if name == "gemm" else 1.0) / (stats["ms"] * 1e-3) / 1e12,
               "trainable": trainable[name]}
        if name != "gemm" and memory:
            row["peak_mem_mb"] = peak_memory(timed[name].run, device) / 2**20
            timed[name].between()
        module = modules.get(name)
        if isinstance(module, FRoDLinear):  # the path its calls took ('basis' included, which the cost model
            row["path"] = module.last_path  # alone would not show: the layer offers it after measuring)
        rows.append(row)
    gemm_ms = summarize(samples["gemm"])["ms"]
    for row in rows:
        row["floor_ms"] = 3.0 * gemm_ms
    return rows


def run_layer_bench(
    cases: Sequence[LayerCase], methods: Sequence[str] = DEFAULT_METHODS, warmup: int = 2, repeats: int = 7,
    memory: bool = True, show_progress: bool = True,
) -> list[dict]:
    """``run_case`` over ``cases`` with one progress bar; the rows of all cases."""
    progress = Progress(len(cases) * (warmup + repeats), "layer bench", enabled=show_progress)
    rows = []
    with quiet_peft():
        for case in cases:
            rows += run_case(case, methods, warmup=warmup, repeats=repeats, memory=memory, progress=progress)
    progress.close()
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table: one line per (case, method)."""
    head = (f"{'d':>5} {'N':>6} {'rho':>5} {'method':<18} {'path':<6} {'ms':>9} {'x dense':>8} "
            f"{'TFLOP/s':>8} {'trainable':>10} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = f"{r['peak_mem_mb']:8.1f}" if "peak_mem_mb" in r else f"{'':>8}"
        lines.append(
            f"{r['d']:>5} {r['n_tokens']:>6} {r['sparse_rate']:>5g} {r['method']:<18} {r.get('path', ''):<6} "
            f"{r['ms']:9.2f} {r['ratio_to_dense']:8.2f} {r['tflops']:8.3f} {r['trainable']:>10,} {mem}"
        )
    return "\n".join(lines)
