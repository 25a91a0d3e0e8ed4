"""Every benchmark entry point and CLI subcommand runs at a tiny size (smoke tests; the file takes < 60 s)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from frod_kernels.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    assert main([*args, "--tiny", "--no-progress", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_default_run(tmp_path, capsys):
    result = _run_cli(tmp_path)
    assert "validation: all passed" in capsys.readouterr().out
    assert {r["backend"] for r in result["validation"]} >= {"torch"}
    assert {r["method"] for r in result["layers"]} >= {"dense", "lora", "frod", "published", "naive", "gemm"}
    assert all(r["ms"] > 0 for r in result["layers"]) and result["machine"]["versions"]["torch"]


def test_bench(tmp_path):
    png = tmp_path / "layers.png"
    result = _run_cli(tmp_path, "bench", "--plot", str(png))
    assert {r["n_tokens"] for r in result["layers"]} == {8, 64}
    assert png.exists() or importlib.util.find_spec("matplotlib") is None


def test_decompose(tmp_path):
    result = _run_cli(tmp_path, "decompose")
    (row,) = result["categories"]
    assert row["ours"]["max_error"] < 1e-12 and row["published"]["max_error"] < 1e-4


def test_convergence(tmp_path):
    pytest.importorskip("transformers")
    result = _run_cli(tmp_path, "convergence", "--steps", "3")
    assert set(result["methods"]) == {"frod", "lora", "lora_r8", "full"}
    assert all(len(m["runs"][0]["loss"]) == 3 for m in result["methods"].values())
    assert "targets" in result


def _script(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_gpu_check_tiny(tmp_path):
    proc = _script(["benchmarks/gpu_check.py", "--tiny", "--json", str(tmp_path / "gpu.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["dtype"] for r in result["validation"]} == {"float32", "bfloat16", "float16"}
    assert "dense" in proc.stdout.splitlines()[-1] or "published" in proc.stdout


def test_microbenchmarks_tiny():
    proc = _script(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_layer_microbench.py", "--benchmark-disable"],
        env={"FROD_BENCH_SIZES": "tiny"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
