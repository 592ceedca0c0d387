"""What the demo prints and draws: the agreement of the two runs' curves, the
per-epoch table of the monitor's rows, loss timings, and the plot."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from typing import Any, Optional

import torch

from ..schedule import TrainingSchedule
from ..terms import TERM_NAMES
from .train import RunResult

#: (rtol, atol) on the per-step totals and terms of the two runs, per dtype.
#: float32: the runs start equal to about 1e-7, but rounding differences of the
#: gradients (1 ulp) grow during training; over the default 240 steps the
#: drift stays near 1e-4 relative. float64 runs agree to about 1e-15.
TOLERANCES = {"float32": (1e-3, 1e-6), "float64": (1e-9, 1e-12)}


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How closely two runs' curves agree."""

    steps: int
    max_abs_total: float
    max_rel_total: float
    max_abs_terms: float
    max_rel_by_phase: dict[str, float]
    first_bad_step: Optional[int]   # first step outside the tolerance, or None
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.first_bad_step is None


def compare(a: RunResult, b: RunResult, rtol: float, atol: float) -> Agreement:
    """Per-step comparison of the totals and the five terms of run ``a``
    against run ``b`` (the reference)."""
    if len(a.rows) != len(b.rows):
        raise ValueError(f"runs have {len(a.rows)} and {len(b.rows)} steps")
    keys = TERM_NAMES + ("total",)
    va = torch.stack([a.column(k) for k in keys], dim=1)
    vb = torch.stack([b.column(k) for k in keys], dim=1)
    diff = (va - vb).abs()
    rel = diff / vb.abs().clamp_min(torch.finfo(torch.float64).tiny)
    bad = (diff > atol + rtol * vb.abs()) | (va.isnan() != vb.isnan())
    bad_steps = bad.any(dim=1).nonzero().flatten()
    by_phase: dict[str, float] = {}
    for i, row in enumerate(b.rows):
        by_phase[row["phase"]] = max(by_phase.get(row["phase"], 0.0), float(rel[i, -1]))
    return Agreement(
        steps=len(a.rows),
        max_abs_total=float(diff[:, -1].max()),
        max_rel_total=float(rel[:, -1].max()),
        max_abs_terms=float(diff[:, :-1].max()),
        max_rel_by_phase=by_phase,
        first_bad_step=int(bad_steps[0]) if bad_steps.numel() else None,
        rtol=rtol,
        atol=atol,
    )


def median_us(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e6


def epoch_table(rows: list[dict[str, Any]], schedule: TrainingSchedule) -> str:
    """One line per epoch: phase, stride, the temporal/smoothing weights, the
    means of the terms and the total over the epoch's steps, the number of
    steps with a file transition and the flags raised (with counts)."""
    head = (f"{'epoch':>5} {'phase':<5} {'stride':>6} {'w_temp':>6} {'w_smth':>6} "
            + " ".join(f"{name[:10]:>10}" for name in TERM_NAMES)
            + f" {'total':>10} {'trans':>5}  flags")
    lines = [head, "-" * len(head)]
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], []).append(row)
    for epoch, group in by_epoch.items():
        phase = schedule.at(epoch)
        means = [statistics.fmean(r[k] for r in group) for k in TERM_NAMES + ("total",)]
        flags = Counter(f for r in group for f in r["flags"])
        flag_text = ", ".join(f"{name} x{n}" for name, n in sorted(flags.items())) or "-"
        lines.append(
            f"{epoch:>5} {phase.name:<5} {phase.stride:>6} {phase.weights.temporal:>6.3f} "
            f"{phase.weights.smoothing:>6.3f} " + " ".join(f"{m:>10.5f}" for m in means[:-1])
            + f" {means[-1]:>10.5f} {sum(r['file_transition'] for r in group):>5}  {flag_text}"
        )
    return "\n".join(lines)


def plot(path: str, runs: list[RunResult], schedule: TrainingSchedule, steps_per_epoch: int) -> None:
    """The five terms and the total per step, every run in one panel per
    term (log scale), with the phase boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = TERM_NAMES + ("total",)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    styles = [dict(lw=1.6, alpha=0.8), dict(lw=1.0, ls="--", color="black")]
    for ax, key in zip(axes.flat, keys):
        for run, style in zip(runs, styles):
            values = run.column(key)
            steps = torch.arange(len(values))
            positive = values > 0  # log scale: a term that is exactly 0 (no prev yet) is left out
            ax.plot(steps[positive], values[positive], label=run.name, **style)
        for boundary, label in ((schedule.mid_start, "mid"), (schedule.late_start, "late")):
            if 0 < boundary < schedule.total_epochs:
                ax.axvline(boundary * steps_per_epoch, color="grey", lw=0.8, ls=":")
                ax.text(boundary * steps_per_epoch, 1.0, f" {label}", transform=ax.get_xaxis_transform(),
                        va="top", fontsize=8, color="grey")
        ax.set_yscale("log")
        ax.set_title(key)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.suptitle("KoeMorph temporal loss terms per step: fused vs reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Agreement", "TOLERANCES", "compare", "epoch_table", "median_us", "plot"]
