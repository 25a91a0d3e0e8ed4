"""The four ways to compute a layer (docs/design.md §5): token, weight, weight with W' reused, basis.

The basis path against the reference (values and gradients, every input layout), its deviation
gate and ``exact``; W' reuse in training (bit-identical to rebuilding, every invalidation,
gradient accumulation, activation checkpointing, torch.compile); the dispatcher's choices.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import frod_kernels as fk
from frod_kernels import ops
from frod_kernels.dispatch import choose_path, path_costs
from frod_kernels.functional import frod_linear, frod_linear_reusing
from frod_kernels.layer import REUSED_WEIGHT
from frod_kernels.reference import frod_linear_reference

from _problems import frod_layer


def _reference(layer: fk.FRoDLinear, x: torch.Tensor) -> torch.Tensor:
    """The additive layer's formula in float64 (W itself, not its decomposition)."""
    return frod_linear_reference(
        x.double(), layer.weight.double(), layer.bias.double(), layer.U.double(), layer.basis.V.double(),
        layer.delta.double(), layer.basis.indices, layer.sparse_values.double(),
    )


def _grads(fn, layer: fk.FRoDLinear, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    params = [layer.delta, layer.sparse_values, layer.bias]
    layer.bias.requires_grad_(True)
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    grads = torch.autograd.grad(y, [x, *params], gy)
    layer.bias.requires_grad_(False)
    return [y.detach(), *grads]


def _basis_call(layer: fk.FRoDLinear, dtype: torch.dtype):
    def fn(x):
        return frod_linear(x, layer.weight.to(dtype), layer.bias.to(dtype), layer.U.to(dtype),
                           layer.basis.V.to(dtype), layer.delta, layer.basis.pattern, layer.sparse_values,
                           path="basis", lam=layer.lam.to(dtype))
    return fn


def _ref_call(layer: fk.FRoDLinear):
    def fn(x):
        return frod_linear_reference(x, layer.weight.double(), layer.bias.double(), layer.U.double(),
                                     layer.basis.V.double(), layer.delta, layer.basis.indices, layer.sparse_values)
    return fn


# -- the basis path --------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(5,), (2, 3), "non-contiguous"])
@pytest.mark.parametrize("o,n", [(7, 10), (13, 5)])
def test_basis_path_matches_reference(lead, o, n):
    layer = frod_layer(o, n)
    g = torch.Generator().manual_seed(3)
    if lead == "non-contiguous":
        x = torch.randn(n, 6, generator=g).t()
        assert not x.is_contiguous()
    else:
        x = torch.randn(*lead, n, generator=g)
    gy = torch.randn(*x.shape[:-1], o, generator=g)
    got = _grads(_basis_call(layer, torch.float32), layer, x, gy)
    layer.double()
    want = _grads(_ref_call(layer), layer, x.double(), gy.double())
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


def test_basis_path_without_bias_and_gradcheck():
    layer = frod_layer(dtype=torch.float64)
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    delta = layer.delta.detach().clone().requires_grad_()
    values = layer.sparse_values.detach().clone().requires_grad_()

    def fn(x, delta, values):
        return frod_linear(x, layer.weight, None, layer.U, layer.basis.V, delta, layer.basis.pattern, values,
                           path="basis", lam=layer.lam)

    assert torch.autograd.gradcheck(fn, (x, delta, values))
    ref = frod_linear_reference(x, layer.weight, None, layer.U, layer.basis.V, delta, layer.basis.indices, values)
    torch.testing.assert_close(fn(x, delta, values), ref, rtol=1e-12, atol=1e-12)


def test_basis_path_needs_lam_and_weight():
    layer = frod_layer()
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="path='basis' needs"):
        frod_linear(x, layer.weight, None, layer.U, layer.basis.V, layer.delta, layer.basis.pattern,
                    layer.sparse_values, path="basis")
    with pytest.raises(ValueError, match="lam is for additive layers"):
        frod_linear(x, None, None, layer.U, layer.basis.V, layer.delta, layer.basis.pattern, layer.sparse_values,
                    lam=layer.lam)
    with pytest.raises(ValueError, match=r"lam has shape \(9,\)"):
        frod_linear(x, layer.weight, None, layer.U, layer.basis.V, layer.delta, layer.basis.pattern,
                    layer.sparse_values, lam=layer.lam[:9])


def _up_projection(**kw) -> tuple[fk.FRoDLinear, torch.Tensor]:
    """A shape where the basis path is the cheapest in training (o = 4n, few rows)."""
    torch.manual_seed(0)
    layer = fk.FRoDLinear.from_linear(nn.Linear(16, 64), sparse_rate=0.05, seed=1, **kw)
    return layer, torch.randn(3, 16)


def test_auto_takes_the_basis_path_within_tolerance():
    layer, x = _up_projection()
    deviation, tolerance = layer.basis_deviation()
    assert 0 < deviation <= tolerance
    y = layer(x)
    assert layer.last_path == "basis"
    base = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, base, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y, base)  # the decomposition's rounding: why exact=True exists


def test_exact_layers_are_bit_exact_at_init():
    layer, x = _up_projection(exact=True)
    y = layer(x)
    assert layer.last_path == "token"
    assert torch.equal(y, nn.functional.linear(x, layer.weight, layer.bias))
    layer.path = "basis"
    with pytest.raises(ValueError, match="exact=True"):
        layer(x)


def test_deviation_outside_tolerance_keeps_auto_exact(monkeypatch):
    layer, x = _up_projection()
    monkeypatch.setattr("frod_kernels.layer.basis_path_error", lambda *args: (1e-3, 1e-6))  # a poor basis
    layer.clear_weight_cache()
    layer(x)
    assert layer.last_path == "token"
    layer.path = "basis"  # forced: the caller's choice
    layer(x)
    assert layer.last_path == "basis"


def test_changed_base_weight_fails_the_gate():
    """U·diag(λ)·Vᵀ reproduces W only as it was decomposed: after W changes, the basis path would
    compute another function, so the gate measures again and refuses it."""
    layer, x = _up_projection()
    layer(x)
    assert layer.last_path == "basis"
    with torch.no_grad():
        layer.weight.add_(0.05)
    y = layer(x)
    assert layer.last_path == "token"
    deviation, tolerance = layer.basis_deviation()
    assert deviation > 100 * tolerance
    torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_basis_deviation_float64_and_factored():
    layer = frod_layer(dtype=torch.float64)
    deviation, tolerance = layer.basis_deviation()
    assert deviation < 1e-13 and tolerance == 16 * torch.finfo(torch.float64).eps
    assert frod_layer(mode="factored").basis_deviation() == (0.0, float("inf"))
    layer.float()
    assert layer._gate.dtypes() == {torch.float32}  # .to() measures again, for the new dtype


def test_summary_reports_the_basis_deviation():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))

    summary = fk.apply_frod(model(), ["0", "2"], sparse_rate=0.1)
    (cat,) = summary.categories.values()
    assert 0 < cat["basis_ratio"] <= 1 and cat["basis_layers"] == 2
    assert "basis dev/tol" in str(summary) and "(2/2 ok)" in str(summary)
    exact = fk.apply_frod(model(), ["0", "2"], sparse_rate=0.1, exact=True)
    assert next(iter(exact.categories.values()))["basis_ratio"] == "exact"
    factored = fk.apply_frod(model(), ["0", "2"], sparse_rate=0.1, mode="factored")
    assert next(iter(factored.categories.values()))["basis_ratio"] == "factored"
    net = model()
    fk.apply_frod(net, ["0", "2"], sparse_rate=0.1, exact=True)
    assert all(layer.exact for layer in fk.frod_layers(net).values())


# -- W' reuse in training ----------------------------------------------------------------------------


def _count_builds(monkeypatch) -> list:
    calls = []
    real = ops._rotated_weight
    monkeypatch.setattr(ops, "_rotated_weight", lambda *a: calls.append(1) or real(*a))
    return calls


def _step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    y.backward(gy)
    return y.detach()


def test_reused_weight_is_bit_identical(monkeypatch):
    builds = _count_builds(monkeypatch)
    layer, fresh = frod_layer(path="weight"), frod_layer(path="weight")
    fresh.cache_weight = False
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, 10, generator=g) for _ in range(3)]
    gys = [torch.randn(6, 7, generator=g) for _ in range(3)]
    for x, gy in zip(xs, gys, strict=True):  # three micro-batches, δ and s unchanged
        assert torch.equal(_step(layer, x, gy), _step(fresh, x, gy))
    assert layer.last_path == REUSED_WEIGHT and fresh.last_path == "weight"
    # the caching layer built W' for the first two calls (kept once a second call showed reuse),
    # the other one every call
    assert len(builds) == 2 + 3
    assert torch.equal(layer.delta.grad, fresh.delta.grad)
    assert torch.equal(layer.sparse_values.grad, fresh.sparse_values.grad)
    torch.testing.assert_close(_step(layer, xs[0], gys[0]).double(), _reference(layer, xs[0]), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("change", ["delta", "sparse_values", "weight", "optimizer", "load", "to", "merge",
                                    "clear"])
def test_every_change_rebuilds_in_training(monkeypatch, change):
    layer = frod_layer(path="weight")
    x, gy = torch.randn(6, 10), torch.randn(6, 7)
    _step(layer, x, gy)
    builds = _count_builds(monkeypatch)
    with torch.no_grad():
        if change == "delta":
            layer.delta.add_(0.1)
        elif change == "sparse_values":
            layer.sparse_values.mul_(2.0)
        elif change == "weight":
            layer.weight.add_(0.01)
        elif change == "optimizer":
            torch.optim.SGD([layer.delta, layer.sparse_values], lr=0.1).step()
        elif change == "load":
            layer.load_state_dict({k: v + 0.05 for k, v in layer.state_dict().items()})
        elif change == "to":
            layer.double().float()
        elif change == "merge":
            layer.merge()
            layer.unmerge()
        else:
            layer.clear_weight_cache()
    y = _step(layer, x, gy)
    assert len(builds) == 1 and layer.last_path == "weight"
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_matches_one_big_batch():
    layer, fresh = frod_layer(path="weight"), frod_layer(path="weight")
    fresh.cache_weight = False
    opt = torch.optim.SGD([layer.delta, layer.sparse_values], lr=0.05)
    opt_fresh = torch.optim.SGD([fresh.delta, fresh.sparse_values], lr=0.05)
    g = torch.Generator().manual_seed(6)
    for _ in range(3):  # steps of 4 micro-batches
        for m in (layer, fresh):
            m.zero_grad()
        for _ in range(4):
            x, target = torch.randn(5, 10, generator=g), torch.randn(5, 7, generator=g)
            for m in (layer, fresh):
                (nn.functional.mse_loss(m(x), target) / 4).backward()
        assert layer.last_path == REUSED_WEIGHT
        opt.step()
        opt_fresh.step()
    assert torch.equal(layer.delta, fresh.delta) and torch.equal(layer.sparse_values, fresh.sparse_values)


def test_reuse_estimate_lets_accumulation_choose_the_weight_path():
    """A shape where one call alone prefers the token path but four calls per W' prefer weight."""
    o = n = 96
    rows = 52  # between the crossovers 1.25·d/3 (W' shared by 4 calls) and 2d/3 (built per call)
    shape = {"n_rows": rows, "out_features": o, "in_features": n, "k": int(0.01 * n * n)}
    assert choose_path("auto", **shape) == "token"
    assert choose_path("auto", **shape, weight_share=0.25) == "weight"
    torch.manual_seed(0)
    layer = fk.FRoDLinear.from_linear(nn.Linear(n, o), sparse_rate=0.01, exact=True)
    x, gy = torch.randn(rows, n, requires_grad=True), torch.randn(rows, o)
    taken = []
    for _ in range(3):
        for _ in range(4):
            _step(layer, x, gy)
            taken.append(layer.last_path)
        with torch.no_grad():
            layer.delta.add_(1e-3)
    assert taken[:4] == ["token"] * 4  # nothing known yet about reuse
    assert taken[4:] == ["weight", REUSED_WEIGHT, REUSED_WEIGHT, REUSED_WEIGHT] * 2


def test_plain_training_keeps_no_weight_between_steps():
    """Every step changes δ: no reuse is seen, so no W' is held between steps."""
    layer = frod_layer(path="weight")
    opt = torch.optim.SGD([layer.delta, layer.sparse_values], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 10)).square().sum().backward()
        opt.step()
        assert layer._cache.weight is None and layer.last_path == "weight"


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches(reentrant):
    """Recomputation in the backward (and reentrant checkpointing's no-grad first pass, which takes
    the evaluation cache) gives the gradients of an uncheckpointed, uncached layer."""
    torch.manual_seed(0)
    pre = nn.Linear(10, 10)
    layer, fresh = frod_layer(path="weight"), frod_layer(path="weight")
    fresh.cache_weight = False
    x = torch.randn(4, 10, requires_grad=True)
    gy = torch.randn(4, 7)
    for _ in range(2):  # the second step reuses what the first one cached
        checkpoint(nn.Sequential(pre, nn.Tanh(), layer), x, use_reentrant=reentrant).backward(gy)
    dx = x.grad.clone()
    x.grad = None
    for _ in range(2):
        nn.Sequential(pre, nn.Tanh(), fresh)(x).backward(gy)
    torch.testing.assert_close(dx, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.delta.grad, fresh.delta.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.sparse_values.grad, fresh.sparse_values.grad, rtol=1e-6, atol=1e-6)


def test_compiled_training_does_not_cache():
    layer = frod_layer(path="weight")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 10)
    compiled(x).sum().backward()
    assert layer._cache.weight is None and layer.delta.grad is not None


def test_autocast_keys_the_reused_weight_by_compute_dtype():
    layer = frod_layer(path="weight")
    x, gy = torch.randn(4, 10), torch.randn(4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        layer(x)
        layer(x)
    assert y.dtype == torch.bfloat16 and layer.last_path == REUSED_WEIGHT
    assert layer._cache.weight.dtype == torch.bfloat16
    _step(layer, x, gy)  # float32 now: a new W'
    assert layer.last_path == "weight" and layer._cache.weight.dtype == torch.float32


def test_reusing_entry_point_checks_the_given_weight():
    layer = frod_layer()
    x = torch.randn(3, 10)
    args = (x, layer.weight, None, layer.U, layer.basis.V, layer.delta, layer.basis.pattern, layer.sparse_values)
    with pytest.raises(ValueError, match=r"rotated_weight has shape \(7, 9\)"):
        frod_linear_reusing(*args, path="weight", rotated_weight=torch.zeros(7, 9))
    y, path, built = frod_linear_reusing(*args, path="weight")
    assert path == "weight" and built.shape == (7, 10) and not built.requires_grad
    y2, _, again = frod_linear_reusing(*args, path="weight", rotated_weight=built)
    assert again is None and torch.equal(y, y2)


# -- the dispatcher ----------------------------------------------------------------------------------


def test_path_costs_four_ways():
    up = {"n_rows": 512, "out_features": 1536, "in_features": 384, "k": 1474}
    costs = path_costs(**up, basis=True)
    assert set(costs) == {"token", "weight", "basis"}
    assert costs["basis"] < costs["token"] and costs["basis"] < costs["weight"]
    assert "basis" not in path_costs(**up) and "basis" not in path_costs(**up, additive=False, basis=True)
    assert choose_path("auto", **up, basis=True) == "basis"
    down = {"n_rows": 2048, "out_features": 384, "in_features": 1536, "k": 23592}
    assert choose_path("auto", **down, basis=True) == "weight"
    reused = path_costs(**down, weight_share=0.0)["weight"]
    assert reused < path_costs(**down)["weight"]
    # only the parameter gradients pay for H: x-only training no longer counts it
    x_only = path_costs(**down, needs_param_grad=False)["weight"]
    assert x_only == pytest.approx(384 * 1536 * 1536 + 8 * 384 * (1536 + 23592) + 2 * 2048 * 384 * 1536)


def test_ties_go_to_the_exact_paths():
    shape = {"n_rows": 64, "out_features": 32, "in_features": 32, "k": 10}
    costs = path_costs(**shape, basis=True)
    assert choose_path("auto", **shape, basis=True) == min(costs, key=lambda p: (costs[p], p == "basis"))


def test_compiled_calls_use_the_measurement_taken_eagerly():
    """A compiled forward cannot measure: .to() and loads measure at once, so it still may take the
    basis path; after clear_weight_cache() it stays exact until an eager call measures again."""
    layer, x = _up_projection()
    layer.double().float()
    assert torch.float32 in layer._gate.dtypes()  # measured by .to(), not by a forward
    layer.load_state_dict(layer.state_dict())
    assert torch.float32 in layer._gate.dtypes()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    layer.clear_weight_cache()
    assert not layer._gate.dtypes()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x),
                               nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
