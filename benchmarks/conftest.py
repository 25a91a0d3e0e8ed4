"""pytest-benchmark settings for ``benchmarks/``: 2 threads, glibc kept from unmapping freed tensors.

Sizes: ``FROD_BENCH_SIZES=tiny`` (smoke test), default d ∈ {256, 1024} × N ∈ {256, 4096} × ρ ∈ {0.01, 0.02}.
"""

import torch

from frod_kernels.bench.timing import tune_malloc

torch.set_num_threads(min(torch.get_num_threads(), 2))
tune_malloc()
