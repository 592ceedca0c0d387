"""How the C++/CUDA extension is built: one definition for ``setup.py`` (ahead of
time) and for :mod:`koemorph_fused._loader` (just in time from a source tree).

This module must not import :mod:`koemorph_fused` or torch at import time:
``setup.py`` loads it by file path before the package exists.

Environment variables:

``KOEMORPH_FUSED_CPU_ONLY=1``
    build the CPU backend only, even where a CUDA toolchain is found.
``TORCH_CUDA_ARCH_LIST``
    the GPU architectures to build for (default :data:`DEFAULT_CUDA_ARCH_LIST`).
``CUDA_HOME`` / ``CUDA_PATH``
    the CUDA toolkit; otherwise found from ``nvcc`` on ``PATH`` or ``/usr/local/cuda``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent
CSRC = SOURCE_ROOT / "csrc"

#: Ampere (A100, A10/3090), Ada (L4/4090), Hopper (H100/H200), plus PTX for newer GPUs.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"

# Order matters: the baseline CPU kernels are linked before the AVX2 ones so
# that the linker keeps baseline copies of shared inline functions.
CPU_SOURCES = (
    "ops.cpp",
    "loss_inputs.cpp",
    "cpu_buffer_pool.cpp",
    "python_entry.cpp",
    "loss_autograd.cpp",
    "cpu_loss_kernel.cpp",
    "cpu_loss_kernel_default.cpp",
    "cpu_loss_kernel_avx2.cpp",
)
CUDA_SOURCES = ("cuda/loss_kernel.cu",)

CXX_FLAGS = ["-O3", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"]


def cpu_only_requested() -> bool:
    return os.environ.get("KOEMORPH_FUSED_CPU_ONLY", "0").strip().lower() in {"1", "true", "yes", "on"}


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


def want_cuda(torch_cuda_version: str | None) -> tuple[bool, str]:
    """Whether to build the CUDA backend, and why (for the build log)."""
    if cpu_only_requested():
        return False, "KOEMORPH_FUSED_CPU_ONLY is set"
    if torch_cuda_version is None:
        return False, "the installed torch is a CPU-only build"
    home = find_cuda_home()
    if home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"CUDA toolkit at {home}, torch built with CUDA {torch_cuda_version}"


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


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
        archs = ",".join(a for a in re.split(r"[;,\s]+", cuda_arch_list()) if a)
        flags.append(f"-DKF_CUDA_ARCH_LIST={archs}")
    return flags


def prepare_cuda_environment() -> None:
    """Point torch.utils.cpp_extension at the right toolkit and architectures.
    Call before importing torch.utils.cpp_extension (it reads CUDA_HOME once)."""
    home = find_cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
