"""The ``koemorph-fused`` command (also ``python -m koemorph_fused``).

    koemorph-fused info     versions, built backends and GPU architectures
    koemorph-fused check    fused loss against the reference on every device
    koemorph-fused bench    fused vs eager vs torch.compile timings
    koemorph-fused demo     train a small temporal model with the fused loss
    koemorph-fused plot     per-term loss curves of a LossMonitor run CSV

Each subcommand lives in its own module, which supplies
``add_arguments(parser)`` and ``main(args) -> exit code``; they are imported
only when used, so ``--help`` is fast.

Misuse never ends in a traceback: every argument is checked completely while
the command line is parsed (the types in :mod:`koemorph_fused.cli_args`), and
what can only be checked afterwards (a CUDA device, a readable config) is
checked before any work starts and raised as
:class:`~koemorph_fused.cli_args.CommandLineError`. Either way the command
prints exactly one line on stderr,
``koemorph-fused: error: SUBCOMMAND: WHAT (see koemorph-fused SUBCOMMAND --help)``,
and exits with status 2 (argparse's convention for usage errors).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Optional, Sequence

from .cli_args import CommandLineError

PROG = "koemorph-fused"

SUBCOMMANDS = {
    "info": ("koemorph_fused.info", "versions, built backends, CPU kernel and GPU architectures"),
    "check": ("koemorph_fused.check", "compare the fused loss with the plain-PyTorch reference on every device"),
    "demo": ("koemorph_fused.demo", "train a small temporal model with the fused loss, checked against the "
                                    "reference at every step"),
    "bench": ("koemorph_fused.benchmark", "time fused vs eager vs torch.compile, with copy bandwidth and autograd floor"),
    "plot": ("koemorph_fused.plot", "draw the per-term loss curves of a LossMonitor run CSV (phases, strides, flags)"),
}


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr:
    ``koemorph-fused: error: [SUBCOMMAND: ]MESSAGE (see PROG --help)``, exit status 2.
    (argparse's default prints the whole usage first, which for the
    subcommands is a dozen lines around the one that matters.)"""

    def error(self, message: str) -> NoReturn:
        sub = self.prog[len(PROG):].strip() if self.prog.startswith(PROG) else ""
        where = f"{sub}: " if sub else ""
        text = " ".join(str(message).split())
        self.exit(2, f"{PROG}: error: {where}{text} (see {self.prog} --help)\n")


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(
        prog=PROG,
        description="The fused five-term KoeMorph temporal loss: checks, benchmarks, a training demo and run plots.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _parser=p)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the
    exit status. A usage error raises ``SystemExit(2)`` after printing its one line."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand's parser: "demo: unrecognized arguments ... (see ... demo --help)"
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except CommandLineError as e:
        args._parser.error(str(e))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
