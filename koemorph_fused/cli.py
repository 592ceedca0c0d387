"""The ``koemorph-fused`` command (also ``python -m koemorph_fused``).

    koemorph-fused info     versions, built backends and GPU architectures
    koemorph-fused check    fused loss against the reference on every device
    koemorph-fused bench    fused vs eager vs torch.compile timings
    koemorph-fused demo     train a small temporal model with the fused loss
    koemorph-fused plot     per-term loss curves of a LossMonitor run CSV

Each subcommand lives in its own module, which supplies
``add_arguments(parser)`` and ``main(args) -> exit code``; they are imported
only when used, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS = {
    "info": ("koemorph_fused.info", "versions, built backends, CPU kernel and GPU architectures"),
    "check": ("koemorph_fused.check", "compare the fused loss with the plain-PyTorch reference on every device"),
    "demo": ("koemorph_fused.demo", "train a small temporal model with the fused loss and with the reference"),
    "bench": ("koemorph_fused.benchmark", "time fused vs eager vs torch.compile, with copy bandwidth and autograd floor"),
    "plot": ("koemorph_fused.plot", "draw the per-term loss curves of a LossMonitor run CSV (phases, strides, flags)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koemorph-fused",
        description="The fused five-term KoeMorph temporal loss: checks, benchmarks, a training demo and run plots.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
