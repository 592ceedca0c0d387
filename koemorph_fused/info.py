"""``koemorph-fused info``: what was built and what this machine offers."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch


def collect() -> dict[str, Any]:
    import koemorph_fused
    from koemorph_fused import _ops

    lib = _ops.library
    archs = [a for a in getattr(lib, "cuda_arch_list", "").split(",") if a]
    info: dict[str, Any] = {
        "koemorph_fused": koemorph_fused.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "extension": getattr(lib, "__file__", "?"),
        "backends": ["cpu"] + (["cuda"] if getattr(lib, "with_cuda", 0) else []),
        "cpu_kernel": lib.cpu_kernel(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_parallel": "OpenMP" if getattr(lib, "cpu_openmp", 0) else "none (one thread)",
        "cuda_architectures": archs,
        "cpu_buffer_pool": lib.cpu_buffer_pool_stats(),
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda_devices"].append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")


def main(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:{width}s}  {value}")
    return 0
