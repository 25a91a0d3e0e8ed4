"""The custom ops: opcheck, and torch.compile(fullgraph=True) with FRoDLinear inside."""

import pytest
import torch

from frod_kernels import FRoDLinear, ops

from _problems import make_problem


def _op_args(p, path, save, weight=True, bias=True, given=False):
    """The forward op's arguments; ``given``: pass a W' built beforehand (reused on the weight path)."""
    op = ops.Operands(p.weight if weight else None, p.bias if bias else None, p.U, p.V, p.delta.detach(),
                      p.values.detach(), p.pattern)
    rotated = ops._rotated_weight(ops.get_backend("torch"), op) if given else None
    return (p.x.detach().reshape(-1, p.x.shape[-1]), *op.as_op_args(), rotated, path, "torch", save)


@pytest.mark.parametrize("path", ["token", "weight"])
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("given", [False, True])
def test_opcheck_forward(path, save, weight, given):
    p = make_problem((6,), o=7, n=5, rate=0.3, dtype=torch.float32, seed=1)
    torch.library.opcheck(ops.frod_linear_forward, _op_args(p, path, save, weight=weight, given=given))


@pytest.mark.parametrize("path,given", [("token", False), ("weight", False), ("weight", True)])
def test_opcheck_forward_with_autograd(path, given):
    p = make_problem((6,), o=7, n=5, rate=0.3, dtype=torch.float32, seed=2)
    args = list(_op_args(p, path, True, given=given))
    args[0] = args[0].clone().requires_grad_()
    args[5] = args[5].clone().requires_grad_()
    args[6] = args[6].clone().requires_grad_()
    torch.library.opcheck(ops.frod_linear_forward, tuple(args))


@pytest.mark.parametrize("path", ["token", "weight"])
@pytest.mark.parametrize("need_x,need_params", [(True, True), (True, False), (False, True)])
def test_opcheck_backward(path, need_x, need_params):
    p = make_problem((6,), o=7, n=5, rate=0.3, dtype=torch.float32, seed=3)
    fwd = _op_args(p, path, True)
    _, saved = ops.frod_linear_forward(*fwd)
    x, weight, _, U, V, diag, values, *pattern = fwd[:11]
    grad_y = torch.randn(x.shape[0], U.shape[0])
    torch.library.opcheck(
        ops.frod_linear_backward,
        (grad_y, x, saved, weight, U, V, diag, values, *pattern, path, "torch", need_x, need_params),
    )


@pytest.mark.parametrize("path,compiler", [("token", "aot_eager"), ("weight", "aot_eager"), ("auto", "inductor")])
def test_compile_fullgraph_model_with_frod_layer(path, compiler):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 10))
    model[2] = FRoDLinear.from_linear(model[2], sparse_rate=0.2, backend="torch", path=path)
    with torch.no_grad():
        model[2].delta.normal_()
        model[2].sparse_values.normal_()
    x = torch.randn(3, 5, 12)
    eager_y = model(x)
    eager_y.square().sum().backward()
    eager_grads = [model[2].delta.grad.clone(), model[2].sparse_values.grad.clone()]
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(model[2].delta.grad, eager_grads[0])
    torch.testing.assert_close(model[2].sparse_values.grad, eager_grads[1])
