"""Benchmark logic shared by the ``frod-kernels`` command and the scripts under ``benchmarks/``.

``baselines`` (the layers FRoD is compared with: dense, LoRA, the published code, PEFT), ``timing``
(interleaved medians, peak memory, progress bar, machine info), ``validate`` (every
backend/path against the float64 reference), ``layer_bench`` (one layer fwd+bwd vs the baselines),
``decompose_bench`` (joint decomposition vs the published route), ``convergence`` (MiniLM
fine-tuning: FRoD vs LoRA vs full), ``memorise`` (MiniLM memorising random key → label pairs),
``plots`` (optional matplotlib figures).
"""
