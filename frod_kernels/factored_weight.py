"""``FactoredWeight``: the ``weight`` of an unmerged factored ``FRoDLinear``, which stores none (docs/design.md §6).

Factored mode keeps U·diag(λ+δ)·Vᵀ in place of W, so there are no (o, n) values to hand out. Code
written for ``nn.Linear`` still reads ``weight.shape``, ``dtype`` and ``device``; this stand-in
answers those and refuses every use as a tensor.
"""

from __future__ import annotations

import torch

__all__ = ["FactoredWeight"]


class FactoredWeight:
    """Stands in for ``weight`` of an unmerged factored layer: metadata of the (o, n) weight, no data.

    ``shape``, ``size()``, ``dim()``, ``dtype``, ``device`` and ``requires_grad`` answer as the base
    weight would; passing it to a torch function raises a TypeError (there are no values to read:
    use ``FRoDLinear.effective_weight()``, or ``merge()`` to materialise W').
    """

    requires_grad = False
    ndim = 2

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def __getattr__(self, name: str):
        # Tensor attributes (``.T``, ``.data``, ``.float()``, …) would need values: the same
        # TypeError as a torch function. Anything else is a plain missing attribute, so that
        # ``getattr(w, "quant_state", None)`` and ``hasattr`` keep working.
        if not name.startswith("__") and hasattr(torch.Tensor, name):
            raise TypeError(
                f"FactoredWeight.{name}: a factored FRoDLinear stores no weight tensor; use "
                f"effective_weight() for W' or merge() to materialise it"
            )
        raise AttributeError(f"'FactoredWeight' object has no attribute {name!r}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(
            f"{getattr(func, '__name__', func)}: a factored FRoDLinear stores no weight tensor; use "
            f"effective_weight() for W' or merge() to materialise it"
        )

    def __repr__(self) -> str:
        return f"FactoredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"
