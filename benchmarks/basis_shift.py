"""A change to the joint decomposition against an earlier revision, per category: time and basis shift.

    python -m benchmarks.basis_shift --against REV [--model random|smollm2|minilm] [--tiny] [--warmup W]
                                     [--repeats R] [--json PATH]

``frod_kernels/decomposition.py`` as committed at ``REV`` (``git show``; it imports only torch and the
standard library) is loaded beside the working tree's, and both decompose each category of the model in
interleaved rounds (``--threads`` as given; each call also makes the column-major copy of U that a
``FRoDLinear`` keeps, so that a change of U's layout is timed where its cost lands). Reported per category:
the median time of each and their same-round ratio (ours / REV), whether V is equal bit for bit, and
otherwise how far it moved in the storage dtype: columns whose sign differs, and the largest column
difference after aligning signs over the typical column (``benchmarks.gram_form``'s measure). A change
that moves V by rounding only (far below a float32 ulp, no sign flips) keeps adapters and Trainer
checkpoints of REV loading and resuming (docs/design.md §2, "Versioning").

Models: as ``benchmarks.gram_form`` (``random``: setup_cost's SmolLM2-shaped Llama; ``smollm2``, ``minilm``:
real weights); ``--tiny``: a 2-layer Llama of width 48 (the smoke test).
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.gram_form import _apart, add_model_option, category_model
from benchmarks.input_form_error import _categories
from frod_kernels import decomposition
from frod_kernels.bench import runner
from frod_kernels.bench.timing import Timed, summarize, time_interleaved

_SOURCE = "frod_kernels/decomposition.py"


def decomposition_at(rev: str) -> ModuleType:
    """``decomposition.py`` as committed at ``rev``, loaded as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:{_SOURCE}"], cwd=root, capture_output=True, text=True)
    if source.returncode != 0:
        raise SystemExit(f"basis_shift: cannot read {_SOURCE} at {rev!r}: {source.stderr.strip()}")
    name = f"_decomposition_at_{rev.replace('~', '_').replace('^', '_')}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(source.stdout)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return module


def _decompose(module: ModuleType, weights: list[torch.Tensor]):
    basis = module.joint_decompose(weights)
    for u in basis.U:
        u.t().contiguous()  # the layer's column-major copy (free where U already is column-major)
    return basis


def measure(before: ModuleType, weights: list[torch.Tensor], device: torch.device, warmup: int, repeats: int) -> dict:
    """One category's row (module docstring)."""
    weights = [w.detach() for w in weights]
    samples = time_interleaved({"ours": Timed(lambda: _decompose(decomposition, weights)),
                                "before": Timed(lambda: _decompose(before, weights))},
                               device, warmup=warmup, repeats=repeats)
    v, v_before = decomposition.joint_decompose(weights).V, before.joint_decompose(weights).V
    flips, apart = _apart(v, v_before)
    o, n = weights[0].shape
    return {
        "layers": len(weights), "out_features": o, "in_features": n,
        "ours_ms": summarize(samples["ours"]), "before_ms": summarize(samples["before"]),
        "ratio": statistics.median(a / b for a, b in zip(samples["ours"], samples["before"], strict=True)),
        "equal": bool(torch.equal(v, v_before)), "sign_flips": flips, "max_column_difference": apart,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = runner.make_parser("python -m benchmarks.basis_shift", __doc__, common=True)
    parser.add_argument("--against", required=True, help="the git revision to compare with")
    add_model_option(parser)
    runner.add_rounds_options(parser, 1, 5, per=" per category", tiny=(0, 1))
    args, device = runner.start(parser, argv)
    if args.tiny:
        args.warmup, args.repeats = 0, 1
    before = decomposition_at(args.against)
    label, model = category_model(args, device)
    result = {"model": label, "against": args.against,
              "warmup": args.warmup, "repeats": args.repeats, "threads": torch.get_num_threads(), "categories": {}}
    lines = [f"{'category':<44} {'o x n':>11} {'ours':>9} {'before':>9} {'ratio':>6} {'equal':>5} {'flips':>5} "
             f"{'apart':>8}"]
    total = {"ours": 0.0, "before": 0.0}
    for cat, linears in _categories(model).items():
        row = measure(before, [lin.weight for lin in linears], device, args.warmup, args.repeats)
        result["categories"][cat] = row
        total["ours"] += row["ours_ms"]["ms"]
        total["before"] += row["before_ms"]["ms"]
        lines.append(f"{cat[:44]:<44} {row['out_features']:>5}x{row['in_features']:<5} {row['ours_ms']['ms']:>7.0f}ms "
                     f"{row['before_ms']['ms']:>7.0f}ms {row['ratio']:>6.3f} {'yes' if row['equal'] else 'no':>5} "
                     f"{row['sign_flips']:>5} {row['max_column_difference']:>8.1e}")
    result["total_ms"] = total
    lines.append(f"total: ours {total['ours']:.0f} ms, {args.against} {total['before']:.0f} ms "
                 f"(ratio of sums {total['ours'] / total['before']:.3f}); medians of {args.repeats} interleaved "
                 f"rounds, ratio: median same-round ratio")
    lines.append("apart: the largest column difference of the two V (storage dtype), signs aligned, over the "
                 "rms column norm")
    runner.report(args, result, "\n".join(lines))


if __name__ == "__main__":
    main()
