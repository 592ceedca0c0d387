"""The demo's training loop: sequential, stride-scheduled training of
:class:`~koemorph_fused.demo.model.TemporalBlendshapeModel` with a KoeMorph loss
module (the fused one or the reference), as in the seed's
``SequentialTrainer.train_step``.

Per epoch: the schedule's phase gives the stride and the loss weights
(``loss_fn.weights = phase.weights``: the fused module copies them into its
weight buffer in place, so nothing is recompiled). Per step:

1. every stream's next 256-frame window (advanced by the stride);
2. ``continuity = continuity_mask(file_index, prev_file_index)``: rows whose
   stream moved on to a new file reset the smoothing and drop out of the
   temporal term;
3. ``pred, raw = model(features, prev, continuity)``;
4. the loss on ``target_seq[:, -1, :]`` (a strided view), with ``prev`` (the
   previous step's prediction, detached) and ``raw``; the loss runs on detached
   copies of ``pred`` and ``raw`` so that its forward and backward can be timed
   on their own, and its gradients are then pushed through the model
   (the same gradients as one ``total.backward()``);
5. Adam; the monitor records the step (device tensors, no synchronisation);
   it is flushed once per epoch.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..continuity import continuity_mask
from ..monitor import LossMonitor
from ..schedule import TrainingSchedule
from ..weights import LossWeights
from .data import WINDOW, SyntheticFile, WindowStreams
from .model import TemporalBlendshapeModel


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of one demo training run."""

    epochs: int = 12
    steps_per_epoch: int = 20
    batch: int = 16
    hidden: int = 64
    downsample: int = 8
    lr: float = 3e-3
    seed: int = 0
    device: str = "cpu"
    #: Floating dtype of the model and the data ("float32" or "float64").
    dtype: str = "float32"
    #: Base loss weights (e.g. from a config file); the schedule's presets are
    #: rescaled to them (:meth:`TrainingSchedule.from_base`). None: the seed's presets.
    base_weights: Optional[LossWeights] = None

    def schedule(self) -> TrainingSchedule:
        if self.base_weights is None:
            return TrainingSchedule(self.epochs)
        return TrainingSchedule.from_base(self.base_weights, self.epochs)


@dataclasses.dataclass
class RunResult:
    """What one training run leaves: the monitor's rows (one per step), the
    seconds of the loss forward+backward per step, the final smoothing alphas
    and the wall time of the run."""

    name: str
    rows: list[dict[str, Any]]
    loss_seconds: list[float]
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


def train(
    cfg: DemoConfig,
    loss_fn: nn.Module,
    corpus: list[SyntheticFile],
    *,
    name: str = "",
    on_step: Optional[Callable[[], None]] = None,
    on_epoch: Optional[Callable[[list[dict[str, Any]]], None]] = None,
) -> RunResult:
    """Train a fresh model (seeded by ``cfg.seed``) on ``corpus`` with ``loss_fn``.

    ``on_step()`` is called after every step and ``on_epoch(rows)`` after every
    epoch with that epoch's monitor rows (e.g. to drive a progress bar).
    """
    wall = time.perf_counter()
    device = torch.device(cfg.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    torch.manual_seed(cfg.seed)
    n_features = corpus[0].features.shape[1]
    n_blendshapes = corpus[0].blendshapes.shape[1]
    model = TemporalBlendshapeModel(n_features, n_blendshapes, hidden=cfg.hidden, downsample=cfg.downsample
                                    ).to(device, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = loss_fn.to(device)
    streams = WindowStreams(corpus, cfg.batch, window=WINDOW, seed=cfg.seed, device=device, dtype=dtype)
    schedule = cfg.schedule()
    monitor = LossMonitor()
    timer = _LossTimer(device)
    rows: list[dict[str, Any]] = []

    prev: Optional[torch.Tensor] = None
    prev_file: Optional[torch.Tensor] = None
    for epoch in range(cfg.epochs):
        phase = schedule.at(epoch)
        loss_fn.weights = phase.weights
        for _ in range(cfg.steps_per_epoch):
            batch = streams.next(phase.stride)
            continuity = continuity_mask(batch.file_index, prev_file)
            out = model(batch.features, prev, continuity)
            pred, raw = out["blendshapes"], out["raw"]
            target = batch.target_seq[:, -1, :]  # the window's last frame, a strided view

            pred_in = pred.detach().requires_grad_()
            raw_in = raw.detach().requires_grad_()
            timer.start()
            total = loss_fn(pred_in, target, prev=prev, raw=raw_in, continuity=continuity)
            grad_pred, grad_raw = torch.autograd.grad(total, (pred_in, raw_in))
            timer.stop()

            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward((pred, raw), (grad_pred, grad_raw))
            optimizer.step()

            monitor.record(loss_fn, total=total, stride=phase.stride,
                           file_transition=~continuity.all(), phase=phase)
            prev, prev_file = pred.detach(), batch.file_index
            if on_step is not None:
                on_step()
        epoch_rows = monitor.flush()  # the one synchronisation of the epoch
        rows.extend(epoch_rows)
        if on_epoch is not None:
            on_epoch(epoch_rows)

    alpha = model.smoothing.alpha.detach().cpu()
    return RunResult(name, rows, timer.seconds(), alpha, time.perf_counter() - wall)


__all__ = ["DemoConfig", "RunResult", "train"]
