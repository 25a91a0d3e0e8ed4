"""Every benchmark entry point runs at a tiny size: the ``frod-kernels`` commands and the scripts under
``benchmarks/`` (smoke tests; the file takes < 60 s)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import convergence, decompose_bench, memorise, model_step, peft_bench
from frod_kernels.bench.baselines import peft_available
from frod_kernels.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(tmp_path: Path, *args: str, before: bool = False, entry=main) -> dict:
    """Run ``entry`` (the CLI, or a script's ``main``) at tiny size; ``before``: the common options go
    before the other arguments (before the subcommand, for the CLI)."""
    out = tmp_path / "result.json"
    common = ["--tiny", "--no-progress", "--json", str(out)]
    assert entry([*common, *args] if before else [*args, *common]) == 0
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
    result = _run_cli(tmp_path, before=True, entry=decompose_bench.main)
    (row,) = result["categories"]
    assert row["ours"]["max_error"] < 1e-12 and row["published"]["max_error"] < 1e-4


def test_convergence(tmp_path, capsys):
    pytest.importorskip("transformers")
    result = _run_cli(tmp_path, "--steps", "3", entry=convergence.main)
    assert set(result["methods"]) == {"frod", "lora", "lora_r8", "full"}
    assert all(len(m["runs"][0]["loss"]) == 3 for m in result["methods"].values())
    out = capsys.readouterr().out
    # a smoke run meets no target
    assert "targets" not in result and "targets: not assessed" in out and "met" not in out.split("targets:")[1]


def test_memorise(tmp_path):
    pytest.importorskip("transformers")
    png = tmp_path / "memorise.png"
    methods = ["full", *(m for m in memorise.METHODS if m != "full")]  # head not first: the run reorders
    result = _run_cli(tmp_path, "--plot", str(png), "--lr", "full=1e-3,3e-3", "--methods", *methods,
                      before=True, entry=memorise.main)
    expected = set(memorise.METHODS) - set(result["skipped"])
    assert set(result["methods"]) == expected and expected >= {"head", "frod", "lora", "lora_4x", "full"}
    assert ("peft_frod" in result["skipped"]) != peft_available()
    assert [r["lr"] for r in result["sweep"]["full"]] == [1e-3, 3e-3]
    assert [r["lr"] for r in result["sweep"]["frod"]] == list(memorise.LR_GRID["frod"])
    m = result["methods"]
    assert result["head_lr"] == memorise.HEAD_LR and next(iter(m)) == "head"  # head runs first
    assert result["pool"] is None and len(result["linear_probe"]["train_accuracy"]) == 1
    head = m["head"]["trainable"]
    assert m["lora_4x"]["trainable"] - head == 4 * (m["lora"]["trainable"] - head)
    assert m["frod"]["trainable"] < m["frod_rho0.04"]["trainable"] < m["full"]["trainable"]
    for name, method in m.items():
        (run,) = method["runs"]  # one seed: the sweep's run at the best learning rate is reused
        assert run["lr"] == method["lr"] and run["steps"] == [4, 8] and 0 <= run["held_out_accuracy"] <= 100
        ranks = [mean for mean, _ in method["rank90_fraction"].values()]
        assert all(r == 0 for r in ranks) if name == "head" else all(0 < r <= 1 for r in ranks)
    # LoRA's ΔW has rank ≤ r = 4 in lora_4x, so at most 4 of the query layer's 32 singular values
    assert m["lora_4x"]["rank90_fraction"]["encoder.layer.0.attention.self.query"][0] <= 4 / 32
    assert png.exists() or importlib.util.find_spec("matplotlib") is None


def test_memorise_keys_and_spectrum():
    vocab = torch.arange(10, 20)
    ids, mask = memorise.make_keys(vocab, 50, 1, 2, torch.Generator().manual_seed(0))
    lengths = mask.sum(1) - 2
    assert ids.shape == (50, 12) and lengths.min() >= 6 and lengths.max() <= 10 and len(set(lengths.tolist())) > 1
    assert (ids[:, 0] == 1).all() and (ids[torch.arange(50), lengths + 1] == 2).all()
    inner = ids[:, 1:][mask[:, 1:].bool() & (ids[:, 1:] != 2)]
    assert ((inner >= 10) & (inner < 20)).all()
    assert memorise.spectrum_rank(torch.eye(10))[0] == 0.9
    low = torch.randn(40, 2, dtype=torch.float64) @ torch.randn(2, 30, dtype=torch.float64)
    fraction, cum = memorise.spectrum_rank(low)
    assert fraction <= 2 / 30 and len(cum) == 30 and abs(cum[-1] - 1) < 1e-12
    assert memorise.spectrum_rank(torch.zeros(5, 5))[0] == 0.0
    # a word pool: every key's words come from ``pool`` words, and all train + held-out keys are distinct
    data = memorise._data({"vocab": torch.arange(3, 64), "cls": 1, "sep": 2}, 40, 20, 4, seed=0, pool=3)
    keys = torch.cat([data["train"][0], data["held_out"][0]])
    assert len(set(map(tuple, keys.tolist()))) == 60 and len(keys[keys > 2].unique()) == 3
    assert data["train"][2].shape == (40,) and int(data["held_out"][2].max()) < 4


def _script(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_gpu_check_tiny(tmp_path):
    # It times a tiny MiniLM step as well (80 s seen on a loaded 2-core machine).
    proc = _script(["-m", "benchmarks.gpu_check", "--tiny", "--json", str(tmp_path / "gpu.json")], timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["dtype"] for r in result["validation"]} == {"float32", "bfloat16", "float16"}
    assert "backends" in result and "model" in result
    assert "dense" in proc.stdout.splitlines()[-1] or "published" in proc.stdout


def test_microbenchmarks_tiny():
    proc = _script(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_layer_microbench.py", "--benchmark-disable"],
        env={"FROD_BENCH_SIZES": "tiny"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_model_step(tmp_path):
    pytest.importorskip("transformers")
    result = _run_cli(tmp_path, entry=model_step.main)
    # the tiny batch is the same for every train scenario: each runs once
    assert [r["scenario"] for r in result["scenarios"]] == ["train 2x16 accum 1", "train 2x16 accum 4", "eval 2x16"]
    for row in result["scenarios"]:
        assert set(row["methods"]) == {"full", "frod", "lora"} and row["methods"]["full"]["ratio_to_full"] == 1.0
        assert all(m["ms"] > 0 for m in row["methods"].values()) and sum(row["frod_paths"].values()) == 12
    assert result["scenarios"][-1]["frod_paths"] == {"cached W'": 12}  # evaluation reuses W'
    assert "reused W'" in " ".join(result["scenarios"][1]["frod_paths"])  # so does accumulation
    assert len(result["basis_ratios"]) == 6 and all(0 < r["float32"] <= 1 and r["bfloat16"] > 0
                                                    for r in result["basis_ratios"].values())


def test_paths(tmp_path):
    result = _run_cli(tmp_path, "paths")
    assert len(result["cases"]) == 2
    for case in result["cases"]:
        assert set(case["ms"]) == {"auto", "token", "weight", "basis"} and case["auto_paths"]
        assert case["auto_over_best"] > 0


def test_peft_bench(tmp_path, capsys):
    pytest.importorskip("transformers")
    if not peft_available():
        pytest.skip("peft with FrodConfig is not installed")
    result = _run_cli(tmp_path, entry=peft_bench.main)
    assert set(result["methods"]) == set(peft_bench.METHODS) and result["smoke_run"]
    captured = capsys.readouterr()
    assert "Sparse invariant checks" not in captured.out + captured.err
    assert "faster" not in captured.out and "slower" not in captured.out  # a smoke run claims no speed-up
    # outside a smoke run the claim follows the sign of the measurement
    slower = {**result, "smoke_run": False}
    slower["methods"]["peft_frod"] = {**slower["methods"]["peft_frod"], "ms": 1.0}
    slower["methods"]["peft_frod_accelerated"] = {**slower["methods"]["peft_frod_accelerated"], "ms": 2.0}
    assert "slower: it takes 2.00x the time" in peft_bench.format_report(slower)


def test_decode_cost_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.decode_cost", "--tiny", "--out", str(tmp_path / "decode.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke run" in proc.stdout
    result = json.loads((tmp_path / "decode.json").read_text())
    assert result["frod_layers"] == 14 and result["same_tokens_unmerged_merged"]


def test_small_n_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.small_n", "--tiny", "--json", str(tmp_path / "small.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "small.json").read_text())


def test_setup_cost_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.setup_cost", "--tiny", "--json", str(tmp_path / "setup.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "setup.json").read_text())
    assert result["load_over_apply"] > 0 and result["shared_over_unshared_paired"] > 0
    assert set(result["steps"]) == {"apply", "load", "decompose", "unshared", "fingerprints", "floor", "gemm"}


def test_input_form_step_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.input_form_step", "--tiny", "--json", str(tmp_path / "step.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "step.json").read_text())
    assert set(result["shapes"]) == {"square", "up (o = 4n)", "down (n = 4o)"}
    assert result["shapes"]["down (n = 4o)"]["model"] == {"token": 12, "input": 18, "dense": 3}
    assert set(result["shapes"]["square"]["decode"]) == {"cached", "uncached"}


def test_gram_form_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.gram_form", "--tiny", "--json", str(tmp_path / "gram.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cats = json.loads((tmp_path / "gram.json").read_text())["categories"]
    assert len(cats) == 7  # q, k, v, o, gate, up, down; every Gram sum here is well conditioned
    assert all(c["form"] == ("gram" if c["out_features"] >= c["in_features"] else "q") for c in cats.values())
    assert all(c["max_column_difference"] < 1e-6 for c in cats.values())


def test_basis_shift_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.basis_shift", "--against", "HEAD", "--tiny", "--json", str(tmp_path / "s.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cats = json.loads((tmp_path / "s.json").read_text())["categories"]
    assert len(cats) == 7
    unchanged = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "frod_kernels/decomposition.py"],
                               cwd=ROOT).returncode == 0
    if unchanged:  # the same code twice: the same bits
        assert all(c["equal"] and c["sign_flips"] == 0 and c["max_column_difference"] == 0 for c in cats.values())


def test_decompose_profile_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.decompose_profile", "--tiny", "--top", "5", "--json", str(tmp_path / "p.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    assert len(result["categories_s"]) == 7
    ops = result["operators"]
    assert len(ops) == 5 and all(op["calls"] > 0 and 0 < op["share"] <= 1 for op in ops)
    assert [op["self_s"] for op in ops] == sorted((op["self_s"] for op in ops), reverse=True)


def test_input_form_error_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.input_form_error", "--tiny", "--json", str(tmp_path / "err.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "err.json").read_text())
    assert len(result["categories"]) == 7
    assert all(r <= 1.0 for c in result["categories"].values() for r in c["worst_error_over_criterion"].values())


def test_cross_dtype_load_tiny(tmp_path):
    proc = _script(["-m", "benchmarks.cross_dtype_load", "--tiny", "--json", str(tmp_path / "cdl.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [row for by_dtype in json.loads((tmp_path / "cdl.json").read_text())["scales"].values()
            for row in by_dtype.values()]
    assert len(rows) == 4
    # Every row of V is recorded at this size: the aligned load is as close as a cast; unaligned, far off.
    assert all(row["aligned_over_cast"] < 1.5 and row["unaligned"] > 0.5 for row in rows)
