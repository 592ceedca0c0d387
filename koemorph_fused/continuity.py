"""The per-row continuity mask of the temporal term, from file indices."""

from __future__ import annotations

from typing import Optional

import torch


def _check_index(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of file indices, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of file indices, got {x.dtype}")
    return x


def continuity_mask(file_index: torch.Tensor, prev_file_index: Optional[torch.Tensor]) -> torch.Tensor:
    """``continuity`` for :func:`~koemorph_fused.temporal_loss`: True where a
    row's previous frame comes from the same file.

    Args:
        file_index: integer tensor, the file of each row at this step (e.g. ``(B,)``).
        prev_file_index: the same at the previous step, or None at the first
            step (no previous frame: every row False).

    Returns:
        A bool tensor of the shape and device of ``file_index``; computed on
        the device, without synchronising.

    A stream that moves on to a new file at this step gets False, so its row
    is left out of the temporal term. File indices must identify a file
    visit: a stream that ends a file and starts the same file again would
    look continuous.

    >>> continuity_mask(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 2]))
    tensor([ True, False,  True])
    """
    file_index = _check_index("file_index", file_index)
    if prev_file_index is None:
        return torch.zeros(file_index.shape, dtype=torch.bool, device=file_index.device)
    prev_file_index = _check_index("prev_file_index", prev_file_index)
    if prev_file_index.shape != file_index.shape:
        raise ValueError(f"prev_file_index must have the shape of file_index {tuple(file_index.shape)}, "
                         f"got {tuple(prev_file_index.shape)}")
    if prev_file_index.device != file_index.device:
        raise ValueError(f"prev_file_index must be on the device of file_index ({file_index.device}), "
                         f"got {prev_file_index.device}")
    return file_index == prev_file_index


__all__ = ["continuity_mask"]
