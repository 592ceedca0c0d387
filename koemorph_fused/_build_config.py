"""How the C++/CUDA extension is built: one definition for ``setup.py`` (ahead of
time), for :mod:`koemorph_fused._loader` (just in time from a source tree) and
for ``.ci/setup`` (which runs this file to say what it is about to build).

This module must not import :mod:`koemorph_fused` or torch at import time:
``setup.py`` loads it by file path before the package exists.

Which backends are built (:func:`plan_build`):

* the CPU backend, always;
* the CUDA backend when torch was built with CUDA, a CUDA toolkit is found and a
  GPU is visible, for the visible GPUs' architectures (torch's own default);
* with a toolkit but no GPU, the CPU backend only, unless asked for CUDA.

Environment variables:

``KOEMORPH_FUSED_CPU_ONLY=1``
    build the CPU backend only, even where a GPU and a CUDA toolkit are found
    (and even with ``KOEMORPH_FUSED_WITH_CUDA=1``).
``KOEMORPH_FUSED_WITH_CUDA=1``
    build the CUDA backend even without a GPU (CI, build machines); an error
    where it cannot be built (CPU-only torch, no toolkit).
``TORCH_CUDA_ARCH_LIST``
    the GPU architectures to build for when the CUDA backend is built, e.g.
    ``"9.0"`` or ``"8.0;8.6;8.9;9.0+PTX"``. Unset: the visible GPUs', or
    :data:`PORTABLE_CUDA_ARCH_LIST` when there is none.
``CUDA_HOME`` / ``CUDA_PATH``
    the CUDA toolkit; otherwise found from ``nvcc`` on ``PATH`` or ``/usr/local/cuda``.

Run as a script (``python koemorph_fused/_build_config.py``) it prints the
plan for this machine; see ``--help``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent
CSRC = SOURCE_ROOT / "csrc"

#: Ampere (A100, A10/3090), Ada (L4/4090), Hopper (H100/H200), plus PTX for
#: newer GPUs: what a CUDA build without a visible GPU targets unless
#: ``TORCH_CUDA_ARCH_LIST`` says otherwise (CI asks for it explicitly).
PORTABLE_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"

CPU_ONLY_VAR = "KOEMORPH_FUSED_CPU_ONLY"
WITH_CUDA_VAR = "KOEMORPH_FUSED_WITH_CUDA"
ARCH_LIST_VAR = "TORCH_CUDA_ARCH_LIST"

#: The instruction sets and dtypes of the CPU kernels: each kernel is compiled
#: once per pair, in its own translation unit ``<kernel>_<isa>_<dtype>.cpp``
#: (see csrc/cpu_loss_kernel_args.h), so that a parallel build keeps every
#: core busy instead of waiting for one file that instantiates every dtype.
CPU_KERNEL_ISAS = ("default", "avx2")
CPU_KERNEL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def kernel_sources(kernel: str) -> tuple[str, ...]:
    """The translation units of one CPU kernel, e.g. ``cpu_loss_kernel``."""
    return tuple(f"{kernel}_{isa}_{dtype}.cpp" for isa in CPU_KERNEL_ISAS for dtype in CPU_KERNEL_DTYPES)


# The CPU backend's translation units, longest compile first: set-up (setup.py)
# and the just-in-time build start them in this order, so no core is left
# with a long file at the end. A new kernel adds its files here, and their
# measured compile seconds to _COMPILE_CPU_SECONDS. The baseline kernels link
# before the AVX2 ones; either way, the inline functions several kernel files
# define (c10's error types, shared_ptr internals) stay free of AVX2 code
# whichever copy the linker keeps, because the AVX2 files include their shared
# headers before the target pragma (csrc/cpu_kernel_baseline_includes.h):
# tests/test_build_config.py checks the objects with objdump.
CPU_SOURCES = (
    "cpu_sequence_kernel_default.cpp",
    "cpu_loss_kernel_default_float16.cpp",
    "cpu_loss_kernel_default_bfloat16.cpp",
    "loss_autograd.cpp",
    "cpu_sequence_kernel_avx2.cpp",
    "cpu_loss_kernel_default_float32.cpp",
    "python_entry.cpp",
    "cpu_loss_kernel_default_float64.cpp",
    "cpu_loss_kernel_avx2_bfloat16.cpp",
    "cpu_sequence_kernel.cpp",
    "cpu_loss_kernel_avx2_float16.cpp",
    "loss_inputs.cpp",
    "cpu_loss_kernel_avx2_float64.cpp",
    "cpu_loss_kernel_avx2_float32.cpp",
    "cpu_loss_kernel.cpp",
    "ops.cpp",
    "cpu_buffer_pool.cpp",
)
CUDA_SOURCES = ("cuda/loss_kernel.cu", "cuda/sequence_kernel.cu")

# -g0: Python's own CFLAGS (which setuptools passes first) carry -g; debug
# information for the templated kernels multiplies the object size and costs
# compile time. The last -g option wins.
CXX_FLAGS = ["-O3", "-g0", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
# --threads 0: nvcc compiles the architectures of one file in parallel, on as
# many threads as there are CPUs. -Xptxas=-v: registers and spills per kernel,
# for the build log (.ci/ptxas_report.awk).
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr", "--threads", "0"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class BuildConfigError(ValueError):
    """The environment asks for a build that cannot be made here."""


def env_flag(name: str, environ: os._Environ | dict | None = None) -> bool:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off (or unset)."""
    value = (os.environ if environ is None else environ).get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BuildConfigError(f"{name}={value!r}: expected 1 or 0 (also true/false, yes/no, on/off)")


def cpu_only_requested() -> bool:
    return env_flag(CPU_ONLY_VAR)


def cuda_requested() -> bool:
    return env_flag(WITH_CUDA_VAR)


def _has_nvcc(home: str | os.PathLike | None) -> bool:
    return bool(home) and (Path(home) / "bin" / "nvcc").is_file() and (
        Path(home) / "include" / "cuda_runtime.h"
    ).is_file()


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder, or None. Unlike torch's guess, a wrapper script
    called ``nvcc`` on PATH does not make its folder a toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _has_nvcc(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(os.path.realpath(nvcc)).parent.parent
        if _has_nvcc(home):
            return str(home)
    if _has_nvcc("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def archs_for_gpus(capabilities: Sequence[tuple[int, int]], torch_arch_list: Sequence[str]) -> str:
    """The architecture list torch itself builds for when ``TORCH_CUDA_ARCH_LIST``
    is unset (``torch.utils.cpp_extension._get_cuda_arch_flags``): each visible
    GPU's compute capability, capped at the newest ``sm_XY`` that torch was
    built for, sorted, with PTX for the newest. "" without GPUs."""
    supported = [int(re.sub(r"\D", "", a.split("_", 1)[1])) for a in torch_arch_list if a.startswith("sm_")]
    newest = max(((sm // 10, sm % 10) for sm in supported), default=None)
    archs = set()
    for cap in capabilities:
        cap = (int(cap[0]), int(cap[1]))
        if newest is not None:
            cap = min(cap, newest)
        archs.add(cap)
    if not archs:
        return ""
    names = [f"{major}.{minor}" for major, minor in sorted(archs)]
    names[-1] += "+PTX"
    return ";".join(names)


def visible_gpu_archs() -> str:
    """:func:`archs_for_gpus` for the GPUs this process sees ("" for none)."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return ""
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return archs_for_gpus(caps, torch.cuda.get_arch_list())


@dataclass(frozen=True)
class BuildPlan:
    """What to build, and why, in words for the user."""

    with_cuda: bool
    cuda_arch_list: str  # ";"-separated, as TORCH_CUDA_ARCH_LIST; "" without CUDA
    cuda_home: str | None
    reason: str  # one line: why these backends
    hint: str = ""  # one line: how to build CUDA too, where that could work

    @property
    def backends(self) -> str:
        return "CPU and CUDA backends" if self.with_cuda else "CPU backend"

    def summary(self) -> str:
        """``cpu`` or ``cuda:8.0,8.6,...``: compared with what a built library reports."""
        return "cuda:" + _comma_list(self.cuda_arch_list) if self.with_cuda else "cpu"

    def describe(self) -> str:
        text = f"the {self.backends} ({self.reason})"
        return text + (f"\n{self.hint}" if self.hint else "")


def plan_build(
    *,
    cpu_only: bool,
    cuda_requested: bool,
    torch_cuda: str | None,
    cuda_home: str | None,
    gpu_archs: str,
    arch_list: str | None,
) -> BuildPlan:
    """The decision, from facts only (no environment, no torch): see the module
    docstring. ``gpu_archs`` is :func:`archs_for_gpus` of the visible GPUs,
    ``arch_list`` the value of ``TORCH_CUDA_ARCH_LIST`` (None when unset)."""
    if cpu_only:  # the narrower request wins, e.g. over a WITH_CUDA exported for a whole session
        also = f"; it overrides {WITH_CUDA_VAR}" if cuda_requested else ""
        return BuildPlan(False, "", cuda_home, f"{CPU_ONLY_VAR} is set{also}")
    if torch_cuda is None:
        if cuda_requested:
            raise BuildConfigError(f"{WITH_CUDA_VAR} is set, but the installed torch is a CPU-only build")
        return BuildPlan(False, "", cuda_home, "the installed torch is a CPU-only build")
    if cuda_home is None:
        if cuda_requested:
            raise BuildConfigError(
                f"{WITH_CUDA_VAR} is set, but no CUDA toolkit was found (set CUDA_HOME to its folder)"
            )
        why = "no CUDA toolkit found"
        return BuildPlan(False, "", None, why + (" for the visible GPU; set CUDA_HOME" if gpu_archs else ""))
    arch_list = (arch_list or "").strip()
    if arch_list == "native":  # torch's word for "the visible GPUs"
        arch_list = ""
    if not gpu_archs and not cuda_requested:
        archs = f"{ARCH_LIST_VAR}={arch_list}" if arch_list else f"{ARCH_LIST_VAR}, default {PORTABLE_CUDA_ARCH_LIST}"
        return BuildPlan(
            False, "", cuda_home, f"CUDA toolkit at {cuda_home}, but no GPU visible",
            hint=f"To build the CUDA backend anyway, set {WITH_CUDA_VAR}=1 (architectures: {archs}).",
        )
    if arch_list:
        archs, whose = arch_list, f"{ARCH_LIST_VAR}"
    elif gpu_archs:
        archs, whose = gpu_archs, "the visible GPUs"
    else:
        archs, whose = PORTABLE_CUDA_ARCH_LIST, f"no GPU visible, {ARCH_LIST_VAR} unset: the portable list"
    why = f"{WITH_CUDA_VAR} is set" if cuda_requested else "a GPU is visible"
    return BuildPlan(
        True, archs, cuda_home,
        f"{why}; CUDA toolkit at {cuda_home}, torch built with CUDA {torch_cuda}; "
        f"architectures {archs} ({whose})",
    )


def current_plan() -> BuildPlan:
    """:func:`plan_build` for this process's environment, torch and GPUs."""
    import torch

    cpu_only, requested = cpu_only_requested(), cuda_requested()
    home = find_cuda_home()
    # Only look for GPUs (which initialises CUDA) when it can change the answer.
    gpus = visible_gpu_archs() if torch.version.cuda and home and not cpu_only else ""
    return plan_build(
        cpu_only=cpu_only,
        cuda_requested=requested,
        torch_cuda=torch.version.cuda,
        cuda_home=home,
        gpu_archs=gpus,
        arch_list=os.environ.get(ARCH_LIST_VAR),
    )


def apply_plan(plan: BuildPlan) -> None:
    """Point torch.utils.cpp_extension at the plan's toolkit and architectures.
    Call before importing torch.utils.cpp_extension (it reads CUDA_HOME once)."""
    if plan.cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = plan.cuda_home
    if plan.with_cuda:
        os.environ[ARCH_LIST_VAR] = plan.cuda_arch_list


def cuda_arch_list() -> str:
    """The architectures being built: ``TORCH_CUDA_ARCH_LIST`` as
    :func:`apply_plan` set it (the portable list if nothing set it)."""
    return os.environ.get(ARCH_LIST_VAR) or PORTABLE_CUDA_ARCH_LIST


def _comma_list(archs: str) -> str:
    return ",".join(a for a in re.split(r"[;,\s]+", archs) if a)


def sources(with_cuda: bool) -> list[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(CSRC / n) for n in names]


def define_macros(with_cuda: bool) -> list[tuple[str, str]]:
    """Macros for both compilers."""
    return [("KF_WITH_CUDA", "1" if with_cuda else "0")]


def openmp_flags() -> list[str]:
    """``-fopenmp`` (compile and link) where torch's parallel backend is OpenMP,
    as in the Linux wheels. ``at::parallel_for`` is inline in torch's headers:
    without the flag its ``#pragma omp parallel`` is silently dropped and every
    chunk runs on the calling thread. The library then needs ``libgomp.so.1``,
    which is the copy torch has already loaded."""
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def cxx_flags(with_cuda: bool) -> list[str]:
    """Flags for the C++ compiler. The architecture list, read by ops.cpp only,
    travels as a bare, comma-separated token list (no quotes or semicolons for
    the shell to eat); it is kept away from nvcc, which splits -D at commas."""
    flags = list(CXX_FLAGS) + openmp_flags()
    if with_cuda:
        flags.append(f"-DKF_CUDA_ARCH_LIST={_comma_list(cuda_arch_list())}")
    return flags


# Compiler CPU seconds (user + sys) per translation unit, measured with
# the build itself (GCC 12, torch 2.14.1, x86-64; 2026-12-07, on the
# project's 2-core machine while other jobs ran: up to a third above what a
# quiet machine needs, so the estimate errs long; bench/compile_times.py
# measures them again; the two sequence kernel files were measured again
# by hand after their running sums moved into registers, on a quiet machine,
# user time), and the
# CUDA files (cuda/loss_kernel.cu and cuda/sequence_kernel.cu together, for
# 4 architectures: host side, and per architecture, nvcc 13.0). They only
# feed the estimate that set-up and the just-in-time build print; a file
# missing here counts as _UNMEASURED_FILE_S.
_COMPILE_CPU_SECONDS = {
    "cpu_sequence_kernel_default.cpp": 52.3,
    "cpu_loss_kernel_default_float16.cpp": 34.7,
    "cpu_loss_kernel_default_bfloat16.cpp": 27.6,
    "loss_autograd.cpp": 23.9,
    "cpu_sequence_kernel_avx2.cpp": 22.0,
    "cpu_loss_kernel_default_float32.cpp": 13.9,
    "python_entry.cpp": 13.5,
    "cpu_loss_kernel_default_float64.cpp": 11.1,
    "cpu_loss_kernel_avx2_bfloat16.cpp": 10.8,
    "cpu_sequence_kernel.cpp": 10.5,
    "cpu_loss_kernel_avx2_float16.cpp": 10.1,
    "loss_inputs.cpp": 9.5,
    "cpu_loss_kernel_avx2_float64.cpp": 8.3,
    "cpu_loss_kernel_avx2_float32.cpp": 7.7,
    "cpu_loss_kernel.cpp": 7.2,
    "ops.cpp": 6.5,
    "cpu_buffer_pool.cpp": 2.9,
}
_UNMEASURED_FILE_S = 30.0
_LINK_S = 3.0
_CUDA_HOST_S = 33
_CUDA_PER_ARCH_S = 41


def simulate_parallel_seconds(seconds: Sequence[float], jobs: int) -> float:
    """When the last of these compiles ends on ``jobs`` idle cores, each file
    started, in the given order, on the first core that is free (how ninja
    schedules a first build: it has no earlier timings to reorder by)."""
    free_at = [0.0] * max(1, jobs)
    for s in seconds:
        core = free_at.index(min(free_at))
        free_at[core] += s
    return max(free_at)


def cpu_build_seconds(jobs: int, order: Sequence[str] | None = None) -> float:
    """Seconds the CPU backend's files take to compile on ``jobs`` idle cores,
    in ``order`` (default: the order set-up compiles them in, see setup.py)."""
    names = CPU_SOURCES if order is None else order
    return simulate_parallel_seconds([_COMPILE_CPU_SECONDS.get(n, _UNMEASURED_FILE_S) for n in names], jobs)


def build_time_estimate(plan: BuildPlan, jobs: int | None = None) -> str:
    """About how long the build takes on an idle machine, in words."""
    if jobs is None:
        try:
            jobs = int(os.environ.get("MAX_JOBS", ""))
        except ValueError:
            jobs = 0
        jobs = jobs if jobs > 0 else os.cpu_count() or 1
    seconds = cpu_build_seconds(jobs) + _LINK_S
    if plan.with_cuda:
        archs = len(_comma_list(plan.cuda_arch_list).split(","))
        # nvcc --threads compiles the architectures side by side.
        seconds += _CUDA_HOST_S + _CUDA_PER_ARCH_S * archs / min(jobs, archs)
    minutes = max(1, round(seconds / 60))
    return f"about {minutes} minute{'s' if minutes > 1 else ''} with {jobs} compile job{'s' if jobs > 1 else ''} on an idle machine"


def built_summary(library) -> str:
    """:meth:`BuildPlan.summary` of a loaded extension module."""
    return "cuda:" + library.cuda_arch_list if library.with_cuda else "cpu"


def _load_built_library(path: Path):
    import importlib.util

    import torch  # noqa: F401  (the library links against it)

    spec = importlib.util.spec_from_file_location("koemorph_fused._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python koemorph_fused/_build_config.py",
        description="Say what `pip install .` would build on this machine, and why "
        f"(see {CPU_ONLY_VAR}, {WITH_CUDA_VAR}, {ARCH_LIST_VAR}).",
    )
    parser.add_argument("--summary", action="store_true", help="print only 'cpu' or 'cuda:ARCH,...'")
    parser.add_argument("--estimate", action="store_true", help="print about how long the build takes")
    parser.add_argument("--with-estimate", action="store_true",
                        help="print the plan, then, as its last line, about how long the build takes "
                             "(one torch import for both; what set-up uses)")
    parser.add_argument(
        "--check-built", metavar="LIB", type=Path,
        help="exit 0 when the built library LIB (koemorph_fused/_C*.so) matches the plan, "
        "1 (saying why) when it does not or cannot be loaded",
    )
    args = parser.parse_args(argv)
    try:
        plan = current_plan()
    except BuildConfigError as exc:
        print(f"koemorph_fused: error: {exc}", file=sys.stderr)
        return 2
    if args.check_built is not None:
        try:
            built = built_summary(_load_built_library(args.check_built))
        except Exception as exc:  # missing file, undefined symbols after a torch upgrade, ...
            print(f"the built library cannot be loaded ({type(exc).__name__}: {exc})")
            return 1
        if built != plan.summary():
            print(f"the built library is {built}; this machine asks for {plan.summary()}")
            return 1
        return 0
    if args.estimate:
        print(build_time_estimate(plan))
    else:
        print(plan.summary() if args.summary else plan.describe())
        if args.with_estimate:
            print(build_time_estimate(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
