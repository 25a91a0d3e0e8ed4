"""Putting FRoD into a model: group the targets into categories, decompose, replace; merge and unload.

A category is the set of layers with the same full module path once the layer index is removed
(docs/design.md §7): ``encoder.layer.3.attention.self.query`` belongs to
``encoder.layer.*.attention.self.query``, so encoder/decoder or text/vision towers stay apart.
Each category gets one joint decomposition (one shared V) and one sparse pattern Ω, drawn from a
seed derived from the user's seed and the category name. Finding and replacing modules is
``targets``'s job; the summary table is ``summary``'s; checkpoints are ``export``'s.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base_layers import check_wrappable, is_bnb_layer, is_quantized, stored_tensors
from .config import FRoDConfig
from .decomposition import check_weights, condition_number, joint_decompose
from .export import install_checkpoint_guard, remove_checkpoint_guard
from .fingerprint import compare_fingerprints, fingerprints_by_dtype
from .input_layer import FRoDInputLinear
from .layer import FRoDBasis, FRoDLayer, FRoDLinear
from .pattern import sample_sparse_pattern
from .summary import FRoDSummary, progress_bar, report_category, summarize
from .targets import (
    ModelTransaction,
    Target,
    as_linear,
    check_replaceable,
    find_targets,
    frod_categories,
    frod_layers,
    frod_param_ids,
    from_linear_view,
    matcher,
    modules_with_all_names,
    replace_module,
)

__all__ = ["FRoDBaseMismatchWarning", "FRoDCategoryWarning", "apply_frod", "frod_param_groups", "merge_frod",
           "unload_frod", "unmerge_frod"]

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


class FRoDCategoryWarning(UserWarning):
    """A category that is probably not what the user meant (one layer: its basis is not shared)."""


class FRoDBaseMismatchWarning(UserWarning):
    """An adapter loaded into another base than it was trained on, on request (``allow_other_base``)."""


def other_base(category: str, reason: str | None, allowed: bool) -> None:
    """Refuse a category whose base is not the adapter's (``reason``), or with ``allowed`` warn that it is not."""
    if reason is None:
        return
    if not allowed:
        raise ValueError(f"category {category!r}: {reason}")
    warnings.warn(
        f"category {category!r}: {reason}; loaded anyway (allow_other_base=True): δ and s act in this base's "
        f"basis, not the one they were trained in, so the model computes a nearby function, not the trained one",
        FRoDBaseMismatchWarning, stacklevel=4,
    )


def _group(targets: list[Target], taken: set[str]) -> dict[str, list[Target]]:
    """Categories: same path pattern (``category_name``) and same weight shape.

    Layers of different shapes can never share a basis, so a pattern that holds several shapes
    (a top-level ``Sequential``'s ``0`` and ``2``) becomes one category per shape, named
    ``pattern[oxn]``. A name already used by an earlier ``apply_frod`` call gets ``#2``, ``#3``….
    """
    by_pattern: dict[str, dict[tuple[int, int], list[Target]]] = {}
    for t in targets:
        shape = tuple(as_linear(t.module).weight.shape)
        by_pattern.setdefault(category_name(t.name), {}).setdefault(shape, []).append(t)
    groups: dict[str, list[Target]] = {}
    for pattern, shapes in by_pattern.items():
        for (o, n), members in shapes.items():
            base = pattern if len(shapes) == 1 else f"{pattern}[{o}x{n}]"
            name, i = base, 1
            while name in taken or name in groups:
                i += 1
                name = f"{base}#{i}"
            groups[name] = members
    return groups


def _warn_single_layer_categories(groups: dict[str, list[Target]], target_modules: str | Sequence[str]) -> None:
    """A suffix that matched a lone layer (BERT's ``pooler.dense`` for ``"dense"``) is usually an
    accident: its basis is not shared and, for o < n, ill-conditioned. Named in full, with its layer
    index, or by a regex, it is a choice."""
    if isinstance(target_modules, str):
        return
    matches = [(entry, matcher([entry])) for entry in target_modules]
    for cat, members in groups.items():
        entries = [entry for entry, match in matches if any(match(a) for a in members[0].aliases)]
        if len(members) == 1 and not any(entry in members[0].aliases or re.search(r"(^|\.)\d+\.", entry)
                                         for entry in entries):
            warnings.warn(
                f"apply_frod: category {cat!r} has one layer ({members[0].name!r}): its basis is not shared with "
                f"other layers. If you meant to adapt it, name it in full in target_modules; otherwise use "
                f"longer suffixes or a regex that leaves it out",
                FRoDCategoryWarning, stacklevel=3,
            )


def _category_modes(groups: dict[str, list[Target]], config: FRoDConfig) -> dict[str, str]:
    """Each category's mode: the first ``mode_pattern`` entry matching its first layer (a name suffix, or a
    regex matching the whole name), else ``config.mode``; a quantized base only in the input form."""
    modes = {}
    for cat, members in groups.items():
        aliases = members[0].aliases
        mode = next((m for key, m in config.mode_pattern.items() if any(_pattern_matches(key, a) for a in aliases)),
                    config.mode)
        for t in members:
            if mode == "input":
                check_wrappable(t.module, t.name)
            elif is_bnb_layer(t.module) or is_quantized(t.module):
                raise ValueError(
                    f"target {t.name!r} is a quantized {type(t.module).__name__}: only mode='input' keeps a quantized "
                    f"base (it wraps the layer as it is); use mode='input', or "
                    f"mode_pattern={{{pattern_key(members)!r}: 'input'}} for this category"
                )
        modes[cat] = mode
    return modes


def _pattern_matches(key: str, name: str) -> bool:
    """A ``mode_pattern`` key matches a module name as a suffix (``target_modules``' rule) or as a regex."""
    if matcher([key])(name):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def pattern_key(members: list[Target]) -> str:
    """The ``mode_pattern`` key to suggest for a category: its first layer's last name component, or the
    whole name where that component is an index (a top-level ``Sequential``)."""
    name = members[0].name
    last = name.rsplit(".", 1)[-1]
    return name if last.isdigit() else last


def _fingerprint_tensors(members: list[Target]) -> list[torch.Tensor]:
    """What a category's fingerprint covers: each base as stored (``base_layers.stored_tensors``)."""
    return [t for member in members for t in stored_tensors(member.module)]


def _check_category_weights(groups: dict[str, list[Target]]) -> None:
    for cat, members in groups.items():
        try:
            check_weights([as_linear(t.module).weight for t in members])
        except ValueError as exc:
            raise ValueError(f"category {cat!r}: {exc}") from exc


def _build_category(
    tx: ModelTransaction, name: str, members: list[Target], spec: CategorySpec, config: FRoDConfig,
    fingerprints: dict[str, str] | None = None,
) -> FRoDBasis:
    """Decompose one category, draw its Ω and put a FRoDLinear wherever each member was.

    ``fingerprints``: of the members' weights (``fingerprints_by_dtype``), when the caller has them."""
    linears = [as_linear(t.module) for t in members]
    weights = [lin.weight for lin in linears]
    fingerprints = fingerprints or fingerprints_by_dtype(_fingerprint_tensors(members))
    wrap = spec.mode == "input"
    jb = joint_decompose(weights, reg=spec.reg, name=name, inverse=wrap)
    n = weights[0].shape[1]
    basis = FRoDBasis(
        jb.V, sample_sparse_pattern(n, spec.sparse_rate, spec.seed), spec.sparse_rate, spec.seed, spec.reg, name=name,
        base_seed=spec.base_seed, source="joint_decompose", max_error=max(jb.errors), jitter=jb.jitter, V_inv=jb.V_inv,
    )
    basis.fingerprints = dict(fingerprints)
    if wrap:
        basis.condition = condition_number(jb.V, jb.V_inv)
    for t, linear, U, lam in zip(members, linears, jb.U, jb.lam, strict=True):
        if wrap:
            layer = FRoDInputLinear(t.module, lam, basis, backend=config.backend, path=config.path,
                                    param_dtype=config.param_dtype)
        else:
            layer = FRoDLinear.from_linear(
                linear, basis=(U, jb.V, lam), shared=basis, mode=spec.mode, backend=config.backend, path=config.path,
                param_dtype=config.param_dtype, exact=config.exact,
            )
            layer.base_class = type(t.module)
        for alias in t.aliases:
            tx.replace(alias, layer)
    return basis


def _freeze_all_but_frod(model: nn.Module, keep: set[int]) -> None:
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def apply_frod(
    model: nn.Module,
    config: FRoDConfig | str | Sequence[str],
    *,
    progress: bool | None = None,
    verbose: bool = False,
    **options,
) -> FRoDSummary:
    """Replace the targeted ``nn.Linear`` (or ``Conv1D``) modules of ``model`` in place by ``FRoDLinear``.

    Args:
        config: a ``FRoDConfig``, or its ``target_modules`` (a regex or a list of name suffixes) with
            the other fields as keywords (``sparse_rate=…``, ``mode=…``: see ``FRoDConfig``). A config
            and keywords together are refused: one place says what is applied.
        progress: a progress bar over categories on stderr (tqdm, if installed); default: when
            stderr is a terminal.
        verbose: print one line per category to stderr (for logs).

    Categories are the targets with the same path pattern (``category_name``) and weight shape; a
    category of one layer that was not named in full gets a ``FRoDCategoryWarning``. Every other
    parameter of the model is frozen (``requires_grad = False``) except the δ and s of FRoD layers
    from earlier calls, which keep their state (calls compose), and ``modules_to_save``. Everything
    is checked before the model is touched, and a call that fails half-way is rolled back, so a
    refused call leaves the model exactly as it was. The config is appended to
    ``model.frod_configs``. Returns a summary of all the model's FRoD categories.
    """
    if isinstance(config, FRoDConfig):
        if options:
            raise TypeError(
                f"apply_frod got a FRoDConfig and the keywords {sorted(options)}: put them in the config "
                f"(dataclasses.replace(config, ...)) so that one place says what is applied"
            )
    else:
        unknown = sorted(set(options) - set(FRoDConfig.option_names()))
        if unknown:
            raise TypeError(f"apply_frod got unknown options {unknown}; FRoDConfig has {FRoDConfig.option_names()}")
        config = FRoDConfig(config, **options)
    existing = frod_categories(model)
    targets = find_targets(model, config.target_modules)
    groups = _group(targets, set(existing))
    modes = _category_modes(groups, config)
    _check_category_weights(groups)  # fail before touching the model, not half-way through it
    saved = _find_modules_to_save(model, config.modules_to_save, targets)
    _warn_single_layer_categories(groups, config.target_modules)
    keep = frod_param_ids(model)
    bar = progress_bar(len(groups), progress)
    try:
        with ModelTransaction(model) as tx:
            _freeze_all_but_frod(model, keep)
            for i, (cat, members) in enumerate(groups.items()):
                started = time.perf_counter()
                spec = CategorySpec([t.name for t in members], config.sparse_rate, category_seed(config.seed, cat),
                                    config.reg, modes[cat], config.seed)
                basis = _build_category(tx, cat, members, spec, config)
                report_category(bar, verbose, i, len(groups), cat, basis, len(members), started)
            for module in saved:
                module.requires_grad_(True)
    finally:
        if bar is not None:
            bar.close()
    model.frod_configs = [*getattr(model, "frod_configs", []), config]
    _mark_adapted_quantized(model)
    install_checkpoint_guard(model)
    summary = summarize(model)
    _warn_disabled_directions(summary, groups)
    logger.info("apply_frod: %d layers, %d categories, %d trainable", summary.layers, len(groups), summary.trainable)
    return summary


def _warn_disabled_directions(summary: FRoDSummary, groups: dict[str, list[Target]]) -> None:
    """Say loudly where the input form's λ guard turned directions off (``input_layer``)."""
    for cat, members in groups.items():
        disabled = summary.categories[cat].get("disabled", 0)
        if disabled:
            c = summary.categories[cat]
            warnings.warn(
                f"apply_frod: category {cat!r} ({len(c['layers'])} layer(s), "
                f"{c['out_features']}x{c['in_features']}) in mode 'input' has {disabled} direction(s) with λ too small "
                f"for the input form (cond(V) "
                f"{c['condition']:.1e}); δ and s do nothing there. Additive or factored mode keeps them: "
                f"mode_pattern={{{pattern_key(members)!r}: 'additive'}}",
                FRoDCategoryWarning, stacklevel=3,
            )


def _mark_adapted_quantized(model: nn.Module) -> None:
    """A transformers model loaded quantized says ``is_quantized``, and the HF Trainer refuses to train such a
    model unless it is a PEFT model ("purely quantized", transformers' ``validate_quantization_for_training``).
    With FRoD layers on its quantized base it is QLoRA's case (a frozen quantized base, trainable adapters), so
    the flag is cleared while FRoD wraps a quantized layer and given back by ``unload_frod``. Its quantizer
    stays (``save_pretrained`` sets it aside itself: ``export``)."""
    wraps_quantized = any(layer.mode == "input" and layer.quantization for layer in frod_layers(model).values())
    if wraps_quantized and vars(model).get("is_quantized"):
        model.is_quantized = False
        model.frod_cleared_is_quantized = True


def _find_modules_to_save(model: nn.Module, names: Sequence[str], targets: list[Target]) -> list[nn.Module]:
    """The modules named by ``modules_to_save`` (suffixes); each must match, none may be a target."""
    target_ids = {id(t.module) for t in targets}
    modules = modules_with_all_names(model)
    found = []
    for suffix in names:
        matches = matcher([suffix])
        matched = [t for t in modules if any(matches(a) for a in t.aliases)]
        if not matched:
            raise ValueError(f"modules_to_save entry {suffix!r} matched no module of the model")
        for t in matched:
            if id(t.module) in target_ids:
                raise ValueError(f"module {t.name!r} is both a FRoD target and in modules_to_save")
            found.append(t.module)
    return found


def apply_categories(
    model: nn.Module, specs: dict[str, CategorySpec], fingerprints: dict[str, dict[str, str]], tx: ModelTransaction,
    param_dtypes: dict[str, torch.dtype | None], allow_other_base: bool = False,
) -> None:
    """Rebuild FRoD categories exactly as described (``load_frod`` on a base model): each layer by
    its module name, each category's weights checked against its recorded ``fingerprints`` (any dtype
    of the same base, ``fingerprint.compare_fingerprints``) before decomposing.

    Changes go through ``tx``; the caller rolls them back if anything after this fails.
    """
    by_name = {name: t for t in modules_with_all_names(model) for name in t.aliases}
    groups: dict[str, list[Target]] = {}
    for cat, spec in specs.items():
        missing = [name for name in spec.layers if name not in by_name]
        if missing:
            raise ValueError(_missing_layers_message(cat, missing, list(by_name)))
        groups[cat] = [by_name[name] for name in spec.layers]
        for t in groups[cat]:
            check_replaceable(t)
    for cat, members in groups.items():
        if specs[cat].mode == "input":
            for t in members:
                check_wrappable(t.module, t.name)
    _check_category_weights(groups)
    for cat, members in groups.items():
        other_base(cat, compare_fingerprints(_fingerprint_tensors(members), fingerprints[cat]), allow_other_base)
    _freeze_all_but_frod(model, frod_param_ids(model))
    for cat, members in groups.items():
        spec = specs[cat]
        config = FRoDConfig(spec.layers, spec.sparse_rate, reg=spec.reg, mode=spec.mode,
                            param_dtype=param_dtypes[cat])
        # The weights are a rounding of the adapter's base: its record (other dtypes) stays theirs too, so
        # an adapter saved again from this model still loads wherever the first one did.
        own = fingerprints_by_dtype(_fingerprint_tensors(members))
        record = {dtype: fp for dtype, fp in fingerprints[cat].items() if dtype != "any"}
        _build_category(tx, cat, members, spec, config, fingerprints={**record, **own})
    install_checkpoint_guard(model)


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


def merge_frod(model: nn.Module, safe: bool = True, lossy: bool = False) -> dict[str, float]:
    """Merge every FRoD layer (see ``FRoDLinear.merge``); if one refuses, none stays merged.

    Layers on a quantized base merge only with ``lossy`` (``FRoDInputLinear.merge``: requantized W');
    returns, for each of those, the share of its update the requantization lost."""
    done, lost = [], {}
    try:
        for name, layer in frod_layers(model).items():
            if not layer.merged:
                if getattr(layer, "quantization", None):
                    lost[name] = layer.merge(safe=safe, lossy=lossy)
                else:
                    layer.merge(safe=safe)
                done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise
    if lost:
        logger.info("merge_frod: %d quantized layers requantized, update lost: max %.3g", len(lost), max(lost.values()))
    return lost


def unmerge_frod(model: nn.Module) -> None:
    """Restore every FRoD layer's original weight, bit for bit."""
    for layer in frod_layers(model).values():
        layer.unmerge()


def unload_frod(model: nn.Module, merge: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Give back the replaced modules' classes (``nn.Linear``/``Conv1D``) with W' if ``merge``, else W.

    In factored mode W is rebuilt as U·diag(λ)·Vᵀ (exact up to the decomposition's rounding). The input
    form gives back its base module itself without ``merge``; with it, a float ``nn.Linear`` for a
    quantized base (W' dequantized: the update would not survive requantizing). ``dtype``: of the
    modules given back for FRoD layers (default: W's, a quantized base's dequantized dtype); not with
    ``merge=False`` on the input form, whose base comes back as it is.
    """
    for target in modules_with_all_names(model):
        layer = target.module
        if isinstance(layer, FRoDInputLinear) and not merge:
            layer.unmerge()
            plain = layer.base_layer
        elif isinstance(layer, FRoDLayer):
            linear = layer.to_linear(merge=merge)
            plain = from_linear_view(linear if dtype is None else linear.to(dtype), layer.base_class)
        else:
            continue
        for alias in target.aliases:  # one module again wherever the FRoD layer was
            replace_module(model, alias, plain)
    remove_checkpoint_guard(model)
    if vars(model).pop("frod_cleared_is_quantized", False):
        model.is_quantized = True
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
