"""The demo: synthetic data, model, training loop and the `demo` subcommand (tiny sizes)."""

import dataclasses
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import koemorph_fused as kf
from koemorph_fused import cli
from koemorph_fused.run_log import read_csv
from koemorph_fused.demo.data import COLUMNS, LAYOUT, SIGNAL_COLUMNS, WINDOW, SyntheticFile, WindowStreams, make_corpus
from koemorph_fused.demo.model import TemporalBlendshapeModel, TemporalSmoothing
from koemorph_fused.demo.train import EXPECTED_TOTAL, GROUPS, DemoConfig, demo_run, train
from koemorph_fused.demo.verify import QUANTITIES, StepChecker, StepResult, Tolerance

# koemorph_fused.demo.train is also the name of a function the package exports.
train_module = importlib.import_module("koemorph_fused.demo.train")
ROOT = Path(__file__).resolve().parents[1]

TINY = DemoConfig(epochs=4, steps_per_epoch=6, batch=4, hidden=16, lr=1e-2, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread, as the demo command uses by default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(3, min_frames=120, max_frames=300, seed=3)


@pytest.fixture(scope="module")
def run64(corpus):
    return demo_run(dataclasses.replace(TINY, dtype="float64"), corpus)


# ---------------------------------------------------------------- data

def test_corpus_is_reproducible_by_seed(corpus):
    again = make_corpus(3, min_frames=120, max_frames=300, seed=3)
    other = make_corpus(3, min_frames=120, max_frames=300, seed=4)
    more = make_corpus(4, min_frames=120, max_frames=300, seed=3)
    for a, b, c in zip(corpus, again, more):
        assert torch.equal(a.features, b.features) and torch.equal(a.blendshapes, b.blendshapes)
        assert torch.equal(a.blendshapes, c.blendshapes)  # adding a file keeps the others
    assert not all(a.num_frames == o.num_frames and torch.equal(a.blendshapes[:100], o.blendshapes[:100])
                   for a, o in zip(corpus, other))


def _cols(*patterns):
    return list(kf.blendshapes.indices(*patterns, layout="arkit"))


def test_corpus_is_speech_like_in_arkit_columns():
    files = make_corpus(4, seed=0)
    assert len({f.num_frames for f in files}) == 4            # different lengths
    assert LAYOUT == "arkit"
    jaw = _cols("jawOpen")[0]
    for f in files:
        assert 300 <= f.num_frames <= 900
        assert f.blendshapes.shape == (f.num_frames, 52) and f.features.shape == (f.num_frames, 32)
        assert f.blendshapes.dtype == torch.float32
        assert float(f.blendshapes.min()) >= 0.0 and float(f.blendshapes.max()) <= 1.0
        b = f.blendshapes
        speed = (b[1:] - b[:-1]).abs().mean(0)
        # jaw / mouth move with the syllables, brows and gaze slowly
        mouth = _cols("jawOpen", "mouthFunnel", "mouthPucker", "mouthClose", "mouthLowerDown*", "mouthUpperUp*",
                      "mouthStretch*")
        assert speed[mouth].mean() > 5 * speed[_cols("brow*", "eyeLookUp*", "eyeLookOutLeft", "eyeLookInRight")].mean()
        # the features carry the jaw: frame energy correlates with jawOpen
        corr = torch.corrcoef(torch.stack([b[:, jaw], f.features.mean(1)]))[0, 1]
        assert corr > 0.6
        # pauses: the jaw rests near closed for some frames, opens wide for others
        assert float(b[:, jaw].min()) < 0.05 and float(b[:, jaw].max()) > 0.4
        # both eyes blink together, both eyes look the same way
        left, right = _cols("eyeBlinkLeft", "eyeBlinkRight")
        assert torch.equal(b[:, left], b[:, right]) and float(b[:, left].max()) > 0.5
        assert torch.equal(b[:, _cols("eyeLookOutLeft")[0]], b[:, _cols("eyeLookInRight")[0]])
        # brows rise while speaking: browInnerUp follows the jaw's activity, browDown the other way
        activity = torch.nn.functional.avg_pool1d(b[:, jaw].reshape(1, 1, -1), 31, stride=1, padding=15,
                                                  count_include_pad=False).flatten()
        inner, down = b[:, _cols("browInnerUp")[0]], b[:, _cols("browDownLeft")[0]]
        assert torch.corrcoef(torch.stack([inner, activity]))[0, 1] > 0.5
        assert torch.corrcoef(torch.stack([down, activity]))[0, 1] < -0.5


def test_signal_columns_are_arkit_names_in_one_table():
    arkit = kf.blendshapes.layout("arkit")
    placed = [name for names in SIGNAL_COLUMNS.values() for name in names]
    assert len(placed) == len(set(placed)) == 21 and set(placed) <= set(arkit)
    for signal, names in SIGNAL_COLUMNS.items():
        assert COLUMNS[signal] == tuple(arkit.index(name) for name in names)
    # every synthetic signal lies in the demo's named groups: mouth signals in jaw* + mouth*, the rest in
    # brow* + eye* + cheek* + nose*
    assert set(COLUMNS["mouth"]) <= set(GROUPS.mouth_indices)
    assert {c for k, cols in COLUMNS.items() if k != "mouth" for c in cols} <= set(GROUPS.expression_indices)


def test_corpus_arguments():
    with pytest.raises(TypeError):
        make_corpus(2, n_blendshapes=52)  # always the 52 ARKit blend shapes
    with pytest.raises(ValueError, match="min_frames"):
        make_corpus(2, min_frames=10, max_frames=5)
    with pytest.raises(TypeError, match="num_files"):
        make_corpus(2.0)


def test_window_streams(corpus):
    streams = WindowStreams(corpus, batch=4, seed=0)
    lengths = [f.num_frames for f in corpus]
    prev_file = None
    for step in range(40):
        files, frames = list(streams.file), list(streams.pos)
        batch = streams.next(8)
        assert batch.features.shape == (4, WINDOW, 32) and batch.target_seq.shape == (4, WINDOW, 52)
        assert batch.file_index.tolist() == files and batch.frame.tolist() == frames
        for b, (f, t) in enumerate(zip(files, frames)):
            # the window ends at the stream's frame; earlier frames are that file's history
            assert torch.equal(batch.target_seq[b, -1], corpus[f].blendshapes[t])
            lo = max(0, t - WINDOW + 1)
            assert torch.equal(batch.features[b, WINDOW - (t - lo + 1):], corpus[f].features[lo:t + 1])
        target = batch.target_seq[:, -1, :]
        assert not target.is_contiguous()  # the strided view the loss accepts
        cont = kf.continuity_mask(batch.file_index, prev_file)
        if prev_file is not None:
            moved = batch.file_index != prev_file
            assert torch.equal(cont, ~moved)
            assert all(batch.frame[moved] == 0)
            for b in range(4):
                if not moved[b]:
                    assert int(batch.frame[b]) == prev_frames[b] + 8
        prev_file, prev_frames = batch.file_index, batch.frame.tolist()
        assert all(0 <= t < lengths[f] for f, t in zip(streams.file, streams.pos))
    with pytest.raises(ValueError, match="2 files"):
        WindowStreams(corpus[:1], batch=2)
    with pytest.raises(ValueError, match="stride"):
        streams.next(0)


# ---------------------------------------------------------------- model

def test_temporal_smoothing_blends_and_resets():
    layer = TemporalSmoothing(3, alpha_init=0.25)
    torch.testing.assert_close(layer.alpha, torch.full((3,), 0.25))
    raw = torch.rand(2, 3, requires_grad=True)
    prev = torch.rand(2, 3, requires_grad=True)
    assert layer(raw, None, None) is raw
    out = layer(raw, prev, torch.tensor([True, False]))
    torch.testing.assert_close(out[0], 0.75 * raw[0] + 0.25 * prev[0])
    torch.testing.assert_close(out[1], raw[1])  # a new file resets the smoothing
    out.sum().backward()
    assert prev.grad is None and layer.logit.grad is not None  # prev is carried state, not trained through
    assert layer.logit.grad[0] != 0


def test_model_shapes_and_range():
    model = TemporalBlendshapeModel(hidden=8)
    with torch.no_grad():
        out = model(torch.randn(3, WINDOW, 32))
    assert out["raw"].shape == out["blendshapes"].shape == (3, 52)
    assert float(out["raw"].min()) > 0 and float(out["raw"].max()) < 1
    assert out["blendshapes"] is out["raw"]  # no previous frame: nothing to smooth


# ---------------------------------------------------------------- the per-step check

def test_tolerances_follow_from_the_dtype():
    u32, u64, u_bf16 = 2.0**-24, 2.0**-53, 2.0**-8
    f32 = Tolerance(torch.float32, 16, 52)
    assert f32.accumulation == torch.float32 and f32.u_out == 0.0
    assert f32.value_rtol == pytest.approx(2 * (16 * 52 + 10) * u32)
    assert f32.gradient_rtol == pytest.approx(2 * 48 * u32)
    bf16 = Tolerance(torch.bfloat16, 16, 52)
    assert bf16.accumulation == torch.float32 and bf16.u_out == u_bf16
    assert bf16.value_rtol == f32.value_rtol  # the terms and total are float32 for bfloat16 inputs
    assert bf16.gradient_rtol == pytest.approx(2 * (48 * u32 + u_bf16))  # gradients are rounded to bfloat16
    f64 = Tolerance(torch.float64, 16, 52)
    assert f64.value_rtol == pytest.approx(2 * (16 * 52 + 10) * u64) and f64.gradient_rtol == pytest.approx(96 * u64)
    # more summed elements, a wider tolerance of the sums; the gradients' does not depend on N
    assert Tolerance(torch.float32, 1024, 52).value_rtol > f32.value_rtol
    assert Tolerance(torch.float32, 1024, 52).gradient_rtol == f32.gradient_rtol


def _step(dtype=torch.float32, rows=4, cols=52, seed=0):
    """A fused and a reference StepResult computed on the same random inputs."""
    g = torch.Generator().manual_seed(seed)
    pred, target, prev, raw = (torch.rand(rows, cols, generator=g, dtype=torch.float64).to(dtype) for _ in range(4))
    results = []
    for fn in (kf.temporal_loss, kf.reference.temporal_loss):
        p, r = pred.clone().requires_grad_(), raw.clone().requires_grad_()
        out = fn(p, target, prev, r)
        gp, gr = torch.autograd.grad(out.total, (p, r))
        results.append(StepResult(out.terms, out.total.detach(), gp, gr))
    return pred, results[0], results[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_checker_passes_the_fused_loss_and_catches_just_beyond_tolerance(dtype):
    pred, fused, ref = _step(dtype)
    checker = StepChecker()
    checker.compare(fused, ref, pred)
    tol = Tolerance(dtype, 4, 52)
    # The same inputs: within tolerance (a derived bound, so far within).
    (ok_row,) = checker.flush()
    assert max(ok_row) <= 1.0
    acc = tol.accumulation
    # Each term and the total, moved by 1.5x its tolerance: that quantity alone fails.
    for i, name in enumerate(QUANTITIES[:6]):
        values = torch.cat([ref.terms, ref.total.reshape(1)]).to(torch.float64)
        bumped = values.clone()
        bumped[i] += 1.5 * tol.value_rtol * abs(float(values[i]))
        bad = StepResult(bumped[:5].to(acc), bumped[5].to(acc), ref.grad_pred, ref.grad_raw)
        checker.compare(bad, ref, pred)
        row = checker.flush()[0]
        assert row[i] > 1.0, name
        # 1.5 * tolerance, up to rounding to the accumulation dtype
        assert row[i] == pytest.approx(1.5, rel=0.01), name
    # A gradient element moved by 2x the tolerance (relative to max|g|) fails; by 0.5x it does not.
    for factor, fails in ((2.0, True), (0.5, False)):
        g = ref.grad_pred.to(torch.float64)
        moved = g.clone()
        moved[1, 3] += factor * tol.gradient_rtol * float(g.abs().max())
        checker.compare(StepResult(ref.terms, ref.total, moved.to(dtype), ref.grad_raw), ref, pred)
        row = checker.flush()[0]
        if dtype != torch.bfloat16:  # in bfloat16 the move is rounded to a bfloat16 step
            assert (row[QUANTITIES.index("grad_pred")] > 1.0) == fails
    # NaN where the reference has a number fails; NaN in both is agreement.
    nan_terms = ref.terms.clone()
    nan_terms[2] = float("nan")
    checker.compare(StepResult(nan_terms, ref.total, ref.grad_pred, ref.grad_raw), ref, pred)
    assert not checker.flush()[0][2] <= 1.0
    checker.compare(StepResult(nan_terms, ref.total, ref.grad_pred, ref.grad_raw),
                    StepResult(nan_terms, ref.total, ref.grad_pred, ref.grad_raw), pred)
    assert checker.flush()[0][2] == 0.0
    assert not checker.dtype_errors


def test_checker_reports_a_wrong_dtype():
    pred, fused, ref = _step(torch.bfloat16)
    checker = StepChecker()
    checker.compare(StepResult(fused.terms, fused.total.to(torch.bfloat16), fused.grad_pred.float(), fused.grad_raw),
                    ref, pred)
    assert len(checker.dtype_errors) == 1
    assert "fused total is bfloat16" in checker.dtype_errors[0] and "fused gradient is float32" in checker.dtype_errors[0]


# ---------------------------------------------------------------- training

def test_demo_run_checks_every_step_float64(run64):
    v = run64.verdict
    assert v.ok, v
    assert v.steps == len(run64.rows) == len(run64.ratios) == TINY.epochs * TINY.steps_per_epoch
    assert set(v.worst) == set(QUANTITIES) and all(0.0 <= r <= 1.0 for r in v.worst.values())
    assert v.tolerance.dtype == torch.float64 and v.tolerance.rows == TINY.batch
    assert len(run64.loss_seconds) == len(run64.reference_seconds) == v.steps
    assert all(t > 0 for t in run64.loss_seconds + run64.reference_seconds)


def test_training_loss_decreases(run64):
    mse = run64.column("mse")
    k = TINY.steps_per_epoch
    assert float(mse[-k:].mean()) < 0.5 * float(mse[:k].mean())


def test_schedule_drives_stride_and_weights(run64):
    """Each step ran with its epoch's stride and weights: the recorded total is
    the phase weights' sum of the recorded terms."""
    schedule = TINY.schedule()
    assert {row["stride"] for row in run64.rows} == {p.stride for p in schedule}
    weights_seen = set()
    for row in run64.rows:
        phase = schedule.at(row["epoch"])
        assert row["phase"] == phase.name and row["stride"] == phase.stride
        expected = sum(w * row[name] for w, name in zip(phase.weights.as_tuple(), kf.TERM_NAMES))
        assert row["total"] == pytest.approx(expected, rel=1e-9)
        weights_seen.add(phase.weights)
    assert len(weights_seen) == 3  # sparse, a mid blend, dense (4 epochs: early, mid, mid, late)
    # the first step has no previous frame, later ones do
    assert run64.rows[0]["temporal"] == 0.0 and run64.rows[0]["file_transition"] is True
    assert any(row["temporal"] > 0 for row in run64.rows[1:])


def test_demo_losses_use_the_named_groups(monkeypatch, corpus):
    """demo_run builds the fused loss and the reference with the demo's named
    groups (jaw* + mouth*, brow* + eye* + cheek* + nose* in the ARKit order),
    not the seed's positional default."""
    assert GROUPS == kf.blendshapes.preset("semantic", layout="arkit")
    assert GROUPS.mouth_indices == tuple(_cols("jaw*", "mouth*"))
    assert GROUPS.expression_indices == tuple(_cols("brow*", "eye*", "cheek*", "nose*"))
    built = []

    def recording(cls):
        class Recording(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                built.append(self)
        return Recording

    monkeypatch.setattr(train_module, "FusedKoeMorphLoss", recording(kf.FusedKoeMorphLoss))
    monkeypatch.setattr(train_module, "KoeMorphTemporalLoss", recording(kf.reference.KoeMorphTemporalLoss))
    result = demo_run(dataclasses.replace(TINY, epochs=1, steps_per_epoch=2), corpus)
    assert result.verdict.ok
    fused, reference = built
    assert isinstance(fused, kf.FusedKoeMorphLoss) and isinstance(reference, kf.reference.KoeMorphTemporalLoss)
    for module in built:
        assert module.mouth_indices == GROUPS.mouth_indices
        assert module.expression_indices == GROUPS.expression_indices


def test_demo_run_rejects_a_loss_with_other_groups(corpus):
    with pytest.raises(ValueError, match=r"loss_fn\.mouth_indices is \(12, .*GROUPS"):
        demo_run(TINY, corpus, loss_fn=kf.FusedKoeMorphLoss())  # the positional default 12..21, 0..9


class StaleTemporalWeight(kf.FusedKoeMorphLoss):
    """A planted bug: the fused loss keeps its constructor's temporal weight
    (0.2) when the schedule assigns new weights; the reference gets the right ones.
    Built with the demo's groups (``**GROUPS._asdict()``), like the loss it stands in for."""

    @kf.FusedKoeMorphLoss.weights.setter
    def weights(self, value):
        stale = getattr(self, "_weights", None)  # None while __init__ sets the first weights
        if stale is not None:
            value = dataclasses.replace(value, temporal=stale.temporal)
        kf.FusedKoeMorphLoss.weights.fset(self, value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_a_wrong_temporal_weight_in_the_fused_call_fails(corpus, dtype):
    result = demo_run(dataclasses.replace(TINY, dtype=dtype), corpus, loss_fn=StaleTemporalWeight(**GROUPS._asdict()))
    v = result.verdict
    assert not v.ok
    # The weight only enters the total and the gradient w.r.t. pred; the
    # unweighted terms and d/d raw still agree.
    assert v.worst["total"] > 1.0 and v.worst["grad_pred"] > 1.0
    assert all(v.worst[name] <= 1.0 for name in kf.TERM_NAMES + ("grad_raw",))
    # The first step has no previous frame (temporal term 0): the wrong weight shows from the first step that has one.
    first_temporal = next(i for i, row in enumerate(result.rows) if row["temporal"] > 0)
    assert v.first_bad_step == first_temporal


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("seed", [0, 1])
def test_verdict_passes_over_a_matrix_slice(dtype, seed, threads):
    """Seeds x dtypes x thread counts (bench/demo_matrix.py runs the full matrix).
    The check is per step, so a few steps of a small model show it as well as many."""
    if threads > (os.cpu_count() or 1):
        pytest.skip(f"needs {threads} CPUs")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = DemoConfig(epochs=3, steps_per_epoch=4, batch=4, hidden=8, dtype=dtype, seed=seed)
        result = demo_run(cfg, make_corpus(2, min_frames=120, max_frames=300, seed=seed))
    finally:
        torch.set_num_threads(before)
    assert result.verdict.ok, result.verdict
    assert result.rows[-1]["total"] < result.rows[0]["total"]


def test_demo_matrix_script_passes_with_the_baseline_instruction_set(tmp_path):
    """bench/demo_matrix.py runs the real demo in a subprocess with
    ATEN_CPU_CAPABILITY=default (torch's and the fused kernel's baseline code)."""
    out = tmp_path / "matrix.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "demo_matrix.py"), "--seeds", "4", "--isa", "default", "--threads", "1",
         "--dtype", "bfloat16", "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1/1 runs PASS" in proc.stdout
    (run,) = __import__("json").loads(out.read_text())
    assert run["isa"] == "default" and run["torch_isa"] == "DEFAULT" and run["kernel"] == "DEFAULT"
    assert run["ok"] and run["dtype"] == "bfloat16" and run["seed"] == 4 and run["threads"] == 1


def test_demo_matrix_help():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "demo_matrix.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--seeds" in proc.stdout and "ATEN_CPU_CAPABILITY" in proc.stdout


# ---------------------------------------------------------------- monitor flags

def test_a_healthy_default_run_is_not_flagged():
    """The demo's default sizes and its calibrated EXPECTED_TOTAL: most steps carry no flag."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = demo_run(DemoConfig(seed=5), make_corpus(6, seed=5))
    finally:
        torch.set_num_threads(before)
    assert result.verdict.ok
    flagged = [row for row in result.rows if row["flags"]]
    assert len(flagged) <= 0.1 * len(result.rows), flagged
    for row in result.rows:
        low, high = EXPECTED_TOTAL[row["phase"]]
        assert ("outside_expected" in row["flags"]) == (not low <= row["total"] <= high)
        assert "divergence" not in row["flags"]


def test_targets_in_percent_diverge_and_are_flagged(corpus):
    """A planted divergence: blendshape targets on a 0-100 scale instead of 0-1
    (a classic data bug). The sigmoid output cannot follow; every total is far
    above 1.0 and the monitor flags divergence (and outside_expected)."""
    percent = [SyntheticFile(f.index, f.features, 100.0 * f.blendshapes) for f in corpus]
    result = demo_run(TINY, percent)
    assert result.verdict.ok  # the loss itself is still right
    assert all("divergence" in row["flags"] and "outside_expected" in row["flags"] for row in result.rows)
    assert all(row["total"] > 1.0 for row in result.rows)


# ---------------------------------------------------------------- command line

TINY_ARGS = ["demo", "--epochs", "3", "--steps-per-epoch", "3", "--batch", "3", "--hidden", "8", "--files", "2",
             "--no-progress"]


def test_cli_demo_passes_with_config_plot_and_reference_run(tmp_path, capsys):
    config = tmp_path / "dual_stream_config.yaml"
    config.write_text(yaml.safe_dump({"model": {"hidden": 8}, "loss": {"temporal_weight": 0.4, "l1_weight": 0.0}}))
    png = tmp_path / "curves.png"
    rc = cli.main(TINY_ARGS + ["--config", str(config), "--plot", str(png), "--dtype", "bfloat16",
                               "--reference-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.splitlines()[-1].startswith("PASS") and "FAIL" not in out
    assert "loss forward+backward per step" in out and "worst error/tol" in out
    for name in QUANTITIES:
        assert f"\n  {name} " in out
    assert "reference-trained run" in out and "not the verdict" in out
    assert "temporal_weight=0.4" in out
    assert "perceptual groups by name, kf.blendshapes.preset('semantic', layout='arkit'): mouth = jaw* + mouth* " \
           "(27 columns), expression = brow* + eye* + cheek* + nose* (24 columns)" in out
    assert png.stat().st_size > 10_000
    # the table shows the rescaled weights: late temporal = 0.3 * 0.4 / 0.2
    late_line = [line for line in out.splitlines() if line.strip().startswith("2 late")][0]
    assert " 0.600 " in late_line


def test_cli_demo_writes_a_run_csv_that_plot_draws(tmp_path, capsys):
    run_csv = tmp_path / "run.csv"
    assert cli.main(TINY_ARGS + ["--csv", str(run_csv)]) == 0
    out = capsys.readouterr().out
    assert f"run CSV: {run_csv} (9 rows" in out
    rows = read_csv(run_csv)
    assert [row["step"] for row in rows] == list(range(9))
    assert [row["epoch"] for row in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(math.isfinite(row["total"]) and row["phase"] in ("early", "mid", "late") for row in rows)
    png = tmp_path / "run.png"
    assert cli.main(["plot", str(run_csv), "-o", str(png)]) == 0
    assert "9 steps (0..8)" in capsys.readouterr().out
    assert png.stat().st_size > 10_000
    # A second run replaces the first: one run of 9 steps again, not 18.
    assert cli.main(TINY_ARGS + ["--csv", str(run_csv)]) == 0
    assert len(read_csv(run_csv)) == 9


def test_cli_demo_csv_replaces_only_a_run_csv_no_monitor_is_writing(capsys, tmp_path):
    """--csv replaces an earlier run CSV, but never empties a file another
    monitor is writing (its run would lose its rows) nor a file that is not
    a run CSV: a one-line error, and the file is left as it was."""
    other = tmp_path / "notes.yaml"
    other.write_text("loss: {mse_weight: 1.0}\n")
    held = tmp_path / "held.csv"
    monitor = kf.LossMonitor(csv=held)
    monitor.record(kf.temporal_loss(torch.rand(2, 52), torch.rand(2, 52)))
    monitor.flush()
    before = held.read_bytes()
    try:
        for path, message in ((other, "is not a LossMonitor run CSV"), (held, "another LossMonitor is writing")):
            with pytest.raises(SystemExit) as exc:
                cli.main(TINY_ARGS + ["--csv", str(path)])
            assert exc.value.code == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "--csv" in err and message in err, err
        assert other.read_text() == "loss: {mse_weight: 1.0}\n" and held.read_bytes() == before
    finally:
        monitor.close()


def test_cli_demo_csv_must_be_writable(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY_ARGS + ["--csv", str(tmp_path / "missing" / "run.csv")])
    assert exc.value.code == 2
    assert "argument --csv" in capsys.readouterr().err


def test_cli_demo_fails_on_a_planted_bug(monkeypatch, capsys):
    monkeypatch.setattr(train_module, "FusedKoeMorphLoss", StaleTemporalWeight)
    rc = cli.main(TINY_ARGS)
    out = capsys.readouterr().out
    assert rc == 1
    fail = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and "total, grad_pred beyond the float32 tolerance" in fail[0]
    assert not any(line.startswith("PASS") for line in out.splitlines())


def test_demo_is_registered():
    args = cli.build_parser().parse_args(["demo", "--epochs", "5", "--seed", "7"])
    assert args._module == "koemorph_fused.demo" and args.epochs == 5 and args.seed == 7 and args.device == "cpu"
    assert args.dtype == "float32" and args.threads == 1 and not args.reference_run
    assert cli.build_parser().parse_args(["demo", "--seed", str(2**64 - 1)]).seed == 2**64 - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_demo_on_cuda(corpus, dtype):
    result = demo_run(dataclasses.replace(TINY, device="cuda", dtype=dtype), corpus)
    assert result.verdict.ok, result.verdict
