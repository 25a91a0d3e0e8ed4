"""Where the joint decomposition's time goes: ``torch.profiler`` self time per operator.

    python -m benchmarks.decompose_profile [--model random|smollm2|minilm] [--tiny] [--top K] [--json PATH]

Each category of the model (grouped as ``apply_frod`` groups them) is decomposed once untimed, then
once more under ``torch.profiler`` (CPU activities; no shapes recorded, which would add to each call),
each pass inside one ``shared_stack()``, as ``apply_frod`` runs them.
Reported: the wall time of each category's profiled call, and the ``top`` operators by self CPU time
summed over all categories, each with its call count and share of the total self time. The profiler adds
its own cost per operator call, and one pass after a warm-up in the same process is not setup_cost's
median of rounds, so the shares, not the absolute times, are what this measures; ``benchmarks.setup_cost``
times the decomposition without it.

Models: as ``benchmarks.gram_form`` (``random``: setup_cost's SmolLM2-shaped Llama; ``smollm2``,
``minilm``: real weights); ``--tiny``: a 2-layer Llama of width 48 (the smoke test).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.gram_form import add_model_option, category_model
from benchmarks.input_form_error import _categories
from frod_kernels.bench import runner
from frod_kernels.decomposition import joint_decompose, shared_stack


def main(argv: Sequence[str] | None = None) -> None:
    parser = runner.make_parser("python -m benchmarks.decompose_profile", __doc__, common=True)
    add_model_option(parser)
    parser.add_argument("--top", type=int, default=12, help="operators to report, by self CPU time")
    args, device = runner.start(parser, argv)
    label, model = category_model(args, device)
    categories = {cat: [lin.weight.detach() for lin in linears] for cat, linears in _categories(model).items()}
    with shared_stack():
        for weights in categories.values():
            joint_decompose(weights)  # untimed: first-call costs (the error probe, the allocator's pools) stay out
    wall = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof, shared_stack():
        for cat, weights in categories.items():
            started = time.perf_counter()
            joint_decompose(weights)
            wall[cat] = time.perf_counter() - started
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    operators = [{"name": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                  "share": e.self_cpu_time_total / total_us} for e in events[:args.top]]
    result = {"model": label, "threads": torch.get_num_threads(),
              "categories_s": wall, "total_wall_s": sum(wall.values()), "total_self_s": total_us / 1e6,
              "operators": operators}
    lines = [f"{cat[:52]:<52} {seconds:>7.3f} s" for cat, seconds in wall.items()]
    lines.append(f"{'all categories (profiled)':<52} {sum(wall.values()):>7.3f} s")
    lines.append(f"{'operator':<36} {'self s':>8} {'calls':>6} {'share':>6}")
    lines += [f"{op['name']:<36} {op['self_s']:>8.3f} {op['calls']:>6} {op['share']:>6.1%}" for op in operators]
    runner.report(args, result, "\n".join(lines))


if __name__ == "__main__":
    main()
