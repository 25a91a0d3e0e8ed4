"""pytest-benchmark microbenchmarks: one layer fwd+bwd, FRoD paths vs the baselines (not in the test run).

    python -m pytest benchmarks/test_layer_microbench.py --benchmark-json benchmarks/results/cpu_microbench.json

Each round is y = layer(x); y.backward(dY) with x requiring grad; between rounds (untimed, pytest-
benchmark's ``setup``) the trainable tensors take an SGD-like step and every gradient is reset, as in
``frod_kernels.bench.layer_bench`` (whose module builder is reused, so both measure the same layers).
"""

from __future__ import annotations

import os

import pytest
import torch

from frod_kernels.bench.layer_bench import LayerCase, build_modules, update_and_zero

TINY = os.environ.get("FROD_BENCH_SIZES") == "tiny"
DIMS = (32,) if TINY else (256, 1024)
TOKENS = (16,) if TINY else (256, 4096)
RATES = (0.05,) if TINY else (0.01, 0.02)
METHODS = ("dense", "lora", "frod", "frod_torch_token", "frod_torch_weight", "published", "naive", "peft")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("d", DIMS)
def test_layer_fwd_bwd(benchmark, d, n_tokens, rate, method):
    case = LayerCase(d, n_tokens, rate)
    modules = build_modules(case, [method], seed=0)
    if method not in modules:
        pytest.skip(f"{method} is not available (optional dependency missing)")
    module = modules[method]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_tokens, d, generator=g).requires_grad_()
    gy = torch.randn(n_tokens, d, generator=g)
    between = update_and_zero([p for p in module.parameters() if p.requires_grad], x)
    benchmark.extra_info.update({"d": d, "n_tokens": n_tokens, "sparse_rate": rate, "method": method})
    benchmark.pedantic(lambda: module(x).backward(gy), setup=between, rounds=1 if TINY else 7, warmup_rounds=1)
