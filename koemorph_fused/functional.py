"""The fused five-term temporal loss: :func:`temporal_loss`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

from . import _ops
from .blendshapes import Layout, check_width, resolve
from ._validation import check_inputs, check_weight_tensor, normalize_indices
from .terms import EXPRESSION_INDICES, MOUTH_INDICES, LossOutput
from .weights import DEFAULT, LossWeights, resolve_weights

Continuity = Union[None, bool, torch.Tensor]
Weights = Union[LossWeights, Mapping[str, Any]]


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
    """The KoeMorph temporal loss and its gradients, in one fused pass.

    Args:
        pred: ``(..., C)`` final-frame prediction after temporal smoothing.
        target: ``(..., C)`` ground truth; may be a strided view such as
            ``target_seq[:, -1, :]``. Gets a gradient if it requires one.
        prev: ``(..., C)`` previous-frame state, or None (no temporal term).
            Never differentiated (treated as ``prev.detach()``).
        raw: ``(..., C)`` prediction before smoothing, or None (no smoothing term).
        continuity: None or True (every row continues its previous frame),
            False (no temporal term), or a tensor of the leading shape ``(...)``
            with 1 where a row's previous frame is from the same file.
        weights: a :class:`LossWeights` or a mapping of ``*_weight`` keys.
        mouth_indices, expression_indices: column groups of the perceptual term;
            each behaves like ``F.mse_loss(pred[..., idx], target[..., idx])``.
            Column numbers (the defaults are the seed's positions 12..21 and
            0..9, whatever the data's order; an integer tensor holds
            numbers, a 1-D bool or uint8 tensor of C entries is a mask, as in
            ``pred[..., idx]``), or blend-shape names and glob
            patterns such as ``("jaw*", "mouth*")``, which need ``layout``.
            Names are looked up on every call (tens of microseconds); in a
            hot loop pass ``kf.blendshapes.indices(..., layout=...)`` computed
            once, or use :class:`FusedKoeMorphLoss`, which resolves them when
            it is built.
        layout: the data's column order for names: ``"arkit"``,
            ``"koemorph"``, ``"live_link_face"``, ``"live_link_face_61"``,
            ``"alphabetical"`` or the column names (see
            :mod:`koemorph_fused.blendshapes`); it must name exactly C columns.

    Returns:
        :class:`LossOutput` ``(total, terms)``: ``total`` is a 0-dim tensor
        (float32 for float16/bfloat16 inputs) and ``terms`` the five
        unweighted terms in :data:`TERM_NAMES` order.

    Raises:
        TypeError, ValueError: on misuse, naming the argument, before any kernel runs.

    Example:
        >>> import torch, koemorph_fused as kf
        >>> pred = torch.rand(4, 52, requires_grad=True)
        >>> out = kf.temporal_loss(pred, torch.rand(4, 52))
        >>> out.total.backward()
    """
    w = resolve_weights(weights).as_tensor()
    mouth_indices = resolve(mouth_indices, layout, argument="mouth_indices")
    expression_indices = resolve(expression_indices, layout, argument="expression_indices")
    check_width(layout, pred)
    return fused_temporal_loss(pred, target, prev, raw, continuity, w, mouth_indices, expression_indices)


def fused_temporal_loss(
    pred, target, prev, raw, continuity, weight_tensor: torch.Tensor, mouth_indices, expression_indices,
    *, mutable_weights: bool = False,
) -> LossOutput:
    """:func:`temporal_loss` with the weights already a (5,) float64 tensor of
    validated values, on the CPU or on pred's device (FusedKoeMorphLoss keeps
    one that moves with the module and is updated in place: ``mutable_weights``).

    Every call goes through the same validation as the reference
    (:func:`~koemorph_fused._validation.check_inputs`, which also promotes
    mixed dtypes, and :func:`~koemorph_fused._validation.normalize_indices`)
    before anything is dispatched; then the operator runs.
    """
    pred, target, prev, raw, mask = check_inputs(pred, target, prev, raw, continuity)
    check_weight_tensor(weight_tensor, pred, mutable=mutable_weights)
    cols = pred.shape[-1]
    mouth = normalize_indices("mouth_indices", mouth_indices, cols)
    expression = normalize_indices("expression_indices", expression_indices, cols)
    colw = _ops.column_weights(mouth, expression, cols, pred.dtype, pred.device)
    return _ops.fused_forward(pred, target, prev, raw, mask, colw, weight_tensor)
