"""The fingerprint of a category's base weights: what an adapter was trained on.

The shared basis V of a category is a function of every weight in it, so δ and s mean something
only on exactly those weights: one changed entry in one layer changes every layer's update. The
fingerprint therefore covers every element: SHA-256 over each weight's shape, dtype and raw bytes
(read in chunks, so a GPU model is copied to the host a slice at a time). A device move keeps the
bytes, so it keeps the fingerprint; any other change (one entry, one bit, another dtype) does not.

Cost: one pass over the weights at about 1 GB/s (SHA-256 on one core), small next to the
decomposition it protects (see docs/hardening.md for the MiniLM measurement).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["weight_fingerprint"]

# Bytes hashed per host copy: bounds the extra host memory for a GPU weight.
_CHUNK_BYTES = 1 << 26


def weight_fingerprint(weights: Sequence[torch.Tensor]) -> str:
    """A hex SHA-256 (first 32 digits) of the weights' shapes, dtypes and every byte, in order."""
    h = hashlib.sha256()
    for w in weights:
        w = w.detach()
        h.update(f"{tuple(w.shape)}:{w.dtype}:".encode())
        flat = w.contiguous().reshape(-1)
        step = max(1, _CHUNK_BYTES // max(flat.element_size(), 1))
        for start in range(0, flat.numel(), step):
            chunk = flat[start:start + step].cpu()
            h.update(chunk.view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]
