"""Where :class:`~koemorph_fused.LossMonitor` writes its flushed rows: a CSV
file (:class:`CsvLog`, read back with :func:`read_csv`) and TensorBoard event
files (:class:`TensorBoardLog`).

CSV columns (:data:`CSV_COLUMNS`): ``step, epoch, phase, stride,
file_transition, mse, l1, perceptual, temporal, smoothing, total, flags``;
records of the sequence loss, which carry a sixth term, get a ``velocity``
column after ``smoothing`` (:data:`SEQUENCE_CSV_COLUMNS`). An empty cell is
None, ``file_transition`` is 0 or 1, the floats are written with ``repr``
(exact round trip, ``nan`` / ``inf`` included) and ``flags`` are joined with
``;``.

What a run CSV written here guarantees:

* each flush's rows reach the file in one write, and a write that fails is
  cut back off the file, so a row is there whole or not at all;
* a last line cut short anyway (the process killed mid-write) is removed,
  with a warning, when the file is opened for appending, and skipped, with a
  warning, by :func:`read_csv`: a new row is never glued onto it;
* one writer at a time: the file is locked (``fcntl.flock``) while a
  :class:`CsvLog` has it open, and a second one is refused;
* appending continues the file's step numbering (see
  :class:`~koemorph_fused.LossMonitor`), and the file's folder is created.

TensorBoard scalars, at ``global_step = row["step"]``:

* ``loss/mse`` ... ``loss/smoothing`` (and ``loss/velocity`` for six-term
  records), ``loss/total``;
* ``schedule/stride`` and ``schedule/epoch`` (when the row has them);
* ``flags/nonfinite``, ``flags/divergence``, ``flags/outside_expected``,
  ``flags/temporal_jump``: 1 on a flagged step, else 0;
* ``data/file_transition``: 1 or 0;

and the text ``schedule/phase`` at each step where the phase changes.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import warnings
from typing import Any, Optional, Union

from .terms import TERM_NAMES

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the file is not locked there
    fcntl = None

#: Flag names that can appear in a row's ``"flags"`` (see :class:`~koemorph_fused.LossMonitor`).
FLAGS = ("nonfinite", "divergence", "outside_expected", "temporal_jump")
#: The six terms of a sequence-loss record: the five terms and ``velocity``.
SEQUENCE_TERM_NAMES: tuple[str, ...] = (*TERM_NAMES, "velocity")
#: The columns of a run CSV, in order.
CSV_COLUMNS: tuple[str, ...] = ("step", "epoch", "phase", "stride", "file_transition", *TERM_NAMES, "total", "flags")
#: The columns of a run CSV of sequence-loss records (a ``velocity`` column after ``smoothing``).
SEQUENCE_CSV_COLUMNS: tuple[str, ...] = ("step", "epoch", "phase", "stride", "file_transition",
                                         *SEQUENCE_TERM_NAMES, "total", "flags")
_HEADERS = {",".join(CSV_COLUMNS): CSV_COLUMNS, ",".join(SEQUENCE_CSV_COLUMNS): SEQUENCE_CSV_COLUMNS}

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


def _parse_rows(name: str, text: str) -> tuple[Optional[tuple[str, ...]], list[list[str]], int]:
    """(the header's columns or None for an empty file, the data rows' cells,
    the line number of the first data row) of a run CSV's text; a text that
    is not a run CSV is a ValueError naming the file."""
    lines = text.splitlines()
    if not lines:
        return None, [], 2
    header = _HEADERS.get(lines[0])
    if header is None:
        raise ValueError(f"{name}: not a LossMonitor run CSV (expected the header {','.join(CSV_COLUMNS)}, "
                         f"optionally with velocity after smoothing; got {lines[0][:80]!r})")
    return header, list(csv.reader(lines[1:])), 2


def _torn_tail(text: str) -> int:
    """Where a last line cut short (no line ending) starts, or -1 when the text ends whole."""
    if not text or text.endswith("\n"):
        return -1
    return text.rfind("\n") + 1


def _lock(f: Any, name: str) -> None:
    """Take the run CSV's writer lock on the open file ``f`` (released when
    it closes); held by another writer, a ValueError naming the file."""
    if fcntl is None:
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"{name}: another LossMonitor is writing this run CSV (the file is locked); "
                         "two writers would interleave their steps: give each run its own file, "
                         "or close the other monitor first") from None


def empty_run_csv(name: PathLike) -> None:
    """Empty the run CSV ``name`` for a new run (``demo --csv`` replaces its
    file), under the lock a :class:`CsvLog` takes, so that a file another
    monitor is writing is never emptied under it; nor is a file that is not a
    run CSV. Either is a ValueError naming the file, and the file is left as it
    is. A file that does not exist is left to the writer to create."""
    name = os.fspath(name)
    try:
        f = open(name, "r+b")
    except FileNotFoundError:
        return
    with f:
        _lock(f, name)
        first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        if not any(header.startswith(first) for header in _HEADERS):  # "" (empty) and a torn header pass
            raise ValueError(f"{name}: exists and is not a LossMonitor run CSV; it is not replaced: "
                             "choose another file")
        f.truncate(0)


class CsvLog:
    """Appends rows to a CSV file (see the module docstring for the columns
    and what the file guarantees).

    Args:
        target: a path (opened for appending and locked; its folder is
            created; the header is written with the first rows when the file
            is new or empty, and must be a run CSV's when it is not), or an
            open text file (written to, never closed or locked here).

    Attributes:
        columns: the file's columns (None until the header is known: a new
            file gets the columns of the first rows written).
        next_step: the step after the file's last row (0 for a new file).
    """

    def __init__(self, target: Union[PathLike, io.TextIOBase]) -> None:
        self.columns: Optional[tuple[str, ...]] = None
        self.next_step = 0
        self._file: Any = None
        self._owned = False
        if isinstance(target, (str, os.PathLike)):
            self.name = os.fspath(target)
            self._open(self.name)
        elif hasattr(target, "write"):
            self.name = getattr(target, "name", "<stream>")
            self._file = target
        else:
            raise TypeError(f"csv must be a path or an open text file, got {type(target).__name__}")

    def _open(self, name: str) -> None:
        folder = os.path.dirname(os.path.abspath(name))
        try:
            os.makedirs(folder, exist_ok=True)
            # Unbuffered: a failed write leaves nothing behind in a buffer that a
            # later write or truncate would flush onto the file.
            self._file = open(name, "a+b", buffering=0)
        except OSError as e:
            raise type(e)(e.errno, f"cannot open run CSV {name!r}: {e.strerror}") from e
        self._owned = True
        try:
            _lock(self._file, name)
            self._file.seek(0)
            data = self._file.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{name}: exists and is not a LossMonitor run CSV (not UTF-8 text); "
                                 "choose another file") from None
            torn = _torn_tail(text)
            if torn == 0 and not any(h.startswith(text) for h in _HEADERS):
                torn = -1  # one line that is no header: reported below as not a run CSV
            if torn >= 0:
                warnings.warn(f"{name}: its last line was cut short (the run stopped while writing it?): "
                              f"{text[torn:][:60]!r} removed before appending", RuntimeWarning, stacklevel=4)
                self._file.truncate(len(text[:torn].encode("utf-8")))
                text = text[:torn]
            try:
                self.columns, rows, _ = _parse_rows(name, text)
            except ValueError:
                first = text.splitlines()[0] if text else ""
                raise ValueError(f"{name}: exists and is not a LossMonitor run CSV (its first line is "
                                 f"{first[:80]!r}); choose another file") from None
            if rows:
                try:
                    self.next_step = int(rows[-1][0]) + 1
                except (ValueError, IndexError):
                    raise ValueError(f"{name}: its last row has no step; choose another file") from None
            self._file.seek(0, os.SEEK_END)
        except BaseException:
            self._file.close()
            raise

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (LossMonitor rows, with their steps) in one write and
        flush the file; a failed write is cut back off the file."""
        if not rows:
            return
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        columns = self.columns
        if columns is None:
            columns = SEQUENCE_CSV_COLUMNS if "velocity" in rows[0] else CSV_COLUMNS
            writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
        text = buffer.getvalue()
        if not self._owned:
            self._file.write(text)
            self._file.flush()
        else:
            end = self._file.seek(0, os.SEEK_END)
            try:
                data = memoryview(text.encode("utf-8"))
                while data:  # one write, unless the system takes part of it
                    data = data[self._file.write(data):]
            except BaseException:
                try:  # nothing of a failed write stays: the next one starts on a whole line
                    self._file.truncate(end)
                except OSError:
                    pass
                raise
        self.columns = columns
        self.next_step = rows[-1]["step"] + 1

    def close(self) -> None:
        """Close the file (and release its lock) if this log opened it."""
        if self._owned and self._file is not None and not self._file.closed:
            self._file.close()


def read_csv(path: PathLike) -> list[dict[str, Any]]:
    """The rows of a run CSV written by :class:`CsvLog`, with their types back
    (ints, floats, None, bool ``file_transition``, list ``flags``; a
    ``velocity`` float where the file has that column).

    An empty file (a monitor that has flushed nothing yet) has no rows. A last
    line cut short (no line ending, not a whole row) is skipped with a warning.

    Raises:
        OSError: the file cannot be read (naming it).
        ValueError: it is not a run CSV (wrong header, a malformed cell, steps
            that do not increase; naming the file and line).
    """
    name = os.fspath(path)
    try:
        with open(name, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not a LossMonitor run CSV (not UTF-8 text)") from None
    except OSError as e:
        raise type(e)(e.errno, f"cannot read run CSV {name!r}: {e.strerror}") from e
    columns, lines, first = _parse_rows(name, text)
    if columns is None:
        return []  # a monitor that opened the file has flushed nothing yet
    terms = SEQUENCE_TERM_NAMES if columns == SEQUENCE_CSV_COLUMNS else TERM_NAMES
    torn = _torn_tail(text) > 0
    rows: list[dict[str, Any]] = []
    for number, cells in enumerate(lines, start=first):
        if torn and number == first + len(lines) - 1:  # whole rows end with a newline: never read a cut one,
            warnings.warn(f"{name}:{number}: the last line is cut short (the run stopped while writing it?); "
                          "skipped", RuntimeWarning, stacklevel=2)  # even where its cells parse (flags cut)
            break
        if not cells:
            continue
        try:
            if len(cells) != len(columns):
                raise ValueError(f"expected {len(columns)} cells, got {len(cells)}")
            raw = dict(zip(columns, cells))
            row: dict[str, Any] = {
                "step": int(raw["step"]),
                "epoch": int(raw["epoch"]) if raw["epoch"] else None,
                "phase": raw["phase"] or None,
                "stride": int(raw["stride"]) if raw["stride"] else None,
                "file_transition": {"1": True, "0": False}[raw["file_transition"]],
            }
            for key in (*terms, "total"):
                row[key] = float(raw[key])
        except (ValueError, KeyError) as e:
            if isinstance(e, ValueError) and str(e).startswith("expected"):
                raise ValueError(f"{name}:{number}: {e}") from None
            raise ValueError(f"{name}:{number}: malformed cell ({e})") from None
        row["flags"] = [f for f in raw["flags"].split(";") if f]
        if rows and row["step"] <= rows[-1]["step"]:
            raise ValueError(f"{name}:{number}: step {row['step']} does not follow step {rows[-1]['step']}; "
                             "a run CSV holds one run with increasing steps")
        rows.append(row)
    return rows


def _last_tensorboard_step(log_dir: str) -> int:
    """The largest step of a ``loss/total`` scalar in the event files directly in ``log_dir``, or -1."""
    files = sorted(glob.glob(os.path.join(glob.escape(log_dir), "events.out.tfevents.*")))
    if not files:
        return -1
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    last = -1
    for file in files:
        try:
            for event in EventFileLoader(file).Load():
                if event.step > last and any(v.tag == "loss/total" for v in event.summary.value):
                    last = event.step
        except Exception:  # a file cut short by a crash: what was read counts
            continue
    return last


class TensorBoardLog:
    """Writes rows as TensorBoard scalars (see the module docstring for the tags).

    Args:
        target: a log directory (a ``torch.utils.tensorboard.SummaryWriter`` is
            created there and closed by :meth:`close`), or a ``SummaryWriter``
            (used, never closed here).

    Attributes:
        next_step: the step after the last ``loss/total`` scalar already in
            the log directory's event files (0 for a new directory).
    """

    def __init__(self, target: Any) -> None:
        if isinstance(target, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("LossMonitor(tensorboard=...) needs the tensorboard package: "
                                  "pip install tensorboard") from e
            log_dir = os.fspath(target)
            self.next_step = _last_tensorboard_step(log_dir) + 1
            self._writer = SummaryWriter(log_dir=log_dir)
            self._owned = True
        elif hasattr(target, "add_scalar"):
            self._writer, self._owned = target, False
            log_dir = getattr(target, "log_dir", None)
            self.next_step = _last_tensorboard_step(log_dir) + 1 if isinstance(log_dir, str) else 0
        else:
            raise TypeError("tensorboard must be a log directory or a torch.utils.tensorboard.SummaryWriter, "
                            f"got {type(target).__name__}")
        self._phase: Optional[str] = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Add each row's scalars and flush the event file."""
        w = self._writer
        for row in rows:
            step = row["step"]
            for key in (*SEQUENCE_TERM_NAMES, "total"):
                if key in row:
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


__all__ = ["CSV_COLUMNS", "CsvLog", "FLAGS", "SEQUENCE_CSV_COLUMNS", "SEQUENCE_TERM_NAMES", "TensorBoardLog",
           "read_csv"]
