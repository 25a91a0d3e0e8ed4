"""The experiments and result scripts of this repository: run from a clone, at its root, as
``python -m benchmarks.<module> [--help]``. Not part of the installed package (the wheel ships only
``frod_kernels``); ``benchmarks/README.md`` says which command writes which result under ``results/``.

Experiments: ``convergence`` (MiniLM sentiment fine-tuning; downloads its data set once),
``memorise`` (MiniLM memorising random key → label pairs), ``peft_bench`` (a MiniLM training step,
PEFT's FRoD vs ours), ``model_step`` (a MiniLM training step and evaluation forward), ``decompose_bench``
(joint decomposition vs the published route), ``memory_modes`` and ``fingerprint_cost``. Shared by
them: ``minilm`` (model, methods, schedule) and ``plots``. Also: ``gpu_check`` (everything at once on a
CUDA machine), ``summarize`` (docs/benchmarks.md's tables from the results) and the pytest-benchmark
microbenchmarks ``test_layer_microbench``.
"""
