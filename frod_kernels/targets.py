"""Module plumbing: find modules by name, see a transformers ``Conv1D`` as an ``nn.Linear``, replace
modules in a model, and undo all of it (PEFT's ``BaseTuner`` job, without FRoD's maths).

Targets are ``nn.Linear`` modules or transformers' ``Conv1D`` (GPT-2 style: y = x·Wc + b with Wc
stored (in, out)). A Conv1D is seen through an ``nn.Linear`` whose weight is the view Wcᵀ (no
copy), so y = x·(Wcᵀ)ᵀ + b is the same product; ``from_linear_view`` gives a Conv1D back, with Wᵀ
stored contiguously, so an unloaded model has the original architecture and checkpoint layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from .base_layers import conv1d_class, dense_weight, is_bnb_layer, is_quantized
from .layer import FRoDBasis, FRoDLayer

__all__ = [
    "ModelTransaction", "Target", "as_linear", "check_replaceable", "find_targets", "frod_categories",
    "frod_layers", "frod_param_ids", "from_linear_view", "matcher", "modules_with_all_names", "replace_module",
]


def matcher(target_modules: str | Sequence[str]) -> Callable[[str], bool]:
    """A predicate on module names: a regex (full match) or a list of name suffixes."""
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = list(target_modules)
    if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise ValueError("target_modules must be a regex string or a non-empty list of module-name suffixes")
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself if it is an nn.Linear; for a Conv1D, an nn.Linear whose weight is Wcᵀ (a view);
    for a quantized layer, one whose weight is the dequantized W (a copy, for checks and shapes)."""
    quantized = is_bnb_layer(module) or is_quantized(module)
    if type(module) is nn.Linear and not quantized:
        return module
    weight = dense_weight(module) if quantized else module.weight.t()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=module.weight.requires_grad)
    linear.bias = module.bias
    return linear


def from_linear_view(linear: nn.Linear, cls: type[nn.Module]) -> nn.Module:
    """Inverse of ``as_linear``: ``linear`` itself, or a Conv1D holding Wᵀ (contiguous) and the bias."""
    if cls is nn.Linear:
        return linear
    conv = cls(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad)
    conv.bias = linear.bias
    return conv.to(linear.weight.device)


@dataclass
class Target:
    """A module: its canonical name (the first ``named_modules`` gives) and every name under which
    the model reaches it (a module assigned to two attributes has two)."""

    name: str
    aliases: list[str]
    module: nn.Module


def modules_with_all_names(model: nn.Module) -> list[Target]:
    """Every submodule once, in ``named_modules`` order, with all the names it is reachable under."""
    found: dict[int, Target] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            found.setdefault(id(module), Target(name, [], module)).aliases.append(name)
    return list(found.values())


def check_replaceable(target: Target) -> None:
    """Raise unless ``target`` is an ``nn.Linear``, transformers ``Conv1D`` or bitsandbytes layer (not yet FRoD)
    with weights (whether a mode can take a quantized layer is the caller's to check)."""
    if isinstance(target.module, FRoDLayer):
        raise ValueError(f"module {target.name!r} is already a FRoD layer (apply_frod was applied before)")
    conv1d = conv1d_class()
    if type(target.module) is not nn.Linear and (conv1d is None or type(target.module) is not conv1d) and not (
            is_bnb_layer(target.module)):
        raise TypeError(
            f"target {target.name!r} is a {type(target.module).__name__}, not an nn.Linear, transformers Conv1D or "
            f"bitsandbytes linear layer"
        )
    if target.module.weight.device.type == "meta":
        raise ValueError(
            f"target {target.name!r} has its weight on the meta device: FRoD's basis is computed from the base "
            f"weights, so load them first (model.to_empty(device=...) then load_state_dict, or from_pretrained "
            f"without a meta device), then apply FRoD"
        )


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[Target]:
    """The replaceable modules whose names (any alias) match ``target_modules``; at least one."""
    matches = matcher(target_modules)
    targets = []
    for target in modules_with_all_names(model):
        if any(matches(name) for name in target.aliases):
            check_replaceable(target)
            targets.append(target)
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} matched no module of the model")
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at module path ``name``; return the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class ModelTransaction:
    """Undo log for changes to a model: module replacements, ``requires_grad`` flags and in-place
    changes registered with their undo (``defer``).

    ``with ModelTransaction(model) as tx:`` rolls every recorded change back if the block raises,
    so a refused call leaves the model exactly as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._replaced: list[tuple[str, nn.Module]] = []
        self._undo: list[Callable[[], None]] = []

    def defer(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` on rollback (after every later change is undone): for in-place changes."""
        self._undo.append(undo)

    def replace(self, name: str, new: nn.Module) -> None:
        self._replaced.append((name, replace_module(self.model, name, new)))

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        for name, old in reversed(self._replaced):
            replace_module(self.model, name, old)
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def __enter__(self) -> ModelTransaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()


def frod_layers(model: nn.Module) -> dict[str, FRoDLayer]:
    """The model's FRoD layers by module name (a layer reachable under several names: the first)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FRoDLayer)}


def frod_categories(model: nn.Module) -> dict[str, tuple[FRoDBasis, list[str]]]:
    """{category name: (its FRoDBasis, its layers' names)} for every FRoD layer of ``model``.

    A layer built on its own (``FRoDLinear.from_linear``) is a category of one, named after it.
    """
    cats: dict[str, tuple[FRoDBasis, list[str]]] = {}
    by_basis: dict[int, str] = {}
    for name, layer in frod_layers(model).items():
        key = by_basis.setdefault(id(layer.basis), layer.basis.name or name)
        cats.setdefault(key, (layer.basis, []))[1].append(name)
    return cats


def frod_param_ids(model: nn.Module) -> set[int]:
    """ids of every FRoD layer's δ and s."""
    return {id(p) for layer in frod_layers(model).values() for p in (layer.delta, layer.sparse_values)}
