"""Categories: group FRoD's targets, decompose each group, and put its layers in place.

A category is the set of layers with the same full module path once the layer index is removed
(docs/design.md §7): ``encoder.layer.3.attention.self.query`` belongs to
``encoder.layer.*.attention.self.query``, so encoder/decoder or text/vision towers stay apart.
Each category gets one joint decomposition (one shared V) and one sparse pattern Ω, drawn from a
seed derived from the user's seed and the category name, and one mode (``FRoDConfig.mode``, or
``mode_pattern``): ``FRoDLinear`` (additive, factored) or ``FRoDInputLinear`` (the input form, the
only one that keeps a quantized base). ``apply_frod`` (``model``) builds categories from a config,
``load_frod`` (``loading``) rebuilds them from an adapter's record (``apply_categories``).
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base_layers import check_wrappable, is_bnb_layer, is_quantized, stored_tensors
from .basis import FRoDBasis
from .config import FRoDConfig
from .decomposition import check_weights, condition_number, joint_decompose
from .export import install_checkpoint_guard
from .fingerprint import compare_fingerprints, fingerprints_by_dtype
from .input_layer import FRoDInputLinear
from .layer import FRoDLinear
from .pattern import sample_sparse_pattern
from .summary import FRoDSummary
from .targets import (
    ModelTransaction,
    Target,
    as_linear,
    check_replaceable,
    frod_param_ids,
    matcher,
    modules_with_all_names,
)

__all__ = [
    "CategorySpec", "FRoDBaseMismatchWarning", "FRoDCategoryWarning", "apply_categories", "build_category",
    "category_modes", "category_name", "category_seed", "check_category_weights", "freeze_all_but_frod",
    "group_targets", "other_base", "pattern_key", "warn_disabled_directions", "warn_single_layer_categories",
]

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
    ``base_seed`` is the seed the user gave, kept for messages and adapters; ``record``, an adapter's
    record of the basis to reproduce (``decomposition.basis_record``) when ``load_frod`` builds it.
    """

    layers: list[str]
    sparse_rate: float
    seed: int
    reg: float
    mode: str
    base_seed: int | None = None
    record: torch.Tensor | None = None


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


def group_targets(targets: list[Target], taken: set[str]) -> dict[str, list[Target]]:
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


def warn_single_layer_categories(groups: dict[str, list[Target]], target_modules: str | Sequence[str]) -> None:
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


def category_modes(groups: dict[str, list[Target]], config: FRoDConfig) -> dict[str, str]:
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


def check_category_weights(groups: dict[str, list[Target]]) -> None:
    for cat, members in groups.items():
        try:
            check_weights([as_linear(t.module).weight for t in members])
        except ValueError as exc:
            raise ValueError(f"category {cat!r}: {exc}") from exc


def build_category(
    tx: ModelTransaction, name: str, members: list[Target], spec: CategorySpec, config: FRoDConfig,
    fingerprints: dict[str, str] | None = None,
) -> FRoDBasis:
    """Decompose one category, draw its Ω and put a FRoDLinear wherever each member was.

    ``fingerprints``: of the members' weights (``fingerprints_by_dtype``), when the caller has them."""
    linears = [as_linear(t.module) for t in members]
    weights = [lin.weight for lin in linears]
    fingerprints = fingerprints or fingerprints_by_dtype(_fingerprint_tensors(members))
    wrap = spec.mode == "input"
    jb = joint_decompose(weights, reg=spec.reg, name=name, inverse=wrap, align_to=spec.record)
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


def freeze_all_but_frod(model: nn.Module, keep: set[int]) -> None:
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def warn_disabled_directions(summary: FRoDSummary, groups: dict[str, list[Target]]) -> None:
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
    check_category_weights(groups)
    for cat, members in groups.items():
        other_base(cat, compare_fingerprints(_fingerprint_tensors(members), fingerprints[cat]), allow_other_base)
    freeze_all_but_frod(model, frod_param_ids(model))
    for cat, members in groups.items():
        spec = specs[cat]
        config = FRoDConfig(spec.layers, spec.sparse_rate, reg=spec.reg, mode=spec.mode,
                            param_dtype=param_dtypes[cat])
        # The weights are a rounding of the adapter's base: its record (other dtypes) stays theirs too, so
        # an adapter saved again from this model still loads wherever the first one did.
        own = fingerprints_by_dtype(_fingerprint_tensors(members))
        record = {dtype: fp for dtype, fp in fingerprints[cat].items() if dtype != "any"}
        build_category(tx, cat, members, spec, config, fingerprints={**record, **own})
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
