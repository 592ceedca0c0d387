"""Names of the five loss terms, the default ARKit index groups, and the
result type of :func:`koemorph_fused.temporal_loss`."""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Order of the unweighted terms in ``LossOutput.terms`` (and of the weights).
TERM_NAMES: tuple[str, ...] = ("mse", "l1", "perceptual", "temporal", "smoothing")

#: ARKit mouth / jaw blendshapes driven by the mel stream (jawOpen, mouth*): columns 12..21.
MOUTH_INDICES: tuple[int, ...] = tuple(range(12, 22))

#: ARKit brow / eye blendshapes driven by the emotion stream: columns 0..9.
EXPRESSION_INDICES: tuple[int, ...] = tuple(range(0, 10))


class LossOutput(NamedTuple):
    """What :func:`koemorph_fused.temporal_loss` returns.

    Attributes:
        total: 0-dim tensor, the weighted sum of the terms (float32 for
            float16/bfloat16 inputs, else the input dtype). Differentiable.
        terms: 1-D tensor of the five unweighted terms in :data:`TERM_NAMES`
            order, same dtype as ``total``; not differentiable.
    """

    total: torch.Tensor
    terms: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """``{"mse": ..., "smoothing": ..., "total": ...}`` as Python floats.
        The one place that synchronises with the device (one copy for all six)."""
        values = torch.cat([self.terms.detach(), self.total.detach().reshape(1)]).tolist()
        return dict(zip(TERM_NAMES + ("total",), values))
