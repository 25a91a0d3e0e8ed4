"""``FRoDLinear``: a drop-in ``nn.Linear`` whose weight is W' = W + U·(diag(δ) + S)·Vᵀ (FROD.md §3).

Trainable: ``delta`` δ (n) and ``sparse_values`` s (k), both zero at initialisation, so the layer
computes exactly what the base layer computes. Frozen: the base ``weight`` (and ``bias`` unless the
user unfreezes it), the per-layer buffers ``U`` (o, n) and ``lam`` (n), and the per-category
``FRoDBasis`` (V and the sparse pattern), which is one module object shared by every layer of
the category: ``model.to()``, ``named_buffers()`` and DDP see V once, not once per layer.

Derived tensors (U, λ, V, the pattern) are non-persistent buffers: they are recomputed from the
base weights (bit-identically on the same machine), so neither ``state_dict()`` nor an adapter
file carries them.

Modes (FROD.md §6): ``additive`` keeps W and adds U·M·Vᵀ; ``factored`` drops W and computes with
U·(diag(λ+δ) + S)·Vᵀ, halving the frozen memory at the cost of the decomposition's rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from .decomposition import joint_decompose
from .dispatch import BACKENDS, PATHS
from .functional import frod_linear
from .pattern import SparsePattern, sample_sparse_pattern, validate_sparse_rate
from .reference import rotation_matrix

__all__ = ["MODES", "FRoDBasis", "FRoDLinear"]

MODES = ("additive", "factored")


class FRoDBasis(nn.Module):
    """What a category shares: V (n, n, kept column-major for the SDDMM) and the pattern Ω."""

    def __init__(
        self, V: torch.Tensor, sparse_indices: torch.Tensor, sparse_rate: float, seed: int, reg: float,
        name: str = "",
    ) -> None:
        super().__init__()
        n = V.shape[0]
        pattern = SparsePattern.from_indices(sparse_indices.to(V.device), n)
        self.register_buffer("V", V.detach().t().contiguous().t(), persistent=False)
        for field, tensor in zip(SparsePattern._fields, pattern, strict=True):
            self.register_buffer(field, tensor, persistent=False)
        self.sparse_rate, self.seed, self.reg, self.name = sparse_rate, seed, reg, name

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


class FRoDLinear(nn.Module):
    """y = x·(W + U·(diag(δ)+S)·Vᵀ)ᵀ + b; build it with ``FRoDLinear.from_linear``.

    Attributes as ``nn.Linear``: ``in_features`` (n), ``out_features`` (o), ``weight`` (o, n; None
    in factored mode while unmerged), ``bias``. Also ``backend`` and ``path`` (see ``frod_linear``),
    settable at any time, and ``merged``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        U: torch.Tensor,
        lam: torch.Tensor,
        basis: FRoDBasis,
        mode: str = "additive",
        backend: str = "auto",
        path: str = "auto",
        param_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        o, n = weight.shape
        if tuple(U.shape) != (o, n) or tuple(lam.shape) != (n,) or basis.n != n:
            raise ValueError(
                f"basis does not fit a ({o}, {n}) weight: U {tuple(U.shape)}, lam {tuple(lam.shape)}, "
                f"V ({basis.n}, {basis.n})"
            )
        self.in_features, self.out_features, self.mode = n, o, mode
        self.backend, self.path = backend, path
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        dtype = weight.dtype
        self.weight: nn.Parameter | None = (
            nn.Parameter(weight.detach(), requires_grad=False) if mode == "additive" else None
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("U", U.detach().to(device=weight.device, dtype=dtype), persistent=False)
        self.register_buffer("lam", lam.detach().to(device=weight.device, dtype=dtype), persistent=False)
        self.basis = basis
        pdtype = param_dtype or dtype
        self.delta = nn.Parameter(torch.zeros(n, dtype=pdtype, device=weight.device))
        self.sparse_values = nn.Parameter(torch.zeros(basis.k, dtype=pdtype, device=weight.device))

    def __setattr__(self, name: str, value) -> None:
        if name == "backend" and value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        if name == "path" and value not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {value!r}")
        super().__setattr__(name, value)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sparse_rate: float = 0.01,
        seed: int = 0,
        reg: float = 1e-3,
        basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        mode: str = "additive",
        backend: str = "auto",
        path: str = "auto",
        param_dtype: torch.dtype | None = None,
        shared: FRoDBasis | None = None,
    ) -> FRoDLinear:
        """Wrap ``linear`` (its weight and bias are shared, not copied).

        Args:
            basis: (U, V, lam) from a joint decomposition of this layer's category; without it the
                layer decomposes its own weight (L = 1: U = Q, V = Rᵀ, λ = 1).
            shared: a ``FRoDBasis`` already built for the category (``apply_frod`` passes one so
                that V and the pattern are stored once); its V is used and ``basis[1]`` ignored.
            sparse_rate, seed: the pattern Ω (FROD.md §3), ignored when ``shared`` is given.
            param_dtype: dtype of δ and s (default: the weight's; float32 masters for a bf16 model).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        sparse_rate = validate_sparse_rate(sparse_rate)
        weight = linear.weight
        if basis is None:
            jb = joint_decompose([weight], reg=reg)
            U, V, lam = jb.U[0], jb.V, jb.lam[0]
        else:
            U, V, lam = basis
        if shared is None:
            indices = sample_sparse_pattern(weight.shape[1], sparse_rate, seed)
            shared = FRoDBasis(V.to(device=weight.device, dtype=weight.dtype), indices, sparse_rate, seed, reg)
        return cls(weight, linear.bias, U, lam, shared, mode=mode, backend=backend, path=path,
                   param_dtype=param_dtype)

    # -- the maths ------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return self.basis.k

    @property
    def sparse_rate(self) -> float:
        return self.basis.sparse_rate

    def _diag(self) -> torch.Tensor:
        """The diagonal of M as the kernels see it: δ, or λ+δ in factored mode."""
        return self.delta if self.mode == "additive" else self.lam + self.delta

    def delta_weight(self) -> torch.Tensor:
        """ΔW = U·(diag(δ)+S)·Vᵀ (o, n), formed in float64 and rounded once to the weight dtype."""
        f64 = torch.float64
        m = rotation_matrix(self.delta.to(f64), self.basis.indices, self.sparse_values.to(f64))
        return (self.U.to(f64) @ m @ self.basis.V.to(f64).mT).to(self.U.dtype)

    def effective_weight(self) -> torch.Tensor:
        """W' = W + ΔW (additive) or U·(diag(λ+δ)+S)·Vᵀ (factored), in float64 then rounded once."""
        f64 = torch.float64
        m = rotation_matrix(self._diag().to(f64), self.basis.indices, self.sparse_values.to(f64))
        w = self.U.to(f64) @ m @ self.basis.V.to(f64).mT
        if self.mode == "additive":
            w = w + (self._unmerged_weight if self.merged else self.weight).to(f64)
        return w.to(self.U.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return frod_linear(
            x, self.weight, self.bias, self.U, self.basis.V, self._diag(), self.basis.pattern,
            self.sparse_values, backend=self.backend, path=self.path,
        )

    # -- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Write W' into ``weight``; ``unmerge()`` restores the original bit for bit.

        With ``safe`` a non-finite δ, s or W' is refused (ValueError) and nothing changes.
        While merged, forward is a plain linear layer and δ, s receive no gradient.
        """
        if self.merged:
            return
        w_eff = self.effective_weight()
        if safe and not bool(torch.isfinite(w_eff).all()):
            raise ValueError("merge refused: the merged weight would hold NaN or Inf (check delta and sparse_values)")
        self._unmerged_weight = None if self.weight is None else self.weight.data
        if self.weight is None:
            self.weight = nn.Parameter(w_eff, requires_grad=False)
        else:
            self.weight.data = w_eff
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: the original weight object's data comes back untouched."""
        if not self.merged:
            return
        if self._unmerged_weight is None:
            self.weight = None
        else:
            self.weight.data = self._unmerged_weight
        self._unmerged_weight = None
        self.merged = False

    @torch.no_grad()
    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain ``nn.Linear`` with W' (``merge``) or the base weight (factored: U·diag(λ)·Vᵀ).

        The weight stays frozen and the bias keeps its ``requires_grad``, as in the FRoD model.
        """
        if merge:
            w = self.weight.data if self.merged else self.effective_weight()
        elif self.mode == "additive":
            w = self._unmerged_weight if self.merged else self.weight.data
        else:
            w = ((self.U.double() * self.lam.double()) @ self.basis.V.double().mT).to(self.U.dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data, requires_grad=self.bias.requires_grad)
        return lin

    def num_trainable(self) -> int:
        """n + k, FROD.md §3."""
        return self.in_features + self.k

    def extra_repr(self) -> str:
        share = 100.0 * self.num_trainable() / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"sparse_rate={self.sparse_rate:g}, bias={self.bias is not None}, mode={self.mode}, "
            f"trainable={self.num_trainable()} ({share:.2f}%)" + (", merged" if self.merged else "")
        )
