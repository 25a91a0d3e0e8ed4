"""``FRoDLinear``: a drop-in ``nn.Linear`` whose weight is W' = W + U·(diag(δ) + S)·Vᵀ (docs/design.md §3).

Trainable: ``delta`` δ (n) and ``sparse_values`` s (k), both zero at initialisation, so the layer
computes exactly what the base layer computes. Frozen: the base ``weight`` (and ``bias`` unless the
user unfreezes it), the per-layer buffers ``U`` (o, n) and ``lam`` (n), and the category's
``FRoDBasis`` (V and the sparse pattern, shared by its layers: ``basis.py``).

Derived tensors (U, λ, V, the pattern) are non-persistent buffers: they are recomputed from the
base weights (bit-identically on the same machine), so neither ``state_dict()`` nor an adapter
file carries them.

Modes (docs/design.md §6): ``additive`` keeps W and adds U·M·Vᵀ; ``factored`` drops W and computes with
U·(diag(λ+δ) + S)·Vᵀ, halving the frozen memory at the cost of the decomposition's rounding. δ means
the same in both modes (λ' = λ + δ), so an adapter trained in one mode loads into the other. An
unmerged factored layer stores no weight; its ``weight`` attribute is a ``FactoredWeight``
(``factored_weight.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import layer_merge
from .basis import FRoDBasis
from .config import MODES
from .decomposition import joint_decompose, validate_reg
from .dispatch import BACKENDS, PATHS
from .factored_weight import FactoredWeight
from .fingerprint import weight_fingerprint
from .functional import compute_dtype, frod_linear, frod_linear_reusing
from .layer_state import BaseProvenance, BasisGate, WeightCache, basis_path_error, converts_to_empty, state_key
from .options import check_choice
from .pattern import SparsePattern, sample_sparse_pattern, validate_sparse_rate
from .reference import rotation_matrix

__all__ = ["CACHED_WEIGHT", "MERGED", "REUSED_WEIGHT", "FRoDLayer", "FRoDLinear"]


# How a call was computed (``FRoDLinear.last_path``), beside the dispatcher's 'token', 'weight', 'basis'.
MERGED = "merged"
CACHED_WEIGHT = "cached W'"
REUSED_WEIGHT = "weight, reused W'"


def _layer_basis(weight: torch.Tensor, sparse_rate: float, seed: int, reg: float,
                 basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                 shared: FRoDBasis | None) -> tuple[torch.Tensor, torch.Tensor, FRoDBasis]:
    """(U, λ, the category's FRoDBasis) for ``FRoDLinear.from_linear``: decomposed from ``weight`` alone
    unless ``basis`` is given, a new FRoDBasis (V, Ω) unless ``shared`` is."""
    source, max_error, jitter = "given", 0.0, 0.0
    if basis is None:
        jb = joint_decompose([weight], reg=reg)
        U, V, lam = jb.U[0], jb.V, jb.lam[0]
        source, max_error, jitter = "joint_decompose", jb.errors[0], jb.jitter
    else:
        U, V, lam = basis
    if shared is None:
        shared = FRoDBasis(
            V.to(device=weight.device, dtype=weight.dtype), sample_sparse_pattern(weight.shape[1], sparse_rate, seed),
            sparse_rate, seed, reg, source=source, fingerprint=weight_fingerprint([weight]), max_error=max_error,
            jitter=jitter, fingerprint_dtype=weight.dtype,
        )
    return U, lam, shared


class FRoDLayer(nn.Module):
    """What every FRoD layer is: trainable δ (n) and s (k) on a category's shared ``FRoDBasis``, with a
    ``backend`` and a ``path`` for ``frod_linear``. ``FRoDLinear`` (additive, factored) and
    ``FRoDInputLinear`` (the input form) are its two kinds; model-level code works with either.

    A kind states its maths in ``_rotated(δ, s, with_base)`` (ΔW, or W' = W + ΔW), the weight a plain
    ``nn.Linear`` gets in ``_linear_weight`` and what sets it apart in ``_kind_repr``; ΔW, W', merged
    checkpoints and ``to_linear`` are formed from those here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.merged = False  # the base holds W' (``merge``) until ``unmerge``
        self.exact = False  # never the basis path (``FRoDLinear``)
        self.last_path: str | None = None  # how the last call was computed
        self.base_class: type[nn.Module] = nn.Linear  # the replaced module's class (``unload_frod``)
        self._unmerged_weight: torch.Tensor | None = None  # while merged: what ``unmerge`` puts back

    def __setattr__(self, name: str, value) -> None:
        if name == "backend":
            check_choice("backend", value, BACKENDS)
        elif name == "path":
            check_choice("path", value, PATHS)
        super().__setattr__(name, value)

    def _init_trainable(self, n: int, basis: FRoDBasis, dtype: torch.dtype, device: torch.device) -> None:
        """δ and s, zero: the layer starts as the base layer."""
        if not dtype.is_floating_point:
            raise TypeError(f"param_dtype must be a floating-point dtype, got {dtype}")
        self.basis = basis
        self.delta = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        self.sparse_values = nn.Parameter(torch.zeros(basis.k, dtype=dtype, device=device))

    @property
    def k(self) -> int:
        return self.basis.k

    @property
    def sparse_rate(self) -> float:
        return self.basis.sparse_rate

    def fingerprint_tensors(self) -> list[torch.Tensor] | None:
        """The tensors an adapter's base fingerprint covers (``fingerprint``); None: no base is stored."""
        base = self.base_weight
        return None if base is None else [base]

    def num_trainable(self) -> int:
        """n + k, docs/design.md §3."""
        return self.in_features + self.k

    def _accumulation_dtype(self) -> torch.dtype:
        """float64 for W' and ΔW, except on accelerators with lower-precision weights: there float64
        runs at a small fraction of float32's rate (1/64 on consumer GPUs), so float32 is used."""
        if self.lam.device.type != "cpu" and self.lam.dtype != torch.float64:
            return torch.float32
        return torch.float64

    def delta_weight(self) -> torch.Tensor:
        """ΔW (o, n), the update to the base weight (the kind's ``_rotated``), formed in the
        accumulation dtype (float64; float32 on a GPU for non-float64 weights) and rounded once."""
        return self._rotated(self.delta, self.sparse_values, with_base=False)

    def effective_weight(self) -> torch.Tensor:
        """W' = W + ΔW, formed as ``delta_weight`` is and rounded once."""
        return self._rotated(self.delta, self.sparse_values, with_base=True)

    def _merged_weight_of(self, delta: torch.Tensor, sparse_values: torch.Tensor) -> torch.Tensor:
        """W' with the given δ and s in place of the layer's (a checkpoint's), as ``merge`` forms it."""
        device = self.lam.device
        return self._rotated(delta.to(device), sparse_values.to(device), with_base=True)

    def _weight_to_merge(self, safe: bool) -> torch.Tensor:
        """W' for ``merge``; with ``safe`` a non-finite W' is refused (ValueError) before anything changes."""
        w_eff = self.effective_weight()
        if safe and not bool(torch.isfinite(w_eff).all()):
            raise ValueError("merge refused: the merged weight would hold NaN or Inf (check delta and sparse_values)")
        return w_eff

    @torch.no_grad()
    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain ``nn.Linear`` with W' (``merge``) or the base weight W (``_linear_weight``).

        The weight stays frozen and the bias keeps its ``requires_grad``, as in the FRoD model.
        """
        w = self._linear_weight(merge)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data.to(w.dtype), requires_grad=self.bias.requires_grad)
        return lin

    def _apply(self, fn, recurse: bool = True):
        # The weight kept for unmerge is a plain attribute: convert it with the module so that
        # .to(device/dtype) while merged does not leave it behind.
        super()._apply(fn, recurse)
        if self._unmerged_weight is not None:
            self._unmerged_weight = fn(self._unmerged_weight)
        return self

    def extra_repr(self) -> str:
        share = 100.0 * self.num_trainable() / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"sparse_rate={self.sparse_rate:g}, {self._kind_repr()}, "
            f"trainable={self.num_trainable()} ({share:.2f}%)" + (", exact" if self.exact else "")
            + (", merged" if self.merged else "")
        )


class FRoDLinear(FRoDLayer):
    """y = x·(W + U·(diag(δ)+S)·Vᵀ)ᵀ + b; build it with ``FRoDLinear.from_linear``.

    As ``nn.Linear``: ``in_features`` (n), ``out_features`` (o), ``weight`` (o, n; a ``FactoredWeight``
    in factored mode while unmerged), ``bias``. Settable: ``backend``, ``path`` (``frod_linear``),
    ``exact`` (never the basis path, below), ``cache_weight`` (W' reuse). Read: ``merged``,
    ``base_weight``, ``last_path`` ('token', 'weight', 'basis', ``REUSED_WEIGHT``, ``CACHED_WEIGHT``,
    ``MERGED``) and ``base_class`` (the replaced module's class, which ``unload_frod`` gives back).

    The basis path computes an additive layer with W = U·diag(λ)·Vᵀ, skipping X·Wᵀ (docs/design.md
    §5): equal up to the decomposition's rounding, so 'auto' takes it only where that rounding meets
    the package's error criterion (``basis_deviation``). Execution state lives in ``layer_state``
    objects; ``_invalidate`` is the one place that drops it.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, U: torch.Tensor, lam: torch.Tensor, basis: FRoDBasis,
        mode: str = "additive", backend: str = "auto", path: str = "auto", param_dtype: torch.dtype | None = None,
        exact: bool = False,
    ) -> None:
        super().__init__()
        check_choice("mode", mode, MODES)
        o, n = weight.shape
        if tuple(U.shape) != (o, n) or tuple(lam.shape) != (n,) or basis.n != n:
            raise ValueError(
                f"basis does not fit a ({o}, {n}) weight: U {tuple(U.shape)}, lam {tuple(lam.shape)}, "
                f"V ({basis.n}, {basis.n})"
            )
        self.in_features, self.out_features, self.mode = n, o, mode
        self.backend, self.path, self.exact = backend, path, bool(exact)
        self.cache_weight = True
        self._cache, self._gate = WeightCache(), BasisGate()
        dtype = weight.dtype
        if mode == "additive":
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        # Registered even when None, as nn.Linear does: forward reads it from the parameter dict.
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False))
        # Column-major, like V: the kernels read Uᵀ row by row (U·M = (Mᵀ·Uᵀ)ᵀ, the SDDMM's Uᵀ), and
        # this way Uᵀ is contiguous without a copy per call.
        U = U.detach().to(device=weight.device, dtype=dtype)
        self.register_buffer("U", U.t().contiguous().t(), persistent=False)
        self.register_buffer("lam", lam.detach().to(device=weight.device, dtype=dtype), persistent=False)
        self._init_trainable(n, basis, param_dtype or dtype, weight.device)
        self._provenance = BaseProvenance(self.base_weight)
        self._measure_basis()

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: in factored mode 'weight' is not a parameter
        # until merge() registers one.
        if name == "weight" and "weight" not in self.__dict__.get("_parameters", {"weight": None}):
            return FactoredWeight((self.out_features, self.in_features), self.U.dtype, self.U.device)
        return super().__getattr__(name)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, sparse_rate: float = 0.01, seed: int = 0, reg: float = 1e-3,
        basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, mode: str = "additive",
        backend: str = "auto", path: str = "auto", param_dtype: torch.dtype | None = None,
        shared: FRoDBasis | None = None, exact: bool = False,
    ) -> FRoDLinear:
        """Wrap ``linear`` (its weight and bias are shared, not copied).

        Args:
            basis: (U, V, lam) from a joint decomposition of this layer's category; without it the
                layer decomposes its own weight (L = 1: U = Q, V = Rᵀ, λ = 1).
            shared: a ``FRoDBasis`` already built for the category (``apply_frod`` passes one so
                that V and the pattern are stored once); its V is used and ``basis[1]`` ignored.
            sparse_rate, seed: the pattern Ω (docs/design.md §3), ignored when ``shared`` is given.
            param_dtype: dtype of δ and s (default: the weight's; float32 masters for a bf16 model).
            exact: never take the basis path (class docstring).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        U, lam, shared = _layer_basis(linear.weight, validate_sparse_rate(sparse_rate), seed, validate_reg(reg), basis,
                                      shared)
        return cls(linear.weight, linear.bias, U, lam, shared, mode=mode, backend=backend, path=path,
                   param_dtype=param_dtype, exact=exact)

    # -- the maths ------------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor | None:
        """The frozen base W (o, n), whether merged or not; None in factored mode."""
        if self.mode == "factored":
            return None
        # From the parameter dict: ``self.weight`` goes through two ``__getattr__`` (µs, every call).
        return self._unmerged_weight if self.merged else self._parameters["weight"]

    @property
    def base_is_original(self) -> bool:
        """Whether W still holds the weights the basis was computed from (or a cast of them), as far as
        this layer has seen every change to it (``layer_state.BaseProvenance``)."""
        return self._provenance.derived_valid and self._provenance.is_original(self.base_weight)

    @property
    def basis_valid(self) -> bool:
        """False after ``to('meta')``/``to_empty``, until the basis is rebuilt from real weights."""
        return self._provenance.derived_valid

    def require_basis(self) -> None:
        """Raise unless U, λ and V hold values (they hold none after ``to('meta')`` or ``to_empty``)."""
        if not self._provenance.derived_valid:
            raise RuntimeError(
                "this FRoDLinear's basis (U, λ, V) holds no values: the model went through to('meta') or "
                "to_empty(). Load the base weights, then frod_kernels.load_frod(model, adapter) (it rebuilds the "
                "basis from them and loads δ and s), or apply FRoD to the loaded base model again"
            )

    def _diag(self) -> torch.Tensor:
        """The diagonal of M as the kernels see it: δ, or λ+δ in factored mode."""
        delta = self._parameters["delta"]
        return delta if self.mode == "additive" else self._buffers["lam"] + delta

    def _rotated(self, delta: torch.Tensor, sparse_values: torch.Tensor, with_base: bool) -> torch.Tensor:
        """ΔW = U·(diag(δ) + S)·Vᵀ, or with the base W' = W + ΔW (factored: U·(diag(λ+δ) + S)·Vᵀ, since
        W = U·diag(λ)·Vᵀ there), formed in the accumulation dtype and rounded once to U's dtype."""
        self.require_basis()
        acc, base = self._accumulation_dtype(), self.base_weight if with_base else None
        diag = self.lam + delta if with_base and self.mode == "factored" else delta
        m = rotation_matrix(diag.to(acc), self.basis.indices, sparse_values.to(acc))
        w = self.U.to(acc) @ m @ self.basis.V.to(acc).mT
        return (w if base is None else w + base.to(acc)).to(self.U.dtype)

    # -- the basis path: its deviation, measured once per compute dtype (layer_state.BasisGate) ------

    @torch.no_grad()
    def basis_deviation(self, dtype: torch.dtype | None = None) -> tuple[float, float]:
        """(deviation, tolerance) of the basis path in ``dtype`` (default: the weight's), measured once
        per dtype and again after W changed (``layer_state.basis_path_error``); factored: (0, inf)."""
        dtype = dtype or self.U.dtype
        if self.mode == "factored":
            return 0.0, float("inf")
        self.require_basis()
        found = self._gate.measure(dtype, *self._basis_measurement(dtype))
        return found.deviation, found.tolerance

    def _basis_measurement(self, dtype: torch.dtype) -> tuple[tuple, Callable[[], tuple[float, float]]]:
        """(the key of W now, what measures the basis path's error on it in ``dtype``) for ``BasisGate``."""
        base = self.base_weight
        return (base.data_ptr(), base._version), lambda: basis_path_error(
            base, self.U, self.basis.V, self.lam, self.basis.pattern, dtype)

    def _measure_basis(self) -> None:
        """Measure the basis path's deviation now, in the weights' dtype, where that can be done:
        a compiled forward cannot measure, and would otherwise stay on the exact paths after every
        ``.to()``. Skipped without values (meta, ``to_empty``) and for sharded tensors (FSDP2's DTensors)."""
        base = self.base_weight
        if self.mode == "factored" or self.exact or base is None or not self._provenance.derived_valid:
            return
        if all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta" for t in (self.U, base)):
            self.basis_deviation()

    # -- the one place that drops execution state -----------------------------------------------

    def _invalidate(self, measurements: bool = True) -> None:
        """Drop the cached W' and, unless W is known unchanged (merge/unmerge), the basis measurements."""
        self._cache.drop()
        if measurements:
            self._gate.reset()

    def clear_weight_cache(self) -> None:
        """Drop the cached W' and the basis path's measurements; the next call builds and measures
        again. Needed only after writes that bypass version counters and optimizers (``.data``)."""
        self._invalidate()

    def _state_key(self, *extra) -> tuple:
        """The key of δ, s, U, V and W now (``layer_state.state_key``), plus ``extra``. Read from the module's
        dicts: ``nn.Module.__getattr__`` costs about a microsecond per name, and unmerged decoding calls
        this once per layer per token."""
        params = self._parameters
        tensors = (params["delta"], params["sparse_values"], self._buffers["U"], self._modules["basis"]._buffers["V"])
        if self.mode == "additive":
            tensors += (self._unmerged_weight if self.merged else params["weight"],)
        return (state_key(tensors), *extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """merged → plain linear; evaluation → the cached W' in a plain linear; else the custom op."""
        self.require_basis()
        # The module's dicts, not Module.__getattr__/__setattr__ (last_path): µs per call each.
        params = self._parameters
        if self.merged:
            self.__dict__["last_path"] = MERGED
            return nn.functional.linear(x, params["weight"], params.get("bias"))
        training = torch.is_grad_enabled() and (params["delta"].requires_grad or params["sparse_values"].requires_grad)
        compiling = torch.compiler.is_compiling()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return frod_linear(x, self.base_weight, self.bias, self.U, self.basis.V, self._diag(),
                               self.basis.pattern, self.sparse_values)  # names the problem
        if self.cache_weight and not training and not compiling and self._is_plain_input(x):
            self.__dict__["last_path"] = CACHED_WEIGHT
            return nn.functional.linear(x, self._cache.eval_weight(self._state_key(), self.effective_weight),
                                        params.get("bias"))
        return self._op_call(x, reuse=self.cache_weight and training and not compiling, compiling=compiling)

    def _op_call(self, x: torch.Tensor, reuse: bool, compiling: bool) -> torch.Tensor:
        """The custom op, given the W' of an earlier call with the same key when ``reuse`` (WeightCache)."""
        dtype = compute_dtype(x)
        key = self._state_key(dtype, self.backend) if reuse else None
        given, share, keep = self._cache.training_slot(key) if reuse else (None, 1.0, False)
        path, lam = self._plan(dtype, compiling)
        # The tensors from the module's dicts, as in ``_state_key``.
        params, shared = self._parameters, self._modules["basis"]._buffers
        pattern = SparsePattern(shared["indices"], shared["csr_ptr"], shared["csc_ptr"], shared["csc_perm"])
        y, taken, built = frod_linear_reusing(
            x, self.base_weight, params["bias"], self._buffers["U"], shared["V"], self._diag(), pattern,
            params["sparse_values"], backend=self.backend, path=path, lam=lam, rotated_weight=given, weight_share=share,
        )
        if built is not None and keep:
            self._cache.store(key, built)
        if not compiling:
            self.__dict__["last_path"] = REUSED_WEIGHT if taken == "weight" and given is not None else taken
        return y

    def _is_plain_input(self, x: torch.Tensor) -> bool:
        """x can meet the cached W' in a plain linear: W's dtype and device, last dim n (anything else goes
        to ``frod_linear``, which names the problem)."""
        U = self._buffers["U"]
        return x.dim() > 0 and x.shape[-1] == self.in_features and x.dtype == U.dtype and x.device == U.device

    def _plan(self, dtype: torch.dtype, compiling: bool) -> tuple[str, torch.Tensor | None]:
        """(path, λ where the basis path may be taken, else None) for ``frod_linear_reusing``: additive, not
        exact, and 'basis' forced or its deviation within tolerance (``BasisGate``). Factored mode
        computes 'basis' as 'token', the same maths there."""
        if self.path == "basis" and self.exact:
            raise ValueError("path='basis' computes with the decomposition's rounding; this layer has exact=True")
        if self.mode == "factored":
            return ("token" if self.path == "basis" else self.path), None
        if self.exact:
            return self.path, None
        if self.path == "basis":
            basis = True
        elif compiling:  # a compiled forward cannot measure (nor read W's storage and version)
            basis = self._gate.allows_compiled(dtype)
        else:
            basis = self._gate.allows(dtype, *self._basis_measurement(dtype))
        return self.path, self._buffers["lam"] if basis else None

    # -- merge and state dicts: ``layer_merge`` ---------------------------------------------------

    def merge(self, safe: bool = True) -> None:
        """Write W' into ``weight``; ``unmerge()`` restores the original bit for bit.

        With ``safe`` a non-finite δ, s or W' is refused (ValueError) and nothing changes.
        While merged, forward is a plain linear layer and δ, s receive no gradient.
        """
        layer_merge.merge(self, safe)

    def unmerge(self) -> None:
        """Undo ``merge``: the original weight object's data comes back untouched."""
        layer_merge.unmerge(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        layer_merge.save_unmerged(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        with layer_merge.loading(self, state_dict, prefix, error_msgs) as entries:
            super()._load_from_state_dict(entries, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    def _apply(self, fn, recurse: bool = True):
        # A conversion keeps W's values (so its provenance), except to_empty and anything from or to
        # meta, which keep none.
        was_original = self._provenance.is_original(self.base_weight)
        loses_values = converts_to_empty(fn) or self.U.device.type == "meta"
        super()._apply(fn, recurse)
        if loses_values or self.U.device.type == "meta":
            self._provenance.lose_derived()
        else:
            self._provenance.carry(was_original, self.base_weight)
        self._invalidate()  # W' and the basis measurements were for the old dtype and device
        self._measure_basis()
        return self

    @torch.no_grad()
    def rebuild_basis(self, U: torch.Tensor, lam: torch.Tensor) -> None:
        """Install U and λ recomputed from the current W (``load_frod`` after ``to_empty``; the caller
        sets the category's V with ``FRoDBasis.set_V``). W then counts as the original again."""
        self.U = U.detach().to(device=self.U.device, dtype=self.U.dtype).t().contiguous().t()
        self.lam = lam.detach().to(device=self.lam.device, dtype=self.lam.dtype)
        self._provenance.restore(self.base_weight)
        self._invalidate()
        self._measure_basis()

    def _linear_weight(self, merge: bool) -> torch.Tensor:
        """W' (``merge``) or W; factored mode rebuilds W = U·diag(λ)·Vᵀ (δ = 0, s = 0)."""
        if merge:
            return self.weight.data if self.merged else self.effective_weight()
        if self.mode == "additive":
            return self.base_weight.data
        return self._rotated(torch.zeros_like(self.delta), torch.zeros_like(self.sparse_values), with_base=True)

    def _kind_repr(self) -> str:
        return f"bias={self.bias is not None}, mode={self.mode}"
