"""Validate every available backend × path against the float64 reference (docs/design.md §3-§4).

For one problem (x, W, b, and U, λ, V from the decomposition of W; Ω, δ and s non-zero) and upstream
gradient dY, every path (token, weight, basis: the last computes with U·diag(λ)·Vᵀ in place of W), each tensor
T ∈ {y, dx, dδ, ds, db} is compared with the float64 reference by its relative error

    err(T) = max|T − T₆₄| / max|T₆₄|.

The criterion is relative to what plain PyTorch achieves in the same dtype: the reference formula
(W' materialised, autograd) run in that dtype has error err_plain(T), and a kernel passes when
err(T) ≤ 2·err_plain(T) + atol, atol = eps(dtype) (16·eps in float64, where the plain run *is* the
reference and err_plain = 0): ``reference.error_tolerance``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from ..decomposition import joint_decompose
from ..dispatch import choose_backend
from ..functional import frod_linear
from ..pattern import sample_sparse_pattern
from ..reference import error_tolerance, frod_linear_reference, relative_error

__all__ = ["PATHS", "TENSORS", "available_backends", "relative_error", "skipped_backends", "validate"]

PATHS = ("token", "weight", "basis")
TENSORS = ("y", "dx", "ddelta", "ds", "dbias")


def skipped_backends(device: torch.device) -> dict[str, str]:
    """The backends that cannot run on ``device`` here, each with the reason."""
    try:
        choose_backend("triton", device)
    except RuntimeError:
        if importlib.util.find_spec("triton") is None:
            return {"triton": "triton is not installed"}
        if device.type == "cpu":
            return {"triton": "Triton runs on CUDA; on CPU only under its interpreter "
                              "(TRITON_INTERPRET=1 set before frod_kernels is imported)"}
        return {"triton": f"Triton cannot run on {device}"}
    return {}


def available_backends(device: torch.device) -> list[str]:
    """'torch', plus 'triton' on CUDA or on CPU when TRITON_INTERPRET=1 was set before the import."""
    return ["torch", *(b for b in ("triton",) if b not in skipped_backends(device))]


def _problem(o: int, n: int, lead: tuple[int, ...], rate: float, seed: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    indices = sample_sparse_pattern(n, rate, seed).to(device)
    weight = rnd(o, n, scale=n**-0.5)
    jb = joint_decompose([weight])  # W = U·diag(λ)·Vᵀ in float64, so the basis path applies
    return {
        "x": rnd(*lead, n), "weight": weight, "bias": rnd(o), "U": jb.U[0], "V": jb.V, "lam": jb.lam[0],
        "delta": rnd(n, scale=0.3), "indices": indices, "values": rnd(indices.shape[1], scale=0.3),
        "gy": rnd(*lead, o),
    }


def _outputs(fn: Callable[..., torch.Tensor], p: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """y and the gradients of x, δ, s, b from one forward + backward of ``fn`` in ``dtype``."""
    x, delta, values, bias = (p[k].to(dtype, copy=True).requires_grad_() for k in ("x", "delta", "values", "bias"))
    weight, U, V = (p[k].to(dtype) for k in ("weight", "U", "V"))
    y = fn(x, weight, bias, U, V, delta, p["indices"], values)
    y.backward(p["gy"].to(dtype))
    return {"y": y.detach(), "dx": x.grad, "ddelta": delta.grad, "ds": values.grad, "dbias": bias.grad}


def validate(
    device: torch.device, dtype: torch.dtype, backends: list[str] | None = None,
    shapes: tuple[tuple[int, int, tuple[int, ...]], ...] = ((96, 80, (3, 17)), (64, 64, (200,))),
    rate: float = 0.05, seed: int = 0,
) -> list[dict]:
    """One row per (backend, path, shape): errors per tensor, plain-PyTorch errors, pass/fail."""
    rows = []
    for o, n, lead in shapes:
        p = _problem(o, n, lead, rate, seed, device)
        exact = _outputs(frod_linear_reference, p, torch.float64)
        plain = _outputs(frod_linear_reference, p, dtype)
        plain_err = {t: relative_error(plain[t], exact[t]) for t in TENSORS}
        for backend in backends or available_backends(device):
            for path in PATHS:
                lam = p["lam"].to(dtype) if path == "basis" else None

                def ours(*args, backend=backend, path=path, lam=lam):
                    return frod_linear(*args, backend=backend, path=path, lam=lam)

                got = _outputs(ours, p, dtype)
                err = {t: relative_error(got[t], exact[t]) for t in TENSORS}
                tol = {t: error_tolerance(plain_err[t], dtype) for t in TENSORS}
                rows.append({
                    "backend": backend, "path": path, "shape": {"o": o, "n": n, "x": [*lead, n]},
                    "dtype": str(dtype).removeprefix("torch."), "errors": err, "plain_errors": plain_err,
                    "tolerance": tol, "ok": all(err[t] <= tol[t] for t in TENSORS),
                })
    return rows
