"""Compiler CPU seconds per translation unit of the extension, and the wall
time they add up to on an idle machine with N cores.

    .venv/bin/python bench/compile_times.py                 # every file of the last build
    .venv/bin/python bench/compile_times.py --jobs 2 --json times.json
    .venv/bin/python bench/compile_times.py --only cpu_loss_kernel

Reads the compile commands of the last ``bash .ci/setup`` (or ``pip install
-e .``) build from ``build/temp/build.ninja`` and runs each one again, one at
a time, into a scratch folder (the build's own objects are untouched). CPU
seconds (user + sys of the compiler, from the kernel's accounting) hardly
depend on what else runs on the machine, unlike wall time, so they are what
koemorph_fused/_build_config.py's estimate is made of. The idle wall time is
simulated the way ninja schedules: files start in build-file order, each on
the first free job slot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "koemorph_fused"))
from _build_config import simulate_parallel_seconds  # noqa: E402  (by path: no torch import)


def compile_commands(ninja_file: Path) -> list[tuple[str, list[str]]]:
    """(source file name, compiler argv) of each C++ compile in a
    torch.utils.cpp_extension build.ninja (CUDA files are left out)."""
    text = ninja_file.read_text()
    variables = dict(re.findall(r"^(\w+) = (.*)$", text, re.M))
    rule = re.search(r"^rule compile\n  command = (.*)$", text, re.M).group(1)
    commands = []
    for out, src in re.findall(r"^build (\S+): compile (\S+)$", text, re.M):
        line = rule.replace("-MMD -MF $out.d ", "")
        line = re.sub(r"\$(\w+)", lambda m: {"in": src, "out": "OUT"}.get(m.group(1), variables.get(m.group(1), "")),
                      line)
        commands.append((Path(src).name, shlex.split(line)))
    return commands


def cpu_seconds(argv: list[str], scratch: Path) -> tuple[float, float]:
    """(user + sys CPU seconds, wall seconds) of one compile into ``scratch``."""
    argv = [str(scratch / "x.o") if a == "OUT" else a for a in argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ninja", type=Path, default=ROOT / "build" / "temp" / "build.ninja",
                        help="the build file (default: build/temp/build.ninja of the last set-up)")
    parser.add_argument("--only", default="", help="only the files whose name contains this text")
    parser.add_argument("--jobs", type=int, default=2, help="cores of the machine to estimate for (default 2)")
    parser.add_argument("--json", type=Path, help="write {file: cpu seconds} here")
    args = parser.parse_args(argv)
    if not args.ninja.is_file():
        parser.error(f"{args.ninja} does not exist: build first (bash .ci/setup)")
    commands = [(n, c) for n, c in compile_commands(args.ninja) if args.only in n]
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, command in commands:
            cpu, wall = cpu_seconds(command, Path(scratch))
            times[name] = round(cpu, 1)
            print(f"{name:40s} {cpu:7.1f} s CPU  ({wall:6.1f} s wall)", flush=True)
    total = sum(times.values())
    idle = simulate_parallel_seconds(list(times.values()), args.jobs)
    print(f"{'total':40s} {total:7.1f} s CPU; on an idle {args.jobs}-core machine about {idle:.0f} s "
          f"(files in build order, each on the first free core)")
    if args.json:
        args.json.write_text(json.dumps(times, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
