"""The input form's training step against the token path's, per layer shape, float32 (docs/design.md §6.1).

    python -m benchmarks.input_form_step [--tiny] [--threads 2] [--repeats 15] [--json PATH]

One layer of each shape (square, up- and down-projection at d, N rows): forward + backward with x
requiring grad, an SGD step on δ and s between calls, untimed. Methods, interleaved round by round
(``timing.time_interleaved``): the dense ``nn.Linear`` with a trainable weight, ``FRoDLinear`` forced
onto the token path, and ``FRoDInputLinear`` on the same float base (path 'auto'). The cost model
puts the input form at 2 + 4n/o units of N·o·n and the token path at 4 + 2n/o (equal for square
layers: the acceptance is ≤ 1.1×), the dense layer at 3. Reported: per shape the median ratio of
each method to the dense call of the same round, with its quartiles, and the input form / token ratio.

Decoding: the same layers in evaluation (no_grad), one row per call, interleaved: the frozen base
``nn.Linear``, the input form with its cached n × n transform (``cache_weight``, the default) and
without it; the median ratio of each to the base call of the same round.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from torch import nn

from frod_kernels import FRoDLinear
from frod_kernels.bench import runner
from frod_kernels.bench.timing import Timed, time_interleaved
from frod_kernels.decomposition import joint_decompose
from frod_kernels.input_layer import CACHED_TRANSFORM, FRoDInputLinear
from frod_kernels.layer import FRoDBasis
from frod_kernels.pattern import sample_sparse_pattern

SHAPES = {"square": (1, 1), "up (o = 4n)": (4, 1), "down (n = 4o)": (1, 4)}


def _layers(o: int, n: int) -> tuple[nn.Linear, FRoDLinear, FRoDInputLinear]:
    torch.manual_seed(0)
    linears = [nn.Linear(n, o) for _ in range(2)]
    jb = joint_decompose([lin.weight for lin in linears], inverse=True)
    basis = FRoDBasis(jb.V, sample_sparse_pattern(n, 0.01, 0), 0.01, 0, 1e-3, V_inv=jb.V_inv,
                      source="joint_decompose")
    token = FRoDLinear(linears[0].weight, linears[0].bias, jb.U[0], jb.lam[0], basis, path="token")
    wrapped = FRoDInputLinear(linears[1], jb.lam[1], basis)
    for p in linears[1].parameters():
        p.requires_grad_(False)
    for layer in (token, wrapped):
        with torch.no_grad():
            layer.delta.normal_(0, 1e-2)
            layer.sparse_values.normal_(0, 1e-2)
    dense = nn.Linear(n, o)
    return dense, token, wrapped


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Timed:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        module(x).backward(grad)

    def between() -> None:
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-1e-6)
                p.grad = None
        x.grad = None

    return Timed(run, between)


def main(argv: Sequence[str] | None = None) -> None:
    parser = runner.make_parser("python -m benchmarks.input_form_step", __doc__, common=True)
    parser.add_argument("--d", type=int, default=512, help="the smaller side of each shape")
    parser.add_argument("--rows", type=int, default=2048, help="N, rows per call")
    runner.add_rounds_options(parser, warmup=3, repeats=15)
    args, device = runner.start(parser, argv)
    d, rows = (32, 64) if args.tiny else (args.d, args.rows)
    result, lines = {"d": d, "rows": rows, "shapes": {}}, []
    for shape, (fo, fn) in SHAPES.items():
        o, n = fo * d, fn * d
        dense, token, wrapped = (m.to(device) for m in _layers(o, n))
        x = torch.randn(rows, n, device=device, requires_grad=True)
        grad = torch.randn(rows, o, device=device)
        methods = {"dense": _step(dense, x, grad), "token": _step(token, x, grad), "input": _step(wrapped, x, grad)}
        samples = time_interleaved(methods, device, warmup=args.warmup, repeats=args.repeats)
        ratios = {name: [t / base for t, base in zip(ts, samples["dense"], strict=True)]
                  for name, ts in samples.items()}
        per_round = [i / t for i, t in zip(samples["input"], samples["token"], strict=True)]
        entry = {name: {"median": statistics.median(r), "q25": statistics.quantiles(r, n=4, method="inclusive")[0],
                        "q75": statistics.quantiles(r, n=4, method="inclusive")[2]} for name, r in ratios.items()}
        entry["input_over_token"] = statistics.median(per_round)
        entry["dense_ms"] = statistics.median(samples["dense"]) * 1e3
        entry["model"] = {"token": 4 + 2 * n / o, "input": 2 + 4 * n / o, "dense": 3}
        result["shapes"][shape] = entry
        lines.append(f"{shape:<16} o x n = {o}x{n}: token {entry['token']['median']:.2f}x dense "
                     f"(model {entry['model']['token'] / 3:.2f}), input {entry['input']['median']:.2f}x dense "
                     f"(model {entry['model']['input'] / 3:.2f}); input / token {entry['input_over_token']:.3f} "
                     f"(dense {entry['dense_ms']:.1f} ms)")
        result["shapes"][shape]["decode"] = _decode(wrapped, n, device, args)
        dec = result["shapes"][shape]["decode"]
        lines.append(f"{'':<16} decoding one row: input form {dec['cached']:.2f}x the base layer with the cached "
                     f"transform, {dec['uncached']:.2f}x without")
    runner.report(args, result, "\n".join(lines))


def _decode(wrapped: FRoDInputLinear, n: int, device: torch.device, args) -> dict[str, float]:
    """Median ratios to the base layer of one-row evaluation calls, cached and uncached (module docstring)."""
    x = torch.randn(1, n, device=device)
    base = wrapped.base_layer
    uncached = FRoDInputLinear(base, wrapped.lam, wrapped.basis)
    uncached.cache_weight = False
    with torch.no_grad():
        uncached.delta.copy_(wrapped.delta)
        uncached.sparse_values.copy_(wrapped.sparse_values)
        methods = {name: Timed(lambda m=m: m(x)) for name, m in
                   (("base", base), ("cached", wrapped), ("uncached", uncached))}
        samples = time_interleaved(methods, device, warmup=args.warmup, repeats=args.repeats * 10)
    assert wrapped.last_path == CACHED_TRANSFORM
    return {name: statistics.median(t / b for t, b in zip(ts, samples["base"], strict=True))
            for name, ts in samples.items() if name != "base"}


if __name__ == "__main__":
    main()
