"""Checkpoints of a FRoD model that plain code reloads: merged state dicts, transformers' format, and
what ``model.save_pretrained`` (and so the HF Trainer) writes for a FRoD model.

A FRoD layer's own state dict holds (W, b, δ, s); a model without FRoD expects (W', b) in the
layout of the module FRoD replaced (``nn.Linear``: (o, n); transformers' ``Conv1D``: (n, o)).
``merged_state_dict`` gives that, leaving the model as it is; ``save_pretrained`` writes it as a
transformers checkpoint, which ``from_pretrained`` reloads as the plain architecture computing the
trained function (W' = W + U·M·Vᵀ, formed in float64 and rounded once, as ``merge`` does).
A model with a quantized base (the input form on bitsandbytes 4-bit layers) gives a float checkpoint:
W' and every other quantized layer dequantized, and no ``quantization_config`` in ``config.json``
(``from_pretrained(dir, quantization_config=…)`` quantizes it again if wanted).

``model.save_pretrained(dir)`` on a FRoD model (``apply_frod`` installs a guard for it, since the
HF Trainer's saves and checkpoints go through it) writes one directory that serves every way back:
  * ``model.safetensors`` + ``config.json``: the merged checkpoint, so ``from_pretrained(dir)`` is
    the trained function; beside each FRoD layer's W' it holds δ, s and ``MERGED_MARKER``, so that
    ``load_state_dict`` into the FRoD model (the Trainer's ``resume_from_checkpoint``) takes δ and s
    and keeps the model's own W: a resumed run continues bit for bit;
  * ``adapter_model.safetensors``: the FRoD adapter (self-describing), for ``load_frod(base, dir)``.
    No ``adapter_config.json`` is written there: transformers would take the directory for a PEFT
    adapter and fail to load it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from .adapter import ADAPTER_FILE, CONFIG_FILE, save_frod
from .base_layers import dense_weight, is_quantized
from .layer import FRoDLayer
from .layer_checkpoint import MERGED_MARKER
from .targets import frod_layers, modules_with_all_names

__all__ = ["frod_checkpoint_state_dict", "install_checkpoint_guard", "merged_state_dict", "remove_checkpoint_guard",
           "save_pretrained"]


def _merged(model: nn.Module, state: dict[str, torch.Tensor] | None, resumable: bool,
            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    if not frod_layers(model):
        raise ValueError("the model has no FRoD layers (call apply_frod first)")
    state = dict(model.state_dict() if state is None else state)
    for target in modules_with_all_names(model):
        layer = target.module
        if is_quantized(layer) and not any(a.endswith(".base_layer") for a in target.aliases):
            _dequantized_entries(state, target.aliases, layer)  # a quantized layer FRoD does not wrap
        if not isinstance(layer, FRoDLayer):
            continue
        w = layer.effective_weight().detach()  # what merge() writes, bit for bit
        if dtype is not None:
            w = w.to(dtype)
        if layer.base_class is not nn.Linear:  # Conv1D stores Wᵀ
            w = w.t().contiguous()
        for prefix in (f"{alias}." for alias in target.aliases):
            # The input form's base sits under base_layer. (a quantized one with its quantization state):
            # the plain architecture has W' and b at the layer's own name.
            for key in [k for k in state if k.startswith(prefix + "base_layer.")]:
                del state[key]
            if layer.bias is not None:
                state[prefix + "bias"] = layer.bias.detach() if dtype is None else layer.bias.detach().to(dtype)
            state[prefix + "weight"] = w
            if resumable:
                state[prefix + "delta"] = layer.delta.detach()
                state[prefix + "sparse_values"] = layer.sparse_values.detach()
                state[prefix + MERGED_MARKER] = torch.ones((), dtype=torch.bool)
            else:
                state.pop(prefix + "delta", None)
                state.pop(prefix + "sparse_values", None)
    return state


def _dequantized_entries(state: dict[str, torch.Tensor], aliases: list[str], layer: nn.Module) -> None:
    """A 4-bit layer's entries as a float checkpoint holds them: W dequantized, no quantization state."""
    for prefix in (f"{alias}." for alias in aliases):
        for key in [k for k in state if k.startswith(prefix + "weight.")]:
            del state[key]
        state[prefix + "weight"] = dense_weight(layer).detach()


@contextlib.contextmanager
def _as_float_model(model: nn.Module):
    """transformers saves a quantized model through its quantizer (the packed state dict) and writes its
    ``quantization_config``; a merged checkpoint is float. While saving, the model has neither, so the
    given state dict is written and ``from_pretrained(dir)`` loads the float model it describes."""
    quantizer, config = getattr(model, "hf_quantizer", None), getattr(model, "config", None)
    quant_config = getattr(config, "quantization_config", None)
    if quantizer is None:
        yield
        return
    model.hf_quantizer = None
    if quant_config is not None:
        del config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            config.quantization_config = quant_config


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as the model without FRoD would have it, with every weight merged.

    ``dtype``: of the FRoD layers' W' and b (default: W's; a quantized base's dequantized dtype). The
    model is unchanged (a quantized base stays quantized; its entry here is float W')."""
    return _merged(model, None, resumable=False, dtype=dtype)


def frod_checkpoint_state_dict(model: nn.Module,
                               state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict plus, per FRoD layer, δ, s and ``MERGED_MARKER`` (module docstring): plain
    code loads the trained function from it, a FRoD model loads exactly its δ and s. ``state_dict``: the
    model's state dict as the caller has it (the HF Trainer passes a gathered one under FSDP/DeepSpeed)."""
    return _merged(model, state_dict, resumable=True)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                    **kwargs) -> None:
    """``model.save_pretrained(directory, **kwargs)`` with merged weights only: a plain transformers
    checkpoint of the architecture without FRoD (nothing FRoD-specific in it). The model is unchanged.
    ``dtype``: of the FRoD layers' merged weights (``merged_state_dict``)."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        raise TypeError(f"save_pretrained needs a transformers PreTrainedModel, got {type(model).__name__}")
    if "state_dict" in kwargs:
        raise TypeError("save_pretrained builds the state dict itself (merged weights); do not pass state_dict")
    state_dict = merged_state_dict(model, dtype=dtype)
    with _as_float_model(model):
        type(model).save_pretrained(model, directory, state_dict=state_dict, **kwargs)


class _SavePretrainedGuard:
    """Stands in for ``model.save_pretrained`` on a transformers model with FRoD layers: writes the
    directory of the module docstring. A plain object, not a bound function, so that the model still
    pickles and deep-copies."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args, state_dict=None, is_main_process: bool = True,
                 **kwargs):
        model = self.model
        frod = bool(frod_layers(model))
        if frod:
            state_dict = frod_checkpoint_state_dict(model, state_dict)
        with _as_float_model(model) if frod else contextlib.nullcontext():
            result = type(model).save_pretrained(model, save_directory, *args, state_dict=state_dict,
                                                 is_main_process=is_main_process, **kwargs)
        if is_main_process and frod_layers(model):
            directory = Path(save_directory)
            save_frod(model, directory / ADAPTER_FILE)
            (directory / CONFIG_FILE).unlink(missing_ok=True)  # it would describe another adapter than the file
        return result


def install_checkpoint_guard(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write a FRoD checkpoint (transformers models only)."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in vars(model):
        model.save_pretrained = _SavePretrainedGuard(model)


def remove_checkpoint_guard(model: nn.Module) -> None:
    if isinstance(vars(model).get("save_pretrained"), _SavePretrainedGuard):
        del model.save_pretrained
