"""The seed's training curriculum: sampling stride and loss weights per epoch.

Three phases over ``total_epochs`` epochs, numbered ``0 .. total_epochs - 1``:

* **early**, the first quarter: stride 32, the sparse preset (:data:`~koemorph_fused.weights.SPARSE`);
* **mid**, the middle half: the stride halves 32 -> 16 -> 8 -> 4 -> 2 in five equal
  epoch segments while the weights move linearly from the sparse to the dense preset;
* **late**, the last quarter: stride 1, the dense preset (:data:`~koemorph_fused.weights.DENSE`).

Rounding (exact integer arithmetic, so it is the same on every machine)::

    n_early = max(1, floor(total / 4 + 1/2))              # a quarter, rounded half up; never 0
    n_late  = min(floor(total / 4 + 1/2), total - n_early)
    n_mid   = total - n_early - n_late

so the seed's 100 epochs split 25 / 50 / 25 (early 0-24, mid 25-74, late 75-99), and

    total   1  2  3  4  5  6  7  10  100
    early   1  1  1  1  1  2  2   3   25
    mid     0  0  1  2  3  2  3   4   50
    late    0  1  1  1  1  2  2   3   25

Training always begins sparse (epoch 0 is early), and reaches the dense phase as
soon as there are 2 epochs. Inside the mid phase, with ``i = epoch - n_early``
and ``t = i / n_mid`` in ``[0, 1)``:

* the stride is ``32 >> floor(5 * t)`` (equal segments of ``n_mid / 5`` epochs;
  with fewer than 5 mid epochs some strides are skipped: 32, 16, 4 for 3);
* the weights are ``SPARSE.lerp(DENSE, t)``: the first mid epoch still has the
  sparse weights and the ramp would reach the dense preset at the first late
  epoch, so the weights are a continuous, piecewise-linear function of the epoch.

>>> phase = TrainingSchedule(total_epochs=100).at(50)
>>> phase.name, phase.stride, phase.expected_total
('mid', 8, (0.08, 0.25))
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Iterator

from .weights import DEFAULT, DENSE, SPARSE, LossWeights

#: Sampling stride of the early phase; the mid phase halves it down to :data:`MID_FINAL_STRIDE`.
EARLY_STRIDE = 32
#: Last stride of the mid phase (the late phase samples densely, stride 1).
MID_FINAL_STRIDE = 2
#: Number of stride levels in the mid phase: 32, 16, 8, 4, 2.
MID_LEVELS = (EARLY_STRIDE // MID_FINAL_STRIDE).bit_length()

#: The seed's normal range of the weighted total per phase; above 1.0 signals divergence.
EXPECTED_TOTAL: dict[str, tuple[float, float]] = {
    "early": (0.15, 0.6),
    "mid": (0.08, 0.25),
    "late": (0.02, 0.08),
}


@dataclasses.dataclass(frozen=True)
class Phase:
    """Where one epoch stands in the curriculum.

    Attributes:
        name: ``"early"``, ``"mid"`` or ``"late"``.
        epoch: the epoch (0-based).
        stride: sampling stride of the windows, 32 ... 1.
        weights: the loss weights to assign to the loss module for this epoch.
        expected_total: the seed's normal ``(low, high)`` range of the total.
    """

    name: str
    epoch: int
    stride: int
    weights: LossWeights
    expected_total: tuple[float, float]


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_weights(name: str, value: Any) -> LossWeights:
    if not isinstance(value, LossWeights):
        raise TypeError(f"{name} must be a koemorph_fused.LossWeights, got {type(value).__name__}")
    return value


class TrainingSchedule:
    """Stride and loss weights per epoch, following the seed's three phases.

    Args:
        total_epochs: number of epochs of the whole training, >= 1.
        sparse: weights of the early phase and the start of the mid ramp
            (default: the seed's sparse preset).
        dense: weights of the late phase and the end of the mid ramp
            (default: the seed's dense preset).

    Use :meth:`from_base` to derive both presets from a config's ``loss:`` section.

    >>> schedule = TrainingSchedule(total_epochs=4)
    >>> [(p.name, p.stride) for p in schedule]
    [('early', 32), ('mid', 32), ('mid', 8), ('late', 1)]
    """

    def __init__(self, total_epochs: int = 100, *, sparse: LossWeights = SPARSE, dense: LossWeights = DENSE) -> None:
        total_epochs = _check_int("total_epochs", total_epochs)
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        self.total_epochs = total_epochs
        self.sparse = _check_weights("sparse", sparse)
        self.dense = _check_weights("dense", dense)
        quarter = (2 * total_epochs + 4) // 8  # floor(total / 4 + 1/2), in integers
        self.n_early = max(1, quarter)
        self.n_late = min(quarter, total_epochs - self.n_early)
        self.n_mid = total_epochs - self.n_early - self.n_late

    @classmethod
    def from_base(cls, base: LossWeights, total_epochs: int = 100) -> "TrainingSchedule":
        """A schedule whose presets are rescaled to a base set of weights (e.g.
        from a config): each term's sparse and dense weight is multiplied by
        ``base / DEFAULT`` for that term. With the default weights this is the
        plain schedule; a term weighted 0 in ``base`` is 0 in every phase;
        doubling ``temporal_weight`` doubles the temporal weight of every phase.
        """
        base = _check_weights("base", base)
        ratios = [b / d for b, d in zip(base.as_tuple(), DEFAULT.as_tuple())]
        sparse = LossWeights(*(w * r for w, r in zip(SPARSE.as_tuple(), ratios)))
        dense = LossWeights(*(w * r for w, r in zip(DENSE.as_tuple(), ratios)))
        return cls(total_epochs, sparse=sparse, dense=dense)

    @property
    def mid_start(self) -> int:
        """First epoch of the mid phase (== ``late_start`` when there is none)."""
        return self.n_early

    @property
    def late_start(self) -> int:
        """First epoch of the late phase (== ``total_epochs`` when there is none)."""
        return self.n_early + self.n_mid

    def at(self, epoch: int) -> Phase:
        """The phase of ``epoch`` (0-based, ``0 <= epoch < total_epochs``)."""
        epoch = _check_int("epoch", epoch)
        if not 0 <= epoch < self.total_epochs:
            raise ValueError(f"epoch must be in [0, {self.total_epochs}) for total_epochs={self.total_epochs}, got {epoch}")
        if epoch < self.mid_start:
            return Phase("early", epoch, EARLY_STRIDE, self.sparse, EXPECTED_TOTAL["early"])
        if epoch >= self.late_start:
            return Phase("late", epoch, 1, self.dense, EXPECTED_TOTAL["late"])
        i = epoch - self.mid_start
        level = (i * MID_LEVELS) // self.n_mid  # floor(5 * t), exact
        t = i / self.n_mid
        return Phase("mid", epoch, EARLY_STRIDE >> level, self.sparse.lerp(self.dense, t), EXPECTED_TOTAL["mid"])

    def __iter__(self) -> Iterator[Phase]:
        return (self.at(e) for e in range(self.total_epochs))

    def __len__(self) -> int:
        return self.total_epochs

    def __repr__(self) -> str:
        return (f"TrainingSchedule(total_epochs={self.total_epochs}: early {self.n_early}, "
                f"mid {self.n_mid}, late {self.n_late})")


__all__ = ["EXPECTED_TOTAL", "Phase", "TrainingSchedule"]
