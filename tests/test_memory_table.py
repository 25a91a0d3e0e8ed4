"""benchmarks.memory_table: the byte counts against facts checked by hand, and docs/memory_table.md is
what the command it names prints today."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

from benchmarks import memory_table as mt

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _rows(model: mt.ModelShape) -> dict[str, mt.Row]:
    return {row.name: row for row in mt.memory_rows(model)}


def test_parameter_counts():
    # Llama-3-8B: 8.03 B; Llama-3-70B: 70.6 B (the model cards)
    assert abs(mt.parameter_count(mt.LLAMA3_8B) / 8.03e9 - 1) < 0.01
    assert abs(mt.parameter_count(mt.LLAMA3_70B) / 70.6e9 - 1) < 0.01
    # by hand: 32 · (2·4096² + 2·1024·4096 + 3·4096·14336) + 2·128256·4096 + 65·4096
    assert mt.parameter_count(mt.LLAMA3_8B) == 8_030_261_248
    # LoRA r = 16 on all seven: 32 · 16 · (2·8192 + 2·5120 + 3·18432) (PEFT reports 41,943,040)
    assert mt.lora_count(mt.LLAMA3_8B, 16) == 41_943_040
    # FRoD ρ = 0.01: six targets with n = 4096 (k = 167,772), down with n = 14336 (k = 2,055,208)
    assert mt.frod_trainable_count(mt.LLAMA3_8B, 0.01) == 32 * (6 * (4096 + 167_772) + 14336 + 2_055_208)


def test_nf4_bytes():
    # 4 bits per weight, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmax
    assert mt.nf4_bytes(64 * 256) == 64 * 256 // 2 + 256 + 4
    assert mt.nf4_bytes(64 * 256, double_quant=False) == 64 * 256 // 2 + 4 * 256
    assert mt.nf4_bytes(1000) == 500 + 16 + 4  # partial blocks round up


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes(double_quant):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnbf
    weight = torch.randn(256, 1024, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    stored = [packed, state.absmax, *([state.state2.absmax] if double_quant else [])]
    assert mt.nf4_bytes(weight.numel(), double_quant) == sum(t.numel() * t.element_size() for t in stored)


def test_llama3_8b_rows():
    rows = _rows(mt.LLAMA3_8B)
    base = rows["base model, frozen (inference)"].frozen
    assert abs(base / GIB - 14.96) < 0.005
    assert rows["FRoD additive"].frozen > 1.8 * base  # U is as large as W
    assert rows["FRoD factored"].frozen < 1.1 * base
    assert rows["FRoD input"].frozen < 1.1 * base
    assert rows["FRoD input, NF4 base"].frozen < 0.6 * base
    assert rows["QLoRA r=16"].frozen < rows["FRoD input, NF4 base"].frozen < rows["FRoD input"].frozen
    # V and V⁻¹ in bf16: 2 · 2 B · (6·4096² + 14336²) more than the base, plus λ, Λ⁺ and Ω
    extra = rows["FRoD input"].frozen - base
    assert 2 * 2 * (6 * 4096**2 + 14336**2) < extra < 1.1 * 2 * 2 * (6 * 4096**2 + 14336**2)
    full = rows["full fine-tuning"]
    params = mt.parameter_count(mt.LLAMA3_8B)
    assert (full.frozen, full.trainable, full.optimizer, full.gradients) == (0, 2 * params, 12 * params, 2 * params)
    lora = rows["LoRA r=16"]
    assert (lora.trainable, lora.optimizer, lora.gradients) == (4 * 41_943_040, 8 * 41_943_040, 4 * 41_943_040)
    assert rows["QLoRA r=16"].trainable_count == lora.trainable_count
    for row in rows.values():
        assert row.total == row.frozen + row.trainable + row.optimizer + row.gradients


def test_llama3_70b_rows():
    rows = _rows(mt.LLAMA3_70B)
    base = rows["base model, frozen (inference)"].frozen
    assert abs(base / GIB - 2 * 70.55e9 / GIB) < 0.1
    assert rows["FRoD additive"].frozen > 1.8 * base and rows["FRoD input"].frozen < 1.1 * base
    assert rows["FRoD input, NF4 base"].frozen < 0.6 * base


def test_table_rows_and_columns():
    table = mt.format_table(mt.LLAMA3_8B, mt.memory_rows(mt.LLAMA3_8B))
    lines = table.splitlines()
    assert len(lines) == 2 + 8 and all(line.count("|") == 8 for line in lines)
    assert "| base model, frozen (inference) | 14.96 | 0.00 | 0.00 | 0.00 | 14.96 | 0.00 |" in lines
    assert "| LoRA r=16 | 14.96 | 0.16 | 0.31 | 0.16 | 15.58 | 0.52 |" in lines


def test_committed_table_is_current():
    text = (ROOT / "docs" / "memory_table.md").read_text(encoding="utf-8")
    assert mt.DOCS_COMMAND in text.splitlines()[2]
    assert text == mt.document(command=mt.DOCS_COMMAND), f"stale: run `{mt.DOCS_COMMAND}`"


def test_cli(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert mt.main(["--rank", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| LoRA r=8 |" in printed and f"wrote {out}" in printed
    written = out.read_text(encoding="utf-8")
    assert f"`python -m benchmarks.memory_table --rank 8 --out {out}`" in written
    assert written.endswith(mt.document(rank=8))
    with pytest.raises(SystemExit) as exit_info:
        mt.main(["--rho", "1.5"])
    assert exit_info.value.code == 2
