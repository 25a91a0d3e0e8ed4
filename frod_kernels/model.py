"""Putting FRoD into a model: find the targets, group them into categories, decompose, replace.

A category is the set of layers with the same full module path once the layer index is removed
(FROD.md §7): ``encoder.layer.3.attention.self.query`` belongs to
``encoder.layer.*.attention.self.query``, so encoder/decoder or text/vision towers stay apart.
Each category gets one joint decomposition (one shared V) and one sparse pattern Ω, drawn from a
seed derived from the user's seed and the category name.

Targets are ``nn.Linear`` modules or transformers' ``Conv1D`` (GPT-2 style: y = x·Wc + b with Wc
stored (in, out)). A Conv1D is seen through an ``nn.Linear`` whose weight is the view Wcᵀ (no
copy), so y = x·(Wcᵀ)ᵀ + b is the same product and the FRoD layer is exact at init; the FRoD layer
remembers the class (``base_class``) and ``unload_frod`` gives back a Conv1D again, with W'ᵀ
stored contiguously, so the unloaded model has the original architecture and checkpoint layout.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .decomposition import check_weights, joint_decompose, validate_reg
from .layer import MODES, FRoDBasis, FRoDLinear
from .pattern import sample_sparse_pattern, validate_seed, validate_sparse_rate

__all__ = [
    "FRoDSummary",
    "apply_frod",
    "category_name",
    "frod_layers",
    "frod_param_groups",
    "merge_frod",
    "unload_frod",
    "unmerge_frod",
]

logger = logging.getLogger("frod_kernels")

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def category_name(module_name: str) -> str:
    """The module path with its first numeric component (the layer index) replaced by ``*``.

    Later numeric components name a role inside the block (T5's ``block.3.layer.1.DenseReluDense``,
    a nested ``Sequential``), so they stay: ``encoder.block.*.layer.1.DenseReluDense.wi``.
    """
    return _LAYER_INDEX.sub("*", module_name, count=1)


def category_seed(seed: int, category: str) -> int:
    """The pattern seed of one category: stable across machines, distinct across categories."""
    return (seed * 0x9E3779B1 + zlib.crc32(category.encode())) % 2**63


def weight_fingerprint(weights: Sequence[torch.Tensor]) -> str:
    """A short hash of the base weights' shapes, dtypes and a strided sample of their bits."""
    h = hashlib.sha256()
    for w in weights:
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].contiguous().cpu()
        h.update(f"{tuple(w.shape)}:{w.dtype}:".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class FRoDSummary:
    """What ``apply_frod`` did: per category (layers, o, n, k, max reconstruction error)."""

    categories: dict[str, dict] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0

    @property
    def layers(self) -> int:
        return sum(len(c["layers"]) for c in self.categories.values())

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"{'category':<48} {'layers':>6} {'o x n':>11} {'k':>9} {'max rel. err':>12}"]
        for name, c in self.categories.items():
            shape = f"{c['out_features']}x{c['in_features']}"
            lines.append(f"{name:<48} {len(c['layers']):>6} {shape:>11} {c['k']:>9} {c['max_error']:>12.2e}")
        lines.append(
            f"{self.layers} FRoD layers in {len(self.categories)} categories; trainable "
            f"{self.trainable:,} of {self.total:,} parameters ({self.percent:.3f}%)"
        )
        return "\n".join(lines)


def _matcher(target_modules: str | Sequence[str]):
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = list(target_modules)
    if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise ValueError("target_modules must be a regex string or a non-empty list of module-name suffixes")
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def _conv1d_class() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` if transformers is already imported (a model using it imports it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself if it is an nn.Linear; for a Conv1D, an nn.Linear whose weight is Wcᵀ (a view)."""
    if type(module) is nn.Linear:
        return module
    linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=module.weight.requires_grad)
    linear.bias = module.bias
    return linear


def _from_linear(linear: nn.Linear, cls: type[nn.Module]) -> nn.Module:
    """Inverse of ``_as_linear``: ``linear`` itself, or a Conv1D holding Wᵀ (contiguous) and the bias."""
    if cls is nn.Linear:
        return linear
    conv = cls(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad)
    conv.bias = linear.bias
    return conv.to(linear.weight.device)


def _find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> dict[str, list[tuple[str, nn.Module]]]:
    matches = _matcher(target_modules)
    conv1d = _conv1d_class()
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if not name or not matches(name):
            continue
        if isinstance(module, FRoDLinear):
            raise ValueError(f"module {name!r} is already a FRoDLinear (apply_frod was applied before)")
        if type(module) is not nn.Linear and (conv1d is None or type(module) is not conv1d):
            raise TypeError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear or transformers Conv1D")
        groups.setdefault(category_name(name), []).append((name, module))
    if not groups:
        raise ValueError(f"target_modules {target_modules!r} matched no module of the model")
    for cat, members in groups.items():
        shapes = {tuple(_as_linear(m).weight.shape) for _, m in members}
        if len(shapes) > 1:
            raise ValueError(f"category {cat!r} mixes weight shapes {sorted(shapes)}; give narrower targets")
    return groups


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def frod_layers(model: nn.Module) -> dict[str, FRoDLinear]:
    """The model's FRoD layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FRoDLinear)}


def apply_frod(
    model: nn.Module,
    target_modules: str | Sequence[str],
    sparse_rate: float = 0.01,
    seed: int = 0,
    reg: float = 1e-3,
    mode: str = "additive",
    backend: str = "auto",
    path: str = "auto",
    param_dtype: torch.dtype | None = None,
    verbose: bool = False,
) -> FRoDSummary:
    """Replace the targeted ``nn.Linear`` (or ``Conv1D``) modules of ``model`` in place by ``FRoDLinear``.

    Args:
        target_modules: a regex (full match on the module name) or a list of name suffixes.
        sparse_rate: ρ in (0, 1) or 0; seed: base seed of the patterns; reg: α of FROD.md §2.
        mode: 'additive' (keep W) or 'factored' (drop W, FROD.md §6).
        param_dtype: dtype of δ and s (default: each weight's dtype).
        verbose: print one progress line per category to stderr.

    Everything else in the model is frozen (``requires_grad = False``); only δ and s train.
    Returns a summary of the categories, layers and trainable count.
    """
    sparse_rate = validate_sparse_rate(sparse_rate)
    seed, reg = validate_seed(seed), validate_reg(reg)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    groups = _find_targets(model, target_modules)
    for cat, members in groups.items():  # fail before touching the model, not half-way through it
        try:
            check_weights([_as_linear(m).weight for _, m in members])
        except ValueError as exc:
            raise ValueError(f"category {cat!r}: {exc}") from exc
    for p in model.parameters():
        p.requires_grad_(False)
    summary = FRoDSummary()
    for i, (cat, members) in enumerate(groups.items()):
        started = time.perf_counter()
        linears = [_as_linear(m) for _, m in members]
        weights = [lin.weight for lin in linears]
        jb = joint_decompose(weights, reg=reg, name=cat)
        o, n = weights[0].shape
        cseed = category_seed(seed, cat)
        basis = FRoDBasis(
            jb.V, sample_sparse_pattern(n, sparse_rate, cseed), sparse_rate, cseed, reg, name=cat,
        )
        basis.fingerprint = weight_fingerprint(weights)
        basis.layer_names = [name for name, _ in members]
        for (name, module), linear, U, lam in zip(members, linears, jb.U, jb.lam, strict=True):
            layer = FRoDLinear.from_linear(
                linear, basis=(U, jb.V, lam), shared=basis, mode=mode, backend=backend, path=path,
                param_dtype=param_dtype,
            )
            layer.base_class = type(module)
            _replace(model, name, layer)
        summary.categories[cat] = {
            "layers": basis.layer_names, "out_features": o, "in_features": n, "k": basis.k,
            "max_error": max(jb.errors), "jitter": jb.jitter,
        }
        if verbose:
            print(
                f"[frod] {i + 1}/{len(groups)} {cat}: {len(members)} x ({o}, {n}) decomposed in "
                f"{time.perf_counter() - started:.1f}s, max rel. error {max(jb.errors):.1e}",
                file=sys.stderr,
            )
    summary.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary.total = sum(p.numel() for p in model.parameters())
    logger.info("apply_frod: %d layers, %d categories, %d trainable", summary.layers, len(groups), summary.trainable)
    return summary


def merge_frod(model: nn.Module, safe: bool = True) -> None:
    """Merge every FRoD layer (see ``FRoDLinear.merge``); if one refuses, none stays merged."""
    done = []
    try:
        for layer in frod_layers(model).values():
            if not layer.merged:
                layer.merge(safe=safe)
                done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise


def unmerge_frod(model: nn.Module) -> None:
    """Restore every FRoD layer's original weight, bit for bit."""
    for layer in frod_layers(model).values():
        layer.unmerge()


def unload_frod(model: nn.Module, merge: bool = True) -> nn.Module:
    """Give back the replaced modules' classes (``nn.Linear``/``Conv1D``) with W' if ``merge``, else W.

    In factored mode W is rebuilt as U·diag(λ)·Vᵀ (exact up to the decomposition's rounding).
    """
    for name, layer in frod_layers(model).items():
        _replace(model, name, _from_linear(layer.to_linear(merge=merge), layer.base_class))
    return model


def frod_param_groups(
    model: nn.Module, lr_delta: float = 5e-4, lr_sparse: float = 5e-5, lr_other: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer groups with the two learning rates of FROD.md §7 (δ: lr_delta, s: lr_sparse).

    Other trainable parameters (a task head, an unfrozen bias) form a third group, with
    ``lr_other`` if given, else the optimizer's default.
    """
    deltas, sparse, other = [], [], []
    frod_params = {}
    for layer in frod_layers(model).values():
        frod_params[id(layer.delta)] = deltas
        frod_params[id(layer.sparse_values)] = sparse
    for p in model.parameters():
        if p.requires_grad:
            frod_params.get(id(p), other).append(p)
    groups = [
        {"params": deltas, "lr": lr_delta, "weight_decay": weight_decay, "name": "frod_delta"},
        {"params": sparse, "lr": lr_sparse, "weight_decay": weight_decay, "name": "frod_sparse"},
    ]
    if other:
        groups.append({"params": other, "name": "other", **({} if lr_other is None else {"lr": lr_other})})
    return groups
