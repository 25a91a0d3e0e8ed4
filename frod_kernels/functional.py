"""``frod_linear``: the functional FRoD layer, validated and dispatched (docs/design.md §3, §5).

This is the public entry point; it applies autocast, checks every input once, flattens x to
(N, n), resolves the backend and path (``dispatch``) and calls the custom op (``ops``), whose
registered autograd formula is the backward of docs/design.md §4.

Autocast: custom ops have no autocast kernel, so ``frod_linear`` does what autocast does for
``nn.Linear`` before calling the op: every floating-point input except float64 is cast to the
autocast dtype of x's device (float64 is left alone, as autocast leaves it), the op runs with
autocast off (its internal products are already in that dtype and accumulate in fp32), and y
comes back in the autocast dtype. The casts of δ and s are differentiable, so fp32 masters
receive fp32 gradients.
"""

from __future__ import annotations

import torch

from . import ops
from .dispatch import choose_backend, choose_path
from .pattern import SparsePattern

__all__ = ["compute_dtype", "frod_input_transform", "frod_linear", "frod_linear_reusing"]


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype}, but x has dtype {dtype} (convert the layer with .to(dtype) "
            f"or run under torch.autocast)"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but x is on {device}")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _autocast_cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Cast ``t`` as autocast would for a lower-precision op: floating point but not float64."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # ``Tensor.to`` costs a dispatcher round trip (~1 µs) even when it returns ``t`` itself; δ and s are
    # almost always in x's dtype already.
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``frod_linear`` computes in for input ``x``: the autocast dtype of x's device when
    autocast is on there and x is not float64, else x's own dtype."""
    amp_dtype = _autocast_dtype(x.device)
    return amp_dtype if amp_dtype is not None and x.dtype != torch.float64 else x.dtype


def frod_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    V: torch.Tensor,
    delta: torch.Tensor,
    sparse_indices: torch.Tensor | SparsePattern,
    sparse_values: torch.Tensor,
    backend: str = "auto",
    path: str = "auto",
    *,
    lam: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·(W + U·M·Vᵀ)ᵀ + b with M = diag(δ) + S, S[r_j, c_j] = s_j.

    Args:
        x: (..., n), any strides, floating point.
        weight: (o, n) frozen base weight, or None (factored mode: δ then holds λ+δ).
        bias: (o,) or None.
        U: (o, n).  V: (n, n); both fastest when column-major (``U.t()``, ``V.t()`` contiguous), as
            FRoDLinear keeps them.
        delta: (n,).  sparse_values: (k,).  These two may be in another float dtype than x (e.g.
            fp32 masters with a bf16 model): they are cast, and their gradients come back in
            their own dtype.
        sparse_indices: (2, k) int64 pattern (sorted row-major, off-diagonal), or a prebuilt
            ``SparsePattern`` (FRoDLinear passes one so the CSR/CSC views are not rebuilt).
        backend: 'auto' | 'torch' | 'triton'.  path: 'auto' | 'token' | 'weight' | 'basis'.
        lam: (n,) λ of the decomposition W = U·diag(λ)·Vᵀ (additive mode only). Given, it allows
            the basis path, y = x·(U·(diag(λ+δ) + S)·Vᵀ)ᵀ + b: the same function up to the
            decomposition's rounding in x's dtype, so only pass it where that rounding is
            acceptable (``FRoDLinear`` measures it); 'auto' then chooses it where it is cheapest.

    Returns:
        y of shape (..., o) in x's dtype, or in the autocast dtype inside ``torch.autocast``.
    """
    return frod_linear_reusing(x, weight, bias, U, V, delta, sparse_indices, sparse_values, backend, path,
                               lam=lam)[0]


def frod_linear_reusing(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    V: torch.Tensor,
    delta: torch.Tensor,
    sparse_indices: torch.Tensor | SparsePattern,
    sparse_values: torch.Tensor,
    backend: str = "auto",
    path: str = "auto",
    *,
    lam: torch.Tensor | None = None,
    rotated_weight: torch.Tensor | None = None,
    weight_share: float = 1.0,
) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """``frod_linear`` that can reuse W' = W + U·M·Vᵀ across calls (what ``FRoDLinear`` does).

    Args beyond ``frod_linear``'s:
        rotated_weight: W' (o, n) in the compute dtype (``compute_dtype(x)``), built by an earlier
            call with the same W, δ and s; used if the weight path is taken. Detached: it is the
            caller's promise that it is current (``FRoDLinear`` keys it by version counters).
        weight_share: the share of building W' the cost model charges this call when
            ``rotated_weight`` is None (1/r when a W' built now will serve r calls).

    Returns:
        (y, the path taken, W' if this call built it on the weight path under grad, else None:
        detached, for the caller to pass back while δ, s and W are unchanged).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(U, torch.Tensor):
        raise TypeError(f"U must be a tensor, got {type(U).__name__}")
    amp_dtype = _autocast_dtype(x.device)
    if amp_dtype is not None:
        x, weight, bias, U, V, lam = (_autocast_cast(t, amp_dtype) for t in (x, weight, bias, U, V, lam))
    if U.dim() != 2:
        raise ValueError(f"U must be 2-D (out_features, in_features), got shape {tuple(U.shape)}")
    o, n = U.shape
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(f"x has last dimension {tuple(x.shape)[-1:]}, expected in_features = {n}")
    dtype, device = x.dtype, x.device
    _check("U", U, (o, n), dtype, device)
    _check("V", V, (n, n), dtype, device)
    if weight is not None:
        _check("weight", weight, (o, n), dtype, device)
    if bias is not None:
        _check("bias", bias, (o,), dtype, device)
    if rotated_weight is not None:
        _check("rotated_weight", rotated_weight, (o, n), dtype, device)
    if lam is not None:
        if weight is None:
            raise ValueError("lam is for additive layers (a factored call already computes in the basis)")
        _check("lam", lam, (n,), dtype, device)
    indices = sparse_indices.indices if isinstance(sparse_indices, SparsePattern) else sparse_indices
    if isinstance(indices, torch.Tensor) and indices.device != device:  # before checking its values there
        raise ValueError(f"sparse_indices are on {indices.device}, but x is on {device}")
    pattern = sparse_indices if isinstance(sparse_indices, SparsePattern) else (
        SparsePattern.from_indices(sparse_indices, n)
    )
    if pattern.n != n:
        raise ValueError(f"sparse pattern is for n = {pattern.n}, but in_features = {n}")
    for name, t, size in (("delta", delta, n), ("sparse_values", sparse_values, pattern.k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != size:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({size},)")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, but x is on {device}")

    # A 2-D x goes to the op itself: a reshape would be a view, with its own autograd node.
    x2 = x if x.dim() == 2 else x.reshape(-1, n)
    grad = torch.is_grad_enabled()
    for name, t in (("weight", weight), ("U", U), ("V", V), ("lam", lam), ("rotated_weight", rotated_weight)):
        if grad and t is not None and t.requires_grad:
            # docs/design.md §4: W, U, V are frozen and get no gradient; fail loudly rather than leave
            # a user who unfroze them with a silent None.
            raise ValueError(f"{name} requires grad, but FRoD keeps W, U and V frozen (set requires_grad_(False))")
    needs_input_grad = grad and x.requires_grad
    needs_param_grad = grad and (delta.requires_grad or sparse_values.requires_grad)
    resolved_backend = choose_backend(backend, device)
    resolved_path = choose_path(
        path, n_rows=x2.shape[0], out_features=o, in_features=n, k=pattern.k, additive=weight is not None,
        needs_input_grad=needs_input_grad, needs_param_grad=needs_param_grad, device_type=device.type,
        basis=lam is not None, weight_share=0.0 if rotated_weight is not None else weight_share,
    )
    save = needs_input_grad or needs_param_grad
    if resolved_path == "basis":  # the token path with W = U·diag(λ)·Vᵀ folded into the diagonal
        operands = ops.Operands(None, bias, U, V, _as(_as(lam, delta.dtype) + delta, dtype),
                                _as(sparse_values, dtype), pattern)
    else:
        operands = ops.Operands(weight, bias, U, V, _as(delta, dtype), _as(sparse_values, dtype), pattern)
    args = (x2, *operands.as_op_args(), rotated_weight if resolved_path == "weight" else None,
            "token" if resolved_path == "basis" else resolved_path, resolved_backend, save)
    if amp_dtype is None:
        y, saved = ops.frod_linear_call(*args)
    else:
        with torch.autocast(device.type, enabled=False):
            y, saved = ops.frod_linear_call(*args)
    built = saved.detach() if resolved_path == "weight" and rotated_weight is None and save else None
    # A 2-D x gets the op's output itself, as from nn.Linear: not a view (FSDP2 warns about views,
    # whose in-place use would bypass its backward hooks); N-D x gets a view, as nn.Linear gives.
    return (y if x.dim() == 2 else y.reshape(*x.shape[:-1], o)), resolved_path, built


def frod_input_transform(
    x: torch.Tensor,
    V: torch.Tensor,
    V_inv: torch.Tensor,
    lam_pinv: torch.Tensor,
    delta: torch.Tensor,
    sparse_indices: torch.Tensor | SparsePattern,
    sparse_values: torch.Tensor,
    backend: str = "auto",
    path: str = "auto",
) -> torch.Tensor:
    """x̃ = x + ((x·V)·Mᵀ·Λ⁺)·V⁻¹, the input form's transform (docs/design.md §6.1): base(x̃) = x·W'ᵀ + b.

    With M' = Λ⁺·M (row r of M scaled by λ⁺_r: diagonal λ⁺∘δ, entries λ⁺_{r_j}·s_j) this is
    x + x·(V⁻ᵀ·M'·Vᵀ)ᵀ, i.e. ``frod_linear`` without W, with U = V⁻ᵀ and M' in place of M: the same
    kernels, custom ops and autograd formula (the token path, or the weight path forming the n × n
    V⁻ᵀ·M'·Vᵀ), and the gradients of δ and s are those of M' times λ⁺ (the scaling is autograd's).

    Args:
        x: (..., n) floating point.  V, V_inv: (n, n), V⁻¹ best row-major (U = V⁻ᵀ column-major).
        lam_pinv: (n,) λ⁺, 1/λ with disabled directions 0 (``FRoDInputLinear`` guards it).
        delta: (n,) δ.  sparse_indices, sparse_values: Ω and s, as for ``frod_linear``.

    At δ = s = 0 the update is exactly zero, so x̃ = x bit for bit. In 16-bit dtypes the update is
    accumulated in float32 inside each product and rounded once before the one rounding of x + it.
    """
    if not isinstance(lam_pinv, torch.Tensor) or not isinstance(delta, torch.Tensor) or lam_pinv.shape != delta.shape:
        raise ValueError(f"lam_pinv must be a tensor of delta's shape {tuple(getattr(delta, 'shape', ()))}, got "
                         f"{tuple(getattr(lam_pinv, 'shape', ()))}")
    indices = sparse_indices.indices if isinstance(sparse_indices, SparsePattern) else sparse_indices
    if not isinstance(sparse_values, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError("sparse_indices and sparse_values must be tensors")
    if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] != sparse_values.shape[-1]:
        raise ValueError(f"sparse_indices has shape {tuple(indices.shape)}, expected (2, {sparse_values.shape[-1]})")
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0 and _autocast_dtype(x.device) is None:
        n = x.shape[-1]  # name the input form's own operands (U below is V⁻ᵀ)
        _check("V", V, (n, n), x.dtype, x.device)
        _check("V_inv", V_inv, (n, n), x.dtype, x.device)
    scale = lam_pinv.to(delta.dtype)
    diag = scale * delta
    values = scale.to(sparse_values.dtype)[indices[0]] * sparse_values
    update = frod_linear(x, None, None, V_inv.mT, V, diag, sparse_indices, values, backend, path)
    return x + update
