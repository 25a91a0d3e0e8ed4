"""Dispatch: which backend runs the primitives and which path (token or weight space) a call takes.

The only place that decides. The cost model counts multiply-adds as in FROD.md §5 with d ≈ n ≈ o:

    token  fwd  N·n·n (Z = XV) + N·o·n (XWᵀ, additive mode) + N·o·n (A·Uᵀ) + c·N·(n+k)
                (no gradients: c·n·(n+k) for the fold V·Mᵀ instead of c·N·(n+k))
           bwd  N·o·n (P = dY·U) + [N·o·n (dY·W) + N·n·n ((PM)Vᵀ) + c·N·(n+k)  if dX is needed]
                + c·N·(n+k) (SDDMM)                                          if δ, s need grads
    weight fwd  o·n·n (ΔW = (UM)Vᵀ) + c·o·(n+k) + N·o·n (Y = XW'ᵀ)
           bwd  N·o·n (dX = dY·W')                                           if dX is needed
                + N·o·n (G = dYᵀX) + o·n·n (H = UᵀG) + c·n·(n+k)             if δ, s need grads

c weighs a sparse multiply-add against a dense one (gathers run far below GEMM speed).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

__all__ = ["BACKENDS", "PATHS", "choose_backend", "choose_path", "get_backend", "path_costs"]

BACKENDS = ("auto", "torch", "triton")
PATHS = ("auto", "token", "weight")

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
) -> dict[str, float]:
    """Estimated cost (dense multiply-add units) of one call, forward plus the backward it needs."""
    big_n, o, n = n_rows, out_features, in_features
    c = _SPARSE_WEIGHT.get(device_type, _SPARSE_WEIGHT["cuda"])
    training = needs_input_grad or needs_param_grad
    token = big_n * n * n + (1 + additive) * big_n * o * n
    weight = o * n * n + c * o * (n + k) + big_n * o * n
    # Without gradients the token path folds M into the basis (V·Mᵀ, n·(n+k) sparse work) instead
    # of applying it to the N rows of Z.
    token += c * (big_n if training else n) * (n + k)
    if training:
        token += big_n * o * n
        weight += o * n * n  # W' is kept from the forward, but H = UᵀG is another o·n·n
    if needs_input_grad:
        token += additive * big_n * o * n + big_n * n * n + c * big_n * (n + k)
        weight += big_n * o * n
    if needs_param_grad:
        token += c * big_n * (n + k)
        weight += big_n * o * n + c * n * (n + k)
    return {"token": float(token), "weight": float(weight)}


def choose_path(path: str, **shape) -> str:
    """Resolve ``path`` ('auto' picks the cheaper of ``path_costs(**shape)``)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    costs = path_costs(**shape)
    return "token" if costs["token"] <= costs["weight"] else "weight"


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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    if backend == "triton" and not _triton_usable(device):
        raise RuntimeError(
            f"backend='triton' needs triton installed and a CUDA tensor, or CPU tensors with "
            f"TRITON_INTERPRET=1 set before frod_kernels is imported; got a tensor on {device}"
        )
    return backend


def get_backend(name: str) -> ModuleType:
    """The module implementing the primitives for a resolved backend name (imported lazily)."""
    if name == "torch":
        from .backends import torch_backend

        return torch_backend
    if name == "triton":
        from .backends import triton_backend

        return triton_backend
    raise ValueError(f"unknown backend {name!r}")
