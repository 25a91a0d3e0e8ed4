"""Dispatch: which backend runs the primitives and which path a call takes.

The only place that decides. Four ways to compute one call (docs/design.md §5), in units of N·o·n
for an (o, n) layer and N rows, training with every gradient, sparse work left out:

    path                       cost            what
    token                      4 + 2n/o        Z = X·V, Y = X·Wᵀ + (M·Z)·Uᵀ; backward through U, M, V
    weight                     3 + 2n/N        W' = W + (U·M)·Vᵀ, then a dense layer; H = Uᵀ·G (or G·V)
    weight, W' reused          3 + n/N         W' built by an earlier call with the same δ, s, W
    basis (additive only)      2 + 2n/o        the token path with W = U·Λ·Vᵀ: U·(Λ + M)·Vᵀ, no X·Wᵀ

``path_costs`` counts the multiply-adds of each (below); ``choose_path`` takes the cheapest of
those allowed. The basis path changes the numbers by the decomposition's rounding, so it is only
offered when the caller says it is allowed (``FRoDLinear`` measures that rounding once per layer
and dtype, ``FRoDLinear.basis_deviation``); W' reuse is the caller's too (``FRoDLinear`` keeps
the W' a weight-path call built, keyed by the version counters of δ, s and W, and passes the
share of its cost the next call should be charged: 0 while it is valid, 1/r when each W' has
served r calls so far, e.g. the micro-batches of gradient accumulation).

Multiply-adds counted, with c the weight of a sparse multiply-add and m = min(o, n):

    token  fwd  N·n·n (Z = XV) + N·o·n (XWᵀ, additive mode) + N·o·n (A·Uᵀ) + c·N·(n+k)
                (no gradients: c·n·(n+k) for the fold V·Mᵀ instead of c·N·(n+k))
           bwd  N·o·n (P = dY·U)                                              if training
                + N·o·n (dY·W, additive) + N·n·n ((PM)Vᵀ) + c·N·(n+k)          if dX is needed
                + c·N·(n+k) (SDDMM)                                           if δ, s need grads
    basis       the token path's count with W absent (additive = False)
    weight fwd  share·(o·n·n (ΔW = (UM)Vᵀ) + c·o·(n+k)) + N·o·n (Y = XW'ᵀ)
           bwd  N·o·n (dX = dY·W')                                            if dX is needed
                + N·o·n (G = dYᵀX) + o·n·n (H = UᵀG, or GV when o < n) + c·m·(n+k)
                                                                               if δ, s need grads

c weighs a sparse multiply-add against a dense one (gathers run far below GEMM speed).

Per primitive (backend "triton"). A layer call is made of four primitives:

    gemm       one product Y = A·Bᵀ (+ b): Zᵀ = Vᵀ·Xᵀ, Pᵀ = Uᵀ·dYᵀ, and the whole weight path
               (Y = X·W'ᵀ + b, dX = dY·W', G = dYᵀ·X, H = Uᵀ·G, W' = W + (U·M)·Vᵀ)
    dual_gemm  two products into one output, Y = X·Wᵀ + A·Uᵀ + b and dX = dY·W + Q·Vᵀ (token path)
    m_matmul   the sparse rotation M·B, Mᵀ·B
    sddmm      the sampled products that give dδ and ds

On CUDA a single GEMM with nothing fused gains nothing from a Triton kernel, and cuBLAS (with its
persistent, TMA-fed Hopper kernels) is faster than a non-persistent Triton GEMM, so ``gemm`` runs
on PyTorch (``torch.mm`` / ``torch.addmm``) and the other three, which fuse work cuBLAS cannot,
on Triton. Off CUDA (Triton's CPU interpreter, used for testing) every primitive runs on Triton.
Override per primitive with ``set_primitive_backend("gemm", "triton")`` or the environment
variable ``FROD_PRIMITIVE_BACKENDS="gemm=triton,sddmm=torch"`` (read at each call; the function
wins over the variable). Before a Triton primitive first runs on a CUDA device and dtype, the
kernels are checked against PyTorch (``backends.self_check``); a failure falls back to PyTorch
for that device, with one warning.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .options import check_choice

__all__ = [
    "BACKENDS",
    "PATHS",
    "PRIMITIVES",
    "choose_backend",
    "choose_path",
    "get_backend",
    "get_backend_module",
    "path_costs",
    "primitive_backend",
    "set_primitive_backend",
]

BACKENDS = ("auto", "torch", "triton")
PATHS = ("auto", "token", "weight", "basis")

# Dense-GEMM multiply-adds worth one sparse multiply-add (measured order of magnitude: MKL/cuSPARSE
# gathers on CPU run ~5-15x below GEMM rate, on GPU tensor cores widen the gap).
_SPARSE_WEIGHT = {"cpu": 8.0, "cuda": 32.0}


def path_costs(
    n_rows: int,
    out_features: int,
    in_features: int,
    k: int,
    additive: bool = True,
    needs_input_grad: bool = True,
    needs_param_grad: bool = True,
    device_type: str = "cpu",
    basis: bool = False,
    weight_share: float = 1.0,
) -> dict[str, float]:
    """Estimated cost (dense multiply-add units) of one call, forward plus the backward it needs.

    Keys: "token", "weight", and "basis" when ``basis`` is allowed (additive layers only).
    ``weight_share``: the share of building W' charged to this call (1: built for this call alone,
    0: reused, 1/r: built once for r calls).
    """
    big_n, o, n = n_rows, out_features, in_features
    c = _SPARSE_WEIGHT.get(device_type, _SPARSE_WEIGHT["cuda"])
    training = needs_input_grad or needs_param_grad

    def token(with_w: bool) -> float:
        # Without gradients M is folded into the basis (V·Mᵀ, n·(n+k) sparse work) instead of being
        # applied to the N rows of Z.
        cost = big_n * n * n + (1 + with_w) * big_n * o * n + c * (big_n if training else n) * (n + k)
        if training:
            cost += big_n * o * n
        if needs_input_grad:
            cost += with_w * big_n * o * n + big_n * n * n + c * big_n * (n + k)
        if needs_param_grad:
            cost += c * big_n * (n + k)
        return float(cost)

    weight = weight_share * (o * n * n + c * o * (n + k)) + big_n * o * n
    if needs_input_grad:
        weight += big_n * o * n
    if needs_param_grad:
        weight += big_n * o * n + o * n * n + c * min(o, n) * (n + k)
    costs = {"token": token(additive), "weight": float(weight)}
    if basis and additive:
        costs["basis"] = token(False)
    return costs


def choose_path(path: str, **shape) -> str:
    """Resolve ``path``: 'auto' picks the cheapest of ``path_costs(**shape)`` (exact paths win ties).

    'basis' is only resolved for an additive call that allows it (``basis=True``).
    """
    check_choice("path", path, PATHS)
    if path == "basis" and not (shape.get("basis") and shape.get("additive", True)):
        raise ValueError("path='basis' needs an additive layer and its λ (lam), and exact computation not asked for")
    if path != "auto":
        return path
    costs = path_costs(**shape)
    best = "token"
    for name in ("weight", "basis"):  # strictly cheaper only: ties stay on the exact paths
        if name in costs and costs[name] < costs[best]:
            best = name
    return best


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and (
        importlib.util.find_spec("triton") is not None
    )


def choose_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend``: 'auto' is Triton on CUDA when it is installed, PyTorch elsewhere.

    The Triton interpreter (CPU tensors, TRITON_INTERPRET=1) is only used when asked for.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    if backend == "triton" and not _triton_usable(device):
        raise RuntimeError(
            f"backend='triton' needs triton installed and a CUDA tensor, or CPU tensors with "
            f"TRITON_INTERPRET=1 set before frod_kernels is imported; got a tensor on {device}"
        )
    return backend


PRIMITIVES = ("gemm", "dual_gemm", "m_matmul", "sddmm")

# Under backend "triton", per device type; devices not listed run every primitive on Triton.
_DEFAULT_PRIMITIVE_BACKENDS = {
    "cuda": {"gemm": "torch", "dual_gemm": "triton", "m_matmul": "triton", "sddmm": "triton"},
}
_primitive_overrides: dict[str, str] = {}


def _check_primitive(primitive: str, backend: str | None = None) -> None:
    check_choice("primitive", primitive, PRIMITIVES)
    if backend is not None and backend not in ("torch", "triton"):
        raise ValueError(f"a primitive's backend must be 'torch' or 'triton', got {backend!r}")


def _env_overrides() -> dict[str, str]:
    spec = os.environ.get("FROD_PRIMITIVE_BACKENDS", "").strip()
    choices = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        primitive, sep, backend = item.partition("=")
        if not sep:
            raise ValueError(f"FROD_PRIMITIVE_BACKENDS entries are primitive=backend, got {item!r}")
        _check_primitive(primitive.strip(), backend.strip())
        choices[primitive.strip()] = backend.strip()
    return choices


def primitive_backend(primitive: str, device: torch.device) -> str:
    """'torch' or 'triton': who runs ``primitive`` (one of PRIMITIVES) under backend "triton".

    Order: ``set_primitive_backend``, then FROD_PRIMITIVE_BACKENDS, then the device's default
    (module docstring). The first-use self-check can still send a Triton choice to PyTorch.
    """
    _check_primitive(primitive)
    if primitive in _primitive_overrides:
        return _primitive_overrides[primitive]
    env = _env_overrides()
    if primitive in env:
        return env[primitive]
    return _DEFAULT_PRIMITIVE_BACKENDS.get(device.type, {}).get(primitive, "triton")


def set_primitive_backend(primitive: str, backend: str | None) -> str | None:
    """Force ``primitive`` onto 'torch' or 'triton' on every device (None: back to the default).

    Returns the previous override (None if there was none), so a caller can restore it.
    """
    _check_primitive(primitive, backend)
    previous = _primitive_overrides.pop(primitive, None)
    if backend is not None:
        _primitive_overrides[primitive] = backend
    return previous


class _TritonRouted:
    """``get_backend("triton")``: the three primitives, each run by the backend chosen for it.

    Same signatures and semantics as ``torch_backend`` / ``triton_backend``. ``dual_matmul``
    is the "dual_gemm" primitive when a second product is passed and "gemm" otherwise.
    """

    def _module(self, primitive: str, like: torch.Tensor) -> ModuleType:
        if primitive_backend(primitive, like.device) == "triton":
            from .backends import self_check

            if self_check.triton_ok(like.device, like.dtype):
                return get_backend_module("triton")
        return get_backend_module("torch")

    def dual_matmul(self, a1, b1, a2=None, b2=None, bias=None):
        """a1·b1ᵀ (+ a2·b2ᵀ) (+ bias)."""
        return self._module("gemm" if a2 is None else "dual_gemm", a1).dual_matmul(a1, b1, a2, b2, bias)

    def m_matmul(self, b, diag, values, pattern, transpose=False):
        """M·b (or Mᵀ·b) with M = diag(diag) + S."""
        return self._module("m_matmul", b).m_matmul(b, diag, values, pattern, transpose)

    def sddmm(self, at, bt, pattern):
        """Diagonal and Ω entries of at·btᵀ."""
        return self._module("sddmm", at).sddmm(at, bt, pattern)


_TRITON_ROUTED = _TritonRouted()


_MODULES: dict[str, ModuleType] = {}


def get_backend_module(name: str) -> ModuleType:
    """The module of one backend's own kernels, every primitive on it (imported lazily, once: a
    ``from … import`` runs importlib's Python code each time, and every layer call asks twice)."""
    found = _MODULES.get(name)
    if found is not None:
        return found
    if name == "torch":
        from .backends import torch_backend as found
    elif name == "triton":
        from .backends import triton_backend as found
    else:
        raise ValueError(f"unknown backend {name!r}")
    _MODULES[name] = found
    return found


def get_backend(name: str):
    """What runs the primitives for a resolved backend name.

    "torch": ``backends.torch_backend``. "triton": an object with the same three functions that
    sends each primitive to Triton or PyTorch per ``primitive_backend`` and the self-check.
    """
    if name == "torch":
        return get_backend_module("torch")
    if name == "triton":
        return _TRITON_ROUTED
    raise ValueError(f"unknown backend {name!r}")
