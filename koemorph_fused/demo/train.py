"""The demo's training loop: sequential, stride-scheduled training of
:class:`~koemorph_fused.demo.model.TemporalBlendshapeModel` with the fused loss,
as in the seed's ``SequentialTrainer.train_step``, checked at every step
against the plain-PyTorch reference (:mod:`.verify`).

Per epoch: the schedule's phase gives the stride and the loss weights
(``loss_fn.weights = phase.weights``: the fused module copies them into its
weight buffer in place, so nothing is recompiled; the reference gets the
same weights). Per step:

1. every stream's next 256-frame window (advanced by the stride);
2. ``continuity = continuity_mask(file_index, prev_file_index)``: rows whose
   stream moved on to a new file reset the smoothing and drop out of the
   temporal term;
3. ``pred, raw = model(features, prev, continuity)``;
4. the fused loss on ``target_seq[:, -1, :]`` (a strided view), with ``prev``
   (the previous step's prediction, detached) and ``raw``. It runs on detached
   copies of ``pred`` and ``raw`` so that its forward and backward can be timed
   on their own; its gradients are then pushed through the model (the same
   gradients as one ``total.backward()``);
5. the reference loss on the very same tensors (fresh detached copies, same
   ``target``, ``prev``, ``continuity`` and weights): its terms, total and
   gradients are compared with the fused loss's (:class:`.verify.StepChecker`)
   and timed too, but never used for training;
6. Adam; the monitor records the step (device tensors, no synchronisation);
   monitor and checker are flushed once per epoch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .. import blendshapes
from ..continuity import continuity_mask
from ..modules import FusedKoeMorphLoss
from ..monitor import LossMonitor
from ..reference import KoeMorphTemporalLoss
from ..schedule import TrainingSchedule
from ..weights import LossWeights
from .data import LAYOUT, WINDOW, SyntheticFile, WindowStreams
from .model import TemporalBlendshapeModel
from .verify import StepChecker, StepResult, Verdict, verdict

#: The dtypes the demo trains in (model, data and loss inputs).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

#: The demo's perceptual column groups, by name: its data is in ARKit column
#: order (:data:`.data.LAYOUT`), so mouth = ``jaw*`` + ``mouth*`` and
#: expression = ``brow*`` + ``eye*`` + ``cheek*`` + ``nose*`` (not the seed's
#: positional default, columns 12..21 and 0..9, which in this order are eye and
#: jaw shapes). Every loss of the demo, fused or reference, is built with them:
#: ``FusedKoeMorphLoss(**GROUPS._asdict())``.
GROUPS = blendshapes.preset("semantic", layout=LAYOUT)
#: One line for the demo's output: which groups, in which layout.
GROUPS_NOTE = (f"perceptual groups by name, kf.blendshapes.preset('semantic', layout={LAYOUT!r}): "
               f"mouth = {' + '.join(blendshapes.SEMANTIC_MOUTH)} ({len(GROUPS.mouth_indices)} columns), "
               f"expression = {' + '.join(blendshapes.SEMANTIC_EXPRESSION)} "
               f"({len(GROUPS.expression_indices)} columns)")

#: The demo's expected total per phase, (low, high), for the monitor's
#: ``outside_expected`` flag, in place of the seed's (early 0.15-0.6, mid
#: 0.08-0.25, late 0.02-0.08), which are for a large model on real speech.
#: The synthetic data is far easier to fit: after the first ~15 steps the
#: totals sit an order of magnitude below the seed's ranges. Measured with
#: ``bench/demo_matrix.py`` (the default sizes, the ARKit-ordered data and the
#: named :data:`GROUPS`, seeds 0-9, float32, 1 thread): per-step totals early
#: 0.0093-0.48 (the first steps start from an untrained model), mid
#: 0.0057-0.020, late 0.0050-0.017; the ranges below widen those by about 2x
#: (early's top is then the monitor's divergence threshold, 1.0). The full
#: matrix (every dtype, instruction set and 1 and 2 threads) stays inside them.
#: They hold for the default sizes and weights; other settings may leave them.
EXPECTED_TOTAL: dict[str, tuple[float, float]] = {"early": (0.005, 1.0), "mid": (0.003, 0.04), "late": (0.0025, 0.035)}
#: One line for the demo's output: where :data:`EXPECTED_TOTAL` comes from.
CALIBRATION_NOTE = ("this demo's ranges, measured over seeds 0-9 and widened about 2x; the synthetic data is easier "
                    "to fit than real speech, so they sit below the seed's (early 0.15-0.6, mid 0.08-0.25, "
                    "late 0.02-0.08)")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of one demo training run."""

    epochs: int = 12
    steps_per_epoch: int = 10
    batch: int = 16
    hidden: int = 64
    downsample: int = 8
    lr: float = 3e-3
    seed: int = 0
    device: str = "cpu"
    #: Floating dtype of the model, the data and the loss inputs (a key of :data:`DTYPES`).
    dtype: str = "float32"
    #: Base loss weights (e.g. from a config file); the schedule's presets are
    #: rescaled to them (:meth:`TrainingSchedule.from_base`). None: the seed's presets.
    base_weights: Optional[LossWeights] = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def schedule(self) -> TrainingSchedule:
        if self.base_weights is None:
            return TrainingSchedule(self.epochs)
        return TrainingSchedule.from_base(self.base_weights, self.epochs)


@dataclasses.dataclass
class RunResult:
    """What one training run leaves: the monitor's rows (one per step), the
    seconds of the trained loss's forward+backward per step (and of the
    reference's on the same inputs, when it checked every step), the per-step
    ratios ``error / tolerance`` and their :class:`~.verify.Verdict` (None
    without a reference), the final smoothing alphas and the wall time."""

    name: str
    rows: list[dict[str, Any]]
    loss_seconds: list[float]
    reference_seconds: list[float]
    ratios: list[list[float]]
    verdict: Optional[Verdict]
    alpha: torch.Tensor
    wall_seconds: float

    def column(self, key: str) -> torch.Tensor:
        """One value per step (a term name or ``"total"``) as a float64 tensor."""
        return torch.tensor([row[key] for row in self.rows], dtype=torch.float64)


class _LossTimer:
    """Times the loss part of each step: wall clock on the CPU, CUDA events on
    a GPU (read at the end, so timing adds no synchronisation per step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._cpu: list[float] = []
        self._events: list[tuple[Any, Any]] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._cpu.append(time.perf_counter() - self._start)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self._events]
        return list(self._cpu)


def _loss_and_grads(loss_fn: nn.Module, pred: torch.Tensor, raw: torch.Tensor, target: torch.Tensor,
                    prev: Optional[torch.Tensor], continuity: torch.Tensor, timer: _LossTimer) -> StepResult:
    """``loss_fn``'s total, terms and gradients w.r.t. fresh leaf copies of ``pred`` and ``raw``, timed."""
    pred_in = pred.detach().requires_grad_()
    raw_in = raw.detach().requires_grad_()
    timer.start()
    total = loss_fn(pred_in, target, prev=prev, raw=raw_in, continuity=continuity)
    grad_pred, grad_raw = torch.autograd.grad(total, (pred_in, raw_in))
    timer.stop()
    return StepResult(loss_fn.last_terms, total.detach(), grad_pred, grad_raw)


def train(
    cfg: DemoConfig,
    loss_fn: nn.Module,
    corpus: list[SyntheticFile],
    *,
    reference: Optional[nn.Module] = None,
    name: str = "",
    expected_total: Optional[Mapping[str, tuple[float, float]]] = None,
    on_step: Optional[Callable[[], None]] = None,
    on_epoch: Optional[Callable[[list[dict[str, Any]]], None]] = None,
    csv: Optional[Union[str, os.PathLike]] = None,
) -> RunResult:
    """Train a fresh model (seeded by ``cfg.seed``) on ``corpus`` with ``loss_fn``.

    Args:
        loss_fn: the loss the model trains on (a module with assignable
            ``weights`` and ``last_terms``, e.g. :class:`~koemorph_fused.FusedKoeMorphLoss`).
        reference: if given (e.g. :class:`~koemorph_fused.reference.KoeMorphTemporalLoss`),
            evaluated at every step on the same outputs and compared with
            ``loss_fn`` (the run's :attr:`RunResult.verdict`); it gets the same
            weights as ``loss_fn`` and never trains anything.
        expected_total: ``{phase name: (low, high)}`` for the monitor's
            ``outside_expected`` flag; None uses the schedule's (the seed's) ranges.
        on_step, on_epoch: called after every step, and after every epoch with
            that epoch's monitor rows (e.g. to drive a progress bar).
        csv: a run CSV for the monitor's rows (``LossMonitor(csv=...)``: one
            row per step, written at the end of each epoch), which
            ``koemorph-fused plot`` draws.
    """
    wall = time.perf_counter()
    device = torch.device(cfg.device)
    dtype = cfg.torch_dtype
    torch.manual_seed(cfg.seed)
    n_features = corpus[0].features.shape[1]
    n_blendshapes = corpus[0].blendshapes.shape[1]
    model = TemporalBlendshapeModel(n_features, n_blendshapes, hidden=cfg.hidden, downsample=cfg.downsample
                                    ).to(device, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = loss_fn.to(device)
    if reference is not None:
        reference = reference.to(device)
    streams = WindowStreams(corpus, cfg.batch, window=WINDOW, seed=cfg.seed, device=device, dtype=dtype)
    schedule = cfg.schedule()
    monitor = LossMonitor(csv=csv)
    checker = StepChecker()
    timer, reference_timer = _LossTimer(device), _LossTimer(device)
    rows: list[dict[str, Any]] = []

    prev: Optional[torch.Tensor] = None
    prev_file: Optional[torch.Tensor] = None
    try:
        for epoch in range(cfg.epochs):
            phase = schedule.at(epoch)
            loss_fn.weights = phase.weights
            if reference is not None:
                reference.weights = phase.weights
            expected = None if expected_total is None else expected_total.get(phase.name)
            for _ in range(cfg.steps_per_epoch):
                batch = streams.next(phase.stride)
                continuity = continuity_mask(batch.file_index, prev_file)
                out = model(batch.features, prev, continuity)
                pred, raw = out["blendshapes"], out["raw"]
                target = batch.target_seq[:, -1, :]  # the window's last frame, a strided view

                trained = _loss_and_grads(loss_fn, pred, raw, target, prev, continuity, timer)
                if reference is not None:
                    checked = _loss_and_grads(reference, pred, raw, target, prev, continuity, reference_timer)
                    checker.compare(trained, checked, pred)

                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward((pred, raw), (trained.grad_pred, trained.grad_raw))
                optimizer.step()

                monitor.record((trained.total, trained.terms), stride=phase.stride,
                               file_transition=~continuity.all(), phase=phase, expected_total=expected)
                prev, prev_file = pred.detach(), batch.file_index
                if on_step is not None:
                    on_step()
            epoch_rows = monitor.flush()  # monitor and checker read back once per epoch
            checker.flush()
            rows.extend(epoch_rows)
            if on_epoch is not None:
                on_epoch(epoch_rows)
    finally:
        monitor.close()  # the run CSV, if any
    alpha = model.smoothing.alpha.detach().float().cpu()
    result_verdict = None if reference is None else verdict(checker.ratios, checker.dtype_errors, checker.tolerance)
    return RunResult(name, rows, timer.seconds(), reference_timer.seconds(), checker.ratios, result_verdict,
                     alpha, time.perf_counter() - wall)


def demo_run(
    cfg: DemoConfig,
    corpus: list[SyntheticFile],
    *,
    loss_fn: Optional[nn.Module] = None,
    on_step: Optional[Callable[[], None]] = None,
    on_epoch: Optional[Callable[[list[dict[str, Any]]], None]] = None,
    csv: Optional[Union[str, os.PathLike]] = None,
) -> RunResult:
    """What ``koemorph-fused demo`` runs (and ``bench/demo_matrix.py`` checks):
    train on ``loss_fn`` (default: a new :class:`~koemorph_fused.FusedKoeMorphLoss`
    with the demo's named :data:`GROUPS`), with
    :class:`~koemorph_fused.reference.KoeMorphTemporalLoss` (the same groups)
    checking every step, and the demo's calibrated :data:`EXPECTED_TOTAL` ranges.

    Raises:
        ValueError: ``loss_fn`` has other perceptual groups than :data:`GROUPS`
            (the check would then compare two different losses).
    """
    if loss_fn is None:
        loss_fn = FusedKoeMorphLoss(**GROUPS._asdict())
    for key, columns in GROUPS._asdict().items():
        given = getattr(loss_fn, key, columns)
        if tuple(given) != columns:
            raise ValueError(f"loss_fn.{key} is {tuple(given)}, the demo's reference uses {columns} "
                             "(build the loss with **GROUPS._asdict())")
    return train(cfg, loss_fn, corpus, name="fused", reference=KoeMorphTemporalLoss(**GROUPS._asdict()),
                 expected_total=EXPECTED_TOTAL, on_step=on_step, on_epoch=on_epoch, csv=csv)


__all__ = ["CALIBRATION_NOTE", "DTYPES", "DemoConfig", "EXPECTED_TOTAL", "GROUPS", "GROUPS_NOTE", "RunResult",
           "demo_run", "train"]
