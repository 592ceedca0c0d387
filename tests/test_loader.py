"""Loading the compiled operators: the installed module, a just-in-time build
from a source tree without one, and what the error says when neither works."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import copy_source_tree
from koemorph_fused import _loader

ROOT = Path(__file__).resolve().parents[1]


def test_missing_tools_are_named(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.delenv("CUDA_HOME", raising=False)  # restored after: the build plan may set it
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/nonexistent"])
    with pytest.raises(ImportError) as info:
        _loader._build_just_in_time(ImportError("no _C"))
    message = str(info.value)
    for expected in ("ninja", "C++ compiler", "headers", "pip install --no-build-isolation"):
        assert expected in message, message


def test_a_bad_build_switch_is_named_before_building(monkeypatch):
    monkeypatch.setenv("KOEMORPH_FUSED_WITH_CUDA", "bogus")
    with pytest.raises(ImportError, match=r"cannot be built just in time: KOEMORPH_FUSED_WITH_CUDA='bogus'"):
        _loader._build_just_in_time(ImportError("no _C"))


@pytest.mark.parametrize("gpus, expected", [("", False), ("9.0+PTX", True)])
def test_the_just_in_time_build_follows_the_build_plan(monkeypatch, capsys, tmp_path, gpus, expected):
    """Same decision as setup.py (koemorph_fused/_build_config.py): CUDA for a
    visible GPU, the CPU backend without one; stubbed, nothing compiles."""
    import torch
    from torch.utils import cpp_extension

    from koemorph_fused import _build_config as config

    for var in (config.CPU_ONLY_VAR, config.WITH_CUDA_VAR, config.ARCH_LIST_VAR, "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)  # (and restored after: apply_plan sets some)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(config, "find_cuda_home", lambda: "/opt/cuda")
    monkeypatch.setattr(config, "visible_gpu_archs", lambda: gpus)
    monkeypatch.setattr(_loader, "_missing_build_tools", lambda with_cuda: [])
    monkeypatch.setattr(config, "SOURCE_ROOT", tmp_path)  # the build folder it makes
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "built")
    assert _loader._build_just_in_time(ImportError("no _C")) == "built"
    (kw,) = calls
    assert kw["with_cuda"] is expected
    assert kw["sources"] == config.sources(expected) and "-g0" in kw["extra_cflags"]
    assert Path(kw["build_directory"]).parent == tmp_path / "build"
    assert kw["build_directory"].endswith("-cuda" if expected else "-cpu")
    message = capsys.readouterr().err
    assert "just in time" in message and "minute" in message
    if expected:
        assert "-DKF_CUDA_ARCH_LIST=9.0+PTX" in kw["extra_cflags"] and "architectures 9.0+PTX" in message
    else:
        assert "the CPU backend" in message and "KOEMORPH_FUSED_WITH_CUDA=1" in message


@pytest.mark.slow
def test_just_in_time_build_from_a_source_tree(source_tree_build):
    """A copy of the sources without any built library imports and works
    (CPU-only build: about 2.5 minutes on 2 cores; with other tests it starts
    at collection and runs beside them, see tests/conftest.py)."""
    result = source_tree_build.wait(timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert str(source_tree_build.tree / "build") in lines[0]
    assert float(lines[1]) == 1.0  # mse of a difference of ones
    assert "just in time" in result.stderr



def test_a_source_tree_never_takes_another_trees_library(tmp_path):
    """An editable install elsewhere answers every ``koemorph_fused.*`` name from
    ``sys.meta_path``. A source tree on PYTHONPATH without a built library must
    not load that other library (built from other sources); it builds its own,
    which here fails fast for want of a compiler."""
    tree = tmp_path / "src"
    copy_source_tree(tree)
    code = f"""
import importlib.machinery, sys
class EditableLike:  # what setuptools' editable finder does, for another tree
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "koemorph_fused._C":
            return importlib.machinery.PathFinder.find_spec(name, [{str(ROOT / "koemorph_fused")!r}])
        return None
sys.meta_path.append(EditableLike)
import koemorph_fused
"""
    env = dict(os.environ, PYTHONPATH=str(tree), CXX="no-such-compiler", KOEMORPH_FUSED_CPU_ONLY="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, "imported the other tree's library"
    assert "ImportError" in result.stderr and "no-such-compiler" in result.stderr, result.stderr[-3000:]


def test_import_does_not_load_torch_dynamo():
    """torch._dynamo takes seconds to import; the package needs it only while
    torch.compile traces (koemorph_fused/_untraced.py), when it is loaded."""
    code = "import sys, koemorph_fused; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
