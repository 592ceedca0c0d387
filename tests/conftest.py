import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import torch

from helpers import copy_source_tree

JIT_BUILD_TEST = "test_loader.py::test_just_in_time_build_from_a_source_tree"
_JIT_BUILD = pytest.StashKey["SourceTreeBuild"]()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SourceTreeBuild:
    """A copy of the sources without a built library, imported in a child
    process that builds the CPU backend just in time, then runs one loss.
    With `background`, the child and its compilers run at a lower priority
    (nice 10): the tests beside it keep the cores they need, and the build
    takes what is left. Output goes to files, so a full pipe never stalls it."""

    CODE = ("import torch, koemorph_fused as kf; "
            "print(kf._ops.library.__file__); "
            "out = kf.temporal_loss(torch.ones(2, 52), torch.zeros(2, 52)); print(out.terms[0].item())")

    def __init__(self, background: bool):
        self.dir = Path(tempfile.mkdtemp(prefix="koemorph-jit-"))
        self.tree = self.dir / "src"
        copy_source_tree(self.tree)
        env = dict(os.environ, PYTHONPATH=str(self.tree), KOEMORPH_FUSED_CPU_ONLY="1")
        self._out = open(self.dir / "stdout", "w+")
        self._err = open(self.dir / "stderr", "w+")
        lower = (lambda: os.nice(10)) if background and hasattr(os, "nice") else None
        self.process = subprocess.Popen([sys.executable, "-c", self.CODE], cwd=self.dir, env=env,
                                        stdout=self._out, stderr=self._err, text=True, preexec_fn=lower)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        returncode = self.process.wait(timeout=timeout)
        self._out.seek(0)
        self._err.seek(0)
        return subprocess.CompletedProcess(self.process.args, returncode, self._out.read(), self._err.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._out.close()
        self._err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after -k / -m deselected what they deselect
def pytest_collection_modifyitems(session, config, items):
    """The just-in-time build test compiles the whole CPU backend (over two
    minutes on 2 cores). When it is selected, its build starts now, at a lower
    priority, and the test runs last: the rest of the suite, mostly on one
    core, runs beside the compile."""
    jit = [item for item in items if item.nodeid.endswith(JIT_BUILD_TEST)]
    if not jit or config.option.collectonly:
        return
    items.remove(jit[0])
    items.append(jit[0])
    config.stash[_JIT_BUILD] = SourceTreeBuild(background=len(items) > 1)


def pytest_sessionfinish(session, exitstatus):
    build: Optional[SourceTreeBuild] = session.config.stash.get(_JIT_BUILD, None)
    if build is not None:
        build.close()


@pytest.fixture
def source_tree_build(request) -> SourceTreeBuild:
    """The build started at collection (pytest_collection_modifyitems)."""
    build = request.config.stash.get(_JIT_BUILD, None)
    if build is None:  # selected in a way the hook did not see
        build = request.config.stash[_JIT_BUILD] = SourceTreeBuild(background=False)
    return build
