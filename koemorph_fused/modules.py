"""``nn.Module`` front ends of the loss: :class:`FusedKoeMorphLoss` for rows,
:class:`FusedKoeMorphSequenceLoss` for windows of frames (and, in
:mod:`koemorph_fused.reference`, the same modules in plain PyTorch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn

from .blendshapes import Layout, check_width, resolve
from ._validation import check_reduction
from .functional import Continuity, fused_temporal_loss, temporal_loss
from .sequence import SequenceContinuity, fused_sequence_loss, sequence_loss, sequence_weight_tensor
from .terms import EXPRESSION_INDICES, MOUTH_INDICES, LossOutput, SequenceLossOutput
from .weights import LossWeights, check_velocity_weight, resolve_weights


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _index_tuple(indices: Any) -> Any:
    """The module's own copy of an index group, checked on every call like
    any argument: a tuple (a 1-D integer tensor gives its values; a bool or
    uint8 mask, which needs C to be read, and any other tensor are kept for
    the check)."""
    if isinstance(indices, torch.Tensor):
        if indices.dim() == 1 and indices.dtype not in (torch.bool, torch.uint8):
            return tuple(indices.tolist())
        return indices.detach().clone()
    return tuple(indices)


class KoeMorphLossModule(nn.Module):
    """Shared body of the fused and the reference loss modules."""

    _loss_function: Callable[..., LossOutput]

    def __init__(
        self,
        mse_weight: float = 1.0,
        l1_weight: float = 0.1,
        perceptual_weight: float = 0.5,
        temporal_weight: float = 0.2,
        smoothing_weight: float = 0.1,
        mouth_indices: Sequence[int] = MOUTH_INDICES,
        expression_indices: Sequence[int] = EXPRESSION_INDICES,
        layout: Optional[Layout] = None,
    ) -> None:
        super().__init__()
        self.weights = LossWeights(mse_weight, l1_weight, perceptual_weight, temporal_weight, smoothing_weight)
        # Names and patterns (with layout=) become column numbers here, once;
        # a generator is read once, an index tensor becomes its ints.
        self.mouth_indices = _index_tuple(resolve(mouth_indices, layout, argument="mouth_indices"))
        self.expression_indices = _index_tuple(resolve(expression_indices, layout, argument="expression_indices"))
        # Checked against each call's C: a layout names every column of the data.
        self._layout = layout if layout is None or isinstance(layout, str) else tuple(layout)
        #: The five unweighted terms of the last call, detached (None before the first call).
        self.last_terms: Optional[torch.Tensor] = None

    @property
    def weights(self) -> LossWeights:
        """The term weights; assign a :class:`LossWeights` or a ``*_weight``
        mapping between steps (e.g. from a :class:`TrainingSchedule`)."""
        return self._weights

    @weights.setter
    def weights(self, value: "LossWeights | Mapping[str, Any]") -> None:
        self._weights = resolve_weights(value)

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        prev: Optional[torch.Tensor] = None,
        raw: Optional[torch.Tensor] = None,
        continuity: Continuity = None,
    ) -> torch.Tensor:
        """The weighted total (0-dim); the terms are kept in :attr:`last_terms`."""
        check_width(self._layout, pred)
        out = self._loss(pred, target, prev, raw, continuity)
        if not _is_exporting():  # an exported program has no place for module state
            self.last_terms = out.terms.detach()
        return out.total

    def _loss(self, pred, target, prev, raw, continuity) -> LossOutput:
        return type(self)._loss_function(
            pred,
            target,
            prev,
            raw,
            continuity=continuity,
            weights=self._weights,
            mouth_indices=self.mouth_indices,
            expression_indices=self.expression_indices,
        )

    def extra_repr(self) -> str:
        w = self._weights
        return (
            f"mse_weight={w.mse}, l1_weight={w.l1}, perceptual_weight={w.perceptual}, "
            f"temporal_weight={w.temporal}, smoothing_weight={w.smoothing}"
        )


class _FusedWeightBuffer(nn.Module):
    """The fused modules' weights as a float64 buffer ``weight_values`` that
    moves with the module and is updated in place when the weights are
    assigned, so a schedule that changes them every epoch never makes
    torch.compile recompile, and a CUDA graph reads the current values."""

    def _weight_vector(self) -> torch.Tensor:
        """The current weights as a float64 CPU tensor, in the operator's order."""
        raise NotImplementedError

    def _store_weights(self) -> None:
        """Called whenever the weights are assigned (the first time from
        __init__). Values equal to the ones last written are not written
        again: a write bumps the buffer's version counter, and a backward
        that reads the weights again (create_graph; the sequence loss's
        reduction "none") would take it for a change and raise."""
        vector = self._weight_vector()
        if "weight_values" in self._buffers:
            if torch.equal(vector, self._written_weights):  # both on the CPU: no device sync
                return
            with torch.no_grad():
                self.weight_values.copy_(vector)
        else:
            self.register_buffer("weight_values", vector.clone(), persistent=False)
        self._written_weights = vector

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.half()``, ...: the weight buffer follows
        the module's device but stays float64 with the exact weight values,
        whatever dtype the module is cast to."""
        before = self._buffers["weight_values"]
        super()._apply(fn, *args, **kwargs)
        after = self._buffers["weight_values"]
        # A no-op .to() keeps the very tensor (a captured CUDA graph reads it);
        # anything that made a new one (a move, a cast, to_empty's
        # uninitialized memory) gets a private float64 copy of the exact values.
        if after is not before:
            self._buffers["weight_values"] = self._weight_vector().to(after.device, copy=True)
        return self


class FusedKoeMorphLoss(_FusedWeightBuffer, KoeMorphLossModule):
    """Drop-in KoeMorph training loss backed by the fused kernel.

    The weights live in a (5,) buffer that moves with the module
    (``.to(device)``) and is updated in place when :attr:`weights` is
    assigned, so a schedule that changes them every epoch never makes
    torch.compile recompile, and a CUDA graph reads the current values.

    >>> loss_fn = FusedKoeMorphLoss()
    >>> loss = loss_fn(pred, target_seq[:, -1, :], prev=prev, raw=raw, continuity=same_file)  # doctest: +SKIP
    >>> loss.backward()  # doctest: +SKIP

    The perceptual groups can be named, in the data's column order:
    ``FusedKoeMorphLoss(mouth_indices=("jaw*", "mouth*"), expression_indices=("brow*", "eye*"),
    layout="live_link_face")`` (see :mod:`koemorph_fused.blendshapes`).
    """

    _loss_function = staticmethod(temporal_loss)

    @KoeMorphLossModule.weights.setter
    def weights(self, value: "LossWeights | Mapping[str, Any]") -> None:
        KoeMorphLossModule.weights.fset(self, value)
        self._store_weights()

    def _weight_vector(self) -> torch.Tensor:
        return self._weights.as_tensor()

    def _loss(self, pred, target, prev, raw, continuity) -> LossOutput:
        return fused_temporal_loss(
            pred, target, prev, raw, continuity, self.weight_values, self.mouth_indices, self.expression_indices,
            mutable_weights=True,
        )


class KoeMorphSequenceLossModule(nn.Module):
    """Shared body of the fused and the reference sequence loss modules."""

    _loss_function: Callable[..., SequenceLossOutput]

    def __init__(
        self,
        mse_weight: float = 1.0,
        l1_weight: float = 0.1,
        perceptual_weight: float = 0.5,
        temporal_weight: float = 0.2,
        smoothing_weight: float = 0.1,
        velocity_weight: float = 0.0,
        reduction: str = "mean",
        mouth_indices: Sequence[int] = MOUTH_INDICES,
        expression_indices: Sequence[int] = EXPRESSION_INDICES,
        layout: Optional[Layout] = None,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        self._velocity_weight = check_velocity_weight(velocity_weight)
        # Through the property: the fused module stores its weight buffer there.
        self.weights = LossWeights(mse_weight, l1_weight, perceptual_weight, temporal_weight, smoothing_weight)
        self.mouth_indices = _index_tuple(resolve(mouth_indices, layout, argument="mouth_indices"))
        self.expression_indices = _index_tuple(resolve(expression_indices, layout, argument="expression_indices"))
        # Checked against each call's C: a layout names every column of the data.
        self._layout = layout if layout is None or isinstance(layout, str) else tuple(layout)
        #: The six unweighted terms of the last call, detached (None before the first call).
        self.last_terms: Optional[torch.Tensor] = None
        #: The (6,) int64 counts of the last call (None before the first call).
        self.last_counts: Optional[torch.Tensor] = None

    @property
    def weights(self) -> LossWeights:
        """The five term weights; assign a :class:`LossWeights` or a
        ``*_weight`` mapping between steps."""
        return self._weights

    @weights.setter
    def weights(self, value: "LossWeights | Mapping[str, Any]") -> None:
        self._weights = resolve_weights(value)

    @property
    def velocity_weight(self) -> float:
        """The velocity term's weight; assignable between steps."""
        return self._velocity_weight

    @velocity_weight.setter
    def velocity_weight(self, value: float) -> None:
        self._velocity_weight = check_velocity_weight(value)

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        raw: Optional[torch.Tensor] = None,
        *,
        prev: Optional[torch.Tensor] = None,
        prev_target: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        continuity: SequenceContinuity = None,
        counts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The weighted total (0-dim, or ``(B, T)`` for ``reduction="none"``);
        the terms and counts are kept in :attr:`last_terms` and :attr:`last_counts`.
        The arguments are those of :func:`koemorph_fused.sequence_loss`."""
        check_width(self._layout, pred)
        out = self._loss(pred, target, raw, prev, prev_target, lengths, mask, continuity, counts)
        if not _is_exporting():  # an exported program has no place for module state
            self.last_terms = out.terms.detach()
            self.last_counts = out.counts
        return out.total

    def _loss(self, pred, target, raw, prev, prev_target, lengths, mask, continuity, counts) -> SequenceLossOutput:
        return type(self)._loss_function(
            pred, target, raw, prev=prev, prev_target=prev_target, lengths=lengths, mask=mask,
            continuity=continuity, weights=self._weights, velocity_weight=self._velocity_weight,
            reduction=self.reduction, counts=counts, mouth_indices=self.mouth_indices,
            expression_indices=self.expression_indices,
        )

    def extra_repr(self) -> str:
        w = self._weights
        return (
            f"mse_weight={w.mse}, l1_weight={w.l1}, perceptual_weight={w.perceptual}, "
            f"temporal_weight={w.temporal}, smoothing_weight={w.smoothing}, "
            f"velocity_weight={self._velocity_weight}, reduction={self.reduction!r}"
        )


class FusedKoeMorphSequenceLoss(_FusedWeightBuffer, KoeMorphSequenceLossModule):
    """The KoeMorph loss over ``(B, T, C)`` windows of frames, fused
    (:func:`koemorph_fused.sequence_loss` as a module).

    The six weights (the five ``*_weight`` and ``velocity_weight``) live in a
    (6,) float64 buffer that moves with the module and is updated in place
    when :attr:`weights` or :attr:`velocity_weight` is assigned.

    >>> loss_fn = FusedKoeMorphSequenceLoss(velocity_weight=0.5)
    >>> loss = loss_fn(pred, target, raw, lengths=lengths, prev=prev, prev_target=prev_target)  # doctest: +SKIP
    >>> loss.backward()  # doctest: +SKIP
    """

    _loss_function = staticmethod(sequence_loss)

    @KoeMorphSequenceLossModule.weights.setter
    def weights(self, value: "LossWeights | Mapping[str, Any]") -> None:
        KoeMorphSequenceLossModule.weights.fset(self, value)
        self._store_weights()

    @KoeMorphSequenceLossModule.velocity_weight.setter
    def velocity_weight(self, value: float) -> None:
        KoeMorphSequenceLossModule.velocity_weight.fset(self, value)
        self._store_weights()

    def _weight_vector(self) -> torch.Tensor:
        return sequence_weight_tensor(self._weights, self._velocity_weight)

    def _loss(self, pred, target, raw, prev, prev_target, lengths, mask, continuity, counts) -> SequenceLossOutput:
        return fused_sequence_loss(
            pred, target, raw, prev, prev_target, lengths, mask, continuity, self.weight_values,
            self.mouth_indices, self.expression_indices, reduction=self.reduction, counts=counts,
            mutable_weights=True,
        )
