"""The autograd glue around the compiled operators.

* ``torch.ops.koemorph_fused.temporal_loss_forward``: one pass computing the
  five terms, the total and the requested gradients (csrc/cpu_loss_kernel.cpp,
  csrc/cuda/loss_kernel.cu);
* ``torch.ops.koemorph_fused.scale_gradients``: backward, the saved gradients
  times ``grad_output``.

Here they get their fake (meta) kernels, for torch.compile and torch.export,
and :class:`FusedTemporalLoss`, the ``torch.autograd.Function`` that joins
them: forward saves the gradients the kernel already computed; backward only
scales them, reading ``grad_output`` on the device (no host synchronisation).

:func:`fused_forward` chooses the autograd implementation: eager calls on
plain tensors use the same logic in C++ (csrc/loss_autograd.cpp, a
``torch::autograd::Function``: at small B the Python Function's own
bookkeeping cost more than the kernel); traced calls, which dynamo must see as
Python, and tensor subclasses use :class:`FusedTemporalLoss`.
tests/test_autograd.py checks both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._loader import load_library
from ._validation import normalize_indices
from .terms import LossOutput

library = load_library()  # registers the operators

_torch_forward = torch.ops.koemorph_fused.temporal_loss_forward.default
_torch_scale = torch.ops.koemorph_fused.scale_gradients.default
_fast_forward = library.forward
_fast_scale = library.scale
_fast_loss = library.loss
_is_unit_cpu_scalar = library.is_unit_cpu_scalar
_new_tuple = tuple.__new__  # LossOutput from a pair without NamedTuple's Python-level __new__


def forward_op(*args):
    """``torch.ops.koemorph_fused.temporal_loss_forward``. Eager calls with plain
    tensors take the library's direct entry (same operator, without the boxed
    argument parsing of torch.ops); tracing and tensor subclasses take torch.ops."""
    if not torch.compiler.is_compiling():
        out = _fast_forward(*args)
        if out is not NotImplemented:
            return out
    return _torch_forward(*args)


def scale_op(*args):
    """``torch.ops.koemorph_fused.scale_gradients``, with the same fast path as :func:`forward_op`."""
    if not torch.compiler.is_compiling():
        out = _fast_scale(*args)
        if out is not NotImplemented:
            return out
    return _torch_scale(*args)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (float16/bfloat16 sum in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gradient_storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the gradients saved for backward: float32 for float16 inputs
    (small gradients would underflow before grad_output scales them), else the input's."""
    return torch.float32 if dtype == torch.float16 else dtype


@torch.library.register_fake("koemorph_fused::temporal_loss_forward")
def _temporal_loss_forward_fake(
    pred, target, prev, raw, continuity, column_weights, weights, grad_pred, grad_target, grad_raw
):
    acc = accumulation_dtype(pred.dtype)

    grad_dtype = gradient_storage_dtype(pred.dtype)

    def grad(wanted: bool) -> torch.Tensor:
        return pred.new_empty(pred.shape if wanted else (0,), dtype=grad_dtype)

    return (
        pred.new_empty((), dtype=acc),
        pred.new_empty((5,), dtype=acc),
        grad(grad_pred),
        grad(grad_target),
        grad(grad_raw and raw is not None),
    )


@torch.library.register_fake("koemorph_fused::scale_gradients")
def _scale_gradients_fake(grad_output, grad_pred, grad_target, grad_raw, dtype):
    return tuple(torch.empty_like(g, dtype=dtype) for g in (grad_pred, grad_target, grad_raw))


class FusedTemporalLoss(torch.autograd.Function):
    """``(total, terms)`` of the fused loss; differentiable in pred, target and raw.

    Arguments are already validated (see :func:`koemorph_fused.temporal_loss`):
    ``prev`` and ``continuity`` are detached or None, ``column_weights`` comes
    from :func:`column_weights`, ``weights`` is a (5,) float64 tensor.
    """

    @staticmethod
    def forward(ctx, pred, target, prev, raw, continuity, column_weights, weights):
        ctx.set_materialize_grads(False)  # no zero tensor for the gradient of `terms`
        need = ctx.needs_input_grad
        total, terms, grad_pred, grad_target, grad_raw = forward_op(
            pred, target, prev, raw, continuity, column_weights, weights, need[0], need[1], need[3]
        )
        ctx.save_for_backward(grad_pred, grad_target, grad_raw)
        ctx.mark_non_differentiable(terms)
        # Read by backward (pred's dtype) and by a create_graph backward (what
        # it linearizes around). Inputs, not outputs: no reference cycle.
        ctx.inputs = (pred, target, continuity, column_weights, weights, prev is not None)
        return total, terms

    @staticmethod
    def backward(ctx, grad_total, grad_terms):
        if grad_total is None:  # total did not reach the loss being differentiated
            return None, None, None, None, None, None, None
        grads = ctx.saved_tensors
        dtype = ctx.inputs[0].dtype
        if torch.is_grad_enabled():  # backward(create_graph=True)
            grads = _differentiable_gradients(ctx.inputs, grads, grad_total)
        elif not (
            grads[0].dtype == dtype  # float16 saves float32 gradients: they take the scaling pass
            and not torch.compiler.is_compiling()
            and _is_unit_cpu_scalar(grad_total)
        ):
            grads = scale_op(grad_total, *grads, dtype)
        # else: loss.backward() on the CPU. grad_output is exactly 1, so the
        # saved gradients are the answer. Handing them over (instead of a
        # scaled copy) saves a pass over memory; autograd steals them when the
        # graph is freed, and copies them if it is retained (retain_graph=True),
        # so nothing a second backward reads is ever modified.
        need = ctx.needs_input_grad
        return (
            grads[0] if need[0] else None,
            grads[1] if need[1] else None,
            None,
            grads[2] if need[3] else None,
            None,
            None,
            None,
        )


def _differentiable_gradients(inputs, saved, grad_total):
    """The saved gradients made differentiable, for double backward.

    The loss is piecewise quadratic, so its gradient is piecewise linear: away
    from the |x| = 0 kinks, where sign() has zero derivative, d grad_pred /
    d pred = kd[c] + kt[r], d grad_pred / d target = -kd[c], and so on. Adding
    ``H * (x - x.detach())`` (zero in value) to each saved gradient gives it
    exactly that Jacobian, so second derivatives are exact, without recomputing
    or saving anything in the forward pass beyond references to the inputs.
    """
    grad_pred, grad_target, grad_raw = saved
    pred, target, mask, colw, weights, has_prev = inputs
    cols = pred.shape[-1]
    rows = pred.numel() // cols
    acc = colw.dtype
    w = weights.to(device=colw.device, dtype=acc)  # tensor ops only: no host sync
    zero = w.new_zeros(())
    kd = torch.where(w[0] > 0, 2.0 * w[0] / (rows * cols), zero) + torch.where(w[2] > 0, 2.0 * w[2] / rows, zero) * colw
    d_pred = (pred - pred.detach()).to(acc)
    d_target = (target - target.detach()).to(acc)
    lin_d = kd * (d_pred - d_target)
    lin_pred = lin_d
    if has_prev:
        m = pred.new_ones(pred.shape[:-1], dtype=acc) if mask is None else mask.to(acc)
        m_sum = m.sum()
        kt = torch.where(w[3] > 0, 2.0 * w[3] / cols, zero) * m / torch.where(m_sum > 0, m_sum, torch.ones_like(m_sum))
        lin_pred = lin_pred + kt.unsqueeze(-1) * d_pred
    out = []
    for saved, lin, like in ((grad_pred, lin_pred, pred), (grad_target, -lin_d, target), (grad_raw, None, None)):
        if saved.numel() == 0:
            out.append(None)
        elif lin is None:
            out.append(grad_total * saved)
        else:
            out.append((grad_total * (saved.to(acc) + lin)).to(like.dtype))
    return out


def _make_column_weights(
    mouth: Sequence[int], expression: Sequence[int], cols: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    values = [0.0] * cols
    for group in (mouth, expression):
        for i in group:
            values[i] += 1.0 / len(group)
    return torch.tensor(values, dtype=dtype, device=device)


_COLUMN_WEIGHTS: dict = {}  # (tuple(mouth), tuple(expression), C, dtype, device) -> tensor
_COLUMN_WEIGHTS_BY_ID: dict = {}  # (id(mouth), id(expression), C, dtype, device) -> (mouth, expression, tensor)
_CACHEABLE = (tuple, list, range)


def column_weights(
    mouth_indices, expression_indices, cols: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-column perceptual weights ``count_M(c)/|M| + count_E(c)/|E|`` (the
    kernel divides by R), in the accumulation dtype of ``dtype``, cached per
    (indices, C, dtype, device) so a training step creates no tensor for them.

    The lookup runs every step. Tuples of ints (the defaults, and what most
    callers pass) cannot change, so they are found by identity, hashing no
    index; the entry holds the tuples, so their ids stay theirs. Lists and
    ranges are found by value."""
    if type(mouth_indices) is tuple and type(expression_indices) is tuple:
        hit = _COLUMN_WEIGHTS_BY_ID.get((id(mouth_indices), id(expression_indices), cols, dtype, device))
        if hit is not None:
            return hit[2]
    key = None
    if type(mouth_indices) in _CACHEABLE and type(expression_indices) in _CACHEABLE:
        key = (tuple(mouth_indices), tuple(expression_indices), cols, dtype, device)
        try:
            cached = _COLUMN_WEIGHTS.get(key)
        except TypeError:  # an unhashable entry: normalize_indices names it below
            key = cached = None
        if cached is not None:
            _remember_by_id(mouth_indices, expression_indices, cols, dtype, device, cached)
            return cached
    mouth = normalize_indices("mouth_indices", mouth_indices, cols)
    expression = normalize_indices("expression_indices", expression_indices, cols)
    result = _make_column_weights(mouth, expression, cols, accumulation_dtype(dtype), device)
    if key is not None and not torch.compiler.is_compiling():
        if len(_COLUMN_WEIGHTS) > 256:
            _COLUMN_WEIGHTS.clear()
        _COLUMN_WEIGHTS[key] = result
        _remember_by_id(mouth_indices, expression_indices, cols, dtype, device, result)
    return result


def _remember_by_id(mouth_indices, expression_indices, cols, dtype, device, result) -> None:
    """Adds a tuples-of-ints entry to the identity cache (anything else could change)."""
    if (
        type(mouth_indices) is tuple
        and type(expression_indices) is tuple
        and all(type(i) is int for i in mouth_indices + expression_indices)
        and not torch.compiler.is_compiling()
    ):
        if len(_COLUMN_WEIGHTS_BY_ID) > 256:
            _COLUMN_WEIGHTS_BY_ID.clear()
        key = (id(mouth_indices), id(expression_indices), cols, dtype, device)
        _COLUMN_WEIGHTS_BY_ID[key] = (mouth_indices, expression_indices, result)


def fused_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    prev: Optional[torch.Tensor],
    raw: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    colw: torch.Tensor,
    weights: torch.Tensor,
) -> LossOutput:
    """The loss, differentiable when a gradient can be needed. Eager calls with
    plain tensors use the C++ autograd node (csrc/loss_autograd.cpp); traced
    calls and tensor subclasses use :class:`FusedTemporalLoss`."""
    if not torch.compiler.is_compiling():
        out = _fast_loss(pred, target, prev, raw, mask, colw, weights)
        if out is not NotImplemented:
            return _new_tuple(LossOutput, out)
    return python_fused_forward(pred, target, prev, raw, mask, colw, weights)


def python_fused_forward(pred, target, prev, raw, mask, colw, weights) -> LossOutput:
    """:func:`fused_forward` with the Python autograd Function."""
    if torch.is_grad_enabled() and (
        pred.requires_grad or target.requires_grad or (raw is not None and raw.requires_grad)
    ):
        return _new_tuple(LossOutput, FusedTemporalLoss.apply(pred, target, prev, raw, mask, colw, weights))
    return _new_tuple(LossOutput, forward_op(pred, target, prev, raw, mask, colw, weights, False, False, False)[:2])

