"""``koemorph-fused plot``: the per-term loss curves of a run, from the CSV file
that :class:`~koemorph_fused.LossMonitor` writes (``csv=``), or from its rows.

    koemorph-fused plot run.csv                 # -> run.png beside it
    koemorph-fused plot run.csv -o curves.png --size 1600x900

The figure has two panels over the step axis:

* the five unweighted terms (six with the sequence loss's ``velocity``) and
  the weighted total (log scale), with the
  flagged steps marked: ``divergence`` and ``outside_expected`` on the total,
  ``temporal_jump`` on the temporal term, ``nonfinite`` at the top edge;
* the sampling stride (log scale), with the steps that crossed a file
  boundary as ticks along the bottom.

Phase boundaries (early / mid / late) are solid vertical lines through both
panels, labelled with the phase that starts there; stride changes inside a
phase are dotted lines.

The image is never written over the run CSV it is drawn from (an error
instead, whatever the names).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import Any, Optional, Sequence, Union

from .cli_args import CommandLineError, int_arg, plot_file
from .run_log import SEQUENCE_TERM_NAMES

_TERM_COLORS = {"mse": "tab:blue", "l1": "tab:orange", "perceptual": "tab:green", "temporal": "tab:purple",
                "smoothing": "tab:brown", "velocity": "tab:olive", "total": "black"}
#: How each flag is marked: (matplotlib marker, colour, curve it sits on).
_FLAG_STYLE = {
    "divergence": ("^", "tab:red", "total"),
    "outside_expected": ("v", "darkorange", "total"),
    "temporal_jump": ("x", "tab:purple", "temporal"),
    "nonfinite": ("X", "crimson", None),
}


def _finite(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _changes(rows: list[dict[str, Any]], key: str) -> list[tuple[int, Any]]:
    """(step, new value) where ``row[key]`` differs from the row before (not at the first row)."""
    out = []
    for before, row in zip(rows, rows[1:]):
        if row.get(key) != before.get(key):
            out.append((row["step"], row.get(key)))
    return out


def _same_file(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    a, b = os.fspath(a), os.fspath(b)
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def plot_run(
    run: Union[str, os.PathLike, Sequence[dict[str, Any]]],
    path: Union[str, os.PathLike, None] = None,
    *,
    size: tuple[int, int] = (1200, 800),
    dpi: int = 100,
    title: Optional[str] = None,
):
    """Draw a run's per-term curves (see the module docstring); save them to
    ``path`` when given (format from its extension, ``size`` pixels).

    Args:
        run: a run CSV path (:func:`koemorph_fused.run_log.read_csv`) or a
            sequence of :meth:`LossMonitor.flush` rows.
        path: where to save the figure, or None.
        size: (width, height) in pixels.
        dpi: dots per inch of the saved image (the pixel size stays ``size``).
        title: the figure title (default: the CSV's file name, or "loss terms").

    Returns:
        the ``matplotlib.figure.Figure`` (no pyplot state is touched).

    Raises:
        ValueError: no rows, a bad size / dpi, or ``path`` is the run CSV
            itself. OSError / ValueError from reading the CSV.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .run_log import read_csv

    if isinstance(run, (str, os.PathLike)):
        if path is not None and _same_file(run, path):
            raise ValueError(f"{os.fspath(path)}: the image would write over its input, the run CSV; "
                             "choose another output")
        title = title if title is not None else os.path.basename(os.fspath(run))
        rows = read_csv(run)
        where = os.fspath(run)
    else:
        rows = list(run)
        where = "run"
    if not rows:
        raise ValueError(f"{where}: no rows to plot")
    width, height = size
    if not (isinstance(width, int) and isinstance(height, int) and width >= 100 and height >= 100):
        raise ValueError(f"size must be two ints >= 100 (pixels), got {size!r}")
    if not (isinstance(dpi, int) and dpi > 0):
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")
    rows = sorted(rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]

    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_stride = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    fig.suptitle(title if title is not None else "loss terms")

    any_positive = False
    for key in (*SEQUENCE_TERM_NAMES, "total"):
        if key not in rows[0]:
            continue  # velocity: only sequence-loss runs have it
        ys = [_finite(r[key]) for r in rows]
        ys = [math.nan if y is None else y for y in ys]
        any_positive |= any(y > 0 for y in ys if not math.isnan(y))
        ax.plot(steps, ys, label=key, color=_TERM_COLORS[key], linewidth=2.0 if key == "total" else 1.2,
                zorder=3 if key == "total" else 2)
    if any_positive:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_ylabel("unweighted term / weighted total")
    ax.grid(True, which="major", alpha=0.3)

    for flag, (marker, color, curve) in _FLAG_STYLE.items():
        hits = [r for r in rows if flag in (r.get("flags") or ())]
        if not hits:
            continue
        xs = [r["step"] for r in hits]
        if curve is None or not any_positive:
            ax.scatter(xs, [0.97] * len(xs), transform=ax.get_xaxis_transform(), marker=marker, color=color,
                       s=40, zorder=4, label=f"{flag} ({len(xs)})", clip_on=False)
        else:
            ys = [_finite(r[curve]) for r in hits]
            ax.scatter(xs, [math.nan if y is None else y for y in ys], marker=marker, color=color, s=40, zorder=4,
                       label=f"{flag} ({len(xs)})")
    ax.legend(loc="upper right", fontsize="small", ncol=2)

    strides = [r.get("stride") for r in rows]
    if any(s is not None for s in strides):
        ax_stride.step(steps, [math.nan if s is None else s for s in strides], where="post", color="tab:gray")
        if any(s is not None and s > 0 for s in strides):
            ax_stride.set_yscale("log", base=2)
    transitions = [r["step"] for r in rows if r.get("file_transition")]
    if transitions:
        ax_stride.plot(transitions, [0.0] * len(transitions), "|", color="tab:cyan", markersize=8,
                       transform=ax_stride.get_xaxis_transform(), label=f"file transition ({len(transitions)})",
                       clip_on=False)
        ax_stride.legend(loc="upper right", fontsize="small")
    ax_stride.set_ylabel("stride")
    ax_stride.set_xlabel("step")
    ax_stride.grid(True, alpha=0.3)

    phase_steps = set()
    if rows[0].get("phase") is not None:
        ax.text(steps[0], 1.01, str(rows[0]["phase"]), transform=ax.get_xaxis_transform(), fontsize="small",
                va="bottom", color="dimgray")
    for step, phase in _changes(rows, "phase"):
        phase_steps.add(step)
        for a in (ax, ax_stride):
            a.axvline(step, color="dimgray", linewidth=1.0, zorder=1)
        ax.text(step, 1.01, str(phase), transform=ax.get_xaxis_transform(), fontsize="small", va="bottom",
                color="dimgray")
    for step, _ in _changes(rows, "stride"):
        if step not in phase_steps:
            for a in (ax, ax_stride):
                a.axvline(step, color="gray", linewidth=0.8, linestyle=":", zorder=1)

    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1200x800, got {text!r}") from None
    if w < 100 or h < 100 or w > 20000 or h > 20000:
        raise argparse.ArgumentTypeError(f"width and height must be 100..20000 pixels, got {text!r}")
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Draw the per-term loss curves of a run from the CSV file that LossMonitor(csv=...) "
                          "writes, with phase boundaries, stride changes, file transitions and flagged steps "
                          "marked.")
    parser.add_argument("csv", metavar="RUN.csv", help="a run CSV written by koemorph_fused.LossMonitor(csv=...)")
    parser.add_argument("-o", "--output", metavar="FILE.png", type=plot_file,
                        help="the image to write (.png, .svg, .pdf, ...; default: RUN.png beside the CSV)")
    parser.add_argument("--size", type=_size, default=(1200, 800), metavar="WxH",
                        help="image size in pixels (default 1200x800)")
    parser.add_argument("--dpi", type=int_arg(10, 1000), default=100, help="dots per inch, 10..1000 (default 100)")
    parser.add_argument("--title", help="figure title (default: the CSV's file name)")


def main(args: argparse.Namespace) -> int:
    """Draw the run; misuse raises CommandLineError (one line, exit 2) before any drawing."""
    source = args.csv
    if not os.path.isfile(source):
        raise CommandLineError(f"{source}: no such file" if not os.path.exists(source) else f"{source}: not a file")
    output = args.output
    if output is None:  # the default, beside the CSV: checked like an explicit -o
        output = os.path.splitext(source)[0] + ".png"
        if _same_file(source, output):
            raise CommandLineError(f"{source}: the default image (the CSV's name with .png) would write over its "
                                   "input; name the image with -o")
        try:
            output = plot_file(output)
        except argparse.ArgumentTypeError as e:
            raise CommandLineError(f"argument -o/--output: {e}") from None
    elif _same_file(source, output):
        raise CommandLineError(f"argument -o/--output: {output}: the image would write over its input, the "
                               "run CSV; choose another name")
    from .run_log import read_csv

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = read_csv(source)
    except (OSError, ValueError) as e:
        raise CommandLineError(str(e)) from None
    for warning in caught:  # a torn last line: one line on stderr, not a Python warning
        print(f"koemorph-fused plot: warning: {warning.message}", file=sys.stderr)
    if not rows:
        raise CommandLineError(f"{source}: the run CSV has no rows yet")
    plot_run(rows, output, size=args.size, dpi=args.dpi,
             title=args.title if args.title is not None else os.path.basename(source))
    first, last = rows[0]["step"], rows[-1]["step"]
    print(f"koemorph-fused plot: {len(rows)} steps ({first}..{last}) from {source} -> {output}")
    return 0


__all__ = ["plot_run"]
