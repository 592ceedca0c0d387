"""The autograd glue around the sequence operator.

``torch.ops.koemorph_fused.sequence_loss_forward`` (csrc/cpu_sequence_kernel.cpp,
csrc/cuda/sequence_kernel.cu) computes, in one pass over ``(B, T, C)``
windows, the six terms, their reduction, this call's counts and the
requested gradients of the weighted total. Here it gets its fake (meta)
kernel (dynamic B and T under torch.compile), a vmap rule, and
:class:`FusedSequenceLoss`, the ``torch.autograd.Function`` that joins it with
the backward:

* reduction "mean" / "sum": forward computes the gradients; backward scales
  them by ``grad_output`` (:func:`_scale_saved`; the C++ node's
  ``scale_saved_gradients`` does the same);
* reduction "none": backward is the operator again, with reduction "sum" and
  ``frame_scale = grad_output`` (each frame's terms weighted by its own
  ``grad_output``), so forward computes no gradient;
* under ``create_graph`` (double backward, torch.func) the gradients are
  recomputed differentiably with torch arithmetic (:func:`_differentiable_gradients`);
* forward mode (``jvp``, ``jacfwd``, ``forward_ad``): :class:`FusedSequenceLossWithJvp`
  adds a ``jvp`` rule, also in torch arithmetic (:func:`_total_jvp`).

:func:`fused_sequence_forward` is the entry of the public API (inputs already
validated by koemorph_fused/sequence.py). Eager calls on plain tensors take
the C++ autograd node that does the same (``_C.sequence_loss``,
csrc/loss_autograd.cpp; its double backward calls
:func:`_differentiable_gradients`); traced calls, tensor subclasses,
forward-mode AD and torch.func transforms take the Python Function.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._ops import (
    _can_hand_over, _torch_scale_in_place, _transform_active, accumulation_dtype,
    check_unchanged, gradient_storage_dtype, input_versions, library, scale_op, traced_in_transform, wanted_gradients,
)
from ._validation import REDUCTIONS
from .sequence import frame_sets

_torch_sequence = torch.ops.koemorph_fused.sequence_loss_forward.default
_fast_sequence_loss = library.sequence_loss

NUM_TERMS = 6
#: The tensors among the operator's arguments (and FusedSequenceLoss's ``ctx.inputs``), in order.
SEQUENCE_INPUT_NAMES = ("pred", "target", "raw", "prev", "prev_target", "lengths", "mask", "continuity",
                        "column_weights", "weights", "counts")
_NONE, _MEAN, _SUM = (REDUCTIONS[name] for name in ("none", "mean", "sum"))


def sequence_op(*args):
    """``torch.ops.koemorph_fused.sequence_loss_forward``."""
    return _torch_sequence(*args)


@torch.library.register_fake("koemorph_fused::sequence_loss_forward")
def _sequence_loss_forward_fake(
    pred, target, raw, prev, prev_target, lengths, mask, continuity, column_weights, weights, counts,
    frame_scale, reduction, grad_pred, grad_target, grad_raw,
):
    acc = accumulation_dtype(pred.dtype)
    batch, frames = pred.shape[0], pred.shape[1]
    none = reduction == _NONE
    grad_dtype = gradient_storage_dtype(pred.dtype)

    def grad(wanted: bool) -> torch.Tensor:
        return pred.new_empty(pred.shape if wanted and not none else (0,), dtype=grad_dtype)

    return (
        pred.new_empty((batch, frames) if none else (), dtype=acc),
        pred.new_empty((batch, frames, NUM_TERMS) if none else (NUM_TERMS,), dtype=acc),
        pred.new_empty((NUM_TERMS,), dtype=torch.int64),
        grad(grad_pred),
        grad(grad_target),
        grad(grad_raw and raw is not None),
    )


def _sequence_vmap(info, in_dims, *args):
    """vmap rule of ``sequence_loss_forward``: the operator once per mapped
    slice, the results stacked; each slice is an independent loss (its own
    counts and means), as a Python loop over the reference would give."""
    tensors, flags = args[:12], args[12:]
    outs = []
    for i in range(info.batch_size):
        sliced = [x if d is None or x is None else x.select(d, i) for x, d in zip(tensors, in_dims[:12])]
        outs.append(_torch_sequence(*sliced, *flags))
    return tuple(torch.stack(column) for column in zip(*outs)), (0,) * 6


if hasattr(torch.library, "register_vmap"):  # torch >= 2.5
    torch.library.register_vmap("koemorph_fused::sequence_loss_forward", _sequence_vmap)


def _scale_saved(grad_total: torch.Tensor, saved, dtype: torch.dtype):
    """Backward of "mean" / "sum": the saved gradients times ``grad_output``,
    as ``dtype``. As for the row loss (``_ops.FusedTemporalLoss.backward``):
    when the graph is being freed and the saved gradients have the input's
    dtype, they are scaled in place (nothing written when ``grad_output`` is
    1) and handed over; otherwise the scaling pass writes new tensors."""
    present = [g for g in saved if g.numel()]
    if present and _can_hand_over(present, grad_total, dtype):
        _torch_scale_in_place(grad_total, present)
        return saved
    return scale_op(grad_total, *saved, dtype)


class FusedSequenceLoss(torch.autograd.Function):
    """``(total, terms, counts, grad_pred, grad_target, grad_raw)`` of the
    sequence operator; ``total`` is differentiable in pred, target and raw
    (never in prev / prev_target). Arguments as the operator's, without
    ``frame_scale``; ``reduction`` is the operator's code; ``want_*`` say
    which gradients backward can need (for "none" forward computes none)."""

    generate_vmap_rule = True  # the operator has a vmap rule; the rest is plain torch

    @staticmethod
    def forward(pred, target, raw, prev, prev_target, lengths, mask, continuity, column_weights, weights,
                counts, reduction, want_pred, want_target, want_raw):
        return sequence_op(pred, target, raw, prev, prev_target, lengths, mask, continuity, column_weights,
                           weights, counts, None, reduction, want_pred, want_target, want_raw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, terms, counts, grad_pred, grad_target, grad_raw = output
        ctx.set_materialize_grads(False)  # no zero tensors for terms / counts
        ctx.mark_non_differentiable(terms, counts, grad_pred, grad_target, grad_raw)
        ctx.save_for_backward(grad_pred, grad_target, grad_raw)
        # Inputs, not outputs (no reference cycle): the "none" backward and a
        # create_graph backward compute from them.
        ctx.inputs = inputs[:12]
        ctx.want = inputs[12:]
        ctx.versions = input_versions(inputs[:11])

    @staticmethod
    def backward(ctx, grad_total, *unused):
        if grad_total is None:  # total did not reach what is differentiated
            return (None,) * 15
        args = ctx.inputs
        pred, reduction = args[0], args[11]
        if torch.is_grad_enabled() or reduction == _NONE:  # these read the inputs again
            check_unchanged(SEQUENCE_INPUT_NAMES, args, ctx.versions, "sequence_loss")
        if torch.is_grad_enabled():  # backward(create_graph=True), torch.func.grad
            grads = _differentiable_gradients(args, grad_total)
        elif reduction == _NONE:
            out = sequence_op(*args[:10], None, grad_total, _SUM, *ctx.want)
            grads = tuple(g.to(pred.dtype) for g in out[3:])
        else:
            grads = _scale_saved(grad_total, ctx.saved_tensors, pred.dtype)
        # An empty (0,) gradient means "not asked for", except for an empty
        # input (B or T = 0), whose gradient is empty too, of its shape.
        need = ctx.needs_input_grad
        return tuple(g if n and g is not None and (g.numel() or g.shape == x.shape) else None
                     for g, n, x in zip(grads, need[:3], args[:3])) + (None,) * 12


class FusedSequenceLossWithJvp(FusedSequenceLoss):
    """:class:`FusedSequenceLoss` with a ``jvp`` rule, for forward-mode AD
    (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``). Dynamo
    cannot trace a Function that defines ``jvp`` (as for the row loss's
    ``FusedTemporalLossWithJvp``), so traced calls use the base class; eager
    calls that reach Python use this one."""

    @staticmethod
    def jvp(ctx, pred_t, target_t, raw_t, *unused):
        return _total_jvp(ctx.inputs, (pred_t, target_t, raw_t)), None, None, None, None, None


def _total_jvp(args, tangents) -> torch.Tensor:
    """The directional derivative of ``total`` along the tangents of pred,
    target and raw (the other inputs are constants), from the differentiable
    gradients of :func:`_differentiable_gradients`, so that an outer
    reverse-mode transform differentiates it (``jacrev(jacfwd(...))``):
    ``Σ_x <∇_x total, tangent_x>``, and for reduction "none" each frame's own.
    There the gradients of ``s(u) = Σ u[b,t] · total[b,t]`` (``grad_total =
    u``) are ``Jᵀu``, linear in ``u``, so ``∇_u Σ_x <Jᵀu, tangent_x> = J ·
    tangent``: ``torch.func.grad`` once more (plain forward-mode AD does not
    nest a ``jvp``)."""
    pred = args[0]
    acc = args[8].dtype
    zero = torch.zeros((), dtype=acc, device=pred.device)

    def along_tangents(scale):  # Σ_x <∇_x (scale · total), tangent_x>
        grads = _differentiable_gradients(args, scale)
        return sum(((g.to(acc) * t.to(acc)).sum() for g, t in zip(grads, tangents)
                    if g is not None and t is not None), zero)

    if args[11] == _NONE:
        return torch.func.grad(along_tangents)(torch.zeros(pred.shape[:2], dtype=acc, device=pred.device))
    return along_tangents(torch.ones((), dtype=acc, device=pred.device))


def sequence_total_torch(pred, target, raw, prev, prev_target, lengths, mask, continuity, column_weights, weights,
                         counts, reduction: int, frame_scale=None) -> torch.Tensor:
    """The operator's weighted total in plain torch arithmetic, differentiable
    (the temporal term detaches the previous frame, velocity does not);
    padding is selected with ``where``, never multiplied, so a NaN there stays
    out. ``reduction`` is the operator's code; for "none" the per-frame totals
    are multiplied by ``frame_scale`` (when given) and summed. Used by double
    backward (:func:`_differentiable_gradients`); the column weights make it
    independent of how the perceptual groups were given."""
    batch, frames, _ = pred.shape
    acc = column_weights.dtype
    valid, pair, vpair = frame_sets(batch, frames, lengths=lengths, mask=mask, continuity=continuity,
                                    with_prev=prev is not None, with_prev_target=prev_target is not None,
                                    device=pred.device)
    p, g = pred.to(acc), target.to(acc)
    zero = p.new_zeros(())

    def previous(x, head):  # frame t-1 of x at frame t; `head` (or zeros) at t = 0
        first = head.to(acc).unsqueeze(1) if head is not None else torch.zeros_like(x[:, :1])
        return torch.cat([first, x[:, :-1]], dim=1)[:, :frames]

    # The kernels' weight rule (effective_weight in csrc/loss_math.h): a
    # weight that is not finite and > 0 leaves its term out. Decided on the
    # weights' device, not read on the host (no sync on a GPU; vmap over the
    # weights works), and folded into each term's frame mask, so that a term
    # left out reads nothing: an inf in `prev` or `prev_target` under a zero
    # weight brings no NaN into a gradient.
    w = weights.to(device=pred.device, dtype=acc)
    on = (w > 0) & w.isfinite()
    w = torch.where(on, w, zero)
    v, pr, vp = valid.unsqueeze(-1), pair.unsqueeze(-1), vpair.unsqueeze(-1)
    diff = p - g

    def d(k):  # pred - target on the frames term k counts
        return torch.where(v & on[k], diff, zero)

    per_frame = [
        d(0).square().mean(-1),
        d(1).abs().mean(-1),
        (d(2).square() * column_weights).sum(-1),
        torch.where(pr & on[3], p - previous(p.detach(), prev), zero).square().mean(-1),
        torch.where(v & on[4], p - raw.to(acc), zero).abs().mean(-1) if raw is not None else None,
        torch.where(vp & on[5], (p - previous(p, prev)) - (g - previous(g, prev_target)), zero).square().mean(-1),
    ]
    used = [k for k in range(NUM_TERMS) if per_frame[k] is not None]
    if reduction == _NONE:
        scale = frame_scale.to(acc) if frame_scale is not None else 1.0
        return sum(((w[k] * per_frame[k]) * scale).sum() for k in used) + zero
    if reduction == _MEAN and counts is not None:
        den = counts.to(device=pred.device, dtype=acc).clamp(min=1)
    elif reduction == _MEAN:
        den = torch.stack([x.sum() for x in (valid, valid, valid, pair, valid, vpair)]).to(acc).clamp(min=1)
    else:
        den = torch.ones(NUM_TERMS, dtype=acc, device=pred.device)
    return sum(w[k] * per_frame[k].sum() / den[k] for k in used) + zero


def _differentiable_gradients(args, grad_total):
    """The gradients of ``total`` (times ``grad_total``) as differentiable
    tensors, for double backward: ``torch.func.grad`` of
    :func:`sequence_total_torch`. Functional, so the result is differentiable
    both by autograd (``backward(create_graph=True)``) and inside torch.func
    transforms (``hessian``, ``jacrev(jacrev(...))``), where the unwrapped
    inputs do not ``require_grad`` and ``autograd.grad`` would see nothing to
    differentiate. Only used under create_graph."""
    pred, target, raw, reduction = args[0], args[1], args[2], args[11]
    rest = args[3:]
    primals = (pred, target) if raw is None else (pred, target, raw)

    def scaled_total(*xs):
        xs = xs + (None,) * (3 - len(xs))
        if reduction == _NONE:
            return sequence_total_torch(*xs, *rest, frame_scale=grad_total)
        return sequence_total_torch(*xs, *rest) * grad_total.to(args[8].dtype)

    grads = torch.func.grad(scaled_total, argnums=tuple(range(len(primals))))(*primals)
    return tuple(grads) + (None,) * (3 - len(grads))


def fused_sequence_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw: Optional[torch.Tensor],
    prev: Optional[torch.Tensor],
    prev_target: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    continuity: Optional[torch.Tensor],
    column_weights: torch.Tensor,
    weights: torch.Tensor,
    counts: Optional[torch.Tensor],
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, terms, counts)`` of the sequence loss, ``total``
    differentiable in pred, target and raw when one of them needs a gradient.

    Inputs are already validated (koemorph_fused/sequence.py): ``weights`` is
    the (6,) float64 tensor, ``column_weights`` comes from
    :func:`koemorph_fused._ops.column_weights`, ``counts`` is None or a (6,)
    tensor (reduction "mean" only), ``reduction`` is "none", "mean" or "sum".
    """
    if traced_in_transform():
        from ._untraced import run_untraced  # torch._dynamo is loaded: we are being traced

        return run_untraced(fused_sequence_forward, pred, target, raw, prev, prev_target, lengths, mask, continuity,
                            column_weights, weights, counts, reduction)
    code = REDUCTIONS[reduction]
    if not torch.compiler.is_compiling() and not _transform_active():
        out = _fast_sequence_loss(pred, target, raw, prev, prev_target, lengths, mask, continuity,
                                  column_weights, weights, counts, code)
        if out is not NotImplemented:
            return out
    want = wanted_gradients(pred, target, raw)
    if any(want):
        function = FusedSequenceLoss if torch.compiler.is_compiling() else FusedSequenceLossWithJvp
        total, terms, this_counts, *_ = function.apply(
            pred, target, raw, prev, prev_target, lengths, mask, continuity, column_weights, weights, counts,
            code, *want)
    else:
        total, terms, this_counts, *_ = sequence_op(
            pred, target, raw, prev, prev_target, lengths, mask, continuity, column_weights, weights, counts,
            None, code, False, False, False)
    return total, terms, this_counts
