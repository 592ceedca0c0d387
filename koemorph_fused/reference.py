"""The KoeMorph temporal loss in plain PyTorch: the reference the fused kernel
is tested against, term by term and gradient by gradient.

Same signatures, outputs and argument checks as the fused API. Written for
clarity, not speed: every term is a separate chain of eager ops, as in the
seed's ``src/model/losses.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from .blendshapes import Layout, check_width, resolve
from ._validation import check_inputs, normalize_indices
from .functional import Continuity, Weights
from .modules import KoeMorphLossModule
from .terms import EXPRESSION_INDICES, MOUTH_INDICES, LossOutput
from .weights import DEFAULT, resolve_weights

__all__ = ["temporal_loss", "KoeMorphTemporalLoss"]


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

