"""Property-based fuzzing of ``frod_linear`` against ``frod_linear_reference`` (hypothesis).

Drawn: o, n and the row count (including 1, odd primes and sizes just past the Triton block sizes
of 32 and 64), the sparse rate (including 0), bias on/off, additive or factored (weight None), the
path (token/weight), which gradients are asked for (none: the inference path), the input layout
(2-D, 3-D, transposed and step-sliced views, also for W, U and V) and the dtype (float32/float64).
Forward and every gradient are compared with the float64 reference on the same (rounded) inputs.

Error bound, as for any dot product: |got − exact| ≤ tol · Σ|terms|, where Σ|terms| is the same
computation on absolute values (the reference on |x|, |W|, |U|, |V|, |δ|, |s|, |b| with upstream
|dy|); tight even when terms cancel.

Budget: CI runs ``FROD_FUZZ_EXAMPLES`` (default 200) examples on the PyTorch backend and a tenth
of that (at least 20) on the Triton backend, which runs under the interpreter without a GPU and is
kept to sizes ≤ 48 there. A long run: ``FROD_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import frod_kernels as fk
from frod_kernels.dispatch import choose_backend
from frod_kernels.pattern import sample_sparse_pattern
from frod_kernels.reference import frod_linear_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EXAMPLES = int(os.environ.get("FROD_FUZZ_EXAMPLES", "200"))
TRITON_EXAMPLES = max(20, EXAMPLES // 10)
TOL = {torch.float32: 3e-5, torch.float64: 1e-12}
# 1, odd primes, and the edges of the kernels' blocks (32 under the interpreter, 64 on GPU).
SPECIAL = [1, 2, 3, 5, 7, 13, 31, 32, 33, 37, 47, 63, 64, 65, 97, 100]

_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def _size(limit: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([s for s in SPECIAL if s <= limit]), st.integers(1, limit))


@dataclass
class Case:
    o: int
    n: int
    lead: tuple[int, ...]
    rate: float
    bias: bool
    additive: bool
    path: str
    grads: str  # "all" | "params" | "input" | "none"
    x_layout: str  # "c" | "t" | "s"
    w_layout: str  # "c" | "t"
    dtype: torch.dtype
    seed: int


@st.composite
def cases(draw, limit: int) -> Case:
    n_rows = draw(_size(limit))
    lead = draw(st.sampled_from([(n_rows,), (1, n_rows), (n_rows, 1), (2, max(1, n_rows // 2))]))
    return Case(
        o=draw(_size(limit)), n=draw(_size(limit)), lead=lead,
        rate=draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5, 0.9])),
        bias=draw(st.booleans()), additive=draw(st.booleans()), path=draw(st.sampled_from(["token", "weight"])),
        grads=draw(st.sampled_from(["all", "params", "input", "none"])),
        x_layout=draw(st.sampled_from("cts")), w_layout=draw(st.sampled_from("ct")),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])), seed=draw(st.integers(0, 2**16)),
    )


def _tensor(shape: tuple[int, ...], layout: str, dtype: torch.dtype, g: torch.Generator, scale: float = 1.0):
    """Random tensor of ``shape``: contiguous, with its last two axes transposed ("t"), or step-sliced ("s")."""
    if layout == "t" and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=torch.float64).transpose(-1, -2)
    elif layout == "s":
        t = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=g, dtype=torch.float64)[..., 1::2]
    else:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (t * scale).to(device=DEVICE, dtype=dtype)


def _inputs(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    indices = sample_sparse_pattern(c.n, c.rate, c.seed).to(DEVICE)
    x = _tensor((*c.lead, c.n), c.x_layout, c.dtype, g)
    return {
        "x": x,
        "weight": _tensor((c.o, c.n), c.w_layout, c.dtype, g, c.n**-0.5) if c.additive else None,
        "bias": _tensor((c.o,), "c", c.dtype, g) if c.bias else None,
        "U": _tensor((c.o, c.n), c.w_layout, c.dtype, g, c.n**-0.5),
        "V": _tensor((c.n, c.n), c.w_layout, c.dtype, g, c.n**-0.5),
        "delta": _tensor((c.n,), "c", c.dtype, g, 0.5),
        "indices": indices,
        "values": _tensor((indices.shape[1],), "c", c.dtype, g, 0.5),
        "dy": _tensor((*c.lead, c.o), "c", torch.float64, g),
    }


_ORDER = ("x", "weight", "bias", "U", "V", "delta", "indices", "values")
_GRAD_ARGS = {"all": ("x", "delta", "values"), "params": ("delta", "values"), "input": ("x",), "none": ()}


def _run(fn, args: dict, wanted: tuple[str, ...], dy: torch.Tensor, transform=lambda t: t, **kw):
    """(y, {name: gradient}) of fn on ``transform``-ed copies of ``args``; ``wanted`` require grad."""
    leaves = {}
    for name in _ORDER:
        t = args[name]
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = transform(t.detach())
            if name in wanted:
                t.requires_grad_(True)
        leaves[name] = t
    y = fn(*(leaves[name] for name in _ORDER), **kw)
    if not wanted:
        return y, {}
    grads = torch.autograd.grad(y, [leaves[n] for n in wanted], dy.to(y.dtype))
    return y, dict(zip(wanted, grads, strict=True))


def _check(c: Case, backend: str) -> None:
    args = _inputs(c)
    dy = args.pop("dy")
    wanted = _GRAD_ARGS[c.grads]
    y, grads = _run(fk.frod_linear, args, wanted, dy, backend=backend, path=c.path)
    exact, exact_grads = _run(frod_linear_reference, args, wanted, dy, lambda t: t.double())
    bound, bound_grads = _run(frod_linear_reference, args, wanted, dy.abs(), lambda t: t.double().abs())
    assert y.shape == (*c.lead, c.o) and y.dtype == c.dtype
    for name, got, ref, scale in [("y", y, exact, bound)] + [
        (n, grads[n], exact_grads[n], bound_grads[n]) for n in wanted
    ]:
        assert got.shape == ref.shape and got.dtype == c.dtype, name
        excess = (got.double() - ref).abs() - TOL[c.dtype] * scale
        assert bool((excess <= 1e-300).all()), f"{name}: max error {(got.double() - ref).abs().max():.3e} ({c})"


@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(c=cases(limit=100))
def test_fuzz_torch_backend(c: Case):
    _check(c, "torch")


def _triton_usable() -> bool:
    try:
        return choose_backend("triton", DEVICE) == "triton"
    except RuntimeError:
        return False


@pytest.mark.skipif(not _triton_usable(), reason="Triton needs a GPU or TRITON_INTERPRET=1 (set by conftest)")
@settings(max_examples=TRITON_EXAMPLES, **_SETTINGS)
@given(c=cases(limit=100 if DEVICE.type == "cuda" else 48))
def test_fuzz_triton_backend(c: Case):
    _check(c, "triton")
