"""The demo: synthetic data, model, training loop and the `demo` subcommand (tiny sizes)."""

import dataclasses

import pytest
import torch
import yaml

import koemorph_fused as kf
from koemorph_fused import cli
from koemorph_fused.demo import report
from koemorph_fused.demo.data import WINDOW, WindowStreams, make_corpus
from koemorph_fused.demo.model import TemporalBlendshapeModel, TemporalSmoothing
from koemorph_fused.demo.train import DemoConfig, train

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
def runs64(corpus):
    cfg = dataclasses.replace(TINY, dtype="float64")
    return (train(cfg, kf.FusedKoeMorphLoss(), corpus, name="fused"),
            train(cfg, kf.reference.KoeMorphTemporalLoss(), corpus, name="reference"))


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


def test_corpus_is_speech_like():
    files = make_corpus(4, seed=0)
    assert len({f.num_frames for f in files}) == 4            # different lengths
    for f in files:
        assert 300 <= f.num_frames <= 900
        assert f.blendshapes.shape == (f.num_frames, 52) and f.features.shape == (f.num_frames, 32)
        assert f.blendshapes.dtype == torch.float32
        assert float(f.blendshapes.min()) >= 0.0 and float(f.blendshapes.max()) <= 1.0
        b = f.blendshapes
        speed = (b[1:] - b[:-1]).abs().mean(0)
        # jaw / mouth move with the syllables, brows and gaze slowly
        assert speed[12:22].mean() > 5 * speed[[0, 1, 2, 3, 6, 7, 8, 9]].mean()
        # the features carry the jaw: frame energy correlates with jawOpen
        corr = torch.corrcoef(torch.stack([b[:, 12], f.features.mean(1)]))[0, 1]
        assert corr > 0.6
        # pauses: the jaw rests near closed for some frames, opens wide for others
        assert float(b[:, 12].min()) < 0.05 and float(b[:, 12].max()) > 0.4


def test_corpus_arguments():
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


# ---------------------------------------------------------------- training

def test_fused_and_reference_training_agree_float64(runs64):
    fused, ref = runs64
    assert len(fused.rows) == len(ref.rows) == TINY.epochs * TINY.steps_per_epoch
    agreement = report.compare(fused, ref, *report.TOLERANCES["float64"])
    assert agreement.ok, agreement
    assert agreement.max_rel_total < 1e-9
    torch.testing.assert_close(fused.alpha, ref.alpha, rtol=1e-9, atol=1e-12)


def test_training_loss_decreases(runs64):
    fused, _ = runs64
    mse = fused.column("mse")
    k = TINY.steps_per_epoch
    assert float(mse[-k:].mean()) < 0.5 * float(mse[:k].mean())


def test_schedule_drives_stride_and_weights(runs64):
    """Each step ran with its epoch's stride and weights: the recorded total is
    the phase weights' sum of the recorded terms."""
    fused, _ = runs64
    schedule = TINY.schedule()
    assert {row["stride"] for row in fused.rows} == {p.stride for p in schedule}
    weights_seen = set()
    for row in fused.rows:
        phase = schedule.at(row["epoch"])
        assert row["phase"] == phase.name and row["stride"] == phase.stride
        expected = sum(w * row[name] for w, name in zip(phase.weights.as_tuple(), kf.TERM_NAMES))
        assert row["total"] == pytest.approx(expected, rel=1e-9)
        weights_seen.add(phase.weights)
    assert len(weights_seen) == 3  # sparse, a mid blend, dense (4 epochs: early, mid, mid, late)
    # the first step has no previous frame, later ones do
    assert fused.rows[0]["temporal"] == 0.0 and fused.rows[0]["file_transition"] is True
    assert any(row["temporal"] > 0 for row in fused.rows[1:])


def test_fused_and_reference_training_agree_float32(corpus):
    fused = train(TINY, kf.FusedKoeMorphLoss(), corpus)
    ref = train(TINY, kf.reference.KoeMorphTemporalLoss(), corpus)
    agreement = report.compare(fused, ref, *report.TOLERANCES["float32"])
    assert agreement.ok, agreement
    assert len(fused.loss_seconds) == len(fused.rows) and all(t > 0 for t in fused.loss_seconds)


def test_compare_detects_a_difference(runs64):
    fused, ref = runs64
    rows = [dict(r) for r in ref.rows]
    rows[5]["smoothing"] *= 1.01
    changed = dataclasses.replace(ref, rows=rows)
    agreement = report.compare(fused, changed, 1e-6, 1e-12)
    assert not agreement.ok and agreement.first_bad_step == 5


# ---------------------------------------------------------------- command line

TINY_ARGS = ["demo", "--epochs", "3", "--steps-per-epoch", "3", "--batch", "3", "--hidden", "8", "--files", "2",
             "--no-progress"]


def test_cli_demo_passes_with_config_and_plot(tmp_path, capsys):
    config = tmp_path / "dual_stream_config.yaml"
    config.write_text(yaml.safe_dump({"model": {"hidden": 8}, "loss": {"temporal_weight": 0.4, "l1_weight": 0.0}}))
    png = tmp_path / "curves.png"
    rc = cli.main(TINY_ARGS + ["--config", str(config), "--plot", str(png), "--dtype", "float64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "FAIL" not in out
    assert "loss forward+backward per step" in out and "max rel" in out
    assert "temporal_weight=0.4" in out
    assert png.stat().st_size > 10_000
    # the table shows the rescaled weights: late temporal = 0.3 * 0.4 / 0.2
    late_line = [line for line in out.splitlines() if line.strip().startswith("2 late")][0]
    assert " 0.600 " in late_line


class _OffByOnePercent(kf.reference.KoeMorphTemporalLoss):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs) * 1.01


def test_cli_demo_fails_on_a_mismatch(monkeypatch, capsys):
    import koemorph_fused.demo.cli as demo_cli

    monkeypatch.setattr(demo_cli, "KoeMorphTemporalLoss", _OffByOnePercent)
    rc = cli.main(TINY_ARGS)
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "from step 0" in out


def test_cli_demo_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  mse_weight: -1\n")
    assert cli.main(TINY_ARGS + ["--config", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert cli.main(TINY_ARGS + ["--config", str(tmp_path / "missing.yaml")]) == 2
    assert cli.main(TINY_ARGS[:-3] + ["--files", "1"]) == 2
    if not torch.cuda.is_available():
        assert cli.main(TINY_ARGS + ["--device", "cuda"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--epochs", "0"])


def test_demo_is_registered():
    args = cli.build_parser().parse_args(["demo", "--epochs", "5", "--seed", "7"])
    assert args._module == "koemorph_fused.demo" and args.epochs == 5 and args.seed == 7 and args.device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_on_cuda(corpus):
    cfg = dataclasses.replace(TINY, device="cuda")
    fused = train(cfg, kf.FusedKoeMorphLoss(), corpus)
    ref = train(cfg, kf.reference.KoeMorphTemporalLoss(), corpus)
    assert report.compare(fused, ref, *report.TOLERANCES["float32"]).ok
