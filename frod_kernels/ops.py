r"""The FRoD layer as two custom ops with one autograd formula: the package's autograd boundary.

Forward (docs/design.md §3), for X (N, n), M = diag(d) + S:

    Y = X·W'ᵀ + b,   W' = W + U·M·Vᵀ          (W absent in factored mode: W' = U·M·Vᵀ)

Backward. With dY = ∂L/∂Y (N, o) and Y_{tp} = Σ_q X_{tq} W'_{pq} + b_p:

    ∂L/∂X_{tq} = Σ_p dY_{tp} W'_{pq}                 ⇒ dX = dY·W' = dY·W + ((dY·U)·M)·Vᵀ
    ∂L/∂b_p    = Σ_t dY_{tp}                          ⇒ db = Σ_rows dY
    ∂L/∂M_{rc} = Σ_{t,p,q} dY_{tp} U_{pr} V_{qc} X_{tq}
                                                      ⇒ dM = Uᵀ·dYᵀ·X·V = (dY·U)ᵀ·(X·V)
    d_j and s_j are entries of M                     ⇒ dd_j = dM[j, j],  ds_j = dM[r_j, c_j]

W, U and V are frozen: no gradient is formed for them. Both paths compute the same numbers:

token space (P = dY·U, Z = X·V, all activations kept transposed (n, N), see torch_backend):
    fwd  Zᵀ = Vᵀ·Xᵀ;  Aᵀ = M·Zᵀ;  Y = X·Wᵀ + A·Uᵀ + b           (one dual GEMM)
    bwd  Pᵀ = Uᵀ·dYᵀ; dX = dY·W + (Mᵀ·Pᵀ)ᵀ·Vᵀ (dual GEMM);  (dd, ds) = SDDMM(Pᵀ, Zᵀ)
    Without gradients the rotation is folded into the basis instead: Y = X·Wᵀ + (X·V·Mᵀ)·Uᵀ + b
    with V·Mᵀ = (M·Vᵀ)ᵀ an n·(n+k) product, so no N-sized sparse work is done.

weight space:
    fwd  U·M = (Mᵀ·Uᵀ)ᵀ (sparse gather); W' = W + (U·M)·Vᵀ;  Y = X·W'ᵀ + b;  W' is kept
         (or W' is given: built by an earlier call with the same W, δ, s, see ``FRoDLinear``)
    bwd  dX = dY·W';  G = dYᵀ·X;  dM = Uᵀ·G·V sampled on the diagonal and Ω, as
         H = Uᵀ·G, (dd, ds) = SDDMM(H, Vᵀ)   (inner dimension n)   when o ≥ n,
         K = G·V,  (dd, ds) = SDDMM(Uᵀ, Kᵀ)  (inner dimension o)   when o < n:
         the same o·n·n GEMM either way, and the SDDMM's (n+k)·min(o, n) sparse work.

Double backward (``create_graph=True``, e.g. a gradient penalty): the backward above is linear in
dY and bilinear in (dY, X) and (dY, M), so when autograd records the backward itself, it is
computed instead by differentiable PyTorch ops on the dense M (n × n, ``reference.rotation_matrix``):
dX = dY·W', P = dY·U, Z = X·V, dM = Pᵀ·Z. Same numbers, O(n²) extra memory, no fused kernels.

What travels with x is one ``Operands`` (W, b, U, V, the diagonal of M, s, Ω); the ops take it
flattened, with the resolved path and backend names (see ``dispatch``; the basis path is the token
path called with W absent and the diagonal λ + δ). ``frod_linear`` resolves them, validates the
inputs, builds the ``Operands`` and flattens x. ``frod_linear_forward`` returns (Y, saved): the
tensor the backward needs beyond X (Zᵀ for the token path, W' for the weight path), or an empty
tensor when no gradient will be asked for or when W' was given (then the given one is kept).

``frod_linear`` calls it through ``frod_linear_call``: the custom ops while torch.compile traces,
and in eager mode the same functions and autograd formula through a plain autograd.Function
(``_Eager``), which skips the dispatcher's per-call work around a Python custom op.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import get_backend
from .pattern import SparsePattern
from .reference import rotation_matrix

__all__ = ["Operands", "frod_linear_backward", "frod_linear_call", "frod_linear_forward"]

Tensor = torch.Tensor


class Operands(NamedTuple):
    """What one call computes with besides x, as it travels from ``frod_linear`` to the kernels.

    weight: W (o, n), or None (factored mode, and the basis path); bias: (o,) or None (None in
    the backward, which needs no bias); U: (o, n); V: (n, n); diag: (n,) the diagonal of M, δ or
    λ + δ (factored mode, basis path); values: (k,) s; pattern: Ω with its CSR/CSC views.

    The custom ops take it flattened (``as_op_args``: torch.library schemas take tensors, not
    structures) and rebuild it inside.
    """

    weight: Tensor | None
    bias: Tensor | None
    U: Tensor
    V: Tensor
    diag: Tensor
    values: Tensor
    pattern: SparsePattern

    def as_op_args(self) -> tuple:
        """(weight, bias, U, V, diag, values, indices, csr_ptr, csc_ptr, csc_perm), the ops' order."""
        return (self.weight, self.bias, self.U, self.V, self.diag, self.values, *self.pattern)

    def m_matmul(self, bk, b: Tensor, transpose: bool = False) -> Tensor:
        """M·b (Mᵀ·b) on backend ``bk``."""
        return bk.m_matmul(b, self.diag, self.values, self.pattern, transpose=transpose)


def _token_forward(bk, x, op: Operands, save, rotated_weight=None):
    if not save:
        xvm = bk.dual_matmul(x, op.m_matmul(bk, op.V.t()))  # X·(V·Mᵀ), M·Vᵀ = (V·Mᵀ)ᵀ
        if op.weight is None:
            return bk.dual_matmul(xvm, op.U, bias=op.bias), x.new_empty(0)
        return bk.dual_matmul(x, op.weight, xvm, op.U, op.bias), x.new_empty(0)
    zt = bk.dual_matmul(op.V.t(), x)  # Zᵀ = Vᵀ·Xᵀ, (n, N)
    at = op.m_matmul(bk, zt)  # Aᵀ = M·Zᵀ
    if op.weight is None:
        return bk.dual_matmul(at.t(), op.U, bias=op.bias), zt
    return bk.dual_matmul(x, op.weight, at.t(), op.U, op.bias), zt


def _rotated_weight(bk, op: Operands) -> Tensor:
    """W' = W + (U·M)·Vᵀ, or U·M·Vᵀ when W is None."""
    um = op.m_matmul(bk, op.U.t(), transpose=True).t()  # U·M = (Mᵀ·Uᵀ)ᵀ
    w_eff = bk.dual_matmul(um, op.V)
    return w_eff if op.weight is None else w_eff.add_(op.weight)


def _weight_forward(bk, x, op: Operands, save, rotated_weight):
    if rotated_weight is not None:  # outputs may not alias inputs: the caller keeps the given W'
        return bk.dual_matmul(x, rotated_weight, bias=op.bias), x.new_empty(0)
    w_eff = _rotated_weight(bk, op)
    return bk.dual_matmul(x, w_eff, bias=op.bias), (w_eff if save else x.new_empty(0))


def _token_backward(bk, dy, x, zt, op: Operands, need_x, need_params):
    pt = bk.dual_matmul(op.U.t(), dy)  # Pᵀ = Uᵀ·dYᵀ, (n, N)
    dx = dd = ds = None
    # The SDDMM first: both sparse passes read Pᵀ, and this way the second finds it in cache (the
    # dX GEMM between them would evict it); at N = 256, d = 1024 on CPU that saves ~0.1 ms.
    if need_params:
        dd, ds = bk.sddmm(pt, zt, op.pattern)
    if need_x:
        qt = op.m_matmul(bk, pt, transpose=True)  # (P·M)ᵀ = Mᵀ·Pᵀ
        if op.weight is None:
            dx = bk.dual_matmul(qt.t(), op.V)
        else:
            dx = bk.dual_matmul(dy, op.weight.t(), qt.t(), op.V)
    return dx, dd, ds


def _weight_backward(bk, dy, x, w_eff, op: Operands, need_x, need_params):
    dx = dd = ds = None
    if need_x:
        dx = bk.dual_matmul(dy, w_eff.t())
    if need_params:
        g = bk.dual_matmul(dy.t(), x.t())  # G = dYᵀ·X, (o, n)
        o, n = op.U.shape
        if o < n:
            kt = bk.dual_matmul(op.V.t(), g)  # Kᵀ = (G·V)ᵀ = Vᵀ·Gᵀ, (n, o)
            dd, ds = bk.sddmm(op.U.t(), kt, op.pattern)  # dM = Uᵀ·K, inner dimension o
        else:
            h = bk.dual_matmul(op.U.t(), g.t())  # H = Uᵀ·G, (n, n)
            dd, ds = bk.sddmm(h, op.V.t(), op.pattern)  # dM = H·V, inner dimension n
    return dx, dd, ds


_FORWARD = {"token": _token_forward, "weight": _weight_forward}
_BACKWARD = {"token": _token_backward, "weight": _weight_backward}


def _operands(weight, bias, U, V, diag, values, indices, csr_ptr, csc_ptr, csc_perm) -> Operands:
    return Operands(weight, bias, U, V, diag, values, SparsePattern(indices, csr_ptr, csc_ptr, csc_perm))


def _forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    U: Tensor,
    V: Tensor,
    diag: Tensor,
    values: Tensor,
    indices: Tensor,
    csr_ptr: Tensor,
    csc_ptr: Tensor,
    csc_perm: Tensor,
    rotated_weight: Tensor | None,
    path: str,
    backend: str,
    save: bool,
) -> tuple[Tensor, Tensor]:
    """(Y, saved) for a 2-D x (N, n): ``x`` then ``Operands.as_op_args()`` (see the module
    docstring). ``rotated_weight``: a W' to use on the weight path instead of building it."""
    op = _operands(weight, bias, U, V, diag, values, indices, csr_ptr, csc_ptr, csc_perm)
    return _FORWARD[path](get_backend(backend), x, op, save, rotated_weight)


frod_linear_forward = torch.library.custom_op("frod_kernels::frod_linear_forward", _forward, mutates_args=())


@frod_linear_forward.register_fake
def _(x, weight, bias, U, V, diag, values, indices, csr_ptr, csc_ptr, csc_perm, rotated_weight, path, backend, save):
    y = x.new_empty(x.shape[0], U.shape[0])
    if not save or (path == "weight" and rotated_weight is not None):
        return y, x.new_empty(0)
    if path == "token":
        return y, x.new_empty(V.shape[1], x.shape[0])
    return y, x.new_empty(U.shape[0], V.shape[0])


def _backward_kernel(
    grad_y: Tensor,
    x: Tensor,
    saved: Tensor,
    weight: Tensor | None,
    U: Tensor,
    V: Tensor,
    diag: Tensor,
    values: Tensor,
    indices: Tensor,
    csr_ptr: Tensor,
    csc_ptr: Tensor,
    csc_perm: Tensor,
    path: str,
    backend: str,
    need_x: bool,
    need_params: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dd, ds); a gradient that is not needed comes back as an empty tensor."""
    op = _operands(weight, None, U, V, diag, values, indices, csr_ptr, csc_ptr, csc_perm)
    dx, dd, ds = _BACKWARD[path](get_backend(backend), grad_y.contiguous(), x, saved, op, need_x, need_params)
    # Custom-op outputs may not alias each other: one fresh empty tensor per missing gradient.
    return tuple(x.new_empty(0) if g is None else g for g in (dx, dd, ds))


frod_linear_backward = torch.library.custom_op("frod_kernels::frod_linear_backward", _backward_kernel, mutates_args=())


@frod_linear_backward.register_fake
def _(grad_y, x, saved, weight, U, V, diag, values, indices, csr_ptr, csc_ptr, csc_perm, path, backend,
      need_x, need_params):
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    dd = diag.new_empty(diag.shape) if need_params else x.new_empty(0)
    ds = values.new_empty(values.shape) if need_params else x.new_empty(0)
    return dx, dd, ds


def _setup_context(ctx, inputs, output):
    x, weight, _, U, V, diag, values, indices, csr_ptr, csc_ptr, csc_perm, rotated_weight, path, backend, _ = inputs
    saved = rotated_weight if path == "weight" and rotated_weight is not None else output[1]
    ctx.save_for_backward(x, saved, weight, U, V, diag, values, indices, csr_ptr, csc_ptr, csc_perm)
    ctx.path, ctx.backend, ctx.kernel = path, backend, frod_linear_backward
    # No gradient flows into ``saved`` (the backward ignores one): without this, autograd would
    # fill an (n, N) tensor of zeros for it on every call.
    ctx.set_materialize_grads(False)


def _differentiable_backward(grad_y, x, op: Operands):
    """(dX, dd, ds) by plain differentiable ops, for double backward (see the module docstring)."""
    indices = op.pattern.indices
    w_eff = op.U @ rotation_matrix(op.diag, indices, op.values) @ op.V.mT
    if op.weight is not None:
        w_eff = w_eff + op.weight
    dm = (grad_y @ op.U).mT @ (x @ op.V)  # dM = Pᵀ·Z
    return grad_y @ w_eff, dm.diagonal(), dm[indices[0], indices[1]]


def _backward(ctx, grad_y, _grad_saved):
    if grad_y is None:  # y took no part in the loss (grads are not materialised, see _setup_context)
        return (None,) * 15
    x, saved, weight, U, V, diag, values, *pattern = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_params, need_bias = need[0], need[5] or need[6], need[2]
    dx = dd = ds = None
    if torch.is_grad_enabled() and (need_x or need_params):  # create_graph=True: the backward is recorded
        dx, dd, ds = _differentiable_backward(grad_y, x, _operands(weight, None, U, V, diag, values, *pattern))
    elif need_x or need_params:
        dx, dd, ds = ctx.kernel(
            grad_y, x, saved, weight, U, V, diag, values, *pattern, ctx.path, ctx.backend, need_x, need_params,
        )
    db = grad_y.sum(0) if need_bias else None
    return (
        dx if need_x else None, None, db, None, None,
        dd if need[5] else None, ds if need[6] else None,
        None, None, None, None, None, None, None, None,
    )


torch.library.register_autograd("frod_kernels::frod_linear_forward", _backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """``frod_linear_forward`` and its autograd formula, run without the custom-op machinery.

    The same kernels, the same saved tensors, the same backward (``_forward``, ``_setup_context``,
    ``_backward``, ``_backward_kernel``), so the numbers are identical. What it skips is the
    dispatcher's work around a Python custom op on every call: binding the 15 arguments to the
    schema (``fill_defaults``, quadratic in their number), the redispatch below autograd, the
    alias checks, and the same again for the backward op: about 150 µs per forward + backward on
    CPU, a few per cent of a d = 1024, N = 256 layer (docs/benchmarks.md, "Small N").
    """

    @staticmethod
    def forward(ctx, *args):  # with ctx, not a separate setup_context: apply would bind args by inspect
        output = _forward(*args)
        _setup_context(ctx, args, output)
        ctx.kernel = _backward_kernel
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_saved):
        return _backward(ctx, grad_y, grad_saved)


def frod_linear_call(*args) -> tuple[Tensor, Tensor]:
    """``frod_linear_forward(*args)``: the custom op while torch.compile traces (a graph needs it:
    it is opaque there, with its fake and autograd registrations), ``_Eager`` otherwise."""
    if torch.compiler.is_compiling():
        return frod_linear_forward(*args)
    return _Eager.apply(*args)
