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
    # The layout comes along: data of another width is an error, as with the names themselves.
    wide = torch.rand(4, 61, dtype=torch.float64)
    for loss in (kf.FusedKoeMorphLoss(**cfg.module_kwargs()), kf.reference.KoeMorphTemporalLoss(**cfg.module_kwargs()),
                 lambda p, t: kf.temporal_loss(p, t, **cfg.loss_kwargs()),
                 kf.FusedKoeMorphSequenceLoss(**cfg.sequence_module_kwargs())):
        x = wide.unsqueeze(0) if isinstance(loss, kf.FusedKoeMorphSequenceLoss) else wide
        with pytest.raises(ValueError, match="names 52 columns, but the data has C = 61"):
            loss(x, x)


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


def test_override_replaces_the_default_it_names(tmp_path):
    # Hydra's override swaps the option: nothing of training/loss/heavy is left (a merge would keep l1 = 0.3).
    main = _tree(tmp_path, {
        "main.yaml": "defaults:\n  - training: t\n  - override training/loss: light\n  - _self_\n",
        "training/t.yaml": "defaults:\n  - loss: heavy\n  - _self_\n",
        "training/loss/heavy.yaml": "l1_weight: 0.3\ntemporal_weight: 0.9\n",
        "training/loss/light.yaml": "temporal_weight: 0.4\n",
    })
    cfg = kf.load_loss_config(main)
    assert cfg.weights == kf.LossWeights(temporal=0.4)
    assert str(tmp_path / "training" / "loss" / "light.yaml") in cfg.files
    assert not any(f.endswith("heavy.yaml") for f in cfg.files)


def test_package_directives(tmp_path):
    main = _tree(tmp_path, {
        "main.yaml": "defaults:\n  - losses: b\n  - extra@training: c\n  - _self_\n",
        "losses/b.yaml": "# @package _global_\nloss:\n  temporal_weight: 0.4\n",
        "extra/c.yaml": "loss:\n  l1_weight: 0.3\n",
    })
    # _global_ put b's loss at the top level, found before training.loss (from extra/c, placed by @training).
    cfg = kf.load_loss_config(main)
    assert cfg.section == "loss" and cfg.weights == kf.LossWeights(temporal=0.4)
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
        "main.yaml": "defaults:\n  - model: m\n  - _self_\nseed: 1\n",
        "model/m.yaml": "hidden: 4\n",
    })
    with pytest.raises(kf.ConfigError) as info:
        kf.load_loss_weights(main)
    message = str(info.value)
    for part in ("'loss:'", "'training.loss:'", "'model.loss:'", str(main), str(tmp_path / "model" / "m.yaml"),
                 "['model', 'seed']"):
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


def test_interpolation_is_resolved_as_omegaconf_does(tmp_path):
    path = write(tmp_path, "base: 0.2\nloss:\n  temporal_weight: ${base}\n  l1_weight: ${oc.decode:'0.3'}\n")
    assert kf.load_loss_weights(path) == kf.LossWeights(temporal=0.2, l1=0.3)


@pytest.mark.parametrize("text, pattern", [
    ("loss:\n  temporal_weight: ${nowhere}\n", r"loss: .*nowhere"),
    ("a: ${b}\nb: ${a}\nloss:\n  temporal_weight: ${a}\n", r"loss: "),
    ("loss:\n  temporal_weight: ???\n", r"loss: .*[Mm]issing"),
])
def test_interpolation_that_does_not_resolve(tmp_path, text, pattern):
    with pytest.raises(kf.ConfigError, match=r"^\S*config\.yaml: " + pattern) as info:
        kf.load_loss_weights(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_other_losses_terms_are_unknown_keys(tmp_path):
    path = write(tmp_path, "loss:\n  _target_: src.model.losses.KoeMorphLoss\n  sparsity_weight: 0.01\n")
    with pytest.raises(kf.ConfigError, match=r"loss\.sparsity_weight: unknown key.*velocity_weight.*mouth_indices"):
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


# --- Hydra composes, OmegaConf loads: the adversarial cases of issue 18 -------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

hydra = pytest.importorskip("hydra")


def _one_line_config_error(path, culprit=None, **kwargs):
    """load_loss_config fails with a one-line ConfigError that starts with the file (or the culprit
    file it pulls in), without hanging (the old loader took 21 s on the alias bomb)."""
    start = time.perf_counter()
    with pytest.raises(kf.ConfigError) as info:
        kf.load_loss_config(path, **kwargs)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(culprit or path)), message
    assert elapsed < 10.0, f"took {elapsed:.1f} s: a hang, not a refusal"
    return message


def _hydra_compose(main):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(main.parent), version_base="1.3"):
        return compose(config_name=main.stem)


KOEMORPH_STYLE = {
    # Written the way the original KoeMorph configs are: a primary config with a defaults
    # list, group files with _target_, exponent floats (lr: 1e-4), interpolations, a
    # nested default and an override of it.
    "dual_stream_config.yaml": (
        "defaults:\n  - data: default\n  - model: dual_stream\n  - training: default\n"
        "  - override training/schedule: fast\n  - _self_\n\n"
        "seed: 42\nframe_rate: 30\nhydra:\n  run:\n    dir: outputs/${now:%Y-%m-%d}\n"
        "training:\n  loss:\n    smoothing_weight: 5e-2\n"),
    "data/default.yaml": "batch_size: 4\ntarget_fps: ${frame_rate}\n",
    "model/dual_stream.yaml": "_target_: src.model.DualStream\nd_model: 256\nnum_blendshapes: 52\n",
    "training/default.yaml": (
        "defaults:\n  - schedule: slow\n  - _self_\n"
        "optimizer:\n  _target_: torch.optim.AdamW\n  lr: 1e-4\n  weight_decay: 1e-2\n"
        "loss:\n  _target_: src.model.losses.KoeMorphLoss\n  mse_weight: 1.0\n  l1_weight: 1e-1\n"
        "  perceptual_weight: 7e-1\n  temporal_weight: 2e-1\n  smoothing_weight: 0.1\n"
        "  velocity_weight: ${training.schedule.velocity}\n"),
    "training/schedule/slow.yaml": "epochs: 100\nvelocity: 0.5\n",
    "training/schedule/fast.yaml": "epochs: 10\nvelocity: 2.5e-1\n",
}


def test_same_weights_as_hydra_compose(tmp_path):
    main = _tree(tmp_path, KOEMORPH_STYLE) .parent / "dual_stream_config.yaml"
    cfg = kf.load_loss_config(main)
    composed = _hydra_compose(main)
    loss = composed.training.loss
    expected = kf.LossWeights.from_config({k: loss[k] for k in kf.weights.CONFIG_KEYS})
    assert cfg.weights == expected == kf.LossWeights(l1=0.1, perceptual=0.7, temporal=0.2, smoothing=0.05)
    assert cfg.velocity_weight == loss.velocity_weight == 0.25  # the override's, through the interpolation
    seq_fn = kf.FusedKoeMorphSequenceLoss(**cfg.sequence_module_kwargs())
    assert seq_fn.velocity_weight == 0.25 and seq_fn.weights == cfg.weights
    pred = torch.rand(2, 4, 52)
    torch.testing.assert_close(seq_fn(pred, pred.flip(1)),
                               kf.sequence_loss(pred, pred.flip(1), **cfg.sequence_loss_kwargs()).total)
    assert cfg.section == "training.loss"
    assert cfg.files == tuple(str(tmp_path / f) for f in (
        "dual_stream_config.yaml", "data/default.yaml", "model/dual_stream.yaml", "training/schedule/fast.yaml",
        "training/default.yaml"))  # in Hydra's order: a config's defaults before its own content


def test_the_repository_fixture_matches_hydra_compose():
    main = DATA / "hydra" / "dual_stream_config.yaml"
    loss = _hydra_compose(main).training.loss
    assert kf.load_loss_weights(main) == kf.LossWeights.from_config(
        {k: v for k, v in loss.items() if k != "_target_"})


def test_exponent_floats_read_as_hydra_reads_them(tmp_path):
    cfg = kf.load_loss_config(write(tmp_path, "lr: 1e-4\nloss:\n  temporal_weight: 2e-1\n  velocity_weight: 1E-3\n"))
    assert cfg.weights == kf.LossWeights(temporal=0.2) and cfg.velocity_weight == 0.001


def test_duplicate_keys_are_an_error(tmp_path):
    path = write(tmp_path, "loss:\n  temporal_weight: 0.2\n  l1_weight: 0.1\n  temporal_weight: 0.9\n")
    assert "config.yaml:4: duplicate key 'temporal_weight'" in _one_line_config_error(path)


def test_self_including_defaults_a_a(tmp_path):
    # The old walker read a.yaml 2^16 times; Hydra itself raises a RecursionError.
    _tree(tmp_path, {"main.yaml": "", "a.yaml": "defaults:\n  - a\n  - a\nloss:\n  l1_weight: 0.2\n"})
    message = _one_line_config_error(tmp_path / "a.yaml")
    assert "includes" in message or "include" in message


def test_repeated_leaf_entry_is_what_hydra_makes_of_it(tmp_path):
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - a\n  - a\n", "a.yaml": "loss:\n  l1_weight: 0.2\n"})
    assert kf.load_loss_weights(main) == kf.LossWeights(l1=0.2)


def test_defaults_cycle(tmp_path):
    _tree(tmp_path, {"main.yaml": "", "a.yaml": "defaults:\n  - b\nloss: {}\n", "b.yaml": "defaults:\n  - a\nx: 1\n"})
    _one_line_config_error(tmp_path / "a.yaml")


def test_misspelt_entry_is_an_error_and_optional_is_not(tmp_path):
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - trainng: default\n  - _self_\nloss: {}\n",
                            "training/default.yaml": "x: 1\n",
                            "opt.yaml": "defaults:\n  - optional trainng: default\n  - _self_\nloss:\n"
                                        "  l1_weight: 0.3\n"})
    assert "trainng/default" in _one_line_config_error(main)
    assert kf.load_loss_weights(tmp_path / "opt.yaml") == kf.LossWeights(l1=0.3)


def test_chain_deeper_than_sixteen_is_followed_to_the_end(tmp_path):
    files = {"main.yaml": "defaults:\n  - c0\n  - _self_\n"}
    for i in range(24):
        files[f"c{i}.yaml"] = f"defaults:\n  - c{i + 1}\n  - _self_\nlevel{i}: {i}\n"
    files["c24.yaml"] = "loss:\n  temporal_weight: 0.35\n"
    main = _tree(tmp_path, files)
    assert kf.load_loss_weights(main) == kf.LossWeights(temporal=0.35)


def test_leading_slash_is_the_config_folder_not_the_filesystem(tmp_path):
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("loss:\n  l1_weight: 0.9\n")
    main = _tree(tmp_path / "configs", {
        "main.yaml": "defaults:\n  - training: t\n  - _self_\n",
        "training/t.yaml": "defaults:\n  - /shared/loss\n  - _self_\n",
        "shared/loss.yaml": "# @package training.loss\ntemporal_weight: 0.3\n",
        "abs.yaml": f"defaults:\n  - {outside.with_suffix('')}\n  - _self_\n",
    })
    assert kf.load_loss_weights(main) == kf.LossWeights(temporal=0.3)
    assert "Could not load" in _one_line_config_error(tmp_path / "configs" / "abs.yaml")


def test_alias_bomb_is_refused_quickly(tmp_path):
    # 586 bytes that expand to billions of nodes (the old loader took 21 s and 1.3 GB).
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append("loss:\n  temporal_weight: 0.2\n  bomb: *a8")
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert "nodes" in _one_line_config_error(path)


def test_alias_bomb_in_a_group_file_is_refused_before_hydra_reads_it(tmp_path):
    bomb = "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9) if i else 'x'}]\n" for i in range(9))
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - training: t\n", "training/t.yaml": bomb})
    assert "nodes" in _one_line_config_error(main, culprit=tmp_path / "training" / "t.yaml")


@pytest.mark.parametrize("route", ["symlinked group folder", "hydra.searchpath", "defaults entry with .."])
def test_alias_bomb_outside_the_config_folder_is_refused_before_hydra_reads_it(tmp_path, route):
    """Hydra also reads a group folder that is a symlink, the folders of
    hydra.searchpath and those a '..' defaults entry climbs to: those files
    are checked too (each was a hang)."""
    bomb = "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9) if i else 'x'}]\n" for i in range(9))
    outside = tmp_path / "outside"
    if route == "symlinked group folder":
        _tree(outside, {"t.yaml": bomb})
        main = _tree(tmp_path / "conf", {"main.yaml": "defaults:\n  - training: t\n  - _self_\n"})
        (tmp_path / "conf" / "training").symlink_to(outside, target_is_directory=True)
        culprit = tmp_path / "conf" / "training" / "t.yaml"
    elif route == "hydra.searchpath":
        _tree(outside, {"training/t.yaml": bomb})
        main = _tree(tmp_path / "conf", {"main.yaml": "defaults:\n  - training: t\n  - _self_\n"
                                                      f"hydra:\n  searchpath:\n    - file://{outside}\n"})
        culprit = outside / "training" / "t.yaml"
    else:
        _tree(tmp_path, {"t.yaml": bomb})
        main = _tree(tmp_path / "conf", {"main.yaml": "defaults:\n  - ../t\n  - _self_\n"})
        culprit = tmp_path / "t.yaml"
    assert "nodes" in _one_line_config_error(main, culprit=culprit)


@pytest.mark.parametrize("text", [
    "loss: " + "[" * 3000 + "]" * 3000 + "\n",
    "loss: " + "[" * 30000 + "]" * 30000 + "\n",
    "loss:\n" + "- " * 300 + "x\n",
    "loss: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n",
])
def test_deep_nesting_is_refused(tmp_path, text):
    assert "nested more than" in _one_line_config_error(write(tmp_path, text))


@pytest.mark.parametrize("text", [
    "".join(" " * i + f"k{i}:\n" for i in range(300)) + " " * 300 + "v: 1\n",
    "x: " + "[" * 3000 + "]" * 3000 + "\n",
])
def test_deep_nesting_in_a_group_file_is_refused_before_hydra_reads_it(tmp_path, text):
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - training: t\n", "training/t.yaml": text})
    assert "nested more than" in _one_line_config_error(main, culprit=tmp_path / "training" / "t.yaml")


def test_brackets_in_strings_and_comments_are_not_nesting(tmp_path):
    text = "note: '" + "[" * 100 + "'\nother: \"" + "{" * 100 + "\"  # " + "[" * 100 + "\nloss:\n  l1_weight: 0.2\n"
    assert kf.load_loss_weights(write(tmp_path, text)) == kf.LossWeights(l1=0.2)


def test_recursive_and_undefined_aliases(tmp_path):
    assert "recursive alias" in _one_line_config_error(write(tmp_path, "loss: &l\n  x: *l\n"))
    assert "no anchor" in _one_line_config_error(write(tmp_path, "loss:\n  l1_weight: *w\n"))


def test_huge_file_is_refused_before_parsing(tmp_path):
    path = write(tmp_path, "loss:\n  l1_weight: 0.1\n" + "# padding\n" * 20000)
    assert "KiB" in _one_line_config_error(path)


def test_many_nodes_are_refused(tmp_path):
    path = write(tmp_path, "loss: {}\nbig: [" + ", ".join("0" for _ in range(12000)) + "]\n")
    assert "nodes" in _one_line_config_error(path)


def test_two_documents_are_refused(tmp_path):
    assert "one document" in _one_line_config_error(write(tmp_path, "loss: {}\n---\nloss: {}\n"))


def test_velocity_weight(tmp_path):
    assert kf.load_loss_config(write(tmp_path, SEED_CONFIG)).velocity_weight == 0.0
    cfg = kf.load_loss_config(write(tmp_path, "loss:\n  velocity_weight: 0.5\n"))
    assert cfg.velocity_weight == 0.5 and cfg.weights == kf.LossWeights()
    assert "velocity_weight" not in cfg.module_kwargs()  # the five-term module does not take it
    with pytest.raises(kf.ConfigError, match=r"loss\.velocity_weight: .*>= 0"):
        kf.load_loss_config(write(tmp_path, "loss:\n  velocity_weight: -1\n"))
    with pytest.raises(TypeError, match=r"loss\.velocity_weight: .*real number"):
        kf.load_loss_config(write(tmp_path, "loss:\n  velocity_weight: fast\n"))


def test_a_dictconfig_is_resolved(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"base": 0.3, "training": {"loss": {"temporal_weight": "${base}"}}})
    assert kf.load_loss_weights(cfg) == kf.LossWeights(temporal=0.3)


def test_works_inside_a_running_hydra_app_and_leaves_it_alone(tmp_path):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    main = _tree(tmp_path / "mine", {"main.yaml": "defaults:\n  - training: t\n",
                                     "training/t.yaml": "loss:\n  l1_weight: 0.4\n"})
    app = tmp_path / "app"
    app.mkdir()
    with initialize_config_dir(config_dir=str(app), version_base="1.3"):
        before = GlobalHydra.instance().hydra
        assert kf.load_loss_weights(main) == kf.LossWeights(l1=0.4)
        assert GlobalHydra.instance().is_initialized() and GlobalHydra.instance().hydra is not None
        assert GlobalHydra.instance().hydra.config_loader is not None and before is not None
    assert not GlobalHydra.instance().is_initialized()


def test_without_hydra_plain_files_load_and_defaults_lists_say_what_to_install(tmp_path, monkeypatch):
    for module in ("hydra", "omegaconf"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert kf.load_loss_weights(write(tmp_path, "loss:\n  temporal_weight: 0.3\n")) == kf.LossWeights(temporal=0.3)
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - training: t\n", "training/t.yaml": "loss: {}\n"})
    message = _one_line_config_error(main)
    assert "hydra-core" in message and "pip install" in message
    with pytest.raises(TypeError, match=r"temporal_weight.*'2e-1'.*omegaconf"):
        kf.load_loss_weights(write(tmp_path, "loss:\n  temporal_weight: 2e-1\n"))
    # Duplicate keys are caught before any loader, with or without OmegaConf.
    assert "duplicate key" in _one_line_config_error(write(tmp_path, "loss: {}\nloss: {}\n"))


def test_demo_config_errors_are_one_line_exit_2(tmp_path):
    path = write(tmp_path, "loss: " + "[" * 3000 + "]" * 3000 + "\n")
    proc = subprocess.run([sys.executable, "-m", "koemorph_fused", "demo", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nested more than" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("text, expected", [
    # Hydra checks its own section against its schema.
    ("hydra:\n  nonsense_key: 1\nloss:\n  l1_weight: 0.3\n", "Key 'nonsense_key' not in 'HydraConf'"),
    # A package header on the primary config moves its content, loss included.
    ("# @package foo\nloss:\n  l1_weight: 0.3\n", "top-level keys: ['foo']"),
    ("\n# @key value\n# @package foo\nloss:\n  l1_weight: 0.3\n", "top-level keys: ['foo']"),
])
def test_configs_without_defaults_are_read_as_hydra_reads_them(tmp_path, text, expected):
    """A hydra: section or a '# @package' header made a file Hydra's, but
    without a defaults: list it was read by OmegaConf alone: Hydra's schema
    error went unseen, and the header was ignored."""
    assert expected in _one_line_config_error(write(tmp_path, text))


@pytest.mark.parametrize("text, weights", [
    ("hydra:\n  run:\n    dir: out\nloss:\n  l1_weight: 0.3\n", kf.LossWeights(l1=0.3)),
    ("# @package _global_\nloss:\n  l1_weight: 0.3\n", kf.LossWeights(l1=0.3)),
    # Hydra's header is the lines before the first plain comment: this header is ignored.
    ("# a comment\n# @package foo\nloss:\n  l1_weight: 0.3\n", kf.LossWeights(l1=0.3)),
])
def test_hydra_sections_and_headers_that_hydra_accepts(tmp_path, text, weights):
    path = write(tmp_path, text)
    assert kf.load_loss_weights(path) == weights
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        assert kf.load_loss_weights(compose(config_name="config")) == weights


def test_a_hydra_section_in_a_yml_file_says_to_rename_it(tmp_path):
    message = _one_line_config_error(write(tmp_path, "hydra:\n  run:\n    dir: out\nloss: {}\n", "config.yml"))
    assert "has a hydra: section" in message and "rename it to config.yaml" in message


@pytest.mark.parametrize("text, section", [("loss: ???\n", "loss"), ("training:\n  loss: ???\n", "training.loss")])
def test_a_loss_section_never_set_is_named(tmp_path, text, section):
    """'loss: ???' said "no loss section ... (top-level keys: ['loss'])"."""
    message = _one_line_config_error(write(tmp_path, text))
    assert f"{section} is ???" in message and "no loss section" not in message


@pytest.mark.parametrize("group_text, expected", [
    ("loss:\n  bogus: 1\n", "training.loss.bogus: unknown key"),
    ("loss:\n  l1_weight: -1\n", "training.loss.l1_weight: loss weight 'l1' must be finite"),
    ("loss:\n  mouth_indices: [1, jaw]\n", "training.loss.mouth_indices mixes names and column numbers"),
])
def test_errors_name_the_file_the_defaults_list_pulled_in(tmp_path, group_text, expected):
    """An error in training/t.yaml named only main.yaml, which does not hold the key."""
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - training: t\n  - _self_\ntraining:\n  loss:\n"
                                         "    mse_weight: 2.0\n",
                            "training/t.yaml": group_text})
    with pytest.raises((kf.ConfigError, TypeError)) as info:
        kf.load_loss_config(main)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'training' / 't.yaml'} (in the defaults of {main}): "), message
    assert expected in message


def test_a_key_the_primary_overrides_is_the_primary_s(tmp_path):
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - training: t\n  - _self_\ntraining:\n  loss:\n"
                                         "    l1_weight: -2.0\n",
                            "training/t.yaml": "loss:\n  l1_weight: 0.5\n"})
    assert "training.loss.l1_weight: loss weight" in _one_line_config_error(main)


def test_a_loss_section_never_set_does_not_hide_the_next_place(tmp_path):
    """'loss: ???' beside a real training.loss: the search goes on, as it
    did before ??? was named (only where no place holds a value is it an error)."""
    path = write(tmp_path, "loss: ???\ntraining:\n  loss:\n    l1_weight: 0.5\n")
    config = kf.load_loss_config(path)
    assert config.section == "training.loss" and config.weights == kf.LossWeights(l1=0.5)


def test_an_unresolved_value_names_the_file_that_holds_it(tmp_path):
    """An interpolation error inside the section named the last file that
    sets any key of it (the group file), not the one that holds the key."""
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - _self_\n  - training: t\ntraining:\n  loss:\n"
                                         "    l1_weight: ${nope}\n",
                            "training/t.yaml": "loss:\n  mse_weight: 2.0\n"})
    message = _one_line_config_error(main)
    assert "Interpolation key 'nope' not found" in message and "t.yaml" not in message


def test_a_package_header_with_cr_line_endings(tmp_path):
    """Hydra splits a header with str.splitlines(): CR-only line endings too."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"# a note about this file\r# @package foo\rloss:\r  l1_weight: 0.3\r")
    assert kf.load_loss_weights(path) == kf.LossWeights(l1=0.3)  # a plain comment first: no header
    path.write_bytes(b"\r# @package foo\rloss:\r  l1_weight: 0.3\r")
    assert "top-level keys: ['foo']" in _one_line_config_error(path)


def test_an_unset_value_reached_through_an_interpolation_names_its_file(tmp_path):
    """loss: ${lossgrp} with lossgrp/a.yaml holding the ??? value: OmegaConf
    names lossgrp.mse_weight, outside the section; the error named main.yaml."""
    main = _tree(tmp_path, {"main.yaml": "defaults:\n  - lossgrp: a\n  - _self_\nloss: ${lossgrp}\n",
                            "lossgrp/a.yaml": "mse_weight: ???\n"})
    message = _one_line_config_error(main, culprit=tmp_path / "lossgrp" / "a.yaml")
    assert "Missing mandatory value: mse_weight" in message
