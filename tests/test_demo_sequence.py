"""``koemorph-fused demo --sequence``: windows, model, the per-step check of the
fused sequence loss against the reference, planted bugs, the command line and
the matrix script (tiny sizes)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import koemorph_fused as kf
from koemorph_fused import cli
from koemorph_fused.demo import sequence as sequence_module
from koemorph_fused.demo.data import make_corpus
from koemorph_fused.demo.sequence import SequenceBlendshapeModel, SequenceWindows, sequence_run
from koemorph_fused.demo.train import GROUPS, DemoConfig
from koemorph_fused.demo.verify import SEQUENCE_QUANTITIES, StepChecker, StepResult, Tolerance, velocity_floors
from koemorph_fused.sequence import frame_sets

ROOT = Path(__file__).resolve().parents[1]
TINY = DemoConfig(epochs=3, steps_per_epoch=5, batch=4, hidden=16, lr=1e-2, seed=3)
WINDOW = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(3, min_frames=30, max_frames=70, seed=3)


@pytest.fixture(scope="module")
def run64(corpus):
    return sequence_run(dataclasses.replace(TINY, dtype="float64"), corpus, window=WINDOW)


# ---------------------------------------------------------------- windows and model

def test_windows_follow_each_file_and_pad_its_end(corpus):
    streams = SequenceWindows(corpus, batch=3, window=WINDOW, seed=0)
    expected = [(f, p) for f, p in zip(streams.file, streams.pos)]
    first = True
    for _ in range(20):
        w = streams.next()
        assert w.features.shape == (3, WINDOW, 32) and w.target.shape == (3, WINDOW, 52)
        for b, (f, p) in enumerate(expected):
            n = int(w.lengths[b])
            assert n == min(WINDOW, corpus[f].num_frames - p) >= 1
            assert torch.equal(w.target[b, :n], corpus[f].blendshapes[p:p + n])
            assert torch.equal(w.features[b, :n], corpus[f].features[p:p + n])
            assert (w.target[b, n:] == 0).all()
            # a window continues its stream's previous one unless it is the first or starts a file
            assert bool(w.continues[b]) == (not first and p > 0)
            expected[b] = (f, p + n) if p + n < corpus[f].num_frames else ((f + 1) % len(corpus), 0)
        first = False
    assert not torch.equal(torch.tensor(streams.pos), torch.zeros(3, dtype=torch.int64))


def test_model_is_causal_and_resets_at_a_new_file():
    torch.manual_seed(0)
    model = SequenceBlendshapeModel(hidden=8)
    x = torch.randn(2, 10, 32)
    state, last_raw = torch.randn(1, 2, 8), torch.rand(2, 52)
    continues = torch.tensor([True, False])
    pred, raw, new_state = model(x, state, last_raw, continues)
    assert pred.shape == raw.shape == (2, 10, 52) and new_state.shape == (1, 2, 8)
    y = x.clone()
    y[:, 6:] = 100.0  # later (e.g. padded) frames change no earlier frame
    pred2, raw2, _ = model(y, state, last_raw, continues)
    torch.testing.assert_close(pred2[:, :6], pred[:, :6])
    # a new file: the carried state and last raw frame are ignored
    pred3, _, _ = model(x, torch.randn(1, 2, 8), torch.rand(2, 52), continues)
    torch.testing.assert_close(pred3[1], pred[1])
    assert not torch.allclose(pred3[0], pred[0])
    alpha = model.alpha
    torch.testing.assert_close(pred[1, 0], raw[1, 0])  # frame 0 of a new file blends with itself
    torch.testing.assert_close(pred[0, 0], (1 - alpha) * raw[0, 0] + alpha * last_raw[0])


# ---------------------------------------------------------------- the check

def test_sequence_tolerance():
    u32 = 2.0**-24
    tol = Tolerance.for_sequence(torch.float32, 4 * 16, 52)
    assert tol.value_rtol == pytest.approx(2 * (64 * 52 + 12) * u32)
    assert tol.gradient_rtol == pytest.approx(2 * 6 * 14 * u32)
    assert "2 (N + 12)" in tol.describe() and "6*14" in tol.describe()
    assert Tolerance(torch.float32, 4, 52).gradient_rtol == pytest.approx(2 * 4 * 12 * u32)  # the row loss's


def _sequence_step(dtype, seed=0, velocity_weight=0.5):
    g = torch.Generator().manual_seed(seed)
    B, T, C = 3, 8, 52
    pred, target, raw = (torch.rand(B, T, C, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    prev, prev_target = (torch.rand(B, C, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    data = dict(prev=prev, prev_target=prev_target, lengths=torch.tensor([8, 5, 0]),
                continuity=torch.tensor([1, 0, 1]), velocity_weight=velocity_weight)
    results = []
    for fn in (kf.sequence_loss, kf.reference.sequence_loss):
        p, r = pred.clone().requires_grad_(), raw.clone().requires_grad_()
        out = fn(p, target, r, **data)
        gp, gr = torch.autograd.grad(out.total, (p, r))
        results.append(StepResult(out.terms, out.total.detach(), gp, gr, out.counts))
    _, _, pairs = frame_sets(B, T, lengths=data["lengths"], continuity=data["continuity"], with_prev=True,
                             with_prev_target=True)
    tol = Tolerance.for_sequence(dtype, B * T, C)
    floor, scale = velocity_floors(pred, target, prev, prev_target, pairs, velocity_weight, results[1].counts[5], tol)
    return pred, results, tol, floor, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_checker_passes_the_fused_sequence_loss_and_catches_a_bump(dtype):
    pred, (fused, ref), tol, floor, scale = _sequence_step(dtype)
    value_floor = torch.cat([torch.zeros(5, dtype=floor.dtype), floor.reshape(1), 0.5 * floor.reshape(1)])
    checker = StepChecker(SEQUENCE_QUANTITIES)
    kw = dict(tolerance=tol, value_floor=value_floor, gradient_scale=scale)
    checker.compare(fused, ref, pred, **kw)
    (row,) = checker.flush()
    assert max(row) <= 1.0, dict(zip(SEQUENCE_QUANTITIES, row))
    assert 0 < float(floor) < 1e-3 * float(ref.terms[5])  # the velocity floor is small next to the term
    # each term and the total moved by twice its tolerance fails; the counts must be equal
    values = torch.cat([ref.terms, ref.total.reshape(1)]).to(torch.float64)
    for i, name in enumerate(SEQUENCE_QUANTITIES[:7]):
        bumped = values.clone()
        bumped[i] += 2 * (tol.value_rtol * abs(float(values[i])) + float(value_floor[i]))
        acc = tol.accumulation
        checker.compare(StepResult(bumped[:6].to(acc), bumped[6].to(acc), ref.grad_pred, ref.grad_raw, ref.counts),
                        ref, pred, **kw)
        assert checker.flush()[0][i] > 1.0, name
    wrong_counts = ref.counts.clone()
    wrong_counts[3] += 1
    checker.compare(StepResult(ref.terms, ref.total, ref.grad_pred, ref.grad_raw, wrong_counts), ref, pred, **kw)
    assert checker.flush()[0][SEQUENCE_QUANTITIES.index("counts")] == float("inf")


# ---------------------------------------------------------------- training

def test_sequence_run_checks_every_step(run64):
    v = run64.verdict
    assert v.ok, v
    assert v.steps == len(run64.rows) == TINY.epochs * TINY.steps_per_epoch
    assert set(v.worst) == set(SEQUENCE_QUANTITIES) and all(0.0 <= r <= 1.0 for r in v.worst.values())
    assert v.tolerance.rows == TINY.batch * WINDOW and v.tolerance.dtype == torch.float64
    rows = run64.rows
    # the first windows continue nothing: every frame but frame 0 has a previous frame
    assert rows[0]["file_transition"] and rows[0]["pairs"] == rows[0]["frames"] - TINY.batch
    assert any(r["frames"] < TINY.batch * WINDOW for r in rows)  # some windows are padded
    assert all(r["velocity"] > 0 for r in rows)
    schedule = TINY.schedule()
    for r in rows:  # the recorded total is the phase's weights on the terms, plus the velocity weight
        w = schedule.at(r["epoch"]).weights
        expected = sum(x * r[n] for x, n in zip(w.as_tuple(), kf.TERM_NAMES)) + sequence_module.VELOCITY_WEIGHT * r["velocity"]
        assert r["total"] == pytest.approx(expected, rel=1e-9)
    k = TINY.steps_per_epoch
    assert sum(r["mse"] for r in rows[-k:]) < 0.7 * sum(r["mse"] for r in rows[:k])


class DoubledVelocity(kf.FusedKoeMorphSequenceLoss):
    """A planted bug: the fused loss uses twice the velocity weight."""

    def _weight_vector(self):
        w = super()._weight_vector()
        w[5] *= 2
        return w


class IgnoresLengths(kf.FusedKoeMorphSequenceLoss):
    """A planted bug: padded frames are counted (lengths dropped)."""

    def forward(self, pred, target, raw=None, *, lengths=None, **kwargs):
        return super().forward(pred, target, raw, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_planted_bugs_fail(corpus, dtype):
    cfg = dataclasses.replace(TINY, epochs=1, steps_per_epoch=6, dtype=dtype)
    v = sequence_run(cfg, corpus, window=WINDOW, loss_fn=DoubledVelocity(**GROUPS._asdict())).verdict
    assert not v.ok
    assert v.worst["total"] > 1.0 and v.worst["grad_pred"] > 1.0
    assert all(v.worst[n] <= 1.0 for n in kf.SEQUENCE_TERM_NAMES + ("grad_raw", "counts"))
    v = sequence_run(cfg, corpus, window=WINDOW, loss_fn=IgnoresLengths(**GROUPS._asdict())).verdict
    assert not v.ok and v.worst["counts"] > 1.0 and v.worst["mse"] > 1.0


def test_sequence_run_rejects_other_groups(corpus):
    with pytest.raises(ValueError, match=r"loss_fn\.mouth_indices"):
        sequence_run(TINY, corpus, window=WINDOW, loss_fn=kf.FusedKoeMorphSequenceLoss())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("seed", [0, 1])
def test_verdict_passes_over_a_matrix_slice(dtype, seed, threads):
    if threads > (os.cpu_count() or 1):
        pytest.skip(f"needs {threads} CPUs")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = DemoConfig(epochs=2, steps_per_epoch=4, batch=3, hidden=8, dtype=dtype, seed=seed)
        result = sequence_run(cfg, make_corpus(2, min_frames=30, max_frames=60, seed=seed), window=WINDOW)
    finally:
        torch.set_num_threads(before)
    assert result.verdict.ok, result.verdict


# ---------------------------------------------------------------- command line

TINY_ARGS = ["demo", "--sequence", "--epochs", "2", "--steps-per-epoch", "3", "--batch", "3", "--hidden", "8",
             "--files", "2", "--window", "24", "--no-progress"]


def test_cli_demo_sequence_passes(capsys):
    rc = cli.main(TINY_ARGS + ["--velocity-weight", "0.3", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.splitlines()[-1].startswith("PASS") and "six terms, total, d/d pred, d/d raw, counts" in out
    assert "demo --sequence" in out and "24-frame windows" in out and "velocity_weight 0.3" in out
    for name in SEQUENCE_QUANTITIES:
        assert f"\n  {name} " in out
    assert "  velocity " in out.split("per-epoch means")[1]
    # No monitor flags these rows: no flags column that could only ever say "-".
    assert "flags" not in out.split("per-epoch means")[1].splitlines()[1]


def test_cli_demo_sequence_takes_velocity_weight_from_the_config(capsys, tmp_path):
    """--config gives the velocity weight too (0 where it has none);
    --velocity-weight overrides it."""
    config = tmp_path / "loss.yaml"
    config.write_text("loss: {temporal_weight: 0.4, velocity_weight: 0.25}\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("loss: {temporal_weight: 0.4}\n")
    for extra, shown in ((["--config", str(config)], "velocity_weight 0.25"),
                         (["--config", str(plain)], "velocity_weight 0\n"),
                         (["--config", str(config), "--velocity-weight", "0.7"], "velocity_weight 0.7")):
        assert cli.main(TINY_ARGS + ["--epochs", "1", "--steps-per-epoch", "1"] + extra) == 0
        assert shown in capsys.readouterr().out, extra


def test_cli_demo_sequence_fails_on_a_planted_bug(monkeypatch, capsys):
    monkeypatch.setattr(sequence_module, "FusedKoeMorphSequenceLoss", DoubledVelocity)
    assert cli.main(TINY_ARGS) == 1
    fail = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and "total, grad_pred beyond the float32 tolerance" in fail[0]


@pytest.mark.parametrize("argv, message", [
    (["demo", "--window", "8"], "--window needs --sequence"),
    (["demo", "--velocity-weight", "0.1"], "--velocity-weight needs --sequence"),
    (["demo", "--sequence", "--reference-run"], "--reference-run is for the row demo"),
    (["demo", "--sequence", "--window", "0"], "expected an integer in 1..4096"),
    (["demo", "--sequence", "--velocity-weight", "-1"], "expected a finite number >= 0"),
])
def test_cli_demo_sequence_misuse(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_demo_matrix_sequence_with_the_baseline_instruction_set(tmp_path):
    out = tmp_path / "matrix.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "demo_matrix.py"), "--sequence", "--seeds", "2", "--isa", "default",
         "--threads", "1", "--dtype", "float32", "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo --sequence" in proc.stdout and "1/1 runs PASS" in proc.stdout
    (run,) = json.loads(out.read_text())
    assert run["sequence"] and run["ok"] and run["torch_isa"] == "DEFAULT" and run["kernel"] == "DEFAULT"
    assert "velocity" in run["worst"] and "counts" in run["worst"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_sequence_demo_on_cuda(corpus, dtype):
    result = sequence_run(dataclasses.replace(TINY, device="cuda", dtype=dtype), corpus, window=WINDOW)
    assert result.verdict.ok, result.verdict
