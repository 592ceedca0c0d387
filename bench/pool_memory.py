"""Memory of the CPU gradient-buffer pool in a training-like loop: resident
memory (RSS) and pool hit rate for a fixed batch size, a smaller last batch,
and a batch size that changes every step.

    .venv/bin/python bench/pool_memory.py                  # all scenarios, ~1-2 min
    .venv/bin/python bench/pool_memory.py --steps 100 --scenario random

Each scenario runs in a fresh subprocess (RSS is per process). A step is
``kf.temporal_loss(pred, target, prev, raw).total.backward()`` with pred and
raw requiring grad: two gradient buffers per step, handed over as
``pred.grad`` / ``raw.grad`` and freed before the next step, as a training
loop's optimizer.zero_grad(set_to_none=True) does.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys

SCENARIOS = {
    "fixed": "B = 100k rows every step",
    "last_smaller": "B = 100k rows, every 10th step 37k rows (an epoch's last batch)",
    "random": "B uniform in 50k..150k rows, a new size every step",
}
COLS = 52


def sizes(scenario: str, steps: int) -> list[int]:
    rng = random.Random(0)
    if scenario == "fixed":
        return [100_000] * steps
    if scenario == "last_smaller":
        return [37_000 if (i + 1) % 10 == 0 else 100_000 for i in range(steps)]
    return [rng.randint(50_000, 150_000) for _ in range(steps)]


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB, from /proc."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run_scenario(scenario: str, steps: int) -> dict:
    import torch

    import koemorph_fused as kf

    torch.set_num_threads(1)
    plan = sizes(scenario, steps)
    rows = max(plan)
    data = [torch.rand(rows, COLS) for _ in range(4)]
    lib = kf._ops.library
    start, _ = rss_mb()
    for b in plan:
        pred, target, prev, raw = (x[:b] for x in data)
        p, r = pred.detach().requires_grad_(), raw.detach().requires_grad_()
        kf.temporal_loss(p, target, prev, r).total.backward()
        del p, r  # the gradients go back to the pool
    end, peak = rss_mb()
    s = lib.cpu_buffer_pool_stats()
    return dict(scenario=scenario, steps=steps, requests=s["hits"] + s["misses"], hits=s["hits"],
                misses=s["misses"], evictions=s["evictions"], idle_mb=s["cached_bytes"] / 2**20,
                peak_in_use_mb=s["peak_in_use_bytes"] / 2**20, limit_mb=s["limit_bytes"] / 2**20,
                rss_start_mb=start, rss_end_mb=end, rss_peak_mb=peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps per scenario (default 300)")
    p.add_argument("--scenario", choices=sorted(SCENARIOS) + ["all"], default="all")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.child:
        print(json.dumps(run_scenario(args.child, args.steps)))
        return 0
    names = sorted(SCENARIOS) if args.scenario == "all" else [args.scenario]
    print("| scenario | requests | hits | evictions | idle MB | peak in use MB | RSS start -> end (peak) MB |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {name}: {SCENARIOS[name]} | {r['requests']} | {r['hits']} ({100 * r['hits'] / r['requests']:.0f} %) "
              f"| {r['evictions']} | {r['idle_mb']:.0f} | {r['peak_in_use_mb']:.0f} "
              f"| {r['rss_start_mb']:.0f} -> {r['rss_end_mb']:.0f} ({r['rss_peak_mb']:.0f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
