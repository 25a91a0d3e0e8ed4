"""``load_frod``: put an adapter (``adapter`` format) into a model, or refuse before changing anything.

Into a base model, FRoD is applied from the file's categories (each basis decomposed from the
model's weights once they are shown to be the adapter's base); into a model that already has
FRoD layers, the layers must be the adapter's, input for input. A base in another dtype than the
one the adapter was trained on is the same base (``fingerprint.compare_fingerprints``). A FRoD
model whose basis was lost to ``to('meta')``/``to_empty()`` gets it rebuilt here from the weights
loaded since, once they are shown to be the ones FRoD was applied to.

Every load is transactional: on any refusal the model is left exactly as it was (FRoD not
applied, flags and values untouched). Loading into a merged model unmerges the affected layers,
loads, and merges them again with the new δ and s.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .adapter import describe_categories, load_frod_state_dict, pattern_hash, read_adapter
from .categories import CategorySpec, apply_categories, other_base
from .decomposition import ALGORITHM_VERSION, JointBasis, basis_drift, drift_tolerance, joint_decompose, shared_stack
from .fingerprint import compare_fingerprints, dtype_name
from .layer import MODES, FRoDBasis, FRoDLayer
from .options import check_choice
from .pattern import sample_sparse_pattern
from .targets import ModelTransaction, frod_categories, frod_layers

__all__ = ["load_frod"]

# How far a rebuilt V may differ from the adapter's record after alignment (``basis_drift``), in ε
# of the coarsest dtype involved: 0.5 for a bfloat16 load of a float32 adapter. No category of
# MiniLM or SmolLM2 goes beyond it in bfloat16 or float16 (benchmarks/cross_dtype_load.py records the
# refusals); a rotation the alignment cannot reach goes far beyond it in float32 (tests/test_workflows.py).
_ACCEPTED_DRIFT_ULPS = 64


def _seed_text(cat: dict) -> str:
    return f"seed {cat['base_seed']}" if cat["base_seed"] is not None else f"pattern seed {cat['seed']}"


def _check_rebuildable(path: Path, name: str, cat: dict) -> None:
    """Refuse a category whose basis this version cannot rebuild bit-compatibly, before any work."""
    if cat["source"] != "joint_decompose":
        raise ValueError(
            f"{path}: category {name!r} was trained on a basis given by the caller, not computed from the weights; "
            f"build the FRoD layers with that basis first, then load the adapter into them"
        )
    if cat["algorithm"] != ALGORITHM_VERSION:
        raise ValueError(
            f"{path}: category {name!r} was decomposed by algorithm version {cat['algorithm']}, this frod_kernels "
            f"has {ALGORITHM_VERSION}: the basis would differ, so δ and s would mean something else"
        )
    pattern = sample_sparse_pattern(cat["in_features"], cat["sparse_rate"], cat["seed"])
    if (pattern.shape[1], pattern_hash(pattern)) != (cat["k"], cat["pattern"]):
        raise ValueError(
            f"{path}: category {name!r}: its sparse pattern cannot be drawn again here (k={cat['k']}, "
            f"rate {cat['sparse_rate']}, {_seed_text(cat)})"
        )


def _lost_bases(model: nn.Module) -> dict[str, tuple[FRoDBasis, list[FRoDLayer]]]:
    """The categories whose basis holds no values (after to('meta')/to_empty())."""
    layers = frod_layers(model)
    return {
        name: (basis, [layers[n] for n in names])
        for name, (basis, names) in frod_categories(model).items()
        if not all(layers[n].basis_valid for n in names)
    }


def _rebuild_plan(path: Path, lost: dict[str, tuple[FRoDBasis, list[FRoDLayer]]], cats: dict[str, dict]):
    """Decompose each lost category from its current weights, after checking they are the weights FRoD
    was applied to and the adapter's base; returns what ``_install`` puts in place (nothing changes here)."""
    plan = []
    for name, (basis, layers) in lost.items():
        if basis.source != "joint_decompose" or layers[0].mode == "factored":
            raise ValueError(
                f"category {name!r}: its basis was lost to to('meta')/to_empty() and cannot be rebuilt from the "
                f"weights ({'a given basis' if basis.source != 'joint_decompose' else 'factored mode keeps no W'}); "
                f"apply FRoD to the loaded base model again, then load the adapter"
            )
        stored = [t for layer in layers for t in layer.fingerprint_tensors()]
        for reason in (compare_fingerprints(stored, basis.fingerprints),
                       compare_fingerprints(stored, cats[name]["fingerprints"]) if name in cats else None):
            if reason is not None:
                raise ValueError(
                    f"category {name!r}: its basis was lost to to('meta')/to_empty() and cannot be rebuilt: {reason} "
                    f"(load the base weights into the model before load_frod)"
                )
        plan.append(_decompose_again(name, basis, layers, cats.get(name, {}).get("record")))
    return plan


def _decompose_again(name: str, basis: FRoDBasis, layers: list[FRoDLayer], record: torch.Tensor | None):
    """(basis, layers, JointBasis) of the category decomposed from its layers' current W, aligned to
    ``record`` when there is one: one entry of a plan for ``_install``."""
    weights = [layer.base_weight for layer in layers]
    return basis, layers, joint_decompose(weights, reg=basis.reg, name=name, inverse=layers[0].mode == "input",
                                          align_to=record)


def _install(plan) -> None:
    for basis, layers, jb in plan:
        basis.set_V(jb.V)
        if jb.V_inv is not None:  # the input form's
            basis.V_inv = jb.V_inv.to(basis.V_inv).contiguous()
        for layer, U, lam in zip(layers, jb.U, jb.lam, strict=True):
            layer.rebuild_basis(U, lam)


def _realign_plan(cats: dict[str, dict], model: nn.Module):
    """Decompose again, aligned to the adapter's record, each category of a model with FRoD layers of its
    own whose V differs from the record by more than rounding (built on another machine, or from the
    base in another dtype): what ``_install`` puts in place. A category without W (factored, or a given
    basis) cannot be decomposed again: the final check (``_check_records``) judges it."""
    layers = frod_layers(model)
    plan = []
    for name, (basis, names) in frod_categories(model).items():
        record = cats.get(name, {}).get("record")
        group = [layers[n] for n in names]
        if (record is None or basis.source != "joint_decompose" or group[0].mode == "factored"
                or basis_drift(basis.V, record) <= drift_tolerance(basis.precision, record.dtype)):
            continue
        plan.append(_decompose_again(name, basis, group, record))
    return plan


def _current(plan) -> list:
    """The plan that puts back what ``plan`` replaces (for a rollback)."""
    return [(basis, group, JointBasis(V=basis.V.clone(), U=[getattr(layer, "U", None) for layer in group],
                                      lam=[layer.lam.clone() for layer in group], errors=[],
                                      V_inv=None if basis.V_inv is None else basis.V_inv.clone()))
            for basis, group, _ in plan]


def _check_records(model: nn.Module, cats: dict[str, dict], allow_other_base: bool) -> None:
    """Each rebuilt V must match the adapter's record of the one δ and s were trained in (format 4)."""
    for name, (basis, _) in frod_categories(model).items():
        record = cats.get(name, {}).get("record")
        if record is None:
            continue  # formats 2 and 3 record no V
        drift = basis_drift(basis.V, record)
        tolerance = drift_tolerance(basis.precision, record.dtype, ulps=_ACCEPTED_DRIFT_ULPS)
        if drift > tolerance:
            other_base(name, (f"the basis rebuilt here differs from the one the adapter was trained in (a column of "
                              f"V differs by {drift:.1e} of a typical column's norm at the recorded rows, "
                              f"{tolerance:.0e} accepted): the eigenvectors of the decomposition came out otherwise "
                              f"here"), allow_other_base)


def _check_against_model(path: Path, model: nn.Module, cats: dict[str, dict], allow_other_base: bool) -> None:
    """The model's FRoD categories must be the adapter's, input for input."""
    have = describe_categories(model)
    all_layers = frod_layers(model)
    for name, want in cats.items():
        got = have.get(name)
        if got is None:
            raise ValueError(f"adapter category {name!r} has no FRoD layers in the model")
        if got["layers"] != want["layers"]:
            raise ValueError(f"category {name!r}: adapter layers {want['layers'][:3]}… differ from the model's")
        if (got["out_features"], got["in_features"]) != (want["out_features"], want["in_features"]):
            raise ValueError(
                f"category {name!r}: adapter shape {want['out_features']}x{want['in_features']}, "
                f"model {got['out_features']}x{got['in_features']}"
            )
        if (got["source"], got["algorithm"]) != (want["source"], want["algorithm"]):
            raise ValueError(
                f"category {name!r}: the adapter's basis came from {want['source']} (algorithm {want['algorithm']}), "
                f"the model's from {got['source']} (algorithm {got['algorithm']})"
            )
        if want["basis"] is not None and got["basis"] != want["basis"]:
            raise ValueError(f"category {name!r}: the model's given basis V differs from the adapter's")
        if not want["fingerprints"]:
            raise ValueError(f"category {name!r}: the adapter records no fingerprint of its base weights")
        found = [all_layers[n].fingerprint_tensors() for n in got["layers"]]
        # Factored layers keep no W: their recorded base stands for it.
        reason = (_compare_records(got["fingerprints"], want["fingerprints"]) if any(f is None for f in found)
                  else compare_fingerprints([t for f in found for t in f], want["fingerprints"]))
        other_base(name, reason, allow_other_base)
        if got["reg"] != want["reg"]:
            raise ValueError(
                f"category {name!r}: the model's basis was decomposed with reg={got['reg']}, the adapter's with "
                f"reg={want['reg']}; δ and s mean something else in another basis"
            )
        if (got["k"], got["pattern"]) != (want["k"], want["pattern"]):
            raise ValueError(
                f"category {name!r}: sparse pattern differs (adapter k={want['k']}, {_seed_text(want)}, "
                f"rate {want['sparse_rate']}; model k={got['k']}, {_seed_text(got)}, rate {got['sparse_rate']})"
            )


def _compare_records(have: dict[str, str], want: dict[str, str]) -> str | None:
    """Two recorded bases are the same when they agree in some dtype both record."""
    shared = set(have) & set(want)
    if any(have[d] == want[d] for d in shared) or ("any" in want and want["any"] in have.values()):
        return None
    if not shared:
        return (f"the model's base was recorded in {', '.join(sorted(have))}, the adapter's in "
                f"{', '.join(sorted(want))}: load the base model in one of the adapter's dtypes")
    return "the model's base weights differ from those the adapter was trained on"


def _param_dtypes(cats: dict[str, dict], tensors: dict[str, torch.Tensor], param_dtype: torch.dtype | None):
    """Per category, the dtype of δ and s to build: ``param_dtype``, else the file's (fp32 masters of a
    bf16 model come back as fp32)."""
    if param_dtype is not None:
        return dict.fromkeys(cats, param_dtype)
    return {name: tensors[f"{cat['layers'][0]}.delta" if cat["layers"][0] else "delta"].dtype
            for name, cat in cats.items()}


def load_frod(model: nn.Module, path: str | os.PathLike, mode: str | None = None,
              param_dtype: torch.dtype | None = None, allow_other_base: bool = False) -> nn.Module:
    """Load an adapter (a file, or a directory written by ``save_frod``, ``model.save_pretrained`` or the
    HF Trainer) into ``model``: a base model (FRoD is applied from the file's categories) or a model that
    already has the same FRoD layers. Returns the model.

    The base may be in another dtype than the adapter was trained in (float32, bfloat16, float16 of the
    same checkpoint); a different base is refused at every dtype. δ means the same in both modes
    (λ' = λ + δ), so an adapter saved in one mode loads into a model in the other; ``mode`` picks the
    mode when FRoD is applied to a base model (default: each category's mode when saved), and
    ``param_dtype`` the dtype of δ and s then (default: as saved). Parameters listed as ``extra`` (a
    head) are loaded and left trainable, as they were when saved. On any refusal the model is left
    exactly as it was.

    ``allow_other_base``: load into a base that is not the adapter's (an adapter trained on a 4-bit
    base into the float one, or the other way round) with a ``FRoDBaseMismatchWarning`` that names the
    mismatch, instead of refusing. δ and s then act in the basis of this base, which differs from the
    one they were trained in as much as the two bases differ: the function is close, not the same.
    """
    path = Path(path)
    tensors, cats, extra, configs = read_adapter(path)
    if mode is not None:
        check_choice("mode", mode, MODES)
    if param_dtype is not None and not (isinstance(param_dtype, torch.dtype) and param_dtype.is_floating_point):
        raise TypeError(f"param_dtype must be a floating-point torch.dtype, got {param_dtype!r}")
    params = dict(model.named_parameters())
    unknown = [k for k in extra if k not in params]
    if unknown:
        raise ValueError(f"adapter tensor {unknown[0]!r} matches no parameter of the model")
    layers = frod_layers(model)
    applied = not layers
    if not applied and param_dtype is not None:
        held = {layer.delta.dtype for layer in layers.values()}
        if held != {param_dtype}:
            raise ValueError(
                f"param_dtype={dtype_name(param_dtype)} applies when load_frod applies FRoD; this model's FRoD "
                f"layers hold δ and s in {', '.join(sorted(map(dtype_name, held)))} (convert them, or load into the "
                f"base model)"
            )
    with ModelTransaction(model) as tx, shared_stack():  # the categories' decompositions share one stack buffer
        if applied:
            for name, cat in cats.items():
                _check_rebuildable(path, name, cat)
            specs = {
                name: CategorySpec(cat["layers"], cat["sparse_rate"], cat["seed"], cat["reg"], mode or cat["mode"],
                                   cat["base_seed"], record=cat["record"])
                for name, cat in cats.items()
            }
            apply_categories(model, specs, {name: cat["fingerprints"] for name, cat in cats.items()}, tx,
                             _param_dtypes(cats, tensors, param_dtype), allow_other_base)
        else:  # a model built from the file's own categories matches them by construction
            _install(_rebuild_plan(path, _lost_bases(model), cats))
            _check_against_model(path, model, cats, allow_other_base)
            realign = _realign_plan(cats, model)
            undo = _current(realign)
            tx.defer(lambda: _install(undo))
            _install(realign)
        _check_records(model, cats, allow_other_base)
        params = dict(model.named_parameters())
        frod_weights = {id(layer.weight) for layer in frod_layers(model).values()}
        for key in extra:
            if id(params[key]) in frod_weights:
                raise ValueError(
                    f"adapter tensor {key!r} is a FRoD layer's base weight: the basis is computed from it, an "
                    f"adapter may not replace it"
                )
            params[key].requires_grad_(True)
        load_frod_state_dict(model, tensors)
    if applied:
        model.frod_configs = configs
    return model


