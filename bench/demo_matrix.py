"""The demo's verdict over a matrix of machines-in-one: seeds x CPU instruction
sets (``ATEN_CPU_CAPABILITY``) x thread counts x dtypes.

    .venv/bin/python bench/demo_matrix.py                  # the full matrix: 10 x 3 x 2 x 3 = 180 runs
    .venv/bin/python bench/demo_matrix.py --seeds 0,1 --isa default --threads 1
    .venv/bin/python bench/demo_matrix.py --sequence       # the same matrix for ``demo --sequence``

Each run is exactly ``koemorph-fused demo --seed S --dtype D --threads T``
with the demo's default sizes (:func:`koemorph_fused.demo.demo_run`): training
on the fused loss, the reference checking every step on the same outputs.
With ``--sequence`` each run is ``koemorph-fused demo --sequence --seed S
--dtype D --threads T`` (:func:`koemorph_fused.demo.sequence.sequence_run`).
Subprocesses get ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: on a shared
machine, spinning OpenMP threads slow 2-thread runs down ~10x (the numbers do
not change).
torch reads ``ATEN_CPU_CAPABILITY`` once, when it is imported, so every
(instruction set, thread count) pair runs in a subprocess of its own with the
variable set; inside it the dtypes and seeds run one after the other. On a CPU
without AVX-512 torch falls back to the best it has; the table shows what torch
reports (``torch.backends.cpu.get_cpu_capability()``) and which build of the
fused CPU kernel ran.

Prints one row per (instruction set, threads, dtype): how many seeds PASSed,
the worst ratio error/tolerance of the terms and total and of the gradients
over the seeds (PASS needs <= 1), the most monitor-flagged steps of a run, and
the seconds per run; then the range of the total per training phase over all
runs (what the demo's calibrated ``EXPECTED_TOTAL`` must cover). Exit status 0
when every run PASSed, 1 otherwise, 2 on misuse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # check the package of this checkout
    sys.path.insert(0, str(ROOT))

ISAS = ("default", "avx2", "avx512")
DTYPES = ("float32", "bfloat16", "float64")
THREADS = (1, 2)
SEEDS = tuple(range(10))


def _seed_list(text: str) -> list[int]:
    """``0-9``, ``0,3,5`` or a mix (``0-2,7``)."""
    from koemorph_fused.cli_args import seed_arg

    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = (seed_arg(p) for p in part.split("-", 1))
            if hi < lo or hi - lo > 10_000:
                raise argparse.ArgumentTypeError(f"expected a range lo-hi with lo <= hi, at most 10000 long, got {part!r}")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(seed_arg(part))
    return list(dict.fromkeys(seeds))


def build_parser() -> argparse.ArgumentParser:
    from koemorph_fused.cli_args import csv_list, output_file, thread_count

    p = argparse.ArgumentParser(
        prog="demo_matrix.py", description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Runs one after the other (timings and thread counts stay honest on a shared machine); "
               "the full matrix takes about 15 minutes on 2 cores.")
    p.add_argument("--seeds", type=_seed_list, default=list(SEEDS), metavar="LIST",
                   help="seeds, e.g. 0-9 or 0,3,5 (default 0-9)")
    p.add_argument("--isa", type=csv_list(str, ISAS), default=list(ISAS), metavar="LIST",
                   help=f"ATEN_CPU_CAPABILITY values (default {','.join(ISAS)})")
    p.add_argument("--threads", type=csv_list(thread_count), default=list(THREADS), metavar="LIST",
                   help="torch intra-op thread counts (default 1,2)")
    p.add_argument("--dtype", type=csv_list(str, DTYPES), default=list(DTYPES), metavar="LIST",
                   help=f"dtypes (default {','.join(DTYPES)})")
    p.add_argument("--sequence", action="store_true",
                   help="run 'demo --sequence' (windows of frames, the fused sequence loss) instead of the row demo")
    p.add_argument("--json", type=output_file, metavar="FILE", help="also write every run's result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------ worker (in the subprocess)

def run_one(seed: int, dtype: str, sequence: bool = False) -> dict[str, Any]:
    """One demo run (``sequence``: ``demo --sequence``) with the default sizes; a JSON-able summary."""
    import torch

    import koemorph_fused as kf
    from koemorph_fused.demo.data import make_corpus
    from koemorph_fused.demo.sequence import sequence_run
    from koemorph_fused.demo.train import DemoConfig, demo_run

    start = time.perf_counter()
    run = sequence_run if sequence else demo_run
    result = run(DemoConfig(seed=seed, dtype=dtype), make_corpus(6, seed=seed))
    verdict = result.verdict
    flags = Counter(f for row in result.rows for f in row.get("flags", ()))
    totals: dict[str, list[float]] = defaultdict(list)
    for row in result.rows:
        totals[row["phase"]].append(row["total"])
    return dict(
        isa=os.environ.get("ATEN_CPU_CAPABILITY", ""), torch_isa=torch.backends.cpu.get_cpu_capability(),
        kernel=kf._ops.library.cpu_kernel(), threads=torch.get_num_threads(), dtype=dtype, seed=seed,
        sequence=sequence, ok=verdict.ok, worst=verdict.worst, first_bad_step=verdict.first_bad_step,
        dtype_errors=list(verdict.dtype_errors), steps=verdict.steps,
        flagged_steps=sum(1 for row in result.rows if row.get("flags")), flags=dict(flags),
        totals={phase: [min(v), max(v)] for phase, v in totals.items()},
        seconds=time.perf_counter() - start,
    )


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads[0])
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once, outside the timings
    for dtype in args.dtype:
        for seed in args.seeds:
            print(json.dumps(run_one(seed, dtype, args.sequence)), flush=True)
    return 0


# ------------------------------------------------------------------------------ driver

def run_matrix(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tqdm import tqdm

    total = len(args.isa) * len(args.threads) * len(args.dtype) * len(args.seeds)
    bar = tqdm(total=total, desc="demo matrix", unit="run", disable=True if args.no_progress else None,
               dynamic_ncols=True)
    results: list[dict[str, Any]] = []
    seeds = ",".join(map(str, args.seeds))
    try:
        for isa in args.isa:
            for threads in args.threads:
                env = dict(os.environ, ATEN_CPU_CAPABILITY=isa,
                           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
                # Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads
                # make 2-thread runs ~10x slower; which thread computes what (the numbers) is unchanged.
                env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seeds", seeds,
                       "--threads", str(threads), "--dtype", ",".join(args.dtype), "--no-progress"] + (
                    ["--sequence"] if args.sequence else [])
                with tempfile.TemporaryFile("w+") as stderr:
                    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
                    assert proc.stdout is not None
                    for line in proc.stdout:
                        r = json.loads(line)
                        results.append(r)
                        bar.set_postfix_str(f"{isa} t{threads} {r['dtype']} seed {r['seed']}: "
                                            f"{'PASS' if r['ok'] else 'FAIL'}")
                        bar.update(1)
                    proc.wait()
                    stderr.seek(0)
                    err = stderr.read()
                if proc.returncode != 0:
                    raise RuntimeError(f"worker for ATEN_CPU_CAPABILITY={isa}, {threads} thread(s) failed "
                                       f"(exit {proc.returncode}):\n{err}")
    finally:
        bar.close()
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["isa"], r["threads"], r["dtype"])].append(r)
    head = (f"{'ATEN_CPU_CAPABILITY':<19} {'torch':<7} {'kernel':<7} {'thr':>3} {'dtype':<9} {'PASS':>7} "
            f"{'worst terms/total':>17} {'worst grads':>11} {'flagged steps':>13} {'s/run':>6}")
    lines = [head, "-" * len(head)]
    for (isa, threads, dtype), rs in groups.items():
        value = max(max(v for k, v in r["worst"].items() if not k.startswith("grad")) for r in rs)
        grads = max(max(v for k, v in r["worst"].items() if k.startswith("grad")) for r in rs)
        passed = sum(r["ok"] for r in rs)
        lines.append(
            f"{isa:<19} {rs[0]['torch_isa']:<7} {rs[0]['kernel']:<7} {threads:>3} {dtype:<9} "
            f"{f'{passed}/{len(rs)}':>7} {value:>17.2g} {grads:>11.2g} "
            f"{max(r['flagged_steps'] for r in rs):>5} of {rs[0]['steps']:<5} "
            f"{sum(r['seconds'] for r in rs) / len(rs):>6.1f}")
    return "\n".join(lines)


def format_totals(results: list[dict[str, Any]]) -> str:
    from koemorph_fused.demo.train import EXPECTED_TOTAL

    sequence = any(r.get("sequence") for r in results)
    lines = ["total per phase over all runs" + (" (demo --sequence has no expected ranges):" if sequence else
                                                " (the demo's expected ranges must cover them):")]
    for phase in ("early", "mid", "late"):
        seen = [r["totals"][phase] for r in results if phase in r["totals"]]
        if not seen:
            continue
        lo, hi = min(s[0] for s in seen), max(s[1] for s in seen)
        e_lo, e_hi = EXPECTED_TOTAL[phase]
        lines.append(f"  {phase:<5} {lo:.4f} .. {hi:.4f}" + ("" if sequence else f"   (expected {e_lo:g} .. {e_hi:g})"))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    import koemorph_fused

    print(f"koemorph_fused from {Path(koemorph_fused.__file__).parent}; {os.cpu_count()} CPUs; "
          + ("demo --sequence; " if args.sequence else "")
          + f"{len(args.seeds)} seeds x {len(args.isa)} ISA x {len(args.threads)} thread counts x "
          f"{len(args.dtype)} dtypes", flush=True)
    start = time.perf_counter()
    try:
        results = run_matrix(args)
    except RuntimeError as e:
        print(f"demo_matrix.py: error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    print(format_totals(results))
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"FAIL: ATEN_CPU_CAPABILITY={r['isa']} threads {r['threads']} {r['dtype']} seed {r['seed']}: "
              f"first bad step {r['first_bad_step']}, worst {r['worst']}, {r['dtype_errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"{len(results) - len(failed)}/{len(results)} runs PASS "
          f"({time.perf_counter() - start:.0f} s)" + ("" if not failed else f"; {len(failed)} FAIL"))
    return 0 if not failed and results else 1


if __name__ == "__main__":
    sys.exit(main())
