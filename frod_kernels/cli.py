"""``frod-kernels`` (also ``python -m frod_kernels``): prove FRoD right and measure what it costs here.

    frod-kernels                 validate every backend/path against the reference, then time one
                                 layer fwd+bwd for a few shapes against the baselines (~1 min on CPU)
    frod-kernels bench           the layer sweep: d × N × ρ, JSON + plot
    frod-kernels decompose       joint decomposition vs the published route
    frod-kernels convergence     MiniLM sentiment fine-tuning: FRoD vs LoRA vs full fine-tuning
    frod-kernels memorise        MiniLM memorising random key → label pairs: FRoD vs LoRA vs full vs head only
    frod-kernels peft            MiniLM training step: PEFT's FRoD vs accelerated vs ours vs LoRA vs full
    frod-kernels model-step      MiniLM training step (with/without gradient accumulation) and unmerged
                                 evaluation forward: FRoD vs full fine-tuning vs LoRA
    frod-kernels paths           one layer: the dispatcher's path against every forced path, per shape

Common options (before or after the subcommand): --device, --dtype, --threads, --json PATH, --tiny
(smallest sizes, for smoke tests), --no-progress, --no-malloc-tuning. The Triton backend is
validated on CUDA, or on CPU under Triton's interpreter when TRITON_INTERPRET=1 is set in the
environment; the main job says which backends it skipped and why.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]


def _common(suppress: bool = False) -> argparse.ArgumentParser:
    """The options every command takes. The subcommands' copy (``suppress``) has no defaults, so that
    an option given before the subcommand (``frod-kernels --tiny bench``) is not overwritten by the
    subparser's default; the top-level parser supplies the defaults."""
    p = argparse.ArgumentParser(add_help=False)

    def add(*names: str, default=None, **kw) -> None:
        p.add_argument(*names, default=argparse.SUPPRESS if suppress else default, **kw)

    add("--device", help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    add("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    add("--threads", type=int, help="torch.set_num_threads (default: leave as is)")
    add("--json", type=Path, metavar="PATH", help="write the results as JSON")
    add("--tiny", default=False, action="store_true", help="smallest sizes (smoke test)")
    add("--no-progress", default=False, action="store_true", help="no progress bar on stderr")
    add("--no-malloc-tuning", default=False, action="store_true",
        help="keep glibc's default mmap/trim thresholds (see frod_kernels.bench.timing.tune_malloc)")
    return p


def _parser() -> argparse.ArgumentParser:
    common = _common(suppress=True)
    parser = argparse.ArgumentParser(
        prog="frod-kernels", parents=[_common()], description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", parents=[common], help="layer fwd+bwd sweep vs the baselines")
    bench.add_argument("--dims", type=int, nargs="+", default=None, help="d (default 256 1024; 4096 on CUDA)")
    bench.add_argument("--tokens", type=int, nargs="+", default=None, help="N (default 64 ... 16384)")
    bench.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.02], help="sparse_rate ρ")
    bench.add_argument("--methods", nargs="+", default=None, help="methods (see frod_kernels.bench.layer_bench)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--repeats", type=int, default=7)
    bench.add_argument("--plot", type=Path, default=None, metavar="PNG")
    dec = sub.add_parser("decompose", parents=[common], help="joint decomposition vs the published route")
    dec.add_argument("--suite", choices=["tiny", "cpu", "gpu"], default=None, help="default: cpu, or gpu on CUDA")
    dec.add_argument("--repeats", type=int, default=2)
    conv = sub.add_parser("convergence", parents=[common], help="MiniLM fine-tuning: FRoD vs LoRA vs full")
    conv.add_argument("--steps", type=int, default=None)
    conv.add_argument("--seeds", type=int, nargs="+", default=None)
    conv.add_argument("--methods", nargs="+", default=None)
    conv.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                      help="override a learning rate, e.g. --lr lora=5e-3 --lr frod=1e-2,1e-3 (δ, s)")
    conv.add_argument("--plot", type=Path, default=None, metavar="PNG")
    mem = sub.add_parser("memorise", parents=[common], help="MiniLM memorising random keys: FRoD vs LoRA vs full")
    mem.add_argument("--keys", type=int, default=None, help="K training keys (default 256)")
    mem.add_argument("--classes", type=int, default=None, help="C labels (default 8)")
    mem.add_argument("--pool", type=int, default=None, help="words in each seed's key vocabulary (default 3)")
    mem.add_argument("--steps", type=int, default=None)
    mem.add_argument("--batch", type=int, default=None)
    mem.add_argument("--eval-every", type=int, default=None, help="steps between train-accuracy evaluations")
    mem.add_argument("--seeds", type=int, nargs="+", default=None)
    mem.add_argument("--methods", nargs="+", default=None)
    mem.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                     help="learning-rate grid of a method, swept on the first seed (one value: no sweep)")
    mem.add_argument("--plot", type=Path, default=None, metavar="PNG")
    pb = sub.add_parser("peft", parents=[common], help="MiniLM step: PEFT FRoD vs accelerated vs ours vs LoRA vs full")
    pb.add_argument("--batch", type=int, default=16)
    pb.add_argument("--seq-len", type=int, default=128)
    pb.add_argument("--warmup", type=int, default=1)
    pb.add_argument("--repeats", type=int, default=5)
    pb.add_argument("--methods", nargs="+", default=None, help="see frod_kernels.bench.peft_bench.METHODS")
    ms = sub.add_parser("model-step", parents=[common], help="MiniLM step and eval forward: FRoD vs full vs LoRA")
    ms.add_argument("--seq-len", type=int, default=128)
    ms.add_argument("--warmup", type=int, default=1)
    ms.add_argument("--repeats", type=int, default=5)
    ms.add_argument("--methods", nargs="+", default=None, help="see frod_kernels.bench.model_step.METHODS")
    pa = sub.add_parser("paths", parents=[common], help="one layer: chosen path vs every forced path")
    pa.add_argument("--warmup", type=int, default=2)
    pa.add_argument("--repeats", type=int, default=5)
    return parser


def _setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        from .bench.timing import tune_malloc

        tune_malloc()
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


def _format_validation(rows: Sequence[dict]) -> str:
    from .bench.validate import TENSORS

    head = f"{'backend':<7} {'path':<6} {'x shape':<14} " + " ".join(f"{t:>9}" for t in TENSORS) + "  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        errs = " ".join(f"{r['errors'][t]:9.1e}" for t in TENSORS)
        lines.append(f"{r['backend']:<7} {r['path']:<6} {'x'.join(map(str, r['shape']['x'])):<14} {errs}  "
                     f"{'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def _default(args: argparse.Namespace, device: torch.device) -> int:
    """Validation + a few layer timings; exit status 1 if any validation fails."""
    from .bench import layer_bench
    from .bench.validate import skipped_backends, validate

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
    print(layer_bench.format_table(timings))
    print("gemm = one N·d² product without autograd; the §5 floor of any layer needing dW-like statistics is 3x it")
    _write_json(args.json, {"machine": args.machine, "command": args.command_line, "validation": rows,
                            "skipped_backends": skipped, "layers": timings})
    print("validation:", "all passed" if ok else "FAILED")
    return 0 if ok else 1


def _bench(args: argparse.Namespace, device: torch.device) -> int:
    from .bench import layer_bench
    from .bench.plots import plot_layer_bench

    if args.tiny:
        dims, tokens, rates = args.dims or [32], args.tokens or [8, 64], args.rates[:1]
    else:
        dims = args.dims or ([256, 1024, 4096] if device.type == "cuda" else [256, 1024])
        tokens, rates = args.tokens or [64, 256, 1024, 4096, 16384], args.rates
    methods = args.methods or [*layer_bench.DEFAULT_METHODS, "frod_torch_token", "frod_torch_weight", "peft"]
    if device.type == "cuda" and not args.methods:
        methods += ["frod_triton_token", "frod_triton_weight"]
    cases = [layer_bench.LayerCase(d, n, r, args.dtype, str(device)) for d in dims for r in rates for n in tokens]
    rows = layer_bench.run_layer_bench(
        cases, methods, warmup=0 if args.tiny else args.warmup, repeats=1 if args.tiny else args.repeats,
        show_progress=not args.no_progress,
    )
    print(layer_bench.format_table(rows))
    info = args.machine
    _write_json(args.json, {"machine": info, "command": args.command_line, "layers": rows})
    if args.plot:
        machine = info["cpu"] if device.type == "cpu" else info.get("gpu")
        title = f"{machine}, {args.dtype}, {info['torch_threads']} threads"
        if plot_layer_bench(rows, args.plot, title=title):
            print(f"wrote {args.plot}")
    return 0


def _decompose(args: argparse.Namespace, device: torch.device) -> int:
    from .bench import decompose_bench

    name = "tiny" if args.tiny else (args.suite or ("gpu" if device.type == "cuda" else "cpu"))
    rows = decompose_bench.run_decompose_bench(
        decompose_bench.suite(name), device, repeats=1 if args.tiny else args.repeats,
        show_progress=not args.no_progress,
    )
    print(decompose_bench.format_table(rows))
    _write_json(args.json, {"machine": args.machine, "command": args.command_line, "suite": name,
                            "categories": rows})
    return 0


def _convergence(args: argparse.Namespace, device: torch.device) -> int:
    from .bench import convergence
    from .bench.plots import plot_convergence

    lrs = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        values = tuple(float(v) for v in value.split(","))
        if name not in convergence.METHODS or len(values) != (2 if name == "frod" else 1):
            raise SystemExit(f"--lr {item!r}: expected METHOD=LR (frod=LR_DELTA,LR_SPARSE) for {convergence.METHODS}")
        lrs[name] = values if name == "frod" else values[0]
    result = convergence.run_convergence(
        device=device, tiny=args.tiny, steps=args.steps, seeds=args.seeds, methods=args.methods,
        learning_rates=lrs, show_progress=not args.no_progress,
    )
    return _finish(args, result, convergence.format_report(result), plot_convergence)


def _finish(args: argparse.Namespace, result: dict, report: str, plot) -> int:
    """Print the report, write the JSON (with machine and command) and the plot if asked."""
    print(report)
    _write_json(args.json, {"machine": args.machine, "command": args.command_line, **result})
    if args.plot and plot(result, args.plot):
        print(f"wrote {args.plot}")
    return 0


def _memorise(args: argparse.Namespace, device: torch.device) -> int:
    from .bench import memorise
    from .bench.plots import plot_memorise

    grid = {}
    for item in args.lr:
        name, _, values = item.partition("=")
        if name not in memorise.METHODS or not values:
            raise SystemExit(f"--lr {item!r}: expected METHOD=LR[,LR...] for {memorise.METHODS}")
        grid[name] = tuple(float(v) for v in values.split(","))
    result = memorise.run_memorise(
        device=device, tiny=args.tiny, keys=args.keys, classes=args.classes, pool=args.pool, steps=args.steps,
        batch=args.batch,
        eval_every=args.eval_every, seeds=args.seeds, methods=args.methods, lr_grid=grid,
        show_progress=not args.no_progress,
        checkpoint=lambda partial: _write_json(args.json, {"machine": args.machine, "command": args.command_line,
                                                           **partial}),
    )
    return _finish(args, result, memorise.format_report(result), plot_memorise)


def _peft(args: argparse.Namespace, device: torch.device) -> int:
    from .bench import peft_bench

    result = peft_bench.run_peft_bench(
        device=device, tiny=args.tiny, batch=args.batch, seq_len=args.seq_len, warmup=args.warmup,
        repeats=args.repeats, methods=args.methods, show_progress=not args.no_progress,
    )
    print(peft_bench.format_report(result))
    _write_json(args.json, {"machine": args.machine, "command": args.command_line, **result})
    return 0


def _model_step(args: argparse.Namespace, device: torch.device) -> int:
    from .bench import model_step

    result = model_step.run_model_step(
        device=device, tiny=args.tiny, seq_len=args.seq_len, warmup=args.warmup, repeats=args.repeats,
        methods=args.methods, show_progress=not args.no_progress,
    )
    print(model_step.format_report(result))
    _write_json(args.json, {"machine": args.machine, "command": args.command_line, **result})
    return 0


def _paths(args: argparse.Namespace, device: torch.device) -> int:
    from .bench import path_bench

    result = path_bench.run_path_bench(
        device=device, tiny=args.tiny, dtype=getattr(torch, args.dtype), warmup=args.warmup, repeats=args.repeats,
        show_progress=not args.no_progress,
    )
    print(path_bench.format_table(result))
    _write_json(args.json, {"machine": args.machine, "command": args.command_line, **result})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``frod-kernels`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.command_line = " ".join(["frod-kernels", *argv])
    device = _setup(args)
    from .bench.timing import load_warning, machine_info

    args.machine = machine_info(device)  # at the start: the load average before the run
    warning = load_warning(args.machine) if device.type == "cpu" else None
    if warning:
        print(warning, file=sys.stderr)
    command = {"bench": _bench, "decompose": _decompose, "convergence": _convergence,
               "memorise": _memorise, "peft": _peft, "model-step": _model_step,
               "paths": _paths}.get(args.command, _default)
    return command(args, device)
