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
