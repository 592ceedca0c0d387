"""The KoeMorph losses in plain PyTorch (rows: :func:`temporal_loss`; windows
of frames: :func:`sequence_loss`): the reference the fused kernels are tested
against, term by term and gradient by gradient.

Same signatures, outputs and argument checks as the fused API. Written for
clarity, not speed: every term is a separate chain of eager ops, as in the
seed's ``src/model/losses.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .blendshapes import Layout, check_width, resolve
from ._validation import check_counts, check_inputs, check_reduction, check_sequence_inputs, normalize_indices
from .functional import Continuity, Weights
from .modules import KoeMorphLossModule, KoeMorphSequenceLossModule
from .sequence import SequenceContinuity, frame_sets
from .terms import EXPRESSION_INDICES, MOUTH_INDICES, LossOutput, SequenceLossOutput
from .weights import DEFAULT, check_velocity_weight, resolve_weights

__all__ = ["temporal_loss", "KoeMorphTemporalLoss", "sequence_loss", "KoeMorphSequenceLoss"]


def temporal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    prev: Optional[torch.Tensor] = None,
    raw: Optional[torch.Tensor] = None,
    *,
    continuity: Continuity = None,
    weights: Weights = DEFAULT,
    mouth_indices: Sequence[int] = MOUTH_INDICES,
    expression_indices: Sequence[int] = EXPRESSION_INDICES,
    layout: Optional[Layout] = None,
) -> LossOutput:
    """Reference implementation of :func:`koemorph_fused.temporal_loss` (same
    arguments and result)."""
    w = resolve_weights(weights)
    mouth_indices = resolve(mouth_indices, layout, argument="mouth_indices")
    expression_indices = resolve(expression_indices, layout, argument="expression_indices")
    check_width(layout, pred)
    pred, target, prev, raw, mask = check_inputs(pred, target, prev, raw, continuity)
    cols = pred.shape[-1]
    mouth = normalize_indices("mouth_indices", mouth_indices, cols)
    expression = normalize_indices("expression_indices", expression_indices, cols)

    # float16/bfloat16 are computed in float32 (the fused kernel accumulates in float32).
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p, t = pred.to(acc), target.to(acc)
    zero = p.new_zeros(())

    mse = F.mse_loss(p, t)
    l1 = F.l1_loss(p, t)

    def group_mse(idx: tuple[int, ...]) -> torch.Tensor:
        return F.mse_loss(p[..., list(idx)], t[..., list(idx)]) if idx else zero

    perceptual = group_mse(mouth) + group_mse(expression)

    if prev is None:
        temporal = zero
    else:
        sq = (p - prev.detach().to(acc)) ** 2
        if mask is None:
            temporal = sq.mean()
        else:
            m = mask.to(acc)
            m_sum = m.sum()
            # An all-zero mask gives 0, not 0/0 (and no NaN in the gradient).
            denom = cols * torch.where(m_sum > 0, m_sum, torch.ones_like(m_sum))
            temporal = (m.unsqueeze(-1) * sq).sum() / denom

    smoothing = zero if raw is None else F.l1_loss(p, raw.to(acc))

    values = (mse, l1, perceptual, temporal, smoothing)
    total = zero
    for weight, term in zip(w.as_tuple(), values):
        if weight > 0:  # a weight of 0 removes the term (0 * NaN stays out)
            total = total + weight * term
    if not total.requires_grad:
        # No weighted term depends on the inputs: total is constant, but stays
        # in the graph with zero gradients, as the fused loss's does; where()
        # keeps NaN inputs out of those zeros.
        inputs = p.sum() + t.sum() + (raw.sum() if raw is not None else 0)
        total = torch.where(torch.zeros((), dtype=torch.bool, device=p.device), inputs, total)
    return LossOutput(total, torch.stack(values).detach())


class KoeMorphTemporalLoss(KoeMorphLossModule):
    """:class:`koemorph_fused.FusedKoeMorphLoss` in plain PyTorch."""

    _loss_function = staticmethod(temporal_loss)



def sequence_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw: Optional[torch.Tensor] = None,
    *,
    prev: Optional[torch.Tensor] = None,
    prev_target: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    continuity: SequenceContinuity = None,
    weights: Weights = DEFAULT,
    velocity_weight: float = 0.0,
    reduction: str = "mean",
    counts: Union[None, torch.Tensor, Sequence[float]] = None,
    mouth_indices: Sequence[int] = MOUTH_INDICES,
    expression_indices: Sequence[int] = EXPRESSION_INDICES,
    layout: Optional[Layout] = None,
) -> SequenceLossOutput:
    """Reference implementation of :func:`koemorph_fused.sequence_loss` (same
    arguments, checks and result), in eager PyTorch: the previous frame is a
    shifted copy, each term a separate chain of ops."""
    w = resolve_weights(weights).as_tuple() + (check_velocity_weight(velocity_weight),)
    mouth_indices = resolve(mouth_indices, layout, argument="mouth_indices")
    expression_indices = resolve(expression_indices, layout, argument="expression_indices")
    check_width(layout, pred)
    s = check_sequence_inputs(pred, target, raw, prev, prev_target, lengths, mask, continuity)
    check_reduction(reduction)
    given_counts = check_counts(counts, reduction, s.pred.device)
    batch, frames, cols = s.pred.shape
    mouth = normalize_indices("mouth_indices", mouth_indices, cols)
    expression = normalize_indices("expression_indices", expression_indices, cols)

    acc = torch.float64 if s.pred.dtype == torch.float64 else torch.float32
    valid, pairs, velocity_pairs = frame_sets(
        batch, frames, lengths=s.lengths, mask=s.mask, continuity=s.continuity,
        with_prev=s.prev is not None, with_prev_target=s.prev_target is not None, device=s.pred.device)

    # Frames outside V are replaced by 0 before any arithmetic, so that a NaN
    # in padding reaches neither a term nor a gradient (not even as 0 * NaN).
    def frames_of(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid.unsqueeze(-1), x.to(acc), 0.0)

    p, t = frames_of(s.pred), frames_of(s.target)
    zero = p.new_zeros((batch, frames))
    d = p - t
    mse = (d ** 2).mean(-1)
    l1 = d.abs().mean(-1)

    def group_mse(idx: tuple[int, ...]) -> torch.Tensor:
        return (d[..., list(idx)] ** 2).mean(-1) if idx else zero

    perceptual = group_mse(mouth) + group_mse(expression)
    smoothing = zero if s.raw is None else (p - frames_of(s.raw)).abs().mean(-1)

    # The previous frame of every frame in `pairs`: frame t - 1, or prev for
    # t = 0; 0 for every other frame, before any arithmetic, as for padding:
    # a previous frame that is not paired (a file boundary, an unused prev)
    # reaches neither a term nor a gradient.
    def previous(x: torch.Tensor, first: Optional[torch.Tensor], pairs: torch.Tensor) -> torch.Tensor:
        head = p.new_zeros((batch, 1, cols)) if first is None else first.to(acc).unsqueeze(1)
        shifted = torch.cat([head, x[:, :-1]], dim=1)[:, :frames]
        return torch.where(pairs.unsqueeze(-1), shifted, 0.0)

    temporal = ((p - previous(p, s.prev, pairs).detach()) ** 2).mean(-1)
    velocity = (((p - previous(p, s.prev, velocity_pairs))
                 - (t - previous(t, s.prev_target, velocity_pairs))) ** 2).mean(-1)

    per_frame = [
        torch.where(valid, mse, 0.0),
        torch.where(valid, l1, 0.0),
        torch.where(valid, perceptual, 0.0),
        torch.where(pairs, temporal, 0.0),
        torch.where(valid, smoothing, 0.0),
        torch.where(velocity_pairs, velocity, 0.0),
    ]
    n_valid = valid.sum()
    this_counts = torch.stack([n_valid, n_valid, n_valid, pairs.sum(),
                               n_valid if s.raw is not None else torch.zeros_like(n_valid),
                               velocity_pairs.sum()]).to(torch.int64)
    divisor = (this_counts if given_counts is None else given_counts).to(acc).clamp(min=1)

    def reduced(x: torch.Tensor, k: int) -> torch.Tensor:
        if reduction == "none":
            return x
        return x.sum() / divisor[k] if reduction == "mean" else x.sum()

    terms = torch.stack([reduced(x, k) for k, x in enumerate(per_frame)], dim=-1)
    total = zero if reduction == "none" else zero.sum()
    for k, weight in enumerate(w):
        # A weight of 0 removes the term, and the total is built from the
        # term itself, not a slice of `terms`: no zero gradient reaches it,
        # which its square would turn into NaN where it is infinite (0 * inf).
        if weight > 0:
            total = total + weight * reduced(per_frame[k], k)
    if not total.requires_grad:
        # As in temporal_loss: the total stays in the graph, with zero gradients.
        inputs = p.sum() + t.sum() + (s.raw.sum() if s.raw is not None else 0)
        total = torch.where(torch.zeros((), dtype=torch.bool, device=p.device), inputs, total)
    return SequenceLossOutput(total, terms.detach(), this_counts)


class KoeMorphSequenceLoss(KoeMorphSequenceLossModule):
    """:class:`koemorph_fused.FusedKoeMorphSequenceLoss` in plain PyTorch."""

    _loss_function = staticmethod(sequence_loss)
