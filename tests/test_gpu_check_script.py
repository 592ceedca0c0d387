"""bench/gpu_check.sh, without a GPU: it parses, its dry run lists every step
within the time budget and writes the one-file summary, and it downloads nothing."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_plans_every_step_and_writes_the_summary(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, TORCH_CUDA_ARCH_LIST="9.0")
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "gpu_summary.txt").read_text()
    assert summary in run.stdout
    plan = [line for line in summary.splitlines() if line.startswith("PLAN")]
    names = ["environment", "build (sm_90 only)", "ptxas report sm_90", "CUDA tests",
             "koemorph-fused check --device cuda", "GPU benchmark", "CUDA-graph replay"]
    assert len(plan) == len(names) and all(name in line for name, line in zip(names, plan)), plan
    assert "tests/test_cuda.py" in plan[3] and "--device cuda" in plan[4] and "graph_replay.py" in plan[6]
    budget = int(re.search(r"budget (\d+)s", summary).group(1))
    assert budget < 8 * 60
    assert len(summary.splitlines()) <= 40  # one screen
    assert not list(tmp_path.glob("*.log"))  # nothing ran


def test_bad_argument_is_refused(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), "--fast"], env=dict(os.environ, OUT=str(tmp_path)),
                         capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr


def test_nothing_is_downloaded():
    text = SCRIPT.read_text()
    assert not re.search(r"pip3? install|curl |wget ", text)
