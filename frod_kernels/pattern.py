"""The sparse rotation pattern Ω of docs/design.md §3 and its CSR/CSC views.

Ω = {(r_j, c_j)}, j = 1…k, is a set of off-diagonal positions of an n × n matrix, drawn uniformly
without replacement, k = floor(ρ·n²) capped at n(n−1), stored sorted row-major as an int64
(2, k) tensor. The pattern is drawn on the CPU from a seeded ``torch.Generator`` so that the
same (n, ρ, seed) gives the same pattern on any machine, and it is drawn without an n × n
temporary: k linear indices are sampled among the n(n−1) off-diagonal slots.

Because the entries are sorted row-major, ``indices[1]`` is already the CSR column array and
the value order is the CSR order; the CSC view needs a permutation. Both views are built once
per category (``SparsePattern.from_indices``) and reused by every call.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "SparsePattern", "check_pattern", "num_sparse_entries", "sample_sparse_pattern", "validate_seed",
    "validate_sparse_rate",
]

# Below this many off-diagonal slots a full random permutation is cheaper than rejection.
_PERMUTATION_LIMIT = 1 << 22


def validate_sparse_rate(sparse_rate: float) -> float:
    """Return ``sparse_rate`` as a float if it lies in (0, 1) or is exactly 0, else raise."""
    if isinstance(sparse_rate, bool) or not isinstance(sparse_rate, numbers.Real):
        raise TypeError(f"sparse_rate must be a number, got {type(sparse_rate).__name__}")
    # A numpy float32 is read as the decimal it prints as (np.float32(0.01) is 0.01, not 0.0099999998).
    rate = float(str(sparse_rate)) if isinstance(sparse_rate, np.floating) else float(sparse_rate)
    if not (rate == 0.0 or 0.0 < rate < 1.0):
        raise ValueError(f"sparse_rate must be in (0, 1) or exactly 0, got {sparse_rate!r}")
    return rate


def validate_seed(seed: int) -> int:
    """Return ``seed`` as an int if it is an integer (``int``, ``np.int64``, …) in [0, 2**63), the
    range a torch.Generator takes, else raise."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def num_sparse_entries(n: int, sparse_rate: float) -> int:
    """k = floor(ρ·n²) capped at n(n−1); ρ is read as the decimal it prints as (0.29 is 29/100)."""
    rate = validate_sparse_rate(sparse_rate)
    return min(math.floor(Fraction(repr(rate)) * n * n), n * (n - 1))


def _sample_without_replacement(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct integers drawn uniformly from [0, m), sorted, using O(k) memory when k ≪ m."""
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if m <= _PERMUTATION_LIMIT:
        return torch.randperm(m, generator=gen)[:k].sort().values
    if 2 * k > m:
        # Dense regime: draw the complement and take what is left (the output is ~m anyway).
        excluded = _sample_without_replacement(m, m - k, gen)
        keep = torch.ones(m, dtype=torch.bool)
        keep[excluded] = False
        return keep.nonzero().squeeze(1)
    # Draw with replacement until k distinct values are seen, then keep a uniformly random
    # k-subset of them: by exchangeability every k-subset of [0, m) is equally likely.
    seen = torch.empty(0, dtype=torch.int64)
    while seen.numel() < k:
        missing = k - seen.numel()
        draw = torch.randint(0, m, (missing + missing // 8 + 16,), generator=gen)
        seen = torch.unique(torch.cat([seen, draw]))
    chosen = torch.randperm(seen.numel(), generator=gen)[:k]
    return seen[chosen].sort().values


def sample_sparse_pattern(n: int, sparse_rate: float, seed: int = 0) -> torch.Tensor:
    """Draw Ω for an n × n matrix: an int64 tensor (2, k) of off-diagonal (row, col), row-major.

    Args:
        n: size of M (the layer's in_features).
        sparse_rate: ρ in (0, 1), or exactly 0 for no sparse part (k = 0).
        seed: seed of the CPU generator; same (n, ρ, seed) gives the same pattern everywhere.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    k = num_sparse_entries(n, sparse_rate)
    gen = torch.Generator(device="cpu").manual_seed(validate_seed(seed))
    linear = _sample_without_replacement(n * (n - 1), k, gen)
    # Slot ℓ of row r skips the diagonal: c' = ℓ mod (n−1), c = c' + (c' ≥ r). The map is
    # monotone, so sorted slots give row-major sorted (row, col).
    rows = torch.div(linear, max(n - 1, 1), rounding_mode="floor")
    cols = linear - rows * (n - 1)
    cols = cols + (cols >= rows).to(torch.int64)
    return torch.stack([rows, cols])


class SparsePattern(NamedTuple):
    """Ω with the CSR and CSC views the kernels use; all int64, on the layer's device.

    indices: (2, k) row-major sorted (row, col); ``indices[1]`` is the CSR column array.
    csr_ptr: (n+1,) row pointers: entries of row r are j ∈ [csr_ptr[r], csr_ptr[r+1]).
    csc_ptr: (n+1,) column pointers into ``csc_perm``.
    csc_perm: (k,) entry numbers sorted by (col, row): column c holds entries
        csc_perm[csc_ptr[c]:csc_ptr[c+1]].
    """

    indices: torch.Tensor
    csr_ptr: torch.Tensor
    csc_ptr: torch.Tensor
    csc_perm: torch.Tensor

    @property
    def n(self) -> int:
        return self.csr_ptr.numel() - 1

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @staticmethod
    def from_indices(indices: torch.Tensor, n: int) -> SparsePattern:
        """Build the CSR/CSC views of a checked (2, k) pattern (see ``check_pattern``)."""
        check_pattern(indices, n)
        rows, cols = indices[0], indices[1]
        csr_ptr = _pointers(rows, n)
        csc_ptr = _pointers(cols, n)
        # Stable sort by column keeps rows ascending inside each column.
        csc_perm = torch.sort(cols, stable=True).indices
        return SparsePattern(indices, csr_ptr, csc_ptr, csc_perm)


def _pointers(keys: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(keys, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def check_pattern(indices: torch.Tensor, n: int) -> None:
    """Raise ValueError unless ``indices`` is a valid Ω for an n × n matrix."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"sparse_indices must be a tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise ValueError(f"sparse_indices must be int64, got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise ValueError(f"sparse_indices must have shape (2, k), got {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    rows, cols = indices[0], indices[1]
    if int(indices.min()) < 0 or int(indices.max()) >= n:
        raise ValueError(
            f"sparse_indices out of range for an {n} x {n} matrix (min {int(indices.min())}, max {int(indices.max())})"
        )
    if bool((rows == cols).any()):
        j = int((rows == cols).nonzero()[0])
        raise ValueError(
            f"sparse_indices must be off-diagonal (the diagonal is delta's): entry {j} is "
            f"({int(rows[j])}, {int(cols[j])})"
        )
    linear = rows * n + cols
    step = linear[1:] - linear[:-1]
    if bool((step == 0).any()):
        j = int((step == 0).nonzero()[0])
        raise ValueError(
            f"sparse_indices must be sorted row-major without duplicates: ({int(rows[j])}, {int(cols[j])}) "
            f"is duplicated"
        )
    if bool((step < 0).any()):
        raise ValueError("sparse_indices must be sorted row-major without duplicates: they are out of order")
