"""What the ``frod-kernels`` command runs after ``pip install``: validation and the layer benchmarks.

``validate`` (every backend/path against the float64 reference), ``layer_bench`` (one layer fwd+bwd
vs the baselines), ``path_bench`` (the dispatcher's path against every forced path), ``baselines``
(the layers FRoD is compared with: dense, LoRA, the published code, PEFT), ``timing`` (interleaved
medians, peak memory, progress bar, machine info), ``plots`` (the layer benchmark's figure, optional
matplotlib) and ``runner`` (the commands' options, set-up and result files).
"""
