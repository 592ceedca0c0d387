"""load_loss_weights: the loss: section of a KoeMorph YAML config."""

import pytest

import koemorph_fused as kf

SEED_CONFIG = """\
model:
  hidden_dim: 256
  mel_features: 80
loss:
  mse_weight: 1.0           # MSE
  l1_weight: 0.1
  perceptual_weight: 0.5
  temporal_weight: 0.2
  smoothing_weight: 0.1
training:
  epochs: 100
"""


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_seed_config(tmp_path):
    w = kf.load_loss_weights(write(tmp_path, SEED_CONFIG))
    assert w == kf.LossWeights()
    assert w.as_tuple() == (1.0, 0.1, 0.5, 0.2, 0.1)


def test_partial_section_keeps_defaults(tmp_path):
    w = kf.load_loss_weights(str(write(tmp_path, "loss:\n  temporal_weight: 0.3\n  l1_weight: 0\n")))
    assert w == kf.LossWeights(temporal=0.3, l1=0.0)


def test_other_section_name(tmp_path):
    w = kf.load_loss_weights(write(tmp_path, "dense:\n  smoothing_weight: 0.15\n"), section="dense")
    assert w.smoothing == 0.15


def test_unknown_key(tmp_path):
    path = write(tmp_path, "loss:\n  mse_weight: 1.0\n  temporal_wieght: 0.2\n")
    with pytest.raises(kf.ConfigError, match=r"config\.yaml.*loss\.temporal_wieght.*unknown") as info:
        kf.load_loss_weights(path)
    assert isinstance(info.value, ValueError)


def test_negative_weight(tmp_path):
    with pytest.raises(ValueError, match=r"config\.yaml.*loss\.l1_weight.*>= 0"):
        kf.load_loss_weights(write(tmp_path, "loss:\n  l1_weight: -0.1\n"))


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_non_finite_weight(tmp_path, value):
    with pytest.raises(ValueError, match="smoothing_weight.*finite"):
        kf.load_loss_weights(write(tmp_path, f"loss:\n  smoothing_weight: {value}\n"))


def test_non_numeric_weight(tmp_path):
    with pytest.raises(TypeError, match=r"config\.yaml.*loss\.mse_weight.*real number"):
        kf.load_loss_weights(write(tmp_path, "loss:\n  mse_weight: high\n"))


def test_missing_section(tmp_path):
    with pytest.raises(kf.ConfigError, match=r"config\.yaml.*no 'loss:' section.*model"):
        kf.load_loss_weights(write(tmp_path, "model:\n  hidden_dim: 4\n"))


@pytest.mark.parametrize("text, word", [
    ("loss: [1, 2]\n", "must be a mapping"),
    ("loss:\n", "must be a mapping"),
    ("- a\n- b\n", "expected a YAML mapping"),
    ("", "expected a YAML mapping"),
    ("loss: {mse_weight: 1.0\n", "not valid YAML"),
])
def test_bad_content(tmp_path, text, word):
    with pytest.raises(kf.ConfigError, match=r"config\.yaml.*" + word):
        kf.load_loss_weights(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        kf.load_loss_weights(tmp_path / "nope.yaml")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(OSError, match=str(tmp_path.name)):
        kf.load_loss_weights(tmp_path)


def test_bad_path_type():
    with pytest.raises(TypeError, match="path"):
        kf.load_loss_weights(42)


def test_repository_example_config():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "dual_stream_config.yaml"
    assert kf.load_loss_weights(path) == kf.LossWeights()
    assert kf.TrainingSchedule.from_base(kf.load_loss_weights(path), 100).at(99).weights == kf.LossWeights.for_stride(1)
