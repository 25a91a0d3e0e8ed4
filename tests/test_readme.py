"""The README's usage example runs as written."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, capsys):
    pytest.importorskip("transformers")
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    assert "trainable params" in capsys.readouterr().out


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert "pip install torch==2.13.0" in block[0] and "frod-kernels" in block[0]
    assert block[1] == "python -m pytest -q tests"
    assert (README.parent / ".ci" / "run").read_text().rstrip().endswith(block[1])


def test_readme_trainer_recipe_runs(tmp_path):
    """The Trainer recipe as written: the reloaded adapter, the merged checkpoint and the resumed run all
    compute the trained function."""
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    section = README.read_text().split("## Training with the Hugging Face Trainer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        names: dict = {}
        exec(compile(code, "README.md", "exec"), names)
    finally:
        os.chdir(cwd)
    ids = names["ids"][:2]
    with torch.no_grad():
        trained = names["model"](ids).logits
        assert torch.equal(names["reloaded"](ids).logits, trained)
        assert torch.equal(names["resumed"](ids).logits, trained)
        torch.testing.assert_close(names["merged"](ids).logits, trained, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "export" / "config.json").is_file()
