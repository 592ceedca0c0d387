"""Shared test helpers: random inputs and the fused-vs-reference comparison."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch

import koemorph_fused as kf

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (rtol, atol) for values (terms, total) and for gradients, per input dtype.
# Values are accumulated in float32/float64 by both sides; gradients of
# float16/bfloat16 inputs are rounded to the input dtype (1 ulp apart at most).
TOL = {
    torch.float64: dict(values=(1e-10, 1e-12), grads=(1e-10, 1e-14)),
    torch.float32: dict(values=(2e-5, 1e-6), grads=(1e-5, 1e-9)),
    torch.float16: dict(values=(2e-3, 1e-5), grads=(2e-3, 1e-7)),
    torch.bfloat16: dict(values=(2e-3, 1e-5), grads=(1.6e-2, 1e-7)),
}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


ROOT = Path(__file__).resolve().parents[1]


def copy_source_tree(tree: Path) -> None:
    """This repository's csrc/ and koemorph_fused/ under `tree`, without any
    built library: a source tree that has to build its own."""
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copytree(ROOT / "koemorph_fused", tree / "koemorph_fused",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def rand(shape, dtype=torch.float32, device="cpu", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Values in [0, 1) like blendshape weights, drawn in float64 for reproducibility across dtypes."""
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(dtype=dtype, device=device)


def run(fn, pred, target, prev=None, raw=None, grad_output=1.0, **kwargs):
    """Call fn on fresh leaves; returns (total, terms, {name: grad})."""
    leaves = {}
    p = pred.detach().clone().requires_grad_()
    leaves["pred"] = p
    t = target.detach().clone()
    if target.requires_grad:
        t.requires_grad_()
        leaves["target"] = t
    r = None
    if raw is not None:
        r = raw.detach().clone().requires_grad_()
        leaves["raw"] = r
    out = fn(p, t, prev, r, **kwargs)
    go = torch.as_tensor(grad_output, dtype=out.total.dtype, device=out.total.device)
    # An input whose terms are all weighted 0 is unused by the reference: its gradient is 0.
    grads = torch.autograd.grad(out.total, list(leaves.values()), go, allow_unused=True, materialize_grads=True)
    return out.total.detach(), out.terms.detach(), dict(zip(leaves, grads))


def assert_close(actual, expected, rtol, atol, what=""):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_matches_reference(pred, target, prev=None, raw=None, grad_output=1.0, **kwargs):
    """The fused loss equals the reference: terms, total and every gradient,
    with the output dtypes the SPEC fixes."""
    fused = run(kf.temporal_loss, pred, target, prev, raw, grad_output, **kwargs)
    ref = run(kf.reference.temporal_loss, pred, target, prev, raw, grad_output, **kwargs)
    tol = TOL[pred.dtype]
    expected_out_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    assert fused[0].dtype == expected_out_dtype and fused[0].dim() == 0
    assert fused[1].shape == (5,)
    assert_close(fused[1], ref[1], *tol["values"], what="terms")
    assert_close(fused[0], ref[0], *tol["values"], what="total")
    assert fused[2].keys() == ref[2].keys()
    for name in fused[2]:
        assert fused[2][name].dtype == pred.dtype, f"grad {name} dtype"
        assert_close(fused[2][name], ref[2][name], *tol["grads"], what=f"grad {name}")
    return fused, ref


def capture_graph(step, warmup: int = 3):
    """``(graph, captured)``: ``step()`` captured in a CUDA graph after a
    warm-up on a side stream (as torch.cuda.graph asks); ``captured`` is what
    the captured call returned (static outputs that each replay refills)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_then_exit(rank: int, worker, *args) -> None:
    """Run ``worker(rank, *args)``; when it returns, leave the process at once.

    torch's gloo teardown at interpreter exit sometimes aborts the process
    ("terminate called without an active exception", SIGABRT) after all its
    work is done and the process group destroyed: 4 of 60 two-process runs of
    plain DDP with ``F.mse_loss`` and no koemorph_fused import on this
    project's machine (torch 2.14.1), 0 of 80 with ``os._exit(0)`` after the
    worker. A worker that raises still fails the test (mp.spawn reports it)."""
    import os
    import sys

    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_workers(worker, *args, nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn`` of ``worker(rank, *args)`` on ``nprocs``
    processes, each leaving without interpreter teardown once its worker
    returned (see :func:`_run_then_exit`)."""
    import torch.multiprocessing as mp

    mp.spawn(_run_then_exit, args=(worker, *args), nprocs=nprocs, join=True)
