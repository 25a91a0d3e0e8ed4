"""``FRoDConfig``: every option of ``apply_frod``, as one object (PEFT's ``LoraConfig`` habit).

``apply_frod(model, config)`` applies it and appends it to ``model.frod_configs`` (one entry per
call: calls compose). The adapter file does not depend on it: each category records its own
inputs (see ``adapter``), so an adapter loads into a bare base model without the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from .decomposition import validate_reg
from .dispatch import BACKENDS, PATHS
from .options import check_choice
from .pattern import validate_seed, validate_sparse_rate

__all__ = ["MODES", "FRoDConfig"]

MODES = ("additive", "factored", "input")


@dataclass
class FRoDConfig:
    """What to adapt and how; every field is checked when the config is made.

    target_modules: a regex (full match on the module name) or a list of name suffixes. A module
        reachable under several names is matched by any of them and replaced under all.
    sparse_rate: ρ in (0, 1) or 0, the share of off-diagonal entries of M that train (k = ⌊ρ·n²⌋).
    seed: base seed of the sparse patterns (one pattern per category, derived from it).
    reg: α > 0 of the joint decomposition (docs/design.md §2).
    mode: 'additive' (keep W), 'factored' (drop W, docs/design.md §6) or 'input' (wrap the base as it
        is, quantized bases included: y = base(x + x·V·Mᵀ·Λ⁺·V⁻¹), docs/design.md §6.1).
    mode_pattern: {name suffix or regex: mode} for categories that differ from ``mode`` (PEFT's
        ``rank_pattern`` habit), matched against a category's first layer like ``target_modules``:
        e.g. ``mode="input", mode_pattern={"down_proj": "additive"}`` keeps the down-projections,
        where the input form costs most (docs/design.md §6.1), in additive mode.
    modules_to_save: name suffixes of other modules (a task head) that stay trainable and are saved
        in, and restored from, the adapter.
    backend: 'auto', 'torch' or 'triton'; path: 'auto', 'token', 'weight' or 'basis' (``frod_linear``).
    param_dtype: dtype of δ and s (default: each weight's; float32 masters for a bf16 model).
    exact: the layers never take the basis path: bit-identical to the base model at initialisation.
    """

    target_modules: str | Sequence[str]
    sparse_rate: float = 0.01
    seed: int = 0
    reg: float = 1e-3
    mode: str = "additive"
    mode_pattern: dict[str, str] = field(default_factory=dict)
    modules_to_save: Sequence[str] = field(default_factory=tuple)
    backend: str = "auto"
    path: str = "auto"
    param_dtype: torch.dtype | str | None = None
    exact: bool = False

    def __post_init__(self) -> None:
        # Lists, as they come back from an adapter's JSON, so that a reloaded config compares equal.
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, str) or not all(isinstance(n, str) and n for n in self.modules_to_save):
            raise ValueError(f"modules_to_save must be a list of module-name suffixes, got {self.modules_to_save!r}")
        self.modules_to_save = list(self.modules_to_save)
        self.sparse_rate = validate_sparse_rate(self.sparse_rate)
        self.seed, self.reg = validate_seed(self.seed), validate_reg(self.reg)
        check_choice("mode", self.mode, MODES)
        if not isinstance(self.mode_pattern, dict) or not all(isinstance(k, str) and k for k in self.mode_pattern):
            raise ValueError(f"mode_pattern must be a dict of module-name suffixes (or regexes) to modes, got "
                             f"{self.mode_pattern!r}")
        self.mode_pattern = dict(self.mode_pattern)
        for mode in self.mode_pattern.values():
            check_choice("mode_pattern value", mode, MODES)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("path", self.path, PATHS)
        if isinstance(self.param_dtype, str):  # by name, as in an adapter's JSON or transformers' dtype="…"
            self.param_dtype = getattr(torch, self.param_dtype, self.param_dtype)
        if self.param_dtype is not None and not (
            isinstance(self.param_dtype, torch.dtype) and self.param_dtype.is_floating_point
        ):
            raise TypeError(f"param_dtype must be a floating-point torch.dtype, got {self.param_dtype!r}")
        self.exact = bool(self.exact)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The fields besides ``target_modules``: what ``apply_frod`` also takes as keywords."""
        return tuple(f.name for f in fields(cls) if f.name != "target_modules")

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists for sequences, the dtype by name)."""
        out = asdict(self)
        out["param_dtype"] = None if self.param_dtype is None else str(self.param_dtype).removeprefix("torch.")
        return out
