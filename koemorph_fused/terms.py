"""Names of the loss terms, the seed's positional column groups, and the
result types of :func:`koemorph_fused.temporal_loss` and
:func:`koemorph_fused.sequence_loss`."""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Order of the unweighted terms in ``LossOutput.terms`` (and of the weights).
TERM_NAMES: tuple[str, ...] = ("mse", "l1", "perceptual", "temporal", "smoothing")

#: Order of the six terms of the sequence loss (``SequenceLossOutput.terms``,
#: ``counts`` and the weights): the five above, then the velocity term.
SEQUENCE_TERM_NAMES: tuple[str, ...] = TERM_NAMES + ("velocity",)

#: The seed's "mouth" group (the mel stream's columns): columns 12..21 by
#: position, whatever the data's column order. In the ARKit / KoeMorph order
#: these are eyeSquintRight, eyeWideRight, jawForward, jawLeft, jawRight,
#: jawOpen, mouthClose, mouthFunnel, mouthPucker, mouthLeft (Live Link Face:
#: jawRight, jawLeft and mouthRight instead); to weight the jaw and mouth shapes
#: by name, pass ``mouth_indices=("jaw*", "mouth*"), layout=...`` (see
#: :mod:`koemorph_fused.blendshapes`).
MOUTH_INDICES: tuple[int, ...] = tuple(range(12, 22))

#: The seed's "expression" group (the emotion stream's columns): columns 0..9
#: by position. In the ARKit, KoeMorph and Live Link Face orders these are ten
#: eye shapes (eyeBlinkLeft ... eyeWideLeft, eyeBlinkRight, eyeLookDownRight,
#: eyeLookInRight), no brows; by name: ``expression_indices=("brow*", "eye*",
#: "cheek*", "nose*"), layout=...``.
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


class SequenceLossOutput(NamedTuple):
    """What :func:`koemorph_fused.sequence_loss` returns.

    Attributes:
        total: the weighted sum of the terms: 0-dim for ``reduction="mean"``
            and ``"sum"``, ``(B, T)`` per frame for ``"none"`` (float32 for
            float16/bfloat16 inputs, else the input dtype). Differentiable.
        terms: the six unweighted terms in :data:`SEQUENCE_TERM_NAMES` order:
            ``(6,)``, or ``(B, T, 6)`` per frame for ``"none"`` (0 where a
            frame is not counted); same dtype as ``total``; not differentiable.
        counts: ``(6,)`` int64, how many frames (mse, l1, perceptual,
            smoothing) or frame pairs (temporal, velocity) this call counted.
    """

    total: torch.Tensor
    terms: torch.Tensor
    counts: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """``{"mse": ..., "velocity": ..., "total": ...}`` as Python floats
        (``reduction="mean"`` or ``"sum"``); one copy from the device for all seven."""
        if self.terms.dim() != 1:
            raise ValueError(
                "as_dict() needs a reduced output (reduction='mean' or 'sum'); "
                f"this one holds per-frame terms of shape {tuple(self.terms.shape)}"
            )
        values = torch.cat([self.terms.detach(), self.total.detach().reshape(1)]).tolist()
        return dict(zip(SEQUENCE_TERM_NAMES + ("total",), values))
