"""Argument types of the ``koemorph-fused`` command line: each one checks a
value completely when the command line is parsed, so that misuse ends before
any work starts, with one ``koemorph-fused: error: ...`` line and exit status 2
(see :mod:`koemorph_fused.cli`).

Each ``*_arg`` function returns a callable for ``argparse``'s ``type=``; it
raises :class:`argparse.ArgumentTypeError` with a message that says what was
expected. :class:`CommandLineError` is for problems found after parsing but
before the work (e.g. ``--device cuda`` on a machine without CUDA).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

#: torch.manual_seed accepts integers in [-2**63, 2**64); the demo's seeds are non-negative.
MAX_SEED = 2**64 - 1


class CommandLineError(Exception):
    """A usage problem found before the work starts (exit status 2, one line)."""


def max_threads() -> int:
    """The most intra-op threads a command may ask for: the machine's logical CPUs."""
    return os.cpu_count() or 1


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def int_arg(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    what = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        value = _parse_int(text, what)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def positive_int_arg() -> Callable[[str], int]:
    """An integer >= 1."""
    return int_arg(1)


def thread_count(text: str) -> int:
    """A thread count in ``1..os.cpu_count()`` (torch.set_num_threads crashes far above it)."""
    return int_arg(1, max_threads())(text)


def seed_arg(text: str) -> int:
    """A seed in ``0..2**64 - 1``, the non-negative range ``torch.manual_seed`` accepts."""
    return int_arg(0, MAX_SEED)(text)


def float_arg(low: float, high: float = math.inf, *, low_inclusive: bool = True) -> Callable[[str], float]:
    """A finite number in ``[low, high]`` (``(low, high]`` when not ``low_inclusive``); NaN and infinities are rejected."""
    bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
    what = f"a finite number {bound}" if math.isinf(high) else f"a finite number {bound} and <= {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value) and (value >= low if low_inclusive else value > low) and value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def csv_list(kind: Callable[[str], Any], allowed: Optional[Iterable[Any]] = None) -> Callable[[str], list]:
    """A comma-separated, non-empty list; every item is parsed by ``kind`` and,
    if ``allowed`` is given, must be one of them. An empty item (``4,,8``,
    ``4,``) is an error, not skipped."""
    allowed_l = list(allowed) if allowed is not None else None

    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
        items = [kind(p) for p in parts]
        if allowed_l is not None:
            bad = [i for i in items if i not in allowed_l]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown value(s) {', '.join(map(str, bad))}; choose from {', '.join(map(str, allowed_l))}")
        return items

    parse.__name__ = "list"
    return parse


def check_writable_file(path: str) -> None:
    """Raise :class:`argparse.ArgumentTypeError` unless ``path`` can be
    written as a file: its folder exists, and the file either exists as a
    regular, writable file or can be created there. The check opens the file
    the way the command will (a file it creates is removed again), so it tells
    the truth for root, read-only mounts and pseudo file systems alike."""
    if not path:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: the folder {parent!r} does not exist")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: it is a folder")
    existed = os.path.lexists(path)
    if existed and not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: it exists and is not a regular file")
    try:
        with open(path, "ab" if existed else "xb"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: {e.strerror or e}") from None
    if not existed:
        try:
            os.remove(path)
        except OSError:
            pass


def output_file(text: str) -> str:
    """A file the command may write (see :func:`check_writable_file`)."""
    check_writable_file(text)
    return text


def plot_file(text: str) -> str:
    """An image file matplotlib can write: a writable path whose extension is
    a format matplotlib supports (png, pdf, svg, ...); needs matplotlib."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise argparse.ArgumentTypeError("needs matplotlib (pip install matplotlib)") from None
    formats: Sequence[str] = sorted(FigureCanvasBase.get_supported_filetypes())
    ext = os.path.splitext(text)[1].lower().lstrip(".")
    if os.path.isdir(text) or ext in formats:
        check_writable_file(text)  # a folder gets its own message
    if ext not in formats:
        raise argparse.ArgumentTypeError(
            f"cannot tell the image format of {text!r}: end the name with one of .{', .'.join(formats)}")
    return text


__all__ = ["CommandLineError", "MAX_SEED", "check_writable_file", "csv_list", "float_arg", "int_arg",
           "max_threads", "output_file", "plot_file", "positive_int_arg", "seed_arg", "thread_count"]
