"""The ``frod-kernels`` parser and the main job's notices: options before or after the subcommand,
one-line errors and defaults in the help, skipped backends, the load-average warning, what a smoke
run claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import memorise
from frod_kernels.bench import validate
from frod_kernels.bench.path_bench import format_table, run_path_bench
from frod_kernels.bench.timing import load_warning, summarize
from frod_kernels.cli import _parser, main

SUBCOMMANDS = ["bench", "paths"]
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
    args = ["--tiny", "--no-progress", "--pool", "2", "--methods", "head", "--lr", "head=0.1",
            "--json", str(out)]
    assert memorise.main(args) == 0
    result = json.loads(out.read_text())
    assert result["pool"] == 2 and set(result["methods"]) == {"head"}


@pytest.mark.parametrize("argv,named", [
    (["bench", "--tiny", "--methods", "foo"], "'dense'"),
    (["--dtype", "half"], "'float32'"),
    (["--device", "gpu"], "cuda:N"),
    (["convergence"], "'paths'"),
    (["--bogus"], "--bogus"),
])
def test_wrong_option_is_one_line(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and named in err and "Traceback" not in err


def test_help_shows_defaults_without_backticks(capsys):
    for argv in (["--help"], ["bench", "--help"], ["paths", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "(default: float32)" in out and "``" not in out and "frod_kernels.bench" not in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(default: 7)" in capsys.readouterr().out


def test_quartiles_lie_within_the_samples():
    stats = summarize([0.010, 0.020])
    assert 10.0 <= stats["q25_ms"] <= stats["ms"] <= stats["q75_ms"] <= 20.0


def test_smoke_run_says_so_and_claims_nothing(capsys):
    result = run_path_bench(tiny=True, show_progress=False)
    assert result["smoke_run"] and result["within_10_percent"] is None
    assert "within" not in format_table(result)
    assert main(["paths", "--tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("smoke run") == 1 and "within" not in out
