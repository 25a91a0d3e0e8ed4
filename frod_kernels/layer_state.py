"""A ``FRoDLinear``'s execution state, each kind with its own rules: the W' slot, the basis gate,
and the provenance of the base weight.

None of these objects computes FRoD maths; the layer hands them keys and builders. The layer has
exactly one method that invalidates them (``FRoDLinear._invalidate``).

Keys. A key says "these tensors hold the values they held when the key was taken": the storage
pointer and version counter of each tensor, plus the process-wide count of optimizer steps.
Version counters see every autograd-visible in-place write (``copy_``, ``add_`` under no_grad,
``load_state_dict``), but PyTorch's fused optimizers (``AdamW(fused=True)``, the HF Trainer's
default ``adamw_torch_fused``) write parameters without bumping them; every optimizer derived from
``torch.optim.Optimizer`` runs the global step hooks, so counting steps there closes that gap.
Writes through ``.data`` bypass both; ``FRoDLinear.clear_weight_cache()`` is for those.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .pattern import SparsePattern
from .reference import error_tolerance, relative_error

__all__ = ["BaseProvenance", "BasisGate", "BasisMeasurement", "WeightCache", "basis_path_error", "converts_to_empty",
           "state_key"]


# ``nn.Module.to_empty`` converts with a lambda that allocates without copying: its code objects.
_TO_EMPTY_CODE = tuple(c for c in nn.Module.to_empty.__code__.co_consts if hasattr(c, "co_code"))


def converts_to_empty(fn) -> bool:
    """Whether ``fn``, given to ``Module._apply``, is ``to_empty``'s: it keeps no values."""
    return getattr(fn, "__code__", None) in _TO_EMPTY_CODE


class _OptimizerSteps:
    """The number of optimizer steps taken in this process (any ``torch.optim.Optimizer``)."""

    count = 0

    @classmethod
    def hook(cls, optimizer, args, kwargs) -> None:
        cls.count += 1


register_optimizer_step_post_hook(_OptimizerSteps.hook)


def state_key(tensors: Sequence[torch.Tensor]) -> tuple:
    """(optimizer steps, then the storage pointer and version counter of each tensor): equal keys mean
    equal values (module docstring). A flat tuple of ints: unmerged decoding takes one key per layer per
    token, and in a model's forward each extra read of a tensor's metadata is a cache miss. A dtype or
    device change allocates new storage through ``Module._apply``, which drops the cache anyway."""
    key = [_OptimizerSteps.count]
    for t in tensors:
        key += (t.data_ptr(), t._version)
    return tuple(key)


class WeightCache:
    """One slot for one (o, n) W' per layer, and the use counting of the weight path's reuse.

    Two uses share the slot: evaluation (``eval_weight``: W' as ``merge`` builds it, so cached and
    merged outputs are identical) and training on the weight path (``training_slot``/``store``:
    the W' a call built is given to the next calls with the same key: gradient accumulation,
    activation checkpointing's recomputation). A training W' is kept only once reuse has been
    seen (a second call with the same key, or the previous key served more than one call), so
    plain training, where every step changes δ, holds no extra W' between steps. ``share`` is the
    part of a new build to charge the cost model: 1/r, r = calls per W' so far.
    """

    def __init__(self) -> None:
        self._slot: tuple[tuple, torch.Tensor] | None = None
        self._uses: tuple[tuple | None, int, int] = (None, 0, 1)  # (key, calls with it, calls per W' so far)

    def eval_weight(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached evaluation W' for ``key``, built with ``build()`` (under no_grad) when stale.

        A W' built under ``torch.inference_mode`` is an inference tensor, which autograd cannot
        save: outside inference mode it is rebuilt rather than handed to a recorded computation
        (a frozen layer whose input needs a gradient)."""
        key = ("eval", key)
        slot = self._slot
        if slot is not None and slot[0] == key and not (slot[1].is_inference()
                                                        and not torch.is_inference_mode_enabled()):
            return slot[1]
        self._slot = None  # a stale W' is freed before the new one is built
        with torch.no_grad():
            weight = build()
        self._slot = (key, weight)
        return weight

    def training_slot(self, key: tuple) -> tuple[torch.Tensor | None, float, bool]:
        """(the W' to reuse or None, share of a new build to charge, whether to ``store`` a W' built now)."""
        key = ("train", key)
        last, calls, per_build = self._uses
        if key == last:
            calls += 1
        else:  # the previous key's W' served ``calls`` calls
            calls, per_build = 1, max(calls, 1) if last else 1
        self._uses = (key, calls, per_build)
        slot = self._slot
        if slot is not None and slot[0] == key:
            return slot[1], 0.0, False
        self._slot = None  # stale: freed before the op builds the new one
        return None, 1.0 / per_build, calls > 1 or per_build > 1

    def store(self, key: tuple, weight: torch.Tensor) -> None:
        """Keep the W' a training call built for ``key`` (after ``training_slot`` said to keep it)."""
        self._slot = (("train", key), weight)

    @property
    def weight(self) -> torch.Tensor | None:
        """The W' held now (for inspection), or None."""
        return None if self._slot is None else self._slot[1]

    def drop(self) -> None:
        """Free the slot; the use counting stays (it describes the training loop, not the values)."""
        self._slot = None


@dataclass(frozen=True)
class BasisMeasurement:
    """The basis path's error in one dtype, measured on weights with key ``weight_key``."""

    deviation: float
    tolerance: float
    weight_key: tuple

    @property
    def within_tolerance(self) -> bool:
        return self.deviation <= self.tolerance


_PROBE_ROWS = 64


@functools.lru_cache(maxsize=8)
def _probe(n: int) -> torch.Tensor:
    """The fixed probe X of ``basis_path_error`` (64 × n, standard normal from seed 0, float64, CPU):
    drawn once per n, shared by every layer's measurement, never written."""
    with torch.inference_mode(False):  # a normal tensor, whatever mode the first measurement runs in
        return torch.randn(_PROBE_ROWS, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                           device="cpu")


def basis_path_error(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, lam: torch.Tensor,
                     pattern: SparsePattern, dtype: torch.dtype) -> tuple[float, float]:
    """(deviation, tolerance) of computing x·Wᵀ as x·(U·diag(λ)·Vᵀ)ᵀ the basis path's way in ``dtype``.

    On a fixed probe X (64 rows, standard normal, rounded to ``dtype``), relative to x·Wᵀ in float64
    (max|·| / max|y₆₄|): deviation = the basis path's error; tolerance = ``reference.error_tolerance``
    of plain ``F.linear``'s error in ``dtype``: the package's error criterion.

    The basis path at δ = 0 and s = 0 (a layer as built) is the inference fold of
    ``ops._token_forward`` with M = diag(λ) + S, S = 0: Y = (X·(M·Vᵀ)ᵀ)·Uᵀ with M·Vᵀ = diag(λ)·Vᵀ.
    It is computed here as those two GEMMs, without the fold's sparse product over Ω, whose zero
    values add nothing (``pattern`` is therefore not read); tests/test_decomposition.py checks that
    the deviation is the fold's, bit for bit.
    """
    x = _probe(weight.shape[1]).to(device=U.device, dtype=dtype)
    with torch.autocast(x.device.type, enabled=False):  # measured in ``dtype``, whatever the caller's autocast
        exact = x.double() @ weight.double().mT
        plain = torch.nn.functional.linear(x, weight.to(dtype))
        m_vt = V.to(dtype).t() * lam.to(dtype).unsqueeze(1)  # M·Vᵀ = diag(λ)·Vᵀ
        basis = torch.mm(torch.mm(x, m_vt.t()), U.to(dtype).t())
    return relative_error(basis, exact), error_tolerance(relative_error(plain, exact), dtype)


class BasisGate:
    """Per compute dtype, whether the basis path may stand in for the exact one (``FRoDLinear``).

    ``measure`` measures once per dtype and again when the base weight's key changes; a compiled
    forward cannot measure, so ``allows_compiled`` uses the last measurement and says no without
    one (the call then stays exact)."""

    def __init__(self) -> None:
        self._by_dtype: dict[torch.dtype, BasisMeasurement] = {}

    def measure(self, dtype: torch.dtype, weight_key: tuple,
                compute: Callable[[], tuple[float, float]]) -> BasisMeasurement:
        """The measurement for ``dtype`` on weights with ``weight_key``; ``compute()`` gives
        (deviation, tolerance) when there is none yet for that key."""
        found = self._by_dtype.get(dtype)
        if found is None or found.weight_key != weight_key:
            found = self._by_dtype[dtype] = BasisMeasurement(*compute(), weight_key)
        return found

    def last(self, dtype: torch.dtype) -> BasisMeasurement | None:
        """The last measurement in ``dtype``, whatever weights it was taken on."""
        return self._by_dtype.get(dtype)

    def allows(self, dtype: torch.dtype, weight_key: tuple, compute: Callable[[], tuple[float, float]]) -> bool:
        """Whether the basis path may stand in for the exact one in ``dtype`` on weights with key
        ``weight_key``: their measurement (``measure``; ``compute()`` when there is none for that key)
        is within tolerance. Asked on every training call: while the measurement is valid, one dict
        lookup and one comparison of keys."""
        found = self._by_dtype.get(dtype)
        if found is None or found.weight_key != weight_key:
            found = self.measure(dtype, weight_key, compute)
        return found.within_tolerance

    def allows_compiled(self, dtype: torch.dtype) -> bool:
        """``allows`` for a compiled forward, which cannot measure: the last measurement in ``dtype``
        decides, and without one (a layer drops them on loads, ``.to()`` and ``clear_weight_cache()``)
        the call stays exact."""
        last = self._by_dtype.get(dtype)
        return last is not None and last.within_tolerance

    def dtypes(self) -> set[torch.dtype]:
        return set(self._by_dtype)

    def reset(self) -> None:
        self._by_dtype.clear()


class BaseProvenance:
    """Whether a layer's base W still holds the weights its basis was computed from, possibly cast,
    and whether the tensors derived from them (U, λ, V) hold values at all.

    The basis is a function of W: a cast keeps that relation up to rounding (an adapter saved after
    ``model.to(bfloat16)`` is still an adapter of the same base), a load of other values breaks it.
    The record is the key of W when it was last known to be the original; ``carry`` moves it over a
    cast, merge or unmerge; any other change to W makes ``is_original`` false. After ``to("meta")``
    or ``to_empty`` the derived tensors hold nothing (``lose_derived``) until the basis is rebuilt
    from real weights (``load_frod``) and ``restore`` is called.
    """

    def __init__(self, weight: torch.Tensor | None) -> None:
        self._key = self._key_of(weight)
        self.derived_valid = True

    @staticmethod
    def _key_of(weight: torch.Tensor | None) -> tuple | None:
        return None if weight is None else (weight.data_ptr(), weight._version, weight.dtype)

    def is_original(self, weight: torch.Tensor | None) -> bool:
        """W is the original (or a cast of it); always true without a W (factored: the basis is the record)."""
        return weight is None or (self._key is not None and self._key == self._key_of(weight))

    def carry(self, was_original: bool, weight: torch.Tensor | None) -> None:
        """After a change that keeps W's values (cast, device move, merge/unmerge): W is the original
        now if it was before."""
        self._key = self._key_of(weight) if was_original else None

    def lose_derived(self) -> None:
        self._key, self.derived_valid = None, False

    def restore(self, weight: torch.Tensor | None) -> None:
        """The basis was rebuilt from ``weight``: it is the original again."""
        self._key, self.derived_valid = self._key_of(weight), True
