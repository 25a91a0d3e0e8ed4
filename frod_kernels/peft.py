"""Interop with PEFT's own FRoD tuner (``peft.FrodConfig``, PEFT ≥ 0.21): run it on our kernels, or convert it.

PEFT's FRoD layer is the *replacement* form of FRoD. Per category of like layers (PEFT's category
of a module path, e.g. ``self_query``) it stores one shared basis V (n, n) and one pattern Ω; per
layer it stores U (o, n) (``frod_U``, recomputed from the base weight, never saved) and trains

    λ_l (n)  ``frod_lambda_l``, initialised to the decomposition's λ  (W ≈ U·diag(λ)·Vᵀ)
    s   (k)  ``frod_lambda_s_values``, zero at init, S = coo(Ω, s) (n, n), S[Ω₀ⱼ, Ω₁ⱼ] = sⱼ

and computes, for x (..., n),

    y = ((x·V)·Sᵀ + (x·V)·diag(λ_l))·Uᵀ + b = x·(U·(diag(λ_l) + S)·Vᵀ)ᵀ + b.

That is exactly our *factored* mode (``frod_linear`` with ``weight=None``): M = diag(λ_l) + S,
with the same orientation of U, V and S (not Sᵀ). PEFT draws Ω as a random permutation of the
off-diagonal slots, so its entries are not sorted; our kernels want Ω sorted row-major. The map
between the two is a permutation π of the k entries: our values are s[π] (a gather, differentiable:
the gradient scatters back into PEFT's own parameter). The mapping also handles patterns PEFT
does not produce today: a diagonal entry (r, r) is added to λ_l[r], and duplicate entries are summed
(as ``coalesce`` does). No parameter is copied.

``accelerate(peft_model)`` switches every PEFT FRoD ``Linear`` of the model to a subclass,
``AcceleratedFrodLinear``, whose ``forward`` calls our ``frod_linear`` custom op. Nothing else
changes: the parameters are the same objects with the same names, so an optimizer built before or
after, ``state_dict``/``save_pretrained``, ``load_adapter``, ``merge_and_unload`` and
``disable_adapter`` keep working as in PEFT. Per call it falls back to PEFT's own forward (same
numbers, not accelerated), with a ``FrodFallbackWarning`` shown once per reason, when

    - ``frod_dropout`` > 0 and the layer is in training mode (PEFT then adds x·Wᵀ - dropout(x)·Wᵀ);
    - several adapters are active at once, or none of the active adapters is in this layer;
    - the adapters are disabled (``with model.disable_adapter():``) or merged;
    - forward gets arguments besides x.

``fan_in_fan_out`` (GPT-2's ``Conv1D``) needs no fallback: the replacement form never reads the
base weight (U was computed from its transpose), only its bias. ``deaccelerate(peft_model)`` puts
the original class back. Derived tensors (V kept column-major, as our SDDMM wants, and the sorted
pattern with its CSR/CSC views) are cached per category and rebuilt when the source buffer changes
(other object, device, dtype or in-place version): one extra n × n copy of V per category.

The other direction, ``to_frod_layers(peft_model)`` and ``from_peft_adapter(model, adapter_dir)``,
build our ``FRoDLinear`` layers (factored mode by default) from a PEFT FRoD model, or from a PEFT
adapter directory saved with ``save_projection=True`` (no PEFT needed for that one: the file holds
V and Ω, U and λ are recomputed from the base weight as PEFT does). Each layer gets PEFT's U, its
category's V (shared ``FRoDBasis``), Ω sorted, λ = the decomposition value λ₀ of the base weight, and
δ = λ_l - λ₀, s = s[π], so that λ + δ = λ_l (to one fp32 rounding) and the function is PEFT's.

Example::

    from peft import FrodConfig, get_peft_model
    import frod_kernels.peft as fkp

    model = get_peft_model(base, FrodConfig(target_modules=["query", "value"], sparse_rate=0.01))
    fkp.accelerate(model)           # same parameters, same function, our kernels
    ...train as before...
    model.save_pretrained("out")    # a normal PEFT adapter
    fkp.deaccelerate(model)         # back to PEFT's forward

Inside this module ``import peft`` is the top-level PEFT package (absolute imports); PEFT is only
imported when a function needs it, so ``from_peft_adapter`` works without it.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .basis import FRoDBasis
from .config import MODES
from .fingerprint import weight_fingerprint
from .functional import frod_linear
from .layer import FRoDLinear
from .options import check_choice
from .pattern import SparsePattern
from .targets import replace_module

__all__ = [
    "FrodFallbackWarning",
    "OmegaMap",
    "accelerate",
    "deaccelerate",
    "from_peft_adapter",
    "is_accelerated",
    "peft_category",
    "peft_u_lambda",
    "to_frod_layers",
]


class FrodFallbackWarning(UserWarning):
    """An accelerated PEFT FRoD layer computed through PEFT's own code path for the reason given."""


def _peft_frod():
    """PEFT's FRoD tuner module (``peft.tuners.frod``), with a clear error when it is missing."""
    try:
        import peft
        from peft.tuners import frod
    except ImportError as exc:
        raise ImportError(
            "frod_kernels.peft needs PEFT with its FRoD tuner (peft>=0.21): pip install 'peft>=0.21'"
        ) from exc
    if not hasattr(peft, "FrodConfig"):
        raise ImportError(f"the installed peft {getattr(peft, '__version__', '?')} has no FrodConfig (need >=0.21)")
    return frod


# -- Ω: PEFT's COO order ↔ our sorted off-diagonal pattern ------------------------------------------


@dataclass
class OmegaMap:
    """The linear map from PEFT's (λ_l, s) to our (diagonal, sorted values) for one pattern.

    PEFT's pattern: ``peft_indices`` (2, m), any order, possibly with diagonal entries or duplicates
    (``coalesce`` sums them). Ours: ``pattern`` (k ≤ m entries, off-diagonal, sorted row-major).
    ``gather`` (k,) picks, for our entry j, the PEFT entry holding it (None when it is the identity);
    ``dup_index`` replaces it when duplicates exist (our value j = Σ of PEFT entries with index j);
    ``diag_rows``/``diag_pos`` add the diagonal entries to λ_l.
    """

    pattern: SparsePattern
    gather: torch.Tensor | None
    dup_index: torch.Tensor | None
    off_pos: torch.Tensor | None
    diag_rows: torch.Tensor | None
    diag_pos: torch.Tensor | None

    @staticmethod
    def build(peft_indices: torch.Tensor, n: int, device: torch.device | None = None) -> OmegaMap:
        """Analyse PEFT's (2, m) int64 pattern for an n × n S; everything returned lives on ``device``."""
        idx = peft_indices.detach().to(device="cpu", dtype=torch.int64)
        if idx.dim() != 2 or idx.shape[0] != 2:
            raise ValueError(f"PEFT's frod_s_indices must have shape (2, k), got {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"PEFT's frod_s_indices are out of range for an {n} x {n} S")
        rows, cols = idx[0], idx[1]
        on_diag = rows == cols
        off_pos = (~on_diag).nonzero().squeeze(1)
        linear = rows[off_pos] * n + cols[off_pos]
        uniq, inverse = torch.unique(linear, sorted=True, return_inverse=True)
        ours = torch.stack([torch.div(uniq, n, rounding_mode="floor"), uniq % n])
        gather = dup_index = None
        if uniq.numel() == linear.numel():  # a permutation: our entry j is PEFT's entry gather[j]
            gather = off_pos[torch.argsort(linear)]
            if torch.equal(gather, torch.arange(gather.numel())):
                gather = None
        else:
            dup_index = inverse
        diag_pos = on_diag.nonzero().squeeze(1)
        any_diag = diag_pos.numel() > 0

        def to(t: torch.Tensor) -> torch.Tensor:
            return t if device is None else t.to(device)

        return OmegaMap(
            pattern=SparsePattern.from_indices(to(ours), n),
            gather=None if gather is None else to(gather),
            dup_index=None if dup_index is None else to(dup_index),
            off_pos=None if dup_index is None and not any_diag else to(off_pos),
            diag_rows=to(rows[diag_pos]) if any_diag else None,
            diag_pos=to(diag_pos) if any_diag else None,
        )

    def apply(self, lambda_l: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(diagonal (n,), our values (k,)) from PEFT's λ_l (n,) and s (m,); differentiable in both."""
        diag = lambda_l if self.diag_rows is None else lambda_l.index_add(0, self.diag_rows, s[self.diag_pos])
        if self.dup_index is not None:
            values = s.new_zeros(self.pattern.k).index_add(0, self.dup_index, s[self.off_pos])
        elif self.gather is not None:
            values = s[self.gather]
        else:
            values = s if self.off_pos is None else s[self.off_pos]
        return diag, values


# -- accelerate ------------------------------------------------------------------------------------


@dataclass
class _State:
    """Shared by the layers of one ``accelerate`` call: options, the notices shown, the caches."""

    backend: str = "auto"
    path: str = "auto"
    column_major_v: bool = True
    warned: set[str] = field(default_factory=set)
    # (id of the category's BufferDict, adapter) → (source tensor, (its version, device, dtype), derived)
    cache: dict[tuple[int, str], tuple] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) starts with an empty cache: its keys name the original's buffers.
        return {**self.__dict__, "cache": {}}

    def notice(self, layer: nn.Module, reason: str) -> None:
        if reason in self.warned:
            return
        self.warned.add(reason)
        warnings.warn(
            f"frod_kernels.peft: {reason} (first seen in layer {getattr(layer, '_frod_name', '?')!r}); such calls "
            f"run PEFT's own FRoD forward (same result, not accelerated). Shown once per reason.",
            FrodFallbackWarning, stacklevel=4,
        )

    def derived(self, owner: object, adapter: str, src: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None, build) -> object:
        key = (id(owner), adapter)
        hit = self.cache.get(key)
        stamp = (src._version, device, dtype)
        if hit is not None and hit[0] is src and hit[1] == stamp:
            return hit[2]
        value = build()
        self.cache[key] = (src, stamp, value)
        return value


def _fallback_reason(layer: nn.Module, args: tuple, kwargs: dict) -> str | None:
    if args or kwargs:
        return "forward got arguments besides x"
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "the adapter is merged into the base weight"
    active = [a for a in layer.active_adapters if a in layer.frod_lambda_s_values]
    if len(active) != 1:
        return "several active adapters" if active else "no active adapter in this layer"
    dropout = layer.frod_dropout[active[0]]
    if not isinstance(dropout, nn.Identity) and dropout.training:
        return "frod_dropout > 0 in training mode"
    return None


def _accelerated_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's FRoD forward, y = x·(U·(diag(λ_l) + S)·Vᵀ)ᵀ + b, through ``frod_linear`` (factored mode)."""
    state: _State = self._frod_accel
    reason = _fallback_reason(self, args, kwargs)
    if reason is not None:
        state.notice(self, reason)
        return _peft_frod().Linear.forward(self, x, *args, **kwargs)
    (adapter,) = [a for a in self.active_adapters if a in self.frod_lambda_s_values]
    if self.runtime_offload_base_weight.get(adapter, False):
        self._offload_base_weight_to_cpu()  # as PEFT does: this path never reads the base weight
    device, dtype = x.device, x.dtype
    V_src = self.frod_V[adapter]
    if state.column_major_v:
        V = state.derived(self.frod_V, adapter, V_src, device, dtype,
                          lambda: V_src.detach().to(device=device, dtype=dtype).t().contiguous().t())
    else:
        V = V_src.to(device=device, dtype=dtype)
    n = V.shape[0]
    idx_src = self.frod_s_indices[adapter]

    def build_omega() -> OmegaMap:  # only when Ω changed: reading frod_s_size syncs a GPU
        size = tuple(int(d) for d in self.frod_s_size[adapter].tolist())
        if size != (n, n):
            raise ValueError(f"PEFT's frod_s_size is {size}, but V is {n} x {n}")
        return OmegaMap.build(idx_src, n, device)

    omega: OmegaMap = state.derived(self.frod_s_indices, adapter, idx_src, device, None, build_omega)
    diag, values = omega.apply(self.frod_lambda_l[adapter], self.frod_lambda_s_values[adapter])
    U = self.frod_U[adapter].to(device=device, dtype=dtype)
    bias = self.get_base_layer().bias
    if bias is not None:
        bias = bias.to(device=device, dtype=dtype)
    y = frod_linear(x, None, bias, U, V, diag, omega.pattern, values, backend=state.backend, path=state.path)
    return y.to(dtype)


@functools.cache
def _accelerated_class() -> type[nn.Module]:
    linear = _peft_frod().Linear
    cls = type("AcceleratedFrodLinear", (linear,), {
        "forward": _accelerated_forward,
        "__module__": __name__,
        "__doc__": "PEFT's FRoD ``Linear`` computing through ``frod_linear``; see ``frod_kernels.peft``.",
    })
    return cls


def __getattr__(name: str):
    # ``AcceleratedFrodLinear`` subclasses PEFT's class, so it is made on first use (PEFT is
    # optional); module-level access (pickle, isinstance) goes through here.
    if name == "AcceleratedFrodLinear":
        return _accelerated_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _frod_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    frod = _peft_frod()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, frod.FrodLayer)]


def accelerate(
    peft_model: nn.Module, backend: str = "auto", path: str = "auto", column_major_v: bool = True,
) -> int:
    """Make every PEFT FRoD layer of ``peft_model`` compute through ``frod_linear``; returns how many.

    Args:
        peft_model: a ``PeftModel`` (or any module) holding layers made by ``peft.FrodConfig``.
        backend, path: passed to ``frod_linear`` ('auto' | 'torch' | 'triton'; 'auto' | 'token' | 'weight').
        column_major_v: cache a column-major copy of each category's V (n × n), which the kernels
            read faster; False uses PEFT's V as stored (no extra memory).

    The layers' class becomes ``AcceleratedFrodLinear`` (a subclass of PEFT's); parameters, buffers,
    names and the state dict are untouched. Calling it again replaces the options.
    """
    from .dispatch import BACKENDS, PATHS

    check_choice("backend", backend, BACKENDS)
    check_choice("path", path, PATHS)
    frod, cls = _peft_frod(), _accelerated_class()
    layers = _frod_layers(peft_model)
    if not layers:
        raise ValueError("accelerate: the model has no PEFT FRoD layer (build it with peft.FrodConfig)")
    state = _State(backend=backend, path=path, column_major_v=column_major_v)
    count = 0
    for name, layer in layers:
        if type(layer) not in (frod.Linear, cls):
            warnings.warn(f"accelerate: {name!r} is a {type(layer).__name__}, not PEFT's frod Linear; left as is",
                          FrodFallbackWarning, stacklevel=2)
            continue
        layer.__class__ = cls
        layer._frod_accel, layer._frod_name = state, name
        count += 1
    return count


def deaccelerate(peft_model: nn.Module) -> int:
    """Undo ``accelerate``: the layers get PEFT's class back; returns how many were accelerated."""
    frod, cls = _peft_frod(), _accelerated_class()
    count = 0
    for _, layer in _frod_layers(peft_model):
        if type(layer) is cls:
            layer.__class__ = frod.Linear
            del layer._frod_accel, layer._frod_name
            count += 1
    return count


def is_accelerated(layer_or_model: nn.Module) -> bool:
    """True if the layer, or any layer of the model, runs on ``frod_linear``."""
    cls = _accelerated_class()
    return any(type(m) is cls for m in layer_or_model.modules())


# -- conversion to our layers ----------------------------------------------------------------------


def peft_category(key: str) -> str:
    """PEFT's FRoD category of a module path (``peft.tuners.frod.model._category_from_key``, re-stated so
    that a saved adapter can be read without PEFT): the last two path components, e.g.
    ``encoder.layer.0.attention.self.query`` → ``self_query``; BERT's ``attention.output.dense`` →
    ``attention_output``; a component after a layer index alone (``h.0.mlp`` → ``mlp``)."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def peft_u_lambda(V: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U (o, n) and λ₀ (n) of W = U·diag(λ₀)·Vᵀ as PEFT computes them (its ``_calculate_frod_u_and_lambda``).

    B = W·V⁻ᵀ by a float64 solve (pseudo-inverse with rtol 1e-6 if V is singular), λ₀ = column norms
    of B, U = B·diag(λ₀)⁻¹ (zero columns where λ₀ ≤ 1e-12); returned in float32, on the CPU.
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    v = V.detach().to(device="cpu", dtype=torch.float64)
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lam = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    nonzero = lam > 1e-12
    u[:, nonzero] = b[:, nonzero] / lam[nonzero]
    return u.float(), lam.float()


@dataclass
class _PeftLayerData:
    """What one PEFT FRoD layer needs to become a ``FRoDLinear``."""

    name: str
    base: nn.Module  # nn.Linear, or Conv1D (fan_in_fan_out)
    weight: torch.Tensor  # (o, n) view of the base weight
    U: torch.Tensor | None  # PEFT's frod_U, or None to recompute it
    lambda_l: torch.Tensor
    s: torch.Tensor
    category: str


def _base_weight_on(base: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    return base.weight.detach().t() if fan_in_fan_out else base.weight.detach()


def _build_frod_layers(
    entries: list[_PeftLayerData], projections: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: dict, mode: str,
) -> dict[str, FRoDLinear]:
    """One ``FRoDLinear`` per entry; ``projections`` maps a category to (V, PEFT's Ω)."""
    check_choice("mode", mode, MODES)
    bases: dict[str, tuple[FRoDBasis, OmegaMap]] = {}
    out = {}
    for e in entries:
        if e.category not in projections:
            raise ValueError(f"layer {e.name!r}: no FRoD projection for its category {e.category!r}")
        V, indices = projections[e.category]
        weight = e.weight
        o, n = weight.shape
        if tuple(V.shape) != (n, n):
            raise ValueError(f"layer {e.name!r}: V of category {e.category!r} is {tuple(V.shape)}, weight is {(o, n)}")
        if e.category not in bases:
            omega = OmegaMap.build(indices, n, device=weight.device)
            # source "given": V is PEFT's, not ours to recompute; the fingerprint lets our adapter files
            # (save_frod/load_frod) check that they load onto the same base weights.
            basis = FRoDBasis(V.to(device=weight.device, dtype=weight.dtype), omega.pattern.indices,
                              float(config.get("sparse_rate", 0.0)), int(config.get("projection_prng_key", 0)),
                              float(config.get("regularization_alpha", 1e-3)), name=e.category, source="given",
                              fingerprint=weight_fingerprint([x.weight for x in entries if x.category == e.category]))
            bases[e.category] = (basis, omega)
        basis, omega = bases[e.category]
        U, lam0 = peft_u_lambda(V, weight)
        if e.U is not None:
            U = e.U
        layer = FRoDLinear(weight, e.base.bias, U.to(device=weight.device, dtype=weight.dtype),
                           lam0.to(device=weight.device, dtype=weight.dtype), basis, mode=mode,
                           param_dtype=e.lambda_l.dtype)
        layer.base_class = type(e.base)
        if e.base.bias is not None:
            layer.bias.requires_grad_(e.base.bias.requires_grad)
        with torch.no_grad():
            diag, values = omega.apply(e.lambda_l.detach().to(weight.device), e.s.detach().to(weight.device))
            layer.delta.copy_(diag - layer.lam.to(diag.dtype))
            layer.sparse_values.copy_(values)
        out[e.name] = layer
    return out


def to_frod_layers(peft_model: nn.Module, adapter_name: str | None = None, mode: str = "factored") -> nn.Module:
    """Our ``FRoDLinear`` layers in place of a PEFT FRoD model's layers; returns the underlying model.

    Each layer computes PEFT's function: factored mode is U·(diag(λ₀ + δ) + S)·Vᵀ with λ₀ + δ = λ_l;
    ``mode="additive"`` keeps the base W and computes W + U·(diag(δ) + S)·Vᵀ instead, which differs
    from PEFT's by the decomposition residual W - U·diag(λ₀)·Vᵀ.

    This unloads the PEFT model (``peft_model.unload()``: ``modules_to_save`` copies stay in place):
    copy it first to keep it. The model must not be merged. The new δ and s are trainable; everything
    else keeps the ``requires_grad`` it had (frozen base, trainable heads and biases).
    """
    frod = _peft_frod()
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, frod.FrodModel):
        tuner = peft_model
    if not isinstance(tuner, frod.FrodModel):
        raise TypeError(
            f"to_frod_layers expects a PeftModel built with peft.FrodConfig, got {type(peft_model).__name__}"
        )
    base_model = tuner.model
    if adapter_name is None:
        active = tuner.active_adapters
        if len(active) != 1:
            raise ValueError(f"the model has {len(active)} active adapters {active}; pass adapter_name")
        adapter_name = active[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"no adapter {adapter_name!r}; the model has {sorted(tuner.peft_config)}")
    config = tuner.peft_config[adapter_name].to_dict()
    category_of = {id(bd): cat for cat, bd in tuner.frod_V.items()}
    entries, projections = [], {}
    for name, layer in base_model.named_modules():
        if not isinstance(layer, frod.FrodLayer) or adapter_name not in layer.frod_lambda_l:
            continue
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge it (model.unmerge_adapter()) before converting")
        category = category_of[id(layer.frod_V)]
        projections[category] = (layer.frod_V[adapter_name], layer.frod_s_indices[adapter_name])
        base = layer.get_base_layer()
        entries.append(_PeftLayerData(
            name, base, _base_weight_on(base, layer.fan_in_fan_out), layer.frod_U[adapter_name],
            layer.frod_lambda_l[adapter_name], layer.frod_lambda_s_values[adapter_name], category,
        ))
    if not entries:
        raise ValueError(f"adapter {adapter_name!r} has no FRoD layer")
    layers = _build_frod_layers(entries, projections, config, mode)
    if len(tuner.peft_config) > 1:
        tuner.set_adapter(adapter_name)
    model = tuner.unload()
    for name, layer in layers.items():
        replace_module(model, name, layer)
    return model


_PREFIX = "base_model.model."
_PROJECTIONS = ("frod_V", "frod_s_indices", "frod_s_size")


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a PEFT adapter directory")
    config = json.loads(cfg_file.read_text())
    if config.get("peft_type") != "FROD":
        raise ValueError(f"{adapter_dir} holds a {config.get('peft_type')} adapter, not FROD")
    st, pt = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return config, load_file(str(st))
    if pt.is_file():
        return config, torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{adapter_dir} has neither adapter_model.safetensors nor adapter_model.bin")


def from_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike, mode: str = "factored") -> nn.Module:
    """Load a PEFT FRoD adapter directory into a bare base model as our ``FRoDLinear`` layers (no PEFT needed).

    The adapter must have been saved with ``save_projection=True`` (PEFT's default): V and Ω come from
    the file; U and λ₀ are recomputed from ``model``'s weights as PEFT does on load (``peft_u_lambda``).
    Other tensors of the adapter (biases with ``bias="all"``, ``modules_to_save`` weights) are
    copied into the model's parameters of the same name. Returns ``model``, changed in place; δ, s
    and those copied parameters are trainable, the rest keeps its ``requires_grad``.
    """
    adapter_dir = Path(adapter_dir)
    config, tensors = _read_adapter(adapter_dir)
    if not any(k.startswith("base_model.frod_V.") for k in tensors):
        raise ValueError(
            f"{adapter_dir} was saved with save_projection=False: it holds no V or Ω, which PEFT regenerates "
            f"from the base model; load it with peft.PeftModel.from_pretrained and convert with to_frod_layers"
        )
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    projections, layers, other = {}, {}, {}
    for key, t in tensors.items():
        head, _, last = key.rpartition(".")
        if head.startswith("base_model.") and head.split(".")[1] in _PROJECTIONS:
            kind = head.split(".")[1]
            projections.setdefault(last, {})[kind] = t
        elif key.startswith(_PREFIX) and last in ("frod_lambda_l", "frod_lambda_s_values"):
            layers.setdefault(head[len(_PREFIX):], {})[last] = t
        elif key.startswith(_PREFIX):
            other[key[len(_PREFIX):].replace(".base_layer.", ".")] = t
        else:
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} in a FRoD adapter")
    entries = []
    for name, params in sorted(layers.items()):
        try:
            base = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the adapter has a FRoD layer {name!r} that the model does not have") from exc
        if isinstance(base, FRoDLinear) or not hasattr(base, "weight"):
            raise TypeError(f"{name!r} is a {type(base).__name__}; expected the base model's nn.Linear or Conv1D")
        entries.append(_PeftLayerData(name, base, _base_weight_on(base, fan_in_fan_out), None,
                                      params["frod_lambda_l"], params["frod_lambda_s_values"], peft_category(name)))
    state = dict(model.named_parameters())
    for name, t in other.items():  # first: the FRoD layers built below share the base biases' storage
        if name not in state or state[name].shape != t.shape:
            raise ValueError(f"the adapter holds {name!r} {tuple(t.shape)}, which the model has not (or not so shaped)")
        with torch.no_grad():
            state[name].copy_(t)
        state[name].requires_grad_(True)
    proj = {cat: (p["frod_V"], p["frod_s_indices"]) for cat, p in projections.items()}
    for name, layer in _build_frod_layers(entries, proj, config, mode).items():
        replace_module(model, name, layer)
    return model
