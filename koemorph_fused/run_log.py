"""Where :class:`~koemorph_fused.LossMonitor` writes its flushed rows: a CSV
file (:class:`CsvLog`, read back with :func:`read_csv`) and TensorBoard event
files (:class:`TensorBoardLog`).

CSV columns (:data:`CSV_COLUMNS`): ``step, epoch, phase, stride,
file_transition, mse, l1, perceptual, temporal, smoothing, total, flags``;
an empty cell is None, ``file_transition`` is 0 or 1, the floats are written
with ``repr`` (exact round trip, ``nan`` / ``inf`` included) and ``flags`` are
joined with ``;``.

TensorBoard scalars, at ``global_step = row["step"]``:

* ``loss/mse`` ... ``loss/smoothing``, ``loss/total``;
* ``schedule/stride`` and ``schedule/epoch`` (when the row has them);
* ``flags/nonfinite``, ``flags/divergence``, ``flags/outside_expected``,
  ``flags/temporal_jump``: 1 on a flagged step, else 0;
* ``data/file_transition``: 1 or 0;

and the text ``schedule/phase`` at each step where the phase changes.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Optional, Union

from .terms import TERM_NAMES

#: Flag names that can appear in a row's ``"flags"`` (see :class:`~koemorph_fused.LossMonitor`).
FLAGS = ("nonfinite", "divergence", "outside_expected", "temporal_jump")
#: The columns of a run CSV, in order.
CSV_COLUMNS: tuple[str, ...] = ("step", "epoch", "phase", "stride", "file_transition", *TERM_NAMES, "total", "flags")

PathLike = Union[str, os.PathLike]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return str(value)


class CsvLog:
    """Appends rows to a CSV file (see the module docstring for the columns).

    Args:
        target: a path (opened for appending; the header is written when the
            file is new or empty, and must match when it is not), or an open
            text file (written to, never closed here).

    Appending to a run CSV continues it: the steps written follow the file's
    last step (a new monitor counts from 0), so the file stays one run with
    increasing steps, which :func:`read_csv` requires.
    """

    def __init__(self, target: Union[PathLike, io.TextIOBase]) -> None:
        if isinstance(target, (str, os.PathLike)):
            self.name = os.fspath(target)
            try:
                self._file = open(self.name, "a+", newline="", encoding="utf-8")
            except OSError as e:
                raise type(e)(e.errno, f"cannot open run CSV {self.name!r}: {e.strerror}") from e
            self._owned = True
            self._file.seek(0)
            try:
                lines = [cells for cells in csv.reader(self._file) if cells]
            except UnicodeDecodeError:
                self._file.close()
                raise ValueError(f"{self.name}: exists and is not a LossMonitor run CSV (not UTF-8 text); "
                                 "choose another file") from None
            self._file.seek(0, os.SEEK_END)
            if lines and lines[0] != list(CSV_COLUMNS):
                self._file.close()
                raise ValueError(f"{self.name}: exists and is not a LossMonitor run CSV (its first line is "
                                 f"{','.join(lines[0])[:80]!r}); choose another file")
            need_header = not lines
            if len(lines) > 1:
                try:
                    self._step_offset = int(lines[-1][CSV_COLUMNS.index("step")]) + 1
                except (ValueError, IndexError):
                    self._file.close()
                    raise ValueError(f"{self.name}: its last row has no step; choose another file") from None
        elif hasattr(target, "write"):
            self.name = getattr(target, "name", "<stream>")
            self._file, self._owned, need_header = target, False, True
        else:
            raise TypeError(f"csv must be a path or an open text file, got {type(target).__name__}")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if need_header:
            self._writer.writerow(CSV_COLUMNS)
            self._file.flush()

    _step_offset = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (LossMonitor rows) and flush the file."""
        for row in rows:
            row = dict(row, step=row["step"] + self._step_offset)
            self._writer.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
        self._file.flush()

    def close(self) -> None:
        """Close the file if this log opened it."""
        if self._owned and not self._file.closed:
            self._file.close()


def read_csv(path: PathLike) -> list[dict[str, Any]]:
    """The rows of a run CSV written by :class:`CsvLog`, with their types back
    (ints, floats, None, bool ``file_transition``, list ``flags``).

    Raises:
        OSError: the file cannot be read (naming it).
        ValueError: it is not a run CSV (wrong header, a malformed cell; naming
            the file and line).
    """
    name = os.fspath(path)
    try:
        with open(name, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not a LossMonitor run CSV (not UTF-8 text)") from None
    except OSError as e:
        raise type(e)(e.errno, f"cannot read run CSV {name!r}: {e.strerror}") from e
    if not lines or lines[0] != list(CSV_COLUMNS):
        got = ",".join(lines[0])[:80] if lines else "an empty file"
        raise ValueError(f"{name}: not a LossMonitor run CSV (expected the header {','.join(CSV_COLUMNS)}, "
                         f"got {got!r})")
    rows: list[dict[str, Any]] = []
    for number, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue
        if len(cells) != len(CSV_COLUMNS):
            raise ValueError(f"{name}:{number}: expected {len(CSV_COLUMNS)} cells, got {len(cells)}")
        raw = dict(zip(CSV_COLUMNS, cells))
        try:
            row: dict[str, Any] = {
                "step": int(raw["step"]),
                "epoch": int(raw["epoch"]) if raw["epoch"] else None,
                "phase": raw["phase"] or None,
                "stride": int(raw["stride"]) if raw["stride"] else None,
                "file_transition": {"1": True, "0": False}[raw["file_transition"]],
            }
            for key in (*TERM_NAMES, "total"):
                row[key] = float(raw[key])
        except (ValueError, KeyError) as e:
            raise ValueError(f"{name}:{number}: malformed cell ({e})") from None
        row["flags"] = [f for f in raw["flags"].split(";") if f]
        if rows and row["step"] <= rows[-1]["step"]:
            raise ValueError(f"{name}:{number}: step {row['step']} does not follow step {rows[-1]['step']}; "
                             "a run CSV holds one run with increasing steps")
        rows.append(row)
    return rows


class TensorBoardLog:
    """Writes rows as TensorBoard scalars (see the module docstring for the tags).

    Args:
        target: a log directory (a ``torch.utils.tensorboard.SummaryWriter`` is
            created there and closed by :meth:`close`), or a ``SummaryWriter``
            (used, never closed here).
    """

    def __init__(self, target: Any) -> None:
        if isinstance(target, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("LossMonitor(tensorboard=...) needs the tensorboard package: "
                                  "pip install tensorboard") from e
            self._writer = SummaryWriter(log_dir=os.fspath(target))
            self._owned = True
        elif hasattr(target, "add_scalar"):
            self._writer, self._owned = target, False
        else:
            raise TypeError("tensorboard must be a log directory or a torch.utils.tensorboard.SummaryWriter, "
                            f"got {type(target).__name__}")
        self._phase: Optional[str] = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Add each row's scalars and flush the event file."""
        w = self._writer
        for row in rows:
            step = row["step"]
            for key in (*TERM_NAMES, "total"):
                w.add_scalar(f"loss/{key}", row[key], step)
            if row.get("stride") is not None:
                w.add_scalar("schedule/stride", row["stride"], step)
            if row.get("epoch") is not None:
                w.add_scalar("schedule/epoch", row["epoch"], step)
            flags = row.get("flags") or ()
            for flag in FLAGS:
                w.add_scalar(f"flags/{flag}", 1.0 if flag in flags else 0.0, step)
            w.add_scalar("data/file_transition", 1.0 if row.get("file_transition") else 0.0, step)
            phase = row.get("phase")
            if phase is not None and phase != self._phase:
                w.add_text("schedule/phase", str(phase), step)
            self._phase = phase
        w.flush()

    def close(self) -> None:
        """Close the writer if this log created it."""
        if self._owned:
            self._writer.close()


__all__ = ["CSV_COLUMNS", "CsvLog", "FLAGS", "TensorBoardLog", "read_csv"]
