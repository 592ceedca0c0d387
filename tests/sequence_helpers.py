"""Helpers of the sequence tests: random windows and the fused-vs-reference comparison."""

from __future__ import annotations

import torch

import koemorph_fused as kf

from helpers import TOL, assert_close


def rand_windows(batch, frames, cols=52, dtype=torch.float32, generator=None):
    """pred, target, raw (B, T, C) and prev, prev_target (B, C), values in [0, 1)."""
    def r(*shape):
        return torch.rand(shape, dtype=torch.float64, generator=generator).to(dtype)
    return r(batch, frames, cols), r(batch, frames, cols), r(batch, frames, cols), r(batch, cols), r(batch, cols)


def run_sequence(fn, pred, target, raw=None, *, grad_target=True, grad_output=None, **kwargs):
    """Call fn on fresh leaves; returns (out, {name: grad}). grad_output defaults to ones."""
    leaves = {"pred": pred.detach().clone().requires_grad_()}
    t = target.detach().clone()
    if grad_target:
        leaves["target"] = t.requires_grad_()
    r = None
    if raw is not None:
        leaves["raw"] = r = raw.detach().clone().requires_grad_()
    out = fn(leaves["pred"], t, r, **kwargs)
    go = torch.ones_like(out.total) if grad_output is None else grad_output
    grads = torch.autograd.grad(out.total, list(leaves.values()), go, allow_unused=True, materialize_grads=True)
    return out, dict(zip(leaves, grads))


def assert_sequence_matches_reference(pred, target, raw=None, **kwargs):
    """kf.sequence_loss equals kf.reference.sequence_loss: terms, total,
    counts and every gradient, in the dtypes of docs/spec.md."""
    fused, fused_grads = run_sequence(kf.sequence_loss, pred, target, raw, **kwargs)
    ref, ref_grads = run_sequence(kf.reference.sequence_loss, pred, target, raw, **kwargs)
    tol = TOL[pred.dtype]
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    assert fused.total.dtype == fused.terms.dtype == acc
    assert fused.counts.dtype == torch.int64 and fused.counts.shape == (6,)
    assert torch.equal(fused.counts, ref.counts), (fused.counts, ref.counts)
    assert_close(fused.terms, ref.terms, *tol["values"], what="terms")
    assert_close(fused.total.detach(), ref.total.detach(), *tol["values"], what="total")
    for name, g in fused_grads.items():
        assert g.dtype == pred.dtype and g.shape == pred.shape, name
        assert_close(g, ref_grads[name], *tol["grads"], what=f"grad {name}")
    return fused, ref, fused_grads, ref_grads
