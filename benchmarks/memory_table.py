"""Training memory of Llama-3-8B and Llama-3-70B, from their shapes alone: FRoD's storage modes, LoRA, QLoRA.

    python -m benchmarks.memory_table [--rank 16] [--rho 0.01] [--out docs/memory_table.md]

Pure arithmetic: no model, no weights, no device. For each model, one row per way of holding or
training it, in GiB (2³⁰ bytes): the frozen tensors, the trainable parameters, the optimizer state
(AdamW), the gradients, and their total, plus the trainable share of the base model's parameters.
Activations, the KV cache, workspaces and allocator slack are not counted: they depend on the batch
and the sequence, not on the method's storage.

Shapes (Llama-3): hidden 4096 / 8192, intermediate 14336 / 28672, 32 / 80 layers, 32 / 64 query heads
and 8 key-value heads of dimension 128, vocabulary 128256, untied embeddings and lm_head. Targets:
q, k, v, o, gate, up and down projections of every layer (no biases), one FRoD category per target
name (7 categories). Embeddings, lm_head and the RMSNorm weights are frozen non-target weights in
the base dtype (bf16). Byte counts per element: bf16 2, fp32 4, int64 8; NF4 as bitsandbytes stores
it (``nf4_bytes``). Each count is a small function below whose docstring states its formula.

Prints the tables and the notes as Markdown; ``--out PATH`` also writes them under a header that
names the command (docs/memory_table.md is ``--out docs/memory_table.md``).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from frod_kernels.bench.runner import make_parser
from frod_kernels.pattern import num_sparse_entries, validate_sparse_rate

__all__ = [
    "LLAMA3_8B", "LLAMA3_70B", "MODELS", "ModelShape", "Row", "build_parser", "document", "format_table", "main",
    "memory_rows",
]

GIB = 2**30
BF16, FP32, INT64 = 2, 4, 8
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' default blocksize for 4-bit layers)
NF4_BLOCK2 = 256  # first-level absmax per fp32 second-level scale (double quantization)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DOCS_COMMAND = "python -m benchmarks.memory_table --out docs/memory_table.md"


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-3 decoder (untied embeddings and lm_head, no biases)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


LLAMA3_8B = ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128, 128256)
LLAMA3_70B = ModelShape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128, 128256)
MODELS = (LLAMA3_8B, LLAMA3_70B)


# -- element counts ---------------------------------------------------------------------------


def target_shapes(m: ModelShape) -> dict[str, tuple[int, int]]:
    """(o, n) = (out, in) of each target's weight in one layer: q (heads·d, h), k and v (kv_heads·d, h),
    o (h, heads·d), gate and up (i, h), down (h, i)."""
    h, i, q, kv = m.hidden, m.intermediate, m.heads * m.head_dim, m.kv_heads * m.head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def target_weight_count(m: ModelShape) -> int:
    """Elements of the targeted weights: L · Σ_targets o·n."""
    return m.layers * sum(o * n for o, n in target_shapes(m).values())


def non_target_count(m: ModelShape) -> int:
    """Elements of the frozen non-target weights: embeddings and lm_head V·h each, two RMSNorms per
    layer and the final one, h each: 2·V·h + (2L + 1)·h."""
    return 2 * m.vocab * m.hidden + (2 * m.layers + 1) * m.hidden


def parameter_count(m: ModelShape) -> int:
    """All parameters of the base model: targets + non-targets."""
    return target_weight_count(m) + non_target_count(m)


def lora_count(m: ModelShape, rank: int) -> int:
    """LoRA's trainable elements: A (r × n) and B (o × r) per target and layer: L · Σ_targets r·(n + o)."""
    return m.layers * sum(rank * (n + o) for o, n in target_shapes(m).values())


def frod_trainable_count(m: ModelShape, rho: float) -> int:
    """FRoD's trainable elements: δ (n) and s (k = ⌊ρ·n²⌋, ``pattern.num_sparse_entries``) per target and
    layer: L · Σ_targets (n + k)."""
    return m.layers * sum(n + num_sparse_entries(n, rho) for _, n in target_shapes(m).values())


# -- bytes of the frozen tensors ------------------------------------------------------------------


def dense_bytes(count: int, element_bytes: int) -> int:
    """A dense tensor: count · element bytes."""
    return count * element_bytes


def nf4_bytes(count: int, double_quant: bool = True) -> int:
    """A weight as bitsandbytes' 4-bit layer stores it (``Linear4bit``, blocksize 64): count/2 bytes of
    packed 4-bit codes, plus one absmax per 64-weight block, B = ⌈count/64⌉. Double quantization
    (``bnb_4bit_use_double_quant=True``, QLoRA's default): the absmax are 8-bit (1 B each) with one fp32
    second-level scale per 256 blocks, so count/2 + B + 4·⌈B/256⌉ ≈ 0.5159 B per weight; without it the
    absmax are fp32: count/2 + 4·B (0.5625 B per weight). Per-tensor constants (the 16-entry NF4 code,
    the mean offset, the 256-entry second-level code: ≈ 1.1 KiB a layer) are left out."""
    blocks = math.ceil(count / NF4_BLOCK)
    if double_quant:
        return math.ceil(count / 2) + blocks + FP32 * math.ceil(blocks / NF4_BLOCK2)
    return math.ceil(count / 2) + FP32 * blocks


def nf4_bytes_of_targets(m: ModelShape, double_quant: bool = True) -> int:
    """The targets' weights in NF4, each layer's weight quantized on its own: L · Σ_targets nf4_bytes(o·n)."""
    return m.layers * sum(nf4_bytes(o * n, double_quant) for o, n in target_shapes(m).values())


def u_bytes(m: ModelShape, element_bytes: int) -> int:
    """FRoD's U (o × n) per target and layer: L · Σ_targets o·n · element bytes (as large as W)."""
    return dense_bytes(target_weight_count(m), element_bytes)


def lambda_bytes(m: ModelShape, element_bytes: int, copies: int = 1) -> int:
    """λ (n) per target and layer: L · Σ_targets n · element bytes · copies (the input form also keeps
    Λ⁺, its guarded reciprocal: copies = 2)."""
    return copies * m.layers * sum(n for _, n in target_shapes(m).values()) * element_bytes


def basis_bytes(m: ModelShape, element_bytes: int, inverse: bool = False) -> int:
    """V (n × n) per category (one per target name, shared by its L layers): Σ_targets n² · element bytes;
    with V⁻¹ beside it (the input form), twice that."""
    return (2 if inverse else 1) * sum(n * n for _, n in target_shapes(m).values()) * element_bytes


def pattern_bytes(m: ModelShape, rho: float) -> int:
    """The sparse pattern Ω per category with its CSR and CSC views (docs/design.md §6: indices 2k,
    csc_perm k, csr_ptr and csc_ptr n + 1 each), int64: Σ_targets 8·(3k + 2(n + 1)). The host copy of
    the indices (16·k B per category, CPU memory) is not counted."""
    return sum(INT64 * (3 * num_sparse_entries(n, rho) + 2 * (n + 1)) for _, n in target_shapes(m).values())


# -- bytes of training state ---------------------------------------------------------------------


def adamw_bytes(count: int, master: bool) -> int:
    """AdamW's state: two fp32 moments per trainable element (8 B), plus an fp32 master copy (4 B) when
    the trainable itself is bf16 (``master``): count · (8 + 4·master)."""
    return count * (2 * FP32 + (FP32 if master else 0))


def gradient_bytes(count: int, element_bytes: int) -> int:
    """One gradient per trainable element, in the trainable's dtype: count · element bytes."""
    return count * element_bytes


# -- the rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One way of holding or training a model: bytes of each kind, and the trainable element count."""

    name: str
    frozen: int
    trainable: int
    optimizer: int
    gradients: int
    trainable_count: int
    note: str

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.optimizer + self.gradients


def _adapter_row(name: str, frozen: int, count: int, note: str) -> Row:
    """An adapter's row: its trainables are fp32 masters (4 B), AdamW's moments (8 B), fp32 gradients (4 B)."""
    return Row(name, frozen, dense_bytes(count, FP32), adamw_bytes(count, master=False), gradient_bytes(count, FP32),
               count, note)


def memory_rows(m: ModelShape, rank: int = 16, rho: float = 0.01) -> list[Row]:
    """The table's rows for model ``m``: LoRA of rank ``rank``, FRoD with sparse rate ``rho``."""
    params = parameter_count(m)
    base = dense_bytes(params, BF16)
    others = dense_bytes(non_target_count(m), BF16)
    nf4_base = nf4_bytes_of_targets(m) + others
    lora, frod = lora_count(m, rank), frod_trainable_count(m, rho)
    shared = pattern_bytes(m, rho)
    return [
        Row("base model, frozen (inference)", base, 0, 0, 0, 0,
            "every weight in bf16, nothing trained"),
        Row("full fine-tuning", 0, dense_bytes(params, BF16), adamw_bytes(params, master=True),
            gradient_bytes(params, BF16), params,
            "bf16 weights and gradients; AdamW keeps an fp32 master copy and two fp32 moments: 16 B per parameter"),
        _adapter_row(f"LoRA r={rank}", base, lora,
                     "frozen bf16 base; A (r × n) and B (o × r) per target in fp32"),
        _adapter_row("FRoD additive", base + u_bytes(m, BF16) + lambda_bytes(m, BF16) + basis_bytes(m, BF16) + shared,
                     frod,
                     "W, U (as large as W) and λ per layer, V and Ω per category, all frozen; δ (n) and s (k) in fp32"),
        _adapter_row("FRoD factored", others + u_bytes(m, BF16) + lambda_bytes(m, BF16) + basis_bytes(m, BF16)
                     + shared, frod,
                     "W dropped (W = U·diag(λ)·Vᵀ): U and λ per layer, V and Ω per category"),
        _adapter_row("FRoD input", base + lambda_bytes(m, BF16, copies=2) + basis_bytes(m, BF16, inverse=True)
                     + shared, frod,
                     "the base untouched; λ and Λ⁺ per layer, V, V⁻¹ and Ω per category; no U"),
        _adapter_row("FRoD input, NF4 base", nf4_base + lambda_bytes(m, BF16, copies=2)
                     + basis_bytes(m, BF16, inverse=True) + shared, frod,
                     "targets in NF4 (double quantization); embeddings, lm_head, norms, λ, Λ⁺, V, V⁻¹ in bf16"),
        _adapter_row(f"QLoRA r={rank}", nf4_base, lora,
                     "the same NF4 base; A and B in fp32"),
    ]


# -- output --------------------------------------------------------------------------------------


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def format_table(m: ModelShape, rows: Sequence[Row]) -> str:
    """A Markdown table of ``rows`` (GiB to 2 decimals, trainable share of the base's parameters in %)."""
    params = parameter_count(m)
    lines = ["| | frozen weights | trainable params | optimizer state | gradients | total | trainable % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [_gib(x) for x in (r.frozen, r.trainable, r.optimizer, r.gradients, r.total)]
        lines.append(f"| {r.name} | {' | '.join(cells)} | {100 * r.trainable_count / params:.2f} |")
    return "\n".join(lines)


def _model_section(m: ModelShape, rank: int, rho: float) -> str:
    rows = memory_rows(m, rank, rho)
    t = target_shapes(m)
    heading = (f"## {m.name}\n\n{parameter_count(m) / 1e9:.2f} B parameters: targets "
               f"{target_weight_count(m) / 1e9:.2f} B, embeddings + lm_head + norms {non_target_count(m) / 1e9:.2f} B. "
               f"Per layer (o × n): q {t['q_proj'][0]} × {t['q_proj'][1]}, k and v {t['k_proj'][0]} × "
               f"{t['k_proj'][1]}, o {t['o_proj'][0]} × {t['o_proj'][1]}, gate and up {t['gate_proj'][0]} × "
               f"{t['gate_proj'][1]}, down {t['down_proj'][0]} × {t['down_proj'][1]}; {m.layers} layers. "
               f"Trainable: LoRA {lora_count(m, rank) / 1e6:.1f} M, FRoD {frod_trainable_count(m, rho) / 1e6:.1f} M.")
    return f"{heading}\n\n{format_table(m, rows)}"


def _notes(rank: int, rho: float) -> str:
    rows = memory_rows(LLAMA3_8B, rank, rho)
    lines = ["## Rows", ""]
    lines += [f"- **{r.name}**: {r.note}." for r in rows]
    lines += [
        "",
        "## Counted as",
        "",
        "- GiB = 2³⁰ bytes. Weights and training state only: no activations, KV cache, workspaces or allocator "
        "slack. bf16 base; embeddings, lm_head and norms frozen in bf16 in every row but full fine-tuning.",
        "- Adapters (LoRA's A and B, FRoD's δ and s) are fp32 masters: 4 B each, AdamW's two fp32 moments "
        "8 B, the gradient 4 B. Full fine-tuning: bf16 parameter (2 B) and gradient (2 B), fp32 master and "
        "moments (12 B) in the optimizer-state column.",
        f"- FRoD: one category per target name (7); per layer δ (n) and s (k = ⌊ρ·n²⌋, ρ = {rho}); U, λ, Λ⁺, V "
        "and V⁻¹ in the base dtype (bf16), Ω and its CSR/CSC views in int64, 8·(3k + 2(n + 1)) B per category "
        "(docs/design.md §6).",
        "- NF4 (bitsandbytes, blocksize 64, `bnb_4bit_use_double_quant=True`, QLoRA's default): 4 bits per "
        "weight, one 8-bit absmax per 64-weight block and one fp32 second-level scale per 256 blocks, "
        f"{nf4_bytes(NF4_BLOCK * NF4_BLOCK2) / (NF4_BLOCK * NF4_BLOCK2):.4f} B per weight; per-tensor constants "
        "(≈ 1.1 KiB a layer) left out.",
        "- trainable %: trainable elements over the base model's parameters.",
    ]
    return "\n".join(lines)


def document(rank: int = 16, rho: float = 0.01, command: str | None = None) -> str:
    """The Markdown the script prints; with ``command``, under the header that docs/memory_table.md has."""
    body = "\n\n".join([*(_model_section(m, rank, rho) for m in MODELS), _notes(rank, rho)]) + "\n"
    if command is None:
        return body
    header = ("# Training memory of Llama-3-8B and Llama-3-70B by method\n\n"
              f"Generated by `{command}` (benchmarks/memory_table.py) from the models' shapes alone, "
              "no weights: edit the script and run the command again rather than this file.\n\n")
    return header + body


def _rank(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _rate(text: str) -> float:
    try:
        return validate_sparse_rate(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) or 0, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.memory_table``."""
    parser = make_parser("python -m benchmarks.memory_table", __doc__)
    parser.add_argument("--rank", type=_rank, default=16, help="LoRA's and QLoRA's rank r")
    parser.add_argument("--rho", type=_rate, default=0.01, help="FRoD's sparse rate ρ (k = ⌊ρ·n²⌋)")
    parser.add_argument("--out", type=Path, metavar="PATH", help="also write the tables, under a header naming the "
                        "command, to PATH")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.memory_table``: print the tables; with --out, write them to a file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    print(document(args.rank, args.rho), end="")
    if args.out is not None:
        command = " ".join(["python -m benchmarks.memory_table", *map(shlex.quote, argv)])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(document(args.rank, args.rho, command))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
