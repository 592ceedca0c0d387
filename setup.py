"""Build koemorph_fused's C++ (and, where a CUDA toolkit is found, CUDA) extension.

    pip install --no-build-isolation .        # or -e . for development

The extension is compiled against the torch that is already installed. Set
KOEMORPH_FUSED_CPU_ONLY=1 to skip CUDA, TORCH_CUDA_ARCH_LIST to choose GPU
architectures (default 8.0;8.6;8.9;9.0+PTX), and MAX_JOBS to limit ninja.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_kf_build_config", ROOT / "koemorph_fused" / "_build_config.py")
config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config)

config.prepare_cuda_environment()  # before torch.utils.cpp_extension reads CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda, why = config.want_cuda(torch.version.cuda)
print(f"koemorph_fused: building the {'CPU and CUDA' if with_cuda else 'CPU'} backend ({why})", file=sys.stderr)

Extension = CUDAExtension if with_cuda else CppExtension
extra_compile_args = {"cxx": config.cxx_flags(with_cuda)}
if with_cuda:
    extra_compile_args["nvcc"] = list(config.NVCC_FLAGS)
    print(f"koemorph_fused: CUDA architectures {config.cuda_arch_list()}", file=sys.stderr)

ext = Extension(
    name="koemorph_fused._C",
    sources=[os.path.relpath(s, ROOT) for s in config.sources(with_cuda)],
    include_dirs=[str(ROOT / "csrc")],
    define_macros=config.define_macros(with_cuda),
    extra_compile_args=extra_compile_args,
    extra_link_args=config.openmp_flags(),
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
