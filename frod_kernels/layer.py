"""``FRoDLinear``: a drop-in ``nn.Linear`` whose weight is W' = W + U·(diag(δ) + S)·Vᵀ (docs/design.md §3).

Trainable: ``delta`` δ (n) and ``sparse_values`` s (k), both zero at initialisation, so the layer
computes exactly what the base layer computes. Frozen: the base ``weight`` (and ``bias`` unless the
user unfreezes it), the per-layer buffers ``U`` (o, n) and ``lam`` (n), and the per-category
``FRoDBasis`` (V and the sparse pattern), which is one module object shared by every layer of
the category: ``model.to()``, ``named_buffers()`` and DDP see V once, not once per layer.

Derived tensors (U, λ, V, the pattern) are non-persistent buffers: they are recomputed from the
base weights (bit-identically on the same machine), so neither ``state_dict()`` nor an adapter
file carries them.

Modes (docs/design.md §6): ``additive`` keeps W and adds U·M·Vᵀ; ``factored`` drops W and computes with
U·(diag(λ+δ) + S)·Vᵀ, halving the frozen memory at the cost of the decomposition's rounding. δ means
the same in both modes (λ' = λ + δ), so an adapter trained in one mode loads into the other. An
unmerged factored layer stores no weight; its ``weight`` attribute is a ``FactoredWeight`` that
answers ``shape``/``dtype``/``device`` (code written for ``nn.Linear`` reads those) and refuses to
be used as a tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from .decomposition import ALGORITHM_VERSION, joint_decompose, validate_reg
from .dispatch import BACKENDS, PATHS
from .fingerprint import weight_fingerprint
from .functional import compute_dtype, frod_linear, frod_linear_reusing
from .pattern import SparsePattern, sample_sparse_pattern, validate_sparse_rate
from .reference import relative_error, rotation_matrix

__all__ = ["MODES", "FRoDBasis", "FRoDLinear", "FactoredWeight"]

MODES = ("additive", "factored")


class FRoDBasis(nn.Module):
    """What a category shares: V (n, n, kept column-major for the SDDMM) and the pattern Ω."""

    def __init__(
        self, V: torch.Tensor, sparse_indices: torch.Tensor, sparse_rate: float, seed: int, reg: float,
        name: str = "", *, base_seed: int | None = None, source: str = "given", fingerprint: str | None = None,
        max_error: float = 0.0, jitter: float = 0.0,
    ) -> None:
        """Args beyond V and Ω record where the basis came from, for adapters and summaries:

        seed: the pattern's own seed; base_seed: the seed given to ``apply_frod`` it was derived
        from (None for a layer built on its own); reg: α of the decomposition; source:
        ``"joint_decompose"`` when V is a function of the category's base weights (rebuilt on
        load), ``"given"`` when the caller supplied it; fingerprint: of the base weights V was
        computed from (``fingerprint.weight_fingerprint``); max_error, jitter: the decomposition's.
        """
        super().__init__()
        n = V.shape[0]
        pattern = SparsePattern.from_indices(sparse_indices.to(V.device), n)
        self.register_buffer("V", V.detach().t().contiguous().t(), persistent=False)
        for field, tensor in zip(SparsePattern._fields, pattern, strict=True):
            self.register_buffer(field, tensor, persistent=False)
        self.sparse_rate, self.seed, self.reg, self.name = sparse_rate, seed, reg, name
        self.base_seed, self.source, self.fingerprint = base_seed, source, fingerprint
        self.algorithm = ALGORITHM_VERSION if source == "joint_decompose" else None
        self.max_error, self.jitter = max_error, jitter

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


class FactoredWeight:
    """Stands in for ``weight`` of an unmerged factored layer: metadata of the (o, n) weight, no data.

    ``shape``, ``size()``, ``dim()``, ``dtype``, ``device`` and ``requires_grad`` answer as the base
    weight would; passing it to a torch function raises a TypeError (there are no values to read:
    use ``FRoDLinear.effective_weight()``, or ``merge()`` to materialise W').
    """

    requires_grad = False
    ndim = 2

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def __getattr__(self, name: str):
        # Tensor attributes (``.T``, ``.data``, ``.float()``, …) would need values: the same
        # TypeError as a torch function. Anything else is a plain missing attribute, so that
        # ``getattr(w, "quant_state", None)`` and ``hasattr`` keep working.
        if not name.startswith("__") and hasattr(torch.Tensor, name):
            raise TypeError(
                f"FactoredWeight.{name}: a factored FRoDLinear stores no weight tensor; use "
                f"effective_weight() for W' or merge() to materialise it"
            )
        raise AttributeError(f"'FactoredWeight' object has no attribute {name!r}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(
            f"{getattr(func, '__name__', func)}: a factored FRoDLinear stores no weight tensor; use "
            f"effective_weight() for W' or merge() to materialise it"
        )

    def __repr__(self) -> str:
        return f"FactoredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class FRoDLinear(nn.Module):
    """y = x·(W + U·(diag(δ)+S)·Vᵀ)ᵀ + b; build it with ``FRoDLinear.from_linear``.

    Attributes as ``nn.Linear``: ``in_features`` (n), ``out_features`` (o), ``weight`` (o, n; a
    ``FactoredWeight`` in factored mode while unmerged), ``bias``. Also ``backend`` and ``path`` (see
    ``frod_linear``), ``exact`` (see below) and ``cache_weight`` (W' reuse, below), settable at any
    time, ``merged``, ``last_path`` (how the last call was computed: 'token', 'weight', 'weight,
    reused W'', 'basis', 'cached W'' or 'merged'), and ``base_class``: the class of the module this
    layer replaced (``nn.Linear``, or transformers' ``Conv1D``), which ``unload_frod`` gives back.

    The basis path and ``exact``: an additive layer can also compute with W = U·diag(λ)·Vᵀ, i.e.
    y = x·(U·(diag(λ+δ) + S)·Vᵀ)ᵀ + b (the factored computation), which skips the X·Wᵀ product
    (docs/design.md §5). It is the same function up to the decomposition's rounding in the compute
    dtype, so ``path='auto'`` takes it only where it is cheapest *and* that rounding is within the
    package's error criterion: on a fixed probe, the basis output's error against float64 is at most
    2× plain ``F.linear``'s own error in that dtype plus one ulp (``basis_deviation``, measured once
    per dtype). ``exact=True`` forbids it: the layer then computes exactly what its formula says
    in the compute dtype, bit-identical to the base layer while δ = s = 0.
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
        exact: bool = False,
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
        if param_dtype is not None and not param_dtype.is_floating_point:
            raise TypeError(f"param_dtype must be a floating-point dtype, got {param_dtype}")
        self.in_features, self.out_features, self.mode = n, o, mode
        self.backend, self.path, self.exact = backend, path, bool(exact)
        self.merged = False
        self.cache_weight = True
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self._basis_checks: dict[torch.dtype, tuple[float, float, tuple]] = {}
        self._uses: tuple[tuple | None, int, int] = (None, 0, 1)  # (key, calls with it, calls per W' so far)
        self.last_path: str | None = None
        self.base_class: type[nn.Module] = nn.Linear
        self._unmerged_weight: torch.Tensor | None = None
        dtype = weight.dtype
        if mode == "additive":
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # Column-major, like V: the kernels read Uᵀ row by row (U·M = (Mᵀ·Uᵀ)ᵀ, the SDDMM's Uᵀ), and
        # this way Uᵀ is contiguous without a copy per call.
        U = U.detach().to(device=weight.device, dtype=dtype)
        self.register_buffer("U", U.t().contiguous().t(), persistent=False)
        self.register_buffer("lam", lam.detach().to(device=weight.device, dtype=dtype), persistent=False)
        self.basis = basis
        pdtype = param_dtype or dtype
        self.delta = nn.Parameter(torch.zeros(n, dtype=pdtype, device=weight.device))
        self.sparse_values = nn.Parameter(torch.zeros(basis.k, dtype=pdtype, device=weight.device))
        self._measure_basis()

    def __setattr__(self, name: str, value) -> None:
        if name == "backend" and value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        if name == "path" and value not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {value!r}")
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: in factored mode 'weight' is not a parameter
        # until merge() registers one.
        if name == "weight" and "weight" not in self.__dict__.get("_parameters", {"weight": None}):
            return FactoredWeight((self.out_features, self.in_features), self.U.dtype, self.U.device)
        return super().__getattr__(name)

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
        exact: bool = False,
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
        sparse_rate = validate_sparse_rate(sparse_rate)
        reg = validate_reg(reg)
        weight = linear.weight
        source, max_error, jitter = "given", 0.0, 0.0
        if basis is None:
            jb = joint_decompose([weight], reg=reg)
            U, V, lam = jb.U[0], jb.V, jb.lam[0]
            source, max_error, jitter = "joint_decompose", jb.errors[0], jb.jitter
        else:
            U, V, lam = basis
        if shared is None:
            indices = sample_sparse_pattern(weight.shape[1], sparse_rate, seed)
            shared = FRoDBasis(
                V.to(device=weight.device, dtype=weight.dtype), indices, sparse_rate, seed, reg, source=source,
                fingerprint=weight_fingerprint([weight]), max_error=max_error, jitter=jitter,
            )
        return cls(weight, linear.bias, U, lam, shared, mode=mode, backend=backend, path=path,
                   param_dtype=param_dtype, exact=exact)

    # -- the maths ------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return self.basis.k

    @property
    def sparse_rate(self) -> float:
        return self.basis.sparse_rate

    def _base_weight(self) -> torch.Tensor | None:
        """The frozen base W (o, n), None in factored mode (whether merged or not)."""
        if self.mode == "factored":
            return None
        return self._unmerged_weight if self.merged else self.weight

    def _diag(self) -> torch.Tensor:
        """The diagonal of M as the kernels see it: δ, or λ+δ in factored mode."""
        return self.delta if self.mode == "additive" else self.lam + self.delta

    def _accumulation_dtype(self) -> torch.dtype:
        """float64 for W' and ΔW, except on accelerators with lower-precision weights: there float64
        runs at a small fraction of float32's rate (1/64 on consumer GPUs), so float32 is used."""
        if self.U.device.type != "cpu" and self.U.dtype != torch.float64:
            return torch.float32
        return torch.float64

    def delta_weight(self) -> torch.Tensor:
        """ΔW = U·(diag(δ)+S)·Vᵀ (o, n), formed in float64 (float32 on a GPU for non-float64
        weights) and rounded once to the weight dtype."""
        acc = self._accumulation_dtype()
        m = rotation_matrix(self.delta.to(acc), self.basis.indices, self.sparse_values.to(acc))
        return (self.U.to(acc) @ m @ self.basis.V.to(acc).mT).to(self.U.dtype)

    def effective_weight(self) -> torch.Tensor:
        """W' = W + ΔW (additive) or U·(diag(λ+δ)+S)·Vᵀ (factored), formed as ``delta_weight`` is
        and rounded once."""
        acc = self._accumulation_dtype()
        m = rotation_matrix(self._diag().to(acc), self.basis.indices, self.sparse_values.to(acc))
        w = self.U.to(acc) @ m @ self.basis.V.to(acc).mT
        base = self._base_weight()
        return (w if base is None else w + base.to(acc)).to(self.U.dtype)

    # -- the basis path: its deviation, measured once per compute dtype -----------------------------

    _PROBE_ROWS = 64

    @torch.no_grad()
    def basis_deviation(self, dtype: torch.dtype | None = None) -> tuple[float, float]:
        """(deviation, tolerance) of the basis path in ``dtype`` (default: the weight's), measured once.

        On a fixed probe X (64 rows, standard normal, rounded to ``dtype``), relative to the base
        layer in float64 (max|·| / max|y₆₄|, δ = s = 0): deviation = error of X·(U·diag(λ)·Vᵀ)ᵀ
        computed the basis path's way in ``dtype``; tolerance = 2 × the error of plain
        ``F.linear`` in ``dtype`` + eps(dtype) (16·eps in float64), the criterion of
        ``frod_kernels.bench.validate``. Factored layers always compute this way: (0, inf).

        Measured again when the base weight changed since (its storage or version counter): U, λ
        and V no longer reproduce a changed W, and the measurement then says so.
        """
        dtype = dtype or self.U.dtype
        if self.mode == "factored":
            return 0.0, float("inf")
        base = self._base_weight()
        weight_key = (base.data_ptr(), base._version)
        if self._basis_checks.get(dtype, (None, None, None))[2] != weight_key:
            gen = torch.Generator().manual_seed(0)
            probe = torch.randn(self._PROBE_ROWS, self.in_features, generator=gen, dtype=torch.float64)
            x = probe.to(device=self.U.device, dtype=dtype)
            exact = x.double() @ base.double().mT
            plain = nn.functional.linear(x, base.to(dtype))
            zeros = torch.zeros(self.k, dtype=dtype, device=x.device)
            basis = frod_linear(x, None, None, self.U.to(dtype), self.basis.V.to(dtype), self.lam.to(dtype),
                                self.basis.pattern, zeros, backend="torch", path="token")
            atol = torch.finfo(dtype).eps * (16.0 if dtype == torch.float64 else 1.0)
            self._basis_checks[dtype] = (
                relative_error(basis, exact), 2.0 * relative_error(plain, exact) + atol, weight_key,
            )
        return self._basis_checks[dtype][:2]

    def _basis_lam(self, dtype: torch.dtype) -> torch.Tensor | None:
        """λ when this call may take the basis path (additive, not exact, deviation in tolerance)."""
        if self.mode == "factored" or self.exact:
            return None
        if self.path == "basis":
            return self.lam
        if torch.compiler.is_compiling():
            # No measuring inside a graph: the last eager measurement decides (loads, .to() and
            # clear_weight_cache() drop it, and then the compiled call stays exact).
            check = self._basis_checks.get(dtype)
            return self.lam if check is not None and check[0] <= check[1] else None
        deviation, tolerance = self.basis_deviation(dtype)
        return self.lam if deviation <= tolerance else None

    # -- W' reuse: evaluation at the cost of a plain linear; gradient accumulation -----------------
    #
    # W' = W + U·M·Vᵀ changes only when δ, s or the base weight do. Two uses, one slot (at most one
    # (o, n) tensor per layer, the size of a merged weight):
    #   * evaluation (no gradients for δ and s): W' is built once as ``merge`` builds it
    #     (``effective_weight``, rounded once, so cached and merged outputs are identical) and
    #     y = x·W'ᵀ + b is a plain linear;
    #   * training on the weight path: the W' a call built is kept and given to the next calls
    #     while δ, s and W are unchanged (the micro-batches of gradient accumulation, activation
    #     checkpointing's recomputation): bit-identical to building it again. It is kept only once
    #     reuse has been seen (a second call with the same δ, s, or the previous ones served more
    #     than one call), so that plain training, where every step changes δ, holds no extra W'
    #     between steps. The cost model is charged 1/r of the build, r = calls per W' so far, so
    #     that accumulation can make the weight path the cheapest.
    # The key is the storage and version counter of δ, s, W, U and V (plus the compute dtype and
    # backend): every in-place update through autograd-visible ops (optimizer steps, ``copy_``,
    # ``load_state_dict``) bumps a version; ``.to()``, merge/unmerge and state-dict loads clear it.
    # Writes through ``.data`` bypass version counters (as they bypass autograd's own checks): call
    # ``clear_weight_cache()`` after them. ``cache_weight = False`` turns both uses off. Under
    # torch.compile neither is used (the custom op is traced instead).

    def _cache_key(self) -> tuple:
        base = self._base_weight()
        tensors = (self.delta, self.sparse_values, self.U, self.basis.V) + (() if base is None else (base,))
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def clear_weight_cache(self) -> None:
        """Drop the cached W' and the basis path's measurements (see above); the next call builds
        and measures again. Needed only after writes that bypass version counters (``.data``)."""
        self._weight_cache = None
        self._basis_checks.clear()

    def _cached_weight(self) -> torch.Tensor:
        key = ("eval", self._cache_key())
        cache = self._weight_cache
        if cache is None or cache[0] != key:
            self._weight_cache = None  # a stale W' is freed before the new one is built
            with torch.no_grad():
                self._weight_cache = cache = (key, self.effective_weight())
        return cache[1]

    def _reusable_weight(self, dtype: torch.dtype) -> tuple[tuple, torch.Tensor | None, float, bool]:
        """(key, the W' the weight path may reuse or None, share of a new build to charge, whether
        to keep a W' built now)."""
        key = ("train", self._cache_key(), dtype, self.backend)
        last, calls, per_build = self._uses
        if key == last:
            calls += 1
        else:  # δ, s or W changed: the previous W' served ``calls`` calls
            calls, per_build = 1, max(calls, 1) if last else 1
        self._uses = (key, calls, per_build)
        cache = self._weight_cache
        if cache is not None and cache[0] == key:
            return key, cache[1], 0.0, False
        self._weight_cache = None  # stale: freed before the op builds the new one
        return key, None, 1.0 / per_build, calls > 1 or per_build > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self.last_path = "merged"
            return nn.functional.linear(x, self.weight, self.bias)
        params_need_grad = torch.is_grad_enabled() and (self.delta.requires_grad or self.sparse_values.requires_grad)
        compiling = torch.compiler.is_compiling()
        if self.cache_weight and not params_need_grad and not compiling:
            w = self._cached_weight()
            if isinstance(x, torch.Tensor) and x.dtype == w.dtype and x.device == w.device and x.dim() > 0 and (
                x.shape[-1] == self.in_features
            ):
                self.last_path = "cached W'"
                return nn.functional.linear(x, w, self.bias)
            # anything unusual goes to frod_linear, which names the problem
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return frod_linear(x, self._base_weight(), self.bias, self.U, self.basis.V, self._diag(),
                               self.basis.pattern, self.sparse_values)  # names the problem
        path = "token" if self.path == "basis" and self.mode == "factored" else self.path  # factored: the same
        if self.exact and path == "basis":
            raise ValueError("path='basis' computes with the decomposition's rounding; this layer has exact=True")
        dtype = compute_dtype(x)
        reuse = self.cache_weight and params_need_grad and not compiling
        key, given, share, keep = self._reusable_weight(dtype) if reuse else (None, None, 1.0, False)
        y, taken, built = frod_linear_reusing(
            x, self._base_weight(), self.bias, self.U, self.basis.V, self._diag(), self.basis.pattern,
            self.sparse_values, backend=self.backend, path=path, lam=self._basis_lam(dtype),
            rotated_weight=given, weight_share=share,
        )
        if built is not None and keep:
            self._weight_cache = (key, built)
        if not compiling:
            self.last_path = "weight, reused W'" if taken == "weight" and given is not None else taken
        return y

    # -- state dicts: always (W, b, δ, s), whether merged or not ------------------------------------
    #
    # A merged layer holds W' in ``weight``; saving that beside δ and s would apply the update twice
    # on load. So the state dict of a merged layer holds the base W (additive) or no weight
    # (factored), exactly as when unmerged, and loading into a merged layer unmerges it, loads, and
    # merges again with the new δ and s: a checkpoint restores the trained function either way.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            if self.mode == "factored":
                del destination[prefix + "weight"]
            else:
                destination[prefix + "weight"] = self._unmerged_weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        merged = self.merged
        self.unmerge()
        self.clear_weight_cache()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
        )
        if merged:
            try:
                self.merge()
            except ValueError as exc:  # load_state_dict raises with every message once all modules ran
                error_msgs.append(f"{prefix or 'FRoDLinear'}: loaded, but could not merge again: {exc}")
        self._measure_basis()  # for the loaded W

    def _apply(self, fn, recurse: bool = True):
        # The weight kept for unmerge is a plain attribute: convert it with the module so that
        # .to(device/dtype) while merged does not leave it behind.
        super()._apply(fn, recurse)
        self.clear_weight_cache()  # W' and the basis measurements were for the old dtype and device
        if self._unmerged_weight is not None:
            self._unmerged_weight = fn(self._unmerged_weight)
        self._measure_basis()
        return self

    def _measure_basis(self) -> None:
        """Measure the basis path's deviation now, in the weights' dtype, where that can be done:
        a compiled forward cannot measure, and would otherwise stay on the exact paths after every
        ``.to()``. Skipped for tensors without data (meta) or sharded ones (FSDP2's DTensors)."""
        base = self._base_weight()
        if self.mode == "factored" or self.exact or base is None:
            return
        if all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta" for t in (self.U, base)):
            self.basis_deviation()

    # -- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Write W' into ``weight``; ``unmerge()`` restores the original bit for bit.

        With ``safe`` a non-finite δ, s or W' is refused (ValueError) and nothing changes.
        While merged, forward is a plain linear layer and δ, s receive no gradient.
        """
        if self.merged:
            return
        self._weight_cache = None  # W' only: W is unchanged, so is the basis measurement
        w_eff = self.effective_weight()
        if safe and not bool(torch.isfinite(w_eff).all()):
            raise ValueError("merge refused: the merged weight would hold NaN or Inf (check delta and sparse_values)")
        if self.mode == "factored":
            # Registered directly: register_parameter would see the FactoredWeight stand-in.
            self._parameters["weight"] = nn.Parameter(w_eff, requires_grad=False)
        else:
            self._unmerged_weight = self.weight.data
            self.weight.data = w_eff
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: the original weight object's data comes back untouched."""
        if not self.merged:
            return
        self._weight_cache = None  # W' only: W is unchanged, so is the basis measurement
        if self.mode == "factored":
            del self._parameters["weight"]
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
            w = self._base_weight().data
        else:
            w = ((self.U.double() * self.lam.double()) @ self.basis.V.double().mT).to(self.U.dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data, requires_grad=self.bias.requires_grad)
        return lin

    def num_trainable(self) -> int:
        """n + k, docs/design.md §3."""
        return self.in_features + self.k

    def extra_repr(self) -> str:
        share = 100.0 * self.num_trainable() / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"sparse_rate={self.sparse_rate:g}, bias={self.bias is not None}, mode={self.mode}, "
            f"trainable={self.num_trainable()} ({share:.2f}%)" + (", exact" if self.exact else "")
            + (", merged" if self.merged else "")
        )
