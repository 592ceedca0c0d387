"""Per-step time of a training step's loss under CUDA-graph replay (GPU only).

A step is the loss of pred, target, prev and raw (C = 52, a continuity mask)
and the gradients of pred and raw (``torch.autograd.grad``), captured once
into a CUDA graph and replayed: what a training loop with CUDA graphs pays
per step, launch overheads gone. For the fused loss and the plain-PyTorch
reference, against a device copy of the same bytes (fwdbwd moves 10 N
elements: 4 inputs read, 2 gradients written and, in backward, read and
written), also replayed from a graph. Times are medians of CUDA-event-timed
blocks of replays.

    python bench/graph_replay.py [--batch 4,1024,65536,1048576] [--dtype float32,bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch

import koemorph_fused as kf

COLS = 52


def capture(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """step() captured after a warm-up on a side stream (as torch.cuda.graph asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def time_per_call(run: Callable[[], object], min_ms: float = 20.0, blocks: int = 5) -> float:
    """Median seconds per call, over `blocks` CUDA-event-timed blocks of >= min_ms."""
    run()
    torch.cuda.synchronize()
    iters = 1
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        if start.elapsed_time(end) >= min_ms or iters >= 1 << 16:
            break
        iters *= 2
    times = []
    for _ in range(blocks):
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def measure(batch: int, dtype: torch.dtype) -> dict[str, float]:
    dev = "cuda"
    pred, target, prev, raw = (torch.rand(batch, COLS, device=dev).to(dtype) for _ in range(4))
    pred.requires_grad_()
    raw.requires_grad_()
    mask = torch.rand(batch, device=dev) > 0.1
    result = {}
    for name, loss in (("fused", kf.temporal_loss), ("eager", kf.reference.temporal_loss)):
        def step(loss=loss):
            out = loss(pred, target, prev, raw, continuity=mask)
            return torch.autograd.grad(out.total, (pred, raw))

        result[f"{name}_step"] = time_per_call(step)
        try:
            result[f"{name}_replay"] = time_per_call(capture(step).replay)
        except RuntimeError as e:  # e.g. a host sync that a capture forbids
            print(f"{name} B={batch} {dtype}: not captured: {e}", file=sys.stderr)
            result[f"{name}_replay"] = float("nan")
    src = torch.empty(10 * batch * COLS, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    result["copy_replay"] = time_per_call(capture(lambda: dst.copy_(src)).replay)
    return result


def fmt_us(s: float) -> str:
    return f"{s * 1e6:9.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="4,1024,65536,1048576", help="batch sizes B (rows of 52)")
    parser.add_argument("--dtype", default="float32,bfloat16", help="input dtypes")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_replay: needs a CUDA device", file=sys.stderr)
        return 2
    lines = [
        f"CUDA-graph replay, loss + grad of pred and raw, C = {COLS}, mask; {torch.cuda.get_device_name()}",
        "dtype          B   fused step us  fused replay us  eager replay us  copy replay us  eager/fused  %copy",
    ]
    print("\n".join(lines), flush=True)
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        for batch in map(int, args.batch.split(",")):
            r = measure(batch, dtype)
            lines.append(
                f"{dtype_name:9} {batch:8d}     {fmt_us(r['fused_step'])}        {fmt_us(r['fused_replay'])}"
                f"        {fmt_us(r['eager_replay'])}       {fmt_us(r['copy_replay'])}"
                f"      {r['eager_replay'] / r['fused_replay']:7.2f}  {100 * r['copy_replay'] / r['fused_replay']:5.0f}"
            )
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
