"""Loss weights from a KoeMorph YAML config (the seed's ``configs/dual_stream_config.yaml``)::

    loss:
      mse_weight: 1.0
      l1_weight: 0.1
      perceptual_weight: 0.5
      temporal_weight: 0.2
      smoothing_weight: 0.1

Other top-level sections (model, data, training, ...) are ignored; inside
``loss:`` every key must be one of the five ``*_weight`` keys (a missing key
keeps its default).
"""

from __future__ import annotations

import os
from typing import Union

from .weights import LossWeights


class ConfigError(ValueError):
    """A config file that cannot be read as loss weights; the message names the file (and key)."""


def load_loss_weights(path: Union[str, os.PathLike], section: str = "loss") -> LossWeights:
    """The :class:`~koemorph_fused.LossWeights` of a YAML config's ``loss:`` section.

    Raises:
        FileNotFoundError / OSError: the file cannot be opened (naming it).
        ConfigError (a ValueError): not YAML, not a mapping, no ``loss:``
            section, or the section is not a mapping; an unknown key, or a
            negative / NaN / infinite weight.
        TypeError: a weight that is not a number (naming the key and file).
    """
    import yaml

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise type(e)(e.errno, f"cannot read loss config {name!r}: {e.strerror}") from e
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{name}: expected a YAML mapping with a '{section}:' section, "
                          f"got {type(config).__name__}")
    if section not in config:
        raise ConfigError(f"{name}: no '{section}:' section (top-level keys: {sorted(map(str, config))})")
    loss = config[section]
    if not isinstance(loss, dict):
        raise ConfigError(f"{name}: '{section}:' must be a mapping of *_weight keys, got {type(loss).__name__}")
    for key, value in loss.items():
        try:
            LossWeights.from_config({key: value})
        except TypeError as e:
            raise TypeError(f"{name}: {section}.{key}: {e}") from e
        except ValueError as e:
            raise ConfigError(f"{name}: {section}.{key}: {e}") from e
    return LossWeights.from_config(loss)


__all__ = ["ConfigError", "load_loss_weights"]
