"""frod_linear (both paths, both backends) against the dense reference of docs/design.md §3."""

import pytest
import torch

from frod_kernels import FRoDLinear, frod_linear, ops
from frod_kernels.backends import torch_backend
from frod_kernels.decomposition import joint_decompose
from frod_kernels.pattern import SparsePattern, sample_sparse_pattern
from frod_kernels.reference import frod_linear_reference, rotation_matrix

from _problems import make_problem

BACKENDS = ["torch", "triton"]
PATHS = ["token", "weight"]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """2-D, 3-D, or a non-contiguous 3-D view of the same values."""
    if layout == "2d":
        return x.detach().reshape(-1, x.shape[-1]).requires_grad_()
    if layout == "3d":
        return x.detach().clone().requires_grad_()
    # Transposed storage: x[b, t, :] lives at a stride that is not contiguous.
    base = x.detach().transpose(0, 1).contiguous().transpose(0, 1)
    assert not base.is_contiguous()
    return base.requires_grad_()


def _grads(y, inputs, gy):
    return torch.autograd.grad(y, inputs, gy, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["2d", "3d", "strided"])
@pytest.mark.parametrize("additive", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("o,n", [(19, 13), (11, 17)])  # o < n: the weight path forms dM as Uᵀ·(G·V)
def test_forward_and_grads_match_reference_float64(backend, path, layout, additive, with_bias, o, n):
    p = make_problem((3, 7), o=o, n=n, rate=0.15, seed=hash((path, layout)) % 1000)
    x = _layout(p.x, layout)
    w = p.weight if additive else None
    b = p.bias.clone().requires_grad_() if with_bias else None
    y = frod_linear(x, w, b, p.U, p.V, p.delta, p.indices, p.values, backend=backend, path=path)
    ref = frod_linear_reference(x, w, b, p.U, p.V, p.delta, p.indices, p.values)
    assert y.shape == ref.shape == (*x.shape[:-1], o)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    inputs = [x, p.delta, p.values] + ([b] if with_bias else [])
    for got, want in zip(_grads(y, inputs, gy), _grads(ref, inputs, gy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["2d", "3d", "strided"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_basis_path_matches_the_additive_reference(backend, layout, with_bias, dtype, tol):
    """path='basis' computes the additive layer with W = U·diag(λ)·Vᵀ (a real decomposition of W)."""
    p = make_problem((3, 7), o=11, n=17, rate=0.15, seed=4)
    jb = joint_decompose([p.weight])
    U, V, lam = (t.to(dtype) for t in (jb.U[0], jb.V, jb.lam[0]))
    x = _layout(p.x.to(dtype), layout)
    delta, values = (t.detach().to(dtype).requires_grad_() for t in (p.delta, p.values))
    b = p.bias.to(dtype).requires_grad_() if with_bias else None
    y = frod_linear(x, p.weight.to(dtype), b, U, V, delta, p.indices, values, backend=backend, path="basis", lam=lam)
    ref = frod_linear_reference(x.double(), p.weight, None if b is None else b.double(), jb.U[0], jb.V,
                                delta.double(), p.indices, values.double())
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    gy = torch.randn_like(ref)
    inputs = [x, delta, values] + ([b] if with_bias else [])
    for got, want in zip(_grads(y, inputs, gy.to(dtype)), _grads(ref, inputs, gy), strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_grads_match_autograd_reference_float32(backend, path):
    p = make_problem((37,), o=41, n=29, rate=0.1, dtype=torch.float32, seed=3)
    b = p.bias.clone().requires_grad_()
    y = frod_linear(p.x, p.weight, b, p.U, p.V, p.delta, p.indices, p.values, backend=backend, path=path)
    ref = frod_linear_reference(p.x, p.weight, b, p.U, p.V, p.delta, p.indices, p.values)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    inputs = [p.x, p.delta, p.values, b]
    for got, want in zip(_grads(y, inputs, gy), _grads(ref, inputs, gy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("additive", [True, False])
def test_torch_paths_realistic_size(path, additive):
    p = make_problem((300,), o=200, n=256, rate=0.01, seed=11)
    w = p.weight if additive else None
    y = frod_linear(p.x, w, p.bias, p.U, p.V, p.delta, p.indices, p.values, backend="torch", path=path)
    ref = frod_linear_reference(p.x, w, p.bias, p.U, p.V, p.delta, p.indices, p.values)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    inputs = [p.x, p.delta, p.values]
    for got, want in zip(_grads(y, inputs, gy), _grads(ref, inputs, gy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "backend,path,shape",
    [("torch", "token", (4, 9, 7)), ("torch", "weight", (4, 9, 7)), ("triton", "token", (3, 5, 4)),
     ("triton", "weight", (3, 5, 4))],
)
@pytest.mark.parametrize("additive", [True, False])
def test_gradcheck_float64(backend, path, shape, additive):
    n_rows, o, n = shape
    p = make_problem((n_rows,), o=o, n=n, rate=0.3, seed=5)
    b = p.bias.clone().requires_grad_()
    w = p.weight if additive else None

    def f(x, delta, values, bias):
        return frod_linear(x, w, bias, p.U, p.V, delta, p.indices, values, backend=backend, path=path)

    assert torch.autograd.gradcheck(f, (p.x, p.delta, p.values, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_no_grad_and_partial_grads(backend, path, rate):
    """No-grad forward (folded basis on the token path), x-only and params-only gradients."""
    p = make_problem((11,), o=10, n=9, rate=rate, seed=8)
    args = (p.weight, p.bias, p.U, p.V, p.delta, p.indices, p.values)
    ref = frod_linear_reference(p.x, *args)
    with torch.no_grad():
        y = frod_linear(p.x, *args, backend=backend, path=path)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(ref)
    want_x, want_d, want_s = _grads(ref, [p.x, p.delta, p.values], gy)

    x_only = frod_linear(p.x, p.weight, p.bias, p.U, p.V, p.delta.detach(), p.indices, p.values.detach(),
                         backend=backend, path=path)
    torch.testing.assert_close(_grads(x_only, [p.x], gy)[0], want_x, rtol=1e-12, atol=1e-12)
    params_only = frod_linear(p.x.detach(), *args, backend=backend, path=path)
    got_d, got_s = _grads(params_only, [p.delta, p.values], gy)
    torch.testing.assert_close(got_d, want_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_s, want_s, rtol=1e-12, atol=1e-12)
    assert got_s.shape == (p.indices.shape[1],)


def test_fp32_master_parameters_with_lower_precision_input():
    p = make_problem((6,), o=8, n=8, rate=0.2, dtype=torch.float64, seed=9)
    delta32 = p.delta.detach().float().requires_grad_()
    values32 = p.values.detach().float().requires_grad_()
    y = frod_linear(p.x, p.weight, p.bias, p.U, p.V, delta32, p.indices, values32)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert delta32.grad.dtype == torch.float32 and values32.grad.dtype == torch.float32


def test_empty_batch():
    p = make_problem((0,), o=5, n=4, seed=1)
    for path in PATHS:
        y = frod_linear(p.x, p.weight, p.bias, p.U, p.V, p.delta, p.indices, p.values, path=path)
        assert y.shape == (0, 5)
        y.sum().backward()
        assert p.delta.grad is not None and torch.equal(p.delta.grad, torch.zeros_like(p.delta))
        p.delta.grad = None


def test_input_validation():
    p = make_problem((3,), o=5, n=4, seed=1)
    args = [p.x, p.weight, p.bias, p.U, p.V, p.delta, p.indices, p.values]

    def call(i, value, match, exc=ValueError, **kw):
        bad = list(args)
        bad[i] = value
        with pytest.raises(exc, match=match):
            frod_linear(*bad, **kw)

    call(0, torch.randn(3, 5, dtype=torch.float64), "last dimension")
    call(0, torch.randn(3, 4, dtype=torch.float32), "dtype", TypeError)
    call(0, torch.ones(3, 4, dtype=torch.int64), "floating-point", TypeError)
    call(1, torch.randn(5, 3, dtype=torch.float64), "weight has shape")
    call(2, torch.randn(4, dtype=torch.float64), "bias has shape")
    call(4, torch.randn(4, 4, dtype=torch.float64, device="meta"), "V is on meta")
    call(5, torch.randn(3, dtype=torch.float64), "delta has shape")
    call(7, torch.randn(p.values.shape[0] + 1, dtype=torch.float64), "sparse_values has shape")
    call(6, torch.tensor([[1], [1]]), "off-diagonal")
    with pytest.raises(ValueError, match="backend"):
        frod_linear(*args, backend="cuda")
    with pytest.raises(ValueError, match="path"):
        frod_linear(*args, path="fused")


def test_frozen_tensors_must_not_require_grad():
    p = make_problem((3,), o=5, n=4, seed=2)
    for i, name in ((1, "weight"), (3, "U"), (4, "V")):
        args = [p.x, p.weight, p.bias, p.U, p.V, p.delta, p.indices, p.values]
        args[i] = args[i].clone().requires_grad_()
        with pytest.raises(ValueError, match=f"{name} requires grad"):
            frod_linear(*args)
        with torch.no_grad():
            frod_linear(*args)  # fine without autograd


# --------------------------------------------------------------------------------------------
# Eager calls skip the custom-op machinery (ops._Eager); compiled graphs keep the custom ops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,given", [("token", False), ("weight", False), ("weight", True)])
@pytest.mark.parametrize("additive", [True, False])
def test_eager_call_is_the_custom_op_bit_for_bit(path, given, additive):
    """``frod_linear_call`` in eager mode gives the custom op's y, saved tensor and gradients exactly."""
    p = make_problem((6,), o=7, n=5, rate=0.3, dtype=torch.float32, seed=5)
    op = ops.Operands(p.weight if additive else None, None, p.U, p.V, p.delta.detach(), p.values.detach(), p.pattern)
    rotated = ops._rotated_weight(ops.get_backend("torch"), op) if given else None
    gy = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    results = []
    for call in (ops.frod_linear_forward, ops.frod_linear_call):
        x, diag, values, bias = (t.detach().clone().requires_grad_() for t in (p.x, p.delta, p.values, p.bias))
        y, saved = call(x, op.weight, bias, op.U, op.V, diag, values, *op.pattern, rotated, path, "torch", True)
        results.append((y, saved, *torch.autograd.grad(y, (x, diag, values, bias), gy)))
    for via_op, eager in zip(*results, strict=True):
        assert torch.equal(via_op, eager)


def test_compiled_graph_calls_the_custom_ops():
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def record(graph_module, _):
        graphs.append({str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"})
        return make_boxed_func(graph_module.forward)

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=record, bw_compiler=record)

    torch._dynamo.reset()
    layer = FRoDLinear.from_linear(torch.nn.Linear(16, 16), sparse_rate=0.2, backend="torch", path="token")
    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(4, 16, requires_grad=True)).sum().backward()
    forward, backward = graphs
    assert "frod_kernels.frod_linear_forward.default" in forward
    assert "frod_kernels.frod_linear_backward.default" in backward


# --------------------------------------------------------------------------------------------
# The PyTorch backend's per-pattern structure (M with its diagonal as CSR entries)
# --------------------------------------------------------------------------------------------


def _check_primitives(pattern: SparsePattern, seed: int) -> None:
    """m_matmul (both orientations) and sddmm of the PyTorch backend against dense float64 maths."""
    g = torch.Generator().manual_seed(seed)
    n, k = pattern.n, pattern.k
    diag, values = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(k, generator=g, dtype=torch.float64)
    b, at, bt = (torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(3))
    m = rotation_matrix(diag, pattern.indices, values)
    torch.testing.assert_close(torch_backend.m_matmul(b, diag, values, pattern), m @ b)
    torch.testing.assert_close(torch_backend.m_matmul(b, diag, values, pattern, transpose=True), m.mT @ b)
    c = at @ bt.mT
    got_diag, got_values = torch_backend.sddmm(at, bt, pattern)
    torch.testing.assert_close(got_diag, c.diagonal())
    torch.testing.assert_close(got_values, c[pattern.indices[0], pattern.indices[1]])


def test_torch_backend_follows_a_pattern_written_in_place():
    """The structure kept per pattern tensor is rebuilt when that tensor's values change."""
    n = 12
    first, second = (SparsePattern.from_indices(sample_sparse_pattern(n, 0.2, seed), n) for seed in (0, 1))
    assert first.k == second.k and not torch.equal(first.indices, second.indices)
    _check_primitives(first, seed=0)
    for mine, theirs in zip(first, second, strict=True):
        mine.copy_(theirs)
    _check_primitives(first, seed=1)


def test_torch_backend_with_an_inference_mode_pattern():
    """A pattern made under inference_mode has no version counter: its structure is built per call."""
    with torch.inference_mode():
        pattern = SparsePattern.from_indices(sample_sparse_pattern(9, 0.3, 2), 9)
        _check_primitives(pattern, seed=2)
    _check_primitives(pattern, seed=3)
