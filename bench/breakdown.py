"""Where the fused loss's time goes at a given B: a ladder of variants, each
adding one layer of what ``kf.temporal_loss(...).total.backward()`` does,
timed in interleaved rounds like ``koemorph-fused bench`` (same timer).

    PYTHONPATH=. python bench/breakdown.py --batch 4 --threads 2 --rounds 11

Variants (fwdbwd: pred.grad = raw.grad = None, then forward and backward):

  floor_none     do-nothing autograd.Function, backward returns None
  floor          do-nothing Function, backward returns preallocated zero grads
  bookkeeping    do-nothing Function with FusedTemporalLoss's Python bookkeeping:
                 set_materialize_grads(False), two outputs (total, terms),
                 mark_non_differentiable, save_for_backward of 3 tensors,
                 ctx.inputs, needs_input_grad checks; backward returns
                 the saved (preallocated) gradients
  function       _ops.FusedTemporalLoss.apply on prepared arguments: the Python
                 autograd Function of traced calls and transforms, with the
                 real operators (forward kernel + scale_gradients), without
                 the argument checks of temporal_loss
  node           _ops._fast_loss on prepared arguments: the C++ autograd node
                 that eager calls use (csrc/loss_autograd.cpp), without the checks
  fused          kf.temporal_loss (checks, column weights, LossOutput) = the bench's fused

and forward-only pieces (under no_grad):

  checks         resolve_weights + check_inputs + check_weight_tensor +
                 normalize_indices (twice) + column_weights: the validation
                 every call runs
  op_overload    torch.ops.koemorph_fused.temporal_loss_forward.default(...), no grads
  op_grads       the same, computing grad_pred and grad_raw
  scale_op       torch.ops.koemorph_fused.scale_gradients.default(...)
  aten_add_op    torch.ops.aten.add.Tensor(a, b) on (B, 52): per-call cost of the
                 OpOverload path for a builtin op ...
  aten_add       ... and torch.add(a, b), the same op through the usual binding
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch

import koemorph_fused as kf
from koemorph_fused import _ops, benchmark as bm
from koemorph_fused._validation import check_inputs, check_weight_tensor, normalize_indices
from koemorph_fused.weights import DEFAULT, resolve_weights


def make_variants(batch: int, dtype: torch.dtype):
    case = bm.Case("cpu", str(dtype).replace("torch.", ""), "fwdbwd", batch, torch.get_num_threads())
    x = bm.make_inputs(case)
    pred, target, prev, raw = x.pred, x.target, x.prev, x.raw
    colw = _ops.column_weights(kf.MOUTH_INDICES, kf.EXPRESSION_INDICES, 52, pred.dtype, pred.device)
    w = kf.LossWeights().as_tensor()
    zp, zr, zt = torch.zeros_like(pred), torch.zeros_like(raw), pred.new_empty((0,))
    acc = torch.float32

    class Bookkeeping(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pred, target, prev, raw, continuity, column_weights, weights):
            ctx.set_materialize_grads(False)
            need = ctx.needs_input_grad
            total = pred.new_zeros((), dtype=acc)
            terms = pred.new_zeros((5,), dtype=acc)
            ctx.save_for_backward(zp, zt, zr)
            ctx.mark_non_differentiable(terms)
            ctx.inputs = (pred, target, continuity, column_weights, weights, prev is not None)
            del need
            return total, terms

        @staticmethod
        def backward(ctx, grad_total, grad_terms):
            gp, gt, gr = ctx.saved_tensors
            need = ctx.needs_input_grad
            return (gp.detach() if need[0] else None, None, None, gr.detach() if need[3] else None,
                    None, None, None)

    floor = bm.make_floor_function(zp, zr, "zeros")
    floor_none = bm.make_floor_function(zp, zr, "none")

    def step(loss):
        def fn():
            pred.grad = None
            raw.grad = None
            loss().backward()
        return fn

    a = torch.rand(batch, 52, dtype=dtype)
    b = torch.rand(batch, 52, dtype=dtype)
    with torch.no_grad():
        _, _, gp, gt, gr = _ops.forward_op(pred, target, prev, raw, None, colw, w, True, False, True)
    one = torch.ones((), dtype=acc)

    graph = {
        "floor_none": step(lambda: floor_none.apply(pred, target, prev, raw)),
        "floor": step(lambda: floor.apply(pred, target, prev, raw)),
        "bookkeeping": step(lambda: Bookkeeping.apply(pred, target, prev, raw, None, colw, w)[0]),
        "function": step(lambda: _ops.FusedTemporalLoss.apply(pred, target, prev, raw, None, colw, w,
                                                              True, False, True)[0]),
        "node": step(lambda: _ops._fast_loss(pred, target, prev, raw, None, colw, w)[0]),
        "fused": step(lambda: kf.temporal_loss(pred, target, prev, raw).total),
    }
    nograd = {
        "checks": lambda: (check_weight_tensor(resolve_weights(DEFAULT).as_tensor(), pred, mutable=False),
                           check_inputs(pred, target, prev, raw, None),
                           _ops.column_weights(normalize_indices("mouth_indices", kf.MOUTH_INDICES, 52),
                                               normalize_indices("expression_indices", kf.EXPRESSION_INDICES, 52),
                                               52, pred.dtype, pred.device)),
        "op_overload": lambda: _ops.forward_op(pred, target, prev, raw, None, colw, w, False, False, False),
        "op_grads": lambda: _ops.forward_op(pred, target, prev, raw, None, colw, w, True, False, True),
        "scale_op": lambda: _ops.scale_op(one, gp, gt, gr, pred.dtype),
        "aten_add_op": lambda: torch.ops.aten.add.Tensor(a, b),
        "aten_add": lambda: torch.add(a, b),
    }
    steps = [bm.Step(k, f, grad_enabled=True) for k, f in graph.items()]
    steps += [bm.Step(k, f, grad_enabled=False) for k, f in nograd.items()]
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--min-time", type=float, default=0.05)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = make_variants(args.batch, getattr(torch, args.dtype))
    iters = {s.provider: bm.calibrate(s, "cpu", args.min_time) for s in steps}
    times = {s.provider: [] for s in steps}
    load = bm.CpuLoad()
    for r in range(args.rounds):
        k = r % len(steps)
        gc.collect()
        gc.disable()
        for s in steps[k:] + steps[:k]:
            times[s.provider].append(bm.time_block(s, iters[s.provider], "cpu"))
        gc.enable()
    others, steal = load.since()
    print(f"# B={args.batch} {args.dtype} threads={args.threads} rounds={args.rounds}; "
          f"others used {others:.0f}% of the CPUs, steal {steal:.1f}%")
    print(f"{'variant':14s} {'median':>10s} {'q1':>10s} {'q3':>10s}  {'delta to previous (graph ladder)':>34s}")
    prev = None
    for s in steps:
        ts = times[s.provider]
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        med = statistics.median(ts)
        delta = ""
        if s.grad_enabled and prev is not None:
            delta = f"+{(med - prev) * 1e6:8.1f} us"
        print(f"{s.provider:14s} {med * 1e6:8.1f}us {q[0] * 1e6:8.1f}us {q[2] * 1e6:8.1f}us  {delta:>34s}")
        prev = med if s.grad_enabled else prev
    return 0


if __name__ == "__main__":
    sys.exit(main())
