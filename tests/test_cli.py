"""The ``koemorph-fused`` command line: misuse never ends in a traceback.

Every bad argument is caught while the command line is parsed, before any
work starts, and prints exactly one ``koemorph-fused: error: ...`` line on
stderr with exit status 2; a missing CUDA device likewise. ``--help`` of every
subcommand works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from koemorph_fused import benchmark, check, cli
from koemorph_fused.demo import cli as demo_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_work(monkeypatch):
    """Any work starting is a test failure: misuse must be caught before it."""

    def started(*args, **kwargs):
        raise AssertionError("work started despite a bad argument")

    monkeypatch.setattr(benchmark, "run", started)
    monkeypatch.setattr(demo_cli, "_run", started)
    monkeypatch.setattr(check, "run_case", started)


def usage_error(argv, capsys) -> str:
    """Run ``koemorph-fused argv``; assert exit status 2 and one error line; return it."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("koemorph-fused: error: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


# ---------------------------------------------------------------- the cases of issue 11

def test_bench_json_in_a_missing_folder(capsys, tmp_path):
    line = usage_error(["bench", "--quick", "--json", str(tmp_path / "nonexistent" / "x.json")], capsys)
    assert line.startswith("koemorph-fused: error: bench: argument --json:") and "does not exist" in line


@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
def test_bench_outputs_must_be_writable_files(flag, capsys, tmp_path):
    name = "x.png" if flag == "--plot" else "x.out"
    line = usage_error(["bench", "--quick", flag, f"/nonexistent/{name}"], capsys)
    assert f"argument {flag}:" in line and "/nonexistent" in line
    line = usage_error(["bench", "--quick", flag, str(tmp_path)], capsys)  # a folder
    assert f"argument {flag}:" in line and "folder" in line


def test_demo_plot_in_proc(capsys):
    line = usage_error(["demo", "--plot", "/proc/x.png"], capsys)
    assert line.startswith("koemorph-fused: error: demo: argument --plot: cannot write '/proc/x.png'")


def test_plot_needs_an_image_extension(capsys, tmp_path):
    line = usage_error(["demo", "--plot", str(tmp_path / "curves.txt")], capsys)
    assert "argument --plot" in line and ".png" in line
    assert not (tmp_path / "curves.txt").exists()


def test_the_writability_check_leaves_no_file_behind(capsys, tmp_path):
    out = tmp_path / "new.json"
    usage_error(["bench", "--json", str(out), "--threads", "0"], capsys)
    assert not out.exists()
    existing = tmp_path / "old.json"
    existing.write_text("keep me")
    usage_error(["bench", "--json", str(existing), "--threads", "0"], capsys)
    assert existing.read_text() == "keep me"


def test_bench_threads_far_above_the_cpus_is_an_error_not_a_crash():
    """torch.set_num_threads(100000) crashes the process: never get that far
    (in a subprocess, so that a regression cannot take pytest down)."""
    proc = subprocess.run([sys.executable, "-m", "koemorph_fused", "bench", "--threads", "100000"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.splitlines() == [
        f"koemorph-fused: error: bench: argument --threads: expected an integer in 1..{os.cpu_count()}, "
        "got 100000 (see koemorph-fused bench --help)"]
    assert proc.stdout == ""


@pytest.mark.parametrize("threads", ["0", "-1", str((os.cpu_count() or 1) + 1), "1,100000", "two"])
def test_bench_threads_out_of_range(threads, capsys):
    assert "argument --threads:" in usage_error(["bench", "--threads", threads], capsys)


@pytest.mark.parametrize("batch", ["4,,8", "4,", ",4", "", "0", "-4", "4.5", str(2**24 + 1)])
def test_bench_batch_lists(batch, capsys):
    assert "argument --batch:" in usage_error(["bench", "--batch", batch], capsys)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e9", "fast"])
def test_bench_min_time_finite_and_positive(value, capsys):
    assert "argument --min-time:" in usage_error(["bench", "--min-time", value], capsys)


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--wait-idle", "nan"], ["--wait-idle", "-1"],
                                  ["--max-other-load", "101"], ["--max-other-load", "inf"],
                                  ["--dtype", "float8"], ["--mode", "bwd"], ["--providers", "triton"],
                                  ["--baselines", "copy,,floor"], ["--device", "tpu"]])
def test_bench_other_arguments(argv, capsys):
    assert f"argument {argv[0]}:" in usage_error(["bench"] + argv, capsys)


@pytest.mark.parametrize("threads", ["-2", "0", str((os.cpu_count() or 1) + 1), "1.5"])
def test_demo_threads(threads, capsys):
    assert "demo: argument --threads:" in usage_error(["demo", "--threads", threads], capsys)


@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**64), "-1", "1e3"])
def test_demo_seed_must_fit_torch_manual_seed(seed, capsys):
    line = usage_error(["demo", "--seed", seed], capsys)
    assert "demo: argument --seed:" in line and "18446744073709551615" in line


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--steps-per-epoch", "-3"], ["--batch", "0"],
                                  ["--batch", "100000"], ["--hidden", "0"], ["--files", "1"], ["--lr", "nan"],
                                  ["--lr", "0"], ["--lr", "inf"], ["--dtype", "float16"], ["--device", "mps"]])
def test_demo_other_arguments(argv, capsys):
    assert f"demo: argument {argv[0]}:" in usage_error(["demo"] + argv, capsys)


def test_demo_csv_and_plot_must_differ(capsys, tmp_path):
    line = usage_error(["demo", "--csv", str(tmp_path / "run.png"), "--plot", str(tmp_path / "run.png")], capsys)
    assert "--csv and --plot are the same file" in line


def test_demo_config_problems(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  mse_weight: -1\n")
    line = usage_error(["demo", "--config", str(bad)], capsys)
    assert "demo: --config" in line and "bad.yaml" in line and "mse" in line
    line = usage_error(["demo", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert "missing.yaml" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", [["demo"], ["bench", "--quick"], ["check"]])
def test_cuda_without_a_device_is_one_line(command, capsys):
    line = usage_error(command + ["--device", "cuda"], capsys)
    assert line.startswith(f"koemorph-fused: error: {command[0]}: --device cuda: no CUDA device is available")


def test_no_subcommand_and_unknown_ones(capsys):
    assert "COMMAND" in usage_error([], capsys)
    assert "argument COMMAND:" in usage_error(["train"], capsys)
    assert "--bogus" in usage_error(["info", "--bogus"], capsys)
    assert "--bogus" in usage_error(["check", "--quick", "--bogus"], capsys)
    # An option the subcommand does not know is named as that subcommand's error, with its --help.
    for command in ("demo", "bench", "info"):
        line = usage_error([command, "--bogus"], capsys)
        assert line == (f"koemorph-fused: error: {command}: unrecognized arguments: --bogus "
                        f"(see koemorph-fused {command} --help)"), line


def test_the_installed_entry_point_prints_one_line():
    """``python -m koemorph_fused`` as a user runs it: no traceback, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "koemorph_fused", "demo", "--seed", "99999999999999999999"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("koemorph-fused: error: demo: argument --seed")


# ---------------------------------------------------------------- what is accepted

def test_good_arguments_parse(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--batch", " 4, 8 ", "--threads", str(os.cpu_count() or 1),
                              "--min-time", "0.01", "--json", str(tmp_path / "b.json"),
                              "--plot", str(tmp_path / "b.svg")])
    assert args.batch == [4, 8] and args.min_time == 0.01
    assert not (tmp_path / "b.json").exists()  # checked, not left behind
    args = parser.parse_args(["demo", "--seed", str(2**64 - 1), "--threads", "1", "--lr", "1e-3",
                              "--plot", str(tmp_path / "d.png"), "--dtype", "bfloat16"])
    assert args.seed == 2**64 - 1 and args.lr == 1e-3 and args.dtype == "bfloat16"


@pytest.mark.parametrize("command", list(cli.SUBCOMMANDS))
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: koemorph-fused {command}")
    assert "--help" in out
    assert "%%" not in out  # argparse formats help strings, not descriptions: one % too many shows


@pytest.mark.parametrize("command", ["check", "demo", "bench"])
def test_long_commands_take_no_progress(command):
    """The commands that show a progress bar can all be asked not to."""
    args = cli.build_parser().parse_args([command, "--no-progress"])
    assert args.no_progress is True
    assert cli.build_parser().parse_args([command]).no_progress is False


def test_check_without_progress_prints_no_bar(monkeypatch, capsys):
    monkeypatch.setattr(check, "run_case", lambda case: (0.0, 0.0, True))
    assert cli.main(["check", "--quick", "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "fused vs reference" not in captured.err  # the bar's description
    assert "cases agree with the reference" in captured.out


# Run in a fresh process: a CPU-only machine with a CUDA toolkit (CUDA_HOME
# set, no GPU visible), as most CPU build machines are.
_CPU_ONLY_RUN = """
import sys
from koemorph_fused import cli
for argv in (["info"], ["check", "--quick", "--device", "cpu", "--no-progress"],
             ["demo", "--epochs", "2", "--steps-per-epoch", "2", "--batch", "2", "--hidden", "4",
              "--files", "2", "--no-progress"]):
    assert cli.main(argv) == 0, argv
print("cpp_extension imported:", "torch.utils.cpp_extension" in sys.modules)
"""


def _cpu_only_env(tmp_path) -> dict:
    return dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about machines without a GPU")
def test_cpu_only_commands_print_no_cuda_runtime_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CPU_ONLY_RUN], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=_cpu_only_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No CUDA runtime" not in proc.stderr and "CUDA_HOME" not in proc.stderr, proc.stderr
    assert "cpp_extension imported: False" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is None,
                    reason="torch warns only when built with CUDA and no GPU is visible")
def test_cpp_extension_is_imported_without_the_warning(tmp_path):
    """What bench (torch.compile) and a just-in-time build import; the plain
    import shows the warning the quiet one removes."""
    code = "import torch.utils.cpp_extension"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env=_cpu_only_env(tmp_path))
    assert "No CUDA runtime is found" in plain.stderr  # what the test guards against is real
    code = "from koemorph_fused._loader import import_cpp_extension; print(import_cpp_extension().CUDA_HOME)"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env=_cpu_only_env(tmp_path))
    assert quiet.returncode == 0, quiet.stderr
    assert "No CUDA runtime" not in quiet.stderr and quiet.stdout.strip() == str(tmp_path)


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in cli.SUBCOMMANDS:
        assert command in out
