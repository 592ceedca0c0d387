"""The fused loss over windows of frames: :func:`sequence_loss` and
:func:`sequence_counts` (docs/spec.md, "Sequences").

A window ``pred[b]`` is ``T`` consecutive frames of one stream. The previous
frame of frame ``t`` is frame ``t - 1`` of the same window, read in place by
the kernel, or, for ``t = 0``, ``prev[b]``: the last frame of the stream's
previous window. Which frames count is said by ``lengths`` or ``mask``
(padding) and ``continuity`` (file boundaries).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

from . import _ops
from .blendshapes import Layout, check_width, resolve
from ._validation import (
    _check_frame_tensor, _check_zero_one, check_counts, check_reduction, check_sequence_inputs,
    check_weight_tensor, normalize_indices,
)
from .terms import EXPRESSION_INDICES, MOUTH_INDICES, SequenceLossOutput
from .weights import DEFAULT, LossWeights, check_velocity_weight, resolve_weights

SequenceContinuity = Union[None, bool, torch.Tensor]
Weights = Union[LossWeights, Mapping[str, Any]]


def sequence_weight_tensor(weights: Weights, velocity_weight: float) -> torch.Tensor:
    """The six weights (the five of ``weights``, then ``velocity_weight``) as
    the (6,) float64 CPU tensor the operator reads."""
    w = resolve_weights(weights)
    return torch.tensor(w.as_tuple() + (check_velocity_weight(velocity_weight),), dtype=torch.float64, device="cpu")


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
    """The KoeMorph loss over ``(B, T, C)`` windows of frames, with a velocity
    term, padding and file boundaries, in one fused pass.

    Args:
        pred: ``(B, T, C)`` predictions (after smoothing); any strides, e.g. a
            ``(B, C, T)`` model output ``.transpose(1, 2)``, read in place.
        target: ``(B, T, C)`` ground truth. Gets a gradient if it requires one.
        raw: ``(B, T, C)`` predictions before smoothing, or None (no smoothing term).
        prev: ``(B, C)``, the last (smoothed) prediction of each stream's
            previous window, or None: the previous frame of frame 0. Never
            differentiated.
        prev_target: ``(B, C)``, that window's last target frame (only for the
            velocity term; needs ``prev``). Never differentiated.
        lengths: ``(B,)`` integer tensor: frames ``t < lengths[b]`` are valid
            (the rest is padding). Or give ``mask``; neither means every frame.
        mask: ``(B, T)`` 0/1 tensor (bool, integer or floating), 1 = valid frame.
        continuity: where a frame's previous frame is from the same file:
            None or True (everywhere), False (no window continues its previous
            one: frame 0 has no previous frame), a ``(B,)`` 0/1 tensor (frame
            0 of each window; later frames continue), or a ``(B, T)`` 0/1
            tensor (every frame; a file boundary inside a window).
        weights: the five term weights (:class:`LossWeights` or a ``*_weight``
            mapping).
        velocity_weight: weight of the velocity term, ``>= 0``.
        reduction: ``"mean"`` (each term's sum over its frames divided by
            their count, at least 1), ``"sum"``, or ``"none"`` (per frame).
        counts: only with ``"mean"``: six numbers (e.g. this step's counts
            summed over micro-batches or all-reduced across ranks) to divide
            by instead of this call's, so that a mean over uneven batches is
            exact.
        mouth_indices, expression_indices, layout: the perceptual groups, as
            for :func:`temporal_loss`.

    Returns:
        :class:`SequenceLossOutput` ``(total, terms, counts)``; terms in
        :data:`SEQUENCE_TERM_NAMES` order.

    Raises:
        TypeError, ValueError: on misuse, naming the argument, before any kernel runs.

    Example:
        >>> import torch, koemorph_fused as kf
        >>> pred = torch.rand(2, 16, 52, requires_grad=True)
        >>> out = kf.sequence_loss(pred, torch.rand(2, 16, 52), lengths=torch.tensor([16, 9]),
        ...                        velocity_weight=0.5)
        >>> out.total.backward()
        >>> out.counts.tolist()
        [25, 25, 25, 23, 0, 23]
    """
    w = sequence_weight_tensor(weights, velocity_weight)
    mouth_indices = resolve(mouth_indices, layout, argument="mouth_indices")
    expression_indices = resolve(expression_indices, layout, argument="expression_indices")
    check_width(layout, pred)
    return fused_sequence_loss(pred, target, raw, prev, prev_target, lengths, mask, continuity, w,
                               mouth_indices, expression_indices, reduction=reduction, counts=counts)


def fused_sequence_loss(
    pred, target, raw, prev, prev_target, lengths, mask, continuity, weight_tensor: torch.Tensor,
    mouth_indices, expression_indices, *, reduction: str = "mean", counts=None, mutable_weights: bool = False,
) -> SequenceLossOutput:
    """:func:`sequence_loss` with the six weights already a (6,) float64
    tensor of validated values on the CPU or on pred's device
    (:class:`FusedKoeMorphSequenceLoss` keeps one that moves with the module:
    ``mutable_weights``). Every call is validated here, as the reference's."""
    s = check_sequence_inputs(pred, target, raw, prev, prev_target, lengths, mask, continuity)
    check_reduction(reduction)
    counts = check_counts(counts, reduction, s.pred.device)
    check_weight_tensor(weight_tensor, s.pred, mutable=mutable_weights)
    cols = s.pred.shape[-1]
    mouth = normalize_indices("mouth_indices", mouth_indices, cols)
    expression = normalize_indices("expression_indices", expression_indices, cols)
    colw = _ops.column_weights(mouth, expression, cols, s.pred.dtype, s.pred.device)
    from ._sequence_ops import fused_sequence_forward  # the operator's autograd glue
    total, terms, this_counts = fused_sequence_forward(
        s.pred, s.target, s.raw, s.prev, s.prev_target, s.lengths, s.mask, s.continuity, colw,
        weight_tensor, counts, reduction)
    return SequenceLossOutput(total, terms, this_counts)


def frame_sets(
    batch: int,
    frames: int,
    *,
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    continuity: Optional[torch.Tensor] = None,
    with_prev: bool = False,
    with_prev_target: bool = False,
    device: Optional[torch.device] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three ``(B, T)`` bool sets of docs/spec.md: ``V`` (valid frames),
    ``P`` (frames of V whose previous frame exists and continues: the
    temporal term) and ``P_v`` (the same where frame 0 also has
    ``prev_target``: the velocity term). Arguments already validated;
    ``continuity`` is None or a tensor."""
    for x in (lengths, mask, continuity):
        if x is not None:
            device = x.device
    t = torch.arange(frames, device=device)
    if lengths is not None:
        valid = t < lengths.unsqueeze(1)
    elif mask is not None:
        valid = mask != 0
    else:
        valid = torch.ones(batch, frames, dtype=torch.bool, device=device)
    if continuity is None:
        cont = torch.ones_like(valid)
    elif continuity.dim() == 1:
        cont = (t > 0) | (continuity != 0).unsqueeze(1)
    else:
        cont = continuity != 0

    def pairs(first_has_previous: bool) -> torch.Tensor:
        head = torch.full((batch, min(frames, 1)), first_has_previous, dtype=torch.bool, device=device)
        previous_valid = torch.cat([head, valid[:, :-1]], dim=1)
        return valid & cont & previous_valid

    return valid, pairs(with_prev), pairs(with_prev and with_prev_target)


def sequence_counts(
    shape: Sequence[int],
    *,
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    continuity: SequenceContinuity = None,
    with_prev: bool = False,
    with_prev_target: bool = False,
    with_raw: bool = False,
) -> torch.Tensor:
    """The ``(6,)`` int64 counts :func:`sequence_loss` would report for
    windows of ``shape`` ``(B, T)``, without the data: ``|V|`` for mse, l1 and
    perceptual, ``|P|`` for temporal, ``|V|`` for smoothing (0 without raw)
    and ``|P_v|`` for velocity. Sum them over micro-batches (or all-reduce
    them across ranks) and pass the result as ``counts=`` for exact means.

    >>> import torch, koemorph_fused as kf
    >>> kf.sequence_counts((2, 4), lengths=torch.tensor([4, 2]), with_raw=True).tolist()
    [6, 6, 6, 4, 6, 4]
    """
    try:
        dims = tuple(shape)
        if len(dims) != 2 or any(isinstance(n, bool) for n in dims):
            raise TypeError
        batch, frames = (operator.index(n) for n in dims)  # ints only: 2.5 or "2" is an error, not 2
    except TypeError:
        raise TypeError(f"shape must be (B, T), two ints, got {shape!r}") from None
    if batch < 0 or frames < 0:
        raise ValueError(f"shape must be (B, T) with B, T >= 0, got {dims}")
    if with_prev_target and not with_prev:
        raise ValueError("with_prev_target=True needs with_prev=True (prev_target is only used with prev)")
    if lengths is not None and mask is not None:
        raise ValueError("give lengths or mask, not both: each says which frames are valid")
    device = next((x.device for x in (lengths, mask, continuity) if isinstance(x, torch.Tensor)), None)
    if lengths is not None:
        lengths = _check_frame_tensor("lengths", lengths, ((batch,),), lengths.device, integer=True)
        if batch and not bool(((lengths >= 0) & (lengths <= frames)).all()):
            raise ValueError(f"lengths must be in [0, T] = [0, {frames}]")
    if mask is not None:
        mask = _check_frame_tensor("mask", mask, ((batch, frames),), mask.device)
        _check_zero_one("mask", mask)
    if continuity is None or continuity is True:
        continuity = None
    elif continuity is False:
        continuity, with_prev, with_prev_target = None, False, False
    else:
        continuity = _check_frame_tensor("continuity", continuity, ((batch,), (batch, frames)), device)
        _check_zero_one("continuity", continuity)
    if device is not None:
        for name, x in (("lengths", lengths), ("mask", mask), ("continuity", continuity)):
            if x is not None and x.device != device:
                raise ValueError(f"{name} must be on the device of the other frame tensors ({device}), got {x.device}")
    valid, pairs, velocity_pairs = frame_sets(batch, frames, lengths=lengths, mask=mask, continuity=continuity,
                                              with_prev=with_prev, with_prev_target=with_prev_target,
                                              device=device)
    n_valid = valid.sum()
    return torch.stack([n_valid, n_valid, n_valid, pairs.sum(),
                        n_valid if with_raw else torch.zeros_like(n_valid), velocity_pairs.sum()]).to(torch.int64)
