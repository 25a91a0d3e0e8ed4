"""Smoke test of ``python -m benchmarks.quant_finetune --tiny``: every row (full, LoRA, QLoRA, FRoD's
three modes, FRoD's input form on an NF4 base) in its own process, interleaved, and the loss curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from frod_kernels.config import MODES

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers")
if "input" not in MODES:
    pytest.skip("mode='input' is not in frod_kernels.config.MODES yet", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def test_quant_finetune_tiny(tmp_path):
    out = tmp_path / "quant.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quant_finetune", "--tiny", "--no-progress", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke run" in proc.stdout and "targets: not assessed" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["full_fp32", "lora_fp32", "qlora_nf4", "frod_additive_fp32", "frod_factored_fp32",
                          "frod_input_fp32", "frod_input_nf4"] and not result["skipped_rows"]
    frozen = result["metrics"]["frozen_bytes"]
    trainable = result["metrics"]["trainable"]
    # the same δ and s in every FRoD mode; LoRA's count does not depend on the base's storage
    assert len({trainable[r] for r in rows if r.startswith("frod")}) == 1
    assert trainable["lora_fp32"] == trainable["qlora_nf4"] < trainable["full_fp32"]
    # 4 bits per weight: the NF4 rows keep fewer frozen bytes than the same method on fp32
    assert frozen["qlora_nf4"] < frozen["lora_fp32"] and frozen["frod_input_nf4"] < frozen["frod_input_fp32"]
    assert frozen["frod_factored_fp32"] < frozen["frod_additive_fp32"]
    for row in rows.values():
        rss = row["rss"]
        assert 0 < rss["maxrss_after_imports"] <= rss["maxrss_after_setup"] <= rss["maxrss_at_end"]
        assert len(row["losses"]) == 5
    assert set(result["interleaved"]["step_ms"]) == set(rows)
    curves = result["curves"]["rows"]
    assert set(curves) == {"qlora_nf4", "frod_additive_fp32", "frod_input_nf4"}
    assert all(len(c["loss"]) == 3 for c in curves.values())
    # the input form is exact at initialisation: on the NF4 base it starts where QLoRA does
    assert curves["frod_input_nf4"]["held_out_loss_before"] == curves["qlora_nf4"]["held_out_loss_before"]
    assert all(t["met"] is None for t in result["targets"].values()) and len(result["targets"]) == 3
