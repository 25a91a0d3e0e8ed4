"""Joint decomposition of a category of weights into a shared basis (docs/design.md §2).

For L weights W_i of shape (o, n) it finds one invertible V (n × n) and per layer U_i (o × n, unit
columns) and λ_i (n) with W_i = U_i·diag(λ_i)·Vᵀ, exactly up to rounding:

1. C = Σ W_iᵀ W_i = Rᵀ R (Cholesky, float64).
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

Cost (docs/design.md §2, "Cost"): the weights are stacked into one (L·o × n) float64 matrix, so
that steps 1 and 2 are one large product each (step 6 runs a layer at a time, in cache; inside
``shared_stack()``, as in ``apply_frod`` and ``load_frod``, successive calls reuse that matrix's memory); the
symmetric products (C, G_i = W_iᵀW_i, Q_iᵀQ_i, the Woodbury term) compute their upper block
triangle only (``_gram``: 5/8 of a GEMM).
When o ≥ n and C is well conditioned (cond(C) ≤ 1e6), steps 2, 3 and 6 never form Q_i (the Gram
form): Q_iᵀQ_i + αI = R⁻ᵀ(G_i + αC)R⁻¹, so T = R·[(1/L) Σ (G_i + αC)⁻¹]·Rᵀ, and
B_i = W_i·(R⁻¹E). Same maths; its rounding grows with cond(C), hence the bound. The per-layer
reconstruction error ‖W_i − U_i diag(λ_i) Vᵀ‖_F / ‖W_i‖_F is estimated on a fixed probe P (n × 16,
standard normal) as ‖(W_i − U_i diag(λ_i) Vᵀ)·P‖_F / ‖W_i·P‖_F: E‖A·P‖_F² = 16·‖A‖_F², so this
is the Frobenius ratio to within a small factor, for o·n·16 multiply-adds instead of o·n².

``ALGORITHM_VERSION`` names this algorithm, the maths, not the bits: adapters record it, since δ and
s mean something only in the basis that produced them. E is not a function of the weights alone:
each eigenvector's sign is arbitrary, and eigenvectors of nearly equal eigenvalues may come out
rotated into each other, so rounding (thread counts, BLAS builds, the same base in bfloat16) can
give another, equally exact basis in which δ and s mean something else. An adapter therefore
records V at 64 rows (``basis_record``), and a load decomposes with ``align_to``: E's columns are
given the record's signs and, where that is not enough, rotated by the orthogonal matrix nearest
a banded least-squares fit of the record (docs/design.md §2, "Versioning").
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import logging
import math
import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ALGORITHM_VERSION", "JointBasis", "basis_drift", "basis_record", "check_weights", "condition_number",
    "drift_tolerance", "joint_decompose", "record_rows", "shared_stack", "validate_reg",
]

logger = logging.getLogger("frod_kernels")

# A Cholesky factor whose smallest pivot is below this fraction of its largest is treated as
# singular: Q = W R⁻¹ would amplify rounding by 1/ratio.
_PIVOT_RATIO = 1e-7
_JITTER_START = 1e-12
# The largest jitter tried, as a fraction of the Gram matrix's mean diagonal: beyond it the basis
# would describe the jitter more than the weights.
_JITTER_MAX = 1e-2
# The Gram form of T rounds to about ε·cond(C) relative (the Q form to about ε): above this condition
# number of the Gram sum (10⁶: a deviation ~1e-9, far below a float32 ulp) the Q form is used.
_GRAM_FORM_MAX_CONDITION = 1e6

# Bump when a change to the maths gives a different basis for the same weights.
ALGORITHM_VERSION = 1


@dataclass
class JointBasis:
    """The shared basis of one category: W_i = U[i] · diag(lam[i]) · Vᵀ.

    V: (n, n) shared basis.  U: L tensors (o, n) with unit (or zero) columns, column-major.  lam: L tensors (n,).
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


class _StackBuffer:
    """One float64 buffer per device that successive stacks are views of: grown (the old one dropped first)
    when a stack needs more, never shrunk, freed with the object."""

    def __init__(self) -> None:
        self._flat: dict[torch.device, torch.Tensor] = {}

    def take(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        flat = self._flat.get(device)
        if flat is None or flat.numel() < rows * cols:
            self._flat.pop(device, None)
            with torch.inference_mode(False):  # a normal tensor, whatever mode the call that grows it runs in
                flat = self._flat[device] = torch.empty(rows * cols, dtype=torch.float64, device=device)
        return flat[: rows * cols].view(rows, cols)


_SHARED_STACK: contextvars.ContextVar[_StackBuffer | None] = contextvars.ContextVar("frod_shared_stack", default=None)


@contextlib.contextmanager
def shared_stack() -> Iterator[None]:
    """Let the ``joint_decompose`` calls inside share one float64 stack buffer (the largest they need), freed at exit.

    Each call otherwise allocates its (L·o × n) stack afresh. Above glibc's mmap threshold (32 MB at most)
    that is new memory from the kernel every time, and its first touch costs a page fault per 4 KB: on
    SmolLM2-135M, 850 MB of stacks over 7 categories. No result of ``joint_decompose`` is a view of its
    stack, so a later call may overwrite it. Per thread (a context variable)."""
    token = _SHARED_STACK.set(_StackBuffer())
    try:
        yield
    finally:
        _SHARED_STACK.reset(token)


def _new_stack(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """An uninitialised (rows × cols) float64 matrix: a view of the ``shared_stack`` buffer inside one."""
    shared = _SHARED_STACK.get()
    if shared is None:
        return torch.empty(rows, cols, dtype=torch.float64, device=device)
    return shared.take(rows, cols, device)


def _cholesky_upper(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(R, j): upper R with gram + j·mean(diag(gram))·I = Rᵀ R, j escalated from 0 until R is sound.

    The jitter is added to ``gram`` in place once R is found, so that gram = Rᵀ R afterwards."""
    n = gram.shape[0]
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    jitter = 0.0
    while jitter <= _JITTER_MAX * scale:
        low, info = torch.linalg.cholesky_ex(gram + jitter * eye if jitter else gram)
        if int(info) == 0:
            pivots = low.diagonal()
            if float(pivots.min()) > _PIVOT_RATIO * float(pivots.max()):
                gram.diagonal().add_(jitter)
                return low.mT, jitter / scale
        jitter = _JITTER_START * scale if jitter == 0.0 else jitter * 100.0
    raise ValueError(
        f"cannot decompose: the Gram matrix of the weights stays singular with a diagonal jitter of "
        f"{_JITTER_MAX:g} x its mean diagonal (columns of wildly different scale?)"
    )


def _times_power_of_two_(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """t·2^exponent in place, exact: one factor where 2^exponent is a normal float64 (|e| ≤ 1022), else
    two, so that neither 2^±e/2 over- nor underflows (|e| ≤ 1074)."""
    if abs(exponent) <= 1022:
        return t.mul_(2.0**exponent)
    half = exponent // 2
    return t.mul_(2.0**half).mul_(2.0 ** (exponent - half))


def _add_gram_upper_(acc: torch.Tensor, a: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """acc += aᵀ·a (a: m × n, acc: n × n) on and above the block diagonal only, in place.

    The Gram matrix is symmetric, so the column blocks j ≥ i of block row i determine it: ``blocks``
    GEMMs of (n/b × m)·(m × n − i·n/b) do (b + 1)/(2b) of a full product's multiply-adds (0.625 at
    b = 4). ``_mirror_upper`` completes it."""
    n = a.shape[1]
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            acc[lo:hi, lo:].addmm_(a[:, lo:hi].mT, a[:, lo:])
    return acc


def _mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is acc's (a new tensor)."""
    return acc.triu().add_(acc.triu(1).mT)


def _gram(a: torch.Tensor) -> torch.Tensor:
    """aᵀ·a (n × n, symmetric) of a (m × n) with about 5/8 of a GEMM's multiply-adds."""
    return _mirror_upper(_add_gram_upper_(a.new_zeros(a.shape[1], a.shape[1]), a))


def _mean_regularised_inverse_of_grams(grams: Sequence[torch.Tensor], c: torch.Tensor, r: torch.Tensor,
                                       reg: float) -> torch.Tensor:
    """T = (1/L) Σ (Q_iᵀ Q_i + α I)⁻¹ from the Gram matrices G_i = W_iᵀ W_i, without forming Q_i = W_i R⁻¹.

    Q_iᵀ Q_i + α I = R⁻ᵀ (G_i + α C) R⁻¹ with C = Rᵀ R, so T = R · [(1/L) Σ (G_i + α C)⁻¹] · Rᵀ: one
    Cholesky inverse of an n × n matrix per layer, as the Q form, but no o × n solve or product. Its
    rounding grows with cond(C) (the Q form's does not): ``joint_decompose`` uses it only for a
    well-conditioned C. The G_i are overwritten."""
    acc = torch.zeros_like(c)
    for g in grams:
        acc += torch.cholesky_inverse(torch.linalg.cholesky(g.add_(c, alpha=reg)))
    return r @ acc.div_(len(grams)) @ r.mT


def _mean_regularised_inverse(qs: Sequence[torch.Tensor], reg: float) -> torch.Tensor:
    """T = (1/L) Σ (Q_iᵀ Q_i + α I)⁻¹ via Cholesky; Woodbury when o < n (cost O(o²n) per layer).

    Woodbury: (αI + QᵀQ)⁻¹ = (I − Qᵀ(αI + QQᵀ)⁻¹Q)/α, and with αI + QQᵀ = K·Kᵀ (Cholesky),
    Qᵀ(αI + QQᵀ)⁻¹Q = ZᵀZ for Z = K⁻¹Q: one triangular solve and one symmetric product per layer."""
    o, n = qs[0].shape
    if o >= n:
        eye_n = torch.eye(n, dtype=qs[0].dtype, device=qs[0].device)
        acc = torch.zeros(n, n, dtype=qs[0].dtype, device=qs[0].device)
        for q in qs:
            acc += torch.cholesky_inverse(torch.linalg.cholesky(_gram(q).add_(eye_n, alpha=reg)))
        return acc.div_(len(qs))
    eye_o = torch.eye(o, dtype=qs[0].dtype, device=qs[0].device)
    acc = torch.zeros(n, n, dtype=qs[0].dtype, device=qs[0].device)
    for q in qs:
        k = torch.linalg.cholesky(_gram(q.mT).add_(eye_o, alpha=reg))
        _add_gram_upper_(acc, torch.linalg.solve_triangular(k, q, upper=False))
    acc = _mirror_upper(acc).div_(-len(qs))
    acc.diagonal().add_(1.0)
    return acc.div_(reg)


_PROBE_COLUMNS = 16


@functools.lru_cache(maxsize=8)
def _error_probe(n: int, device: torch.device) -> torch.Tensor:
    """The fixed probe P of the error estimate (n × 16, standard normal from seed 0, float64):
    drawn once per (n, device), never written."""
    with torch.inference_mode(False):
        draw = torch.randn(n, _PROBE_COLUMNS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return draw.to(device)


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


# An adapter's record of its basis: V at this many rows (``record_rows``).
_RECORD_ROWS = 64
# Alignment to a record: each recorded column is fitted by the rebuilt columns this many places
# either side of it: eigenvectors mix with their neighbours in eigenvalue order. What the record
# buys is measured by benchmarks/cross_dtype_load.py (docs/hardening.md §1); 64 rows and a reach of
# 16 keep the record at 64·n numbers per category.
_ALIGN_REACH = 16


def record_rows(n: int) -> torch.Tensor:
    """The rows of V that an adapter records: min(n, 64) rows spread evenly over 0 … n − 1."""
    return torch.linspace(0, n - 1, min(n, _RECORD_ROWS), dtype=torch.float64).round().long().unique()


def basis_record(V: torch.Tensor) -> torch.Tensor:
    """V at ``record_rows`` (k × n, V's dtype, on the CPU): what an adapter keeps of its basis."""
    return V.detach()[record_rows(V.shape[0]).to(V.device)].cpu().contiguous()


def basis_drift(V: torch.Tensor, record: torch.Tensor) -> float:
    """max_j ‖V[rows, j] − record[:, j]‖ / rms_j ‖record[:, j]‖ (float64): how far V's columns are from a
    record, each against the typical column (a column of V weighs its direction in U·M·Vᵀ, so a small
    one's error counts at its size)."""
    return _drift(basis_record(V).double(), record.double())


def _drift(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.square().sum(dim=0).mean().sqrt().clamp_min(1e-300)
    return float((got - want).norm(dim=0).max() / scale)


def drift_tolerance(*dtypes: torch.dtype, ulps: int = 8) -> float:
    """The ``basis_drift`` that rounding explains: ``ulps``·ε of the coarsest dtype involved, plus
    1e-6 for float64's own differences between machines (E is resolved to ε/gap)."""
    return ulps * max(torch.finfo(d).eps for d in dtypes) + 1e-6


def _align_to_record(e: torch.Tensor, v_rows: torch.Tensor, record: torch.Tensor, tolerance: float) -> torch.Tensor:
    """E·A for an orthogonal A that brings V's recorded rows (v_rows = (Rᵀ·E)[rows], true scale) to ``record``.

    First each column gets the record's sign (exact: a basis rebuilt with other signs only is then the
    same bit for bit). If columns still differ by more than ``tolerance``, each recorded column j is
    fitted, at the recorded rows, by the rebuilt columns j − w … j + w (least squares, w = 16: eigenvectors
    mix only with their neighbours in eigenvalue order), and A is the orthogonal matrix nearest that
    banded fit (its polar factor, from an SVD: O(n³), as eigh). A rotation within reach is recovered
    exactly; E·A stays orthogonal, so the decomposition stays exact."""
    want = record.to(v_rows)
    signs = torch.where((v_rows * want).sum(dim=0) < 0, -1.0, 1.0).to(e)
    e, v_rows = e * signs, v_rows * signs
    if _drift(v_rows, want) <= tolerance:
        return e
    n, width = e.shape[1], min(_ALIGN_REACH, (v_rows.shape[0] - 1) // 2)
    v_rows, want = v_rows.cpu(), want.cpu()  # the fit is small, and gelsd runs on the CPU only
    if v_rows.shape[0] == n:  # every row recorded (n ≤ 64): the whole fit, which a degenerate T needs
        a = torch.linalg.lstsq(v_rows, want).solution  # (L = 2 layers with L·o = n make T ∝ I)
    else:
        # Column j of A: the least-squares combination of rebuilt columns j − w … j + w that gives recorded
        # column j at the recorded rows (windows clipped at the edges: padded with zero columns).
        padded = torch.nn.functional.pad(v_rows, (width, width))
        windows = padded.unfold(1, 2 * width + 1, 1).permute(1, 0, 2)  # (n, k, 2w + 1)
        # gelsd: the windows at the edges hold zero columns (rank-deficient); the default driver returns 0 there
        coefficients = torch.linalg.lstsq(windows, want.mT.unsqueeze(2), driver="gelsd").solution.squeeze(2)
        offsets = torch.arange(n).unsqueeze(1) + torch.arange(2 * width + 1)
        band = torch.zeros(n, n + 2 * width, dtype=e.dtype).scatter_(1, offsets, coefficients)
        a = band[:, width:n + width].mT  # A[i, j] = coefficient of rebuilt column i in recorded column j
    u, _, vh = torch.linalg.svd(a)
    return e @ (u @ vh).to(e.device)  # the orthogonal matrix nearest A (polar factor): E·A stays orthogonal


def joint_decompose(
    weights: Sequence[torch.Tensor],
    reg: float = 1e-3,
    dtype: torch.dtype | None = None,
    name: str = "",
    inverse: bool = False,
    align_to: torch.Tensor | None = None,
) -> JointBasis:
    """Decompose L weights (o, n) into W_i = U_i·diag(λ_i)·Vᵀ with one shared V (docs/design.md §2).

    Args:
        weights: the category's frozen weights, all (o, n), same device.
        reg: α > 0, the regulariser of step 3.
        dtype: storage dtype of U, V, λ (default: the weights' dtype); the maths runs in float64.
        name: category name, for the log line.
        inverse: also return V⁻¹ (``JointBasis.V_inv``), from the float64 factors: V = Rᵀ·E with E
            orthogonal, so V⁻¹ = Eᵀ·R⁻ᵀ = (R⁻¹·E)ᵀ, one triangular solve (no general inverse).
        align_to: a ``basis_record`` (k × n) of the basis to reproduce (an adapter's, on load): E is
            aligned to it (``_align_to_record``) before V, U and λ are formed, so they stay exact.

    Returns:
        a ``JointBasis`` with the per-layer relative reconstruction errors (float64 maths).
    """
    reg = validate_reg(reg)
    peak = check_weights(weights)
    started = time.perf_counter()
    dtype = dtype or weights[0].dtype
    # Power-of-two scaling is exact: 2^e·(W/2^e) = W bit for bit (see the module docstring).
    exponent = math.frexp(peak)[1]
    count, (o, n) = len(weights), weights[0].shape
    # The L weights stacked as one (L·o × n) float64 matrix: the Gram sum (Q form) and the triangular
    # solve are then one large product each.
    stack = _new_stack(count * o, n, weights[0].device)
    layers = stack.split(o)
    for layer, w in zip(layers, weights, strict=True):
        layer.copy_(w.detach())
    _times_power_of_two_(stack, -exponent)
    probe = _error_probe(n, stack.device)
    w_probe = (stack @ probe).view(count, o, -1)  # W_i·P, kept for the error estimate
    norms_probe = torch.linalg.matrix_norm(w_probe).clamp_min(1e-300)

    # o ≥ n: T from the per-layer Gram matrices (the Gram form), if C is well conditioned; else (o < n,
    # one layer, or an ill-conditioned C) from Q = W·R⁻¹ (the Q form). Same maths, cheaper products.
    grams = [_gram(layer) for layer in layers] if count > 1 and o >= n else []
    c = sum(grams[1:], grams[0].clone()) if grams else _gram(stack)
    r, jitter = _cholesky_upper(c)
    eye = torch.eye(n, dtype=r.dtype, device=r.device)
    r_inv = torch.linalg.solve_triangular(r, eye, upper=True) if grams else None
    if r_inv is not None and condition_number(r, r_inv) ** 2 <= _GRAM_FORM_MAX_CONDITION:
        q = None
        e = torch.linalg.eigh(_mean_regularised_inverse_of_grams(grams, c, r, reg)).eigenvectors
    else:
        # Q_i = W_i·R⁻¹, all layers at once, in place of the stack: no second (L·o × n) copy, and Q stays
        # row-major for the per-layer products (an out-of-place solve returns it column-major)
        q = torch.linalg.solve_triangular(r, stack, upper=True, left=False, out=stack)
        if count == 1:
            e = eye  # T ∝ I: E = I, V = Rᵀ, U = Q
        else:
            e = torch.linalg.eigh(_mean_regularised_inverse(q.split(o), reg)).eigenvectors
    del grams, c
    if align_to is not None:
        rows = record_rows(n).to(r.device)
        if tuple(align_to.shape) != (len(rows), n):
            raise ValueError(f"align_to has shape {tuple(align_to.shape)}, expected {(len(rows), n)}")
        v_rows = _times_power_of_two_(r[:, rows].mT @ e, exponent)
        e = _align_to_record(e, v_rows, align_to.to(e.device), drift_tolerance(dtype, align_to.dtype))
    v = r.mT @ e
    # B_i = W_i·(R⁻¹E) in the Gram form, Q_i·E in the Q form (Q_i itself when E = I), one layer at a
    # time into one o × n buffer; λ_i, U_i, the error estimate and the storage copy follow while B_i is
    # in cache.
    r_inv_e = r_inv @ e if q is None else None  # R⁻¹·E, also V⁻¹'s transpose
    sources, right = (layers, r_inv_e) if q is None else (q.split(o), None if count == 1 else e)
    product = torch.empty(o, n, dtype=torch.float64, device=r.device) if right is not None else None
    vt_probe = v.mT @ probe  # Vᵀ·P
    us, lam_rows, probe_errors = [], [], []
    for source, layer_probe in zip(sources, w_probe, strict=True):
        b = source if right is None else torch.mm(source, right, out=product)
        lam = torch.linalg.vector_norm(b, dim=0)  # λ_i = column norms of B_i
        u = b.div_(torch.where(lam > 0, lam, torch.ones_like(lam)))  # a zero column stays zero
        # ‖(W_i − U_i·diag(λ_i)·Vᵀ)·P‖_F on the fixed probe (o·n·k multiply-adds instead of o·n²)
        probe_errors.append(torch.linalg.matrix_norm(layer_probe - u @ (lam.unsqueeze(1) * vt_probe)))
        # A copy (the buffer is the next layer's), column-major: the layout FRoDLinear keeps U in, so the
        # layer takes it without another pass over it
        us.append(torch.empty(n, o, dtype=dtype, device=u.device).mT.copy_(u))
        lam_rows.append(lam)
    lam = torch.stack(lam_rows)  # (L, n), float64
    errors = (torch.stack(probe_errors) / norms_probe).tolist()
    # U_i is finite iff λ_i is: a NaN or Inf in column j of B_i makes λ_i[j] = ‖B_i[:, j]‖ NaN or
    # Inf, and a finite λ_i[j] bounds |U_i[:, j]| by 1. So L·n numbers are checked, not L·o·n.
    finite = bool(torch.isfinite(lam).all())
    lams = [layer.to(dtype, copy=True) for layer in lam]
    stored = _times_power_of_two_(v, exponent).to(dtype)
    if not (finite and bool(torch.isfinite(stored).all())):
        raise ValueError(f"cannot decompose: the shared basis V overflows {dtype} (weights too large for it)")
    v_inv = None
    if inverse:  # V was scaled by 2^e, so V⁻¹ by 2^-e (exact)
        if r_inv_e is None:
            r_inv_e = torch.linalg.solve_triangular(r, e, upper=True)
        v_inv = _times_power_of_two_(r_inv_e.mT, -exponent).to(dtype)
        if not bool(torch.isfinite(v_inv).all()):
            raise ValueError(f"cannot decompose: V⁻¹ overflows {dtype} (weights too small for it)")
    elapsed = time.perf_counter() - started
    logger.info(
        "joint_decompose %s: %d x (%d, %d) in %.2fs, max rel. error %.2e%s",
        name or "<category>", count, o, n, elapsed, max(errors),
        f", jitter {jitter:.1e}" if jitter else "",
    )
    return JointBasis(V=stored, U=us, lam=lams, errors=errors, jitter=jitter, V_inv=v_inv)
