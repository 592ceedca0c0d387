"""Load the compiled operators: the installed ``koemorph_fused._C``, or, when the
package is imported from a source tree without one, a just-in-time build of
the same sources with :func:`torch.utils.cpp_extension.load`.

Importing the library registers the ``torch.ops.koemorph_fused.*`` operators.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from . import _build_config as config

_INSTALL_HINT = "Install it with:  pip install --no-build-isolation .  (from the source tree)"


def import_cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its warning "No CUDA
    runtime is found, using CUDA_HOME=..." where no GPU is visible: it says
    nothing on a CPU-only machine that has a toolkit. Import it only where it
    is needed (a build; torch.compile imports it too), never at package import."""
    import torch

    name = "torch.utils.cpp_extension"
    if name in sys.modules or torch.cuda.is_available():
        return importlib.import_module(name)
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        logger.setLevel(level)


def _missing_build_tools(with_cuda: bool) -> list[str]:
    """What a just-in-time build would lack, each with how to fix it."""
    cpp_extension = import_cpp_extension()

    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} not on PATH; install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if not any((Path(p) / "torch" / "library.h").is_file() for p in cpp_extension.include_paths()):
        missing.append("torch's C++ headers (reinstall torch from a wheel that ships include/)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("the Python development headers (e.g. apt install python3-dev)")
    if with_cuda and shutil.which(str(Path(config.find_cuda_home() or "") / "bin" / "nvcc")) is None:
        missing.append(f"nvcc (set CUDA_HOME, or {config.CPU_ONLY_VAR}=1 for a CPU-only build)")
    return missing


def _build_just_in_time(reason: Exception) -> ModuleType:
    import torch

    try:
        plan = config.current_plan()
    except config.BuildConfigError as exc:
        raise ImportError(
            f"koemorph_fused: the compiled extension is not installed ({reason}) and cannot be "
            f"built just in time: {exc}"
        ) from reason
    config.apply_plan(plan)  # before cpp_extension reads CUDA_HOME
    cpp_extension = import_cpp_extension()

    with_cuda = plan.with_cuda
    missing = _missing_build_tools(with_cuda)
    if missing:
        raise ImportError(
            "koemorph_fused: the compiled extension is not installed "
            f"({reason}) and a just-in-time build is impossible here; missing: "
            + "; ".join(missing) + f". {_INSTALL_HINT}"
        ) from reason

    flavour = "cuda" if with_cuda else "cpu"
    build_dir = config.SOURCE_ROOT / "build" / f"jit-torch{torch.__version__}-{flavour}"
    build_dir.mkdir(parents=True, exist_ok=True)
    macros = [f"-D{k}={v}" for k, v in config.define_macros(with_cuda)]
    what = "\n".join("  " + line for line in plan.describe().splitlines())
    print(
        f"koemorph_fused: no installed extension; building it just in time in {build_dir}, once "
        f"({config.build_time_estimate(plan)}):\n{what}",
        file=sys.stderr,
    )
    try:
        return cpp_extension.load(
            name="koemorph_fused_jit",
            sources=config.sources(with_cuda),
            extra_include_paths=[str(config.CSRC)],
            extra_cflags=config.cxx_flags(with_cuda) + macros,
            extra_ldflags=config.openmp_flags(),
            extra_cuda_cflags=config.NVCC_FLAGS + macros,
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=True,
            verbose=os.environ.get("KOEMORPH_FUSED_VERBOSE_BUILD") == "1",
        )
    except Exception as exc:  # compiler errors, missing headers, ...
        raise ImportError(
            f"koemorph_fused: the just-in-time build in {build_dir} failed: {exc}\n"
            f"Set KOEMORPH_FUSED_VERBOSE_BUILD=1 to see the compiler output. {_INSTALL_HINT}"
        ) from exc


def _import_own_library() -> ModuleType:
    """``koemorph_fused._C`` from this package's own directory.

    An editable install elsewhere puts a finder on ``sys.meta_path`` that
    answers for every ``koemorph_fused.*`` name, whatever the parent package's
    ``__path__`` says; a source tree imported through PYTHONPATH would then load
    another tree's library, built from other sources. So look only next to
    this file.
    """
    name = f"{__package__}._C"
    if name in sys.modules:
        return sys.modules[name]
    package_dir = str(Path(__file__).resolve().parent)
    spec = importlib.machinery.PathFinder.find_spec(name, [package_dir])
    if spec is None or spec.loader is None:
        raise ImportError(f"no compiled {name} in {package_dir}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    parent = sys.modules.get(__package__)
    if parent is not None:
        parent._C = module  # as `import koemorph_fused._C` would
    return module


def load_library() -> ModuleType:
    """The compiled module (registers the operators as a side effect)."""
    if not (config.CSRC / "ops.cpp").is_file():
        # An installed wheel: whatever the import system finds is ours.
        try:
            return importlib.import_module(f"{__package__}._C")
        except ImportError as exc:
            raise ImportError(
                f"koemorph_fused: the compiled extension koemorph_fused._C is missing ({exc}) "
                "and no C++ sources lie next to the package to build it. Reinstall koemorph_fused."
            ) from exc
    try:
        return _import_own_library()
    except ImportError as exc:
        return _build_just_in_time(exc)
