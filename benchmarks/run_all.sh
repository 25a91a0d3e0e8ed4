#!/usr/bin/env bash
# Reproduce every committed CPU result under benchmarks/results/ (about 30 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=benchmarks/results
$PY -m frod_kernels --threads 2 --no-progress --json $R/cpu_default.json | tee $R/cpu_default.txt
$PY -m frod_kernels bench --threads 2 --no-progress --repeats 5 --warmup 1 \
    --json $R/cpu_layers.json --plot $R/cpu_layers.png | tee $R/cpu_layers.txt
$PY -m frod_kernels decompose --threads 2 --no-progress --json $R/cpu_decompose.json | tee $R/cpu_decompose.txt
$PY -m frod_kernels convergence --threads 2 --no-progress \
    --json $R/cpu_convergence.json --plot $R/cpu_convergence.png | tee $R/cpu_convergence.txt
