"""Argument checks shared by the fused loss and the reference, so that both
reject the same misuse with the same message before any kernel runs."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np
import torch

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _type_name(x: Any) -> str:
    """``float``, ``numpy.bool_``, ``torch.Tensor``: the type as a user would write it."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _check_tensor(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(x)}")
    if x.dtype not in _FLOATING:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")


def _check_like_pred(name: str, x: Any, shape: torch.Size, device: torch.device) -> None:
    _check_tensor(name, x)
    if x.shape != shape:
        raise ValueError(f"{name} must have the shape of pred {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the device of pred ({device}), got {x.device}")


def check_weight_tensor(weights: torch.Tensor, pred: torch.Tensor, *, mutable: bool) -> None:
    """The (5,) float64 weight tensor the operator reads: on the CPU (values
    read on the host) or on pred's device (read by the kernel). Anything else
    -- the meta device, another GPU -- would make the dispatcher pick the
    wrong kernel.

    ``mutable``: the tensor is updated in place between calls (a
    FusedKoeMorphLoss's buffer). CPU values travel to a CUDA kernel as
    arguments, which a CUDA graph captures once and replays forever; such
    weights must then be on the device, where replays read their current
    values. (A LossWeights' tensor never changes, so capturing it is right.)"""
    if not weights.is_cpu and weights.device != pred.device:
        raise ValueError(
            f"weights must be on the CPU or on the device of pred ({pred.device}), got {weights.device}; "
            "for a FusedKoeMorphLoss, move the module to pred's device (loss_fn.to(pred.device))"
        )
    if (mutable and weights.is_cpu and pred.is_cuda and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing()):
        raise ValueError(
            f"weights must be on the device of pred ({pred.device}) while a CUDA graph is being captured: "
            "the graph would replay the CPU values of the capture whatever the weights become later; "
            "move the FusedKoeMorphLoss to the device first (loss_fn.to(pred.device))"
        )


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
    shape, device = pred.shape, pred.device
    if len(shape) < 2:
        raise ValueError(f"pred must have at least 2 dimensions (..., C), got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"pred must not be empty (rows and C must be >= 1), got shape {tuple(shape)}")
    _check_like_pred("target", target, shape, device)
    if prev is not None:
        _check_like_pred("prev", prev, shape, device)
    if raw is not None:
        _check_like_pred("raw", raw, shape, device)

    mask = None
    if isinstance(continuity, np.bool_):
        continuity = bool(continuity)  # numpy's bool means what bool means
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
        if continuity.device != device:
            raise ValueError(f"continuity must be on the device of pred ({device}), got {continuity.device}")
        mask = continuity.detach()
    else:
        raise TypeError(
            f"continuity must be None, a bool, or a tensor of shape {tuple(shape[:-1])}, "
            f"got {_type_name(continuity)}"
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


def _mask_columns(name: str, mask: torch.Tensor, cols: int) -> tuple[int, ...]:
    """The columns a 1-D bool or uint8 tensor selects: as in ``x[..., mask]``,
    it is a mask of C entries (torch reads a uint8 index as a mask too). A
    uint8 entry other than 0 or 1 is an error: such a tensor was meant to hold
    column numbers, which need an integer dtype such as torch.long."""
    if mask.numel() != cols:
        raise ValueError(f"{name} is a {mask.dtype} tensor, a mask as in pred[..., {name}]: it needs C = {cols} "
                         f"entries, got {mask.numel()}; for column numbers use an integer tensor (torch.long)")
    values = mask.tolist()
    if mask.dtype == torch.uint8:
        other = next((v for v in values if v not in (0, 1)), None)
        if other is not None:
            raise ValueError(f"{name} is a uint8 tensor, a mask as in pred[..., {name}] (entries 0 or 1), but "
                             f"holds {other}; for column numbers use an integer tensor (torch.long)")
    return tuple(i for i, v in enumerate(values) if v)


def normalize_indices(name: str, indices: Any, cols: int) -> tuple[int, ...]:
    """Column indices as non-negative ints, used the way ``x[..., indices]``
    uses them: repeats kept, negatives counted from the end, each in [-C, C).

    Every call of the fused loss and of the reference validates its index
    arguments here, so the answer never depends on what ran before. Accepts a
    sequence or iterable of ints (a generator is read once), a 1-D integer
    tensor (column numbers), or a 1-D bool or uint8 tensor of C entries: a
    mask, as ``x[..., mask]`` reads it (see :func:`_mask_columns`); rejects
    floats and bools in a sequence, even integral ones (``12.0``, ``True``)."""
    if isinstance(indices, torch.Tensor) and indices.dim() == 1 and indices.dtype in (torch.bool, torch.uint8):
        return _mask_columns(name, indices, cols)
    if isinstance(indices, torch.Tensor):
        if indices.dim() > 1 or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {indices.dtype} "
                            f"tensor of shape {tuple(indices.shape)}")
        indices = indices.reshape(-1).tolist()
    elif isinstance(indices, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of ints, got {type(indices).__name__} {indices!r}")
    try:
        items = tuple(indices)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {_type_name(indices)}") from None
    out = []
    for i in items:
        if type(i) is not int:  # numpy and torch integers are fine; bools and floats are not
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"{name} must contain ints, got {_type_name(i)} {i!r}")
            i = int(i)
        if not -cols <= i < cols:
            raise ValueError(f"{name} holds index {i}, outside [-{cols}, {cols}) for C = {cols}")
        out.append(i % cols)
    return tuple(out)
