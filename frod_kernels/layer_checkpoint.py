"""How a ``FRoDLinear`` reads a merged checkpoint: W' in the replaced module's layout, beside δ, s and
``MERGED_MARKER`` (written by ``export.frod_checkpoint_state_dict``: ``model.save_pretrained`` and so the
HF Trainer's saves). Plain code loads W' from it; a FRoD layer takes δ and s and keeps its own W, once W
with those δ and s is shown to give the checkpoint's W', so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["MERGED_MARKER", "frod_entries_of_merged"]

MERGED_MARKER = "frod_merged"


def frod_entries_of_merged(
    state_dict: dict, prefix: str, *, shape: tuple[int, int], transposed: bool, base: torch.Tensor | None,
    merged_weight_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], error_msgs: list[str],
) -> dict:
    """One layer's entries of a merged checkpoint (keys under ``prefix``) as its FRoD state dict.

    Args:
        shape: the layer's (o, n); transposed: the checkpoint stores W'ᵀ (transformers' Conv1D).
        base: the layer's own W, which replaces W' (None in factored mode: no weight entry).
        merged_weight_of: (δ, s) → W' as the layer merges it (float64 accumulation, rounded once).
        error_msgs: where a mismatch is reported (``load_state_dict`` raises with all of them); the
            layer's entries are then dropped, so the layer is left as it was.

    W' must match within 2 ulp of its largest entry: equal on the same machine, while another BLAS
    may round the float64 product differently; a checkpoint of another base is far outside that, and
    so is a basis whose eigenvectors came out with other signs or rotations (docs/design.md §2,
    "Versioning"), which only ``load_frod`` of the checkpoint's adapter can align.
    """
    own = {key: value for key, value in state_dict.items()
           if key.startswith(prefix) and "." not in key[len(prefix):] and key != prefix + MERGED_MARKER}
    merged, delta, values = (own.get(prefix + key) for key in ("weight", "delta", "sparse_values"))
    where = prefix[:-1] or "FRoDLinear"
    if not all(isinstance(t, torch.Tensor) for t in (merged, delta, values)):
        error_msgs.append(f"{where}: a merged checkpoint entry needs weight, delta and sparse_values")
        return own
    if transposed:
        merged = merged.mT
    if tuple(merged.shape) != shape:
        error_msgs.append(f"{where}: the checkpoint's merged weight has shape {tuple(merged.shape)}, "
                          f"the layer {shape}")
        return own
    with torch.no_grad():
        expected = merged_weight_of(delta, values)
        got = merged.to(device=expected.device, dtype=expected.dtype)
        atol = 2 * torch.finfo(expected.dtype).eps * float(expected.abs().max())
        if not torch.allclose(got, expected, rtol=0.0, atol=atol):
            error_msgs.append(
                f"{where}: the checkpoint's merged weight is not this layer's base weight with the checkpoint's "
                f"delta and sparse_values: it was written from another base model (load it into that base), or "
                f"this layer's basis came out otherwise here (another machine, or the base in another dtype: "
                f"load_frod(base_model, checkpoint_dir) aligns the basis to the adapter saved beside it)"
            )
            return {}  # nothing of it: the layer keeps its W, δ and s (load_state_dict raises afterwards)
    if base is None:
        own.pop(prefix + "weight")
    else:
        own[prefix + "weight"] = base
    return own
