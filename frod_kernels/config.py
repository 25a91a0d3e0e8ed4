"""``FRoDConfig``: everything ``apply_frod`` needs, as one object (PEFT's ``LoraConfig`` habit).

``apply_frod(model, config)`` applies it and appends it to ``model.frod_configs`` (one entry per
call: calls compose). The adapter file does not depend on it: each category records its own
inputs (see ``adapter``), so an adapter loads into a bare base model without the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

__all__ = ["FRoDConfig"]


@dataclass
class FRoDConfig:
    """What to adapt and how.

    target_modules: a regex (full match on the module name) or a list of name suffixes.
    sparse_rate: ρ, the share of off-diagonal entries of M that train (k = ⌊ρ·n²⌋ per layer).
    seed: base seed of the sparse patterns (one pattern per category, derived from it).
    reg: α of the joint decomposition. mode: 'additive' (keep W) or 'factored' (drop W).
    modules_to_save: name suffixes of other modules (a task head) that stay trainable and are
        saved in, and restored from, the adapter.
    """

    target_modules: str | Sequence[str]
    sparse_rate: float = 0.01
    seed: int = 0
    reg: float = 1e-3
    mode: str = "additive"
    modules_to_save: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Lists, as they come back from an adapter's JSON, so that a reloaded config compares equal.
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        if not isinstance(self.modules_to_save, str):  # a string is refused by apply_frod, by name
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists for sequences)."""
        return asdict(self)
