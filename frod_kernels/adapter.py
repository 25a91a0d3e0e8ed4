"""FRoD adapters: the trainable state of a model, in memory and as a safetensors file.

An adapter holds only what training changed (δ and s of every FRoD layer, plus any other
parameter left trainable, e.g. a task head) and the config that rebuilds the rest: sparse rate,
seed, reg, mode, and per category its layers, shapes, pattern seed, a hash of the pattern and a
fingerprint of the base weights. U, V, λ and the pattern are recomputed from the base model on
load (bit-identically on the same machine); a model with other weights, shapes or pattern is
refused with an error that says which.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .layer import FRoDBasis
from .model import apply_frod, frod_layers

__all__ = ["frod_state_dict", "load_frod", "load_frod_state_dict", "save_frod"]

_FORMAT = "frod_kernels.adapter"
_VERSION = "1"


def frod_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every FRoD ``delta``/``sparse_values`` and every other trainable parameter."""
    frod_ids = {
        id(p) for layer in frod_layers(model).values() for p in (layer.delta, layer.sparse_values)
    }
    if not frod_ids:
        raise ValueError("the model has no FRoD layers (call apply_frod first)")
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if id(p) in frod_ids or p.requires_grad
    }


def load_frod_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state dict into the model; every FRoD tensor must be present."""
    params = dict(model.named_parameters())
    expected = set(frod_state_dict(model))
    missing = sorted(k for k in expected if k not in state_dict and k.rsplit(".", 1)[-1] in ("delta", "sparse_values"))
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} FRoD tensors, e.g. {missing[:3]}")
    for name, tensor in state_dict.items():
        if name not in params:
            raise ValueError(f"adapter tensor {name!r} matches no parameter of the model")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model's {tuple(params[name].shape)}"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"adapter tensor {name!r} has dtype {tensor.dtype}, expected a floating-point dtype")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"adapter tensor {name!r} holds NaN or Inf; refusing to load it")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            params[name].copy_(tensor)


def _pattern_hash(basis: FRoDBasis) -> str:
    return hashlib.sha256(basis.indices.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _categories(model: nn.Module) -> dict[str, dict]:
    cats: dict[str, dict] = {}
    for name, layer in frod_layers(model).items():
        b = layer.basis
        entry = cats.setdefault(b.name or name, {
            "layers": [], "in_features": layer.in_features, "out_features": layer.out_features,
            "k": b.k, "sparse_rate": b.sparse_rate, "seed": b.seed, "reg": b.reg, "mode": layer.mode,
            "pattern": _pattern_hash(b), "fingerprint": getattr(b, "fingerprint", None),
        })
        entry["layers"].append(name)
    return cats


def save_frod(model: nn.Module, path: str | os.PathLike, seed: int | None = None) -> None:
    """Write the adapter to ``path`` (safetensors) atomically: a temporary file, then a rename.

    ``seed`` is the base seed given to ``apply_frod``; it is stored so that ``load_frod`` can
    rebuild FRoD on a bare base model (omit it for layers built one by one).
    """
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in frod_state_dict(model).items()}
    cats = _categories(model)
    first = next(iter(cats.values()))
    config = {"sparse_rate": first["sparse_rate"], "reg": first["reg"], "mode": first["mode"], "seed": seed}
    metadata = {"format": _FORMAT, "version": _VERSION, "config": json.dumps(config), "categories": json.dumps(cats)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
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


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

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
        raise ValueError(f"{path} has adapter format version {metadata.get('version')!r}; this reads {_VERSION!r}")
    try:
        return tensors, json.loads(metadata["config"]), json.loads(metadata["categories"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has damaged FRoD metadata (config/categories): {exc}") from exc


def load_frod(model: nn.Module, path: str | os.PathLike, mode: str | None = None) -> nn.Module:
    """Load an adapter into ``model``: a base model (FRoD is applied from the file's config) or
    a model that already has the same FRoD layers. Returns the model.

    δ means the same in both modes (λ' = λ + δ), so an adapter saved in one mode loads into a
    model in the other; ``mode`` picks the mode when FRoD is applied to a base model (default:
    the mode it was saved in).
    """
    path = Path(path)
    tensors, config, cats = _read(path)
    if not frod_layers(model):
        if config.get("seed") is None:
            raise ValueError(f"{path} was saved without the base seed; apply_frod to the model first")
        targets = [name for cat in cats.values() for name in cat["layers"]]
        apply_frod(model, targets, sparse_rate=config["sparse_rate"], seed=config["seed"], reg=config["reg"],
                   mode=mode or config["mode"])
    have = _categories(model)
    for cat, want in cats.items():
        got = have.get(cat)
        if got is None:
            raise ValueError(f"adapter category {cat!r} has no FRoD layers in the model")
        if got["layers"] != want["layers"]:
            raise ValueError(f"category {cat!r}: adapter layers {want['layers'][:3]}… differ from the model's")
        if (got["out_features"], got["in_features"]) != (want["out_features"], want["in_features"]):
            raise ValueError(
                f"category {cat!r}: adapter shape {want['out_features']}x{want['in_features']}, "
                f"model {got['out_features']}x{got['in_features']}"
            )
        if want["fingerprint"] and got["fingerprint"] and want["fingerprint"] != got["fingerprint"]:
            raise ValueError(f"category {cat!r}: the model's base weights differ from those the adapter was trained on")
        if (got["k"], got["pattern"]) != (want["k"], want["pattern"]):
            raise ValueError(
                f"category {cat!r}: sparse pattern differs (adapter k={want['k']}, seed {want['seed']}, "
                f"rate {want['sparse_rate']}; model k={got['k']}, seed {got['seed']}, rate {got['sparse_rate']})"
            )
    load_frod_state_dict(model, tensors)
    return model
