"""The comparison layers of ``frod_kernels.bench.baselines`` compute what they claim (float64, tight tolerances)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.decompose_bench import published_joint_decompose
from frod_kernels import joint_decompose
from frod_kernels.bench.baselines import (
    LoRALinear,
    NaiveDenseFRoDLinear,
    PublishedFRoDLinear,
    dense_linear,
    lora_rank_for_budget,
    peft_available,
    peft_frod_layer,
)
from frod_kernels.reference import frod_linear_reference

from _problems import frod_layer

F64 = torch.float64


def _grads(module: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(gy)
    return [y.detach(), x.grad, module.delta.grad, module.sparse_values.grad]


@pytest.mark.parametrize("cls", [PublishedFRoDLinear, NaiveDenseFRoDLinear])
@pytest.mark.parametrize("o,n", [(48, 64), (64, 37)])
def test_frod_baselines_match_reference(cls, o, n):
    layer = frod_layer(o, n, rate=0.05, seed=0, dtype=F64)
    x = torch.randn(3, 5, n, dtype=F64)
    gy = torch.randn(3, 5, o, dtype=F64)
    baseline = cls(layer)
    delta = layer.delta.detach().clone().requires_grad_()
    values = layer.sparse_values.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    basis = layer.basis
    ref = frod_linear_reference(xr, layer.weight, layer.bias, layer.U, basis.V, delta, basis.indices, values)
    ref.backward(gy)
    expected = [ref.detach(), xr.grad, delta.grad, values.grad]
    for got, want in zip(_grads(baseline, x, gy), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # and the same function as our layer
    torch.testing.assert_close(layer(x), ref.detach(), rtol=1e-10, atol=1e-10)


def test_baselines_share_frozen_tensors_and_copy_trainables():
    layer = frod_layer(16, 16, rate=0.05, seed=0, dtype=F64)
    pub = PublishedFRoDLinear(layer)
    assert pub.weight is layer.weight and pub.U is layer.U
    assert pub.delta is not layer.delta and torch.equal(pub.delta, layer.delta)
    assert {n for n, p in pub.named_parameters() if p.requires_grad} == {"delta", "sparse_values"}


def test_lora_init_is_base_and_formula():
    base = torch.nn.Linear(20, 12, dtype=F64)
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(7, 20, dtype=F64)
    torch.testing.assert_close(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ lora.lora_A.T) @ lora.lora_B.T
    torch.testing.assert_close(lora(x), expected)
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 4 * (20 + 12)


def test_lora_rank_for_budget_and_dense():
    assert lora_rank_for_budget(1024, 1024, 1024 + 10485) == 6
    assert lora_rank_for_budget(8, 8, 1) == 1
    assert lora_rank_for_budget(8, 4, 10**9) == 4
    lin = dense_linear(6, 5)
    assert sum(p.numel() for p in lin.parameters() if p.requires_grad) == 35


def test_published_decomposition_reconstructs():
    torch.manual_seed(0)
    ws = [torch.randn(24, 16, dtype=F64) for _ in range(3)]
    pub = published_joint_decompose(ws)
    ours = joint_decompose(ws)
    assert pub.errors == [] and max(ours.errors) < 1e-12
    assert pub.V.dtype == torch.float32 and len(pub.U) == 3
    for w, u, lam in zip(ws, pub.U, pub.lam, strict=True):
        torch.testing.assert_close((u * lam) @ pub.V.mT, w.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not peft_available(), reason="peft with FrodConfig not installed")
def test_peft_wrapper_is_the_replacement_form():
    torch.manual_seed(0)
    model = peft_frod_layer(torch.nn.Linear(32, 40, dtype=F64), sparse_rate=0.05)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.frod_lambda_s_values["default"].normal_()
    x = torch.randn(6, 32, dtype=F64)
    ref = frod_linear_reference(
        x, None, layer.base_layer.bias, layer.frod_U["default"], layer.frod_V["default"],
        layer.frod_lambda_l["default"], layer.frod_s_indices["default"], layer.frod_lambda_s_values["default"],
    )
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
