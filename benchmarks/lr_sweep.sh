#!/usr/bin/env bash
# A small learning-rate sweep for the convergence study (seed 0, 100 steps; ≈ 5 min on 2 CPU cores).
# Each line writes one JSON under benchmarks/results/lr_sweep/; compare with results/cpu_convergence.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=benchmarks/results/lr_sweep
C="$PY -m benchmarks.convergence --threads 2 --no-progress --seeds 0"
$C --methods frod --lr frod=1e-2,1e-3 --json $R/frod_1e-2_1e-3.json | tail -3
$C --methods frod --lr frod=1e-2,1e-2 --json $R/frod_1e-2_1e-2.json | tail -3
$C --methods lora --lr lora=5e-3 --json $R/lora_5e-3.json | tail -3
$C --methods full --lr full=3e-4 --json $R/full_3e-4.json | tail -3
