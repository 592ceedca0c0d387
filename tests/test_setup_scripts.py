"""The set-up's helpers and CI's entry point, without building anything:
.ci/build_progress.py (what the terminal shows of a build), .ci/ptxas_report.awk
(registers and spills), and .ci/run (its exit codes and what it asks set-up to build)."""

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci"

_spec = importlib.util.spec_from_file_location("build_progress", CI / "build_progress.py")
progress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(progress)

# Lines as `pip install -v` relays them from torch's ninja build (indented by pip).
CXX_LINE = (
    "  [3/9] c++ -MMD -MF /src/build/temp.linux-x86_64-cpython-311/csrc/ops.o.d -Wsign-compare -DNDEBUG -g "
    "-fwrapv -O3 -Wall -fPIC -I/src/csrc -c -c /src/csrc/ops.cpp -o /src/build/temp/csrc/ops.o -O3 -g0\n"
)
NVCC_LINE = (
    "  [9/9] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile --dependency-output x.o.d "
    "-I/src/csrc -c -c /src/csrc/cuda/loss_kernel.cu -o /src/build/temp/csrc/cuda/loss_kernel.o "
    "-gencode=arch=compute_90,code=sm_90 --threads 0\n"
)
LINK_LINE = "  g++ -shared -L/lib /src/build/temp/csrc/ops.o -lc10 -o build/lib/koemorph_fused/_C.cpython-311-x86_64-linux-gnu.so\n"


@pytest.mark.parametrize(
    "line, shown",
    [
        (CXX_LINE, "[3/9] csrc/ops.cpp"),
        (NVCC_LINE, "[9/9] csrc/cuda/loss_kernel.cu"),
        (LINK_LINE, "linking _C.cpython-311-x86_64-linux-gnu.so"),
        ("  koemorph_fused: building the CPU backend (no GPU visible)\n", "koemorph_fused: building the CPU backend (no GPU visible)"),
        ("  /src/csrc/ops.cpp:12:3: error: 'foo' was not declared in this scope\n",
         "/src/csrc/ops.cpp:12:3: error: 'foo' was not declared in this scope"),
        ("  ptxas info    : Used 40 registers, used 1 barriers, 400 bytes cmem[0]\n", None),
        ("  Running command python setup.py develop\n", None),
        ("  /src/csrc/ops.cpp:3: warning: unused variable 'x'\n", None),
    ],
)
def test_what_the_terminal_shows_of_each_line(line, shown):
    assert progress.compact(line) == shown


def test_clock():
    assert [progress.clock(s) for s in (0, 59.9, 61, 3600 + 62)] == ["0:00", "0:59", "1:01", "1:01:02"]


def run_filter(text, *args, delay=None, tmp_path):
    """Feed `text` (or, with `delay`, each line after `delay` seconds) to the filter."""
    log = tmp_path / "build" / "build.log"
    feeder = "import sys, time\nfor line in sys.argv[1].splitlines(True):\n"
    feeder += f"    time.sleep({delay or 0}); sys.stdout.write(line); sys.stdout.flush()\n"
    producer = subprocess.Popen([sys.executable, "-c", feeder, text], stdout=subprocess.PIPE)
    result = subprocess.run(
        [sys.executable, str(CI / "build_progress.py"), "--log", str(log), *args],
        stdin=producer.stdout, capture_output=True, text=True, timeout=120,
    )
    producer.wait(timeout=60)
    return result, log


def test_the_log_gets_everything_and_the_terminal_a_line_per_step(tmp_path):
    plan = "  koemorph_fused: building the CPU backend (no GPU visible)\n"
    text = plan + "  Running setup.py develop\n" + plan + CXX_LINE + "  ptxas info    : Used 40 registers\n" + LINK_LINE
    result, log = run_filter(text, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert log.read_text() == text
    shown = [line.split(None, 1)[1] for line in result.stdout.splitlines()]
    assert shown == [
        "koemorph_fused: building the CPU backend (no GPU visible)",  # once, though pip runs setup.py twice
        "[3/9] csrc/ops.cpp",
        "linking _C.cpython-311-x86_64-linux-gnu.so",
    ]
    assert all(line.split()[0].count(":") == 1 for line in result.stdout.splitlines())  # elapsed m:ss first


def test_times_count_from_the_start_of_set_up(tmp_path):
    result, _ = run_filter(CXX_LINE, "--offset", "125", "--heartbeat", "30", delay=0.5, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] in (["2:05", "[3/9]"], ["2:06", "[3/9]"]), result.stdout


def test_a_quiet_build_still_shows_it_is_alive(tmp_path):
    result, log = run_filter(CXX_LINE * 2, "--heartbeat", "0.2", delay=1.5, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "still building" in result.stdout
    assert log.read_text() == CXX_LINE * 2


@pytest.mark.parametrize("option, value", [("--heartbeat", "0"), ("--heartbeat", "nan"), ("--offset", "-1")])
def test_the_filter_rejects_bad_numbers(tmp_path, option, value):
    result = subprocess.run(
        [sys.executable, str(CI / "build_progress.py"), "--log", str(tmp_path / "x.log"), option, value],
        input="", capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and option in result.stderr and "Traceback" not in result.stderr


# --- ptxas report ------------------------------------------------------------------

PTXAS = textwrap.dedent("""\
    ptxas info    : Compiling entry function '_ZN14koemorph_fused6kernelIfEEvPKf' for 'sm_80'
    ptxas info    : Function properties for _ZN14koemorph_fused6kernelIfEEvPKf
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 40 registers, used 1 barriers, 400 bytes cmem[0]
    ptxas info    : Compiling entry function '_ZN14koemorph_fused6kernelIdEEvPKd' for 'sm_90'
    ptxas info    : Function properties for _ZN14koemorph_fused6kernelIdEEvPKd
        16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
    ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]
""")


def ptxas_report(text, tmp_path):
    log = tmp_path / "build.log"
    log.write_text(text)
    return subprocess.run(["awk", "-v", "q='", "-f", str(CI / "ptxas_report.awk"), str(log)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("awk") is None, reason="no awk")
def test_ptxas_report_is_one_line_unless_a_kernel_spills(tmp_path):
    clean = ptxas_report("".join(PTXAS.splitlines(True)[:4]), tmp_path)  # the sm_80 kernel only
    assert clean.returncode == 0
    assert clean.stdout.splitlines() == [
        "ptxas: 1 kernels for sm_80, at most 40 registers, no spills (details in the build log)"
    ]
    spilling = ptxas_report(PTXAS, tmp_path)
    assert spilling.returncode == 1
    lines = spilling.stdout.splitlines()
    assert lines[0].startswith("ptxas: 2 kernels for sm_80 sm_90, at most 255 registers, 1 spilling")
    assert len(lines) == 2 and "spills on sm_90: 16 bytes stack frame, 8 bytes spill stores" in lines[1]
    assert "kernelIdE" in lines[1] or "kernel<double>" in lines[1]  # demangled where c++filt exists
    assert ptxas_report("no ptxas here\n", tmp_path).stdout == ""


# --- .ci/run -------------------------------------------------------------------------


def fake_repo(tmp_path, pytest_status, setup_status=0):
    """A tree with the real .ci/run, a .ci/setup that records what it was asked
    to build, and a .venv/bin/python standing in for pytest."""
    (tmp_path / ".ci").mkdir(parents=True)
    shutil.copy(CI / "run", tmp_path / ".ci" / "run")
    (tmp_path / ".ci" / "setup").write_text(
        "env | grep -E '^(KOEMORPH_FUSED_WITH_CUDA|TORCH_CUDA_ARCH_LIST)=' | sort > setup.env\n"
        f"exit {setup_status}\n"
    )
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        f"#!/bin/sh\necho \"$@\" > pytest.args\n"
        "env | grep -E '^(KOEMORPH_FUSED_WITH_CUDA|TORCH_CUDA_ARCH_LIST)=' > pytest.env\n"
        f"exit {pytest_status}\n"
    )
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def ci_run(repo, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("KOEMORPH_FUSED_WITH_CUDA", "TORCH_CUDA_ARCH_LIST", "KOEMORPH_FUSED_CPU_ONLY", "CUDA_HOME")}
    return subprocess.run(["bash", str(repo / ".ci" / "run")], cwd=repo, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("pytest_status, ci_status", [(0, 0), (1, 1), (5, 1), (2, 2)])
def test_ci_fails_on_failing_tests_and_on_no_tests(tmp_path, pytest_status, ci_status):
    repo = fake_repo(tmp_path, pytest_status)
    result = ci_run(repo)
    assert result.returncode == ci_status, result.stdout + result.stderr
    assert (repo / "pytest.args").read_text().split() == ["-m", "pytest", "-q"]  # the README's command
    if pytest_status == 5:
        assert "collected no tests" in result.stderr


def test_ci_stops_when_setup_fails(tmp_path):
    repo = fake_repo(tmp_path, 0, setup_status=3)
    assert ci_run(repo).returncode == 3
    assert not (repo / "pytest.args").exists()


def test_ci_asks_for_cuda_for_every_architecture_where_a_toolkit_is(tmp_path):
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    repo = fake_repo(tmp_path / "repo", 0)
    assert ci_run(repo, CUDA_HOME=str(toolkit)).returncode == 0
    assert (repo / "setup.env").read_text().splitlines() == [
        "KOEMORPH_FUSED_WITH_CUDA=1",
        "TORCH_CUDA_ARCH_LIST=8.0;8.6;8.9;9.0+PTX",
    ]
    assert (repo / "pytest.env").read_text() == ""  # the tests do not inherit the build switches
    repo = fake_repo(tmp_path / "cpu", 0)
    assert ci_run(repo, CUDA_HOME=str(toolkit), KOEMORPH_FUSED_CPU_ONLY="1").returncode == 0
    assert (repo / "setup.env").read_text() == ""


# --- .ci/setup: what it installs beside what ------------------------------------------

def setup_array(name: str) -> list[str]:
    """The packages of one ``NAME=(...)`` list in .ci/setup."""
    for line in (CI / "setup").read_text().splitlines():
        if line.startswith(f"{name}=("):
            return [p.strip("'\"") for p in line[len(name) + 2:line.rindex(")")].split()]
    raise AssertionError(f".ci/setup has no {name}=(...) list")


def _closure(names):
    """Installed distributions ``names`` need (themselves included), by
    normalised name; extras are left out."""
    import importlib.metadata as md
    import re

    seen, todo = set(), list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in dist.requires or [] if "extra ==" not in r]
    return seen


def test_torch_and_the_other_dependencies_share_only_what_is_installed_first():
    """torch and the other dependencies install side by side (two pip
    processes): a package both need must be installed before, or the two
    would write it at the same time. Checked against this environment."""
    first = {p.lower() for p in setup_array("BUILD_DEPS") + setup_array("SHARED_DEPS")}
    shared = _closure(["torch"]) & _closure(setup_array("OTHER_DEPS"))
    assert shared, "the check found no installed packages to compare"
    assert shared <= first, f"add to SHARED_DEPS in .ci/setup: {sorted(shared - first)}"


_STUB_PYTHON = r"""#!/bin/bash
# .venv/bin/python for a set-up run that installs and builds nothing: it logs
# what set-up asked for, in order.
log="$PWD/calls.log"
case "$*" in
  *"pip install"*" tqdm "*) echo deps-start >> "$log"; sleep 1.5; echo deps-end >> "$log"; exit "${DEPS_STATUS:-0}";;
  *"pip install"*" torch") echo torch-start >> "$log"; sleep 0.5; echo torch-end >> "$log";;
  *"pip install"*" setuptools "*) echo tools >> "$log";;
  *"pip install -v"*) echo build >> "$log"; touch koemorph_fused/_C.stub.so;;
  "-c import torch; print(torch.__version__)") exit 1;;
  "koemorph_fused/_build_config.py --with-estimate") printf 'the CPU backend (stub)\nabout 1 minute\n';;
  ".ci/build_progress.py"*) cat > /dev/null;;
  "-c "*) echo import-check >> "$log"; echo "         stub";;
  *) echo "unexpected: $*" >> "$log"; exit 9;;
esac
"""


def stub_setup(tmp_path, **env):
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "koemorph_fused").mkdir()
    shutil.copy(CI / "setup", repo / ".ci" / "setup")
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(_STUB_PYTHON)
    python.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "MAX_JOBS")}
    result = subprocess.run(["bash", str(repo / ".ci" / "setup")], cwd=repo, env={**base, **env},
                            capture_output=True, text=True, timeout=60)
    return result, (repo / "calls.log").read_text().split()


def test_setup_installs_the_dependencies_beside_torch_and_waits_for_them(tmp_path):
    result, calls = stub_setup(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unexpected:" not in " ".join(calls)
    order = {c: calls.index(c) for c in calls}
    assert order["tools"] < order["deps-start"] < order["torch-end"]  # beside torch
    assert order["torch-end"] < order["build"]
    assert order["deps-end"] < order["import-check"]  # waited for before the check
    assert "set-up done" in result.stdout
    assert "build (no built library yet): about 1 minute;" in result.stdout


def test_setup_stops_when_the_dependencies_fail(tmp_path):
    result, calls = stub_setup(tmp_path, DEPS_STATUS="1")
    assert result.returncode == 1
    assert "installing the dependencies failed" in result.stderr and "build/dependencies.log" in result.stderr
    assert "import-check" not in calls and "set-up done" not in result.stdout
