"""The W' cache of an unmerged FRoDLinear in evaluation: reused while nothing changed, rebuilt
after any change of δ, s or W, cleared by .to(), merge/unmerge and loads, off on request."""

from __future__ import annotations

import pytest
import torch

import frod_kernels as fk
from frod_kernels.reference import frod_linear_reference

from _problems import frod_layer

X = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(1))


def _expected(layer: fk.FRoDLinear) -> torch.Tensor:
    with torch.no_grad():
        base = layer.base_weight
        diag = layer._diag()
        return frod_linear_reference(X.double(), None if base is None else base.double(), layer.bias.double(),
                                     layer.U.double(), layer.basis.V.double(), diag.double(), layer.basis.indices,
                                     layer.sparse_values.double()).float()


def _builds(layer: fk.FRoDLinear, monkeypatch) -> list:
    calls = []
    real = fk.FRoDLinear.effective_weight
    monkeypatch.setattr(fk.FRoDLinear, "effective_weight", lambda self: calls.append(1) or real(self))
    return calls


@pytest.mark.parametrize("mode", ["additive", "factored"])
def test_cache_is_reused_and_exact(monkeypatch, mode):
    layer = frod_layer(mode=mode)
    builds = _builds(layer, monkeypatch)
    with torch.no_grad():
        y1, y2 = layer(X), layer(X[:1])
    assert len(builds) == 1
    torch.testing.assert_close(y1, _expected(layer), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, y1[:1], rtol=0, atol=0)
    fk.merge_frod(layer)
    with torch.no_grad():
        merged = layer(X)
    assert torch.equal(merged, y1)  # cached and merged: the same W', bit for bit
    fk.unmerge_frod(layer)


def test_every_change_rebuilds(monkeypatch):
    layer = frod_layer()
    builds = _builds(layer, monkeypatch)
    opt = torch.optim.SGD([layer.delta, layer.sparse_values], lr=0.1)
    layer.eval()
    with torch.no_grad():
        layer(X)
    steps = [
        lambda: layer.delta.add_(0.1),
        lambda: layer.sparse_values.mul_(2.0),
        lambda: layer.weight.add_(0.01),
        lambda: layer.load_state_dict({k: v + 0.05 for k, v in layer.state_dict().items()}),
    ]
    for i, change in enumerate(steps):
        with torch.no_grad():
            change()
            y = layer(X)
        assert len(builds) == i + 2
        torch.testing.assert_close(y, _expected(layer), rtol=1e-5, atol=1e-5)
    layer.train()  # an optimizer step in between (training calls do not use the cache)
    layer(X).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(X), _expected(layer), rtol=1e-5, atol=1e-5)
    layer.double()
    with torch.no_grad():
        assert layer(X.double()).dtype == torch.float64
    layer.delta.data.add_(1.0)  # bypasses version counters: documented, cleared by hand
    layer.clear_weight_cache()
    with torch.no_grad():
        torch.testing.assert_close(layer(X.double()).float(), _expected(layer.float()), rtol=1e-5, atol=1e-5)


def test_training_calls_and_disabled_cache_use_the_op(monkeypatch):
    layer = frod_layer()
    builds = _builds(layer, monkeypatch)
    y = layer(X)  # δ and s need gradients: the custom op, no cache
    assert y.requires_grad and not builds
    layer.cache_weight = False
    with torch.no_grad():
        torch.testing.assert_close(layer(X), _expected(layer), rtol=1e-5, atol=1e-5)
    assert not builds
    layer.cache_weight = True
    frozen = frod_layer()
    frozen.requires_grad_(False)
    x = X.clone().requires_grad_()
    frozen(x).sum().backward()  # a frozen adapter: cached W', gradient for x still right
    torch.testing.assert_close(x.grad, torch.ones(2, 3, 7) @ frozen.effective_weight(), rtol=1e-5, atol=1e-5)


def test_bad_input_still_named():
    layer = frod_layer()
    with torch.no_grad(), pytest.raises(ValueError, match="x has last dimension"):
        layer(torch.randn(3, 9))
    with torch.no_grad(), pytest.raises(TypeError, match="dtype torch.float32, but x has dtype torch.float64"):
        layer(torch.randn(3, 10, dtype=torch.float64))


def test_compiled_model_does_not_use_the_cache():
    layer = frod_layer()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        y = compiled(X)
    torch.testing.assert_close(y, _expected(layer), rtol=1e-5, atol=1e-5)
    assert layer._cache.weight is None


def test_accumulation_dtype():
    layer = frod_layer()
    assert layer._accumulation_dtype() == torch.float64  # CPU: float64, rounded once
    assert layer.to("meta")._accumulation_dtype() == torch.float32  # accelerators: float32 (fp64 is slow there)
    assert frod_layer().double().to("meta")._accumulation_dtype() == torch.float64
