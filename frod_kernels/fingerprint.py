"""The fingerprint of a category's base weights: what an adapter was trained on.

The shared basis V of a category is a function of every weight in it, so δ and s mean something
only on exactly those weights: one changed entry in one layer changes every layer's update. The
fingerprint therefore covers every element: SHA-256 over each weight's shape, dtype and raw bytes
(read in chunks, so a GPU model is copied to the host a slice at a time). A device move keeps the
bytes, so it keeps the fingerprint; any other change (one entry, one bit, another dtype) does not.
A cast is not a new base, though: ``fingerprints_by_dtype`` also records the weights rounded to the
narrower dtypes a user may load the same checkpoint in, and ``compare_fingerprints`` accepts a model
whose weights are the recorded ones in any of those dtypes (and only those weights).

Cost: SHA-256 of every byte recorded (float32 weights and their two 16-bit roundings: twice their
size), on two cores where PyTorch may use two, about 1.6 GB/s per core here; small next to the
decomposition it protects (docs/benchmarks.md, "Setup cost").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["compare_fingerprints", "dtype_name", "fingerprints_by_dtype", "weight_fingerprint"]

# Bytes hashed per host copy: bounds the extra host memory for a GPU weight.
_CHUNK_BYTES = 1 << 26
# Elements cast and hashed at a time for a narrower dtype: small enough to stay in cache between the
# cast and its hash, so a cast of the weights is never materialised in memory.
_CAST_STEP = 1 << 15


def _fingerprints(weights: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype | None]) -> list[str]:
    """The fingerprint of the weights cast to each of ``dtypes`` (None: as they are), in one pass:
    each weight is read once, and each piece of it is hashed as it is and cast to each narrower dtype
    and hashed while in cache. Each fingerprint hashes what ``weight_fingerprint`` of the cast
    weights would: per weight its shape, dtype and bytes."""
    hashes = [hashlib.sha256() for _ in dtypes]
    for w in weights:
        w = w.detach()
        targets = [w.dtype if d is None else d for d in dtypes]
        for h, dtype in zip(hashes, targets, strict=True):
            h.update(f"{tuple(w.shape)}:{dtype}:".encode())
        flat = w.contiguous().reshape(-1)
        chunk = max(1, _CHUNK_BYTES // max(flat.element_size(), 1))
        step = chunk if all(dtype == w.dtype for dtype in targets) else _CAST_STEP
        for start in range(0, flat.numel(), chunk):
            host = flat[start:start + chunk].cpu()
            for at in range(0, host.numel(), step):
                piece = host[at:at + step]
                for h, dtype in zip(hashes, targets, strict=True):
                    h.update(piece.to(dtype).view(torch.uint8).numpy().data)
    return [h.hexdigest()[:32] for h in hashes]


def weight_fingerprint(weights: Sequence[torch.Tensor]) -> str:
    """A hex SHA-256 (first 32 digits) of the weights' shapes, dtypes and every byte, in order."""
    return _fingerprints(weights, [None])[0]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how adapters name dtypes."""
    return str(dtype).removeprefix("torch.")


# The narrower floating-point dtypes a user may load the same base in (``from_pretrained(dtype=…)``,
# ``model.to(…)``): an adapter records the fingerprint of the weights rounded to each.
_NARROWER = {
    torch.float64: (torch.float32, torch.bfloat16, torch.float16),
    torch.float32: (torch.bfloat16, torch.float16),
}


def fingerprints_by_dtype(weights: Sequence[torch.Tensor]) -> dict[str, str]:
    """{dtype name: fingerprint} of the weights as they are and rounded to each narrower float dtype
    (float32 → bfloat16, float16), so that the same base loaded in another dtype is recognised.

    The weights as they are and their roundings are hashed on two threads when PyTorch may use more
    than one (SHA-256 and the casts release the GIL; the two streams are about the same number of
    bytes): one pass over the weights each."""
    narrower = _NARROWER.get(weights[0].dtype, ())
    names = [dtype_name(weights[0].dtype), *map(dtype_name, narrower)]
    if not narrower or torch.get_num_threads() == 1:
        return dict(zip(names, _fingerprints(weights, [None, *narrower]), strict=True))
    with ThreadPoolExecutor(max_workers=1) as pool:
        own = pool.submit(_fingerprints, weights, [None])
        rounded = _fingerprints(weights, narrower)
        return dict(zip(names, own.result() + rounded, strict=True))


def compare_fingerprints(weights: Sequence[torch.Tensor], recorded: dict[str, str]) -> str | None:
    """None when ``weights`` are the recorded base: equal in their own dtype, or rounded to the widest
    recorded dtype narrower than theirs; else why not, naming the dtypes.

    ``recorded`` maps dtype names to fingerprints; the key ``"any"`` (adapters of format 2) holds a
    fingerprint of unrecorded dtype, compared with the weights as they are.
    """
    dtype = weights[0].dtype
    own = dtype_name(dtype)
    if own in recorded or "any" in recorded:
        if weight_fingerprint(weights) == recorded.get(own, recorded.get("any")):
            return None
        if own in recorded:
            return "the model's base weights differ from those the adapter was trained on"
        return ("the model's base weights differ from those the adapter was trained on (this adapter, of format "
                "2, records them only in the dtype it was saved in: load the base in that dtype)")
    for narrower in _NARROWER.get(dtype, ()):
        if dtype_name(narrower) in recorded:
            if _fingerprints(weights, [narrower])[0] == recorded[dtype_name(narrower)]:
                return None
            return (f"the model's base weights ({own}) rounded to {dtype_name(narrower)} differ from the "
                    f"{dtype_name(narrower)} weights the adapter was trained on")
    packed = {"uint8": "quantized (4-bit)", "int8": "quantized (int8)"}  # quantized bases as stored: their data
    if packed.keys() & (set(recorded) | {own}):
        have = packed.get(own, own)
        trained = " or ".join(packed.get(d, d) for d in sorted(recorded))
        hint = " (bitsandbytes, torchao: pip install 'frod_kernels[quant]')" if own not in packed else ""
        return (f"the model's base is {have}, the adapter was trained on a {trained} base: load the base as it was "
                f"when trained (quantized the same way{hint}, or not), or pass allow_other_base=True to load it "
                f"anyway")
    return (f"the model's base weights are {own}; the adapter records its base only in "
            f"{', '.join(sorted(recorded))}: load the base model in one of those dtypes")
