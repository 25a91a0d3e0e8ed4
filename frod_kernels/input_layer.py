"""``FRoDInputLinear``: FRoD in the input form, wrapping the frozen base layer as it is (docs/design.md §6.1).

    y = base(x̃),   x̃ = x + ((x·V)·Mᵀ·Λ⁺)·V⁻¹,   M = diag(δ) + S

which is x·W'ᵀ + b with W' = W + U·M·Vᵀ, because U = W·V⁻ᵀ·Λ⁻¹ (§2, step 6): δ and s mean what
they mean in the other modes, so an adapter moves between them. No U is stored: per layer λ (n),
per category V and V⁻¹ (n × n), and the base, untouched: ``nn.Linear``, transformers ``Conv1D``,
or a bitsandbytes 4-bit layer (QLoRA's base), whose weights stay quantized (``base_layers``).

The λ guard: direction j of a layer is disabled (λ⁺_j = 0, so δ_j and the s_j of row j do nothing)
where λ_j ≤ τ·max λ, τ = min(√eps, 1e-2) of the layer's dtype: there W·V⁻ᵀ·Λ⁻¹ would turn a
rounding of x̃ into more than √eps of the output. Ordinary joint categories disable none (smallest
λ_j/max λ 0.067 on MiniLM and SmolLM2); a category of one layer with o < n has n − o directions
with λ ≈ 0, where only additive or factored FRoD can add rank (``apply_frod`` warns).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base_layers import (
    check_wrappable,
    dense_weight,
    dequantize,
    keep_layout,
    quantization,
    requantize,
    stored_tensors,
)
from .basis import FRoDBasis
from .functional import frod_input_transform
from .layer import MERGED, FRoDLayer
from .layer_checkpoint import MERGED_MARKER, frod_entries_of_merged
from .layer_state import WeightCache, converts_to_empty, state_key
from .reference import rotation_matrix

__all__ = ["CACHED_TRANSFORM", "INPUT", "FRoDInputLinear", "guard_threshold"]

# How a call was computed (``last_path``) in the input form: the transform by the custom op, or by the
# cached n × n matrix (evaluation).
INPUT = "input"
CACHED_TRANSFORM = "input, cached transform"


def guard_threshold(dtype: torch.dtype) -> float:
    """τ of the λ guard (module docstring): min(√eps, 1e-2) of ``dtype``."""
    return min(math.sqrt(torch.finfo(dtype).eps), 1e-2)


def _guarded_pinv(lam: torch.Tensor) -> torch.Tensor:
    """Λ⁺: 1/λ_j where λ_j > τ·max λ, else 0 (in λ's dtype)."""
    keep = lam > guard_threshold(lam.dtype) * lam.max()
    return torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))


class FRoDInputLinear(FRoDLayer):
    """y = base(x + ((x·V)·Mᵀ·Λ⁺)·V⁻¹); build it with ``apply_frod(..., mode="input")`` or directly.

    ``base_layer`` is the wrapped module (frozen, never copied); ``weight`` and ``bias`` are its own
    (for a 4-bit base, the packed ``Params4bit``). ``in_features``/``out_features``, ``mode``
    ("input"), ``quantization`` (None, "nf4", "fp4"), ``disabled`` (directions the λ guard turned
    off), ``merged``, ``last_path`` and ``base_class`` (what ``unload_frod(merge=True)`` gives:
    the base's class, ``nn.Linear`` for a quantized base, whose merged weight is float).

    State dict: the base's entries under ``base_layer.`` (PEFT's habit), δ and s. Plain checkpoints
    of the architecture (``weight``/``bias`` at the layer's name) and merged FRoD checkpoints load
    too (``export``). Merging writes W' into a float base's weight; a quantized base cannot hold W'
    without rounding the update away, so ``merge`` refuses it unless asked to requantize
    (``lossy=True``, which reports what it lost), and the exports (``unload_frod``,
    ``merged_state_dict``, ``save_pretrained``) write float W' instead.
    """

    def __init__(
        self, base: nn.Module, lam: torch.Tensor, basis: FRoDBasis, backend: str = "auto", path: str = "auto",
        param_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_wrappable(base)
        if basis.V_inv is None:
            raise ValueError("the input form needs the basis's V⁻¹ (joint_decompose(..., inverse=True))")
        o, n = dense_shape = tuple(dense_weight(base).shape)
        if tuple(lam.shape) != (n,) or basis.n != n:
            raise ValueError(f"basis does not fit a {dense_shape} weight: lam {tuple(lam.shape)}, V ({basis.n}, "
                             f"{basis.n})")
        self.in_features, self.out_features, self.mode = n, o, "input"
        self.backend, self.path = backend, path
        self.quantization = quantization(base)
        self.base_class: type[nn.Module] = nn.Linear if self.quantization else type(base)
        self._values_lost = False
        self.cache_weight = True  # evaluation reuses T (``transform_matrix``) while δ, s and the basis are unchanged
        self._cache = WeightCache()
        keep_layout(base)
        self.base_layer = base
        V = basis.V
        self.register_buffer("lam", lam.detach().to(device=V.device, dtype=V.dtype), persistent=False)
        self.register_buffer("lam_pinv", _guarded_pinv(self.lam), persistent=False)
        self._init_trainable(n, basis, param_dtype or V.dtype, V.device)

    # -- what the base is ----------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def base_weight(self) -> torch.Tensor:
        """W (o, n) as floating-point values (dequantized for a quantized base), whether merged or not."""
        if not self.merged:
            return dense_weight(self.base_layer)
        w = self._unmerged_weight
        if self.quantization is not None:
            return dequantize(w)
        return w if self.base_class is nn.Linear else w.t()

    def fingerprint_tensors(self) -> list[torch.Tensor]:
        """The base as stored (a quantized base: its packed bytes and quantization state), merged or not."""
        if not self.merged:
            return stored_tensors(self.base_layer)
        if self.quantization is not None:
            return stored_tensors(self.base_layer, self._unmerged_weight)
        return [self.base_weight]

    @property
    def disabled(self) -> int:
        """How many directions the λ guard turned off (module docstring)."""
        return int((self.lam_pinv == 0).sum())

    @property
    def basis_valid(self) -> bool:
        return not self._values_lost

    @property
    def base_is_original(self) -> bool:
        return not self._values_lost

    @torch.no_grad()
    def rebuild_basis(self, U: torch.Tensor | None, lam: torch.Tensor) -> None:
        """Install λ recomputed from the base (``load_frod`` after ``to_empty``; the caller sets the category's V
        and V⁻¹). U is not kept in the input form."""
        self.lam = lam.detach().to(device=self.lam.device, dtype=self.lam.dtype)
        self.lam_pinv = _guarded_pinv(self.lam)
        self._values_lost = False
        self._cache.drop()

    def require_basis(self) -> None:
        if self._values_lost:
            raise RuntimeError(
                "this FRoDInputLinear's basis (λ, V, V⁻¹) holds no values: the model went through to('meta') or "
                "to_empty(). Load the base weights, then apply FRoD again and load the adapter (load_frod)"
            )

    # -- the maths ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """merged → the base; evaluation → x + x·Tᵀ with the cached T; else the transform by the custom op."""
        self.require_basis()
        params = self._parameters
        if self.merged:
            self.__dict__["last_path"] = MERGED
            return self.base_layer(x)
        training = torch.is_grad_enabled() and (params["delta"].requires_grad or params["sparse_values"].requires_grad)
        if self.cache_weight and not training and not torch.compiler.is_compiling() and self._is_plain_input(x):
            self.__dict__["last_path"] = CACHED_TRANSFORM
            transform = self._cache.eval_weight(self._state_key(), self.transform_matrix)
            return self.base_layer(x + nn.functional.linear(x, transform))
        basis = self._modules["basis"]
        x_tilde = frod_input_transform(x, basis.V, basis.V_inv, self.lam_pinv, params["delta"], basis.pattern,
                                       params["sparse_values"], self.backend, self.path)
        self.__dict__["last_path"] = INPUT
        return self.base_layer(x_tilde)

    def _is_plain_input(self, x: torch.Tensor) -> bool:
        """x can meet the cached T in a plain product: V's dtype and device, last dim n (anything else goes to
        ``frod_input_transform``, which names the problem)."""
        V = self._modules["basis"]._buffers["V"]
        return (isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] == self.in_features and x.dtype == V.dtype
                and x.device == V.device)

    def _state_key(self) -> tuple:
        """The key of δ, s, V, V⁻¹ and Λ⁺ now (``layer_state.state_key``), read from the module's dicts."""
        params, basis = self._parameters, self._modules["basis"]._buffers
        return state_key((params["delta"], params["sparse_values"], basis["V"], basis["V_inv"],
                          self._buffers["lam_pinv"]))

    def _transform(self, delta: torch.Tensor, sparse_values: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """T = V⁻ᵀ·Λ⁺·M·Vᵀ (n, n) in ``acc``: x̃ = x + x·Tᵀ and W' = W·(I + T) (docs/design.md §6.1)."""
        basis = self.basis
        m = rotation_matrix(delta.to(acc), basis.indices, sparse_values.to(acc)) * self.lam_pinv.to(acc)[:, None]
        return basis.V_inv.to(acc).mT @ m @ basis.V.to(acc).mT

    def transform_matrix(self) -> torch.Tensor:
        """T = V⁻ᵀ·Λ⁺·M·Vᵀ (n, n) with the layer's δ and s, formed in the accumulation dtype and rounded once
        to V's dtype: what evaluation caches (x̃ = x + x·Tᵀ); zero at initialisation, so x̃ = x exactly."""
        self.require_basis()
        return self._transform(self.delta, self.sparse_values, self._accumulation_dtype()).to(self.basis.V.dtype)

    def clear_weight_cache(self) -> None:
        """Drop the cached T; needed only after writes that bypass version counters and optimizers (``.data``)."""
        self._cache.drop()

    def _rotated(self, delta: torch.Tensor, sparse_values: torch.Tensor, with_base: bool) -> torch.Tensor:
        """W·(I + T) (``with_base``) or ΔW = W·T, T = V⁻ᵀ·Λ⁺·M·Vᵀ (ΔW = U·M·Vᵀ on the directions the guard
        keeps), formed in the accumulation dtype and rounded once to W's dtype (W dequantized for a quantized
        base)."""
        self.require_basis()
        acc, base = self._accumulation_dtype(), self.base_weight
        w = base.to(acc)
        w_delta = w @ self._transform(delta, sparse_values, acc)
        return (w + w_delta if with_base else w_delta).to(base.dtype)

    # -- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, safe: bool = True, lossy: bool = False) -> float | None:
        """Write W' into the base's weight; ``unmerge()`` restores the original bit for bit.

        A float base takes W' as it is (returns None). A quantized base cannot hold W' exactly: merging is
        refused (ValueError, nothing changes) unless ``lossy``, which requantizes W' in the base's own
        format (dequantize → add → requantize, as PEFT merges LoRA into a bitsandbytes layer) and returns
        the error that made, ‖Q(W') − W'‖_F / ‖ΔW‖_F: the share of the update lost (often above 1, since
        a 4-bit step is larger than most of ΔW's entries; the float exports keep all of it). With
        ``safe`` a non-finite W' is refused.
        """
        if self.merged:
            return None
        if self.quantization is not None and not lossy:
            requantizable = isinstance(self.base_layer.weight, nn.Parameter) and hasattr(self.base_layer.weight,
                                                                                           "quant_state")
            raise ValueError(
                f"merge refused: the base is quantized ({self.quantization}) and cannot hold W' without rounding "
                f"the update away. Export float weights instead (unload_frod(model, merge=True), "
                f"merged_state_dict(model) or model.save_pretrained(dir))"
                + (", or requantize with merge(lossy=True), which reports what it lost" if requantizable else "")
            )
        w_eff = self._weight_to_merge(safe)
        weight, error = self.base_layer.weight, None
        if self.quantization is None:
            self._unmerged_weight = weight.data
            weight.data = w_eff if self.base_class is nn.Linear else w_eff.t().contiguous()
        else:
            requantized = requantize(weight, w_eff, self.base_layer)
            update = (w_eff.double() - dense_weight(self.base_layer).double()).norm()
            error = float((dequantize(requantized).double() - w_eff.double()).norm() / update.clamp_min(1e-300))
            self._unmerged_weight = weight  # the Params4bit itself, put back by unmerge
            self.base_layer.weight = requantized
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: the original weight (its object, or a quantized base's own ``Params4bit``) comes back
        untouched."""
        if not self.merged:
            return
        if self.quantization is None:
            self.base_layer.weight.data = self._unmerged_weight
        else:
            self.base_layer.weight = self._unmerged_weight
        self._unmerged_weight = None
        self.merged = False

    def _linear_weight(self, merge: bool) -> torch.Tensor:
        """``to_linear``'s float weight: W' (``merge``) or W (dequantized for a quantized base)."""
        return self.effective_weight() if merge else self.base_weight.detach().clone()

    # -- conversions and state dicts ------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._cache.drop()  # T was for the old dtype and device
        if self.lam.device.type == "meta" or converts_to_empty(fn):
            self._values_lost = True
        self.lam_pinv = _guarded_pinv(self.lam)  # τ follows the dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        merged = self.merged
        self.unmerge()
        base_prefix = prefix + "base_layer."
        own = [key for key in state_dict if key.startswith(prefix) and not key.startswith(base_prefix)]
        if prefix + MERGED_MARKER in state_dict:
            entries = frod_entries_of_merged(
                state_dict, prefix, shape=(self.out_features, self.in_features),
                transposed=self.base_class is not nn.Linear, base=None, merged_weight_of=self._merged_weight_of,
                error_msgs=error_msgs,
            )
            for key in own:
                del state_dict[key]
            # δ and s of the checkpoint (its own on a mismatch: the layer stays as it was); the base keeps its weights.
            state_dict[prefix + "delta"] = entries.get(prefix + "delta", self.delta)
            state_dict[prefix + "sparse_values"] = entries.get(prefix + "sparse_values", self.sparse_values)
            for name, tensor in self.base_layer.named_parameters(recurse=False):
                state_dict[base_prefix + name] = tensor
        else:  # a plain checkpoint of the architecture: its weight and bias are the base's
            for key in own:
                rest = key[len(prefix):]
                if rest.split(".")[0] in ("weight", "bias"):
                    state_dict[base_prefix + rest] = state_dict.pop(key)
        if self.quantization is not None:
            self._take_quantization_state(state_dict, base_prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if merged:
            self.merge(lossy=True)  # a quantized base was merged lossily, a float one exactly: as before

    def _take_quantization_state(self, state_dict, base_prefix: str, error_msgs: list[str]) -> None:
        """Remove a quantized base's quantization-state entries (``weight.absmax``, …: bitsandbytes writes them but
        its layers do not load them) after checking they are this base's own; a packed weight of another
        quantized base cannot be loaded into it."""
        own = self.base_layer.state_dict(prefix=base_prefix, keep_vars=True)
        for key in [k for k in state_dict if k.startswith(base_prefix + "weight.")]:
            value, mine = state_dict.pop(key), own.get(key)
            if not (isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor) and value.shape == mine.shape
                    and torch.equal(value.to(mine.device), mine)):
                error_msgs.append(f"{base_prefix[:-1]}: {key[len(base_prefix):]} differs from this quantized base's: "
                                  f"a checkpoint of another quantized base cannot be loaded into it")

    def _kind_repr(self) -> str:
        base = type(self.base_layer).__name__ + (f"({self.quantization})" if self.quantization else "")
        return f"mode=input, base={base}, disabled={self.disabled}"
