#!/usr/bin/env bash
# Regenerate the six core CPU results under benchmarks/results/ (about 50 minutes on 2 cores; the
# README gives the time of each step and the commands of the other committed results).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=benchmarks/results
$PY -m frod_kernels --threads 2 --no-progress --json $R/cpu_default.json | tee $R/cpu_default.txt
$PY -m frod_kernels bench --threads 2 --no-progress --repeats 5 --warmup 1 \
    --json $R/cpu_layers.json --plot $R/cpu_layers.png | tee $R/cpu_layers.txt
$PY -m benchmarks.decompose_bench --threads 2 --no-progress --json $R/cpu_decompose.json | tee $R/cpu_decompose.txt
$PY -m benchmarks.convergence --threads 2 --no-progress \
    --json $R/cpu_convergence.json --plot $R/cpu_convergence.png | tee $R/cpu_convergence.txt
$PY -m benchmarks.model_step --threads 1 --no-progress --repeats 7 --json $R/model_step.json | tee $R/model_step.txt
$PY -m frod_kernels paths --threads 1 --no-progress --json $R/paths.json | tee $R/paths.txt
