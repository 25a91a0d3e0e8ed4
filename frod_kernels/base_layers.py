"""The frozen base layers FRoD's input form wraps (docs/design.md §6.1), seen through one interface.

The input form computes y = base(x̃): it never reads the base weight in the forward or backward,
so the base may store W in any way, as long as it computes x ↦ x·Wᵀ + b with x as given. Known
bases: ``nn.Linear`` and transformers' ``Conv1D`` (float), bitsandbytes ``Linear4bit`` (NF4/FP4,
QLoRA's base), and ``nn.Linear`` whose weight is a torchao weight-only quantized tensor
(``quantize_(model, Int8WeightOnlyConfig())``). What FRoD needs from a base besides calling it:

* ``dense_weight(base)``: W (o, n) as floating-point values, to decompose and to merge: the weight
  itself for ``nn.Linear``, the transpose view for ``Conv1D``, the dequantized weight of a
  quantized base (exactly the values its forward multiplies by);
* ``stored_tensors(base)``: what the base stores, for fingerprints (a quantized base's packed data
  and scales, so an adapter names the exact quantized base);
* ``quantization(base)``: None for a float base, else a short name ("nf4", "fp4", "Int8Tensor");
* ``check_wrappable(base)``: refuses bases the input form cannot be exact for: layers that
  quantize their input (bitsandbytes ``Linear8bitLt``, LLM.int8(), and torchao's dynamic-activation
  configs round x, and with it x̃ − x, the whole update) and anything that is not a known linear layer.

bitsandbytes and torchao are optional: nothing here imports them unless a model holds their layers.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["check_wrappable", "conv1d_class", "dense_weight", "dequantize", "is_bnb_layer", "is_quantized",
           "keep_layout", "quantization", "requantize", "stored_tensors"]


def _bnb_classes() -> tuple[type, type] | None:
    """(Linear4bit, Linear8bitLt) if bitsandbytes is imported (a model holding its layers imports it)."""
    nn_module = sys.modules.get("bitsandbytes.nn")
    if nn_module is None:
        return None
    return nn_module.Linear4bit, nn_module.Linear8bitLt


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` if transformers is already imported (a model using it imports it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_bnb_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    bnb = _bnb_classes()
    return bnb is not None and isinstance(module, bnb)


def _is_4bit(base: nn.Module) -> bool:
    bnb = _bnb_classes()
    return bnb is not None and isinstance(base, bnb[0])


def _is_torchao(weight: object) -> bool:
    """A torchao quantized tensor (a tensor subclass that can dequantize itself)."""
    return type(weight).__module__.startswith("torchao") and callable(getattr(weight, "dequantize", None))


def quantization(base: nn.Module) -> str | None:
    """None for a float base; the quantization's name: "nf4"/"fp4" (bitsandbytes), the tensor class (torchao)."""
    if _is_4bit(base):
        state = getattr(base.weight, "quant_state", None)
        return getattr(state, "quant_type", None) or getattr(base.weight, "quant_type", "4bit")
    weight = getattr(base, "weight", None)
    return type(weight).__name__ if _is_torchao(weight) else None


def is_quantized(base: nn.Module) -> bool:
    return quantization(base) is not None


def check_wrappable(base: nn.Module, name: str = "") -> None:
    """Raise unless the input form can wrap ``base`` exactly (module docstring)."""
    where = f"target {name!r}" if name else "the base layer"
    bnb = _bnb_classes()
    if bnb is not None and isinstance(base, bnb[1]):
        raise TypeError(
            f"{where} is a bitsandbytes Linear8bitLt (LLM.int8()): it quantizes its input to 8 bits per row, "
            f"which rounds away FRoD's input-side update x̃ − x. Load the base in 4-bit (BitsAndBytesConfig("
            f"load_in_4bit=True)) or in a float dtype"
        )
    if bnb is not None and isinstance(base, bnb[0]):
        if not getattr(base.weight, "bnb_quantized", True) or getattr(base.weight, "quant_state", None) is None:
            raise ValueError(f"{where} is a bitsandbytes Linear4bit whose weight is not quantized yet (move it to "
                             f"its device first, as from_pretrained does)")
        if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                f"{where}: bitsandbytes repacked this Linear4bit for CPU inference (a forward under no_grad in eval "
                f"mode on a CPU with AVX512-BF16), which rounds its scales to bfloat16: it is no longer the "
                f"checkpoint's base. Load the model again and apply FRoD before running it under no_grad"
            )
        return
    weight = getattr(base, "weight", None)
    if type(base) is nn.Linear and _is_torchao(weight) and getattr(weight, "act_quant_kwargs", None) is not None:
        raise TypeError(
            f"{where} has a torchao {type(weight).__name__} weight that quantizes its input too (dynamic activation "
            f"quantization), which rounds away FRoD's input-side update x̃ − x; use a weight-only config "
            f"(Int8WeightOnlyConfig)"
        )
    conv1d = conv1d_class()
    if type(base) is not nn.Linear and (conv1d is None or type(base) is not conv1d):
        raise TypeError(
            f"{where} is a {type(base).__name__}: the input form wraps nn.Linear (float or torchao weight-only), "
            f"transformers Conv1D and bitsandbytes Linear4bit layers"
        )


def keep_layout(base: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit layer for CPU inference. On CPUs with AVX512-BF16 its
    forward, in eval mode without gradients, rewrites the weight into another layout and rounds its
    scales (absmax) to bfloat16 in place: the base would change under the adapter (another function,
    other bytes than its fingerprint). FRoD's layers compute through the generic path instead, the one
    training uses. GPUs are not affected."""
    if _is_4bit(base) and getattr(base, "support_avx512bf16_for_cpu", False):
        base.support_avx512bf16_for_cpu = False


def dense_weight(base: nn.Module) -> torch.Tensor:
    """W (o, n) as floating-point values (no copy for float bases; dequantized for quantized ones)."""
    if is_bnb_layer(base) and not _is_4bit(base):
        check_wrappable(base)  # raises: an 8-bit layer's weight cannot stand for its function
    if _is_4bit(base) or _is_torchao(getattr(base, "weight", None)):
        return dequantize(base.weight)
    if type(base) is nn.Linear:
        return base.weight
    return base.weight.t()  # Conv1D stores Wᵀ


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """W (o, n) of a quantized weight: a bitsandbytes ``Params4bit`` (in its quantization state's dtype)
    or a torchao quantized tensor (in the dtype it reports)."""
    if _is_torchao(weight):
        return weight.dequantize()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


def requantize(weight: torch.Tensor, values: torch.Tensor, module: nn.Module) -> nn.Parameter:
    """A new bitsandbytes ``Params4bit`` holding ``values`` (o, n) quantized as ``weight`` is (type, block
    size, double quantization, storage); ``weight`` itself is left as it was."""
    if _is_torchao(weight):
        raise ValueError(f"requantizing W' is offered for bitsandbytes 4-bit bases, not torchao's "
                         f"{type(weight).__name__}: export float weights instead")
    import bitsandbytes as bnb

    state = weight.quant_state
    packed, new_state = bnb.functional.quantize_4bit(
        values.to(state.dtype).contiguous(), blocksize=state.blocksize, compress_statistics=state.nested,
        quant_type=state.quant_type, quant_storage=weight.quant_storage,
    )
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=new_state, blocksize=state.blocksize,
                             compress_statistics=state.nested, quant_type=state.quant_type,
                             quant_storage=weight.quant_storage, module=module, bnb_quantized=True)


def stored_tensors(base: nn.Module, weight: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The tensors that define the base's weight as stored: a float weight itself; a bitsandbytes 4-bit
    weight's packed bytes and quantization state (absmax, code and, with double quantization, theirs);
    a torchao tensor's inner tensors (its data and scales). ``weight``: a quantized weight to describe
    instead of the base's own (one kept aside by a merge)."""
    weight = base.weight if weight is None else weight
    if _is_torchao(weight):
        names, _ = weight.__tensor_flatten__()
        return [getattr(weight, name).detach() for name in names]
    if not _is_4bit(base):
        return [dense_weight(base)]
    state = weight.quant_state
    found = [weight.data, state.absmax, state.code]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found += [nested.absmax, nested.code, torch.as_tensor(float(state.offset))]
    return [t.detach() for t in found]
