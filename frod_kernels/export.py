"""Checkpoints of a FRoD model that plain code reloads: merged state dicts and transformers' format.

A FRoD layer's own state dict holds (W, b, δ, s); a model without FRoD expects (W', b) in the
layout of the module FRoD replaced (``nn.Linear``: (o, n); transformers' ``Conv1D``: (n, o)).
``merged_state_dict`` gives that, leaving the model as it is; ``save_pretrained`` writes it as a
transformers checkpoint, which ``from_pretrained`` reloads as the plain architecture computing the
trained function (W' = W + U·M·Vᵀ, formed in float64 and rounded once, as ``merge`` does).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .layer import FRoDLinear
from .model import _modules_with_all_names, frod_layers

__all__ = ["merged_state_dict", "save_pretrained"]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as the model without FRoD would have it, with every weight merged."""
    if not frod_layers(model):
        raise ValueError("the model has no FRoD layers (call apply_frod first)")
    state = model.state_dict()
    for target in _modules_with_all_names(model):
        layer = target.module
        if not isinstance(layer, FRoDLinear):
            continue
        w = layer.weight.detach() if layer.merged else layer.effective_weight()
        if layer.base_class is not nn.Linear:  # Conv1D stores Wᵀ
            w = w.t().contiguous()
        for prefix in (f"{alias}." for alias in target.aliases):
            state.pop(prefix + "delta", None)
            state.pop(prefix + "sparse_values", None)
            state[prefix + "weight"] = w
    return state


def save_pretrained(model: nn.Module, directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained(directory, **kwargs)`` with merged weights: a plain transformers
    checkpoint that ``from_pretrained`` reloads with the trained function. The model is unchanged."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        raise TypeError(f"save_pretrained needs a transformers PreTrainedModel, got {type(model).__name__}")
    if "state_dict" in kwargs:
        raise TypeError("save_pretrained builds the state dict itself (merged weights); do not pass state_dict")
    type(model).save_pretrained(model, directory, state_dict=merged_state_dict(model), **kwargs)
