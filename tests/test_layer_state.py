"""The execution-state objects of ``frod_kernels.layer_state`` on their own, without a FRoD layer:
the state keys, the W' slot, the basis gate and the base weight's provenance."""

from __future__ import annotations

import torch

from frod_kernels.layer_state import BaseProvenance, BasisGate, BasisMeasurement, WeightCache, state_key


def _param() -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    p.grad = torch.ones_like(p)
    return p


# -- state_key ---------------------------------------------------------------------------------


def test_state_key_is_stable_between_reads():
    a, b = torch.randn(3), torch.randn(2, 2)
    key = state_key([a, b])
    torch.cat([a, (b @ b).flatten()])  # reads do not change the key
    assert state_key([a, b]) == key


def test_state_key_changes_on_an_in_place_write():
    a, b = torch.randn(3), torch.randn(2, 2)
    key = state_key([a, b])
    b.add_(1.0)
    assert state_key([a, b]) != key


def test_state_key_changes_on_a_fused_optimizer_step():
    p = _param()
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    key, version = state_key([p]), p._version
    opt.step()
    assert p._version == version  # the fused step writes p without bumping its version ...
    assert state_key([p]) != key  # ... the optimizer step hook changes the key all the same


def test_state_key_changes_on_a_plain_optimizer_step():
    p = _param()
    opt = torch.optim.SGD([p], lr=0.1)
    key = state_key([p])
    opt.step()
    assert state_key([p]) != key


# -- WeightCache: evaluation -------------------------------------------------------------------


class _Builder:
    """A ``build`` for WeightCache that records each call: whether the slot was empty, whether grad was on."""

    def __init__(self, cache: WeightCache) -> None:
        self.cache = cache
        self.calls: list[tuple[bool, bool]] = []

    def __call__(self) -> torch.Tensor:
        self.calls.append((self.cache.weight is None, torch.is_grad_enabled()))
        return torch.full((2, 2), float(len(self.calls)))


def test_eval_weight_builds_once_per_key_and_frees_the_stale_one_first():
    cache = WeightCache()
    build = _Builder(cache)
    first = cache.eval_weight(("k", 1), build)
    assert cache.eval_weight(("k", 1), build) is first and cache.weight is first
    assert build.calls == [(True, False)]  # built under no_grad
    second = cache.eval_weight(("k", 2), build)
    assert build.calls == [(True, False), (True, False)]  # the rebuild saw an empty slot
    assert second is not first and cache.weight is second
    assert cache.eval_weight(("k", 2), build) is second and len(build.calls) == 2


def test_eval_weight_rebuilds_an_inference_tensor_only_outside_inference_mode():
    cache = WeightCache()
    build = _Builder(cache)
    with torch.inference_mode():
        inferred = cache.eval_weight(("k", 1), build)
        assert cache.eval_weight(("k", 1), build) is inferred
    assert inferred.is_inference() and len(build.calls) == 1
    outside = cache.eval_weight(("k", 1), build)
    assert not outside.is_inference() and len(build.calls) == 2
    assert cache.eval_weight(("k", 1), build) is outside and len(build.calls) == 2


def test_eval_weight_is_not_given_to_training():
    cache = WeightCache()
    evaluated = cache.eval_weight(("k", 1), _Builder(cache))
    assert cache.weight is evaluated
    assert cache.training_slot(("k", 1)) == (None, 1.0, False)
    assert cache.weight is None


# -- WeightCache: training ---------------------------------------------------------------------


def test_training_slot_keeps_once_reuse_is_seen_and_gives_the_stored_weight():
    cache, key, w = WeightCache(), ("k", 1), torch.ones(2, 2)
    assert cache.training_slot(key) == (None, 1.0, False)  # the first call: nothing to reuse, nothing to keep
    assert cache.training_slot(key) == (None, 1.0, True)  # a second call with the same key: keep
    cache.store(key, w)
    given, share, keep = cache.training_slot(key)
    assert given is w and (share, keep) == (0.0, False)
    assert cache.weight is w


def test_training_slot_charges_a_new_key_one_over_the_calls_per_weight():
    cache, w = WeightCache(), torch.ones(2, 2)
    for _ in range(3):
        cache.training_slot(("k", 1))
    cache.store(("k", 1), w)
    assert cache.training_slot(("k", 2)) == (None, 1 / 3, True)
    assert cache.weight is None  # the stale W' is freed before the new one is built
    assert cache.training_slot(("k", 2)) == (None, 1 / 3, True)
    assert cache.training_slot(("k", 3)) == (None, 1 / 2, True)


def test_drop_empties_the_slot_and_keeps_the_counting():
    cache, key = WeightCache(), ("k", 1)
    cache.training_slot(key)
    cache.training_slot(key)
    cache.store(key, torch.ones(2, 2))
    cache.drop()
    assert cache.weight is None
    assert cache.training_slot(key) == (None, 1.0, True)  # third call with this key: still counted
    assert cache.training_slot(("k", 2)) == (None, 1 / 3, True)


# -- BasisGate ---------------------------------------------------------------------------------


def test_basis_measurement_within_tolerance():
    assert BasisMeasurement(0.5, 1.0, ()).within_tolerance
    assert BasisMeasurement(1.0, 1.0, ()).within_tolerance
    assert not BasisMeasurement(1.5, 1.0, ()).within_tolerance


def test_basis_gate_measures_once_per_dtype_and_weight_key():
    gate, calls = BasisGate(), []

    def compute() -> tuple[float, float]:
        calls.append(1)
        return float(len(calls)), 2.0

    first = gate.measure(torch.float32, ("w", 1), compute)
    assert first == BasisMeasurement(1.0, 2.0, ("w", 1))
    assert gate.measure(torch.float32, ("w", 1), compute) is first and len(calls) == 1
    again = gate.measure(torch.float32, ("w", 2), compute)
    assert again == BasisMeasurement(2.0, 2.0, ("w", 2))
    other = gate.measure(torch.bfloat16, ("w", 2), compute)
    assert other.deviation == 3.0 and len(calls) == 3
    assert gate.last(torch.float32) is again and gate.last(torch.bfloat16) is other
    assert gate.last(torch.float16) is None
    assert gate.dtypes() == {torch.float32, torch.bfloat16}
    gate.reset()
    assert gate.dtypes() == set() and gate.last(torch.float32) is None
    gate.measure(torch.float32, ("w", 2), compute)
    assert len(calls) == 4


def test_basis_gate_allows_within_tolerance_and_compiled_only_after_a_measurement():
    gate, asked = BasisGate(), []

    def deviation(dtype: torch.dtype, found: float):
        def compute() -> tuple[float, float]:
            asked.append(dtype)
            return found, 1.0
        return compute

    f32, bf16 = deviation(torch.float32, 0.5), deviation(torch.bfloat16, 2.0)
    assert not gate.allows_compiled(torch.float32) and not asked  # compiled: nothing measured yet, no
    assert gate.allows(torch.float32, ("w", 1), f32) and asked == [torch.float32]
    assert gate.allows(torch.float32, ("w", 1), f32) and len(asked) == 1  # measured once per key
    assert gate.allows_compiled(torch.float32) and len(asked) == 1  # compiled: the last measurement
    assert not gate.allows(torch.bfloat16, ("w", 1), bf16)
    assert not gate.allows_compiled(torch.bfloat16)
    assert gate.allows(torch.float32, ("w", 2), f32) and len(asked) == 3  # W changed: measured again


# -- BaseProvenance ----------------------------------------------------------------------------


def test_provenance_is_original_until_an_in_place_write():
    w = torch.randn(3, 4)
    record = BaseProvenance(w)
    assert record.is_original(w) and record.derived_valid
    assert record.is_original(None)  # factored: no W, the basis is the record
    assert not record.is_original(w.clone())
    w.add_(1.0)
    assert not record.is_original(w)


def test_provenance_without_a_weight_knows_no_tensor():
    record = BaseProvenance(None)
    assert record.is_original(None) and not record.is_original(torch.randn(3, 4))


def test_provenance_carry_over_a_cast():
    w = torch.randn(3, 4)
    record = BaseProvenance(w)
    cast = w.double()
    assert not record.is_original(cast)
    record.carry(record.is_original(w), cast)
    assert record.is_original(cast)
    record.carry(False, cast)
    assert not record.is_original(cast)
    record.carry(record.is_original(cast), w)  # once lost, a carry does not bring it back
    assert not record.is_original(w)


def test_provenance_lose_derived_and_restore():
    w = torch.randn(3, 4)
    record = BaseProvenance(w)
    record.lose_derived()
    assert not record.derived_valid and not record.is_original(w)
    record.restore(w)
    assert record.derived_valid and record.is_original(w)
