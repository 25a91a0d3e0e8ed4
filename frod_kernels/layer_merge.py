"""Merging a ``FRoDLinear`` and its state dicts, which the layer delegates here as PEFT's LoRA layers delegate
merging to a ``LoraVariant`` (peft/tuners/lora/layer.py): the layer keeps its parameters, maths and
execution state, these functions move W' in and out of ``weight`` and keep the layer's records right
(``layer_state.BaseProvenance``; ``FRoDLinear._invalidate``, the one place that drops cached state).

Merging (docs/design.md §6) writes W' = W + U·M·Vᵀ into ``weight``: additive mode writes it into the
parameter's data and keeps W's data aside, factored mode, which stores no W, registers a ``weight``
parameter holding W'. ``unmerge`` puts back what was there, bit for bit. W itself never changes, so its
provenance carries over and only the cached W' is dropped, not the basis path's measurements.

State dicts hold (W, b, δ, s), merged or not. A merged layer holds W' in ``weight``; saving that beside δ
and s would apply the update twice on load. So the state dict of a merged layer holds the base W
(additive) or no weight (factored), exactly as when unmerged, and loading into a merged layer unmerges
it, loads, and merges again with the new δ and s: a checkpoint restores the trained function either way.
A merged checkpoint (``MERGED_MARKER`` beside W', δ and s: what ``save_pretrained`` and the HF Trainer
write) loads too (``layer_checkpoint``): its W' is checked against this layer's W with its δ and s, and
only δ and s are taken, so a resumed run continues from exactly the saved state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layer_checkpoint import MERGED_MARKER, frod_entries_of_merged

if TYPE_CHECKING:
    from .layer import FRoDLinear

__all__ = ["loading", "merge", "save_unmerged", "unmerge"]


@contextmanager
def _swapping_weight(layer: FRoDLinear) -> Iterator[None]:
    """Around a swap of W and W' in ``weight``: W's provenance carries over, the cached W' goes."""
    was_original = layer._provenance.is_original(layer.base_weight)
    layer._invalidate(measurements=False)  # W' only: W is unchanged, so is the basis measurement
    yield
    layer._provenance.carry(was_original, layer.base_weight)


@torch.no_grad()
def merge(layer: FRoDLinear, safe: bool) -> None:
    """``FRoDLinear.merge``: W' into ``weight``, W kept for ``unmerge`` (nothing changes if W' is refused)."""
    if layer.merged:
        return
    w_eff = layer._weight_to_merge(safe)
    with _swapping_weight(layer):
        if layer.mode == "factored":
            # Registered directly: register_parameter would see the FactoredWeight stand-in.
            layer._parameters["weight"] = nn.Parameter(w_eff, requires_grad=False)
        else:
            layer._unmerged_weight = layer.weight.data
            layer.weight.data = w_eff
        layer.merged = True


@torch.no_grad()
def unmerge(layer: FRoDLinear) -> None:
    """``FRoDLinear.unmerge``: the original weight object's data comes back untouched."""
    if not layer.merged:
        return
    with _swapping_weight(layer):
        if layer.mode == "factored":
            del layer._parameters["weight"]
        else:
            layer.weight.data = layer._unmerged_weight
        layer._unmerged_weight = None
        layer.merged = False


def save_unmerged(layer: FRoDLinear, destination: dict, prefix: str) -> None:
    """After ``nn.Module._save_to_state_dict``: a merged layer's entries hold W (or no weight), not W'."""
    if not layer.merged:
        return
    if layer.mode == "factored":
        del destination[prefix + "weight"]
    else:
        destination[prefix + "weight"] = layer._unmerged_weight


@contextmanager
def loading(layer: FRoDLinear, state_dict: dict, prefix: str, error_msgs: list[str]) -> Iterator[dict]:
    """Around ``nn.Module._load_from_state_dict``: unmerges, yields the entries to load (a merged
    checkpoint's as ``layer_checkpoint`` reads them), then records what the load did to W and merges again."""
    merged = layer.merged
    layer.unmerge()
    base = layer.base_weight
    was_original = layer._provenance.is_original(base)
    if prefix + MERGED_MARKER in state_dict:
        state_dict = frod_entries_of_merged(
            state_dict, prefix, shape=(layer.out_features, layer.in_features),
            transposed=layer.base_class is not nn.Linear, base=base, merged_weight_of=layer._merged_weight_of,
            error_msgs=error_msgs,
        )
    incoming = state_dict.get(prefix + "weight")
    # Loading the values W already holds (a full checkpoint of this model) keeps its provenance.
    unchanged = base is None or incoming is None or (
        isinstance(incoming, torch.Tensor) and incoming.shape == base.shape and incoming.dtype == base.dtype
        and torch.equal(incoming.to(base.device), base)
    )
    yield state_dict
    if layer._provenance.derived_valid:
        layer._provenance.carry(was_original and unchanged, layer.base_weight)
    layer._invalidate()
    if merged:
        try:
            layer.merge()
        except ValueError as exc:  # load_state_dict raises with every message once all modules ran
            error_msgs.append(f"{prefix or 'FRoDLinear'}: loaded, but could not merge again: {exc}")
    layer._measure_basis()  # for the loaded W
