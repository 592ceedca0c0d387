"""Build koemorph_fused's C++ extension: the CPU backend, plus the CUDA backend
where a GPU and a CUDA toolkit are found (or where it is asked for).

    pip install --no-build-isolation .        # or -e . for development

The extension is compiled against the torch that is already installed. What is
built, and why, is decided in koemorph_fused/_build_config.py (printed first):

    KOEMORPH_FUSED_CPU_ONLY=1    the CPU backend only
    KOEMORPH_FUSED_WITH_CUDA=1   the CUDA backend too, even without a GPU
    TORCH_CUDA_ARCH_LIST=...     its GPU architectures (default: the visible
                                 GPUs', else 8.0;8.6;8.9;9.0+PTX)
    CUDA_HOME=...                the CUDA toolkit
    MAX_JOBS=N                   parallel compile jobs (ninja)
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_kf_build_config", ROOT / "koemorph_fused" / "_build_config.py")
config = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = config  # dataclasses look their module up there
_spec.loader.exec_module(config)

try:
    plan = config.current_plan()
except config.BuildConfigError as exc:
    sys.exit(f"koemorph_fused: error: {exc}")
config.apply_plan(plan)  # before torch.utils.cpp_extension reads CUDA_HOME

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

for line in f"building {plan.describe()}".splitlines():
    print(f"koemorph_fused: {line}", file=sys.stderr)

Extension = CUDAExtension if plan.with_cuda else CppExtension
extra_compile_args = {"cxx": config.cxx_flags(plan.with_cuda)}
if plan.with_cuda:
    extra_compile_args["nvcc"] = list(config.NVCC_FLAGS)

ext = Extension(
    name="koemorph_fused._C",
    sources=[os.path.relpath(s, ROOT) for s in config.sources(plan.with_cuda)],
    include_dirs=[str(ROOT / "csrc")],
    define_macros=config.define_macros(plan.with_cuda),
    extra_compile_args=extra_compile_args,
    extra_link_args=config.openmp_flags(),
)

class BuildInTree(BuildExtension.with_options(use_ninja=True)):
    """Objects stay in build/temp between builds (pip's editable install would
    compile in a new temporary folder each time), so that ninja recompiles only
    the files whose command line or headers changed; and the files compile in
    the order of config.CPU_SOURCES (longest first) rather than by name."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(ROOT / "build" / "temp")

    def build_extension(self, ext):
        # setuptools sorts the sources by name, and a first build's ninja
        # starts them in that order: a long file that starts last keeps one
        # core busy while the others idle.
        rank = {Path(s).name: i for i, s in enumerate(ext.sources)}
        compile_sources = self.compiler.compile

        def compile_in_listed_order(sources, *args, **kwargs):
            ordered = sorted(sources, key=lambda s: rank.get(Path(s).name, len(rank)))
            return compile_sources(ordered, *args, **kwargs)

        self.compiler.compile = compile_in_listed_order
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_sources


setup(ext_modules=[ext], cmdclass={"build_ext": BuildInTree})
