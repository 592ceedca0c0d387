"""The autograd glue around the compiled operators.

* ``torch.ops.koemorph_fused.temporal_loss_forward``: one pass computing the
  five terms, the total and the requested gradients (csrc/cpu_loss_kernel.cpp,
  csrc/cuda/loss_kernel.cu);
* ``torch.ops.koemorph_fused.scale_gradients``: backward, the saved gradients
  times ``grad_output``; ``scale_gradients_`` does it in place, for a backward
  that hands the saved gradients over.

Here they get their fake (meta) kernels, for torch.compile and torch.export,
a vmap rule, and :class:`FusedTemporalLoss`, the ``torch.autograd.Function``
that joins them: forward saves the gradients the kernel already computed;
backward only scales them, reading ``grad_output`` on the device (no host
synchronisation); its ``jvp`` gives forward-mode AD from the same gradients.

:func:`fused_forward` chooses the autograd implementation: eager calls on
plain tensors use the same logic in C++ (csrc/loss_autograd.cpp, a
``torch::autograd::Function``: at small B the Python Function's own
bookkeeping cost more than the kernel); traced calls, which dynamo must see as
Python, tensor subclasses, forward-mode AD and torch.func transforms use
:class:`FusedTemporalLoss`. tests/test_autograd.py and tests/test_transforms.py
check both.
"""

from __future__ import annotations

from typing import Optional

import torch

import torch.autograd.forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._loader import load_library
from .terms import LossOutput

library = load_library()  # registers the operators

_torch_forward = torch.ops.koemorph_fused.temporal_loss_forward.default
_torch_scale = torch.ops.koemorph_fused.scale_gradients.default
_torch_scale_in_place = torch.ops.koemorph_fused.scale_gradients_.default
# Whether the running backward keeps its graph (retain_graph); None where
# torch lacks the query (then backward never hands its buffers over).
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
_fast_forward = library.forward
_fast_scale = library.scale
_fast_loss = library.loss
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


@torch.library.register_fake("koemorph_fused::scale_gradients_")
def _scale_gradients_in_place_fake(grad_output, grads):
    return None



def _forward_vmap(info, in_dims, pred, target, prev, raw, continuity, colw, weights, grad_pred, grad_target, grad_raw):
    """vmap rule of ``temporal_loss_forward``: the operator once per mapped
    slice, the results stacked. Each slice is an independent loss (its own
    rows, means and continuity sum), as a Python loop over the reference would
    give (per-sample gradients, ``vmap(grad(...))``)."""
    tensors = (pred, target, prev, raw, continuity, colw, weights)
    outs = []
    for i in range(info.batch_size):
        args = [x if d is None or x is None else x.select(d, i) for x, d in zip(tensors, in_dims[:7])]
        outs.append(_torch_forward(*args, grad_pred, grad_target, grad_raw))
    return tuple(torch.stack(column) for column in zip(*outs)), (0, 0, 0, 0, 0)


def _scale_vmap(info, in_dims, grad_output, grad_pred, grad_target, grad_raw, dtype):
    """vmap rule of ``scale_gradients`` (a backward under vmap, e.g.
    ``autograd.grad(..., is_grads_batched=True)``): once per mapped slice."""
    tensors = (grad_output, grad_pred, grad_target, grad_raw)
    outs = []
    for i in range(info.batch_size):
        args = [x if d is None else x.select(d, i) for x, d in zip(tensors, in_dims[:4])]
        outs.append(_torch_scale(*args, dtype))
    return tuple(torch.stack(column) for column in zip(*outs)), (0, 0, 0)


if hasattr(torch.library, "register_vmap"):  # torch >= 2.5
    torch.library.register_vmap("koemorph_fused::temporal_loss_forward", _forward_vmap)
    torch.library.register_vmap("koemorph_fused::scale_gradients", _scale_vmap)


def input_versions(tensors) -> Optional[tuple]:
    """Version counters of the inputs a backward may read again (None for an
    absent input or an inference tensor, which has none); None altogether
    when traced or inside a torch.func transform, where in-place changes of
    inputs are not tracked this way. See :func:`check_unchanged`."""
    if torch.compiler.is_compiling() or _transform_active():
        return None
    return tuple(x._version if isinstance(x, torch.Tensor) and not x.is_inference() else None for x in tensors)


def check_unchanged(names, tensors, versions: Optional[tuple], loss: str) -> None:
    """Raise, as autograd does for its saved tensors, when an input that this
    backward reads again (create_graph; the sequence loss's reduction "none")
    was changed in place after forward: it would otherwise give the gradients
    of other values. The C++ nodes check the same (csrc/loss_autograd.cpp)."""
    if versions is None:
        return
    for name, x, expected in zip(names, tensors, versions):
        if expected is not None and x._version != expected:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: {loss}'s {name} is at version {x._version}; expected version {expected} "
                "instead (this backward reads it again)")


#: The tensors of FusedTemporalLoss's ``ctx.inputs``, in order.
ROW_INPUT_NAMES = ("pred", "target", "continuity", "column_weights", "weights")


class FusedTemporalLoss(torch.autograd.Function):
    """``(total, terms, grad_pred, grad_target, grad_raw)`` of the fused loss;
    ``total`` is differentiable in pred, target and raw (reverse mode, also
    under torch.func transforms; :class:`FusedTemporalLossWithJvp` adds
    forward mode).

    Arguments are already validated (see :func:`koemorph_fused.temporal_loss`):
    ``prev`` and ``continuity`` are detached or None, ``column_weights`` comes
    from :func:`column_weights`, ``weights`` is a (5,) float64 tensor;
    ``want_*`` say which gradients the kernel computes (the ones backward or
    jvp can need). The gradients are outputs only because the
    ``setup_context`` form, which torch.func needs, gives forward no ctx to
    keep them in; they are marked non-differentiable.
    """

    generate_vmap_rule = True  # both operators have vmap rules; everything else is plain torch

    @staticmethod
    def forward(pred, target, prev, raw, continuity, column_weights, weights, want_pred, want_target, want_raw):
        return forward_op(pred, target, prev, raw, continuity, column_weights, weights,
                          want_pred, want_target, want_raw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, target, prev, raw, continuity, column_weights, weights = inputs[:7]
        _, terms, grad_pred, grad_target, grad_raw = output
        ctx.set_materialize_grads(False)  # no zero tensor for the gradient of `terms`
        ctx.mark_non_differentiable(terms, grad_pred, grad_target, grad_raw)
        ctx.save_for_backward(grad_pred, grad_target, grad_raw)
        # Read by backward (pred's dtype) and by a create_graph backward (what
        # it linearizes around). Inputs, not outputs: no reference cycle.
        ctx.inputs = (pred, target, continuity, column_weights, weights, prev is not None)
        ctx.versions = input_versions(ctx.inputs[:5])

    @staticmethod
    def backward(ctx, grad_total, *unused):
        if grad_total is None:  # total did not reach the loss being differentiated
            return (None,) * 10
        grads = ctx.saved_tensors
        dtype = ctx.inputs[0].dtype
        if torch.is_grad_enabled():  # backward(create_graph=True), torch.func.grad
            check_unchanged(ROW_INPUT_NAMES, ctx.inputs, ctx.versions, "temporal_loss")
            grads = _differentiable_gradients(ctx.inputs, grads, grad_total)
        elif _can_hand_over(grads, grad_total, dtype):
            # As the C++ node: scaled in place (the same bits as the scaling
            # pass) and handed over, as the graph is being freed.
            _torch_scale_in_place(grad_total, list(grads))
        else:
            # The scaling pass (grad_output read in its own precision, one
            # rounding to the input dtype) into new tensors: a retained graph
            # must not hand out the buffer a second backward reads.
            grads = scale_op(grad_total, *grads, dtype)
        need = ctx.needs_input_grad
        return (
            grads[0] if need[0] else None,
            grads[1] if need[1] else None,
            None,
            grads[2] if need[3] else None,
        ) + (None,) * 6


class FusedTemporalLossWithJvp(FusedTemporalLoss):
    """:class:`FusedTemporalLoss` with a ``jvp`` rule, for forward-mode AD
    (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``). Dynamo
    cannot trace a Function that defines ``jvp``, so traced calls use the
    base class; every eager call that reaches Python uses this one."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        FusedTemporalLoss.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*output[2:])

    @staticmethod
    def jvp(ctx, pred_t, target_t, prev_t, raw_t, *unused):
        """The directional derivative of ``total``: sum(gradient * tangent) over
        pred, target and raw (prev and continuity are constants)."""
        acc = ctx.inputs[3].dtype  # the column weights': float32 or float64
        total_t = None
        for g, t in zip(ctx.saved_tensors, (pred_t, target_t, raw_t)):
            if t is not None and g.numel() != 0:
                part = (g.to(acc) * t.to(acc)).sum()
                total_t = part if total_t is None else total_t + part
        return total_t, None, None, None, None


def _can_hand_over(saved, grad_total, dtype) -> bool:
    """Whether backward may scale the saved gradients in place and return
    them: they have the input's dtype, the graph is being freed (not
    ``retain_graph``, not ``create_graph``), and they are plain eager tensors
    (not traced, not under a torch.func transform, no tensor subclass)."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo cannot trace the query below
        and saved[0].dtype == dtype
        and _keep_graph is not None
        and not _keep_graph()
        and not _transform_active()
        and type(grad_total) is torch.Tensor
        and all(type(g) is torch.Tensor for g in saved)
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
    # The kernels' weight rule (effective_weight in csrc/loss_math.h), in
    # float64 where the weights are, then the kernels' coefficients rounded
    # once to acc. CPU weights stay on the CPU: their 0-dim slices enter the
    # device ops below as scalars (no host-to-device copy, no sync).
    w = weights.to(torch.float64)
    w = torch.where((w > 0) & w.isfinite(), w, w.new_zeros(()))

    def coefficient(term: int, scale: float) -> torch.Tensor:
        return (w[term] * scale).to(acc)

    kd = coefficient(0, 2.0 / (rows * cols)) + coefficient(2, 2.0 / rows) * colw
    d_pred = (pred - pred.detach()).to(acc)
    d_target = (target - target.detach()).to(acc)
    lin_d = kd * (d_pred - d_target)
    lin_pred = lin_d
    if has_prev:
        m = pred.new_ones(pred.shape[:-1], dtype=acc) if mask is None else mask.to(acc)
        m_sum = m.sum()
        kt = coefficient(3, 2.0 / cols) * m / torch.where(m_sum > 0, m_sum, torch.ones_like(m_sum))
        lin_pred = lin_pred + kt.unsqueeze(-1) * d_pred
    out = []
    for saved, lin, like in ((grad_pred, lin_pred, pred), (grad_target, -lin_d, target), (grad_raw, None, pred)):
        if saved.numel() == 0:
            out.append(None)
        elif lin is None:
            out.append((grad_total * saved.to(acc)).to(like.dtype))
        else:
            out.append((grad_total * (saved.to(acc) + lin)).to(like.dtype))
    return out


def _column_weight_values(mouth: tuple[int, ...], expression: tuple[int, ...], cols: int) -> list[float]:
    values = [0.0] * cols
    for group in (mouth, expression):
        for i in group:
            values[i] += 1.0 / len(group)
    return values


_MAX_CACHED_KEYS = 256
_COLUMN_WEIGHTS: dict = {}  # (mouth, expression, C, dtype, device) -> tensor; never evicted
_CAPTURE_SOURCES: dict = {}  # the same key -> the host tensor that captured copies read


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is being captured into a CUDA graph."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def column_weights(
    mouth: tuple[int, ...], expression: tuple[int, ...], cols: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-column perceptual weights ``count_M(c)/|M| + count_E(c)/|E|`` (the
    kernel divides by R), in the accumulation dtype of ``dtype``.

    ``mouth`` and ``expression`` are index tuples already normalized by
    :func:`~koemorph_fused._validation.normalize_indices` (ints in [0, C)), so
    the tensor is a function of the key alone. It is kept per (indices, C,
    dtype, device), so that a training step creates no tensor for it (on a
    GPU: no copy either). Lifetimes (docs/design.md, "Column weights"):

    * outside a CUDA graph capture it is made by a blocking copy, complete on
      return (any stream may read it), and kept for good: entries are never
      evicted, since a graph captured later may read them; past
      ``_MAX_CACHED_KEYS`` keys a call makes its own tensor and keeps none;
    * inside a capture nothing is cached (the tensor would be filled only by
      a replay): one copy node from a host tensor kept for good, as the
      graph's replays read it; the device tensor lives in the graph's pool.
    """
    acc = accumulation_dtype(dtype)
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        # A tensor of that trace or mode (e.g. a FakeTensor): never kept, and
        # the cache is not read either (no guard on it, no real tensor in a
        # fake computation).
        return torch.tensor(_column_weight_values(mouth, expression, cols), dtype=acc, device=device)
    key = (mouth, expression, cols, dtype, device)
    cached = _COLUMN_WEIGHTS.get(key)
    if cached is not None:
        return cached
    if _capturing(device):
        source = _CAPTURE_SOURCES.get(key)
        if source is None:
            source = _CAPTURE_SOURCES[key] = torch.tensor(_column_weight_values(mouth, expression, cols), dtype=acc)
        # Asynchronous: recorded as one copy node, read from `source` at each replay.
        return source.to(device, non_blocking=True)
    result = torch.tensor(_column_weight_values(mouth, expression, cols), dtype=acc, device=device)
    # Made inside a torch.func transform, the tensor belongs to that level (a
    # functorch wrapper, without storage of its own); made in inference mode,
    # it could not be saved for a later backward: never keep those.
    if len(_COLUMN_WEIGHTS) < _MAX_CACHED_KEYS and not _transform_active() and not torch.is_inference_mode_enabled():
        _COLUMN_WEIGHTS[key] = result
    return result


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
    calls, tensor subclasses, forward-mode AD and torch.func transforms (the
    C++ entry declines those) use :class:`FusedTemporalLoss`."""
    if not torch.compiler.is_compiling() and _forward_ad._current_level < 0:
        out = _fast_loss(pred, target, prev, raw, mask, colw, weights)
        if out is not NotImplemented:
            return _new_tuple(LossOutput, out)
    return python_fused_forward(pred, target, prev, raw, mask, colw, weights)


def _transform_active() -> bool:
    """Forward-mode AD or a torch.func transform (grad, vjp, jvp, vmap, ...)."""
    return _forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def wanted_gradients(pred, target, raw) -> tuple[bool, bool, bool]:
    """The gradients of pred, target and raw the kernel computes: under a
    torch.func transform every one (tangents and transformed tensors need not
    require grad), otherwise those of inputs that require grad, in grad mode."""
    if not torch.compiler.is_compiling() and _transform_active():
        check_forward_mode_not_nested()
        return (True, True, raw is not None)
    grad = torch.is_grad_enabled()
    return (grad and pred.requires_grad, grad and target.requires_grad,
            grad and raw is not None and raw.requires_grad)


def traced_in_transform() -> bool:
    """Whether ``torch.compile`` is tracing a call inside a torch.func
    transform (the transform inside the compiled function or around it).

    Traced there, dynamo reads the transform's inputs as not requiring grad
    (a torch bug, seen in 2.14), inlines the Function's forward and drops its
    backward; our operators return their gradients rather than being
    differentiable, so the derivatives came out zero, silently. Such a call
    goes through :func:`koemorph_fused._untraced.run_untraced`. (Dynamo tells
    that some transform is active, not which: a compiled ``vmap`` goes there
    too.)"""
    # `is not None` is no test here: dynamo wraps even a None result.
    return torch.compiler.is_compiling() and not isinstance(torch._C._functorch.peek_interpreter_stack(),
                                                            type(None))


def check_forward_mode_not_nested() -> None:
    """Raise where two forward-mode levels are active (``jvp`` or ``jacfwd``
    inside ``jvp`` or ``jacfwd``): torch does not differentiate an
    autograd.Function's ``jvp`` rule at an outer forward level, and both
    losses' Functions would return zeros (or torch's internal error) there.
    One forward level (``jvp``, ``jacfwd``, ``hessian`` = ``jacfwd(jacrev)``)
    is supported."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        levels = sum(i.key() == torch._C._functorch.TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):  # a torch without these internals: nothing to count
        return
    if levels >= 2:  # (torch.func.jvp also opens a forward_ad level: not counted twice)
        raise NotImplementedError(
            "koemorph_fused: forward-mode AD nested in forward-mode AD (jvp or jacfwd inside jvp or jacfwd) is "
            "not supported, because torch does not differentiate a custom autograd.Function's jvp rule; for "
            "second derivatives use torch.func.hessian (jacfwd(jacrev(...))), jacrev(jacrev(...)) or double "
            "backward")


def python_fused_forward(pred, target, prev, raw, mask, colw, weights) -> LossOutput:
    """:func:`fused_forward` with the Python autograd Function."""
    if traced_in_transform():
        from ._untraced import run_untraced  # torch._dynamo is loaded: we are being traced

        return run_untraced(python_fused_forward, pred, target, prev, raw, mask, colw, weights)
    want = wanted_gradients(pred, target, raw)
    if any(want):
        function = FusedTemporalLoss if torch.compiler.is_compiling() else FusedTemporalLossWithJvp
        total, terms, *_ = function.apply(pred, target, prev, raw, mask, colw, weights, *want)
        return _new_tuple(LossOutput, (total, terms))
    return _new_tuple(LossOutput, forward_op(pred, target, prev, raw, mask, colw, weights, False, False, False)[:2])
