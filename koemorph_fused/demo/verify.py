"""The demo's verdict: at every training step, the fused loss against the
plain-PyTorch reference on the very same model outputs.

Two training runs drift apart by chaos (rounding differences of 1 ulp grow
step by step, at a rate that depends on the seed, the thread count and the
CPU's instruction set), so comparing two runs measures the machine, not the
loss. Instead, every step feeds the same ``pred``, ``raw``, ``prev``,
``target``, ``continuity`` and weights to both losses and compares what they
return: the five terms, the total, and the gradients that flow back into the
model (``d total / d pred`` and ``d total / d raw``). The model trains on the
fused loss's gradients; the reference only checks them.

Every comparison is against a tolerance derived from the dtype
(:class:`Tolerance`); :class:`StepChecker` keeps, per quantity, the ratio
``error / tolerance`` of every step (device tensors, read back once per
epoch). The verdict passes when every ratio is <= 1 and every result has the
dtype the contract promises.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .._ops import accumulation_dtype
from ..terms import SEQUENCE_TERM_NAMES, TERM_NAMES

#: The compared quantities, in the order of :attr:`StepChecker.ratios`' columns.
QUANTITIES: tuple[str, ...] = TERM_NAMES + ("total", "grad_pred", "grad_raw")
#: The same for the sequence loss: six terms, and its counts (compared exactly).
SEQUENCE_QUANTITIES: tuple[str, ...] = SEQUENCE_TERM_NAMES + ("total", "grad_pred", "grad_raw", "counts")

#: Roundings in one term's value besides its sum: the difference (pred - x),
#: its square or absolute value, the division by the count, and for the total
#: the weight's rounding to the accumulation dtype, the product with it and
#: the four additions of the weighted terms (2 + 1 + 1 + 1 + 4 = 9, rounded up).
VALUE_EXTRA_ROUNDINGS = 10
#: Contributions summed into one element of ``d total / d pred``: the
#: quadratic part ``(2 w_mse/N + 2 w_p colw) d``, the l1 sign, the temporal
#: part and the smoothing sign.
GRADIENT_CONTRIBUTIONS = 4
#: Roundings on the longest chain of one contribution (coefficient 2*w/N or
#: 2*w_t*m/(C*sum m): up to 5; the difference; the product; grad_output) and
#: the three additions that combine the contributions: 5 + 1 + 1 + 1 + 3 = 11,
#: rounded up.
GRADIENT_ROUNDINGS = 12

#: The same counts for the sequence loss (``koemorph-fused demo --sequence``).
#: Values: the difference and the square, the division by C and by the count,
#: the weight's rounding and product, five additions of the six weighted
#: terms (2 + 1 + 1 + 1 + 1 + 5 = 11, rounded up). The velocity residual's
#: three differences cancel; their error is bounded separately
#: (:func:`velocity_floors`).
SEQUENCE_VALUE_EXTRA_ROUNDINGS = 12
#: Contributions to one element of ``d total / d pred``: the four of the row
#: loss and the velocity residuals of the pairs (t, t-1) and (t+1, t).
SEQUENCE_GRADIENT_CONTRIBUTIONS = 6
#: The row loss's chain with five additions instead of three: 5 + 1 + 1 + 1 + 5 = 13, rounded up.
SEQUENCE_GRADIENT_ROUNDINGS = 14


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of one rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far the fused loss may be from the reference for inputs of ``dtype``
    with ``rows x cols`` elements, derived from the rounding of both.

    Let ``u_acc`` be the unit roundoff of the accumulation dtype (float32 for
    float32/bfloat16 inputs, float64 for float64) and ``u_out`` that of the
    gradients' dtype when it is narrower than the accumulation dtype (bfloat16:
    2**-8), else 0. ``N = rows * cols``.

    **Terms and total.** Each term is a sum of at most ``N`` non-negative
    values (squares or absolute values), so there is no cancellation: by the
    standard bound for summation (Higham, *Accuracy and Stability of
    Numerical Algorithms*, 4.2) a sum of ``n`` non-negative values computed in
    any order is within ``(n - 1) u_acc`` of its exact value, relative to the
    value itself. Each summand carries its own few roundings (the difference
    and the square), the mean divides once, and the total adds the weights'
    rounding, the products and four additions, all of non-negative values:
    :data:`VALUE_EXTRA_ROUNDINGS` in all. Both the fused loss and the
    reference err by at most that much, so::

        |fused - reference| <= 2 (N + VALUE_EXTRA_ROUNDINGS) u_acc |reference|

    This is a worst-case bound (blocked and pairwise sums do far better, which
    is why the demo reports the margin); it still catches a 1e-3 relative
    error in float32 inputs of the demo's size (N = 832: 1.0e-4).

    **Gradients.** An element of ``d total / d pred`` is the sum of
    :data:`GRADIENT_CONTRIBUTIONS` contributions of both signs, so it can
    cancel; relative errors of single elements mean nothing. Each contribution
    is computed with at most :data:`GRADIENT_ROUNDINGS` roundings, each
    relative to a contribution, and no contribution exceeds the largest
    gradient element of the batch, ``max|g|``, by more than a small factor
    (they are of the same order in every row where they do not cancel). So
    each implementation is within ``GRADIENT_CONTRIBUTIONS *
    GRADIENT_ROUNDINGS * u_acc * max|g|`` before the final rounding to the
    gradient's dtype, which adds ``u_out |g_i| <= u_out max|g|``. Both err::

        max_i |g_fused - g_reference| <= 2 (4 * 12 * u_acc + u_out) max|g|

    with ``max|g|`` the larger of the two gradients' maxima. For bfloat16 the
    output rounding dominates (two values that straddle a rounding boundary
    end one bfloat16 step apart, at most 2 u_out |g_i|).

    **Sequences** (:meth:`for_sequence`, ``N = B * T * C``): the same bounds
    with six terms and six gradient contributions, plus, for the velocity
    term, what its residual's cancellation adds (:func:`velocity_floors`):
    an absolute part of the term's and the total's tolerance and a lower
    bound of the gradients' scale.
    """

    dtype: torch.dtype
    rows: int
    cols: int
    #: Contributions summed into one gradient element, and the roundings of
    #: each (the row loss's by default; the sequence loss has more).
    contributions: int = GRADIENT_CONTRIBUTIONS
    roundings: int = GRADIENT_ROUNDINGS
    #: Roundings in one term's value besides its sum.
    value_extra: int = VALUE_EXTRA_ROUNDINGS

    @classmethod
    def for_sequence(cls, dtype: torch.dtype, frames: int, cols: int) -> "Tolerance":
        """The tolerance of the sequence loss over ``frames`` (B * T) frames of ``cols`` columns."""
        return cls(dtype, frames, cols, SEQUENCE_GRADIENT_CONTRIBUTIONS, SEQUENCE_GRADIENT_ROUNDINGS,
                   SEQUENCE_VALUE_EXTRA_ROUNDINGS)

    @property
    def accumulation(self) -> torch.dtype:
        return accumulation_dtype(self.dtype)

    @property
    def u_acc(self) -> float:
        return unit_roundoff(self.accumulation)

    @property
    def u_out(self) -> float:
        narrower = torch.finfo(self.dtype).eps > torch.finfo(self.accumulation).eps
        return unit_roundoff(self.dtype) if narrower else 0.0

    @property
    def value_rtol(self) -> float:
        """Relative tolerance of the terms and the total."""
        return 2 * (self.rows * self.cols + self.value_extra) * self.u_acc

    @property
    def gradient_rtol(self) -> float:
        """Tolerance of the gradients, relative to ``max|g|``."""
        return 2 * (self.contributions * self.roundings * self.u_acc + self.u_out)

    def describe(self) -> str:
        """How the tolerances follow from the dtype, in two lines."""
        return (f"N = {self.rows}x{self.cols}, u_acc = {self.u_acc:.3g} "
                f"({str(self.accumulation).replace('torch.', '')} accumulation), u_out = {self.u_out:.3g}; "
                f"terms and total: 2 (N + {self.value_extra}) u_acc = {self.value_rtol:.2g},\n"
                f"gradients: 2 ({self.contributions}*{self.roundings} u_acc + u_out) = "
                f"{self.gradient_rtol:.2g} (see koemorph_fused/demo/verify.py)")


def _ratio(err: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """``err / tol`` with 0/0 = 0 (both exactly equal and exactly 0) and x/0 = inf."""
    return torch.where(err == 0, torch.zeros_like(err), err / tol)


def _nan_mismatch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.isnan() != b.isnan()).any()


def velocity_floors(pred: torch.Tensor, target: torch.Tensor, prev: Optional[torch.Tensor],
                    prev_target: Optional[torch.Tensor], pairs: torch.Tensor, velocity_weight: float,
                    count: torch.Tensor, tolerance: "Tolerance") -> tuple[torch.Tensor, torch.Tensor]:
    """What the velocity residual's cancellation adds to the sequence
    tolerances: ``(value floor, gradient scale)``, device tensors.

    Both implementations compute the residual as ``v = dp - dt`` with
    ``dp = pred[t] - q`` and ``dt = target[t] - s`` (q, s: the previous
    frame's pred and target), each difference rounded once. ``dp`` and ``dt``
    are exact to ``u_acc`` relative to themselves, but ``v`` may cancel:
    ``|v_computed - v| <= u (|dp| + |dt| + |v|) <= 2 u s`` with
    ``s = |dp| + |dt|`` (to first order). So ``|v_computed² - v²| <= 5 u s²``
    per element, and the term (a mean over the C columns and the ``count``
    pairs) is off by at most ``5 u mean(s²)``; for both implementations::

        value floor = 2 * 5 u_acc * sum(s²) / (C * max(count, 1))

    added to the velocity term's tolerance (``velocity_weight`` times that to
    the total's). In the gradient, a velocity contribution
    ``k v`` (``k = 2 velocity_weight / (C * count)``) carries an error of at
    most ``2 u k s``, which the gradient bound covers when its scale is at
    least ``k * max(s)``: the second value. ``pairs``: the ``(B, T)`` bool set
    ``P_v`` of the call."""
    acc = tolerance.accumulation
    p, t = pred.detach().to(acc), target.detach().to(acc)

    def previous(x: torch.Tensor, first: Optional[torch.Tensor]) -> torch.Tensor:
        head = torch.zeros_like(x[:, :1]) if first is None else first.detach().to(acc).unsqueeze(1)
        return torch.cat([head, x[:, :-1]], dim=1)

    spread = (p - previous(p, prev)).abs() + (t - previous(t, prev_target)).abs()
    spread = torch.where(pairs.unsqueeze(-1), spread, 0.0)
    cols = pred.shape[-1]
    divisor = count.to(acc).clamp(min=1)
    floor = 2 * 5 * tolerance.u_acc * (spread**2).sum() / (cols * divisor)
    scale = 2 * velocity_weight / (cols * divisor) * spread.amax() if spread.numel() else floor * 0
    return floor, scale


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one loss returned for one step: the terms (five, or six for a
    sequence), the total, the gradients with respect to ``pred`` and ``raw``
    and, for a sequence, the counts."""

    terms: torch.Tensor
    total: torch.Tensor
    grad_pred: torch.Tensor
    grad_raw: torch.Tensor
    counts: Optional[torch.Tensor] = None


class StepChecker:
    """Compares the fused loss with the reference at every step and keeps the
    ratios ``error / tolerance`` (one row of :data:`QUANTITIES` per step).

    Nothing here synchronises with the device: the ratios stay device tensors
    until :meth:`flush` reads them back (once per epoch in the demo). The
    dtypes of the results are checked on the host as they come (no data is
    read for that); a wrong dtype is a failure of its own.
    """

    def __init__(self, quantities: tuple[str, ...] = QUANTITIES) -> None:
        #: The compared quantities: the terms, "total", "grad_pred", "grad_raw"
        #: (:data:`QUANTITIES` or :data:`SEQUENCE_QUANTITIES`, which adds "counts").
        self.quantities = quantities
        self._terms = len(quantities) - 3 - ("counts" in quantities)
        self._pending: list[torch.Tensor] = []
        self.ratios: list[list[float]] = []
        self.dtype_errors: list[str] = []
        self.tolerance: Optional[Tolerance] = None

    def compare(self, fused: StepResult, reference: StepResult, pred: torch.Tensor, *,
                tolerance: Optional[Tolerance] = None, value_floor: Optional[torch.Tensor] = None,
                gradient_scale: Optional[torch.Tensor] = None) -> None:
        """Record one step; ``pred`` is the model output both losses saw
        (its dtype and shape give the tolerance, unless ``tolerance`` is
        given). ``value_floor``: absolute amounts added to the terms' and the
        total's tolerances (one per term, then the total); ``gradient_scale``:
        a lower bound of the gradients' scale ``max|g|`` (see
        :func:`velocity_floors`)."""
        tol = tolerance or Tolerance(pred.dtype, pred.numel() // pred.shape[-1], pred.shape[-1])
        self.tolerance = tol
        self._check_dtypes(fused, reference, pred.dtype)
        acc = tol.accumulation
        vf = torch.cat([fused.terms.detach().to(acc), fused.total.detach().to(acc).reshape(1)])
        vr = torch.cat([reference.terms.detach().to(acc), reference.total.detach().to(acc).reshape(1)])
        if vf.numel() != self._terms + 1 or vr.numel() != self._terms + 1:
            raise ValueError(f"expected {self._terms} terms, got {fused.terms.numel()} and {reference.terms.numel()}")
        bound = tol.value_rtol * vr.abs()
        if value_floor is not None:
            bound = bound + value_floor.to(acc)
        value_ratio = _ratio((vf - vr).abs(), bound)
        value_ratio = torch.where(vf.isnan() & vr.isnan(), torch.zeros_like(value_ratio), value_ratio)
        grad_ratios = []
        for gf, gr in ((fused.grad_pred, reference.grad_pred), (fused.grad_raw, reference.grad_raw)):
            gf, gr = gf.detach().to(acc), gr.detach().to(acc)
            scale = torch.maximum(gf.abs().amax(), gr.abs().amax())
            if gradient_scale is not None:
                scale = torch.maximum(scale, gradient_scale.to(acc))
            r = _ratio((gf - gr).abs().amax(), tol.gradient_rtol * scale)
            grad_ratios.append(torch.where(_nan_mismatch(gf, gr), torch.full_like(r, float("inf")), r))
        row = [value_ratio, torch.stack(grad_ratios)]
        if "counts" in self.quantities:  # exact: 0 when equal, inf when not (no synchronisation)
            fc, rc = fused.counts, reference.counts
            if fc is None or rc is None or fc.shape != rc.shape:
                differ = value_ratio.new_ones((1,), dtype=torch.bool)
            else:
                differ = (fc.to(rc.device) != rc).any().reshape(1)
            row.append(torch.where(differ, float("inf"), 0.0).to(value_ratio))
        self._pending.append(torch.cat(row).to(torch.float64))

    def _check_dtypes(self, fused: StepResult, reference: StepResult, dtype: torch.dtype) -> None:
        expected_total = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        found = {"fused total": fused.total.dtype, "fused terms": fused.terms.dtype,
                 "reference total": reference.total.dtype, "reference terms": reference.terms.dtype}
        wrong = [f"{name} is {str(d).replace('torch.', '')}" for name, d in found.items() if d != expected_total]
        for name, g in (("fused", fused.grad_pred), ("fused", fused.grad_raw),
                        ("reference", reference.grad_pred), ("reference", reference.grad_raw)):
            if g.dtype != dtype:
                wrong.append(f"{name} gradient is {str(g.dtype).replace('torch.', '')}")
        if wrong:
            message = (f"expected totals and terms in {str(expected_total).replace('torch.', '')} and gradients in "
                       f"{str(dtype).replace('torch.', '')}: " + ", ".join(wrong))
            if message not in self.dtype_errors:
                self.dtype_errors.append(message)

    def flush(self) -> list[list[float]]:
        """Read back the pending steps' ratios (one synchronisation); returns them
        and appends them to :attr:`ratios`."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        rows = torch.stack(pending).tolist()
        self.ratios.extend(rows)
        return rows


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome over a whole run: per quantity the worst ratio
    ``error / tolerance`` and the step where it occurred."""

    worst: dict[str, float]
    worst_step: dict[str, int]
    steps: int
    first_bad_step: Optional[int]
    dtype_errors: tuple[str, ...]
    tolerance: Optional[Tolerance]

    @property
    def ok(self) -> bool:
        return self.steps > 0 and self.first_bad_step is None and not self.dtype_errors

    @property
    def margin(self) -> float:
        """The worst ratio over every quantity (PASS needs <= 1)."""
        return max(self.worst.values()) if self.worst else float("inf")


def verdict(ratios: list[list[float]], dtype_errors: list[str], tolerance: Optional[Tolerance],
            quantities: tuple[str, ...] = QUANTITIES) -> Verdict:
    """Summarise the per-step ratios (rows of ``quantities``)."""
    table = torch.tensor(ratios, dtype=torch.float64).reshape(-1, len(quantities))
    worst: dict[str, float] = {}
    worst_step: dict[str, int] = {}
    for i, name in enumerate(quantities):
        column = table[:, i].nan_to_num(nan=float("inf"))
        if column.numel():
            worst_step[name] = int(column.argmax())
            worst[name] = float(column[worst_step[name]])
    bad = ~(table <= 1.0)  # NaN counts as bad
    bad_steps = bad.any(dim=1).nonzero().flatten()
    return Verdict(worst, worst_step, table.shape[0], int(bad_steps[0]) if bad_steps.numel() else None,
                   tuple(dtype_errors), tolerance)


__all__ = ["QUANTITIES", "SEQUENCE_QUANTITIES", "StepChecker", "StepResult", "Tolerance", "Verdict", "velocity_floors",
           "verdict"]
