"""Dtypes and autocast (docs/hardening.md §Dtypes).

Low-precision criterion: with e(y) = ‖y − y₆₄‖_F / ‖y₆₄‖_F against the float64 reference, our
error must be ≤ 2 × the error of the plain PyTorch computation of the same maths in the same
dtype (``frod_linear_reference`` on the rounded tensors) + a small atol. The same holds for dX,
dδ and ds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.reference import frod_linear_reference

from _problems import frod_layer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = [torch.bfloat16, torch.float16]
ATOL = {torch.bfloat16: 2e-4, torch.float16: 2e-5}  # small next to the errors themselves (~3e-3, ~4e-4)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - ref) / torch.linalg.norm(ref))


def _layer(mode: str = "additive", dtype=torch.float32, device="cpu", param_dtype=None) -> fk.FRoDLinear:
    return frod_layer(24, 40, rate=0.05, seed=0, dtype=dtype, device=device, mode=mode, param_dtype=param_dtype)


def _reference_grads(layer: fk.FRoDLinear, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype):
    """y, dx, dδ, ds of ``frod_linear_reference`` with every tensor in ``dtype`` (autograd)."""
    weight = layer.base_weight
    cast = [None if t is None else t.detach().to(dtype) for t in (weight, layer.bias, layer.U, layer.basis.V)]
    xd = x.detach().to(dtype).requires_grad_()
    delta = layer._diag().detach().to(dtype).requires_grad_()
    values = layer.sparse_values.detach().to(dtype).requires_grad_()
    y = frod_linear_reference(xd, cast[0], cast[1], cast[2], cast[3], delta, layer.basis.indices, values)
    grads = torch.autograd.grad(y, (xd, delta, values), dy.to(y.dtype))
    return (y, *grads)


def _ours(layer: fk.FRoDLinear, x: torch.Tensor, dy: torch.Tensor):
    xd = x.detach().requires_grad_()
    layer.delta.grad = layer.sparse_values.grad = None
    y = layer(xd)
    y.backward(dy.to(y.dtype))
    return y, xd.grad, layer.delta.grad, layer.sparse_values.grad


def _assert_within_twice_plain(ours, plain, exact, dtype):
    for name, a, p, e in zip(("y", "dx", "d_delta", "d_values"), ours, plain, exact, strict=False):
        err, base = _rel(a, e), _rel(p, e)
        assert err <= 2 * base + ATOL[dtype], f"{name}: error {err:.2e} > 2 x plain {base:.2e} + {ATOL[dtype]:.0e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["additive", "factored"])
@pytest.mark.parametrize("path", ["token", "weight"])
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_model(device, mode, path, dtype):
    layer64 = _layer(mode, torch.float64, device)
    layer = _layer(mode, dtype, device)
    layer.path = path
    x = torch.randn(3, 7, 40, dtype=torch.float64, device=device)
    dy = torch.randn(3, 7, 24, dtype=torch.float64, device=device)
    # The exact answer for the rounded layer: its own tensors, evaluated in float64.
    with torch.no_grad():
        for name in ("U", "lam"):
            getattr(layer64, name).copy_(getattr(layer, name))
        layer64.basis.V.copy_(layer.basis.V)
        for name in ("bias", "delta", "sparse_values") + (("weight",) if mode == "additive" else ()):
            getattr(layer64, name).copy_(getattr(layer, name))
    exact = _reference_grads(layer64, x.to(dtype), dy.to(dtype), torch.float64)
    plain = _reference_grads(layer, x, dy, dtype)
    ours = _ours(layer, x.to(dtype), dy)
    assert ours[0].dtype == dtype and layer.delta.grad.dtype == dtype
    _assert_within_twice_plain(ours, plain, exact, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["token", "weight"])
@pytest.mark.parametrize("dtype", LOW)
def test_fp32_masters_with_low_precision_model(device, path, dtype):
    layer = _layer("additive", dtype, device, param_dtype=torch.float32)
    layer.path = path
    assert layer.delta.dtype == layer.sparse_values.dtype == torch.float32
    y = layer(torch.randn(5, 40, device=device, dtype=dtype))
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert layer.delta.grad.dtype == layer.sparse_values.grad.dtype == torch.float32
    assert bool(layer.delta.grad.abs().sum() > 0) and bool(layer.sparse_values.grad.abs().sum() > 0)
    before = layer.delta.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=1e-4).step()  # an update far below bf16's resolution of δ ≈ 0.3
    assert not torch.equal(layer.delta, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["additive", "factored"])
@pytest.mark.parametrize("path", ["token", "weight", "merged"])
@pytest.mark.parametrize("amp", LOW)
def test_autocast_like_linear(device, mode, path, amp):
    layer = _layer(mode, torch.float32, device)
    dense = nn.Linear(40, 24, device=device)
    with torch.no_grad():
        dense.weight.copy_(layer.effective_weight())
        dense.bias.copy_(layer.bias)
    if path == "merged":
        layer.merge()
    else:
        layer.path = path
    x = torch.randn(6, 40, device=device)
    dy = torch.randn(6, 24, device=device, dtype=torch.float64)
    exact = _reference_grads(layer, x, dy, torch.float64)
    with torch.autocast(device, dtype=amp):
        assert layer(x).dtype == dense(x).dtype == amp
        plain = _reference_grads(layer, x, dy, torch.float32)  # fp32 tensors, autocast does the rest
        xd = x.clone().requires_grad_()
        y = layer(xd)
    y.backward(dy.to(y.dtype))
    if path == "merged":
        assert layer.delta.grad is None  # merged: a plain linear layer, δ and s are not in the graph
        _assert_within_twice_plain((y,), plain[:1], exact[:1], amp)
        return
    ours = (y, xd.grad, layer.delta.grad, layer.sparse_values.grad)
    assert layer.delta.grad.dtype == layer.sparse_values.grad.dtype == torch.float32  # fp32 params, fp32 grads
    _assert_within_twice_plain(ours, plain, exact, amp)


def test_autocast_leaves_float64_alone():
    """Autocast does not touch float64 (nn.Linear stays float64 too), so neither do we."""
    layer = _layer("additive", torch.float64)
    x = torch.randn(4, 40, dtype=torch.float64)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert nn.Linear(40, 3, dtype=torch.float64)(x).dtype == torch.float64
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=0.0, atol=0.0)


def test_autocast_disabled_region_is_plain_fp32():
    layer = _layer()
    x = torch.randn(4, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x), rtol=0.0, atol=0.0)


def test_float64_validation_is_tight():
    layer = _layer("additive", torch.float64)
    x = torch.randn(2, 5, 40, dtype=torch.float64)
    dy = torch.randn(2, 5, 24, dtype=torch.float64)
    for path in ("token", "weight"):
        layer.path = path
        ours = _ours(layer, x, dy)
        exact = _reference_grads(layer, x, dy, torch.float64)
        for a, e in zip(ours, exact, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", LOW)
def test_model_conversion_keeps_the_function(dtype):
    """``model.to(dtype)`` converts W, U, λ, V (the shared basis once) and δ, s together."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    fk.apply_frod(net, r"[02]", sparse_rate=0.05)
    layers = list(fk.frod_layers(net).values())
    assert layers[0].basis is layers[1].basis
    with torch.no_grad():
        for layer in layers:
            layer.delta.normal_(0.0, 0.3)
    x = torch.randn(6, 32)
    expected = net.double()(x.double())
    low = net.to(dtype)
    assert {t.dtype for t in low.state_dict().values()} == {dtype}
    assert layers[0].basis.V.dtype == layers[0].U.dtype == layers[0].lam.dtype == dtype
    assert low(x.to(dtype)).dtype == dtype
    err = _rel(low(x.to(dtype)), expected)
    assert err < 50 * torch.finfo(dtype).eps, err


def test_apply_frod_param_dtype_fp32_masters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).to(torch.bfloat16)
    fk.apply_frod(net, r"[02]", sparse_rate=0.1, param_dtype=torch.float32)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters() if not p.requires_grad)
    net(torch.randn(3, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_conversion_while_merged_converts_the_kept_weight():
    layer = _layer("additive", torch.float32)
    original = layer.weight.detach().clone()
    layer.merge()
    layer.double()
    layer.unmerge()
    assert layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, original.double())
