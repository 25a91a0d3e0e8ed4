"""Putting FRoD into a model and taking it out: ``apply_frod``, merge, unmerge, unload, the optimizer groups.

Grouping the targets into categories and building each one is ``categories``'s job; finding and
replacing modules is ``targets``'s; the summary table is ``summary``'s; checkpoints are ``export``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from .categories import (
    CategorySpec,
    build_category,
    category_modes,
    category_seed,
    check_category_weights,
    freeze_all_but_frod,
    group_targets,
    warn_disabled_directions,
    warn_single_layer_categories,
)
from .config import FRoDConfig
from .decomposition import shared_stack
from .export import install_checkpoint_guard, remove_checkpoint_guard
from .input_layer import FRoDInputLinear
from .layer import FRoDLayer
from .summary import FRoDSummary, progress_bar, report_category, summarize
from .targets import (
    ModelTransaction,
    Target,
    find_targets,
    frod_categories,
    frod_layers,
    frod_param_ids,
    from_linear_view,
    matcher,
    modules_with_all_names,
    replace_module,
)

__all__ = ["apply_frod", "frod_param_groups", "merge_frod", "unload_frod", "unmerge_frod"]

logger = logging.getLogger("frod_kernels")


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
    groups = group_targets(targets, set(existing))
    modes = category_modes(groups, config)
    check_category_weights(groups)  # fail before touching the model, not half-way through it
    saved = _find_modules_to_save(model, config.modules_to_save, targets)
    warn_single_layer_categories(groups, config.target_modules)
    keep = frod_param_ids(model)
    bar = progress_bar(len(groups), progress)
    try:
        with ModelTransaction(model) as tx, shared_stack():
            freeze_all_but_frod(model, keep)
            for i, (cat, members) in enumerate(groups.items()):
                started = time.perf_counter()
                spec = CategorySpec([t.name for t in members], config.sparse_rate, category_seed(config.seed, cat),
                                    config.reg, modes[cat], config.seed)
                basis = build_category(tx, cat, members, spec, config)
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
    warn_disabled_directions(summary, groups)
    logger.info("apply_frod: %d layers, %d categories, %d trainable", summary.layers, len(groups), summary.trainable)
    return summary


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
