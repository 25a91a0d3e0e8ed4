"""FRoD adapters: the trainable state of a model, in memory and as a safetensors file.

An adapter holds only what training changed (δ and s of every FRoD layer, plus any other
parameter left trainable, e.g. a task head, listed as ``extra``) and, per category, everything
the basis is a function of: its layers, shape, sparse rate, pattern seed (and the user's base
seed), reg, mode, the decomposition's algorithm version, a hash of Ω, a full fingerprint of
the base weights, in its dtype and rounded to each narrower one a user may load the same base in
(``fingerprint.fingerprints_by_dtype``: a cast is not a new base), and a record of V (V at 64
rows, ``decomposition.basis_record``, a tensor of the file named by the category's ``record``).
U, V, λ and Ω are recomputed from the base model on load, V aligned to the record (its columns'
signs and rotations are not functions of the weights alone); ``loading.load_frod`` refuses a
model whose weights, shapes, pattern, reg or algorithm differ, with an error that says which, and
a rebuilt V that the record cannot be matched in.

This module is the format: the state dicts, the file (``save_frod``, ``read_adapter``) and the
per-category description (``describe_categories``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .basis import FRoDBasis
from .config import FRoDConfig
from .decomposition import basis_record, record_rows
from .fingerprint import dtype_name, weight_fingerprint
from .layer import FRoDLinear
from .targets import frod_categories, frod_layers, frod_param_ids

__all__ = [
    "ADAPTER_FILE", "CONFIG_FILE", "base_fingerprints", "describe_categories", "frod_keys", "frod_state_dict",
    "load_frod_state_dict", "pattern_hash", "read_adapter", "save_frod",
]

_FORMAT = "frod_kernels.adapter"
_VERSION = "4"  # 4: a record of V; 3 (read): fingerprints by dtype; 2 (read): one, of unrecorded dtype
_READ_VERSIONS = ("2", "3", _VERSION)
_FROD_KEYS = ("delta", "sparse_values")

# Per category: key -> accepted JSON types (None allowed where the second entry is type(None)).
_CATEGORY_SCHEMA: dict[str, tuple[type, ...]] = {
    "layers": (list,), "out_features": (int,), "in_features": (int,), "k": (int,),
    "sparse_rate": (int, float), "seed": (int,), "base_seed": (int, type(None)), "reg": (int, float),
    "mode": (str,), "source": (str,), "algorithm": (int, type(None)), "pattern": (str,),
    "fingerprints": (dict,), "basis": (str, type(None)), "record": (str, type(None)),
}
_RECORD_PREFIX = "frod_basis_record:"  # + category name: the key of its record of V in the file


def frod_keys(layer_names) -> set[str]:
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
    layer_keys = frod_keys(layers)
    missing = sorted(k for k in layer_keys if k not in state_dict)
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} FRoD tensors, e.g. {missing[:3]}")
    for name, tensor in state_dict.items():
        if name not in params:
            raise ValueError(f"adapter tensor {name!r} matches no parameter of the model")
        if name not in layer_keys and not params[name].requires_grad:
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


def pattern_hash(indices: torch.Tensor) -> str:
    """A short hash of Ω, as adapters record it."""
    return hashlib.sha256(indices.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _basis_hash(basis: FRoDBasis) -> str:
    return weight_fingerprint([basis.V])


def base_fingerprints(name: str, basis: FRoDBasis, layers: list[FRoDLinear]) -> dict[str, str]:
    """The fingerprints of the base weights the category's basis was computed from (by dtype, see
    ``fingerprint.fingerprints_by_dtype``); refuses a category whose weights changed since other than
    by a cast (the basis would no longer be a function of the weights it sits on)."""
    for layer in layers:
        if not layer.basis_valid:
            raise ValueError(
                f"category {name!r}: its basis holds no values (the model went through to('meta') or to_empty()); "
                f"load the base weights and the adapter with load_frod first"
            )
    weights = [layer.base_weight for layer in layers]
    if any(w is None for w in weights) or all(layer.base_is_original for layer in layers):
        return dict(basis.fingerprints)  # factored (no W: the record), or W as decomposed, possibly cast
    own = dtype_name(weights[0].dtype)
    if own in basis.fingerprints and weight_fingerprint(weights) == basis.fingerprints[own]:
        return dict(basis.fingerprints)  # the same values written back (a full checkpoint of this model)
    applied = ", ".join(sorted(basis.fingerprints)) or "another dtype"
    how = "changed" if own in basis.fingerprints else f"were changed (they are {own}, FRoD was applied to {applied})"
    raise ValueError(
        f"category {name!r}: its base weights {how} after FRoD was applied, other than by casting the model (the "
        f"basis V was computed from other weights); re-apply FRoD to the new base model instead of saving this one"
    )


def describe_categories(model: nn.Module) -> dict[str, dict]:
    """The per-category metadata of an adapter of ``model`` (see the module docstring)."""
    all_layers = frod_layers(model)
    cats: dict[str, dict] = {}
    for name, (basis, names) in frod_categories(model).items():
        layers = [all_layers[n] for n in names]
        first = layers[0]
        cats[name] = {
            "layers": names, "out_features": first.out_features, "in_features": first.in_features, "k": basis.k,
            "sparse_rate": basis.sparse_rate, "seed": basis.seed, "base_seed": basis.base_seed, "reg": basis.reg,
            "mode": first.mode, "source": basis.source, "algorithm": basis.algorithm,
            "pattern": pattern_hash(basis.indices), "fingerprints": base_fingerprints(name, basis, layers),
            "basis": _basis_hash(basis) if basis.source == "given" else None,
            "record": _RECORD_PREFIX + name if basis.source == "joint_decompose" else None,
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
    cats = describe_categories(model)
    layer_keys = frod_keys(name for c in cats.values() for name in c["layers"])
    description = {
        "format": _FORMAT, "version": _VERSION, "categories": cats,
        "extra": sorted(k for k in tensors if k not in layer_keys),
        "configs": [c.to_dict() for c in getattr(model, "frod_configs", [])],
    }
    tensors.update({cats[name]["record"]: basis_record(basis.V).to(basis.precision)
                    for name, (basis, _) in frod_categories(model).items() if cats[name]["record"] is not None})
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from a shared cluster's group
        _fsync(tmp)  # the bytes are on disk before the rename makes them the adapter
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask (read by setting it, the only portable way, and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_metadata(path: Path, metadata: dict, version: str) -> tuple[dict[str, dict], list[str]]:
    """(categories, extra keys) from the file's metadata, every field checked for its type; a format-2
    category's one fingerprint becomes ``{"any": fingerprint}``."""

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
        if version == "2" and "fingerprint" in cat:
            old = cat.pop("fingerprint")
            cat["fingerprints"] = {} if old is None else {"any": old}
        if version in ("2", "3"):
            cat.setdefault("record", None)  # older formats record no V: the basis is rebuilt unaligned
        for key, types in _CATEGORY_SCHEMA.items():
            if key not in cat:
                raise damaged(f"category {name!r} has no {key!r}")
            value = cat[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise damaged(f"category {name!r}: {key!r} is {value!r}")
        if not cat["layers"] or not all(isinstance(layer, str) for layer in cat["layers"]):
            raise damaged(f"category {name!r}: 'layers' must be a non-empty list of module names")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in cat["fingerprints"].items()):
            raise damaged(f"category {name!r}: 'fingerprints' must map dtype names to fingerprints")
    return cats, extra


def _take_record(path: Path, tensors: dict[str, torch.Tensor], name: str, cat: dict) -> torch.Tensor:
    """Remove category ``name``'s record of V from ``tensors`` and return it, checked."""
    record = tensors.pop(cat["record"], None)
    shape = (len(record_rows(cat["in_features"])), cat["in_features"])
    if record is None or tuple(record.shape) != shape or not record.is_floating_point() or not bool(
            torch.isfinite(record).all()):
        raise ValueError(
            f"{path} has damaged FRoD metadata: category {name!r}: its record of V ({cat['record']!r}) must be a "
            f"finite floating-point tensor of shape {shape} in the file"
        )
    return record


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[str], list[dict]]:
    """(tensors, categories, extra keys, configs) of an adapter file or directory, all checked; each
    category's ``record`` is its record of V (a tensor taken out of ``tensors``) or None."""
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
    version = metadata.get("version")
    if version not in _READ_VERSIONS:
        raise ValueError(
            f"{path} has adapter format version {version!r}; this frod_kernels reads {', '.join(_READ_VERSIONS)} "
            f"(format 1 fingerprinted only a sample of the base weights: re-save it from the trained model)"
        )
    cats, extra = _parse_metadata(path, metadata, version)
    if directory is not None and (directory / CONFIG_FILE).is_file():
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{directory / CONFIG_FILE} is not JSON: {exc}") from exc
        if not isinstance(config, dict) or config.get("categories") != cats or config.get("extra") != extra:
            raise ValueError(
                f"{directory}: {CONFIG_FILE} and {ADAPTER_FILE} describe different adapters (copied from two saves?)"
            )
    for name, cat in cats.items():
        if cat["record"] is not None:
            cat["record"] = _take_record(path, tensors, name, cat)
    layer_keys = frod_keys(name for c in cats.values() for name in c["layers"])
    undeclared = sorted(set(tensors) - layer_keys - set(extra))
    if undeclared:
        raise ValueError(f"{path} holds tensors its metadata does not declare, e.g. {undeclared[0]!r}")
    try:
        configs = [FRoDConfig(**c) for c in json.loads(metadata.get("configs", "[]"))]
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has damaged FRoD metadata: 'configs' ({exc})") from exc
    return tensors, cats, extra, configs
