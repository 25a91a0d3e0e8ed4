"""The plain dense FRoD layer of docs/design.md §3: the oracle for every correctness check.

    M  = diag(δ) + S,  S[r_j, c_j] = s_j
    W' = W + U · M · Vᵀ            (W is None in factored mode: W' = U · M · Vᵀ, δ then holds λ+δ)
    y  = x · W'ᵀ + b

Dense, unfused, differentiable by autograd in any float dtype. Keep it this short.
"""

from __future__ import annotations

import torch

__all__ = ["error_tolerance", "frod_input_reference", "frod_linear_reference", "relative_error", "rotation_matrix"]


def rotation_matrix(delta: torch.Tensor, sparse_indices: torch.Tensor, sparse_values: torch.Tensor) -> torch.Tensor:
    """Dense M = diag(δ) + S (n × n), differentiable in δ and s."""
    s = torch.zeros(delta.shape[0], delta.shape[0], dtype=delta.dtype, device=delta.device)
    s = s.index_put((sparse_indices[0], sparse_indices[1]), sparse_values.to(delta.dtype))
    return torch.diag(delta) + s


def frod_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    V: torch.Tensor,
    delta: torch.Tensor,
    sparse_indices: torch.Tensor,
    sparse_values: torch.Tensor,
) -> torch.Tensor:
    """y = x · (W + U·M·Vᵀ)ᵀ + b for x of shape (..., n); returns (..., o)."""
    delta_weight = U @ rotation_matrix(delta, sparse_indices, sparse_values) @ V.mT
    w_eff = delta_weight if weight is None else weight + delta_weight
    y = x @ w_eff.mT
    return y if bias is None else y + bias


def frod_input_reference(
    x: torch.Tensor,
    base,
    V: torch.Tensor,
    V_inv: torch.Tensor,
    lam_pinv: torch.Tensor,
    delta: torch.Tensor,
    sparse_indices: torch.Tensor,
    sparse_values: torch.Tensor,
) -> torch.Tensor:
    """The input form (docs/design.md §6.1): base(x + x·V·Mᵀ·diag(λ⁺)·V⁻¹), ``base`` any x ↦ x·Wᵀ + b."""
    transform = V @ rotation_matrix(delta, sparse_indices, sparse_values).mT @ torch.diag(lam_pinv) @ V_inv
    return base(x + x @ transform)


def relative_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max|value − ref| / max|ref|, computed in float64: the error measure of every check against
    this oracle."""
    ref = ref.double()
    return float((value.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def error_tolerance(plain_error: float, dtype: torch.dtype) -> float:
    """The largest relative error a computation in ``dtype`` may have against this oracle in float64:
    2 × ``plain_error`` (this oracle's own error when run in ``dtype``) + eps(dtype), with 16·eps in
    float64, where the oracle *is* the reference, plain_error is 0 and only reordering is left."""
    return 2.0 * plain_error + torch.finfo(dtype).eps * (16.0 if dtype == torch.float64 else 1.0)
