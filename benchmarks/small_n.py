"""Small-N training against the basis path's floor: one d = 1024 layer, N = 256 rows, float32.

    python -m benchmarks.small_n [--tiny] [--threads 1 2] [--repeats 40] [--json PATH]

The protocol of ``frod-kernels bench`` (``layer_bench``): forward + backward with x requiring grad,
an SGD step on every trainable tensor and all gradients reset between calls, untimed. Methods: the
dense ``nn.Linear`` with a trainable weight, ``FRoDLinear`` as dispatched (the basis path at this
shape, docs/design.md §5.5) and forced onto the token path. They run in turn, round by round
(``timing.time_interleaved``), so each round gives every method a ratio to the dense call of the
same round; the median of those ratios and its quartiles are reported, which is steadier on a shared
machine than a ratio of medians.

The floor: the basis path's four N·d² GEMMs (Zᵀ = Vᵀ·Xᵀ, Y = A·Uᵀ + b, Pᵀ = Uᵀ·dYᵀ, dX = Q·Vᵀ)
against the dense layer's three (Y = X·Wᵀ + b, dX = dY·W, dW = dYᵀ·X), with the same operand
layouts, timed in the same rounds: 4/3 when every GEMM runs at one rate. What FRoD costs above it is
sparse work (M·Zᵀ, Mᵀ·Pᵀ, the SDDMM), per-call Python and autograd. To tell them apart, the same
rounds also run the basis path's seven products in the layer's order through the PyTorch backend's
primitives, timing each (``steps``): the caches are then as a real call leaves them, which an
isolated microbenchmark would not reproduce. A FRoD call's median minus the steps' is the rest
(Python, autograd, and whatever the steps miss). Each thread count records the load average before
and after its rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from frod_kernels import ops
from frod_kernels.bench import runner
from frod_kernels.bench.layer_bench import LayerCase, build_modules, update_and_zero
from frod_kernels.bench.timing import Timed, machine_info, summarize, time_interleaved, tune_malloc
from frod_kernels.dispatch import get_backend_module
from frod_kernels.layer import FRoDLinear

METHODS = ("dense", "frod", "frod_torch_token")
STEPS = ("Zt = Vt.Xt", "At = M.Zt", "Y = A.Ut + b", "Pt = Ut.dYt", "SDDMM(Pt, Zt)", "Qt = Mt.Pt", "dX = Q.Vt")
SPARSE_STEPS = ("At = M.Zt", "Qt = Mt.Pt", "SDDMM(Pt, Zt)")


def build_parser() -> argparse.ArgumentParser:
    parser = runner.make_parser("python -m benchmarks.small_n", __doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="T",
                        help="thread counts (torch.set_num_threads), measured one after the other")
    parser.add_argument("--d", type=int, default=1024, help="in and out features (32 with --tiny)")
    parser.add_argument("--tokens", type=int, default=256, help="N, rows of x (8 with --tiny)")
    runner.add_rounds_options(parser, warmup=5, repeats=40, per=" per thread count", tiny=(1, 2))
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results, the machine and the command")
    parser.add_argument("--tiny", action="store_true", help="smoke run: d = 32, N = 8 (its timings mean nothing)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's default mmap/trim thresholds (timing.tune_malloc)")
    return parser


def _gemms(case: LayerCase, seed: int) -> dict[str, Callable[[], object]]:
    """The basis path's four GEMMs and the dense layer's three, in the layouts the two layers use."""
    g = torch.Generator().manual_seed(seed)
    d, n_rows = case.d, case.n_tokens

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    x, dy, w, b = rnd(n_rows, d), rnd(n_rows, d), rnd(d, d), rnd(d)
    u, v = rnd(d, d).t().contiguous().t(), rnd(d, d).t().contiguous().t()  # column-major, as FRoDLinear keeps them
    at, qt = rnd(d, n_rows), rnd(d, n_rows)  # the (n, N) activations of the token path

    def basis() -> None:
        torch.mm(v.t(), x.t())
        torch.addmm(b, at.t(), u.t())
        torch.mm(u.t(), dy.t())
        torch.mm(qt.t(), v.t())

    def dense() -> None:
        torch.addmm(b, x, w.t())
        torch.mm(dy, w)
        torch.mm(dy.t(), x)

    return {"gemms_basis": basis, "gemms_dense": dense}


def _steps(layer: FRoDLinear, x: torch.Tensor, gy: torch.Tensor, record: dict[str, list[float]]) -> Callable[[], None]:
    """One basis-path call's products (``ops._token_forward``/``_token_backward`` with W absent), each timed."""
    bk = get_backend_module("torch")
    op = ops.Operands(None, layer.bias, layer.U, layer.basis.V, (layer.lam + layer.delta).detach(),
                      layer.sparse_values.detach(), layer.basis.pattern)
    xd = x.detach()

    def run() -> None:
        marks = [time.perf_counter()]
        zt = bk.dual_matmul(op.V.t(), xd)
        marks.append(time.perf_counter())
        at = op.m_matmul(bk, zt)
        marks.append(time.perf_counter())
        bk.dual_matmul(at.t(), op.U, bias=op.bias)
        marks.append(time.perf_counter())
        pt = bk.dual_matmul(op.U.t(), gy)
        marks.append(time.perf_counter())
        bk.sddmm(pt, zt, op.pattern)
        marks.append(time.perf_counter())
        qt = op.m_matmul(bk, pt, transpose=True)
        marks.append(time.perf_counter())
        bk.dual_matmul(qt.t(), op.V)
        marks.append(time.perf_counter())
        for name, start, end in zip(STEPS, marks, marks[1:], strict=False):
            record[name].append(end - start)

    return run


def _ratios(samples: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Per method: median and quartiles of its per-round ratio to ``reference``."""
    out = {}
    for name, times in samples.items():
        per_round = sorted(t / r for t, r in zip(times, samples[reference], strict=True))
        q = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else per_round * 3
        out[name] = {"median": statistics.median(per_round), "q25": q[0], "q75": q[-1]}
    return out


def run(case: LayerCase, threads: int, warmup: int, repeats: int, seed: int = 0) -> dict:
    """One thread count: per-round ratios of the methods to dense, and of the basis GEMMs to dense's."""
    torch.set_num_threads(threads)
    modules = build_modules(case, METHODS, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.n_tokens, case.d, generator=g).requires_grad_()
    gy = torch.randn(case.n_tokens, case.d, generator=g)

    def step(module: torch.nn.Module) -> Callable[[], None]:
        return lambda: module(x).backward(gy)

    timed = {name: Timed(step(m), update_and_zero([p for p in m.parameters() if p.requires_grad], x))
             for name, m in modules.items()}
    timed.update({name: Timed(fn) for name, fn in _gemms(case, seed + 2).items()})
    record: dict[str, list[float]] = {name: [] for name in STEPS}
    timed["steps"] = Timed(_steps(modules["frod"], x, gy, record))
    load_before = os.getloadavg()
    samples = time_interleaved(timed, torch.device("cpu"), warmup=warmup, repeats=repeats)
    load_after = os.getloadavg()
    ratios = _ratios({k: v for k, v in samples.items() if k in METHODS}, "dense")
    floor = _ratios({k: v for k, v in samples.items() if k.startswith("gemms")}, "gemms_dense")["gemms_basis"]
    steps_ms = {name: statistics.median(times[-repeats:]) * 1e3 for name, times in record.items()}
    ms = {name: summarize(s) for name, s in samples.items()}
    return {
        "threads": threads, "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "paths": {name: m.last_path for name, m in modules.items() if name != "dense"},
        "ms": ms, "ratio_to_dense": ratios, "gemm_floor": floor, "steps_ms": steps_ms,
        "sparse_ms": sum(steps_ms[name] for name in SPARSE_STEPS),
        "rest_ms": ms["frod"]["ms"] - ms["steps"]["ms"],
    }


def format_table(rows: Sequence[dict]) -> str:
    lines = [f"{'threads':>7} {'method':<17} {'path':<6} {'ms':>8} {'x dense (q25-q75)':>22} {'load before/after':>18}"]
    for r in rows:
        load = f"{r['load_average_before'][0]:.2f}/{r['load_average_after'][0]:.2f}"
        for name, ratio in r["ratio_to_dense"].items():
            lines.append(f"{r['threads']:>7} {name:<17} {r['paths'].get(name, ''):<6} {r['ms'][name]['ms']:8.2f} "
                         f"{ratio['median']:8.3f} ({ratio['q25']:.3f}-{ratio['q75']:.3f}) {load:>18}")
        f = r["gemm_floor"]
        lines.append(f"{r['threads']:>7} {'GEMM floor':<17} {'basis':<6} {r['ms']['gemms_basis']['ms']:8.2f} "
                     f"{f['median']:8.3f} ({f['q25']:.3f}-{f['q75']:.3f}) {'4 GEMMs / 3':>18}")
        steps = ", ".join(f"{name} {t:.2f}" for name, t in r["steps_ms"].items())
        lines.append(f"{'':>7} basis call, ms: {steps}; sparse {r['sparse_ms']:.2f}, rest {r['rest_ms']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.small_n``: run each thread count, print the table, write the JSON."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not args.no_malloc_tuning:
        tune_malloc()
    args.machine, args.command_line = machine_info(), " ".join([parser.prog, *argv])
    if args.tiny:
        print(runner.SMOKE_NOTE)
    case = LayerCase(32 if args.tiny else args.d, 8 if args.tiny else args.tokens)
    warmup, repeats = (1, 2) if args.tiny else (args.warmup, args.repeats)
    rows = [run(case, threads, warmup, repeats) for threads in args.threads]
    runner.report(args, {"d": case.d, "n_tokens": case.n_tokens, "sparse_rate": case.sparse_rate,
                         "dtype": case.dtype, "rounds": repeats, "results": rows}, format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
