"""What every benchmark command shares: its parser's manners, the common options, the set-up of the
process and the result file.

A parser from ``make_parser`` shows each option's default in ``--help`` and answers a wrong option
or value with one line naming what is valid (exit status 2), never a traceback. ``start`` applies
the common options and says what a reader of the output must know before the numbers: whether the
machine is busy, and whether this is a smoke run (``--tiny``) whose timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from .timing import load_warning, machine_info, tune_malloc

__all__ = [
    "SMOKE_NOTE", "add_common_options", "add_methods_option", "add_rounds_options", "make_parser", "report", "start",
    "write_json",
]

SMOKE_NOTE = ("smoke run (--tiny): the smallest sizes and one or two rounds, to show that everything runs; "
              "its timings and ratios mean nothing")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default to its help, except where
    the help already states it or there is none to state (None, False, not set)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
            return text
        if "default" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def make_parser(prog: str, description: str, common: bool = False) -> argparse.ArgumentParser:
    """A parser with one-line errors and defaults in its help (its subparsers share both); ``common``:
    with the common options (``add_common_options``, no --dtype)."""
    parser = _Parser(prog=prog, description=description, formatter_class=_DefaultsFormatter)
    if common:
        add_common_options(parser)
    return parser


def _device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:N") from None
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def add_common_options(parser: argparse.ArgumentParser, dtype: bool = False, suppress: bool = False) -> None:
    """--device, --threads, --json, --tiny, --no-progress, --no-malloc-tuning, and --dtype if ``dtype``.

    ``suppress`` is for a subcommand's copy of these options: an option it is not given sets nothing,
    so the same option given before the subcommand (``frod-kernels --tiny bench``) is kept; its help
    still states the default, which the top-level copy sets.
    """

    def add(*names: str, default=None, help: str, **kw) -> None:
        if suppress and default is not None and default is not False:
            help = f"{help} (default: {default})"
        parser.add_argument(*names, default=argparse.SUPPRESS if suppress else default, help=help, **kw)

    add("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    if dtype:
        add("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"],
            help="dtype of the layers and inputs")
    add("--threads", type=_positive, help="torch.set_num_threads (default: leave as is)")
    add("--json", type=Path, metavar="PATH", help="write the results, the machine and the command as JSON")
    add("--tiny", default=False, action="store_true",
        help="smoke run: the smallest sizes, to check that everything runs (its timings mean nothing)")
    add("--no-progress", default=False, action="store_true", help="no progress bar on stderr")
    add("--no-malloc-tuning", default=False, action="store_true",
        help="keep glibc's default mmap/trim thresholds (by default they are raised: on machines where page "
             "faults are expensive, freed and re-faulted tensor memory would dominate CPU timings)")


def add_rounds_options(parser: argparse.ArgumentParser, warmup: int, repeats: int, per: str = "",
                       tiny: tuple[int, int] | None = None) -> None:
    """--warmup and --repeats: the untimed and the timed rounds ``per`` what (every method once a round);
    ``tiny``: the (warmup, repeats) that --tiny sets instead."""
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"untimed rounds{per}" + (f" ({tiny[0]} with --tiny)" if tiny else ""))
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds{per}, reported by their median"
                        + (f" ({tiny[1]} with --tiny)" if tiny else ""))


def add_methods_option(parser: argparse.ArgumentParser, choices: Sequence[str], default: Sequence[str] | None,
                       note: str = "") -> None:
    """--methods: one or more of ``choices``; ``note`` is appended to the help."""
    parser.add_argument("--methods", nargs="+", choices=choices, default=None if default is None else list(default),
                        metavar="METHOD", help=f"one or more of: {', '.join(choices)}{note}")


def start(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace,
                                                                                     torch.device]:
    """Parse ``argv`` (default: the process's arguments) and apply the common options: (args, device).

    ``args`` gains ``machine`` (``timing.machine_info``, taken now: the load average before the run)
    and ``command_line``. Prints the busy-machine warning (stderr) and, for --tiny, ``SMOKE_NOTE``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        tune_malloc()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.machine = machine_info(device)
    args.command_line = " ".join([parser.prog, *argv])
    warning = load_warning(args.machine) if device.type == "cpu" else None
    if warning:
        print(warning, file=sys.stderr)
    if args.tiny:
        print(SMOKE_NOTE)
    return args, device


def report(args: argparse.Namespace, result: dict, text: str, plot: Callable[[Path], object] | None = None) -> None:
    """Print ``text``; write ``result`` with the machine and the command line as JSON to ``args.json``, if given;
    draw ``plot(args.plot)`` if the command has a --plot option and it was given (a falsy return: not drawn)."""
    print(text)
    write_json(args, result)
    path = getattr(args, "plot", None)
    if plot is not None and path is not None and plot(path):
        print(f"wrote {path}")


def write_json(args: argparse.Namespace, result: dict) -> None:
    """``result`` with the machine and the command line as JSON at ``args.json`` (nothing if not given)."""
    if args.json is None:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": args.machine, "command": args.command_line, **result}, indent=1)
                         + "\n")
    print(f"wrote {args.json}")
