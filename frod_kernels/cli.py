"""The ``frod-kernels`` command (also ``python -m frod_kernels``): prove FRoD right here and measure one layer.

The parser's description (``DESCRIPTION``) says what each command does; ``--help`` on any command
lists its options with their defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from .bench import layer_bench, path_bench
from .bench.plots import plot_layer_bench
from .bench.runner import add_common_options, add_methods_option, add_rounds_options, make_parser, report, start
from .bench.validate import TENSORS, skipped_backends, validate

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = """\
  frod-kernels         validate every backend and path against the float64 reference, then time one
                       layer forward + backward for a few shapes against the baselines (~1 min on CPU)
  frod-kernels bench   the layer sweep: d x N x sparse rate, JSON and plot
  frod-kernels paths   one layer: the dispatcher's path against every forced path, per shape

The Triton backend is validated on CUDA, or on CPU under Triton's interpreter when TRITON_INTERPRET=1
is set in the environment; the default job says which backends it skipped and why.

The experiments (MiniLM fine-tuning and memorisation, the PEFT comparison, a whole model's training
step, the decomposition study) are not installed: they are scripts in the benchmarks/ folder of the
source repository, run from a clone as python -m benchmarks.<name> (see benchmarks/README.md there).
"""


def _parser() -> argparse.ArgumentParser:
    parser = make_parser("frod-kernels", DESCRIPTION)
    add_common_options(parser, dtype=True)
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="layer fwd+bwd sweep vs the baselines", description="The layer sweep: "
                           "one layer forward + backward, FRoD against the baselines, for every d x N x rate.",
                           formatter_class=parser.formatter_class)
    add_common_options(bench, dtype=True, suppress=True)
    bench.add_argument("--dims", type=int, nargs="+", help="d (default: 256 1024, and 4096 on CUDA; 32 with --tiny)")
    bench.add_argument("--tokens", type=int, nargs="+", help="N (default: 64 256 1024 4096 16384; 8 64 with --tiny)")
    bench.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.02], help="sparse rates")
    add_methods_option(bench, layer_bench.METHODS, None, note=" (default: " + " ".join(_bench_methods("cpu"))
                       + ", and frod_triton_token frod_triton_weight on CUDA)")
    add_rounds_options(bench, warmup=2, repeats=7, per=" per shape", tiny=(0, 1))
    bench.add_argument("--plot", type=Path, default=None, metavar="PNG", help="plot time vs N (matplotlib)")
    paths = sub.add_parser("paths", help="one layer: chosen path vs every forced path", description="One layer "
                           "per shape: the path the dispatcher chooses against each path forced, per call.",
                           formatter_class=parser.formatter_class)
    add_common_options(paths, dtype=True, suppress=True)
    add_rounds_options(paths, warmup=2, repeats=5, per=" per shape", tiny=(1, 2))
    return parser


def _bench_methods(device_type: str) -> list[str]:
    methods = [*layer_bench.DEFAULT_METHODS, "frod_torch_token", "frod_torch_weight", "peft"]
    return methods + (["frod_triton_token", "frod_triton_weight"] if device_type == "cuda" else [])


def _format_validation(rows: Sequence[dict]) -> str:
    head = f"{'backend':<7} {'path':<6} {'x shape':<14} " + " ".join(f"{t:>9}" for t in TENSORS) + "  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        errs = " ".join(f"{r['errors'][t]:9.1e}" for t in TENSORS)
        lines.append(f"{r['backend']:<7} {r['path']:<6} {'x'.join(map(str, r['shape']['x'])):<14} {errs}  "
                     f"{'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def _default(args: argparse.Namespace, device: torch.device) -> int:
    """Validation + a few layer timings; exit status 1 if any validation fails."""
    dtype = getattr(torch, args.dtype)
    skipped = skipped_backends(device)
    for backend, why in skipped.items():
        print(f"skipping the {backend} backend: {why}")
    shapes = ((24, 20, (2, 5)),) if args.tiny else ((96, 80, (3, 17)), (64, 64, (200,)))
    print(f"frod-kernels: validating against the float64 reference ({args.dtype}, {device}); "
          "max relative error per tensor, criterion: <= 2x plain PyTorch's error + eps")
    rows = validate(device, dtype, shapes=shapes)
    print(_format_validation(rows))
    ok = all(r["ok"] for r in rows)
    if args.tiny:
        cases = [layer_bench.LayerCase(64, n, 0.05, args.dtype, device.type) for n in (16, 128)]
        warmup, repeats = 0, 1
    else:
        dims, tokens = (4096, (256, 4096, 16384)) if device.type == "cuda" else (1024, (256, 4096))
        cases = [layer_bench.LayerCase(dims, n, 0.01, args.dtype, str(device)) for n in tokens]
        warmup, repeats = 1, 5
    print(f"\ntiming one layer fwd+bwd (x requires grad, δ and s non-zero; median of {repeats} interleaved runs, "
          f"{torch.get_num_threads()} threads)")
    timings = layer_bench.run_layer_bench(cases, warmup=warmup, repeats=repeats, show_progress=not args.no_progress)
    report(args, {"validation": rows, "skipped_backends": skipped, "layers": timings},
           layer_bench.format_table(timings) + "\ngemm = one N·d² product without autograd; the §5 floor of any "
           "layer needing dW-like statistics is 3x it")
    print("validation:", "all passed" if ok else "FAILED")
    return 0 if ok else 1


def _bench(args: argparse.Namespace, device: torch.device) -> int:
    if args.tiny:
        dims, tokens, rates = args.dims or [32], args.tokens or [8, 64], args.rates[:1]
    else:
        dims = args.dims or ([256, 1024, 4096] if device.type == "cuda" else [256, 1024])
        tokens, rates = args.tokens or [64, 256, 1024, 4096, 16384], args.rates
    methods = args.methods or _bench_methods(device.type)
    cases = [layer_bench.LayerCase(d, n, r, args.dtype, str(device)) for d in dims for r in rates for n in tokens]
    rows = layer_bench.run_layer_bench(
        cases, methods, warmup=0 if args.tiny else args.warmup, repeats=1 if args.tiny else args.repeats,
        show_progress=not args.no_progress,
    )
    info = args.machine
    title = f"{info['cpu'] if device.type == 'cpu' else info.get('gpu')}, {args.dtype}, {info['torch_threads']} threads"
    report(args, {"layers": rows}, layer_bench.format_table(rows),
           plot=lambda path: plot_layer_bench(rows, path, title=title))
    return 0


def _paths(args: argparse.Namespace, device: torch.device) -> int:
    result = path_bench.run_path_bench(
        device=device, tiny=args.tiny, dtype=getattr(torch, args.dtype), warmup=args.warmup, repeats=args.repeats,
        show_progress=not args.no_progress,
    )
    report(args, result, path_bench.format_table(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``frod-kernels`` console script; returns the exit status."""
    args, device = start(_parser(), argv)
    command = {"bench": _bench, "paths": _paths}.get(args.command, _default)
    return command(args, device)
