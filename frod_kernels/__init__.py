"""frod_kernels: fused kernels and a drop-in layer for FRoD (full-rank fine-tuning with
rotational degrees of freedom). See docs/design.md for the maths and README.md for usage.

Layout: ``decomposition`` (joint basis), ``pattern`` (Ω), ``reference`` (the dense oracle),
``backends`` (primitives: PyTorch, Triton), ``dispatch`` (backend/path choice), ``ops`` (custom
ops and the autograd formula), ``functional`` (``frod_linear``, ``frod_input_transform``),
``basis`` (``FRoDBasis``), ``layer`` (``FRoDLayer``, ``FRoDLinear``), ``layer_state`` (its W' cache,
basis gate, base provenance), ``layer_merge`` (its merge and state dicts), ``input_layer``
(``FRoDInputLinear``, the input form), ``base_layers`` (the frozen bases it wraps, quantized ones
included), ``targets`` (finding and replacing modules), ``categories`` (grouping targets, building
each category), ``model`` (``apply_frod`` and friends), ``summary`` (what it reports), ``config``
(``FRoDConfig``), ``options`` (enumerated options), ``adapter`` (state dicts and files),
``export`` (merged checkpoints, what ``save_pretrained`` writes), ``loading`` (``load_frod``),
``fingerprint`` (of the base weights), ``peft`` (PEFT's FRoD on our kernels; imported on demand).
"""

from .adapter import frod_state_dict, load_frod_state_dict, save_frod
from .basis import FRoDBasis
from .categories import FRoDBaseMismatchWarning, FRoDCategoryWarning
from .config import FRoDConfig
from .decomposition import JointBasis, joint_decompose
from .export import merged_state_dict, save_pretrained
from .functional import frod_input_transform, frod_linear
from .input_layer import FRoDInputLinear
from .layer import FRoDLayer, FRoDLinear
from .loading import load_frod
from .model import apply_frod, frod_param_groups, merge_frod, unload_frod, unmerge_frod
from .pattern import SparsePattern, sample_sparse_pattern
from .summary import FRoDSummary, print_trainable_parameters, trainable_parameters
from .targets import frod_layers

__version__ = "0.1.0"

__all__ = [
    "FRoDBaseMismatchWarning",
    "FRoDBasis",
    "FRoDCategoryWarning",
    "FRoDConfig",
    "FRoDInputLinear",
    "FRoDLayer",
    "FRoDLinear",
    "FRoDSummary",
    "JointBasis",
    "SparsePattern",
    "apply_frod",
    "frod_input_transform",
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
