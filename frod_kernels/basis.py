"""``FRoDBasis``: what a category of FRoD layers shares, V (n, n) and the sparse pattern Ω (docs/design.md §2, §3).

One module object serves every layer of its category, so ``model.to()``, ``named_buffers()`` and DDP
see V once, not once per layer. V and Ω are non-persistent buffers: V is recomputed from the base
weights (bit-identically on the same machine) and Ω from the seed, so neither ``state_dict()`` nor
an adapter file carries them.
"""

from __future__ import annotations

import torch
from torch import nn

from .decomposition import ALGORITHM_VERSION
from .fingerprint import dtype_name
from .pattern import SparsePattern

__all__ = ["FRoDBasis"]


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


class FRoDBasis(nn.Module):
    """What a category shares: V (n, n, kept column-major for the SDDMM) and the pattern Ω."""

    def __init__(
        self, V: torch.Tensor, sparse_indices: torch.Tensor, sparse_rate: float, seed: int, reg: float,
        name: str = "", *, base_seed: int | None = None, source: str = "given", fingerprint: str | None = None,
        max_error: float = 0.0, jitter: float = 0.0, fingerprint_dtype: torch.dtype | None = None,
        V_inv: torch.Tensor | None = None,
    ) -> None:
        """Args beyond V and Ω record where the basis came from, for adapters and summaries:

        seed: the pattern's own seed; base_seed: the seed given to ``apply_frod`` it was derived
        from (None for a layer built on its own); reg: α of the decomposition; source:
        ``"joint_decompose"`` when V is a function of the category's base weights (rebuilt on
        load), ``"given"`` when the caller supplied it; fingerprint: of the base weights V was
        computed from (``fingerprint.weight_fingerprint``) and fingerprint_dtype, their dtype then
        (default: V's), kept in ``fingerprints``; max_error, jitter: the decomposition's; V_inv: V⁻¹
        (row-major), which the input form needs (``FRoDInputLinear``), None otherwise.
        """
        super().__init__()
        n = V.shape[0]
        pattern = SparsePattern.from_indices(sparse_indices.to(V.device), n)
        self.register_buffer("V", V.detach().t().contiguous().t(), persistent=False)
        self.register_buffer("V_inv", None if V_inv is None else V_inv.detach().to(V).contiguous(), persistent=False)
        for field, tensor in zip(SparsePattern._fields, pattern, strict=True):
            self.register_buffer(field, tensor, persistent=False)
        self.sparse_rate, self.seed, self.reg, self.name = sparse_rate, seed, reg, name
        self.base_seed, self.source, self.fingerprint = base_seed, source, fingerprint
        self.algorithm = ALGORITHM_VERSION if source == "joint_decompose" else None
        self.max_error, self.jitter = max_error, jitter
        # The coarsest dtype V has held since it was computed: its values carry no more precision after a
        # cast back, and an adapter's record of V is kept in it (``decomposition.basis_record``).
        self.precision = V.dtype
        # Ω on the host, outside the module's tensors: the device buffers are rebuilt from it after
        # every conversion, so no conversion (``to_empty`` above all) can leave the sparse kernels
        # an uninitialised pattern to read.
        self._host_indices = pattern.indices.detach().cpu().clone()
        # {dtype name: fingerprint} of the base the basis was computed from; more dtypes may be added
        # (a factored layer keeps no W, so its category records the casts a user may load when built).
        dtype = V.dtype if fingerprint_dtype is None else fingerprint_dtype
        self.fingerprints: dict[str, str] = {} if fingerprint is None else {dtype_name(dtype): fingerprint}

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.V.is_floating_point():
            self.precision = _coarser(self.precision, self.V.dtype)
        pattern = SparsePattern.from_indices(self._host_indices, self.n)
        for field, tensor in zip(SparsePattern._fields, pattern, strict=True):
            setattr(self, field, tensor.to(self.V.device))
        return self

    def set_V(self, V: torch.Tensor) -> None:
        """Install a recomputed V (same shape), column-major like the original."""
        self.V = V.detach().to(device=self.V.device, dtype=self.V.dtype).t().contiguous().t()
        self.precision = _coarser(V.dtype, self.V.dtype)

    @property
    def pattern(self) -> SparsePattern:
        return SparsePattern(self.indices, self.csr_ptr, self.csc_ptr, self.csc_perm)

    @property
    def n(self) -> int:
        return self.V.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n={self.n}, k={self.k}, sparse_rate={self.sparse_rate}, seed={self.seed}"
