"""PyTorch implementations of the FRoD primitives (any device, any float dtype).

Every FRoD layer computation (docs/design.md §5) is written with three primitives; each backend module
(this one, ``triton_backend``) implements all three with the same signature and semantics:

``dual_matmul(a1, b1, a2, b2, bias)``  → a1·b1ᵀ (+ a2·b2ᵀ) (+ bias), shape (R, C)
    a1 (R, K1), b1 (C, K1), a2 (R, K2), b2 (C, K2), bias (C,); any strides.

``m_matmul(b, diag, values, pattern, transpose)`` → M·b, or Mᵀ·b if ``transpose``; shape (n, R)
    with M = diag(diag) + S, S[r_j, c_j] = values[j]; b (n, R), any strides. Cost O(R·(n+k)).
    Row r of M·b is diag[r]·b[r] + Σ_{j in row r} values[j]·b[c_j]  (CSR view);
    row c of Mᵀ·b is diag[c]·b[c] + Σ_{j in col c} values[j]·b[r_j] (CSC view).

``sddmm(at, bt, pattern)`` → (C[i, i] for i < n, C[r_j, c_j] for j < k) with C = at·btᵀ;
    at, bt (n, T). The sampled dense-dense product that gives dδ and ds; cost O(T·(n+k)).

Here S is a ``torch.sparse_csr_tensor`` over the pattern's prebuilt CSR/CSC arrays (only the
values are gathered per call, O(k)), the sparse products run through PyTorch's sparse kernels
(MKL on CPU, cuSPARSE on CUDA), and the SDDMM through ``torch.sparse.sampled_addmm``. None of
them makes an R × k temporary. Inputs are row-major where it matters for speed: ``b`` and ``at``
contiguous, ``bt`` contiguous (so that ``bt.t()`` is the column-major operand MKL prefers).
"""

from __future__ import annotations

import warnings

import torch

from ..pattern import SparsePattern

__all__ = ["dual_matmul", "m_matmul", "sddmm"]

# PyTorch's sparse kernels cover these dtypes on every device; half types go through float32
# (the products are O(R·(n+k)), so the casts are cheap next to the GEMMs).
_SPARSE_DTYPES = (torch.float32, torch.float64)


def dual_matmul(
    a1: torch.Tensor,
    b1: torch.Tensor,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a1·b1ᵀ + a2·b2ᵀ + bias, accumulated into one output."""
    out = torch.mm(a1, b1.t()) if bias is None else torch.addmm(bias, a1, b1.t())
    if a2 is not None:
        out.addmm_(a2, b2.t())
    return out


def _sparse_m(values: torch.Tensor, pattern: SparsePattern, transpose: bool) -> torch.Tensor:
    """S (or Sᵀ) as a CSR tensor on the prebuilt structure; only the values are gathered."""
    n = pattern.n
    if transpose:
        crow, col = pattern.csc_ptr, pattern.indices[0][pattern.csc_perm]
        values = values[pattern.csc_perm]
    else:
        crow, col = pattern.csr_ptr, pattern.indices[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


def m_matmul(
    b: torch.Tensor,
    diag: torch.Tensor,
    values: torch.Tensor,
    pattern: SparsePattern,
    transpose: bool = False,
) -> torch.Tensor:
    """M·b (or Mᵀ·b) with M = diag(diag) + S; b is (n, R)."""
    out = b * diag.unsqueeze(1)
    if pattern.k == 0:
        return out
    if b.dtype in _SPARSE_DTYPES:
        return out.add_(torch.sparse.mm(_sparse_m(values, pattern, transpose), b.contiguous()))
    s = _sparse_m(values.float(), pattern, transpose)
    return out.add_(torch.sparse.mm(s, b.float()).to(b.dtype))


def sddmm(at: torch.Tensor, bt: torch.Tensor, pattern: SparsePattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal and Ω entries of C = at·btᵀ; at, bt are (n, T)."""
    diag = torch.linalg.vecdot(at, bt)  # row-wise dots; einsum's bmm is 4x slower from T = 512 on CPU
    if pattern.k == 0:
        return diag, at.new_zeros(0)
    dtype = at.dtype
    if dtype not in _SPARSE_DTYPES:
        at, bt = at.float(), bt.float()
    shape = torch.zeros(pattern.k, dtype=at.dtype, device=at.device)
    sampled = torch.sparse.sampled_addmm(
        _sparse_m(shape, pattern, transpose=False), at.contiguous(), bt.contiguous().t(), beta=0.0
    )
    return diag, sampled.values().to(dtype)
