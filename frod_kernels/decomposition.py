"""Joint decomposition of a category of weights into a shared basis (docs/design.md §2).

For L weights W_i of shape (o, n) it finds one invertible V (n × n) and per layer U_i (o × n, unit
columns) and λ_i (n) with W_i = U_i·diag(λ_i)·Vᵀ, exactly up to rounding:

1. C = Σ W_iᵀ W_i = Rᵀ R (Cholesky, float64; the Gram route needs O(n²) memory, not O(L·o·n)).
2. Q_i = W_i R⁻¹ (triangular solve).
3. T = (1/L) Σ (Q_iᵀ Q_i + α I)⁻¹, α = reg.
4. T = E Θ Eᵀ (symmetric eigendecomposition).
5. V = Rᵀ E.
6. B_i = Q_i E, λ_i = column norms of B_i, U_i = B_i diag(λ_i)⁻¹ (a zero column stays zero).

Exactness does not depend on how well T is resolved: B_i Vᵀ = Q_i E Eᵀ R = Q_i R = W_i for any
orthogonal E, so the reconstruction error is that of the triangular solve. A singular Gram sum
(L·o < n, or rank-deficient weights) gets a small diagonal jitter, escalated until R is well
defined (at most to 1e-2 of the mean diagonal, else the stack is refused); Q_i is still solved
from W_i, so W_i = Q_i R stays exact and V stays invertible.

The decomposition is scale-equivariant (c·W_i = U_i·diag(λ_i)·(c·V)ᵀ), so the stack is first
divided by a power of two 2^e near its largest magnitude, exactly, and V is multiplied back at the
end: weights of size 1e±200 neither overflow the Gram matrix nor underflow it, and the reported
errors are those of the well-scaled problem.

``ALGORITHM_VERSION`` names this algorithm: adapters record it, since δ and s mean something
only in the basis that produced them.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ALGORITHM_VERSION", "JointBasis", "check_weights", "condition_number", "joint_decompose", "validate_reg"]

logger = logging.getLogger("frod_kernels")

# A Cholesky factor whose smallest pivot is below this fraction of its largest is treated as
# singular: Q = W R⁻¹ would amplify rounding by 1/ratio.
_PIVOT_RATIO = 1e-7
_JITTER_START = 1e-12
# The largest jitter tried, as a fraction of the Gram matrix's mean diagonal: beyond it the basis
# would describe the jitter more than the weights.
_JITTER_MAX = 1e-2

# Bump when a change to the maths gives a different basis for the same weights.
ALGORITHM_VERSION = 1


@dataclass
class JointBasis:
    """The shared basis of one category: W_i = U[i] · diag(lam[i]) · Vᵀ.

    V: (n, n) shared basis.  U: L tensors (o, n) with unit (or zero) columns.  lam: L tensors (n,).
    errors: relative reconstruction error ‖W_i − U_i diag(λ_i) Vᵀ‖_F / ‖W_i‖_F per layer (float64).
    jitter: the diagonal added to the Gram sum, as a fraction of its mean diagonal (0.0 unless it
        was singular).
    V_inv: V⁻¹ (n, n), formed in float64 as Eᵀ·R⁻ᵀ when asked for (the input form, docs/design.md §6.1).
    """

    V: torch.Tensor
    U: list[torch.Tensor]
    lam: list[torch.Tensor]
    errors: list[float]
    jitter: float = 0.0
    V_inv: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.U)


def validate_reg(reg: float) -> float:
    """Return ``reg`` (α of step 3) as a float if it is a positive finite number, else raise."""
    if isinstance(reg, bool) or not isinstance(reg, numbers.Real):
        raise TypeError(f"reg must be a number, got {type(reg).__name__}")
    if not 0.0 < float(reg) < float("inf"):
        raise ValueError(f"reg must be a positive finite number, got {reg!r}")
    return float(reg)


def check_weights(weights: Sequence[torch.Tensor]) -> float:
    """max |W_i| over a category's weights; raise unless all are finite 2-D float tensors of one shape and device.

    One pass over each weight, in its own dtype: ``torch.aminmax`` is exact there and propagates NaN,
    so a weight is finite iff its min and max are, and max(−min, max) is its largest magnitude.
    """
    if len(weights) == 0:
        raise ValueError("joint_decompose needs at least one weight")
    o, n = weights[0].shape if weights[0].dim() == 2 else (None, None)
    peak = 0.0
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"weight {i} must be a 2-D tensor (out_features, in_features)")
        if tuple(w.shape) != (o, n):
            raise ValueError(f"weight {i} has shape {tuple(w.shape)}, expected {(o, n)} like weight 0")
        if w.numel() == 0:
            raise ValueError(f"weight {i} has shape {tuple(w.shape)}: FRoD needs at least one input and one output")
        if w.device != weights[0].device:
            raise ValueError(f"weight {i} is on {w.device}, weight 0 on {weights[0].device}")
        if not w.is_floating_point():
            raise ValueError(f"weight {i} must be a floating-point tensor, got {w.dtype}")
        low, high = torch.stack(torch.aminmax(w.detach())).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"weight {i} has non-finite entries (NaN or Inf); cannot decompose")
        peak = max(peak, -low, high)
    return peak


def _cholesky_upper(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(R, j): upper R with gram + j·mean(diag(gram))·I = Rᵀ R, j escalated from 0 until R is sound."""
    n = gram.shape[0]
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    jitter = 0.0
    while jitter <= _JITTER_MAX * scale:
        low, info = torch.linalg.cholesky_ex(gram + jitter * eye if jitter else gram)
        if int(info) == 0:
            pivots = low.diagonal()
            if float(pivots.min()) > _PIVOT_RATIO * float(pivots.max()):
                return low.mT, jitter / scale
        jitter = _JITTER_START * scale if jitter == 0.0 else jitter * 100.0
    raise ValueError(
        f"cannot decompose: the Gram matrix of the weights stays singular with a diagonal jitter of "
        f"{_JITTER_MAX:g} x its mean diagonal (columns of wildly different scale?)"
    )


def _times_power_of_two_(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """t·2^exponent in place, exact: two factors, so that neither 2^±e/2 over- nor underflows (|e| ≤ 1074)."""
    half = exponent // 2
    return t.mul_(2.0**half).mul_(2.0 ** (exponent - half))


def _mean_regularised_inverse(qs: list[torch.Tensor], reg: float) -> torch.Tensor:
    """T = (1/L) Σ (Q_iᵀ Q_i + α I)⁻¹ via Cholesky; Woodbury when o < n (cost O(o²n) per layer)."""
    o, n = qs[0].shape
    eye_n = torch.eye(n, dtype=qs[0].dtype, device=qs[0].device)
    acc = torch.zeros(n, n, dtype=qs[0].dtype, device=qs[0].device)
    if o >= n:
        for q in qs:
            acc += torch.cholesky_inverse(torch.linalg.cholesky(q.mT @ q + reg * eye_n))
        return acc / len(qs)
    # (αI + QᵀQ)⁻¹ = (I − Qᵀ (αI + QQᵀ)⁻¹ Q) / α
    eye_o = torch.eye(o, dtype=qs[0].dtype, device=qs[0].device)
    for q in qs:
        chol = torch.linalg.cholesky(q @ q.mT + reg * eye_o)
        acc += q.mT @ torch.cholesky_solve(q, chol)
    return (eye_n - acc / len(qs)) / reg


def condition_number(V: torch.Tensor, V_inv: torch.Tensor, steps: int = 30) -> float:
    """cond₂(V) = ‖V‖₂·‖V⁻¹‖₂, each norm by ``steps`` power iterations on AᵀA from a fixed start
    (float64; O(steps·n²), where an SVD would be O(n³)): a lower bound that converges from below."""
    def norm2(a: torch.Tensor) -> float:
        a = a.to(torch.float64)
        v = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
        for _ in range(steps):
            v = a.mT @ (a @ v)
            v = v / torch.linalg.vector_norm(v).clamp_min(1e-300)
        return float(torch.linalg.vector_norm(a @ v))

    return norm2(V) * norm2(V_inv)


def joint_decompose(
    weights: Sequence[torch.Tensor],
    reg: float = 1e-3,
    dtype: torch.dtype | None = None,
    name: str = "",
    inverse: bool = False,
) -> JointBasis:
    """Decompose L weights (o, n) into W_i = U_i·diag(λ_i)·Vᵀ with one shared V (docs/design.md §2).

    Args:
        weights: the category's frozen weights, all (o, n), same device.
        reg: α > 0, the regulariser of step 3.
        dtype: storage dtype of U, V, λ (default: the weights' dtype); the maths runs in float64.
        name: category name, for the log line.
        inverse: also return V⁻¹ (``JointBasis.V_inv``), from the float64 factors: V = Rᵀ·E with E
            orthogonal, so V⁻¹ = Eᵀ·R⁻ᵀ = (R⁻¹·E)ᵀ, one triangular solve (no general inverse).

    Returns:
        a ``JointBasis`` with the per-layer relative reconstruction errors (float64 maths).
    """
    reg = validate_reg(reg)
    peak = check_weights(weights)
    started = time.perf_counter()
    dtype = dtype or weights[0].dtype
    # Power-of-two scaling is exact: 2^e·(W/2^e) = W bit for bit (see the module docstring).
    exponent = math.frexp(peak)[1]
    ws = [_times_power_of_two_(w.detach().to(torch.float64, copy=True), -exponent) for w in weights]

    # The Gram sum and T's sum accumulate in place, layer after layer in order: the rounding of
    # ALGORITHM_VERSION 1. One GEMM over the stacked weights would sum in another order (other bits).
    gram = torch.zeros(ws[0].shape[1], ws[0].shape[1], dtype=torch.float64, device=ws[0].device)
    for w in ws:
        gram += w.mT @ w
    r, jitter = _cholesky_upper(gram)
    qs = [torch.linalg.solve_triangular(r, w, upper=True, left=False) for w in ws]
    if len(ws) == 1:
        e = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)  # T ∝ I: E = I, V = Rᵀ, U = Q
    else:
        e = torch.linalg.eigh(_mean_regularised_inverse(qs, reg)).eigenvectors
    v = r.mT @ e

    us, lams, errors, finite = [], [], [], True
    for w, q in zip(ws, qs, strict=True):
        b = q @ e
        lam = torch.linalg.vector_norm(b, dim=0)
        u = b / torch.where(lam > 0, lam, torch.ones_like(lam))
        errors.append(float(torch.linalg.norm(w - (u * lam) @ v.mT) / torch.linalg.norm(w).clamp_min(1e-300)))
        # U_i is finite iff λ_i is: a NaN or Inf in column j of B_i makes λ_i[j] = ‖B_i[:, j]‖ NaN or
        # Inf, and a finite λ_i[j] bounds |U_i[:, j]| by 1. So n numbers are checked, not o·n.
        finite = finite and bool(torch.isfinite(lam).all())
        us.append(u.to(dtype))
        lams.append(lam.to(dtype))
    stored = _times_power_of_two_(v, exponent).to(dtype)
    if not (finite and bool(torch.isfinite(stored).all())):
        raise ValueError(f"cannot decompose: the shared basis V overflows {dtype} (weights too large for it)")
    v_inv = None
    if inverse:  # V was scaled by 2^e, so V⁻¹ by 2^-e (exact)
        v_inv = _times_power_of_two_(torch.linalg.solve_triangular(r, e, upper=True).mT, -exponent).to(dtype)
        if not bool(torch.isfinite(v_inv).all()):
            raise ValueError(f"cannot decompose: V⁻¹ overflows {dtype} (weights too small for it)")
    elapsed = time.perf_counter() - started
    logger.info(
        "joint_decompose %s: %d x (%d, %d) in %.2fs, max rel. error %.2e%s",
        name or "<category>", len(ws), *ws[0].shape, elapsed, max(errors),
        f", jitter {jitter:.1e}" if jitter else "",
    )
    return JointBasis(V=stored, U=us, lam=lams, errors=errors, jitter=jitter, V_inv=v_inv)
