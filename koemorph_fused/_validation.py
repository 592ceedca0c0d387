"""Argument checks shared by the fused loss and the reference, so that both
reject the same misuse with the same message before any kernel runs."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional

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


# ---------------------------------------------------------------------------
# Sequences: (B, T, C) windows of frames (docs/spec.md, "Sequences").

#: ``reduction=`` of the sequence loss, and the operator's code for each.
REDUCTIONS: dict[str, int] = {"none": 0, "mean": 1, "sum": 2}


class SequenceInputs(NamedTuple):
    """One validated call of the sequence loss: the tensors the operator reads."""

    pred: torch.Tensor
    target: torch.Tensor
    raw: Optional[torch.Tensor]
    prev: Optional[torch.Tensor]          # detached; None when no window continues (continuity=False)
    prev_target: Optional[torch.Tensor]   # detached; only with prev
    lengths: Optional[torch.Tensor]       # (B,) integer
    mask: Optional[torch.Tensor]          # (B, T), detached
    continuity: Optional[torch.Tensor]    # (B,) or (B, T), detached; None = all 1


def _values_readable(x: torch.Tensor) -> bool:
    """Whether ``x``'s values can be read on the host now: not while tracing
    (torch.compile, export) and not while a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_values(name: str, ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the 0-dim bool ``ok`` is true.
    Where values cannot be read (tracing, capture) the check runs on the
    device (torch._assert_async) instead of being skipped. Eager CUDA calls
    read one bool (a synchronisation). Meta tensors hold no values to check."""
    if ok.device.type == "meta":
        return
    if _values_readable(ok):
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, f"{name}: {message}")


#: Unsigned integer dtypes wider than uint8, which torch only casts (no comparisons).
_WIDE_UNSIGNED = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))


def _check_frame_tensor(name: str, x: Any, shapes: tuple[tuple[int, ...], ...], device: torch.device,
                        *, integer: bool = False) -> torch.Tensor:
    """A (B,) or (B, T) tensor of per-window or per-frame values on pred's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(x)}")
    if tuple(x.shape) not in shapes:
        wanted = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {wanted}, got {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got {x.dtype}")
    if integer and (x.is_floating_point() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (frames t < lengths[b] are valid), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on the device of pred ({device}), got {x.device}")
    if integer and x.dtype in _WIDE_UNSIGNED:
        # torch cannot compare these dtypes: their values go on as int64 (a
        # uint64 above 2**63 - 1 turns negative, so the range check rejects it).
        x = x.to(torch.int64)
    return x.detach()


def _check_zero_one(name: str, x: torch.Tensor) -> None:
    if x.dtype != torch.bool and x.numel():
        _check_values(name, ((x == 0) | (x == 1)).all(), f"{name} must hold only 0 and 1")


def check_sequence_inputs(
    pred: Any,
    target: Any,
    raw: Any = None,
    prev: Any = None,
    prev_target: Any = None,
    lengths: Any = None,
    mask: Any = None,
    continuity: Any = None,
) -> SequenceInputs:
    """Validate one call of the sequence loss (fused and reference alike).

    ``pred``, ``target``, ``raw``: ``(B, T, C)``; ``prev``, ``prev_target``:
    ``(B, C)``; ``lengths`` ``(B,)`` integer in [0, T] or ``mask`` ``(B, T)``
    of 0/1 (not both); ``continuity``: None, a bool, or a 0/1 tensor of shape
    ``(B,)`` or ``(B, T)``. Mixed floating dtypes are promoted as for the row
    loss (differentiable casts); ``prev`` and ``prev_target`` are detached.
    ``continuity=False`` means no window continues its previous one: it drops
    ``prev`` and ``prev_target`` (frame 0 then has no pair)."""
    _check_tensor("pred", pred)
    shape, device = pred.shape, pred.device
    if len(shape) != 3:
        raise ValueError(f"pred must have 3 dimensions (B, T, C), got shape {tuple(shape)}")
    batch, frames, cols = shape
    if cols == 0:
        raise ValueError(f"pred must have at least one column (C >= 1), got shape {tuple(shape)}")
    _check_like_pred("target", target, shape, device)
    if raw is not None:
        _check_like_pred("raw", raw, shape, device)
    if prev_target is not None and prev is None:
        raise ValueError("prev_target was given without prev: the velocity term's frame 0 needs both")
    if prev is not None:
        _check_like_pred("prev", prev, torch.Size((batch, cols)), device)
    if prev_target is not None:
        _check_like_pred("prev_target", prev_target, torch.Size((batch, cols)), device)

    if lengths is not None and mask is not None:
        raise ValueError("give lengths or mask, not both: each says which frames are valid")
    if lengths is not None:
        lengths = _check_frame_tensor("lengths", lengths, ((batch,),), device, integer=True)
        if batch:
            if lengths.is_cpu and _values_readable(lengths):
                low, high = torch.aminmax(lengths)  # one small op, read on the host
                if int(low) < 0 or int(high) > frames:
                    raise ValueError(f"lengths must be in [0, T] = [0, {frames}]")
            else:  # no T in this message: formatting a traced T would fix it to one value (a recompile per T)
                _check_values("lengths", ((lengths >= 0) & (lengths <= frames)).all(), "lengths must be in [0, T]")
    if mask is not None:
        mask = _check_frame_tensor("mask", mask, ((batch, frames),), device)
        _check_zero_one("mask", mask)

    if isinstance(continuity, np.bool_):
        continuity = bool(continuity)
    if continuity is None or continuity is True:
        continuity = None
    elif continuity is False:
        prev = prev_target = None
        continuity = None
    elif isinstance(continuity, torch.Tensor):
        continuity = _check_frame_tensor("continuity", continuity, ((batch,), (batch, frames)), device)
        _check_zero_one("continuity", continuity)
    else:
        raise TypeError(
            f"continuity must be None, a bool, or a tensor of shape ({batch},) or ({batch}, {frames}), "
            f"got {_type_name(continuity)}"
        )

    dtype = pred.dtype
    others = (target, raw, prev, prev_target)
    if any(x is not None and x.dtype != dtype for x in others):
        for x in others:
            if x is not None:
                dtype = torch.promote_types(dtype, x.dtype)
        pred, target, raw, prev, prev_target = (None if x is None else x.to(dtype)
                                                for x in (pred, target, raw, prev, prev_target))
    prev = None if prev is None else prev.detach()
    prev_target = None if prev_target is None else prev_target.detach()
    return SequenceInputs(pred, target, raw, prev, prev_target, lengths, mask, continuity)


def check_reduction(reduction: Any) -> int:
    """``"mean"``, ``"sum"`` or ``"none"``, as the operator's code."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def check_counts(counts: Any, reduction: str, device: torch.device) -> Optional[torch.Tensor]:
    """``counts=``: six non-negative numbers (a sequence or a tensor of any
    real dtype), only with ``reduction="mean"``; as a (6,) float64 tensor on
    ``device`` (None when not given)."""
    if counts is None:
        return None
    if reduction != "mean":
        raise ValueError(f"counts is only used with reduction='mean' (the divisors of the means), "
                         f"got reduction={reduction!r}")
    if isinstance(counts, torch.Tensor):
        if counts.is_complex() or counts.dtype == torch.bool:
            raise TypeError(f"counts must be a real tensor, got {counts.dtype}")
        if counts.device != device and not counts.is_cpu:
            raise ValueError(f"counts must be on the CPU or on the device of pred ({device}), got {counts.device}")
        values = counts.detach()
    else:
        if isinstance(counts, (str, bytes)):
            raise TypeError(f"counts must be six numbers, got {type(counts).__name__}")
        try:
            items = list(counts)
        except TypeError:
            raise TypeError(f"counts must be six numbers or a (6,) tensor, got {_type_name(counts)}") from None
        for x in items:
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise TypeError(f"counts must contain real numbers, got {_type_name(x)} {x!r}")
        values = torch.tensor([float(x) for x in items], dtype=torch.float64)
    if values.shape != (6,):
        raise ValueError(f"counts must hold six numbers (one per term, in SEQUENCE_TERM_NAMES order), "
                         f"got shape {tuple(values.shape)}")
    values = values.to(device=device, dtype=torch.float64, non_blocking=True)
    _check_values("counts", ((values >= 0) & ~values.isnan()).all() & values.isfinite().all(),
                  "counts must be finite and >= 0")
    return values
