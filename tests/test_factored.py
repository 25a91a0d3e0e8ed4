"""Factored mode (docs/design.md §6): W is dropped and the layer computes with U·(diag(λ+δ) + S)·Vᵀ.

Checked here at the layer level: the maths against the reference, the agreement with additive
mode for the same δ and s (δ means the same in both), the frozen memory, the ``weight`` stand-in,
merge/unmerge/to_linear, conversion and copying. Model-level use is in test_hf_models.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.factored_weight import FactoredWeight
from frod_kernels.reference import frod_linear_reference


def _pair(o: int = 12, n: int = 20, dtype=torch.float64, seed: int = 0) -> tuple[fk.FRoDLinear, fk.FRoDLinear]:
    """The same random δ, s in an additive and a factored layer over the same base linear."""
    torch.manual_seed(seed)
    lin = nn.Linear(n, o, dtype=dtype)
    add = fk.FRoDLinear.from_linear(lin, sparse_rate=0.1)
    fac = fk.FRoDLinear.from_linear(lin, sparse_rate=0.1, mode="factored")
    with torch.no_grad():
        add.delta.normal_(0.0, 0.3)
        add.sparse_values.normal_(0.0, 0.3)
        fac.delta.copy_(add.delta)
        fac.sparse_values.copy_(add.sparse_values)
    return add, fac


@pytest.mark.parametrize("path", ["token", "weight"])
def test_factored_matches_reference(path):
    _, fac = _pair()
    fac.path = path
    x = torch.randn(3, 4, 20, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 4, 12, dtype=torch.float64)
    y = fac(x)
    grads = torch.autograd.grad(y, (x, fac.delta, fac.sparse_values), dy)
    delta = fac.delta.detach().requires_grad_()
    values = fac.sparse_values.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    y_ref = frod_linear_reference(xr, None, fac.bias, fac.U, fac.basis.V, fac.lam + delta, fac.basis.indices, values)
    ref_grads = torch.autograd.grad(y_ref, (xr, delta, values), dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["token", "weight"])
def test_same_function_as_additive(path):
    add, fac = _pair()
    add.path = fac.path = path
    x = torch.randn(7, 20, dtype=torch.float64)
    torch.testing.assert_close(fac(x), add(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fac.effective_weight(), add.effective_weight(), rtol=1e-10, atol=1e-10)
    # and the same gradients for δ and s: dM does not depend on the mode
    for layer in (add, fac):
        layer(x).square().sum().backward()
    torch.testing.assert_close(fac.delta.grad, add.delta.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fac.sparse_values.grad, add.sparse_values.grad, rtol=1e-9, atol=1e-9)


def _frozen_bytes(layer: fk.FRoDLinear) -> int:
    return sum(t.nbytes for t in (*layer.buffers(), *layer.parameters()) if not t.requires_grad)


def test_frozen_memory_drops_the_base_weight():
    add, fac = _pair(o=64, n=48, dtype=torch.float32)
    assert _frozen_bytes(add) - _frozen_bytes(fac) == 64 * 48 * 4  # exactly W
    assert "weight" not in dict(fac.named_parameters())
    assert list(fac.state_dict()) == ["bias", "delta", "sparse_values"]  # U, λ, V are non-persistent
    assert list(add.state_dict()) == ["weight", "bias", "delta", "sparse_values"]


def test_weight_stand_in():
    _, fac = _pair(dtype=torch.float32)
    w = fac.weight
    assert isinstance(w, FactoredWeight)
    assert (w.shape, w.size(), w.size(0), w.dim(), w.ndim) == ((12, 20), (12, 20), 12, 2, 2)
    assert (w.dtype, w.device, w.requires_grad) == (torch.float32, torch.device("cpu"), False)
    assert "FactoredWeight(shape=(12, 20)" in repr(w)
    fac.double()
    assert fac.weight.dtype == torch.float64  # follows the layer's buffers
    with pytest.raises(TypeError, match="stores no weight tensor"):
        torch.add(fac.weight, 1)


def test_merge_unmerge_and_to_linear():
    add, fac = _pair()
    x = torch.randn(5, 20, dtype=torch.float64)
    y = fac(x)
    fac.merge()
    assert fac.merged and isinstance(fac.weight, nn.Parameter) and not fac.weight.requires_grad
    assert "weight" not in fac.state_dict()  # a state dict means (b, δ, s) merged or not
    torch.testing.assert_close(fac(x), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fac.to_linear(merge=True).weight, fac.weight, rtol=0, atol=0)
    fac.merge()  # idempotent
    fac.unmerge()
    assert not fac.merged and isinstance(fac.weight, FactoredWeight) and "weight" not in fac.state_dict()
    torch.testing.assert_close(fac(x), y, rtol=0, atol=0)
    # to_linear(merge=False) rebuilds the base weight as U·diag(λ)·Vᵀ
    base = add.to_linear(merge=False).weight
    torch.testing.assert_close(fac.to_linear(merge=False).weight, base, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fac.to_linear(merge=True).weight, base)


def test_deepcopy_and_conversion():
    _, fac = _pair()
    clone = copy.deepcopy(fac)
    x = torch.randn(4, 20, dtype=torch.float64)
    torch.testing.assert_close(clone(x), fac(x), rtol=0, atol=0)
    assert isinstance(clone.weight, FactoredWeight)
    low = clone.float()
    assert low.U.dtype == low.basis.V.dtype == low.delta.dtype == torch.float32
    torch.testing.assert_close(low(x.float()), fac(x).float(), rtol=1e-4, atol=1e-5)


def test_reconstruction_error_at_init_is_reported():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(32, 32) for _ in range(3)])
    x = torch.randn(5, 32)
    y = net(x)
    summary = fk.apply_frod(net, r"\d", sparse_rate=0.05, mode="factored")
    err = summary.categories["*"]["max_error"]
    assert 0 < err < 1e-12  # float64 decomposition, relative Frobenius error
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)  # fp32 rounding of U, V
