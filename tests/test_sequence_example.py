"""docs/examples/sequence_training.py: the sequence example runs, learns, checks
the fused loss against the reference, and fails when the fused loss is wrong."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import koemorph_fused as kf

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "sequence_training.py"
SMALL = ["--steps", "40", "--batch", "4", "--window", "16", "--files", "5", "--min-frames", "20",
         "--max-frames", "60", "--hidden", "16", "--check-every", "5", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sequence_training", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _steps(out: str) -> list[tuple[int, float]]:
    return [(int(line.split()[1]), float(line.split()[3])) for line in out.splitlines() if line.startswith("step ")]


def test_example_trains_and_passes_every_check(example, capsys):
    assert example.main(SMALL) == 0
    out = capsys.readouterr().out
    steps = _steps(out)
    assert [s for s, _ in steps] == list(range(0, 40, 5))
    assert steps[-1][1] < 0.7 * steps[0][1]  # it learns
    assert "worst" in out and "over 8 checks" in out and "FAIL" not in out


def test_streams_pad_the_end_of_a_file_and_continue_it(example):
    files = example.make_files(3, 20, 30, seed=1)
    streams = example.Streams(files, batch=2, window=8)
    windows = {0: [], 1: []}  # per stream: (file, starts_file, length)
    for _ in range(14):
        before = list(streams.file)
        w = streams.next()
        assert w.features.shape == (2, 8, 80) and w.target.shape == (2, 8, 52)
        for b in range(2):
            n = int(w.lengths[b])
            assert 1 <= n <= 8 and (w.target[b, n:] == 0).all() and (w.features[b, n:] == 0).all()
            windows[b].append((before[b], bool(w.starts_file[b]), n))
    for b in range(2):
        starts = [i for i, (_, first, _) in enumerate(windows[b]) if first]
        assert starts[0] == 0 and len(starts) >= 3
        for i, j in zip(starts, starts[1:]):  # one file's windows: full ones, then one short one
            file, lengths = windows[b][i][0], [n for _, _, n in windows[b][i:j]]
            assert {f for f, _, _ in windows[b][i:j]} == {file}
            assert all(n == 8 for n in lengths[:-1]) and sum(lengths) == files[file][0].shape[0]


def test_the_check_catches_a_wrong_fused_loss(example, monkeypatch, capsys):
    """A planted bug: the trained loss doubles the velocity weight; the
    reference, built with the right one, disagrees on the total and the gradients."""

    class DoubledVelocity(kf.FusedKoeMorphSequenceLoss):
        def _weight_vector(self):
            w = super()._weight_vector()
            w[5] *= 2
            return w

    monkeypatch.setattr(kf, "FusedKoeMorphSequenceLoss", DoubledVelocity)
    assert example.main(SMALL + ["--steps", "6"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED" in out.splitlines()[-1]


def test_a_nan_check_is_no_pass(example, monkeypatch, capsys):
    """Diverged values (NaN) compare as NaN: a FAIL, not "0 of the tolerance"."""
    monkeypatch.setattr(example, "check_against_reference", lambda *args, **kwargs: float("nan"))
    assert example.main(SMALL + ["--steps", "2", "--check-every", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "worst nan" in out.splitlines()[-1] and "2 FAILED" in out.splitlines()[-1]


@pytest.mark.parametrize("bad", [["--threads", "100000"], ["--lr", "inf"], ["--velocity-weight", "nan"]])
def test_bad_options_are_usage_errors(example, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        example.main(SMALL + bad)
    assert exc.value.code == 2 and bad[0] in capsys.readouterr().err


def test_help_runs_as_a_script():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--steps", "--window", "--velocity-weight", "--check-every", "lengths", "continuity"):
        assert flag in proc.stdout
