"""Putting FRoD into a model: find the targets, group them into categories, decompose, replace.

A category is the set of layers with the same full module path once the layer index is removed
(docs/design.md §7): ``encoder.layer.3.attention.self.query`` belongs to
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

import logging
import re
import sys
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FRoDConfig
from .decomposition import check_weights, joint_decompose, validate_reg
from .dispatch import BACKENDS, PATHS
from .fingerprint import weight_fingerprint
from .layer import MODES, FRoDBasis, FRoDLinear
from .pattern import sample_sparse_pattern, validate_seed, validate_sparse_rate

__all__ = [
    "CategorySpec",
    "FRoDCheckpointWarning",
    "FRoDSummary",
    "ModelTransaction",
    "apply_categories",
    "apply_frod",
    "category_name",
    "frod_categories",
    "frod_layers",
    "frod_param_groups",
    "frod_param_ids",
    "merge_frod",
    "print_trainable_parameters",
    "summarize",
    "trainable_parameters",
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


@dataclass
class FRoDSummary:
    """The FRoD categories of a model after ``apply_frod``: per category (layers, o, n, k, rate,
    max reconstruction error, the basis path's deviation), and the trainable count of the whole model.

    The basis path (``FRoDLinear``, docs/design.md §5) per category: ``basis_ratio`` is the largest
    deviation / tolerance over its layers in the weights' dtype (≤ 1: within the error criterion),
    ``basis_layers`` how many layers may take it; "exact" (every layer has ``exact=True``) or
    "factored" (the category computes in the basis by construction) instead of a ratio.

    It covers every FRoD layer of the model, those of earlier ``apply_frod`` calls included.
    """

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
        lines = [f"{'category':<48} {'layers':>6} {'o x n':>11} {'k':>9} {'rate':>7} {'max rel. err':>12} "
                 f"{'basis dev/tol':>16}"]
        for name, c in self.categories.items():
            shape = f"{c['out_features']}x{c['in_features']}"
            ratio = c["basis_ratio"]
            basis = ratio if isinstance(ratio, str) else f"{ratio:.2f} ({c['basis_layers']}/{len(c['layers'])} ok)"
            lines.append(
                f"{name:<48} {len(c['layers']):>6} {shape:>11} {c['k']:>9} {c['sparse_rate']:>7g} "
                f"{c['max_error']:>12.2e} {basis:>16}"
            )
        lines.append(
            f"{self.layers} FRoD layers in {len(self.categories)} categories; trainable "
            f"{self.trainable:,} of {self.total:,} parameters ({self.percent:.3f}%)"
        )
        return "\n".join(lines)


@dataclass
class CategorySpec:
    """What builds one category: its layers (module names) and the inputs of its basis and Ω.

    ``seed`` is the pattern's own seed (``category_seed(base_seed, name)`` under ``apply_frod``);
    ``base_seed`` is the seed the user gave, kept for messages and adapters.
    """

    layers: list[str]
    sparse_rate: float
    seed: int
    reg: float
    mode: str
    base_seed: int | None = None


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


def summarize(model: nn.Module) -> FRoDSummary:
    """The ``FRoDSummary`` of every FRoD category in ``model`` and its trainable count."""
    summary = FRoDSummary()
    all_layers = frod_layers(model)
    for name, (basis, layers) in frod_categories(model).items():
        layer = all_layers[layers[0]]
        summary.categories[name] = {
            "layers": layers, "out_features": layer.out_features, "in_features": layer.in_features, "k": basis.k,
            "sparse_rate": basis.sparse_rate, "seed": basis.base_seed, "reg": basis.reg,
            "max_error": basis.max_error, "jitter": basis.jitter,
            **_basis_summary([all_layers[n] for n in layers]),
        }
    summary.trainable, summary.total = trainable_parameters(model)
    return summary


def _basis_summary(layers: list[FRoDLinear]) -> dict:
    """``basis_ratio`` and ``basis_layers`` of one category (see ``FRoDSummary``)."""
    if all(layer.mode == "factored" for layer in layers):
        return {"basis_ratio": "factored", "basis_layers": len(layers)}
    measured = [layer.basis_deviation() for layer in layers if not layer.exact and layer.mode == "additive"]
    if not measured:
        return {"basis_ratio": "exact", "basis_layers": 0}
    return {"basis_ratio": max(dev / tol for dev, tol in measured),
            "basis_layers": sum(dev <= tol for dev, tol in measured)}


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


@dataclass
class _Target:
    """A module to replace: its canonical name (the first ``named_modules`` gives) and every name
    under which the model reaches it (a module assigned to two attributes has two)."""

    name: str
    aliases: list[str]
    module: nn.Module


def _modules_with_all_names(model: nn.Module) -> list[_Target]:
    """Every submodule once, in ``named_modules`` order, with all the names it is reachable under."""
    found: dict[int, _Target] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            found.setdefault(id(module), _Target(name, [], module)).aliases.append(name)
    return list(found.values())


def _check_replaceable(target: _Target) -> None:
    """Raise unless ``target`` is an ``nn.Linear`` or transformers ``Conv1D`` (not yet FRoD)."""
    if isinstance(target.module, FRoDLinear):
        raise ValueError(f"module {target.name!r} is already a FRoDLinear (apply_frod was applied before)")
    conv1d = _conv1d_class()
    if type(target.module) is not nn.Linear and (conv1d is None or type(target.module) is not conv1d):
        raise TypeError(
            f"target {target.name!r} is a {type(target.module).__name__}, not an nn.Linear or transformers Conv1D"
        )


def _find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[_Target]:
    matches = _matcher(target_modules)
    targets = []
    for target in _modules_with_all_names(model):
        if any(matches(name) for name in target.aliases):
            _check_replaceable(target)
            targets.append(target)
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} matched no module of the model")
    return targets


def _group(targets: list[_Target], taken: set[str]) -> dict[str, list[_Target]]:
    """Categories: same path pattern (``category_name``) and same weight shape.

    Layers of different shapes can never share a basis, so a pattern that holds several shapes
    (a top-level ``Sequential``'s ``0`` and ``2``) becomes one category per shape, named
    ``pattern[oxn]``. A name already used by an earlier ``apply_frod`` call gets ``#2``, ``#3``….
    """
    by_pattern: dict[str, dict[tuple[int, int], list[_Target]]] = {}
    for t in targets:
        shape = tuple(_as_linear(t.module).weight.shape)
        by_pattern.setdefault(category_name(t.name), {}).setdefault(shape, []).append(t)
    groups: dict[str, list[_Target]] = {}
    for pattern, shapes in by_pattern.items():
        for (o, n), members in shapes.items():
            base = pattern if len(shapes) == 1 else f"{pattern}[{o}x{n}]"
            name, i = base, 1
            while name in taken or name in groups:
                i += 1
                name = f"{base}#{i}"
            groups[name] = members
    return groups


class ModelTransaction:
    """Undo log for changes to a model: module replacements and ``requires_grad`` flags.

    ``with ModelTransaction(model) as tx:`` rolls every recorded change back if the block raises,
    so a refused call leaves the model exactly as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._replaced: list[tuple[str, nn.Module]] = []

    def replace(self, name: str, new: nn.Module) -> None:
        self._replaced.append((name, _replace(self.model, name, new)))

    def rollback(self) -> None:
        for name, old in reversed(self._replaced):
            _replace(self.model, name, old)
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def __enter__(self) -> ModelTransaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at module path ``name``; return the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def frod_layers(model: nn.Module) -> dict[str, FRoDLinear]:
    """The model's FRoD layers by module name (a layer reachable under several names: the first)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FRoDLinear)}


def _validate_layer_options(mode: str, backend: str, path: str, param_dtype: torch.dtype | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if param_dtype is not None and not (isinstance(param_dtype, torch.dtype) and param_dtype.is_floating_point):
        raise TypeError(f"param_dtype must be a floating-point torch.dtype, got {param_dtype!r}")


def _check_category_weights(groups: dict[str, list[_Target]]) -> None:
    for cat, members in groups.items():
        try:
            check_weights([_as_linear(t.module).weight for t in members])
        except ValueError as exc:
            raise ValueError(f"category {cat!r}: {exc}") from exc


def _build_category(
    tx: ModelTransaction, name: str, members: list[_Target], spec: CategorySpec, backend: str, path: str,
    param_dtype: torch.dtype | None, fingerprint: str | None = None, exact: bool = False,
) -> FRoDBasis:
    """Decompose one category, draw its Ω and put a FRoDLinear wherever each member was."""
    linears = [_as_linear(t.module) for t in members]
    weights = [lin.weight for lin in linears]
    fingerprint = fingerprint or weight_fingerprint(weights)
    jb = joint_decompose(weights, reg=spec.reg, name=name)
    n = weights[0].shape[1]
    basis = FRoDBasis(
        jb.V, sample_sparse_pattern(n, spec.sparse_rate, spec.seed), spec.sparse_rate, spec.seed, spec.reg, name=name,
        base_seed=spec.base_seed, source="joint_decompose", fingerprint=fingerprint, max_error=max(jb.errors),
        jitter=jb.jitter,
    )
    for t, linear, U, lam in zip(members, linears, jb.U, jb.lam, strict=True):
        layer = FRoDLinear.from_linear(
            linear, basis=(U, jb.V, lam), shared=basis, mode=spec.mode, backend=backend, path=path,
            param_dtype=param_dtype, exact=exact,
        )
        layer.base_class = type(t.module)
        for alias in t.aliases:
            tx.replace(alias, layer)
    return basis


def _freeze_all_but_frod(model: nn.Module, keep: set[int]) -> None:
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def frod_param_ids(model: nn.Module) -> set[int]:
    """ids of every FRoD layer's δ and s."""
    return {id(p) for layer in frod_layers(model).values() for p in (layer.delta, layer.sparse_values)}


def apply_frod(
    model: nn.Module,
    target_modules: str | Sequence[str] | FRoDConfig,
    sparse_rate: float = 0.01,
    seed: int = 0,
    reg: float = 1e-3,
    mode: str = "additive",
    backend: str = "auto",
    path: str = "auto",
    param_dtype: torch.dtype | None = None,
    modules_to_save: Sequence[str] = (),
    progress: bool | None = None,
    verbose: bool = False,
    exact: bool = False,
) -> FRoDSummary:
    """Replace the targeted ``nn.Linear`` (or ``Conv1D``) modules of ``model`` in place by ``FRoDLinear``.

    Args:
        target_modules: a regex (full match on the module name) or a list of name suffixes, or a
            ``FRoDConfig`` (then its fields replace sparse_rate, seed, reg, mode, modules_to_save).
            A module reachable under several names is matched by any of them and replaced under all.
        sparse_rate: ρ in (0, 1) or 0; seed: base seed of the patterns; reg: α of docs/design.md §2.
        mode: 'additive' (keep W) or 'factored' (drop W, docs/design.md §6).
        param_dtype: dtype of δ and s (default: each weight's dtype).
        modules_to_save: name suffixes of modules (a task head) that stay trainable; ``save_frod``
            saves them and ``load_frod`` restores them.
        progress: a progress bar over categories on stderr (tqdm, if installed); default: when
            stderr is a terminal.
        verbose: print one line per category to stderr (for logs).
        exact: the layers never take the basis path (``FRoDLinear``): bit-identical to the base
            model at initialisation. Otherwise the basis path is allowed per layer where its
            deviation is within tolerance; the summary reports it per category.

    Categories are the targets with the same path pattern (``category_name``) and weight shape.
    Every other parameter of the model is frozen (``requires_grad = False``) except the δ and s of
    FRoD layers from earlier calls, which keep their state (calls compose), and ``modules_to_save``.
    Everything is checked before the model is touched, and a call that fails half-way is rolled
    back, so a refused call leaves the model exactly as it was. The config is appended to
    ``model.frod_configs``. Returns a summary of all the model's FRoD categories.
    """
    if isinstance(target_modules, FRoDConfig):
        config = target_modules
    else:
        config = FRoDConfig(target_modules, sparse_rate, seed, reg, mode, modules_to_save)
    sparse_rate = validate_sparse_rate(config.sparse_rate)
    seed, reg, mode = validate_seed(config.seed), validate_reg(config.reg), config.mode
    _validate_layer_options(mode, backend, path, param_dtype)
    existing = frod_categories(model)
    targets = _find_targets(model, config.target_modules)
    groups = _group(targets, set(existing))
    _check_category_weights(groups)  # fail before touching the model, not half-way through it
    saved = _find_modules_to_save(model, config.modules_to_save, targets)
    keep = frod_param_ids(model)
    bar = _progress_bar(len(groups), progress)
    try:
        with ModelTransaction(model) as tx:
            _freeze_all_but_frod(model, keep)
            for i, (cat, members) in enumerate(groups.items()):
                started = time.perf_counter()
                spec = CategorySpec([t.name for t in members], sparse_rate, category_seed(seed, cat), reg, mode, seed)
                basis = _build_category(tx, cat, members, spec, backend, path, param_dtype, exact=exact)
                _report(bar, verbose, i, len(groups), cat, basis, len(members), started)
            for module in saved:
                module.requires_grad_(True)
    finally:
        if bar is not None:
            bar.close()
    model.frod_configs = [*getattr(model, "frod_configs", []), config]
    _guard_save_pretrained(model)
    summary = summarize(model)
    logger.info("apply_frod: %d layers, %d categories, %d trainable", summary.layers, len(groups), summary.trainable)
    return summary


def _find_modules_to_save(model: nn.Module, names: Sequence[str], targets: list[_Target]) -> list[nn.Module]:
    """The modules named by ``modules_to_save`` (suffixes); each must match, none may be a target."""
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"modules_to_save must be a list of module-name suffixes, got {names!r}")
    target_ids = {id(t.module) for t in targets}
    modules = _modules_with_all_names(model)
    found = []
    for suffix in names:
        matches = _matcher([suffix])
        matched = [t for t in modules if any(matches(a) for a in t.aliases)]
        if not matched:
            raise ValueError(f"modules_to_save entry {suffix!r} matched no module of the model")
        for t in matched:
            if id(t.module) in target_ids:
                raise ValueError(f"module {t.name!r} is both a FRoD target and in modules_to_save")
            found.append(t.module)
    return found


def _progress_bar(total: int, enabled: bool | None):
    """A tqdm bar over categories, or None (disabled, not a terminal, or tqdm not installed)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="apply_frod", unit="category", file=sys.stderr)


def _report(bar, verbose: bool, i: int, total: int, name: str, basis: FRoDBasis, layers: int, started: float) -> None:
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.set_postfix_str(f"{name}: {layers} layers, {seconds:.1f}s")
        bar.update(1)
    if verbose:
        print(
            f"[frod] {i + 1}/{total} {name}: {layers} x ({basis.n}, {basis.n}) basis, decomposed in "
            f"{seconds:.1f}s, max rel. error {basis.max_error:.1e}",
            file=sys.stderr,
        )


class FRoDCheckpointWarning(UserWarning):
    """A checkpoint is about to be written that transformers would reload without the adapter."""


class _SavePretrainedGuard:
    """Stands in for ``model.save_pretrained`` on a transformers model with FRoD layers.

    transformers' ``from_pretrained`` rebuilds plain layers and drops δ and s, so a plain
    ``save_pretrained()`` loses the trained function on reload. Without ``state_dict=`` (which
    the HF Trainer and ``frod_kernels.save_pretrained`` pass) this warns, then saves as asked.
    A plain object, not a bound function, so that the model still pickles and deep-copies.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        if "state_dict" not in kwargs and frod_layers(self.model):
            warnings.warn(
                "save_pretrained() on a model with FRoD layers writes the base weights beside delta and "
                "sparse_values, and from_pretrained() rebuilds plain layers and drops them: the reloaded model "
                "loses the adapter. Use frod_kernels.save_pretrained(model, dir) for a checkpoint with merged "
                "weights, or frod_kernels.save_frod(model, dir) for the adapter.",
                FRoDCheckpointWarning, stacklevel=2,
            )
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def _guard_save_pretrained(model: nn.Module) -> None:
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in vars(model):
        model.save_pretrained = _SavePretrainedGuard(model)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as ``requires_grad`` says now (shared parameters once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


def apply_categories(
    model: nn.Module, specs: dict[str, CategorySpec], fingerprints: dict[str, str], tx: ModelTransaction,
) -> None:
    """Rebuild FRoD categories exactly as described (``load_frod`` on a base model): each layer by
    its module name, each category's basis checked against ``fingerprints`` before decomposing.

    Changes go through ``tx``; the caller rolls them back if anything after this fails.
    """
    by_name = {name: t for t in _modules_with_all_names(model) for name in t.aliases}
    groups: dict[str, list[_Target]] = {}
    for cat, spec in specs.items():
        missing = [name for name in spec.layers if name not in by_name]
        if missing:
            raise ValueError(_missing_layers_message(cat, missing, list(by_name)))
        groups[cat] = [by_name[name] for name in spec.layers]
        for t in groups[cat]:
            _check_replaceable(t)
    _check_category_weights(groups)
    computed = {
        cat: weight_fingerprint([_as_linear(t.module).weight for t in members]) for cat, members in groups.items()
    }
    for cat, fp in computed.items():
        if fp != fingerprints[cat]:
            raise ValueError(f"category {cat!r}: the model's base weights differ from those the adapter was trained on")
    _freeze_all_but_frod(model, frod_param_ids(model))
    for cat, members in groups.items():
        spec = specs[cat]
        _build_category(tx, cat, members, spec, "auto", "auto", None, fingerprint=computed[cat])
    _guard_save_pretrained(model)


def _missing_layers_message(cat: str, missing: list[str], names: list[str]) -> str:
    """Name the missing layers; if the model has them under a prefix (or they have one the model
    lacks), say which: the usual cause is an adapter saved from a wrapper and loaded into the bare
    model, or the other way round."""
    head = f"category {cat!r}: {len(missing)} adapter layer(s) not in the model, e.g. {missing[0]!r}"
    first = missing[0]
    if not first:
        return (f"{head}: the adapter was saved from a FRoDLinear itself, which cannot replace the model in place; "
                f"build the layer with FRoDLinear.from_linear and load the adapter into it")
    for name in sorted(names, key=len, reverse=True):
        if name.endswith("." + first):
            prefix = name[: -len(first)]
            return (f"{head}; the model has {name!r}: the adapter was saved without the prefix {prefix!r} "
                    f"(load it into model.get_submodule({prefix[:-1]!r}), the module it was saved from)")
        if first.endswith("." + name):
            prefix = first[: -len(name)]
            return (f"{head}; the model has {name!r}: the adapter was saved from a model that wraps this one "
                    f"under {prefix!r} (load it into that wrapper)")
    return head


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
    for target in _modules_with_all_names(model):
        if isinstance(target.module, FRoDLinear):
            plain = _from_linear(target.module.to_linear(merge=merge), target.module.base_class)
            for alias in target.aliases:  # one module again wherever the FRoD layer was
                _replace(model, alias, plain)
    if isinstance(vars(model).get("save_pretrained"), _SavePretrainedGuard):
        del model.save_pretrained
    return model


def frod_param_groups(
    model: nn.Module, lr_delta: float = 5e-4, lr_sparse: float = 5e-5, lr_other: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer groups with the two learning rates of docs/design.md §7 (δ: lr_delta, s: lr_sparse).

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
