#!/usr/bin/env bash
# Reproduce the committed CPU results under benchmarks/results/ (about 36 minutes on 2 cores;
# memorise and memory_modes have their own commands, see benchmarks/README.md).
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
$PY -m frod_kernels model-step --threads 1 --no-progress --repeats 7 --json $R/model_step.json
$PY -m frod_kernels paths --threads 1 --no-progress --json $R/paths.json
