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

Here the diagonal is stored as n more entries of the sparse matrix: M itself (and Mᵀ) is a
``torch.sparse_csr_tensor`` with n + k entries, so M·b is one sparse product written straight into
its output, and the SDDMM samples the diagonal in the same pass as Ω. That structure (``_Structure``:
pointers, columns and where each entry's value comes from) depends only on Ω; it is built once per
pattern tensor and kept beside it (``_structure``), so a call only gathers the n + k values, O(n+k).
The products run through PyTorch's sparse kernels (MKL on CPU, cuSPARSE on CUDA), the SDDMM
through ``torch.sparse.sampled_addmm``. None of them makes an R × k temporary. Inputs are
row-major where it matters for speed: ``b`` and ``at`` contiguous, ``bt`` contiguous (so that
``bt.t()`` is the column-major operand MKL prefers).
"""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

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


class _Structure(NamedTuple):
    """M = diag + S as CSR with the diagonal among its n + k entries, for M and for Mᵀ.

    Entry i of M's CSR holds ``cat(diag, values)[order[i]]`` (``order_t`` for Mᵀ); the diagonal
    and Ω entries of a value array in M's CSR order are at ``diag_at`` and ``values_at``.
    ``samplers``: per dtype, M's CSR with zero values, the SDDMM's sampling pattern (built on first
    use; ``sampled_addmm`` copies it into its result and never writes it).
    """

    version: int
    crow: torch.Tensor
    col: torch.Tensor
    order: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    order_t: torch.Tensor
    diag_at: torch.Tensor
    values_at: torch.Tensor
    samplers: dict[torch.dtype, torch.Tensor]


# Keyed by the identity of the pattern's indices tensor, held by a weak reference (an entry dies with
# the tensor), and checked against its version counter; the CSR/CSC views are functions of the
# indices, so they need no key of their own. A plain dict of id → (weakref, structure): three
# lookups a call, and ``WeakIdKeyDictionary`` spends several Python frames on each.
_STRUCTURES: dict[int, tuple[weakref.ref, _Structure]] = {}


def _keep(indices: torch.Tensor, structure: _Structure) -> None:
    """Remember ``structure`` for ``indices`` until that tensor dies."""
    key = id(indices)

    def forget(ref: weakref.ref) -> None:  # the tensor died; its id may already serve a new entry
        if _STRUCTURES.get(key, (None,))[0] is ref:
            del _STRUCTURES[key]

    _STRUCTURES[key] = (weakref.ref(indices, forget), structure)


def _build_structure(pattern: SparsePattern, version: int) -> _Structure:
    n, k = pattern.n, pattern.k
    rows, cols = pattern.indices
    diagonal = torch.arange(n, device=rows.device)
    r, c = torch.cat([diagonal, rows]), torch.cat([diagonal, cols])
    order, order_t = torch.argsort(r * n + c), torch.argsort(c * n + r)  # row-major over M, over Mᵀ
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n + k, device=order.device)
    # MKL takes 32-bit indices: int64 ones would be converted on every call.
    index = torch.int32 if n + k < 2**31 else torch.int64
    one_more = torch.arange(n + 1, device=rows.device)  # every row and column gains its diagonal entry
    return _Structure(
        version, (pattern.csr_ptr + one_more).to(index), c[order].to(index), order,
        (pattern.csc_ptr + one_more).to(index), r[order_t].to(index), order_t, inverse[:n], inverse[n:], {},
    )


def _structure(pattern: SparsePattern) -> _Structure:
    indices = pattern.indices
    if indices.is_inference():  # no version counter to check a kept structure against
        return _build_structure(pattern, 0)
    entry = _STRUCTURES.get(id(indices))
    found = entry[1] if entry is not None and entry[0]() is indices else None
    if found is None or found.version != indices._version or found.crow.numel() != pattern.n + 1:
        found = _build_structure(pattern, indices._version)
        _keep(indices, found)
    return found


_beta_warning_given = False


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    global _beta_warning_given
    if _beta_warning_given:
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)
    # PyTorch warns once per process that sparse CSR support is in beta: silence that first
    # construction, and spare the later ones the filter (``catch_warnings`` costs ~2 µs a call).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)
    _beta_warning_given = True
    return m


def _sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _SPARSE_DTYPES else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # ``Tensor.to`` costs a dispatcher round trip (~1 µs) even when it returns ``t`` itself, and a
    # layer call makes ten of these casts, almost always to the dtype the tensor already has.
    return t if t.dtype == dtype else t.to(dtype)


def m_matmul(
    b: torch.Tensor,
    diag: torch.Tensor,
    values: torch.Tensor,
    pattern: SparsePattern,
    transpose: bool = False,
) -> torch.Tensor:
    """M·b (or Mᵀ·b) with M = diag(diag) + S; b is (n, R)."""
    if pattern.k == 0:
        return b * diag.unsqueeze(1)
    st = _structure(pattern)
    crow, col, order = (st.crow_t, st.col_t, st.order_t) if transpose else (st.crow, st.col, st.order)
    out_dtype, dtype = b.dtype, _sparse_dtype(b.dtype)
    m = _csr(crow, col, _as(torch.cat([diag, values]), dtype).index_select(0, order), pattern.n)
    b = _as(b, dtype).contiguous()
    # beta = 0: the product is written into the fresh output, never read from it.
    return _as(torch.empty_like(b).addmm_(m, b, beta=0.0), out_dtype)


def sddmm(at: torch.Tensor, bt: torch.Tensor, pattern: SparsePattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal and Ω entries of C = at·btᵀ; at, bt are (n, T)."""
    if pattern.k == 0:
        return torch.linalg.vecdot(at, bt), at.new_zeros(0)
    st = _structure(pattern)
    n, dtype = pattern.n, _sparse_dtype(at.dtype)
    where = st.samplers.get(dtype)
    if where is None:
        where = st.samplers[dtype] = _csr(st.crow, st.col, st.order.new_zeros(n + pattern.k, dtype=dtype), n)
    sampled = torch.sparse.sampled_addmm(
        where, _as(at, dtype).contiguous(), _as(bt, dtype).contiguous().t(), beta=0.0
    ).values()
    # Two gathers, not two views of one: the custom op's outputs may not alias each other.
    return _as(sampled.index_select(0, st.diag_at), at.dtype), _as(sampled.index_select(0, st.values_at), at.dtype)
