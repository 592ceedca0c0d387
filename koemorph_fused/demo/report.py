"""What the demo prints and draws: the per-step check's margins, the per-epoch
table of the monitor's rows, loss timings, how far a second (reference-trained)
run drifts, and the plot."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import torch

from ..schedule import TrainingSchedule
from ..terms import TERM_NAMES
from .train import RunResult
from .verify import QUANTITIES, Verdict

def median_us(seconds: list[float]) -> float:
    """The median of ``seconds``, in microseconds (NaN for an empty list)."""
    return statistics.median(seconds) * 1e6 if seconds else float("nan")


def verdict_table(verdict: Verdict) -> str:
    """One line per compared quantity: its tolerance, the worst ratio
    ``error / tolerance`` over the steps and where it occurred; then how the
    tolerances were derived."""
    tol = verdict.tolerance
    lines = [f"  {'quantity':<10} {'tolerance':<22} {'worst error/tol':>15}  {'at step':>7}  ok"]
    for name in verdict.worst:
        if name == "counts":
            what = "equal"
        elif tol is None:
            what = "?"
        elif name.startswith("grad"):
            what = f"{tol.gradient_rtol:.2g} * max|g|"
        else:
            what = f"{tol.value_rtol:.2g} * |reference|"
        ratio = verdict.worst[name]
        lines.append(f"  {name:<10} {what:<22} {ratio:>15.2g}  {verdict.worst_step[name]:>7}  "
                     f"{'yes' if ratio <= 1.0 else 'NO'}")
    if tol is not None:
        lines.extend("  " + line for line in ("tolerances from the dtype: " + tol.describe()).split("\n"))
    for message in verdict.dtype_errors:
        lines.append(f"  dtype mismatch: {message}")
    return "\n".join(lines)


def chaos_summary(fused: RunResult, reference: RunResult) -> str:
    """How far the reference-trained run's totals drifted from the fused
    run's, per phase: a picture of chaos, not a check of the loss."""
    a, b = fused.column("total"), reference.column("total")
    rel = (a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float64).tiny)
    by_phase: dict[str, float] = {}
    for i, row in enumerate(fused.rows):
        by_phase[row["phase"]] = max(by_phase.get(row["phase"], 0.0), float(rel[i]))
    return ("reference-trained run: max relative difference of its total from the fused run's, by phase: "
            + ", ".join(f"{name} {value:.1e}" for name, value in by_phase.items())
            + " (two runs drift apart by rounding, at a rate set by the CPU, threads and seed: not the verdict)")


def epoch_table(rows: list[dict[str, Any]], schedule: TrainingSchedule,
                term_names: tuple[str, ...] = TERM_NAMES, flags: bool = True) -> str:
    """One line per epoch: phase, stride (the rows'), the temporal/smoothing
    weights, the means of the terms (``term_names``) and the total over the
    epoch's steps, the number of steps with a file transition and, with
    ``flags`` (rows a LossMonitor flagged), the flags raised (with counts)."""
    head = (f"{'epoch':>5} {'phase':<5} {'stride':>6} {'w_temp':>6} {'w_smth':>6} "
            + " ".join(f"{name[:10]:>10}" for name in term_names)
            + f" {'total':>10} {'trans':>5}" + ("  flags" if flags else ""))
    lines = [head, "-" * len(head)]
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], []).append(row)
    for epoch, group in by_epoch.items():
        phase = schedule.at(epoch)
        means = [statistics.fmean(r[k] for r in group) for k in term_names + ("total",)]
        flags = Counter(f for r in group for f in r.get("flags", ()))
        flag_text = ", ".join(f"{name} x{n}" for name, n in sorted(flags.items())) or "-"
        lines.append(
            f"{epoch:>5} {phase.name:<5} {group[0]['stride']:>6} {phase.weights.temporal:>6.3f} "
            f"{phase.weights.smoothing:>6.3f} " + " ".join(f"{m:>10.5f}" for m in means[:-1])
            + f" {means[-1]:>10.5f} {sum(r['file_transition'] for r in group):>5}"
            + (f"  {flag_text}" if flags else "")
        )
    return "\n".join(lines)


def plot(path: str, runs: list[RunResult], schedule: TrainingSchedule, steps_per_epoch: int) -> None:
    """Two rows of four panels: the five terms and the total per step (log
    scale), every run in each panel, with the phase boundaries marked; and the
    first run's per-step ratios ``error / tolerance`` of the check against the
    reference, for the terms and total and for the two gradients (the verdict
    needs every point below the line at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = TERM_NAMES + ("total",)
    fig, axes = plt.subplots(2, 4, figsize=(19, 7.5), sharex=True)
    panels = list(axes.flat)
    styles = [dict(lw=1.6, alpha=0.8), dict(lw=1.0, ls="--", color="black")]
    for ax, key in zip(panels, keys):
        for run, style in zip(runs, styles):
            values = run.column(key)
            steps = torch.arange(len(values))
            positive = values > 0  # log scale: a term that is exactly 0 (no prev yet) is left out
            ax.plot(steps[positive], values[positive], label=f"trained on {run.name}", **style)
        ax.set_yscale("log")
        ax.set_title(key)
    checked = runs[0]
    ratios = torch.tensor(checked.ratios, dtype=torch.float64).reshape(-1, len(QUANTITIES))
    floor = 1e-6  # exact agreement (ratio 0) drawn at the floor of the log axis
    for ax, names, title in ((panels[6], keys, "terms and total"),
                             (panels[7], ("grad_pred", "grad_raw"), "gradients")):
        for name in names:
            column = ratios[:, QUANTITIES.index(name)].clamp_min(floor)
            ax.plot(torch.arange(len(column)), column, ls="none", marker=".", ms=3, alpha=0.7, label=name)
        ax.axhline(1.0, color="red", lw=1.2, label="tolerance")
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, 10)
        ax.set_title(f"{checked.name} vs reference, same outputs: error/tolerance, {title}\n"
                     f"(at the bottom: exactly equal)", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
    for ax in panels:
        for boundary, label in ((schedule.mid_start, "mid"), (schedule.late_start, "late")):
            if 0 < boundary < schedule.total_epochs:
                ax.axvline(boundary * steps_per_epoch, color="grey", lw=0.8, ls=":")
                ax.text(boundary * steps_per_epoch, 1.0, f" {label}", transform=ax.get_xaxis_transform(),
                        va="top", fontsize=8, color="grey")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    panels[0].legend(fontsize=8)
    names = " and ".join(f"trained on {run.name}" for run in runs)
    fig.suptitle(f"KoeMorph temporal loss terms per step ({names}) and the per-step check of the fused loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["chaos_summary", "epoch_table", "median_us", "plot", "verdict_table"]
