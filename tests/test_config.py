"""load_loss_weights / load_loss_config: the loss section of a KoeMorph (seed or Hydra) YAML config."""

from pathlib import Path

import pytest
import torch

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
    with pytest.raises(kf.ConfigError, match=r"config\.yaml: no loss section; looked for 'loss:', "
                                            r"'training\.loss:', 'model\.loss:' in .*config\.yaml.*model"):
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


# --- Hydra / OmegaConf-style configs (fixtures in tests/data) -----------------------------------

DATA = Path(__file__).resolve().parent / "data"
SEED_SPARSE = kf.LossWeights(perceptual=0.7, temporal=0.1, smoothing=0.05)


def test_hydra_defaults_pull_in_the_training_loss():
    # The primary config has no loss section; its defaults list composes training/default.yaml
    # into training.loss, whose _target_ is Hydra's and ignored.
    path = DATA / "hydra" / "dual_stream_config.yaml"
    cfg = kf.load_loss_config(path)
    assert cfg.weights == SEED_SPARSE
    assert cfg.section == "training.loss"
    assert cfg.files[0] == str(path)
    assert str(DATA / "hydra" / "training" / "default.yaml") in cfg.files
    assert (cfg.mouth_indices, cfg.expression_indices, cfg.layout) == (kf.MOUTH_INDICES, kf.EXPRESSION_INDICES, None)
    assert kf.load_loss_weights(path) == SEED_SPARSE


def test_group_file_with_target_key_read_directly():
    assert kf.load_loss_weights(DATA / "hydra" / "training" / "default.yaml") == SEED_SPARSE


def test_composed_run_config_training_loss():
    cfg = kf.load_loss_config(DATA / "composed_run_config.yaml")
    assert cfg.section == "training.loss"
    assert cfg.weights == kf.LossWeights(l1=0.2)  # temporal and smoothing keep their defaults


def test_model_loss_with_named_groups():
    cfg = kf.load_loss_config(DATA / "model_loss_named_groups.yaml")
    assert cfg.section == "model.loss" and cfg.layout == "live_link_face"
    assert cfg.weights == kf.LossWeights(perceptual=0.7, temporal=0.1)
    assert (cfg.mouth_indices, cfg.expression_indices) == kf.blendshapes.preset("semantic", layout="live_link_face")
    # The config drives both modules and the function the same way as the explicit groups.
    g = torch.Generator().manual_seed(0)
    pred, target, prev, raw = (torch.rand(4, 52, generator=g, dtype=torch.float64) for _ in range(4))
    expected = kf.reference.temporal_loss(
        pred, target, prev, raw, weights=kf.LossWeights(perceptual=0.7, temporal=0.1),
        mouth_indices=("jaw*", "mouth*"), expression_indices=("brow*", "eye*", "cheek*", "nose*"),
        layout="live_link_face")
    assert torch.equal(kf.reference.temporal_loss(pred, target, prev, raw, **cfg.loss_kwargs()).terms, expected.terms)
    assert torch.equal(kf.reference.KoeMorphTemporalLoss(**cfg.module_kwargs())(pred, target, prev, raw),
                       expected.total)
    fused = kf.FusedKoeMorphLoss(**cfg.module_kwargs())(pred, target, prev, raw)
    torch.testing.assert_close(fused, expected.total, rtol=1e-12, atol=0)


def test_seed_loss_with_numbered_groups():
    cfg = kf.load_loss_config(DATA / "seed_loss_numbered_groups.yaml")
    assert cfg.section == "loss" and cfg.weights == kf.LossWeights()
    assert cfg.mouth_indices == (17, 18, 19) and cfg.expression_indices == (0, 7, -1)


def test_mapping_input_is_a_composed_config():
    cfg = kf.load_loss_config({"training": {"loss": {"_target_": "x.Loss", "temporal_weight": 0.3}}})
    assert cfg.section == "training.loss" and cfg.weights == kf.LossWeights(temporal=0.3) and cfg.files == ()
    with pytest.raises(kf.ConfigError, match=r"^config: no loss section"):
        kf.load_loss_config({"model": {}})


def _tree(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path / "main.yaml"


@pytest.mark.parametrize("self_first, expected", [(False, 0.3), (True, 0.9)])
def test_self_position_decides_who_wins(tmp_path, self_first, expected):
    entries = ["training: t", "_self_"] if not self_first else ["_self_", "training: t"]
    main = _tree(tmp_path, {
        "main.yaml": "defaults:\n" + "".join(f"  - {e}\n" for e in entries)
                     + "training:\n  loss:\n    temporal_weight: 0.3\n",
        "training/t.yaml": "loss:\n  temporal_weight: 0.9\n  l1_weight: 0.2\n",
    })
    # The two loss mappings merge key by key; only the shared key depends on the order.
    assert kf.load_loss_weights(main) == kf.LossWeights(temporal=expected, l1=0.2)


def test_package_directives_and_override(tmp_path):
    main = _tree(tmp_path, {
        "main.yaml": "defaults:\n  - losses: a\n  - override losses: b\n  - extra@training: c\n",
        "losses/a.yaml": "# @package _global_\nloss:\n  temporal_weight: 0.9\n",
        "losses/b.yaml": "# a comment first\n# @package _global_\nloss:\n  temporal_weight: 0.4\n",
        "extra/c.yaml": "loss:\n  l1_weight: 0.3\n",
    })
    cfg = kf.load_loss_config(main)
    # override replaced losses/a (never read), _global_ put b's loss at the top level,
    # which is found before training.loss (from extra/c, placed by @training).
    assert cfg.section == "loss" and cfg.weights == kf.LossWeights(temporal=0.4)
    assert not any(f.endswith("a.yaml") for f in cfg.files)
    assert kf.load_loss_weights(main, section="training.loss") == kf.LossWeights(l1=0.3)


def test_nested_defaults_are_followed(tmp_path):
    main = _tree(tmp_path, {
        "main.yaml": "defaults:\n  - training: t\n",
        "training/t.yaml": "defaults:\n  - loss: dense\n  - _self_\n",
        "training/loss/dense.yaml": "temporal_weight: 0.3\nsmoothing_weight: 0.15\n",
    })
    assert kf.load_loss_weights(main) == kf.LossWeights.for_stride(1)


def test_nothing_found_says_every_place_it_looked(tmp_path):
    main = _tree(tmp_path, {
        "main.yaml": "defaults:\n  - model: m\n  - training: gone\n  - _self_\nseed: 1\n",
        "model/m.yaml": "hidden: 4\n",
    })
    with pytest.raises(kf.ConfigError) as info:
        kf.load_loss_weights(main)
    message = str(info.value)
    for part in ("'loss:'", "'training.loss:'", "'model.loss:'", str(main), str(tmp_path / "model" / "m.yaml"),
                 "could not find: " + str(tmp_path / "training" / "gone.yaml"), "['model', 'seed']"):
        assert part in message


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("loss:\n  # poids de la perte: d\u00e9faut\n  mse_weight: 1.0\n".encode("latin-1"))
    with pytest.raises(kf.ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        kf.load_loss_weights(path)


def test_non_utf8_group_file_names_that_file(tmp_path):
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - training: t\n"})
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "t.yaml").write_bytes(b"loss:\n  mse_weight: 1.0 # \xff\n")
    with pytest.raises(kf.ConfigError, match=r"training/t\.yaml: not UTF-8 text \(byte 0xff"):
        kf.load_loss_weights(main)


def test_interpolation_is_an_error(tmp_path):
    path = write(tmp_path, "base: 0.2\nloss:\n  temporal_weight: ${base}\n")
    with pytest.raises(kf.ConfigError, match=r"loss\.temporal_weight: '\$\{base\}' is an OmegaConf interpolation"):
        kf.load_loss_weights(path)


def test_other_losses_terms_are_unknown_keys(tmp_path):
    path = write(tmp_path, "loss:\n  _target_: src.model.losses.KoeMorphLoss\n  sparsity_weight: 0.01\n")
    with pytest.raises(kf.ConfigError, match=r"loss\.sparsity_weight: unknown key.*mouth_indices"):
        kf.load_loss_weights(path)


@pytest.mark.parametrize("body, exc, pattern", [
    ("  mouth_indices: ['jaw*']\n", kf.ConfigError, r"loss\.mouth_indices holds names.*layout="),
    ("  layout: arkit\n  mouth_indices: [jawOpn]\n", kf.ConfigError,
     r"loss\.mouth_indices: name 'jawOpn'.*closest: jawOpen"),
    ("  layout: arkitt\n", kf.ConfigError, r"loss\.layout: unknown layout 'arkitt'.*did you mean 'arkit'"),
    ("  layout: 3\n", TypeError, r"loss\.layout: expected a layout name"),
    ("  layout: [a, 1]\n", TypeError, r"loss\.layout: column names must be strings"),
    ("  mouth_indices: 5\n", TypeError, r"loss\.mouth_indices: expected a list"),
    ("  expression_indices: [1, 2.5]\n", TypeError, r"loss\.expression_indices: expected column numbers or names"),
    ("  layout: arkit\n  expression_indices: [eye*, 3]\n", TypeError, r"loss\.expression_indices mixes names"),
])
def test_bad_groups(tmp_path, body, exc, pattern):
    with pytest.raises(exc, match=r"config\.yaml: " + pattern):
        kf.load_loss_config(write(tmp_path, "loss:\n  mse_weight: 1.0\n" + body))


def test_bad_section_argument(tmp_path):
    with pytest.raises(TypeError, match="section must be a str"):
        kf.load_loss_weights(write(tmp_path, SEED_CONFIG), section=["loss"])


def test_a_group_that_starts_with_numbers_and_mixes_in_names_names_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("loss:\n  layout: arkit\n  mouth_indices: [12, jawOpen]\n")
    with pytest.raises(TypeError, match=r"config\.yaml: loss\.mouth_indices mixes names"):
        kf.load_loss_config(path)
