"""Per-step loss records without a host synchronisation per step.

The seed logs ``mse.item()``, ``l1.item()``, ... after every step: six device
round trips that stall the GPU queue. :class:`LossMonitor` keeps the device
tensors instead and reads all pending steps back with one copy per device in
:meth:`LossMonitor.flush` (e.g. once per epoch or per logging interval).

>>> import torch, koemorph_fused as kf
>>> mon = kf.LossMonitor()
>>> out = kf.temporal_loss(torch.full((4, 52), 0.5), torch.zeros(4, 52))
>>> mon.record(out, stride=32)
>>> row = mon.flush()[0]
>>> round(row["total"], 6), row["stride"], row["flags"]
(0.55, 32, [])

With ``tensorboard=`` (a log directory or a ``SummaryWriter``) and ``csv=`` (a
file), every flush also writes its rows there (see :mod:`koemorph_fused.run_log`),
and ``koemorph-fused plot run.csv`` (or :func:`koemorph_fused.plot.plot_run`)
draws the curves. Leaving the ``with`` block flushes what is still pending;
a flush that fails (a full disk, a device error) keeps its records for the
next one::

    with kf.LossMonitor(tensorboard="runs/exp1", csv="runs/exp1.csv") as mon:
        ...
        mon.record(out, stride=phase.stride, phase=phase)
        ...
        rows = mon.flush()          # also written to runs/exp1 and runs/exp1.csv
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Optional, Union

import torch

from .run_log import FLAGS, SEQUENCE_TERM_NAMES, CsvLog, TensorBoardLog
from .terms import TERM_NAMES, LossOutput, SequenceLossOutput

#: Decay of the moving average of the temporal term that ``"temporal_jump"`` compares against.
TEMPORAL_BASELINE_DECAY = 0.9


def _as_loss_output(out: Any, total: Optional[torch.Tensor]) -> LossOutput:
    """(total, terms) from a LossOutput / (total, terms) pair, or from a loss module plus ``total``."""
    terms = getattr(out, "last_terms", None) if isinstance(out, torch.nn.Module) else None
    if isinstance(out, torch.nn.Module):
        if terms is None:
            raise ValueError(f"{type(out).__name__} has no last_terms: call it before recording it")
        if not isinstance(total, torch.Tensor):
            raise TypeError("recording a loss module needs total=, the tensor its last call returned")
        out = LossOutput(total, terms)
    elif total is not None:
        raise TypeError("total= is only for recording a loss module; a LossOutput carries its own total")
    if isinstance(out, SequenceLossOutput):  # (total, terms, counts): the counts are not a column
        if out.total.numel() != 1:
            raise ValueError("a SequenceLossOutput of reduction='none' holds per-frame values; record a reduced one")
        out = (out.total, out.terms)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "out must be a koemorph_fused.LossOutput or SequenceLossOutput, a (total, terms) pair or a loss "
            f"module with total=, got {type(out).__name__}"
        )
    total, terms = out
    if not isinstance(total, torch.Tensor) or total.numel() != 1:
        raise TypeError(f"total must be a one-element tensor, got {type(total).__name__} "
                        f"{tuple(total.shape) if isinstance(total, torch.Tensor) else ''}")
    if not isinstance(terms, torch.Tensor) or terms.shape not in ((len(TERM_NAMES),), (len(SEQUENCE_TERM_NAMES),)):
        raise TypeError(f"terms must be a tensor of shape ({len(TERM_NAMES)},) (the five terms) or "
                        f"({len(SEQUENCE_TERM_NAMES)},) (the sequence loss's six), got {type(terms).__name__} "
                        f"{tuple(terms.shape) if isinstance(terms, torch.Tensor) else ''}")
    if not (total.is_floating_point() and terms.is_floating_point()):
        raise TypeError(f"total and terms must be floating tensors, got {total.dtype} and {terms.dtype}")
    if terms.device != total.device:
        raise ValueError(f"terms ({terms.device}) and total ({total.device}) must be on the same device")
    return LossOutput(total, terms)


class LossMonitor:
    """Collects the terms and total of each step as device tensors; :meth:`flush`
    turns them into rows with one synchronisation.

    Args:
        divergence_threshold: a total above this is flagged ``"divergence"``
            (the seed: > 1.0 signals divergence).
        temporal_jump_factor: a temporal term above this many times its moving
            average (decay :data:`TEMPORAL_BASELINE_DECAY` per step, over the
            earlier steps that were not file transitions and had a nonzero
            temporal term) is flagged ``"temporal_jump"``; never at a file
            transition, where the seed calls a jump normal. None disables it.
        tensorboard: a log directory or a ``torch.utils.tensorboard.SummaryWriter``:
            :meth:`flush` adds every row's scalars there (``loss/<term>``,
            ``loss/total``, ``schedule/stride``, ``flags/<flag>``, ...; needs
            the optional ``tensorboard`` package).
        csv: a file path (appended to, its folder created, locked against a
            second writer) or an open text file: :meth:`flush` appends every
            row (columns :data:`koemorph_fused.run_log.CSV_COLUMNS`, plus
            ``velocity`` for sequence-loss records).

    What the monitor opens (a writer for a directory, a file for a path) is
    closed by :meth:`close` or at the end of a ``with`` block, which flushes
    first (if that flush fails, its error propagates and the monitor stays
    open with the records: call :meth:`flush` again, then :meth:`close`);
    what it is given open is left open.

    Steps continue what the logs already hold: a monitor appending to a run
    CSV or a TensorBoard directory with earlier steps numbers its first
    record one past the last of them (the larger where both are given), so
    a resumed run is one run in the CSV and in TensorBoard alike.

    A row (a dict) holds the five terms (:data:`~koemorph_fused.TERM_NAMES`;
    records of the sequence loss, whose ``terms`` have six entries, add
    ``"velocity"``), ``"total"``, ``"step"`` (consecutive, see above), ``"stride"``,
    ``"file_transition"`` (bool), ``"phase"`` and ``"epoch"`` (None unless a
    phase was given) and ``"flags"``, a list of:

    * ``"nonfinite"``: the total is NaN or infinite;
    * ``"divergence"``: the total is above ``divergence_threshold``;
    * ``"outside_expected"``: a phase (or ``expected_total``) was given and the
      total is outside its ``(low, high)`` range;
    * ``"temporal_jump"``: see ``temporal_jump_factor``.
    """

    def __init__(
        self,
        divergence_threshold: float = 1.0,
        temporal_jump_factor: Optional[float] = 4.0,
        *,
        tensorboard: Any = None,
        csv: Any = None,
    ) -> None:
        if isinstance(divergence_threshold, bool) or not isinstance(divergence_threshold, numbers.Real):
            raise TypeError(f"divergence_threshold must be a real number, got {type(divergence_threshold).__name__}")
        if temporal_jump_factor is not None:
            if isinstance(temporal_jump_factor, bool) or not isinstance(temporal_jump_factor, numbers.Real):
                raise TypeError(
                    f"temporal_jump_factor must be a real number or None, got {type(temporal_jump_factor).__name__}")
            if not temporal_jump_factor > 1.0:
                raise ValueError(f"temporal_jump_factor must be > 1, got {temporal_jump_factor!r}")
        self.divergence_threshold = float(divergence_threshold)
        self.temporal_jump_factor = None if temporal_jump_factor is None else float(temporal_jump_factor)
        self._pending: list[dict[str, Any]] = []
        # Moving average of the temporal term over earlier steps (host side, updated in flush).
        self._temporal_baseline: Optional[float] = None
        self._terms: Optional[tuple[str, ...]] = None  # the term names of the records (five or six)
        self._logs: list[Any] = []
        self._csv: Optional[CsvLog] = None
        try:
            if csv is not None:
                self._csv = CsvLog(csv)
                self._logs.append(self._csv)
            if tensorboard is not None:
                self._logs.append(TensorBoardLog(tensorboard))
        except BaseException:
            self.close()
            raise
        self._step = max([log.next_step for log in self._logs], default=0)
        # The last step each log has been given: a retried flush skips what a log already has.
        self._written = [self._step - 1] * len(self._logs)

    def close(self) -> None:
        """Close the CSV file and TensorBoard writer the monitor opened. Pending
        records are not flushed (call :meth:`flush` first, or leave a ``with``
        block, which does); a warning says how many were dropped."""
        if self._pending:
            warnings.warn(f"LossMonitor closed with {len(self._pending)} records never flushed; they are dropped",
                          RuntimeWarning, stacklevel=2)
            self._pending = []
        for log in self._logs:
            log.close()
        self._logs = []

    def __enter__(self) -> "LossMonitor":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.flush()
        except Exception as e:
            if exc_type is None:
                raise  # the monitor stays open with its records: flush() again, then close()
            # The block already failed: that error is the one to see; this one is a warning.
            warnings.warn(f"LossMonitor could not flush at the end of the with block: {e}", RuntimeWarning,
                          stacklevel=2)
        self.close()

    def __len__(self) -> int:
        """Number of records waiting for :meth:`flush`."""
        return len(self._pending)

    def record(
        self,
        out: Any,
        stride: Optional[int] = None,
        file_transition: Union[bool, torch.Tensor] = False,
        phase: Any = None,
        *,
        total: Optional[torch.Tensor] = None,
        expected_total: Optional[tuple[float, float]] = None,
    ) -> None:
        """Keep one step's loss, without synchronising.

        Args:
            out: a :class:`~koemorph_fused.LossOutput` or a reduced
                :class:`~koemorph_fused.SequenceLossOutput` (or a ``(total, terms)``
                pair), or a loss module (:class:`~koemorph_fused.FusedKoeMorphLoss`
                or the reference) whose ``last_terms`` are recorded with ``total=``,
                the tensor its last call returned.
            stride: the sampling stride of the step (reported, not checked).
            file_transition: whether the step crossed a file boundary: a bool
                or a tensor on the loss's device, e.g. ``~continuity.all()``
                (any nonzero element counts; read back at flush).
            phase: a :class:`~koemorph_fused.schedule.Phase` (its name, epoch
                and ``expected_total`` go into the row), or None.
            expected_total: ``(low, high)``; overrides the phase's range.
        """
        loss = _as_loss_output(out, total)
        terms = TERM_NAMES if loss.terms.numel() == len(TERM_NAMES) else SEQUENCE_TERM_NAMES
        if self._terms is not None and terms != self._terms:
            raise ValueError(f"this monitor records {len(self._terms)}-term losses; got {len(terms)} terms "
                             "(use one monitor, and one CSV, per kind of loss)")
        columns = self._csv.columns if self._csv is not None else None
        if columns is not None and ("velocity" in columns) != ("velocity" in terms):
            raise ValueError(f"{self._csv.name}: its rows have {'six' if 'velocity' in columns else 'five'} terms, "
                             f"this record {len(terms)}; write it to another file")
        if stride is not None:
            if isinstance(stride, bool) or not isinstance(stride, numbers.Integral):
                raise TypeError(f"stride must be an int or None, got {type(stride).__name__} {stride!r}")
            stride = int(stride)
        if expected_total is None and phase is not None:
            expected_total = getattr(phase, "expected_total", None)
        if expected_total is not None:
            low, high = expected_total
            expected_total = (float(low), float(high))
        device = loss.total.device
        if isinstance(file_transition, torch.Tensor):
            if file_transition.device != device:
                raise ValueError(f"file_transition must be on the device of the loss ({device}), "
                                 f"got {file_transition.device}")
            transition: Union[bool, torch.Tensor] = file_transition.detach().ne(0).any()
        elif isinstance(file_transition, (bool, numbers.Integral)):
            transition = bool(file_transition)
        else:
            raise TypeError(f"file_transition must be a bool or a tensor, got {type(file_transition).__name__}")
        self._terms = terms
        self._pending.append({
            "total": loss.total.detach().reshape(()),
            "terms": loss.terms.detach(),
            "terms_names": terms,
            "transition": transition,
            "stride": stride,
            "phase": getattr(phase, "name", None) if phase is not None else None,
            "epoch": getattr(phase, "epoch", None) if phase is not None else None,
            "expected_total": expected_total,
            "step": self._step,
        })
        self._step += 1

    def flush(self) -> list[dict[str, Any]]:
        """Rows for every pending record, oldest first; writes them to the
        monitor's CSV file and TensorBoard writer, if any, and clears them.

        Reads everything back with one device-to-host copy per device (one
        synchronisation when training on one device). If anything fails (the
        read-back, a log's write), the error propagates and the records stay
        pending: the next flush retries them, and a log that already took some
        of them is not given those again."""
        pending = list(self._pending)
        if not pending:
            return []
        by_device: dict[torch.device, list[int]] = {}
        for i, rec in enumerate(pending):
            by_device.setdefault(rec["total"].device, []).append(i)
        values: list[Optional[list[float]]] = [None] * len(pending)
        for device, idx in by_device.items():
            dtype = torch.float64 if any(pending[i]["terms"].dtype == torch.float64 for i in idx) else torch.float32
            rows = []
            for i in idx:
                rec = pending[i]
                t = rec["transition"]
                t = t.to(dtype).reshape(1) if isinstance(t, torch.Tensor) else torch.full((1,), float(t), dtype=dtype,
                                                                                            device=device)
                rows.append(torch.cat([rec["terms"].to(dtype), rec["total"].to(dtype).reshape(1), t]))
            host = torch.stack(rows).tolist()  # the one synchronisation for this device
            for i, v in zip(idx, host):
                values[i] = v
        baseline = self._temporal_baseline
        rows = []
        for rec, vals in zip(pending, values):
            row, baseline = self._row(rec, vals, baseline)
            rows.append(row)
        for i, log in enumerate(self._logs):
            todo = [row for row in rows if row["step"] > self._written[i]]
            if todo:
                log.write(todo)
                self._written[i] = todo[-1]["step"]
        # Everything is written: now the records leave, and the baseline moves on.
        del self._pending[:len(pending)]
        self._temporal_baseline = baseline
        return rows

    def _row(self, rec: dict[str, Any], vals: list[float],
             baseline: Optional[float]) -> tuple[dict[str, Any], Optional[float]]:
        """The row of a record and the temporal baseline after it."""
        names = rec["terms_names"]
        n = len(names)
        row: dict[str, Any] = dict(zip(names, vals[:n]))
        total = vals[n]
        transition = bool(vals[n + 1])
        row.update(total=total, step=rec["step"], stride=rec["stride"], file_transition=transition,
                   phase=rec["phase"], epoch=rec["epoch"])
        flags = []
        if not math.isfinite(total):
            flags.append("nonfinite")
        elif total > self.divergence_threshold:
            flags.append("divergence")
        if rec["expected_total"] is not None:
            low, high = rec["expected_total"]
            if not low <= total <= high:
                flags.append("outside_expected")
        temporal = row["temporal"]
        # Steps without a temporal term (exactly 0: no prev, or no continuous row)
        # and file transitions neither get flagged nor move the baseline.
        if not transition and math.isfinite(temporal) and temporal != 0.0:
            if self.temporal_jump_factor is not None and baseline is not None \
                    and temporal > self.temporal_jump_factor * baseline:
                flags.append("temporal_jump")
            baseline = temporal if baseline is None else \
                TEMPORAL_BASELINE_DECAY * baseline + (1.0 - TEMPORAL_BASELINE_DECAY) * temporal
        row["flags"] = flags
        return row, baseline


__all__ = ["FLAGS", "LossMonitor"]
