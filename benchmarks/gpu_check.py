"""GPU check (issue 3, item 4): correctness of every path × dtype, then fwd+bwd timings, in ≤ ~6 minutes.

    python benchmarks/gpu_check.py                 # on a CUDA machine; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --tiny          # anywhere: tiny sizes, Triton under its CPU interpreter

1. Validation: every backend (torch, triton) × path (token, weight) × dtype (fp32, bf16, fp16) against
   the float64 reference; a tensor passes when its relative error ≤ 2 × plain PyTorch's error in the
   same dtype + eps (``frod_kernels.bench.validate``).
2. Timing (bf16; fp32 with --tiny): fwd+bwd of one layer, x requiring grad, δ and s non-zero, for
   d ∈ {1024, 4096} × N ∈ {256, 4096, 16384}: the Triton and PyTorch paths, the dispatcher's choice,
   a dense nn.Linear with trainable weight (cuBLAS), LoRA at FRoD's trainable count, and the
   published-code layer. CUDA events, interleaved medians (``frod_kernels.bench.timing``).
The table (ms, TFLOP/s as 6·N·d² / t, ratio to dense) is printed last and everything goes to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if "--tiny" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the Triton backend's import

from frod_kernels.bench import layer_bench
from frod_kernels.bench.timing import machine_info, tune_malloc
from frod_kernels.bench.validate import TENSORS, available_backends, validate

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
METHODS = ("dense", "lora", "frod", "frod_triton_token", "frod_triton_weight", "frod_torch_token",
           "frod_torch_weight", "published")


def _validation(device: torch.device, tiny: bool) -> list[dict]:
    shapes = ((24, 20, (2, 5)),) if tiny else ((1000, 1024, (3, 333)), (4096, 4096, (513,)), (96, 80, (3, 17)))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cpu"
    rows = []
    for dtype in DTYPES:
        backends = available_backends(device)
        if interpreted and dtype == torch.bfloat16:
            backends = [b for b in backends if b != "triton"]  # the interpreter computes through numpy: no bf16
        rows += validate(device, dtype, backends=backends, shapes=shapes, rate=0.01 if not tiny else 0.05)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes; Triton interpreter when there is no GPU")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: run with --tiny to exercise the script on CPU", file=sys.stderr)
        return 2
    tune_malloc()
    started = time.perf_counter()
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
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(device), "validation": checks, "layers": timings},
                                    indent=1) + "\n")
    print(f"wrote {args.json}; total {time.perf_counter() - started:.0f}s")
    print(layer_bench.format_table(timings))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
