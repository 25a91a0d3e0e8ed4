"""First-use self-check of the Triton kernels on a GPU: never train silently on wrong numbers.

The first time the Triton backend is asked to run on a (device, dtype) (for float32: and TF32
setting), one small call of each Triton primitive is compared with the PyTorch backend on the
same inputs upcast to float64:

    dual_matmul   Y = A1·B1ᵀ + A2·B2ᵀ + b   (R, C) = (37, 45), K1 = 40, K2 = 24, A1 a transposed view
    dual_matmul   Y = A1·B1ᵀ                 (the plain GEMM; also what the weight path launches)
    m_matmul      M·B and Mᵀ·B               n = 40, R = 33, k = 160 pattern entries
    sddmm         (C[i, i], C[r_j, c_j]) of C = Aᵀ-rows · Bᵀ-rows,   (n, T) = (40, 70)

with error bound |got − exact| ≤ tol(dtype) · Σ|terms| elementwise (Σ|terms| is the same sum over
absolute values, so the bound is tight even where terms cancel). tol is a few units of the
dtype's rounding, TF32 included. On a mismatch, a non-finite value or any exception, the backend
warns once for the device (naming the ``frod-kernels`` command that validates every backend and
path there against the float64 reference) and every later call on that
device uses the PyTorch backend; ``dispatch`` asks ``triton_ok`` before each Triton primitive.

Only CUDA devices are checked (``CHECKED_DEVICE_TYPES``). Under the CPU interpreter the Triton
kernels are what the tests exercise, and the tests check this module by adding "cpu" and
breaking a kernel on purpose. While a CUDA graph is being captured no check can run (it
allocates and synchronises): such calls run Triton unchecked and the check happens at the next
eager call.
"""

from __future__ import annotations

import threading
import warnings

import torch

from ..pattern import SparsePattern, sample_sparse_pattern

__all__ = ["CHECKED_DEVICE_TYPES", "reset", "triton_ok"]

CHECKED_DEVICE_TYPES: set[str] = {"cuda"}

# Error allowed per unit of Σ|terms|: ~ a few roundings of the dtype (TF32 has a 10-bit mantissa,
# like fp16) plus the K-term accumulation in float32.
_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}
_TF32_TOL = 4e-3

_lock = threading.Lock()
_results: dict[tuple[torch.device, torch.dtype, str], bool] = {}
_failed_devices: set[torch.device] = set()


def reset() -> None:
    """Forget every result (the next Triton call on each device and dtype checks again)."""
    with _lock:
        _results.clear()
        _failed_devices.clear()


def triton_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton backend may run on this device and dtype (checking it on first use)."""
    if device.type not in CHECKED_DEVICE_TYPES:
        return True
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    from .triton_backend import input_precision

    # float32 runs other kernels with TF32 on than off: each precision gets its own check.
    key = (device, dtype, input_precision(dtype))
    if key in _results:
        return _results[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    with _lock:
        if key in _results:
            return _results[key]
        if device in _failed_devices:
            _results[key] = False
            return False
        problem = _check(device, dtype)
        if problem is not None:
            _failed_devices.add(device)
            name = str(dtype).removeprefix("torch.")
            warnings.warn(
                f"frod_kernels: the Triton backend failed its first-use self-check on {device} "
                f"({name}): {problem}. Every FRoD call on {device} now uses the PyTorch backend. "
                f"`frod-kernels --device {device} --dtype {name}` validates every backend and path there.",
                RuntimeWarning,
                stacklevel=4,
            )
        _results[key] = problem is None
        return _results[key]


def _within(name: str, got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, tol: float) -> str | None:
    """None if |got − exact| ≤ tol·scale everywhere (exact, scale in float64), else a description."""
    if got.shape != exact.shape:
        return f"{name} gave shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    err = (got.double() - exact).abs()
    bound = tol * scale + 1e-30
    if not bool(torch.isfinite(got).all()):
        return f"{name} returned non-finite values"
    worst = (err / bound).max().item() if err.numel() else 0.0
    return f"{name} is off by {worst:.3g}× its error bound" if worst > 1 else None


def _check(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if every Triton primitive matches the PyTorch backend here, else what went wrong."""
    from . import torch_backend, triton_backend

    tol = _TF32_TOL if triton_backend.input_precision(dtype) == "tf32" else _TOL.get(dtype, 1e-2)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def exact(fn, *args):
        """The PyTorch backend on float64 copies of args, and on their absolute values."""
        up = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
        absolute = [a.abs() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in up]
        return fn(*up), fn(*absolute)

    n = 40
    pattern = SparsePattern.from_indices(sample_sparse_pattern(n, 0.1, 0).to(device), n)
    try:
        a1, b1, a2, b2, bias = rand(40, 37).t(), rand(45, 40), rand(37, 24), rand(45, 24), rand(45)
        want, scale = exact(torch_backend.dual_matmul, a1, b1, a2, b2, bias)
        problem = _within("dual_matmul", triton_backend.dual_matmul(a1, b1, a2, b2, bias), want, scale, tol)
        if problem is None:
            want, scale = exact(torch_backend.dual_matmul, a1, b1)
            problem = _within("dual_matmul (one product)", triton_backend.dual_matmul(a1, b1), want,
                              scale, tol)
        b, diag, values = rand(n, 33), rand(n), rand(pattern.k)
        for transpose in (False, True):
            if problem is None:
                want, scale = exact(torch_backend.m_matmul, b, diag, values, pattern, transpose)
                got = triton_backend.m_matmul(b, diag, values, pattern, transpose)
                problem = _within(f"m_matmul (transpose={transpose})", got, want, scale, tol)
        if problem is None:
            at, bt = rand(n, 70), rand(n, 70)
            (want_d, want_v), (scale_d, scale_v) = exact(torch_backend.sddmm, at, bt, pattern)
            got_d, got_v = triton_backend.sddmm(at, bt, pattern)
            problem = _within("sddmm (diagonal)", got_d, want_d, scale_d, tol) or _within(
                "sddmm (pattern)", got_v, want_v, scale_v, tol
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a kernel fault surfaces here, inside the try
    except Exception as exc:  # any failure of the toolchain is a reason to fall back
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return problem
