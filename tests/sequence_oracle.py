"""An independent float64 oracle of the sequence operator's contract, written
literally: plain Python loops over (b, t), torch ops on one frame at a time.
Slow; for tiny sizes only. Differentiable (the temporal term detaches the
previous frame; the velocity term does not).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

TERMS = ("mse", "l1", "perceptual", "temporal", "smoothing", "velocity")


def frame_sets(batch: int, frames: int, lengths=None, mask=None, continuity=None, has_prev=False,
               has_prev_target=False):
    """V, P and P_v as Python sets of (b, t)."""
    def valid(b, t):
        if lengths is not None:
            return t < min(max(int(lengths[b]), 0), frames)
        if mask is not None:
            return bool(mask[b, t] != 0)
        return True

    def same_file(b, t):
        if continuity is None:
            return True
        if continuity.dim() == 1:
            return t > 0 or bool(continuity[b] != 0)
        return bool(continuity[b, t] != 0)

    V, P, Pv = set(), set(), set()
    for b in range(batch):
        for t in range(frames):
            if not valid(b, t):
                continue
            V.add((b, t))
            has_previous = valid(b, t - 1) if t >= 1 else has_prev
            if same_file(b, t) and has_previous:
                P.add((b, t))
                if t >= 1 or has_prev_target:
                    Pv.add((b, t))
    return V, P, Pv


def sequence_oracle(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw: Optional[torch.Tensor] = None,
    prev: Optional[torch.Tensor] = None,
    prev_target: Optional[torch.Tensor] = None,
    lengths=None,
    mask=None,
    continuity=None,
    mouth: Sequence[int] = (),
    expression: Sequence[int] = (),
    weights: Sequence[float] = (1, 1, 1, 1, 1, 1),
    reduction: str = "mean",
    counts=None,
    frame_scale=None,
):
    """(total, terms, counts) of the contract. ``reduction``: "none" gives
    ``(B, T)`` totals and ``(B, T, 6)`` terms; frame_scale multiplies each
    frame's six terms."""
    batch, frames, _ = pred.shape
    V, P, Pv = frame_sets(batch, frames, lengths, mask, continuity, prev is not None, prev_target is not None)
    zero = pred.new_zeros(())
    per_frame = {}
    for b in range(batch):
        for t in range(frames):
            if (b, t) not in V:
                continue
            d = pred[b, t] - target[b, t]
            terms = [(d * d).mean(), d.abs().mean(), zero, zero, zero, zero]
            if mouth:
                terms[2] = terms[2] + (d[list(mouth)] ** 2).mean()
            if expression:
                terms[2] = terms[2] + (d[list(expression)] ** 2).mean()
            if (b, t) in P:
                q = pred[b, t - 1].detach() if t >= 1 else prev[b]
                terms[3] = ((pred[b, t] - q) ** 2).mean()
            if raw is not None:
                terms[4] = (pred[b, t] - raw[b, t]).abs().mean()
            if (b, t) in Pv:
                p = pred[b, t - 1] if t >= 1 else prev[b]
                s = target[b, t - 1] if t >= 1 else prev_target[b]
                terms[5] = (((pred[b, t] - p) - (target[b, t] - s)) ** 2).mean()
            if frame_scale is not None:
                terms = [x * frame_scale[b, t] for x in terms]
            per_frame[b, t] = terms

    own_counts = [len(V), len(V), len(V), len(P), len(V) if raw is not None else 0, len(Pv)]
    members = [V, V, V, P, V, Pv]

    def weighted(terms):
        total = zero
        for w, x in zip(weights, terms):
            if w > 0:
                total = total + w * x
        return total

    if reduction == "none":
        rows = []
        for b in range(batch):
            row = []
            for t in range(frames):
                terms = per_frame.get((b, t), [zero] * 6)
                terms = [terms[k] if (b, t) in members[k] else zero for k in range(6)]
                row.append(torch.stack(terms))
            rows.append(torch.stack(row) if row else pred.new_zeros(0, 6))
        terms = torch.stack(rows) if rows else pred.new_zeros(0, frames, 6)
        totals = [[weighted(terms[b, t]) for t in range(frames)] for b in range(batch)]
        total = torch.stack([torch.stack(r) if r else pred.new_zeros(0) for r in totals]) if totals \
            else pred.new_zeros(0, frames)
        return total, terms, own_counts

    sums = [zero] * 6
    for k in range(6):
        for f in sorted(members[k]):
            if k == 4 and raw is None:
                continue
            sums[k] = sums[k] + per_frame[f][k]
    if reduction == "mean":
        denominators = counts if counts is not None else own_counts
        sums = [s / max(float(n), 1.0) for s, n in zip(sums, denominators)]
    terms = torch.stack(sums)
    return weighted(sums), terms, own_counts
