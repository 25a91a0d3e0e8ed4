"""Print the Markdown tables of docs/benchmarks.md from the committed result files.

    python -m benchmarks.summarize [benchmarks/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(d: dict) -> str:
    m = d["machine"]
    v = m["versions"]
    return (f"_{m['date']}, {m['cpu']} ({m['cpu_count']} cores), {m['torch_threads']} threads, torch {v['torch']}, "
            f"load average {m['load_average_1min']:.1f}; `{d.get('command', '')}`_")


def layers(d: dict) -> str:
    rows = d["layers"]
    cases = sorted({(r["d"], r["n_tokens"], r["sparse_rate"]) for r in rows})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("gemm", "dense")]
    out = [_machine(d), "",
           "| d | N | ρ | dense ms | floor ms | " + " | ".join(f"{m} (× dense)" for m in methods)
           + " | published / frod |",
           "|" + "---|" * (6 + len(methods))]
    for case in cases:
        sel = {r["method"]: r for r in rows if (r["d"], r["n_tokens"], r["sparse_rate"]) == case}
        cells = []
        for m in methods:
            r = sel.get(m)
            path = f" {r['path']}" if r and r.get("path") and m == "frod" else ""
            cells.append("–" if r is None else f"{r['ms']:.3g} ({r['ratio_to_dense']:.2f}×{path})")
        speedup = sel["published"]["ms"] / sel["frod"]["ms"] if {"published", "frod"} <= sel.keys() else float("nan")
        head = f"| {case[0]} | {case[1]} | {case[2]:g} | {sel['dense']['ms']:.3g} | {sel['gemm']['floor_ms']:.3g} | "
        out.append(head + " | ".join(cells) + f" | {speedup:.2f}× |")
    return "\n".join(out)


def memory(d: dict) -> str:
    rows = [r for r in d["layers"] if r["method"] != "gemm" and "peak_mem_mb" in r]
    cases = sorted({(r["d"], r["n_tokens"], r["sparse_rate"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = ["| d | N | ρ | " + " | ".join(methods) + " |", "|" + "---|" * (3 + len(methods))]
    for case in cases:
        sel = {r["method"]: r for r in rows if (r["d"], r["n_tokens"], r["sparse_rate"]) == case}
        out.append(f"| {case[0]} | {case[1]} | {case[2]:g} | "
                   + " | ".join(f"{sel[m]['peak_mem_mb']:.1f}" if m in sel else "–" for m in methods) + " |")
    last = cases[-1]
    trainable = {r["method"]: r["trainable"] for r in rows if (r["d"], r["sparse_rate"]) == (last[0], last[2])}
    out += ["", f"Trainable parameters at d = {cases[-1][0]}, ρ = {cases[-1][2]:g}: "
            + ", ".join(f"{m} {n:,}" for m, n in trainable.items())]
    return "\n".join(out)


def validation(d: dict) -> str:
    tensors = list(d["validation"][0]["errors"])
    out = ["| backend | path | dtype | x | " + " | ".join(tensors) + " | ok |", "|" + "---|" * (5 + len(tensors))]
    for r in d["validation"]:
        out.append(f"| {r['backend']} | {r['path']} | {r['dtype']} | {'×'.join(map(str, r['shape']['x']))} | "
                   + " | ".join(f"{r['errors'][t]:.1e}" for t in tensors) + f" | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(out)


def decompose(d: dict) -> str:
    out = [_machine(d), "", "| category | L × (o, n) | ours ms | published fp32 ms | speed-up | published fp64 ms | "
           "speed-up | ours MB | published MB | ours error | published fp32 error | published fp64 error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["categories"]:
        o, p, p64 = r["ours"], r["published"], r["published_f64"]
        out.append(f"| {r['category']} | {r['layers']} × ({r['out_features']}, {r['in_features']}) | {o['ms']:.0f} | "
                   f"{p['ms']:.0f} | {r['speedup']:.2f}× | {p64['ms']:.0f} | {r['speedup_f64']:.2f}× | "
                   f"{o['peak_mem_mb']:.0f} | {p['peak_mem_mb']:.0f} | {o['max_error']:.1e} | {p['max_error']:.1e} | "
                   f"{p64['max_error']:.1e} |")
    return "\n".join(out)


def convergence(d: dict) -> str:
    levels = d["loss_levels"]
    out = [_machine(d), "", f"{d['title']}; {d['steps']} steps, batch {d['batch']}, seeds {d['seeds']}, "
           f"train {d['train_size']}, test {d['test_size']}; learning rates {d['learning_rates']}", "",
           "| method | trainable | test accuracy % (mean ± std) | final loss (EMA) | s / step | "
           + " | ".join(f"steps to {lv:.3f}" for lv in levels) + " |", "|" + "---|" * (5 + len(levels))]
    for name, m in d["methods"].items():
        reach = " | ".join("never" if s is None else str(s) for s in m["steps_to_level"])
        out.append(f"| {name} | {m['trainable']:,} | {m['test_accuracy_mean']:.2f} ± {m['test_accuracy_std']:.2f} | "
                   f"{m['final_loss_mean']:.3f} ± {m['final_loss_std']:.3f} | {m['seconds_per_step']:.2f} | {reach} |")
    if "targets" in d:
        t = {k: round(v, 3) if isinstance(v, float) else v for k, v in d["targets"].items()}
        out += ["", "Targets: " + json.dumps(t)]
    return "\n".join(out)


def lr_sweep(results: Path) -> str:
    out = ["| file | method | learning rates | test accuracy % | final loss (EMA) |", "|---|---|---|---|---|"]
    for path in sorted((results / "lr_sweep").glob("*.json")):
        d = json.loads(path.read_text())
        for name, m in d["methods"].items():
            lr = d["learning_rates"][name]
            out.append(f"| lr_sweep/{path.name} | {name} | {lr} | {m['test_accuracy_mean']:.2f} | "
                       f"{m['final_loss_mean']:.3f} |")
    return "\n".join(out)


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    for title, name, fn in [
        ("Validation (cpu_default)", "cpu_default", validation),
        ("Default shapes, d = 1024 (cpu_default)", "cpu_default", layers),
        ("Layer sweep (cpu_layers)", "cpu_layers", layers),
        ("Peak memory MB of one fwd+bwd (cpu_layers)", "cpu_layers", memory),
        ("Decomposition (cpu_decompose)", "cpu_decompose", decompose),
        ("Convergence (cpu_convergence)", "cpu_convergence", convergence),
    ]:
        d = _load(results, name)
        if d is not None:
            print(f"### {title}\n\n{fn(d)}\n")
    if (results / "lr_sweep").is_dir():
        print(f"### Learning-rate sweep (seed 0)\n\n{lr_sweep(results)}\n")


if __name__ == "__main__":
    main()
