"""Argument checks shared by the fused loss and the reference, so that both
reject the same misuse with the same message before any kernel runs."""

from __future__ import annotations

import functools
import numbers
from typing import Any, Optional

import torch

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_tensor(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATING:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")


def _check_like_pred(name: str, x: Any, pred: torch.Tensor) -> None:
    _check_tensor(name, x)
    if x.shape != pred.shape:
        raise ValueError(f"{name} must have the shape of pred {tuple(pred.shape)}, got {tuple(x.shape)}")
    if x.device != pred.device:
        raise ValueError(f"{name} must be on the device of pred ({pred.device}), got {x.device}")


def check_inputs(
    pred: Any,
    target: Any,
    prev: Any,
    raw: Any,
    continuity: Any,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate the tensors of one call.

    Returns ``(pred, target, prev, raw, mask)`` where mixed floating dtypes are
    promoted the way torch promotes them (through differentiable casts, so each
    gradient comes back in its input's dtype), ``prev`` is detached and is None
    when the temporal term is off (``prev`` None or ``continuity`` False), and
    ``mask`` is None (every row continuous) or the detached continuity tensor.
    """
    _check_tensor("pred", pred)
    shape = pred.shape
    if len(shape) < 2:
        raise ValueError(f"pred must have at least 2 dimensions (..., C), got shape {tuple(shape)}")
    if pred.numel() == 0:
        raise ValueError(f"pred must not be empty (rows and C must be >= 1), got shape {tuple(shape)}")
    _check_like_pred("target", target, pred)
    if prev is not None:
        _check_like_pred("prev", prev, pred)
    if raw is not None:
        _check_like_pred("raw", raw, pred)

    mask = None
    if continuity is None or continuity is True:
        pass
    elif continuity is False:
        prev = None
    elif isinstance(continuity, torch.Tensor):
        if continuity.shape != shape[:-1]:
            raise ValueError(
                f"continuity must have the leading shape of pred {tuple(shape[:-1])}, got {tuple(continuity.shape)}"
            )
        if continuity.is_complex():
            raise TypeError(f"continuity must be a bool, integer or floating tensor, got {continuity.dtype}")
        if continuity.device != pred.device:
            raise ValueError(f"continuity must be on the device of pred ({pred.device}), got {continuity.device}")
        mask = continuity.detach()
    else:
        raise TypeError(
            f"continuity must be None, a bool, or a tensor of shape {tuple(shape[:-1])}, "
            f"got {type(continuity).__name__}"
        )

    dtype = pred.dtype
    if (
        target.dtype != dtype
        or (prev is not None and prev.dtype != dtype)
        or (raw is not None and raw.dtype != dtype)
    ):
        for x in (target, prev, raw):
            if x is not None:
                dtype = torch.promote_types(dtype, x.dtype)
        pred, target = pred.to(dtype), target.to(dtype)
        prev = None if prev is None else prev.to(dtype)
        raw = None if raw is None else raw.to(dtype)
    if prev is not None:
        prev = prev.detach()
    return pred, target, prev, raw, mask


def _normalize_indices_uncached(name: str, indices: Any, cols: int) -> tuple[int, ...]:
    if isinstance(indices, torch.Tensor):
        if indices.dim() > 1 or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {indices.dtype} "
                            f"tensor of shape {tuple(indices.shape)}")
        indices = indices.reshape(-1).tolist()
    try:
        items = tuple(indices)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(indices).__name__}") from None
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{name} must contain ints, got {type(i).__name__} {i!r}")
        i = int(i)
        if not -cols <= i < cols:
            raise ValueError(f"{name} holds index {i}, outside [-{cols}, {cols}) for C = {cols}")
        out.append(i % cols)
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _normalize_indices_cached(name: str, indices: tuple[int, ...], cols: int) -> tuple[int, ...]:
    return _normalize_indices_uncached(name, indices, cols)


def normalize_indices(name: str, indices: Any, cols: int) -> tuple[int, ...]:
    """Column indices as non-negative ints, used the way ``x[..., indices]``
    uses them: repeats kept, negatives counted from the end, each in [-C, C)."""
    if isinstance(indices, (tuple, list, range)) and not torch.compiler.is_compiling():
        key = tuple(indices)
        if all(type(i) is int for i in key):  # plain ints: safe to cache
            return _normalize_indices_cached(name, key, cols)
    return _normalize_indices_uncached(name, indices, cols)
