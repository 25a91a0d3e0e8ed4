"""FRoD adapters: the trainable state of a model, in memory and as a safetensors file.

An adapter holds only what training changed (δ and s of every FRoD layer, plus any other
parameter left trainable, e.g. a task head, listed as ``extra``) and, per category, everything
the basis is a function of: its layers, shape, sparse rate, pattern seed (and the user's base
seed), reg, mode, the decomposition's algorithm version, a hash of Ω and a full fingerprint of
the base weights (``fingerprint``). U, V, λ and Ω are recomputed from the base model on load
(bit-identically on the same machine). A model whose weights, shapes, pattern, reg or algorithm
differ is refused with an error that says which, before anything in it changes: δ and s mean
something only in the basis that produced them, so a loaded model computes exactly the saved
function or the load fails.

Every load is transactional: on any refusal the model is left exactly as it was (FRoD not
applied, flags and values untouched). Loading into a merged model unmerges the affected layers,
loads, and merges them again with the new δ and s.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import FRoDConfig
from .decomposition import ALGORITHM_VERSION
from .fingerprint import weight_fingerprint
from .layer import MODES, FRoDBasis, FRoDLinear
from .model import CategorySpec, ModelTransaction, apply_categories, frod_categories, frod_layers, frod_param_ids
from .pattern import sample_sparse_pattern

__all__ = ["frod_state_dict", "load_frod", "load_frod_state_dict", "save_frod"]

_FORMAT = "frod_kernels.adapter"
_VERSION = "2"
_FROD_KEYS = ("delta", "sparse_values")

# Per category: key -> accepted JSON types (None allowed where the second entry is type(None)).
_CATEGORY_SCHEMA: dict[str, tuple[type, ...]] = {
    "layers": (list,), "out_features": (int,), "in_features": (int,), "k": (int,),
    "sparse_rate": (int, float), "seed": (int,), "base_seed": (int, type(None)), "reg": (int, float),
    "mode": (str,), "source": (str,), "algorithm": (int, type(None)), "pattern": (str,),
    "fingerprint": (str, type(None)), "basis": (str, type(None)),
}


def _frod_keys(layer_names) -> set[str]:
    """State-dict keys of δ and s of the named layers (a layer that is the model itself has name '')."""
    return {f"{name}.{key}" if name else key for name in layer_names for key in _FROD_KEYS}


def frod_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every FRoD ``delta``/``sparse_values`` and every other trainable parameter."""
    frod_ids = frod_param_ids(model)
    if not frod_ids:
        raise ValueError("the model has no FRoD layers (call apply_frod first)")
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if id(p) in frod_ids or p.requires_grad
    }


def load_frod_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state dict into the model: what ``frod_state_dict`` gives, and nothing else.

    Every FRoD ``delta``/``sparse_values`` must be present; any other key must name a parameter
    that is trainable in the model (unfreeze a head before loading it). A base weight is never
    loaded: it is what the basis is computed from. Everything is checked before anything is
    copied; merged layers are unmerged, loaded and merged again.
    """
    params = dict(model.named_parameters())
    layers = frod_layers(model)
    if not layers:
        raise ValueError("the model has no FRoD layers (call apply_frod first)")
    frod_keys = _frod_keys(layers)
    missing = sorted(k for k in frod_keys if k not in state_dict)
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} FRoD tensors, e.g. {missing[:3]}")
    for name, tensor in state_dict.items():
        if name not in params:
            raise ValueError(f"adapter tensor {name!r} matches no parameter of the model")
        if name not in frod_keys and not params[name].requires_grad:
            raise ValueError(
                f"adapter tensor {name!r} is neither a FRoD tensor nor a trainable parameter of the model; an "
                f"adapter may not overwrite frozen weights (unfreeze it first if it is a head you trained)"
            )
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"adapter tensor {name!r} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model's {tuple(params[name].shape)}"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"adapter tensor {name!r} has dtype {tensor.dtype}, expected a floating-point dtype")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"adapter tensor {name!r} holds NaN or Inf; refusing to load it")
    merged = [layer for layer in layers.values() if layer.merged]
    with torch.no_grad():
        old = [(params[name], params[name].detach().clone()) for name in state_dict]
        for layer in merged:
            layer.unmerge()
        try:
            for name, tensor in state_dict.items():
                params[name].copy_(tensor)
            for layer in merged:
                layer.merge()
        except BaseException:
            for layer in merged:
                layer.unmerge()
            for param, value in old:
                param.copy_(value)
            for layer in merged:
                layer.merge(safe=False)  # the state it was in, which merged before
            raise


def _pattern_hash(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _basis_hash(basis: FRoDBasis) -> str:
    return weight_fingerprint([basis.V])


def _current_fingerprint(basis: FRoDBasis, layers: list[FRoDLinear]) -> str | None:
    """The fingerprint of the base weights the layers hold now (None in factored mode: no W)."""
    weights = [layer.base_weight for layer in layers]
    if any(w is None for w in weights):
        return basis.fingerprint
    return weight_fingerprint(weights)


def _describe(model: nn.Module) -> dict[str, dict]:
    """The per-category metadata of an adapter; refuses a model whose base weights changed after
    its basis was computed (the basis would no longer be a function of the weights it sits on)."""
    all_layers = frod_layers(model)
    cats: dict[str, dict] = {}
    for name, (basis, names) in frod_categories(model).items():
        layers = [all_layers[n] for n in names]
        fingerprint = _current_fingerprint(basis, layers)
        if basis.fingerprint is not None and fingerprint != basis.fingerprint:
            raise ValueError(
                f"category {name!r}: its base weights changed after FRoD was applied (the basis V was computed "
                f"from other weights); re-apply FRoD to the new base model instead of saving this one"
            )
        first = layers[0]
        cats[name] = {
            "layers": names, "out_features": first.out_features, "in_features": first.in_features, "k": basis.k,
            "sparse_rate": basis.sparse_rate, "seed": basis.seed, "base_seed": basis.base_seed, "reg": basis.reg,
            "mode": first.mode, "source": basis.source, "algorithm": basis.algorithm,
            "pattern": _pattern_hash(basis.indices), "fingerprint": fingerprint,
            "basis": _basis_hash(basis) if basis.source == "given" else None,
        }
    return cats


ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def _is_directory_target(path: str | os.PathLike) -> bool:
    """A directory, a path ending in a separator, or a name without an extension ("out/adapter")."""
    return Path(path).is_dir() or str(path).endswith(("/", os.sep)) or not Path(path).suffix


def save_frod(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter to ``path``: one safetensors file (a name with an extension, e.g.
    ``adapter.safetensors``), or PEFT's layout when ``path`` is a directory, ends with ``/`` or has
    no extension: ``adapter_model.safetensors`` + ``adapter_config.json`` inside it.

    Each file is written atomically: a unique temporary file beside the target, fsynced, then
    renamed over it. A symlink at the target is followed, not replaced. The adapter holds δ, s and
    every other trainable parameter (``modules_to_save``), and per category all that rebuilds and
    checks the basis: ``load_frod`` needs nothing else (no seed to pass again).
    """
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in frod_state_dict(model).items()}
    cats = _describe(model)
    frod_keys = _frod_keys(name for c in cats.values() for name in c["layers"])
    description = {
        "format": _FORMAT, "version": _VERSION, "categories": cats,
        "extra": sorted(k for k in tensors if k not in frod_keys),
        "configs": [c.to_dict() for c in getattr(model, "frod_configs", [])],
    }
    # safetensors metadata is str -> str: the JSON parts are stored as JSON text.
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in description.items()}
    if _is_directory_target(path):
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(directory / ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        config_text = json.dumps(description, indent=2) + "\n"
        _write_atomically(directory / CONFIG_FILE, lambda tmp: tmp.write_text(config_text))
    else:
        _write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _write_atomically(path: Path, write) -> None:
    path = Path(os.path.realpath(path))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync(tmp)  # the bytes are on disk before the rename makes them the adapter
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_metadata(path: Path, metadata: dict) -> tuple[dict[str, dict], list[str]]:
    """(categories, extra keys) from the file's metadata, every field checked for its type."""

    def damaged(what: str) -> ValueError:
        return ValueError(f"{path} has damaged FRoD metadata: {what}")

    try:
        cats, extra = json.loads(metadata["categories"]), json.loads(metadata["extra"])
    except KeyError as exc:
        raise damaged(f"no {exc.args[0]!r} entry") from exc
    except (TypeError, json.JSONDecodeError) as exc:
        raise damaged(f"not JSON ({exc})") from exc
    if not isinstance(cats, dict) or not cats:
        raise damaged(f"'categories' must be a non-empty JSON object, got {type(cats).__name__}")
    if not isinstance(extra, list) or not all(isinstance(k, str) for k in extra):
        raise damaged("'extra' must be a JSON list of tensor names")
    for name, cat in cats.items():
        if not isinstance(cat, dict):
            raise damaged(f"category {name!r} must be a JSON object, got {type(cat).__name__}")
        for key, types in _CATEGORY_SCHEMA.items():
            if key not in cat:
                raise damaged(f"category {name!r} has no {key!r}")
            value = cat[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise damaged(f"category {name!r}: {key!r} is {value!r}")
        if not cat["layers"] or not all(isinstance(layer, str) for layer in cat["layers"]):
            raise damaged(f"category {name!r}: 'layers' must be a non-empty list of module names")
    return cats, extra


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[str], list[dict]]:
    """(tensors, categories, extra keys, configs) of an adapter file or directory, all checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    directory = path if path.is_dir() else None
    if directory is not None:
        path = directory / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or foreign?): {exc}") from exc
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a FRoD adapter (no '{_FORMAT}' metadata)")
    if metadata.get("version") != _VERSION:
        raise ValueError(
            f"{path} has adapter format version {metadata.get('version')!r}; this frod_kernels reads {_VERSION!r} "
            f"(format 1 fingerprinted only a sample of the base weights: re-save it from the trained model)"
        )
    cats, extra = _parse_metadata(path, metadata)
    if directory is not None and (directory / CONFIG_FILE).is_file():
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{directory / CONFIG_FILE} is not JSON: {exc}") from exc
        if not isinstance(config, dict) or config.get("categories") != cats or config.get("extra") != extra:
            raise ValueError(
                f"{directory}: {CONFIG_FILE} and {ADAPTER_FILE} describe different adapters (copied from two saves?)"
            )
    frod_keys = _frod_keys(name for c in cats.values() for name in c["layers"])
    undeclared = sorted(set(tensors) - frod_keys - set(extra))
    if undeclared:
        raise ValueError(f"{path} holds tensors its metadata does not declare, e.g. {undeclared[0]!r}")
    try:
        configs = [FRoDConfig(**c) for c in json.loads(metadata.get("configs", "[]"))]
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has damaged FRoD metadata: 'configs' ({exc})") from exc
    return tensors, cats, extra, configs


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
    if (pattern.shape[1], _pattern_hash(pattern)) != (cat["k"], cat["pattern"]):
        raise ValueError(
            f"{path}: category {name!r}: its sparse pattern cannot be drawn again here (k={cat['k']}, "
            f"rate {cat['sparse_rate']}, {_seed_text(cat)})"
        )


def _check_against_model(path: Path, have: dict[str, dict], cats: dict[str, dict]) -> None:
    """The model's FRoD categories (``_describe``) must be the adapter's, input for input."""
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
        if want["fingerprint"] is None or got["fingerprint"] != want["fingerprint"]:
            raise ValueError(
                f"category {name!r}: the model's base weights differ from those the adapter was trained on"
            )
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


def load_frod(model: nn.Module, path: str | os.PathLike, mode: str | None = None) -> nn.Module:
    """Load an adapter (a file, or a directory written by ``save_frod``) into ``model``: a base
    model (FRoD is applied from the file's categories) or a model that already has the same FRoD
    layers. Returns the model.

    δ means the same in both modes (λ' = λ + δ), so an adapter saved in one mode loads into a
    model in the other; ``mode`` picks the mode when FRoD is applied to a base model (default:
    each category's mode when saved). Parameters listed as ``extra`` (a head) are loaded and left
    trainable, as they were when saved. On any refusal the model is left exactly as it was.
    """
    path = Path(path)
    tensors, cats, extra, configs = _read(path)
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    params = dict(model.named_parameters())
    unknown = [k for k in extra if k not in params]
    if unknown:
        raise ValueError(f"adapter tensor {unknown[0]!r} matches no parameter of the model")
    applied = not frod_layers(model)
    with ModelTransaction(model) as tx:
        if applied:
            for name, cat in cats.items():
                _check_rebuildable(path, name, cat)
            specs = {
                name: CategorySpec(cat["layers"], cat["sparse_rate"], cat["seed"], cat["reg"], mode or cat["mode"],
                                   cat["base_seed"])
                for name, cat in cats.items()
            }
            apply_categories(model, specs, {name: cat["fingerprint"] for name, cat in cats.items()}, tx)
        else:  # a model built from the file's own categories matches them by construction
            _check_against_model(path, _describe(model), cats)
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
