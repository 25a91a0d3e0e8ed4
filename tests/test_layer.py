"""FRoDLinear: drop-in behaviour, exactness at init, merge/unmerge, basis sharing."""

import pytest
import torch
from torch import nn

from frod_kernels import FRoDLinear, joint_decompose
from frod_kernels.reference import frod_linear_reference

from _problems import randomise_frod


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(23, 17), (17, 23), (32, 32)])
def test_exact_at_init_and_drop_in(bias, shape):
    torch.manual_seed(1)
    lin = nn.Linear(shape[1], shape[0], bias=bias)
    layer = FRoDLinear.from_linear(lin, sparse_rate=0.05)
    assert (layer.in_features, layer.out_features) == (lin.in_features, lin.out_features)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()  # shared storage, no copy
    assert (layer.bias is None) == (lin.bias is None)
    for x in (torch.randn(9, shape[1]), torch.randn(2, 5, shape[1]), torch.randn(5, 2, shape[1]).transpose(0, 1)):
        for path in ("token", "weight"):
            layer.path = path
            assert torch.equal(layer(x), lin(x))


def test_trainable_parameters_and_buffers():
    lin = nn.Linear(40, 30)
    layer = FRoDLinear.from_linear(lin, sparse_rate=0.02)
    trainable = {name: p.numel() for name, p in layer.named_parameters() if p.requires_grad}
    k = int(0.02 * 40 * 40)
    assert trainable == {"delta": 40, "sparse_values": k} and layer.num_trainable() == 40 + k
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    buffers = dict(layer.named_buffers())
    assert {"U", "lam", "basis.V", "basis.indices"} <= set(buffers)
    # Derived tensors are recomputed from the base weights, never stored in a state dict.
    assert set(layer.state_dict()) == {"weight", "bias", "delta", "sparse_values"}
    layer.bias.requires_grad_(True)
    layer(torch.randn(3, 40)).sum().backward()
    assert layer.bias.grad is not None and layer.weight.grad is None


def test_repr_shows_shape_k_and_rate():
    layer = FRoDLinear.from_linear(nn.Linear(50, 20), sparse_rate=0.01, seed=3)
    text = repr(layer)
    for part in ("in_features=50", "out_features=20", "k=25", "sparse_rate=0.01"):
        assert part in text


@pytest.mark.parametrize("path", ["token", "weight"])
def test_forward_matches_reference_with_random_delta(path):
    torch.manual_seed(2)
    lin = nn.Linear(19, 21).double()
    layer = FRoDLinear.from_linear(lin, sparse_rate=0.1, path=path)
    randomise_frod(layer, 0.3)
    x = torch.randn(4, 3, 19, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = frod_linear_reference(
        x, lin.weight, lin.bias, layer.U, layer.basis.V, layer.delta, layer.basis.indices, layer.sparse_values
    )
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.effective_weight(), lin.weight + layer.delta_weight(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_unmerge_round_trip(dtype):
    torch.manual_seed(3)
    lin = nn.Linear(24, 16).to(dtype)
    original = lin.weight.detach().clone()
    layer = FRoDLinear.from_linear(lin, sparse_rate=0.1)
    randomise_frod(layer, 0.3)
    x = torch.randn(7, 24, dtype=dtype)
    before = layer(x)
    layer.merge()
    assert layer.merged and "merged" in repr(layer)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(layer(x), before, rtol=tol, atol=tol)
    assert not torch.equal(layer.weight, original)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original)  # bit for bit
    assert torch.equal(layer(x), before)


def test_merge_safe_refuses_non_finite():
    layer = FRoDLinear.from_linear(nn.Linear(8, 8), sparse_rate=0.1)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.delta[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite|NaN"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, original)


def test_to_linear():
    torch.manual_seed(4)
    lin = nn.Linear(12, 9)
    layer = FRoDLinear.from_linear(lin, sparse_rate=0.2)
    randomise_frod(layer, 0.3)
    x = torch.randn(5, 12)
    merged = layer.to_linear(merge=True)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), layer(x), rtol=2e-5, atol=2e-5)
    assert torch.equal(layer.to_linear(merge=False).weight, lin.weight)


def test_shared_basis_from_joint_decomposition():
    torch.manual_seed(5)
    lins = [nn.Linear(16, 16) for _ in range(3)]
    jb = joint_decompose([m.weight for m in lins])
    first = FRoDLinear.from_linear(lins[0], basis=(jb.U[0], jb.V, jb.lam[0]), sparse_rate=0.1)
    others = [
        FRoDLinear.from_linear(m, basis=(u, jb.V, lam), shared=first.basis)
        for m, u, lam in zip(lins[1:], jb.U[1:], jb.lam[1:], strict=True)
    ]
    model = nn.Sequential(first, *others)
    assert all(layer.basis is first.basis for layer in others)
    assert sum(1 for name, _ in model.named_buffers() if name.endswith("basis.V")) == 1
    model.double()
    assert all(layer.basis.V.dtype == torch.float64 for layer in model)  # still shared after .to()
    assert all(layer.basis is first.basis for layer in others)
    x = torch.randn(4, 16, dtype=torch.float64)
    for layer, lin in zip(model, lins, strict=True):
        torch.testing.assert_close(layer(x), lin.double()(x), rtol=1e-12, atol=1e-12)


def test_backend_and_path_attributes_are_checked():
    layer = FRoDLinear.from_linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="path"):
        layer.path = "diagonal"
    with pytest.raises(ValueError, match="backend"):
        layer.backend = "cuda"
    with pytest.raises(TypeError, match="nn.Linear"):
        FRoDLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="sparse_rate"):
        FRoDLinear.from_linear(nn.Linear(4, 4), sparse_rate=1.0)
