"""The layers FRoD is compared with, in one place shared by the tests and every benchmark.

All of them map x (..., n) to y (..., o); "trainable" is what an optimiser would update.

``dense_linear(n, o)``      y = x·Wᵀ + b, W (o, n) trainable: the speed floor of docs/design.md §5.
``LoRALinear``              y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ, A (r, n), B (o, r) trainable, B = 0 at init.
``PublishedFRoDLinear``     the FRoD layer computed the way the published code does it (additive form):
                            Z = x·V;  y = x·Wᵀ + b + (Z·diag(δ) + (S·Zᵀ)ᵀ)·Uᵀ with S rebuilt every call
                            as a COO tensor from (indices, s) and ``torch.sparse.mm`` left to autograd.
``NaiveDenseFRoDLinear``    W' = W + U·M·Vᵀ materialised with a dense M (n, n), left to autograd.
``peft_frod_layer``         upstream PEFT's FRoD layer (``FrodConfig``), when ``peft`` is installed;
                            run it under ``quiet_peft``.

The three FRoD baselines take their frozen tensors (W, b, U, V, Ω) from a ``FRoDLinear`` and copy its
δ and s, so for the same parameters they compute the same function (tests/test_baselines.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..layer import FRoDLinear
from ..reference import frod_linear_reference

__all__ = [
    "LoRALinear",
    "NaiveDenseFRoDLinear",
    "PublishedFRoDLinear",
    "dense_linear",
    "lora_rank_for_budget",
    "peft_available",
    "peft_frod_layer",
    "quiet_peft",
]


def dense_linear(
    n: int, o: int, bias: bool = True, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> nn.Linear:
    """A plain ``nn.Linear(n, o)`` whose weight (o, n) and bias train: n·o (+ o) trainable parameters."""
    return nn.Linear(n, o, bias=bias, dtype=dtype, device=device)


def lora_rank_for_budget(n: int, o: int, trainable: int) -> int:
    """The LoRA rank r ≥ 1 whose r·(n + o) trainable parameters come closest to ``trainable``."""
    if n <= 0 or o <= 0 or trainable < 0:
        raise ValueError(f"need n, o > 0 and trainable >= 0, got n={n}, o={o}, trainable={trainable}")
    return max(1, min(min(n, o), round(trainable / (n + o))))


class LoRALinear(nn.Module):
    """y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ with W, b frozen; A (r, n) Kaiming-uniform, B (o, r) zero (LoRA's init).

    Trainable: r·(n + o). ``alpha`` defaults to r (scaling 1).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        o, n = base.weight.shape
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.r, self.scaling = r, (float(r) if alpha is None else float(alpha)) / r
        self.lora_A = nn.Parameter(torch.empty(r, n, **kw))
        self.lora_B = nn.Parameter(torch.zeros(o, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.mT) @ self.lora_B.mT * self.scaling


class _FRoDBaseline(nn.Module):
    """Shares W, b, U, V and Ω with a ``FRoDLinear`` (additive mode) and copies its δ and s."""

    def __init__(self, layer: FRoDLinear) -> None:
        super().__init__()
        if layer.mode != "additive" or layer.merged:
            raise ValueError("baselines are built from an unmerged additive-mode FRoDLinear")
        self.weight, self.bias = layer.weight, layer.bias
        self.register_buffer("U", layer.U, persistent=False)
        self.register_buffer("V", layer.basis.V, persistent=False)
        self.register_buffer("sparse_indices", layer.basis.indices, persistent=False)
        self.delta = nn.Parameter(layer.delta.detach().clone())
        self.sparse_values = nn.Parameter(layer.sparse_values.detach().clone())


class PublishedFRoDLinear(_FRoDBaseline):
    """The published code's computation (PEFT's ``frod`` layer, additive form with δ):

        Z = x·V (N, n);   S = sparse_coo_tensor(Ω, s).coalesce()   (rebuilt every call)
        y = x·Wᵀ + b + (Z ⊙ δ + (S·Zᵀ)ᵀ)·Uᵀ

    i.e. y = x·(W + U·(diag(δ) + S)·Vᵀ)ᵀ + b; autograd differentiates through ``torch.sparse.mm``
    (in float16/bfloat16 the published code densifies S instead, and so does this layer).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.V.shape[0]
        s = torch.sparse_coo_tensor(
            self.sparse_indices, self.sparse_values, (n, n), check_invariants=False,
        ).coalesce()
        z = x.reshape(-1, n) @ self.V
        if z.dtype in (torch.float16, torch.bfloat16):  # as published: no half-precision sparse addmm on CUDA
            rotated = z * self.delta + z @ s.to_dense().t()
        else:
            rotated = z * self.delta + torch.sparse.mm(s, z.t()).t()
        out = nn.functional.linear(x, self.weight, self.bias)
        return out + (rotated @ self.U.t()).reshape(out.shape)


class NaiveDenseFRoDLinear(_FRoDBaseline):
    """W' = W + U·(diag(δ) + S)·Vᵀ materialised with a dense M (n, n), y = x·W'ᵀ + b, left to autograd.

    This is ``frod_linear_reference`` used as a layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frod_linear_reference(
            x, self.weight, self.bias, self.U, self.V, self.delta, self.sparse_indices, self.sparse_values,
        )


def peft_available() -> bool:
    """True when upstream PEFT with its FRoD tuner (``FrodConfig``) can be imported."""
    if importlib.util.find_spec("peft") is None:
        return False
    import peft

    return hasattr(peft, "FrodConfig")


class _Holder(nn.Module):
    """A one-layer model for PEFT to wrap: ``self.proj`` is the target."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_frod_layer(linear: nn.Linear, sparse_rate: float = 0.01, seed: int = 0) -> nn.Module | None:
    """Upstream PEFT's FRoD layer around ``linear`` (replacement form y = x·(U·(Λ+S)·Vᵀ)ᵀ + b, Λ
    trainable from its decomposition value), or None when PEFT (with ``FrodConfig``) is not installed.

    The returned module maps x (..., n) to (..., o); PEFT's layer is ``returned.base_model.model.proj``.
    """
    if not peft_available():
        return None
    from peft import FrodConfig, get_peft_model

    config = FrodConfig(target_modules=["proj"], sparse_rate=sparse_rate, projection_prng_key=seed, progressbar=False)
    return get_peft_model(_Holder(linear), config)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Hide torch's warning that PEFT's FRoD layer triggers by building its sparse tensor without saying
    whether to check the sparse invariants: PEFT's choice, nothing a reader of a benchmark can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled",
                                category=UserWarning)
        yield
