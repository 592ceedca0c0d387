"""Benchmarks of the fused loss: ONE definition of the cases, the providers and
the timing method, shared by ``koemorph-fused bench`` (this module's
:func:`main`) and the pytest-benchmark suite in ``bench/``.

What is timed
-------------
A *case* is (device, dtype, mode, batch B, threads) with C = 52 and all four
inputs present (``pred``, ``target``, ``prev``, ``raw``; contiguous; continuity
None). A *provider* is one way of computing it:

``fused``
    :func:`koemorph_fused.temporal_loss`.
``eager``
    :func:`koemorph_fused.reference.temporal_loss` (plain PyTorch ops).
``compile``
    ``torch.compile(lambda ...: reference.temporal_loss(...).total, dynamic=False)``,
    compiled once per case (its compile time is measured separately, never
    inside the timings) and warmed up before timing.

and, measured in the same rounds as baselines:

``copy``
    ``dst.copy_(src)`` into a preallocated buffer moving as many bytes
    (read + write) as the loss must move at least: the bandwidth ceiling.
``floor``
    a do-nothing :class:`torch.autograd.Function` taking ``(pred, target,
    prev, raw)``: forward returns a new 0-dim tensor, backward returns
    preallocated zero gradients for ``pred`` and ``raw`` (as detached aliases,
    so that AccumulateGrad takes them over exactly as it takes over the fused
    loss's fresh gradients). The cost of the autograd round trip itself.
``floor_none``
    the same Function whose backward returns None for every input: the
    engine still runs the graph, but AccumulateGrad has nothing to store.
``floor_clone``
    (not measured by default) backward returns the preallocated zero tensors
    themselves; AccumulateGrad then sees a second reference and must clone
    them into a fresh ``.grad``: a copy of B x 52 per gradient.

Modes: ``fwd`` is the forward under ``torch.no_grad()``; ``fwdbwd`` is one
training step's worth of loss work with ``pred`` and ``raw`` requiring grad:
``pred.grad = raw.grad = None`` (like ``optimizer.zero_grad()``), the loss,
and ``total.backward()``.

Minimum bytes moved (``min_bytes``), with N = B * 52 elements of the input
dtype: ``fwd`` reads 4 tensors (4N); ``fwdbwd`` reads 4 and writes 2 gradients
in forward and reads and writes the 2 gradients in backward (4N + 2N + 2N + 2N
= 10N). Achieved GB/s is ``min_bytes / time``; the copy moves the same bytes,
so ``copy_pct = copy time / provider time``.

Timing: per case every provider is set up and warmed up, the number of
iterations per timed block is calibrated so that one block lasts at least
``min_time`` seconds, then ``rounds`` rounds are run in which every provider
times one block, in an order rotated from round to round (providers are
interleaved, so slow drifts of a noisy machine hit all of them alike). Each
provider's statistic is over its per-round block means; ratios come from the
same rounds. Python's garbage collector is off inside timed blocks. On CUDA
each block is timed with CUDA events after a ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .cli_args import CommandLineError, csv_list, float_arg, int_arg, output_file, plot_file, thread_count

COLS = 52
BATCHES: tuple[int, ...] = (4, 64, 1024, 16384, 262144, 1048576)
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
MODES: tuple[str, ...] = ("fwd", "fwdbwd")
THREADS: tuple[int, ...] = (1, 2)
PROVIDERS: tuple[str, ...] = ("fused", "eager", "compile")
BASELINES: tuple[str, ...] = ("copy", "floor", "floor_none")
ALL_BASELINES: tuple[str, ...] = BASELINES + ("floor_clone",)
DEFAULT_MIN_TIME = 0.1
DEFAULT_ROUNDS = 7

#: The subset ``--quick`` selects (each explicit flag still overrides it).
QUICK = dict(
    batch=(4, 1024),
    dtype=("float32",),
    mode=("fwd", "fwdbwd"),
    threads=(1,),
    providers=("fused", "eager"),
    min_time=0.005,
    rounds=3,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Columns of the per-provider rows (--csv, and "results" in --json).
RESULT_COLUMNS: tuple[str, ...] = (
    "device", "dtype", "mode", "threads", "batch", "cols", "provider", "kind",
    "median_s", "q1_s", "q3_s", "min_s", "max_s", "iqr_pct", "rounds", "iters_per_round",
    "bytes", "gbps", "copy_pct", "ratio_to_fused", "compile_s", "error", "other_load_pct", "steal_pct",
)

# Columns of the per-case summary (terminal table, and "cases" in --json).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "device", "dtype", "mode", "threads", "batch",
    "fused_s", "fused_iqr_pct", "eager_s", "compile_s", "compile_time_s",
    "eager_over_fused", "eager_over_fused_lo", "eager_over_fused_hi",
    "compile_over_fused", "compile_over_fused_lo", "compile_over_fused_hi",
    "bytes", "fused_gbps", "copy_gbps", "fused_copy_pct",
    "floor_s", "fused_over_floor", "floor_none_s", "fused_over_floor_none", "other_load_pct", "steal_pct", "rounds_redone",
)


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    device: str
    dtype: str
    mode: str
    batch: int
    threads: int
    cols: int = COLS

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return self.batch * self.cols

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def min_bytes(self) -> int:
        return min_bytes(self.mode, self.batch, self.cols, self.element_size)

    @property
    def copy_numel(self) -> int:
        """Elements of the copy that moves ``min_bytes`` (read + write)."""
        return self.min_bytes // (2 * self.element_size)

    def label(self) -> str:
        return f"{self.device} {self.dtype} {self.mode} t{self.threads} B={self.batch}"


def min_bytes(mode: str, batch: int, cols: int, element_size: int) -> int:
    """The fewest bytes one call must move (see the module docstring)."""
    n = batch * cols * element_size
    if mode == "fwd":
        return 4 * n  # read pred, target, prev, raw
    if mode == "fwdbwd":
        # forward: read 4 inputs, write grad_pred and grad_raw;
        # backward: read the two saved gradients, write the two scaled ones.
        return (4 + 2) * n + (2 + 2) * n
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def iter_cases(
    device: str = "cpu",
    dtypes: Sequence[str] = DTYPES,
    modes: Sequence[str] = MODES,
    batches: Sequence[int] = BATCHES,
    threads: Sequence[int] = THREADS,
) -> list[Case]:
    """Every case, grouped so that the slow ones (large B) come last within a
    (dtype, mode, threads) group. On CUDA only the first thread count is used
    (it only affects the host side there)."""
    if device != "cpu":
        threads = list(threads)[:1]
    return [
        Case(device, dt, mode, b, th)
        for dt in dtypes
        for mode in modes
        for th in threads
        for b in batches
    ]


# ------------------------------------------------------------------------ providers


@dataclass
class Inputs:
    pred: torch.Tensor
    target: torch.Tensor
    prev: torch.Tensor
    raw: torch.Tensor


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Blendshape-like values in [0, 1); pred and raw require grad in fwdbwd."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.batch, case.cols)

    def rand() -> torch.Tensor:
        return torch.rand(shape, generator=g, dtype=torch.float32).to(dtype=case.torch_dtype, device=case.device)

    pred, target, prev, raw = rand(), rand(), rand(), rand()
    if case.mode == "fwdbwd":
        pred.requires_grad_()
        raw.requires_grad_()
    return Inputs(pred, target, prev, raw)


@dataclass
class Step:
    """One provider's callable for one case. ``fn`` does one iteration; it runs
    with autograd enabled iff ``grad_enabled``. ``setup_s`` is the time spent
    compiling (compile provider), excluded from every timing."""

    provider: str
    fn: Callable[[], Any]
    grad_enabled: bool
    kind: str = "loss"  # "loss" or "baseline"
    setup_s: Optional[float] = None
    keep: list = field(default_factory=list)  # tensors the step needs alive


def _loss_step(case: Case, x: Inputs, loss_fn: Callable[..., Any], provider: str) -> Step:
    pred, target, prev, raw = x.pred, x.target, x.prev, x.raw
    if case.mode == "fwd":
        def fwd() -> None:
            loss_fn(pred, target, prev, raw)
        return Step(provider, fwd, grad_enabled=False)

    def fwdbwd() -> None:
        pred.grad = None  # optimizer.zero_grad(set_to_none=True)
        raw.grad = None
        _total(loss_fn(pred, target, prev, raw)).backward()
    return Step(provider, fwdbwd, grad_enabled=True)


def _total(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.total


def _reference_total(pred, target, prev, raw):
    from . import reference

    return reference.temporal_loss(pred, target, prev, raw).total


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _compile_step(case: Case, x: Inputs) -> Step:
    """torch.compile of the reference's total, dynamic=False; compiled by the
    first call (forward and, in fwdbwd, backward), which is timed as setup."""
    import torch._inductor.config as inductor_config

    from ._loader import import_cpp_extension

    import_cpp_extension()  # inductor imports it: without its CPU-only "No CUDA runtime" warning

    # Compile in this process: a pool of compile-worker processes would warm
    # up (import torch, ~seconds of CPU each) while the other providers are
    # being timed, on a machine with only a few cores.
    inductor_config.compile_threads = 1
    torch._dynamo.reset()  # fresh cache per case: no recompile limit, honest compile time
    compiled = torch.compile(_reference_total, dynamic=False)
    step = _loss_step(case, x, compiled, "compile")
    _synchronize(case.device)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(step.grad_enabled), warnings.catch_warnings():
        # reference's argument checks call an lru_cache'd helper; dynamo traces through it (harmless here)
        warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
        step.fn()
    _synchronize(case.device)
    step.setup_s = time.perf_counter() - t0
    return step


def make_floor_function(zero_pred: torch.Tensor, zero_raw: torch.Tensor, backward: str) -> type:
    """A do-nothing autograd Function of (pred, target, prev, raw).

    ``backward``: "zeros" returns the preallocated zero gradients as detached
    aliases (AccumulateGrad steals them, as it steals the fused loss's fresh
    gradients; .grad then shares their storage), "clone" returns the
    preallocated tensors themselves (AccumulateGrad must clone them), "none"
    returns None for every input (AccumulateGrad stores nothing).
    """
    if backward not in ("zeros", "clone", "none"):
        raise ValueError(f"backward must be 'zeros', 'clone' or 'none', got {backward!r}")

    class DoNothingLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pred, target, prev, raw):
            return pred.new_zeros((), dtype=torch.float32)

        @staticmethod
        def backward(ctx, grad_total):
            if backward == "none":
                return None, None, None, None
            if backward == "clone":
                return zero_pred, None, None, zero_raw
            return zero_pred.detach(), None, None, zero_raw.detach()

    DoNothingLoss.__name__ = f"DoNothingLoss_{backward}"
    return DoNothingLoss


def _floor_step(case: Case, x: Inputs, provider: str) -> Step:
    kind = {"floor": "zeros", "floor_none": "none", "floor_clone": "clone"}[provider]
    zp, zr = torch.zeros_like(x.pred), torch.zeros_like(x.raw)
    fn = make_floor_function(zp, zr, kind)
    step = _loss_step(case, x, fn.apply, provider)
    step.kind = "baseline"
    step.keep = [zp, zr]
    return step


def _copy_step(case: Case) -> Step:
    src = torch.rand(case.copy_numel, dtype=torch.float32).to(case.torch_dtype).to(case.device)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    return Step("copy", copy, grad_enabled=False, kind="baseline", keep=[src, dst])


def make_step(case: Case, provider: str, inputs: Inputs) -> Step:
    """The callable of ``provider`` for ``case`` on ``inputs`` (compiles, for
    the compile provider; that time is in ``Step.setup_s``)."""
    if provider == "fused":
        import koemorph_fused as kf

        return _loss_step(case, inputs, kf.temporal_loss, "fused")
    if provider == "eager":
        from . import reference

        return _loss_step(case, inputs, reference.temporal_loss, "eager")
    if provider == "compile":
        return _compile_step(case, inputs)
    if provider == "copy":
        return _copy_step(case)
    if provider in ("floor", "floor_none", "floor_clone"):
        if case.mode == "fwd" and provider != "floor":
            raise ValueError(f"{provider} differs from floor only in backward; not defined for mode fwd")
        return _floor_step(case, inputs, provider)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS + ALL_BASELINES}")


def providers_for(case: Case, providers: Sequence[str], baselines: Sequence[str]) -> list[str]:
    """The providers and baselines measured for a case (floor_none and
    floor_clone only differ in backward, so they are skipped in fwd mode)."""
    out = list(providers)
    for b in baselines:
        if case.mode == "fwd" and b in ("floor_none", "floor_clone"):
            continue
        out.append(b)
    return out


# --------------------------------------------------------------------------- timing


def time_block(step: Step, iters: int, device: str) -> float:
    """Mean seconds per iteration of ``iters`` back-to-back calls."""
    fn = step.fn
    with torch.set_grad_enabled(step.grad_enabled):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters


def calibrate(step: Step, device: str, min_time: float, warmup: int = 2) -> int:
    """Warm up, then the iterations per block for a block of >= min_time s."""
    with torch.set_grad_enabled(step.grad_enabled):
        for _ in range(warmup):
            step.fn()
    n = 1
    while True:
        per = time_block(step, n, device)
        total = per * n
        if total >= 0.25 * min_time or n >= 1 << 22:
            break
        n = min(n * 10, max(n * 2, int(0.3 * min_time / max(per, 1e-9))))
    return max(1, math.ceil(min_time / max(per, 1e-12)))


def _quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


@dataclass
class Measurement:
    provider: str
    kind: str
    times: list[float]  # seconds per iteration, one per round
    iters: int
    setup_s: Optional[float] = None
    error: Optional[str] = None


@dataclass
class CaseResult:
    case: Case
    measurements: dict[str, Measurement]
    #: Share of the machine's CPU time (all CPUs) used by OTHER processes
    #: during the kept rounds, and stolen by the hypervisor: the noise.
    other_load_pct: Optional[float] = None
    steal_pct: Optional[float] = None
    rounds_redone: int = 0  # rounds discarded because other processes were busy


class CpuLoad:
    """Snapshots of /proc/stat and of this process's CPU time; the difference
    of two gives how busy OTHER processes kept the machine meanwhile.
    Everything is None where /proc is not available."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.snap = self._read()

    @staticmethod
    def _read() -> Optional[tuple[int, int, int, float]]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        total = sum(v[:8])
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        steal = v[7] if len(v) > 7 else 0
        t = os.times()  # this process, all its threads (and waited-for children)
        return total, total - idle - steal, steal, t.user + t.system

    def since(self) -> tuple[Optional[float], Optional[float]]:
        """(other_load_pct, steal_pct) since the last call (or construction)."""
        now = self._read()
        before, self.snap = self.snap, now
        if before is None or now is None or now[0] <= before[0]:
            return None, None
        d_total = now[0] - before[0]
        d_busy = now[1] - before[1]
        d_steal = now[2] - before[2]
        d_self = (now[3] - before[3]) * self.hz
        other = max(0.0, d_busy - d_self)
        return 100.0 * other / d_total, 100.0 * d_steal / d_total


def wait_until_quiet(max_wait: float, threshold_pct: float = 10.0, sample: float = 0.25) -> Optional[float]:
    """Sleep in ``sample`` steps until other processes use less than
    ``threshold_pct`` of the machine, for at most ``max_wait`` seconds.
    Returns the last load seen (None where it cannot be measured)."""
    deadline = time.monotonic() + max_wait
    load = CpuLoad()
    while True:
        time.sleep(sample)
        other, _ = load.since()
        if other is None or other < threshold_pct or time.monotonic() >= deadline:
            return other


def measure_case(
    case: Case,
    providers: Sequence[str],
    min_time: float,
    rounds: int,
    progress: Optional[Callable[[str], None]] = None,
    wait_idle: float = 0.0,
    max_other_load: float = 25.0,
    step_factory: Optional[Callable[[str], Step]] = None,
) -> CaseResult:
    """Set up, warm up, calibrate and time every provider of one case in
    interleaved rounds (``step_factory(provider)`` makes the steps of cases
    other than :class:`Case`, e.g. :class:`SequenceCase`). A provider that fails to set up (e.g. no kernel for
    the device) is reported with its error instead of times.

    With ``wait_idle`` > 0, each round first waits (up to that many seconds)
    for other processes to quiet down, and a round during which they used
    more than ``max_other_load`` % of the machine is discarded and run again
    (at most ``rounds`` times in all per case)."""
    tick = progress or (lambda what: None)
    if case.device == "cpu":
        torch.set_num_threads(case.threads)
    inputs = make_inputs(case) if step_factory is None else None
    steps: dict[str, Step] = {}
    out: dict[str, Measurement] = {}
    iters: dict[str, int] = {}
    others: list[float] = []
    steals: list[float] = []
    redone = 0
    gc.collect()
    gc_was_enabled = gc.isenabled()
    try:
        for p in providers:
            tick(f"{case.label()} setup {p}")
            try:
                step = make_step(case, p, inputs) if step_factory is None else step_factory(p)
                gc.disable()
                iters[p] = calibrate(step, case.device, min_time)
            except Exception as exc:  # reported, not fatal: other providers still run
                out[p] = Measurement(p, "loss" if p in PROVIDERS else "baseline", [], 0,
                                     error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            finally:
                if gc_was_enabled:
                    gc.enable()
            steps[p] = step
            out[p] = Measurement(p, step.kind, [], iters[p], setup_s=step.setup_s)
        tick(f"{case.label()} setup done")
        order = list(steps)
        r = 0
        while r < rounds:
            k = r % max(1, len(order))
            gc.collect()
            if wait_idle > 0:
                wait_until_quiet(wait_idle)
            load = CpuLoad()
            times: dict[str, float] = {}
            gc.disable()
            try:
                for p in order[k:] + order[:k]:
                    times[p] = time_block(steps[p], iters[p], case.device)
            finally:
                if gc_was_enabled:
                    gc.enable()
            other, steal = load.since()
            if wait_idle > 0 and other is not None and other > max_other_load and redone < rounds:
                redone += 1
                tick(f"{case.label()} round {r + 1}/{rounds} redone (others used {other:.0f}%)")
                continue
            for p, t in times.items():
                out[p].times.append(t)
            if other is not None:
                others.append(other)
                steals.append(steal)
            r += 1
            tick(f"{case.label()} round {r}/{rounds}")
    finally:
        steps.clear()
        del inputs
        if "compile" in providers:
            torch._dynamo.reset()
        gc.collect()
        _empty_pools(case.device)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return CaseResult(case, out, mean(others), mean(steals), redone)


def _empty_pools(device: str) -> None:
    try:
        from . import _ops

        empty = getattr(_ops.library, "cpu_buffer_pool_empty_cache", None)
        if empty is not None:
            empty()
    except Exception:
        pass
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------ reporting


def result_rows(res: CaseResult) -> list[dict[str, Any]]:
    """One row per provider (RESULT_COLUMNS)."""
    case, ms = res.case, res.measurements
    fused = ms.get("fused")
    fused_med = statistics.median(fused.times) if fused and fused.times else None
    copy = ms.get("copy")
    copy_med = statistics.median(copy.times) if copy and copy.times else None
    rows = []
    for p, m in ms.items():
        row: dict[str, Any] = dict(
            device=case.device, dtype=case.dtype, mode=case.mode, threads=case.threads, batch=case.batch,
            cols=case.cols, provider=p, kind=m.kind, rounds=len(m.times), iters_per_round=m.iters,
            bytes=case.min_bytes, compile_s=m.setup_s, error=m.error,
            other_load_pct=res.other_load_pct, steal_pct=res.steal_pct,
        )
        if m.times:
            q1, med, q3 = _quantiles(m.times)
            row.update(
                median_s=med, q1_s=q1, q3_s=q3, min_s=min(m.times), max_s=max(m.times),
                iqr_pct=100.0 * (q3 - q1) / med,
                gbps=case.min_bytes / med / 1e9,
                copy_pct=100.0 * copy_med / med if copy_med else None,
                ratio_to_fused=med / fused_med if fused_med else None,
            )
        rows.append({c: row.get(c) for c in RESULT_COLUMNS})
    return rows


def _ratio_stats(ms: dict[str, Measurement], num: str, den: str) -> tuple[Optional[float], ...]:
    """median(num)/median(den), and the min and max of the per-round ratios."""
    a, b = ms.get(num), ms.get(den)
    if not (a and b and a.times and b.times):
        return None, None, None
    per_round = [x / y for x, y in zip(a.times, b.times)]
    return statistics.median(a.times) / statistics.median(b.times), min(per_round), max(per_round)


def summary_row(res: CaseResult) -> dict[str, Any]:
    """The per-case line of the terminal table (SUMMARY_COLUMNS)."""
    case, ms = res.case, res.measurements
    def med(p: str) -> Optional[float]:
        m = ms.get(p)
        return statistics.median(m.times) if m and m.times else None

    fused = ms.get("fused")
    iqr = None
    if fused and fused.times:
        q1, m, q3 = _quantiles(fused.times)
        iqr = 100.0 * (q3 - q1) / m
    e, e_lo, e_hi = _ratio_stats(ms, "eager", "fused")
    c, c_lo, c_hi = _ratio_stats(ms, "compile", "fused")
    f, copy = med("fused"), med("copy")
    comp = ms.get("compile")
    row = dict(
        device=case.device, dtype=case.dtype, mode=case.mode, threads=case.threads, batch=case.batch,
        fused_s=f, fused_iqr_pct=iqr, eager_s=med("eager"), compile_s=med("compile"),
        compile_time_s=comp.setup_s if comp else None,
        eager_over_fused=e, eager_over_fused_lo=e_lo, eager_over_fused_hi=e_hi,
        compile_over_fused=c, compile_over_fused_lo=c_lo, compile_over_fused_hi=c_hi,
        bytes=case.min_bytes,
        fused_gbps=case.min_bytes / f / 1e9 if f else None,
        copy_gbps=case.min_bytes / copy / 1e9 if copy else None,
        fused_copy_pct=100.0 * copy / f if (f and copy) else None,
        floor_s=med("floor"), fused_over_floor=_ratio_stats(ms, "fused", "floor")[0],
        floor_none_s=med("floor_none"), fused_over_floor_none=_ratio_stats(ms, "fused", "floor_none")[0],
        other_load_pct=res.other_load_pct, steal_pct=res.steal_pct, rounds_redone=res.rounds_redone,
    )
    return {k: row.get(k) for k in SUMMARY_COLUMNS}


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    us = s * 1e6
    if us < 1000:
        return f"{us:.1f}us" if us < 100 else f"{us:.0f}us"
    ms = us / 1000
    return f"{ms:.2f}ms" if ms < 100 else f"{ms:.0f}ms"


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _fmt_ratio(r: Optional[float], lo: Optional[float], hi: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:.2f} [{lo:.2f}-{hi:.2f}]"


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """The terminal table: one line per case."""
    head = ("dev", "dtype", "mode", "thr", "B", "fused", "iqr%", "eager", "compile", "eager/fused [rounds]",
            "compile/fused [rounds]", "GB/s", "copy GB/s", "%copy", "floor", "fused/floor", "floor_none",
            "fused/f_none", "others%", "steal%")
    lines = []
    for s in summaries:
        lines.append((
            s["device"], s["dtype"], s["mode"], str(s["threads"]), str(s["batch"]),
            _fmt_time(s["fused_s"]), _fmt(s["fused_iqr_pct"], ".1f"), _fmt_time(s["eager_s"]),
            _fmt_time(s["compile_s"]),
            _fmt_ratio(s["eager_over_fused"], s["eager_over_fused_lo"], s["eager_over_fused_hi"]),
            _fmt_ratio(s["compile_over_fused"], s["compile_over_fused_lo"], s["compile_over_fused_hi"]),
            _fmt(s["fused_gbps"], ".2f"), _fmt(s["copy_gbps"], ".2f"), _fmt(s["fused_copy_pct"], ".0f"),
            _fmt_time(s["floor_s"]), _fmt(s["fused_over_floor"], ".2f"), _fmt_time(s["floor_none_s"]),
            _fmt(s["fused_over_floor_none"], ".2f"), _fmt(s["other_load_pct"], ".0f"), _fmt(s["steal_pct"], ".1f"),
        ))
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [fmt(head), fmt(tuple("-" * w for w in widths))]
    out += [fmt(r) for r in lines]
    return "\n".join(out)


def format_markdown(summaries: Sequence[dict[str, Any]]) -> str:
    """The same table in Markdown (for docs/performance.md)."""
    head = ["dtype", "mode", "thr", "B", "fused", "IQR %", "eager", "compile", "eager/fused",
            "compile/fused", "fused GB/s", "copy GB/s", "% of copy", "floor", "fused/floor",
            "floor_none", "fused/floor_none", "others %", "steal %"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        out.append("| " + " | ".join([
            s["dtype"], s["mode"], str(s["threads"]), str(s["batch"]), _fmt_time(s["fused_s"]),
            _fmt(s["fused_iqr_pct"], ".1f"), _fmt_time(s["eager_s"]), _fmt_time(s["compile_s"]),
            _fmt_ratio(s["eager_over_fused"], s["eager_over_fused_lo"], s["eager_over_fused_hi"]),
            _fmt_ratio(s["compile_over_fused"], s["compile_over_fused_lo"], s["compile_over_fused_hi"]),
            _fmt(s["fused_gbps"], ".2f"), _fmt(s["copy_gbps"], ".2f"), _fmt(s["fused_copy_pct"], ".0f"),
            _fmt_time(s["floor_s"]), _fmt(s["fused_over_floor"], ".2f"), _fmt_time(s["floor_none_s"]),
            _fmt(s["fused_over_floor_none"], ".2f"), _fmt(s["other_load_pct"], ".0f"), _fmt(s["steal_pct"], ".1f"),
        ]) + " |")
    return "\n".join(out)


# -------------------------------------------------------------------------- goals

#: The performance goals (CPU, 2 threads, fwdbwd; ratios within one run):
#: (batch, metric, comparison, target).
GOALS: tuple[tuple[int, str, str, float], ...] = (
    (4, "eager_over_fused", ">=", 6.0),
    (4, "compile_over_fused", ">=", 3.0),
    (4, "fused_over_floor", "<=", 1.5),
    (1024, "eager_over_fused", ">=", 10.0),
    (1024, "compile_over_fused", ">=", 5.0),
    (16384, "eager_over_fused", ">=", 15.0),
    (16384, "compile_over_fused", ">=", 3.0),
    (262144, "eager_over_fused", ">=", 6.0),
    (262144, "compile_over_fused", ">=", 1.6),
    (262144, "fused_copy_pct", ">=", 60.0),
    (1048576, "fused_copy_pct", ">=", 60.0),
)


def evaluate_goals(summaries: Sequence[dict[str, Any]], dtype: str = "float32") -> list[dict[str, Any]]:
    """Each goal with the measured value and met / missed (None: not measured)."""
    by_b = {
        s["batch"]: s for s in summaries
        if s["device"] == "cpu" and s["threads"] == 2 and s["mode"] == "fwdbwd" and s["dtype"] == dtype
    }
    out = []
    for batch, metric, op, target in GOALS:
        s = by_b.get(batch)
        value = s.get(metric) if s else None
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append(dict(dtype=dtype, batch=batch, metric=metric, goal=f"{op} {target:g}", value=value, met=met))
    return out


def format_goals(goals: Sequence[dict[str, Any]]) -> str:
    lines = []
    for g in goals:
        status = "not measured" if g["met"] is None else ("met" if g["met"] else "MISSED")
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"  {g['dtype']:9s} B={g['batch']:<8d} {g['metric']:20s} {g['goal']:>7s}  {value:>8s}  {status}")
    return "\n".join(lines)


# ------------------------------------------------------------------- environment


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = dict(
        platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
        cpu_count=os.cpu_count(), torch_threads_default=torch.get_num_threads(),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["hypervisor"] = "hypervisor" in flags
        info["avx2"] = "avx2" in flags
        info["avx512f"] = "avx512f" in flags
    except OSError:
        pass
    try:
        from . import _ops

        info["fused_cpu_kernel"] = _ops.library.cpu_kernel()
    except Exception as exc:  # pragma: no cover
        info["fused_cpu_kernel"] = f"unavailable: {exc}"
    try:
        root = Path(__file__).resolve().parent.parent
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "koemorph_fused"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        info["git_dirty"] = bool(dirty)
    except Exception:
        info["git_commit"] = None
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------- plot


PLOT_STYLE = {
    "fused": dict(color="C0", marker="o"),
    "eager": dict(color="C1", marker="s"),
    "compile": dict(color="C2", marker="^"),
    "copy": dict(color="0.4", marker="", linestyle="--"),
    "floor": dict(color="C3", marker="", linestyle=":"),
    "floor_none": dict(color="C4", marker="", linestyle=":"),
    "floor_clone": dict(color="C5", marker="", linestyle=":"),
}


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Time per call vs B (log-log), one line per provider (bars: IQR), one
    panel per (device, dtype, mode) row and threads column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("median_s") is not None]
    panels_r = sorted({(r["device"], r["dtype"], r["mode"]) for r in rows})
    panels_c = sorted({r["threads"] for r in rows})
    nr, nc = max(1, len(panels_r)), max(1, len(panels_c))
    fig, axes = plt.subplots(nr, nc, figsize=(5.2 * nc, 3.6 * nr), squeeze=False, sharex=True)
    for i, key in enumerate(panels_r):
        for j, th in enumerate(panels_c):
            ax = axes[i][j]
            sel = [r for r in rows if (r["device"], r["dtype"], r["mode"]) == key and r["threads"] == th]
            for prov in dict.fromkeys(r["provider"] for r in sel):
                pts = sorted((r for r in sel if r["provider"] == prov), key=lambda r: r["batch"])
                xs = [r["batch"] for r in pts]
                ys = [r["median_s"] for r in pts]
                err = [[r["median_s"] - r["q1_s"] for r in pts], [r["q3_s"] - r["median_s"] for r in pts]]
                ax.errorbar(xs, ys, yerr=err, label=prov, capsize=2, linewidth=1.2, markersize=4,
                            **PLOT_STYLE.get(prov, {}))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{key[0]} {key[1]} {key[2]}, {th} thread{'s' if th != 1 else ''}", fontsize=9)
            if i == nr - 1:
                ax.set_xlabel("B (rows of 52)")
            if j == 0:
                ax.set_ylabel("seconds per call")
            if sel:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ CLI


# ------------------------------------------------------------------------- sequences

#: The sequence cases of issue 16: (B, T) windows of C = 52 frames, float32,
#: forward + backward with pred and raw requiring grad, lengths given,
#: velocity on, prev and prev_target given.
SEQUENCE_SHAPES: tuple[tuple[int, int], ...] = ((8, 256), (128, 128), (64, 1024))
#: ``fused``: the fused sequence loss; ``eager``: the plain-PyTorch reference;
#: ``compile``: torch.compile of it; ``copy``: ``dst.copy_(src)`` moving the
#: bytes the step must move (read pred, target, raw; write two gradients);
#: ``shifted_rows``: today's workaround, the row loss on (B*T, C) rows with
#: an explicitly shifted copy of pred as ``prev`` (no padding, no velocity).
SEQUENCE_PROVIDERS: tuple[str, ...] = ("fused", "eager", "compile", "copy", "shifted_rows")
SEQUENCE_VELOCITY_WEIGHT = 0.5
#: Goals (issue 16), per shape: (numerator, denominator, goal, "min" or "max").
SEQUENCE_GOALS = {
    (8, 256): [("eager", "fused", 10.0, "min"), ("compile", "fused", 4.0, "min")],
    (128, 128): [("eager", "fused", 10.0, "min"), ("compile", "fused", 4.0, "min")],
    (64, 1024): [("fused", "copy", 1.15, "max"), ("shifted_rows", "fused", 1.3, "min")],
}


@dataclass(frozen=True)
class SequenceCase:
    batch: int
    frames: int
    threads: int = 2
    cols: int = COLS
    device: str = "cpu"
    dtype: str = "float32"

    def label(self) -> str:
        return f"{self.device} {self.dtype} fwdbwd t{self.threads} B={self.batch} T={self.frames}"

    @property
    def copy_numel(self) -> int:
        """Elements of a copy that reads and writes 5 * B * T * C elements in all."""
        return 5 * self.batch * self.frames * self.cols // 2


def _sequence_functions():
    """(fused, eager) callables (pred, target, raw, prev, prev_target, lengths) -> total."""
    import koemorph_fused as kf
    from . import reference

    def call(loss):
        def fn(pred, target, raw, prev, prev_target, lengths):
            return loss(pred, target, raw, prev=prev, prev_target=prev_target, lengths=lengths,
                        velocity_weight=SEQUENCE_VELOCITY_WEIGHT).total
        return fn

    return call(kf.sequence_loss), call(reference.sequence_loss)


def sequence_step_factory(case: SequenceCase, seed: int = 0) -> Callable[[str], Step]:
    """``provider -> Step`` for one sequence case, all on the same inputs."""
    import koemorph_fused as kf

    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.frames, case.cols)
    pred, target, raw = (torch.rand(shape, generator=g) for _ in range(3))
    prev, prev_target = (torch.rand(case.batch, case.cols, generator=g) for _ in range(2))
    lengths = torch.randint(case.frames // 2, case.frames + 1, (case.batch,), generator=g)
    lengths[0] = case.frames
    pred.requires_grad_()
    raw.requires_grad_()
    args = (pred, target, raw, prev, prev_target, lengths)
    fused, eager = _sequence_functions()

    def loss_step(name: str, fn: Callable[..., torch.Tensor], setup_s: Optional[float] = None) -> Step:
        def step() -> None:
            pred.grad = None
            raw.grad = None
            fn(*args).backward()
        return Step(name, step, grad_enabled=True, setup_s=setup_s, keep=list(args))

    def make(provider: str) -> Step:
        if provider == "fused":
            return loss_step("fused", fused)
        if provider == "eager":
            return loss_step("eager", eager)
        if provider == "compile":
            from ._loader import import_cpp_extension

            import_cpp_extension()  # inductor imports it: without its CPU-only "No CUDA runtime" warning
            compiled = torch.compile(eager, dynamic=False)
            t0 = time.perf_counter()
            loss_step("compile", compiled).fn()
            return loss_step("compile", compiled, setup_s=time.perf_counter() - t0)
        if provider == "copy":
            src = torch.rand(case.copy_numel)
            dst = torch.empty_like(src)
            return Step("copy", lambda: dst.copy_(src), grad_enabled=False, kind="baseline", keep=[src, dst])
        if provider == "shifted_rows":
            def shifted(pred, target, raw, prev, prev_target, lengths):
                previous = torch.cat([prev.unsqueeze(1), pred.detach()[:, :-1]], dim=1)
                rows = lambda x: x.reshape(-1, case.cols)  # noqa: E731
                return kf.temporal_loss(rows(pred), rows(target), rows(previous), rows(raw)).total
            step = loss_step("shifted_rows", shifted)
            step.kind = "baseline"
            return step
        raise ValueError(f"unknown sequence provider {provider!r}; expected one of {SEQUENCE_PROVIDERS}")

    return make


def run_sequences(settings: dict[str, Any], progress: bool = True) -> list[dict[str, Any]]:
    """Time the sequence cases (all providers in the same interleaved rounds);
    one summary per case with its ratios and goals."""
    threads_before = torch.get_num_threads()
    summaries = []
    try:
        for threads, (batch, frames) in ((t, shape) for t in settings["threads"] for shape in SEQUENCE_SHAPES):
            case = SequenceCase(batch, frames, threads=threads)
            tick = (lambda what: print(what, file=sys.stderr, flush=True)) if progress else None
            res = measure_case(case, SEQUENCE_PROVIDERS, settings["min_time"], settings["rounds"], tick,
                               wait_idle=settings.get("wait_idle", 0.0),
                               max_other_load=settings.get("max_other_load", 25.0),
                               step_factory=sequence_step_factory(case))
            ms = res.measurements
            row: dict[str, Any] = dict(batch=batch, frames=frames, threads=threads, other_load_pct=res.other_load_pct)
            for p, m in ms.items():
                row[f"{p}_s"] = statistics.median(m.times) if m.times else None
                if m.error:
                    row[f"{p}_error"] = m.error
            row["compile_time_s"] = ms["compile"].setup_s if "compile" in ms else None
            row["goals"] = []
            for num, den, goal, kind in SEQUENCE_GOALS[(batch, frames)]:
                ratio, lo, hi = _ratio_stats(ms, num, den)
                met = None if ratio is None else (ratio >= goal if kind == "min" else ratio <= goal)
                row["goals"].append(dict(ratio=f"{num}/{den}", value=ratio, lo=lo, hi=hi, goal=goal, kind=kind,
                                         met=met))
            summaries.append(row)
    finally:
        torch.set_num_threads(threads_before)
    return summaries


def _goal_text(g: dict[str, Any], not_met: str = "NOT met") -> str:
    """One goal of a sequence case: ``fused/copy 1.02 [lo-hi] (<= 1.15: met)``."""
    verdict = "met" if g["met"] else not_met if g["met"] is not None else "-"
    return (f"{g['ratio']} {_fmt_ratio(g['value'], g['lo'], g['hi'])} "
            f"({'>=' if g['kind'] == 'min' else '<='} {g['goal']:g}: {verdict})")


def format_sequences(summaries: Sequence[dict[str, Any]]) -> str:
    lines = ["thr  B    T     " + "  ".join(f"{p:>12}" for p in SEQUENCE_PROVIDERS)
             + "  ratios (same rounds) vs the goals (set for 2 threads)  others' load"]
    for r in summaries:
        times = "  ".join(f"{_fmt_time(r.get(p + '_s')):>12}" for p in SEQUENCE_PROVIDERS)
        goals = "; ".join(_goal_text(g) for g in r["goals"])
        lines.append(f"{r['threads']:<4} {r['batch']:<4} {r['frames']:<5} {times}  {goals}  "
                     f"{_fmt(r['other_load_pct'], '.0f')}%")
    return "\n".join(lines)


def format_sequences_markdown(summaries: Sequence[dict[str, Any]]) -> str:
    """:func:`format_sequences` as a Markdown table (``bench --sequence --markdown``)."""
    lines = ["| threads | B | T | " + " | ".join(SEQUENCE_PROVIDERS) + " | ratios (same rounds) vs the goals |",
             "|" + "---|" * (4 + len(SEQUENCE_PROVIDERS))]
    for r in summaries:
        times = " | ".join(_fmt_time(r.get(p + "_s")) for p in SEQUENCE_PROVIDERS)
        goals = "; ".join(_goal_text(g, not_met="**NOT met**") for g in r["goals"])
        lines.append(f"| {r['threads']} | {r['batch']} | {r['frames']} | {times} | {goals} |")
    return "\n".join(lines)


#: The options of the row cases that ``bench --sequence`` does not take
#: (its cases are fixed: CPU, float32, fwdbwd, SEQUENCE_SHAPES, SEQUENCE_PROVIDERS).
_ROW_ONLY_OPTIONS = ("dtype", "mode", "batch", "providers", "baselines", "csv", "plot", "quick")


#: Largest batch the command line accepts: 2**24 rows of 52 (fwdbwd keeps about
#: ten such tensors alive: 35 GB in float32). The default list ends at 2**20.
MAX_BATCH = 2**24


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Time the fused loss against the plain-PyTorch reference (eager) and torch.compile of it,\n"
        "with a copy of the same bytes (bandwidth ceiling) and a do-nothing autograd.Function\n"
        "(the floor) measured in the same interleaved rounds. C = 52; pred, target, prev and raw\n"
        "all present; continuity None.\n\n"
        "Modes: fwd = the forward under torch.no_grad(); fwdbwd = pred.grad = raw.grad = None,\n"
        "the loss and total.backward(), with pred and raw requiring grad.\n"
        "Bytes (N = B*52 elements): fwd reads 4N; fwdbwd moves 10N (forward reads 4 inputs and\n"
        "writes 2 gradients, backward reads and writes the 2 gradients). GB/s = bytes / median.\n"
        "The copy moves the same bytes, so %copy = copy time / fused time.\n"
        "Ratios (eager/fused, compile/fused, fused/floor) are of medians from the same run;\n"
        "[lo-hi] is the range of the per-round ratios. compile time is reported separately."
    )
    parser.epilog = (
        "examples:\n"
        "  koemorph-fused bench --quick\n"
        "  koemorph-fused bench --threads 2 --mode fwdbwd --dtype float32 --json out.json --plot out.png\n"
        "  koemorph-fused bench --device cuda --providers fused,eager"
    )
    g = parser.add_argument_group("what to run (comma-separated lists)")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    g.add_argument("--dtype", type=csv_list(str, DTYPES), default=None,
                   help=f"input dtypes (default: {','.join(DTYPES)})")
    g.add_argument("--mode", type=csv_list(str, MODES), default=None,
                   help="fwd (forward under no_grad) and/or fwdbwd (zero grads + forward + backward) "
                        f"(default: {','.join(MODES)})")
    g.add_argument("--batch", type=csv_list(int_arg(1, MAX_BATCH)), default=None,
                   help=f"batch sizes B (rows of 52), 1..{MAX_BATCH} (default: {','.join(map(str, BATCHES))})")
    g.add_argument("--threads", type=csv_list(thread_count), default=None,
                   help="CPU threads, 1..the machine's CPUs, torch.set_num_threads per case; on CUDA only the "
                        f"first value is used (default: {','.join(map(str, THREADS))})")
    g.add_argument("--providers", type=csv_list(str, PROVIDERS), default=None,
                   help="fused = koemorph_fused.temporal_loss, eager = koemorph_fused.reference.temporal_loss, "
                        "compile = torch.compile(reference, dynamic=False) "
                        f"(default: {','.join(PROVIDERS)})")
    g.add_argument("--baselines", type=csv_list(str, ALL_BASELINES), default=None,
                   help="reference points timed in the same rounds: copy (same bytes, dst.copy_(src)), floor "
                        "(do-nothing autograd.Function whose backward returns preallocated zero gradients), "
                        "floor_none (its backward returns None), floor_clone (returns the preallocated tensors "
                        f"themselves, so AccumulateGrad clones them) (default: {','.join(BASELINES)})")
    g.add_argument("--sequence", action="store_true",
                   help="the (B, T, 52) window cases instead: CPU, float32, fwdbwd, lengths and velocity on, "
                        "--threads as given, (B, T) = " + ", ".join(f"({b}, {t})" for b, t in SEQUENCE_SHAPES)
                        + "; providers " + ", ".join(SEQUENCE_PROVIDERS) + ". Takes --threads, --min-time, --rounds, "
                        "--wait-idle, --max-other-load, --json, --markdown and --no-progress; the other options "
                        "are for the row cases (an error with --sequence)")
    g.add_argument("--quick", action="store_true",
                   help="a small subset for smoke tests: float32, B=4,1024, 1 thread, fused and eager, "
                        "3 rounds of >= 5 ms (explicit flags still override)")
    t = parser.add_argument_group("timing")
    t.add_argument("--min-time", type=float_arg(0.0, 3600.0, low_inclusive=False), default=None, metavar="SECONDS",
                   help="shortest timed block (one provider, one round), > 0 and <= 3600; iterations per block "
                        f"are calibrated to reach it (default: {DEFAULT_MIN_TIME})")
    t.add_argument("--rounds", type=int_arg(1, 10_000), default=None, metavar="N",
                   help=f"interleaved rounds, 1..10000; statistics are over rounds (default: {DEFAULT_ROUNDS})")
    t.add_argument("--wait-idle", type=float_arg(0.0, 3600.0), default=0.0, metavar="SECONDS",
                   help="on a shared machine: before each round wait up to SECONDS for other processes to use "
                        "< 10%% of the CPUs, and redo a round during which they used more than --max-other-load "
                        "(default 0: off; the load of other processes is reported either way)")
    t.add_argument("--max-other-load", type=float_arg(0.0, 100.0), default=25.0, metavar="PCT",
                   help="with --wait-idle: redo rounds during which other processes used more than PCT %% "
                        "of the machine (default 25)")
    o = parser.add_argument_group("output")
    o.add_argument("--json", type=output_file, metavar="FILE", help="write machine info, every provider row and the case summaries")
    o.add_argument("--csv", type=output_file, metavar="FILE", help="write one row per case and provider (columns: "
                                                  + ", ".join(RESULT_COLUMNS) + ")")
    o.add_argument("--plot", type=plot_file, metavar="FILE.png", help="time vs B, log-log, one line per provider")
    o.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: explicit flags, else --quick's, else the defaults."""
    def pick(name: str, default: Any) -> Any:
        v = getattr(args, name, None)
        if v is not None:
            return v
        return QUICK[name] if args.quick and name in QUICK else default

    return dict(
        device=args.device,
        dtype=list(pick("dtype", DTYPES)),
        mode=list(pick("mode", MODES)),
        batch=list(pick("batch", BATCHES)),
        threads=list(pick("threads", THREADS)),
        providers=list(dict.fromkeys(pick("providers", PROVIDERS))),
        baselines=list(dict.fromkeys(args.baselines if args.baselines is not None else BASELINES)),
        min_time=float(pick("min_time", DEFAULT_MIN_TIME)),
        rounds=int(pick("rounds", DEFAULT_ROUNDS)),
        wait_idle=float(getattr(args, "wait_idle", 0.0) or 0.0),
        max_other_load=float(getattr(args, "max_other_load", 25.0)),
    )


def run(settings: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run every case; returns {"machine", "settings", "results", "cases", "goals"}."""
    from tqdm import tqdm

    if settings["min_time"] <= 0:
        raise ValueError("--min-time must be > 0")
    cases = iter_cases(settings["device"], settings["dtype"], settings["mode"], settings["batch"],
                       settings["threads"])
    threads_before = torch.get_num_threads()
    results: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    bar = tqdm(total=len(cases) * (settings["rounds"] + 1), desc="bench", unit="step", leave=False,
               disable=None if progress else True, file=sys.stderr, dynamic_ncols=True)
    try:
        for case in cases:
            provs = providers_for(case, settings["providers"], settings["baselines"])

            def tick(what: str) -> None:
                bar.set_postfix_str(what, refresh=True)
                if "setup done" in what or " round " in what:
                    bar.update(1)

            res = measure_case(case, provs, settings["min_time"], settings["rounds"], tick,
                               wait_idle=settings.get("wait_idle", 0.0),
                               max_other_load=settings.get("max_other_load", 25.0))
            for m in res.measurements.values():
                if m.error:
                    bar.write(f"{case.label()}: {m.provider} skipped: {m.error}")
            results.extend(result_rows(res))
            summaries.append(summary_row(res))
            if progress and bar.disable:  # no terminal: one line per case instead of the bar
                f = summaries[-1]["fused_s"]
                print(f"[{len(summaries)}/{len(cases)}] {case.label()}: fused {_fmt_time(f)}, "
                      f"others used {_fmt(res.other_load_pct, '.0f')}% of the CPUs", file=sys.stderr, flush=True)
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    goals = [g for dt in settings["dtype"] for g in evaluate_goals(summaries, dt)] if settings["device"] == "cpu" else []
    return dict(machine=machine_info(), settings=settings, command=" ".join(sys.argv),
                results=results, cases=summaries, goals=goals)


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RESULT_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in RESULT_COLUMNS})


def main(args: argparse.Namespace) -> int:
    settings = resolve_args(args)
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise CommandLineError("--device cuda: no CUDA device is available")
    if getattr(args, "sequence", False):
        for name in _ROW_ONLY_OPTIONS:
            if getattr(args, name, None) not in (None, False):
                raise CommandLineError(f"--{name} is for the row cases; --sequence does not take it (its cases are "
                                       "fixed: CPU, float32, forward + backward)")
        if args.device != "cpu":
            raise CommandLineError(f"--device {args.device}: --sequence runs on the CPU")
        summaries = run_sequences(settings, progress=not args.no_progress)
        print(f"# sequences: min_time {settings['min_time']} s, {settings['rounds']} rounds; medians over rounds, "
              "[lo-hi] the per-round ratios")
        print(format_sequences(summaries))
        if args.markdown:
            print()
            print(format_sequences_markdown(summaries))
        if args.json:
            write_json(dict(machine=machine_info(), settings=settings, sequences=summaries), args.json)
        return 0
    report = run(settings, progress=not args.no_progress)
    m = report["machine"]
    print(f"# {m.get('cpu_model', '?')}, {m.get('cpu_count')} CPUs, torch {m['torch']}, "
          f"fused CPU kernel {m.get('fused_cpu_kernel')}, min_time {settings['min_time']} s, "
          f"{settings['rounds']} rounds; times are medians over rounds")
    print(format_table(report["cases"]))
    if args.markdown:
        print()
        print(format_markdown(report["cases"]))
    compiled = [s for s in report["cases"] if s["compile_time_s"] is not None]
    if compiled:
        print("\ncompile time (first call, excluded from timings): " + ", ".join(
            f"{s['dtype']} {s['mode']} t{s['threads']} B={s['batch']}: {s['compile_time_s']:.1f}s" for s in compiled))
    measured_goals = [g for g in report["goals"] if g["value"] is not None]
    if measured_goals:
        print("\ngoals (cpu, 2 threads, fwdbwd):")
        print(format_goals(measured_goals))
    if args.json:
        write_json(report, args.json)
    if args.csv:
        write_csv(report["results"], args.csv)
    if args.plot:
        plot(report["results"], args.plot)
    errors = [r for r in report["results"] if r["error"]]
    return 1 if errors and len(errors) == len(report["results"]) else 0
