"""frod_kernels: fused kernels and a drop-in layer for FRoD (full-rank fine-tuning with
rotational degrees of freedom). See docs/design.md for the maths and README.md for usage.

Layout: ``decomposition`` (joint basis), ``pattern`` (Ω), ``reference`` (the dense oracle),
``backends`` (primitives: PyTorch, Triton), ``dispatch`` (backend/path choice), ``ops`` (custom
ops and the autograd formula), ``functional`` (``frod_linear``), ``layer`` (``FRoDLinear``),
``model`` (``apply_frod`` and friends), ``config`` (``FRoDConfig``), ``adapter`` (state dicts and
files), ``export`` (merged checkpoints), ``fingerprint`` (of the base weights), ``peft`` (PEFT's FRoD
on our kernels; imported on demand).
"""

from .adapter import frod_state_dict, load_frod, load_frod_state_dict, save_frod
from .config import FRoDConfig
from .decomposition import JointBasis, joint_decompose
from .export import merged_state_dict, save_pretrained
from .functional import frod_linear
from .layer import FRoDBasis, FRoDLinear
from .model import (
    FRoDCheckpointWarning,
    FRoDSummary,
    apply_frod,
    frod_layers,
    frod_param_groups,
    merge_frod,
    print_trainable_parameters,
    trainable_parameters,
    unload_frod,
    unmerge_frod,
)
from .pattern import SparsePattern, sample_sparse_pattern

__version__ = "0.1.0"

__all__ = [
    "FRoDBasis",
    "FRoDCheckpointWarning",
    "FRoDConfig",
    "FRoDLinear",
    "FRoDSummary",
    "JointBasis",
    "SparsePattern",
    "apply_frod",
    "frod_layers",
    "frod_linear",
    "frod_param_groups",
    "frod_state_dict",
    "joint_decompose",
    "load_frod",
    "load_frod_state_dict",
    "merge_frod",
    "merged_state_dict",
    "print_trainable_parameters",
    "sample_sparse_pattern",
    "save_frod",
    "save_pretrained",
    "trainable_parameters",
    "unload_frod",
    "unmerge_frod",
]
