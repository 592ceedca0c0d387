"""What gets built where (koemorph_fused/_build_config.py): the decision for a
machine with or without a GPU, explicit requests, the architecture list torch
would pick, and what set-up and CI do with it. Nothing here compiles."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from koemorph_fused import _build_config as config

ROOT = Path(__file__).resolve().parents[1]
HOME = "/opt/cuda"
FACTS = dict(cpu_only=False, cuda_requested=False, torch_cuda="13.0", cuda_home=HOME, gpu_archs="", arch_list=None)


def plan(**changes):
    return config.plan_build(**{**FACTS, **changes})


# --- the decision -----------------------------------------------------------------


def test_a_visible_gpu_gets_cuda_for_its_own_architecture():
    p = plan(gpu_archs="9.0+PTX")
    assert p.with_cuda and p.cuda_arch_list == "9.0+PTX"
    assert p.summary() == "cuda:9.0+PTX"
    assert "visible GPU" in p.reason and not p.hint


def test_no_gpu_builds_the_cpu_backend_and_says_how_to_get_cuda():
    p = plan()
    assert not p.with_cuda and p.cuda_arch_list == "" and p.summary() == "cpu"
    assert "no GPU visible" in p.reason
    assert f"{config.WITH_CUDA_VAR}=1" in p.hint and config.PORTABLE_CUDA_ARCH_LIST in p.hint
    assert p.describe().splitlines() == [f"the CPU backend ({p.reason})", p.hint]


def test_no_gpu_with_an_architecture_list_still_needs_the_explicit_request():
    p = plan(arch_list="9.0")
    assert not p.with_cuda
    assert "TORCH_CUDA_ARCH_LIST=9.0" in p.hint


@pytest.mark.parametrize(
    "arch_list, gpus, expected",
    [
        (None, "", config.PORTABLE_CUDA_ARCH_LIST),  # CI: no GPU, no list
        ("8.0;9.0+PTX", "", "8.0;9.0+PTX"),
        (None, "8.6+PTX", "8.6+PTX"),
        ("native", "8.6+PTX", "8.6+PTX"),  # torch's word for the visible GPUs
        ("9.0", "8.6+PTX", "9.0"),  # the list wins over the GPUs
    ],
)
def test_an_explicit_request_builds_cuda_without_a_gpu(arch_list, gpus, expected):
    p = plan(cuda_requested=True, arch_list=arch_list, gpu_archs=gpus)
    assert p.with_cuda and p.cuda_arch_list == expected
    assert config.WITH_CUDA_VAR in p.reason and expected in p.reason


def test_an_architecture_list_applies_to_a_gpu_machine_without_a_request():
    p = plan(gpu_archs="8.6+PTX", arch_list="8.0;8.6")
    assert p.with_cuda and p.cuda_arch_list == "8.0;8.6"


def test_cpu_only_wins_over_a_gpu():
    p = plan(cpu_only=True, gpu_archs="9.0+PTX")
    assert not p.with_cuda and config.CPU_ONLY_VAR in p.reason and not p.hint


@pytest.mark.parametrize(
    "changes, cpu_reason",
    [
        (dict(torch_cuda=None, gpu_archs=""), "CPU-only build"),
        (dict(cuda_home=None, gpu_archs="9.0+PTX"), "no CUDA toolkit"),
    ],
)
def test_what_cannot_build_cuda_gives_the_cpu_backend_or_an_error_when_asked(changes, cpu_reason):
    p = plan(**changes)
    assert not p.with_cuda and cpu_reason in p.reason
    with pytest.raises(config.BuildConfigError, match=config.WITH_CUDA_VAR):
        plan(cuda_requested=True, **changes)


def test_cpu_only_wins_over_a_request_for_cuda():
    p = plan(cpu_only=True, cuda_requested=True, gpu_archs="9.0+PTX")
    assert not p.with_cuda
    assert p.reason == f"{config.CPU_ONLY_VAR} is set; it overrides {config.WITH_CUDA_VAR}"


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), (" ON ", True), ("0", False), ("", False), ("off", False)])
def test_switches_read_the_usual_spellings(value, expected):
    assert config.env_flag(config.WITH_CUDA_VAR, {config.WITH_CUDA_VAR: value}) is expected
    assert config.env_flag(config.WITH_CUDA_VAR, {}) is False


def test_a_misspelt_switch_is_an_error_naming_it():
    with pytest.raises(config.BuildConfigError, match=r"KOEMORPH_FUSED_CPU_ONLY='maybe'"):
        config.env_flag(config.CPU_ONLY_VAR, {config.CPU_ONLY_VAR: "maybe"})


# --- the environment it reads -----------------------------------------------------


@pytest.fixture
def machine(monkeypatch):
    """A machine with a toolkit, whose GPUs are set per test; records whether
    the GPUs were looked at (that initialises CUDA)."""
    for var in (config.CPU_ONLY_VAR, config.WITH_CUDA_VAR, config.ARCH_LIST_VAR, "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    looked = []
    state = SimpleNamespace(gpus="", looked=looked)

    def gpus():
        looked.append(True)
        return state.gpus

    monkeypatch.setattr(config, "find_cuda_home", lambda: HOME)
    monkeypatch.setattr(config, "visible_gpu_archs", gpus)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    return state


def test_current_plan_follows_the_environment(machine, monkeypatch):
    assert config.current_plan().summary() == "cpu"
    machine.gpus = "8.9+PTX"
    assert config.current_plan().summary() == "cuda:8.9+PTX"
    monkeypatch.setenv(config.ARCH_LIST_VAR, "8.0;9.0")
    assert config.current_plan().summary() == "cuda:8.0,9.0"
    machine.gpus = ""
    assert config.current_plan().summary() == "cpu"
    monkeypatch.setenv(config.WITH_CUDA_VAR, "1")
    assert config.current_plan().summary() == "cuda:8.0,9.0"


def test_cpu_only_does_not_look_for_gpus(machine, monkeypatch):
    monkeypatch.setenv(config.CPU_ONLY_VAR, "1")
    assert config.current_plan().summary() == "cpu"
    assert machine.looked == []


def test_the_planned_architectures_reach_torch_and_the_library(monkeypatch):
    monkeypatch.delenv(config.ARCH_LIST_VAR, raising=False)
    monkeypatch.setenv("CUDA_HOME", "/somewhere")
    p = plan(gpu_archs="8.6;9.0+PTX")
    config.apply_plan(p)
    assert os.environ[config.ARCH_LIST_VAR] == "8.6;9.0+PTX"  # what torch compiles for
    assert os.environ["CUDA_HOME"] == "/somewhere"  # an explicit toolkit stays
    assert "-DKF_CUDA_ARCH_LIST=8.6,9.0+PTX" in config.cxx_flags(True)  # what `info` reports
    assert config.built_summary(SimpleNamespace(with_cuda=1, cuda_arch_list="8.6,9.0+PTX")) == p.summary()
    assert config.built_summary(SimpleNamespace(with_cuda=0, cuda_arch_list="")) == "cpu"


def test_a_cpu_plan_leaves_the_architecture_list_alone(monkeypatch):
    monkeypatch.setenv(config.ARCH_LIST_VAR, "9.0")
    monkeypatch.delenv("CUDA_HOME", raising=False)  # restored after the test
    config.apply_plan(plan())
    assert os.environ[config.ARCH_LIST_VAR] == "9.0"


def test_compile_flags_drop_debug_information():
    """Python's CFLAGS carry -g; the last -g option wins."""
    assert "-g0" in config.cxx_flags(False)
    assert "--threads" in config.NVCC_FLAGS  # nvcc builds the architectures in parallel


# --- the sources and the build-time estimate ---------------------------------------

CSRC = ROOT / "csrc"
_DTYPE_ARGS = {"float32": "float, Float", "float64": "double, Double", "float16": "c10::Half, Half",
               "bfloat16": "c10::BFloat16, BFloat16"}


def test_every_cpu_source_is_built_and_every_built_source_exists():
    listed = set(config.CPU_SOURCES)
    assert len(listed) == len(config.CPU_SOURCES), "a file is listed twice"
    on_disk = {p.name for p in CSRC.glob("*.cpp")}
    assert listed == on_disk, f"not built: {sorted(on_disk - listed)}; missing: {sorted(listed - on_disk)}"


@pytest.mark.parametrize("isa", config.CPU_KERNEL_ISAS)
@pytest.mark.parametrize("dtype", config.CPU_KERNEL_DTYPES)
def test_each_kernel_file_instantiates_its_own_dtype_only(isa, dtype):
    """One translation unit per (instruction set, dtype): what lets the cores
    compile side by side."""
    name = f"cpu_loss_kernel_{isa}_{dtype}.cpp"
    assert name in config.kernel_sources("cpu_loss_kernel")
    text = (CSRC / name).read_text()
    assert text.count("KF_DEFINE_CPU_KERNELS(") == 1
    assert f"KF_DEFINE_CPU_KERNELS({_DTYPE_ARGS[dtype]})" in text
    if isa == "avx2":  # shared headers first, then the pragma, then the kernels
        order = [text.index(h) for h in ('"cpu_kernel_baseline_includes.h"', '"cpu_avx2_target.h"',
                                          '"cpu_loss_kernel.h"')]
        assert order == sorted(order)
    else:
        assert "#define CPU_CAPABILITY DEFAULT" in text and "cpu_avx2_target.h" not in text


def test_the_dtype_list_of_the_kernels_matches_the_files():
    """The dispatch (cpu_loss_kernel_args.h) and the files agree on the dtypes."""
    args = (CSRC / "cpu_loss_kernel_args.h").read_text()
    for dtype, pair in _DTYPE_ARGS.items():
        assert f"X({pair})" in args, dtype
    assert sorted(config.CPU_KERNEL_DTYPES) == sorted(_DTYPE_ARGS)


AVX2_OBJECTS = sorted((ROOT / "build" / "temp" / "csrc").glob("*avx2*.o"))


def vex_functions(disassembly: str) -> list[str]:
    """Functions of an ``objdump -d -C`` listing that use VEX (AVX) instructions."""
    found, name = [], None
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            continue
        fields = line.split("\t")
        if name and len(fields) >= 2 and fields[-1].split()[:1] and fields[-1].split()[0].startswith("v"):
            if not found or found[-1] != name:
                found.append(name)
    return found


def test_vex_detection():
    listing = ("0000000000000000 <f()>:\n   0:\tvmovups %ymm0,(%rdi)\n"
               "0000000000000010 <g()>:\n  10:\tmovups %xmm0,(%rdi)\n")
    assert vex_functions(listing) == ["f()"]


@pytest.mark.skipif(not AVX2_OBJECTS or shutil.which("objdump") is None,
                    reason="needs the objects of a set-up build (build/temp) and objdump")
@pytest.mark.parametrize("obj", AVX2_OBJECTS, ids=lambda p: p.name)
def test_avx2_objects_keep_shared_inline_functions_baseline(obj):
    """The linker keeps one copy of an inline function that several objects
    define; one from an AVX2 object must not contain AVX instructions (it
    would crash a CPU without AVX2 in the baseline kernels). Only code of the
    AVX2 namespaces may."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)],
                             capture_output=True, text=True, check=True).stdout
    shared = [f for f in vex_functions(listing) if "AVX2" not in f]
    assert not shared, f"{obj.name}: AVX code in functions other objects may share: {shared[:5]}"


def test_parallel_compile_simulation():
    """Files start in order, each on the first free core (as ninja does)."""
    assert config.simulate_parallel_seconds([10, 10, 10], 1) == 30
    assert config.simulate_parallel_seconds([10, 10, 10], 2) == 20
    assert config.simulate_parallel_seconds([30, 10, 10, 10], 2) == 30
    assert config.simulate_parallel_seconds([10, 10, 10, 30], 2) == 40  # a long file last: one core idles
    assert config.simulate_parallel_seconds([], 2) == 0


def test_the_estimate_covers_every_file_and_uses_the_jobs():
    assert set(config._COMPILE_CPU_SECONDS) == set(config.CPU_SOURCES)
    assert all(s > 0 for s in config._COMPILE_CPU_SECONDS.values())
    one, two = config.cpu_build_seconds(1), config.cpu_build_seconds(2)
    assert one == pytest.approx(sum(config._COMPILE_CPU_SECONDS.values()))
    assert one / 2 <= two < one
    # a new file not yet measured counts, and makes the estimate longer
    assert config.cpu_build_seconds(2, (*config.CPU_SOURCES, "new_kernel.cpp")) > two
    text = config.build_time_estimate(plan(cpu_only=True), jobs=2)
    assert text.startswith("about ") and "with 2 compile jobs on an idle machine" in text


# --- torch's own choice of architectures -------------------------------------------


@pytest.mark.parametrize(
    "caps, expected",
    [
        ([(9, 0)], "9.0+PTX"),
        ([(8, 6), (8, 0), (8, 6)], "8.0;8.6+PTX"),
        ([(12, 0)], "9.0+PTX"),  # newer than torch was built for: capped
        ([], ""),
    ],
)
def test_gpu_architectures(caps, expected):
    assert config.archs_for_gpus(caps, ["sm_80", "sm_86", "sm_90", "compute_90"]) == expected


@pytest.mark.parametrize("caps", [[(9, 0)], [(8, 6), (8, 0)], [(7, 5), (8, 9), (8, 9)]])
def test_gpu_architectures_are_torchs(monkeypatch, caps):
    """The same list as torch.utils.cpp_extension derives when TORCH_CUDA_ARCH_LIST
    is unset (compared through the -gencode flags it makes)."""
    from torch.utils import cpp_extension

    arch_list = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
    monkeypatch.delenv(config.ARCH_LIST_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: caps[i])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    torchs = sorted(cpp_extension._get_cuda_arch_flags())
    monkeypatch.setenv(config.ARCH_LIST_VAR, config.archs_for_gpus(caps, arch_list))
    assert sorted(cpp_extension._get_cuda_arch_flags()) == torchs


# --- the script set-up runs ---------------------------------------------------------


def run_script(*args, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in (config.CPU_ONLY_VAR, config.WITH_CUDA_VAR)}
    return subprocess.run(
        [sys.executable, str(ROOT / "koemorph_fused" / "_build_config.py"), *args],
        env={**full_env, **env}, capture_output=True, text=True, timeout=300,
    )


def test_the_script_says_what_it_would_build_and_rejects_a_bad_switch():
    result = run_script("--summary", KOEMORPH_FUSED_CPU_ONLY="1")
    assert result.returncode == 0 and result.stdout == "cpu\n", result.stderr
    result = run_script(KOEMORPH_FUSED_CPU_ONLY="2")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "koemorph_fused: error: KOEMORPH_FUSED_CPU_ONLY='2': expected 1 or 0 (also true/false, yes/no, on/off)"
    )


def test_the_script_checks_a_built_library_against_the_plan(tmp_path):
    result = run_script("--check-built", str(tmp_path / "_C.so"), KOEMORPH_FUSED_CPU_ONLY="1")
    assert result.returncode == 1 and "cannot be loaded" in result.stdout
    from koemorph_fused import _ops

    built = Path(_ops.library.__file__)
    result = run_script("--check-built", str(built), KOEMORPH_FUSED_CPU_ONLY="1")
    assert result.returncode == (0 if not _ops.library.with_cuda else 1), result.stdout + result.stderr


def test_setup_py_runs_and_says_what_it_builds():
    """setup.py loads this module by file path (before the package exists) and
    prints the plan; `--name` stops before building."""
    env = {k: v for k, v in os.environ.items() if k != config.WITH_CUDA_VAR}
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                            env={**env, config.CPU_ONLY_VAR: "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "koemorph_fused"
    assert "koemorph_fused: building the CPU backend (KOEMORPH_FUSED_CPU_ONLY is set)" in result.stderr
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                            env={**env, config.CPU_ONLY_VAR: "perhaps"}, timeout=300)
    assert result.returncode == 1
    assert "koemorph_fused: error: KOEMORPH_FUSED_CPU_ONLY='perhaps'" in result.stderr
    assert "Traceback" not in result.stderr


# A Python program that runs setup.py (CPU only) up to its setup() call:
# `captured` holds setup()'s arguments, `dist` a Distribution made of them.
_RUN_SETUP_PY = f"""
import os, runpy, setuptools, sys
os.environ[{config.CPU_ONLY_VAR!r}] = "1"
captured = {{}}
setuptools.setup = captured.update
runpy.run_path("setup.py", run_name="__main__")
dist = setuptools.Distribution(captured)
"""


def test_setup_compiles_the_files_in_the_listed_order(tmp_path):
    """Longest first (config.CPU_SOURCES), not by name as setuptools sorts them."""
    code = _RUN_SETUP_PY + f"""
cmd = captured["cmdclass"]["build_ext"](dist)
cmd.ensure_finalized()
# The CCompiler class build_ext checks against: the one of the distutils
# module it comes from (setuptools' copy may be loaded under two names).
base = next(c for c in type(cmd).__mro__ if c.__module__.endswith("distutils.command.build_ext"))
class Recorder(sys.modules[base.__module__].CCompiler):
    executables = {{}}

    def compile(self, sources, *args, **kwargs):
        print("ORDER", ",".join(os.path.basename(s) for s in sources))
        raise SystemExit(0)
cmd.force = True
cmd.compiler = Recorder()
cmd.build_extension(captured["ext_modules"][0])
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    order = result.stdout.split("ORDER ")[-1].split()[0].split(",")
    assert order == list(config.CPU_SOURCES)
    assert order != sorted(order)  # what setuptools alone would do


def test_objects_stay_in_build_temp_for_incremental_builds(tmp_path):
    """pip's editable install points `build` at a new temporary folder each
    time; the objects still go to build/temp, where ninja finds them again."""
    code = _RUN_SETUP_PY + f"""
build = dist.reinitialize_command("build", reinit_subcommands=True)
build.build_temp = {str(tmp_path)!r}  # as setuptools' editable_wheel does
cmd = dist.get_command_obj("build_ext")
cmd.ensure_finalized()
print(cmd.build_temp)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == str(ROOT / "build" / "temp")
