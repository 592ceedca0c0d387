"""``koemorph-fused demo --sequence``: the demo on windows of frames, trained
with :class:`~koemorph_fused.FusedKoeMorphSequenceLoss` and checked at every
step against :class:`~koemorph_fused.reference.KoeMorphSequenceLoss` on the
same model outputs.

Per step, every stream's next window of ``window`` frames of its file
(:class:`SequenceWindows`): windows follow each other without overlap, the
last window of a file is padded (``lengths``), and the stream then moves on
to the next file. The model (:class:`SequenceBlendshapeModel`) predicts every
frame of the window; between windows of the same file it carries its GRU
state, and the loss gets the previous window's last real frame as ``prev``
(prediction) and ``prev_target`` (target), detached. A window that starts a
file, or a stream's first window, gets ``continuity = 0``.

The epoch's phase of the seed's schedule gives the five weights, as in the row
demo; the velocity weight stays ``velocity_weight``. The fused loss and the
reference get fresh detached copies of the same ``pred`` and ``raw``: their
six terms, total, gradients and counts are compared (:mod:`.verify`, with the
sequence tolerances and the velocity term's floors); the model trains on the
fused loss's gradients.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..modules import FusedKoeMorphSequenceLoss
from ..reference import KoeMorphSequenceLoss
from ..sequence import frame_sets
from ..terms import SEQUENCE_TERM_NAMES
from .data import SyntheticFile, _seeds
from .train import GROUPS, DemoConfig, RunResult, _LossTimer
from .verify import SEQUENCE_QUANTITIES, StepChecker, StepResult, Tolerance, velocity_floors, verdict

#: Frames per window of the sequence demo, and its velocity weight.
SEQUENCE_WINDOW = 64
VELOCITY_WEIGHT = 0.5


@dataclasses.dataclass
class FrameWindows:
    """One step's windows: ``features (B, T, F)``, ``target (B, T, C)`` (zero
    after ``lengths[b]``), ``lengths (B,)`` int64 and ``continues (B,)`` bool
    (the window continues the stream's previous one, in the same file)."""

    features: torch.Tensor
    target: torch.Tensor
    lengths: torch.Tensor
    continues: torch.Tensor


class SequenceWindows:
    """``batch`` streams, each reading files window after window.

    Stream ``b`` starts in file ``b % len(corpus)`` at a seeded frame (its
    first window continues nothing). A window holds the next ``window`` frames
    of the stream's file, or fewer at the file's end (then padded with zeros);
    after the file's last frame the stream moves on to the first frame of the
    next file."""

    def __init__(self, corpus: list[SyntheticFile], batch: int, *, window: int = SEQUENCE_WINDOW, seed: int = 0,
                 device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if batch < 1 or window < 1:
            raise ValueError(f"batch and window must be >= 1, got {batch}, {window}")
        self.corpus, self.batch, self.window = corpus, batch, window
        self.device, self.dtype = torch.device(device), dtype
        rng, _ = _seeds(seed, 3 * 10**6)
        self.file = [b % len(corpus) for b in range(batch)]
        self.pos = [rng.randrange(corpus[f].num_frames) for f in self.file]
        self._started = [False] * batch

    def next(self) -> FrameWindows:
        w, first = self.window, self.corpus[0]
        features = torch.zeros(self.batch, w, first.features.shape[1])
        target = torch.zeros(self.batch, w, first.blendshapes.shape[1])
        lengths, continues = [], []
        for b in range(self.batch):
            f = self.corpus[self.file[b]]
            start = self.pos[b]
            n = min(w, f.num_frames - start)
            features[b, :n], target[b, :n] = f.features[start:start + n], f.blendshapes[start:start + n]
            lengths.append(n)
            continues.append(self._started[b] and start > 0)
            self._started[b] = True
            self.pos[b] += n
            if self.pos[b] == f.num_frames:
                self.file[b], self.pos[b] = (self.file[b] + 1) % len(self.corpus), 0
        return FrameWindows(features.to(self.device, self.dtype), target.to(self.device, self.dtype),
                            torch.tensor(lengths, dtype=torch.int64, device=self.device),
                            torch.tensor(continues, dtype=torch.bool, device=self.device))


class SequenceBlendshapeModel(nn.Module):
    """Features ``(B, T, F)`` -> blendshapes for every frame ``(B, T, C)`` in [0, 1].

    A GRU over the frames (its state carried from the previous window of the
    same file), a linear head on the GRU output and the frame's features with
    a sigmoid (``raw``), then a learnable per-blendshape blend of each frame's
    ``raw`` with the previous frame's (``pred = (1 - alpha) raw[t] + alpha
    raw[t - 1]``; frame 0 blends with the previous window's last ``raw``, or
    with itself at the start of a file)."""

    def __init__(self, n_features: int = 32, n_blendshapes: int = 52, hidden: int = 64,
                 alpha_init: float = 0.3) -> None:
        super().__init__()
        if min(n_features, n_blendshapes, hidden) < 1:
            raise ValueError("n_features, n_blendshapes and hidden must be >= 1")
        if not 0.0 < alpha_init < 1.0:
            raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init!r}")
        self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden + n_features, n_blendshapes)
        logit = torch.log(torch.tensor(alpha_init / (1.0 - alpha_init)))
        self.logit = nn.Parameter(torch.full((n_blendshapes,), float(logit)))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def forward(self, features: torch.Tensor, state: torch.Tensor, last_raw: torch.Tensor,
                continues: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pred, raw, new GRU state)``; ``state`` ``(1, B, H)`` and
        ``last_raw`` ``(B, C)`` are reset where ``continues`` is False.
        Padded frames come last, so they change no real frame (causal)."""
        state = torch.where(continues.view(1, -1, 1), state, 0.0)
        out, state = self.gru(features, state)
        raw = torch.sigmoid(self.head(torch.cat([out, features], dim=-1)))
        first = torch.where(continues.unsqueeze(1), last_raw, raw[:, 0])
        before = torch.cat([first.unsqueeze(1), raw[:, :-1]], dim=1)
        alpha = self.alpha
        return (1.0 - alpha) * raw + alpha * before, raw, state


def _loss_and_grads(loss_fn: nn.Module, pred: torch.Tensor, raw: torch.Tensor, timer: _LossTimer,
                    **data: Any) -> StepResult:
    """``loss_fn``'s total, terms, counts and gradients w.r.t. fresh leaf copies of ``pred`` and ``raw``, timed."""
    pred_in, raw_in = pred.detach().requires_grad_(), raw.detach().requires_grad_()
    timer.start()
    total = loss_fn(pred_in, data.pop("target"), raw_in, **data)
    grad_pred, grad_raw = torch.autograd.grad(total, (pred_in, raw_in))
    timer.stop()
    return StepResult(loss_fn.last_terms, total.detach(), grad_pred, grad_raw, loss_fn.last_counts)


def sequence_run(
    cfg: DemoConfig,
    corpus: list[SyntheticFile],
    *,
    window: int = SEQUENCE_WINDOW,
    velocity_weight: float = VELOCITY_WEIGHT,
    loss_fn: Optional[nn.Module] = None,
    on_step: Optional[Callable[[], None]] = None,
    on_epoch: Optional[Callable[[list[dict[str, Any]]], None]] = None,
) -> RunResult:
    """What ``koemorph-fused demo --sequence`` runs: train a fresh
    :class:`SequenceBlendshapeModel` (seeded by ``cfg.seed``) on ``loss_fn``
    (default: a new :class:`~koemorph_fused.FusedKoeMorphSequenceLoss` with
    the demo's named :data:`~.train.GROUPS`), with the reference checking
    every step. ``cfg.batch`` streams of ``window``-frame windows; the rows
    carry the six terms, the total, the counts of valid frames and pairs and
    whether a window started a file (``file_transition``)."""
    wall = time.perf_counter()
    device, dtype = torch.device(cfg.device), cfg.torch_dtype
    if loss_fn is None:
        loss_fn = FusedKoeMorphSequenceLoss(velocity_weight=velocity_weight, **GROUPS._asdict())
    loss_fn.velocity_weight = velocity_weight
    reference = KoeMorphSequenceLoss(velocity_weight=velocity_weight, **GROUPS._asdict()).to(device)
    for key in ("mouth_indices", "expression_indices"):
        if tuple(getattr(loss_fn, key)) != tuple(getattr(reference, key)):
            raise ValueError(f"loss_fn.{key} is {tuple(getattr(loss_fn, key))}, the demo's reference uses "
                             f"{tuple(getattr(reference, key))} (build the loss with **GROUPS._asdict())")
    loss_fn = loss_fn.to(device)
    torch.manual_seed(cfg.seed)
    n_features, n_blendshapes = corpus[0].features.shape[1], corpus[0].blendshapes.shape[1]
    model = SequenceBlendshapeModel(n_features, n_blendshapes, hidden=cfg.hidden).to(device, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    streams = SequenceWindows(corpus, cfg.batch, window=window, seed=cfg.seed, device=device, dtype=dtype)
    schedule = cfg.schedule()
    checker = StepChecker(SEQUENCE_QUANTITIES)
    tolerance = Tolerance.for_sequence(dtype, cfg.batch * window, n_blendshapes)
    timer, reference_timer = _LossTimer(device), _LossTimer(device)
    rows: list[dict[str, Any]] = []

    state = torch.zeros(1, cfg.batch, cfg.hidden, device=device, dtype=dtype)
    last_raw = prev = prev_target = torch.zeros(cfg.batch, n_blendshapes, device=device, dtype=dtype)
    batch_index = torch.arange(cfg.batch, device=device)
    for epoch in range(cfg.epochs):
        phase = schedule.at(epoch)
        loss_fn.weights = reference.weights = phase.weights
        pending: list[torch.Tensor] = []
        for _ in range(cfg.steps_per_epoch):
            win = streams.next()
            pred, raw, state = model(win.features, state, last_raw, win.continues)
            data = dict(target=win.target, prev=prev, prev_target=prev_target, lengths=win.lengths,
                        continuity=win.continues)
            trained = _loss_and_grads(loss_fn, pred, raw, timer, **data)
            checked = _loss_and_grads(reference, pred, raw, reference_timer, **data)
            _, _, pairs = frame_sets(cfg.batch, window, lengths=win.lengths, continuity=win.continues,
                                     with_prev=True, with_prev_target=True, device=device)
            floor, scale = velocity_floors(pred, win.target, prev, prev_target, pairs, velocity_weight,
                                           checked.counts[5], tolerance)
            value_floor = torch.cat([torch.zeros(5, dtype=floor.dtype, device=device), floor.reshape(1),
                                     (velocity_weight * floor).reshape(1)])
            checker.compare(trained, checked, pred, tolerance=tolerance, value_floor=value_floor,
                            gradient_scale=scale)

            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward((pred, raw), (trained.grad_pred, trained.grad_raw))
            optimizer.step()

            pending.append(torch.cat([trained.terms.to(torch.float64), trained.total.to(torch.float64).reshape(1),
                                      trained.counts[[0, 3]].to(torch.float64),
                                      (~win.continues).any().to(torch.float64).reshape(1)]))
            # The stream's next window continues from this one's last real frame (detached).
            last = (win.lengths - 1).clamp_min(0)
            prev, prev_target = pred[batch_index, last].detach(), win.target[batch_index, last]
            last_raw, state = raw[batch_index, last].detach(), state.detach()
            if on_step is not None:
                on_step()
        epoch_rows = []
        for values in torch.stack(pending).tolist():  # one read-back per epoch
            row = dict(zip(SEQUENCE_TERM_NAMES + ("total", "frames", "pairs"), values))
            row.update(epoch=epoch, phase=phase.name, stride=window, file_transition=bool(values[-1]))
            epoch_rows.append(row)
        checker.flush()
        rows.extend(epoch_rows)
        if on_epoch is not None:
            on_epoch(epoch_rows)

    alpha = model.alpha.detach().float().cpu()
    result_verdict = verdict(checker.ratios, checker.dtype_errors, checker.tolerance, SEQUENCE_QUANTITIES)
    return RunResult("fused", rows, timer.seconds(), reference_timer.seconds(), checker.ratios, result_verdict,
                     alpha, time.perf_counter() - wall)


__all__ = ["FrameWindows", "SEQUENCE_WINDOW", "SequenceBlendshapeModel", "SequenceWindows", "VELOCITY_WEIGHT",
           "sequence_run"]
