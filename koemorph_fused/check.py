"""``koemorph-fused check``: the fused loss against the plain-PyTorch reference,
values and gradients, on every available device: rows (``temporal_loss``) and
windows of frames (``sequence_loss``)."""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from . import reference
from .cli_args import CommandLineError
from .functional import temporal_loss
from .sequence import sequence_loss
from .weights import LossWeights

#: Tolerances per dtype: (rtol, atol) on terms and total, and on gradients.
TOLERANCES = {
    torch.float64: ((1e-10, 1e-12), (1e-10, 1e-13)),
    torch.float32: ((1e-5, 1e-6), (1e-5, 1e-8)),
    torch.bfloat16: ((1e-3, 1e-5), (1.6e-2, 1e-5)),
    torch.float16: ((1e-3, 1e-5), (2e-3, 1e-6)),
}


@dataclass(frozen=True)
class Case:
    device: str
    dtype: torch.dtype
    rows: int
    cols: int
    with_prev: bool
    with_raw: bool
    mask: bool
    #: 0: rows (B, C) through temporal_loss; else windows (B, frames, C)
    #: through sequence_loss, with lengths for ``mask`` and prev_target with prev.
    frames: int = 0

    def label(self) -> str:
        shape = f"{self.rows}x{self.frames}x{self.cols}" if self.frames else f"{self.rows}x{self.cols}"
        mask = "lengths" if self.frames else "mask"
        parts = [self.device, str(self.dtype).replace("torch.", ""), shape]
        parts += [name for name, on in (("prev", self.with_prev), ("raw", self.with_raw), (mask, self.mask)) if on]
        return " ".join(parts)


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def cases(devices: list[str], quick: bool = False) -> Iterator[Case]:
    shapes = [(4, 52), (33, 7), (1024, 52)] if quick else [(1, 1), (4, 52), (33, 7), (1000, 52), (64, 300), (16384, 52)]
    dtypes = list(TOLERANCES)
    flags = [(True, True, True), (False, False, False)] if quick else list(itertools.product([True, False], repeat=3))
    for device, dtype, (rows, cols), (p, r, m) in itertools.product(devices, dtypes, shapes, flags):
        yield Case(device, dtype, rows, cols, p, r, m and p)
    windows = [(3, 5, 52), (64, 128, 52)] if quick else [(1, 1, 1), (3, 5, 52), (7, 33, 61), (64, 128, 52), (8, 1024, 52)]
    for device, dtype, (rows, frames, cols), (p, r, m) in itertools.product(devices, dtypes, windows, flags):
        yield Case(device, dtype, rows, cols, p, r, m, frames)


def run_case(case: Case, seed: int = 0) -> tuple[float, float, bool]:
    """Max relative error of the terms/total and of the gradients, and whether
    both are within :data:`TOLERANCES`."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.rows, case.cols)

    def rand(size: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(size, generator=g, dtype=torch.float64).to(case.dtype).to(case.device)

    weights = LossWeights(mse=1.0, l1=0.1, perceptual=0.5, temporal=0.2, smoothing=0.1)
    # The ARKit groups need C >= 22; narrower cases use a repeated and a negative index.
    groups = {} if case.cols >= 22 else {"mouth_indices": (0, case.cols - 1, -1), "expression_indices": ()}
    if case.frames:
        window = (case.rows, case.frames, case.cols)
        pred, target = rand(window), rand(window)
        prev, prev_target = (rand(shape), rand(shape)) if case.with_prev else (None, None)
        raw = rand(window) if case.with_raw else None
        frame_args = dict(prev=prev, prev_target=prev_target, velocity_weight=0.5, weights=weights, **groups)
        if case.mask:
            lengths = torch.randint(0, case.frames + 1, (case.rows,), generator=g)
            frame_args.update(lengths=lengths.to(case.device), continuity=(lengths % 2).to(case.device))
        functions = (sequence_loss, reference.sequence_loss)

        def call(fn, p, t, r):
            return fn(p, t, r, **frame_args)
    else:
        pred, target = rand(shape), rand(shape)
        prev = rand(shape) if case.with_prev else None
        raw = rand(shape) if case.with_raw else None
        mask = (torch.rand(case.rows, generator=g) > 0.3).to(case.device) if case.mask else None
        functions = (temporal_loss, reference.temporal_loss)

        def call(fn, p, t, r):
            return fn(p, t, prev, r, continuity=mask, weights=weights, **groups)
    grad_out = torch.rand((), generator=g, dtype=torch.float64).item() + 0.5

    results = []
    for fn in functions:
        p = pred.clone().requires_grad_()
        t = target.clone().requires_grad_()
        r = raw.clone().requires_grad_() if raw is not None else None
        out = call(fn, p, t, r)
        inputs = [x for x in (p, t, r) if x is not None]
        grads = torch.autograd.grad(out.total * grad_out, inputs)
        results.append((torch.cat([out.terms, out.total.reshape(1)]).double(), [x.double() for x in grads]))

    (vf, gf), (vr, gr) = results
    (rtol_v, atol_v), (rtol_g, atol_g) = TOLERANCES[case.dtype]

    def rel(a: torch.Tensor, b: torch.Tensor, atol: float) -> float:
        return ((a - b).abs() / (b.abs() + atol)).max().item()

    err_v = rel(vf, vr, atol_v / rtol_v)
    err_g = max(rel(a, b, atol_g / rtol_g) for a, b in zip(gf, gr))
    ok = torch.allclose(vf, vr, rtol=rtol_v, atol=atol_v) and all(
        torch.allclose(a, b, rtol=rtol_g, atol=atol_g) for a, b in zip(gf, gr)
    )
    return err_v, err_g, ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="where to check (default: every available device)")
    parser.add_argument("--quick", action="store_true", help="a few representative cases only")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every case, not only failures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    devices = available_devices() if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise CommandLineError("--device cuda: no CUDA device is available")
    todo = list(cases(devices, quick=args.quick))
    failures = 0
    worst: dict[tuple[str, torch.dtype], tuple[float, float]] = {}
    for case in tqdm(todo, desc="fused vs reference", unit="case", leave=False, disable=args.no_progress):
        err_v, err_g, ok = run_case(case)
        key = (case.device, case.dtype)
        prev_v, prev_g = worst.get(key, (0.0, 0.0))
        worst[key] = (max(prev_v, err_v), max(prev_g, err_g))
        if not ok:
            failures += 1
        if args.verbose or not ok:
            tqdm.write(f"{'ok  ' if ok else 'FAIL'} {case.label():40s} values {err_v:.2e}  gradients {err_g:.2e}")
    print(f"{'device':8s} {'dtype':10s} {'worst rel. error: values':>26s} {'gradients':>12s}")
    for (device, dtype), (ev, eg) in worst.items():
        print(f"{device:8s} {str(dtype).replace('torch.', ''):10s} {ev:26.2e} {eg:12.2e}")
    print(f"{len(todo) - failures}/{len(todo)} cases agree with the reference"
          + ("" if failures == 0 else f"; {failures} FAILED"))
    return 0 if failures == 0 else 1
