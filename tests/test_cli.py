"""The ``frod-kernels`` parser and the main job's notices: options before or after the subcommand,
skipped backends, the load-average warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from frod_kernels.bench import validate
from frod_kernels.bench.timing import load_warning
from frod_kernels.cli import _parser, main

SUBCOMMANDS = ["bench", "decompose", "convergence", "memorise", "peft", "model-step", "paths"]
# (argv of the option, attribute, value it sets, default)
OPTIONS = [
    (["--device", "cpu"], "device", "cpu", None),
    (["--dtype", "float64"], "dtype", "float64", "float32"),
    (["--threads", "1"], "threads", 1, None),
    (["--json", "x.json"], "json", Path("x.json"), None),
    (["--tiny"], "tiny", True, False),
    (["--no-progress"], "no_progress", True, False),
    (["--no-malloc-tuning"], "no_malloc_tuning", True, False),
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
@pytest.mark.parametrize("option,attr,value,default", OPTIONS, ids=[o[1] for o in OPTIONS])
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_common_option_in_either_position(command, option, attr, value, default, before):
    argv = [*option, command] if before else [command, *option]
    args = _parser().parse_args(argv)
    assert args.command == command and getattr(args, attr) == value
    assert getattr(_parser().parse_args([command]), attr) == default


@pytest.mark.parametrize("option,attr,value,default", OPTIONS, ids=[o[1] for o in OPTIONS])
def test_common_option_without_subcommand(option, attr, value, default):
    assert getattr(_parser().parse_args(option), attr) == value
    assert getattr(_parser().parse_args([]), attr) == default


def test_option_after_subcommand_wins():
    args = _parser().parse_args(["--threads", "1", "--json", "a.json", "bench", "--threads", "2"])
    assert (args.threads, args.json) == (2, Path("a.json"))


def test_load_warning():
    assert load_warning({"load_average_1min": 0.1, "cpu_count": 2}) is None
    assert load_warning({"load_average_1min": None, "cpu_count": 2}) is None
    assert "3.00 on 2 CPUs" in load_warning({"load_average_1min": 3.0, "cpu_count": 2})


def test_skipped_backends_say_why(monkeypatch):
    cpu = torch.device("cpu")
    assert set(validate.available_backends(cpu)).isdisjoint(validate.skipped_backends(cpu))

    def refuse(backend, device):
        raise RuntimeError("no triton here")

    monkeypatch.setattr(validate, "choose_backend", refuse)
    assert validate.available_backends(cpu) == ["torch"]
    why = validate.skipped_backends(cpu)["triton"]
    assert "TRITON_INTERPRET=1" in why or why == "triton is not installed"


def test_memorise_pool_option(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "m.json"
    args = ["memorise", "--tiny", "--no-progress", "--pool", "2", "--methods", "head", "--lr", "head=0.1",
            "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["pool"] == 2 and set(result["methods"]) == {"head"}
